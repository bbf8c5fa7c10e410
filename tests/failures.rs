//! Failures get clear errors with the right SQLSTATE, and only the client
//! they concern notices them.

mod common;

use std::time::{Duration, Instant};

use common::raw::RawClient;
use common::{Harness, connect, served_by, simple_value, sqlstate, wait_for};
use tidepool::protocol::frontend as fe;

#[tokio::test(flavor = "multi_thread")]
async fn bad_logins_get_the_right_sqlstate() {
    let h = Harness::start("").await;
    let err = connect(&h.url("app", "wrong", "postgres"))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "28P01");
    let err = connect(&h.url("nobody", "x", "postgres"))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "28000");
    let err = connect(&h.url("app", "app", "no_such_db"))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "3D000");
    // Others carry on.
    let c = h.connect().await;
    c.simple_query("select 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_replica_only_costs_its_in_flight_query() {
    let mut h = Harness::start("").await;
    let c = h.connect().await;
    let victim = h.cluster.replicas()[0].port;
    let survivor = h.cluster.replicas()[1].port;
    for _ in 0..4 {
        served_by(&c, "select inet_server_port()").await;
    }
    h.cluster.kill(1);
    let mut errors = 0;
    let mut ports = Vec::new();
    for _ in 0..20 {
        match c.simple_query("select inet_server_port()").await {
            Ok(rows) => ports.push(match &rows[1] {
                tokio_postgres::SimpleQueryMessage::Row(r) => {
                    r.get(0).unwrap().parse::<u16>().unwrap()
                }
                _ => unreachable!(),
            }),
            Err(e) => {
                assert_eq!(sqlstate(&e), "08006", "{e}");
                errors += 1;
            }
        }
    }
    assert!(errors <= 1, "{errors} errors after killing a replica");
    assert!(!ports.contains(&victim));
    assert!(ports.iter().filter(|p| **p == survivor).count() >= 18);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_primary_gives_a_clear_error_not_a_hang() {
    let mut h = Harness::start("").await;
    let c = h.connect().await;
    c.batch_execute("create table k (v int)").await.unwrap();
    h.cluster.kill(0);
    let started = Instant::now();
    let err = c
        .batch_execute("insert into k values (1)")
        .await
        .unwrap_err();
    let code = sqlstate(&err);
    assert!(["08006", "57P03"].contains(&code.as_str()), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // Reads still work from the replicas.
    let port = served_by(&c, "select inet_server_port()").await;
    assert!(h.replica_ports().contains(&port));
    // And a write keeps failing fast and clearly.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let err = c
        .batch_execute("insert into k values (2)")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "57P03", "{err:?}");
}

/// A killed backend says nothing before its connection closes: the client
/// still hears how its server was lost, and goes on once its transaction
/// is over.
#[tokio::test(flavor = "multi_thread")]
async fn a_primary_killed_mid_transaction_is_reported_with_how_it_was_lost() {
    let mut h = Harness::start("").await;
    let c = h.connect().await;
    c.batch_execute("create table mid (v int)").await.unwrap();
    c.batch_execute("begin; insert into mid values (1)")
        .await
        .unwrap();
    tokio::task::block_in_place(|| h.cluster.kill(0));
    let err = c
        .batch_execute("insert into mid values (2)")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "08006", "{err:?}");
    let message = err.as_db_error().expect("an ErrorResponse").message();
    let primary = h.cluster.primary().port;
    assert!(
        message.contains(&format!(
            ":{primary} (closed by the server without a message)"
        )) || message.contains(&format!(":{primary} (connection reset)")),
        "{message}"
    );
    c.batch_execute("rollback").await.unwrap();
    let port = served_by(&c, "select inet_server_port()").await;
    assert!(h.replica_ports().contains(&port));
}

/// A client gone while its statement runs inside a transaction block
/// leaves no locks behind: the statement is cancelled rather than left to
/// run out for a transaction that can only roll back. A statement running
/// outside a block finishes and commits, as over a direct connection.
#[tokio::test(flavor = "multi_thread")]
async fn a_vanished_clients_transaction_lets_go_of_its_locks_at_once() {
    let h = Harness::start_with("", |c| c.users[0].allow_md5 = true).await;
    let c = h.connect().await;
    c.batch_execute("create table held (v int)").await.unwrap();
    let admin = h.admin().await;
    let sleeping = async || {
        let sql = "select count(*) from pg_stat_activity \
                   where query like 'select pg_sleep(60)%' and pid <> pg_backend_pid()";
        admin.query_one(sql, &[]).await.unwrap().get::<_, i64>(0)
    };

    let mut raw = RawClient::connect(h.port()).await;
    for sql in ["begin", "lock table held"] {
        raw.send(&[fe::query(sql)]).await;
        assert_eq!(raw.until_ready().await.1, None, "{sql}");
    }
    raw.send(&[fe::query("select pg_sleep(60)")]).await;
    wait_for(Duration::from_secs(10), "the sleep runs", async || {
        sleeping().await == 1
    })
    .await;
    drop(raw);
    let took = wait_for(
        Duration::from_secs(10),
        "the sleep is cancelled",
        async || sleeping().await == 0,
    )
    .await;
    let insert = c.batch_execute("insert into held values (1)");
    tokio::time::timeout(Duration::from_secs(10), insert)
        .await
        .expect("the table's lock was let go")
        .unwrap();
    println!("cancelled {took:?} after the client left");

    let mut raw = RawClient::connect(h.port()).await;
    raw.send(&[fe::query("insert into held select 2 from pg_sleep(1)")])
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(raw);
    wait_for(
        Duration::from_secs(10),
        "the autocommit insert commits",
        async || {
            simple_value(
                &c,
                "/* tidepool: primary */ select count(*) from held where v = 2",
            )
            .await
                == "1"
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_connection_closed_while_idle_is_replaced_unseen() {
    let h = Harness::start("[pool]\nsize = 2\n").await;
    let c = h.connect().await;
    c.batch_execute("create table idle_kill (v int)")
        .await
        .unwrap();
    let admin = h.admin().await;
    for round in 0..3 {
        // Every pooled server connection of `app` on the primary, idle in
        // the pool, is terminated (as a restart or idle_session_timeout would).
        let killed = admin
            .query_one(
                "select count(pg_terminate_backend(pid)) from pg_stat_activity \
                 where usename = 'app' and pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0);
        assert!(killed >= 1, "round {round}: no pooled connection to kill");
        // PostgreSQL's FATAL reaches the sockets before the next checkout.
        tokio::time::sleep(Duration::from_millis(200)).await;
        c.batch_execute(&format!("insert into idle_kill values ({round})"))
            .await
            .unwrap_or_else(|e| panic!("round {round}: the write failed: {e:?}"));
    }
    let rows = admin
        .query_one("select count(*) from idle_kill", &[])
        .await
        .unwrap();
    assert_eq!(rows.get::<_, i64>(0), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn pool_exhaustion_is_53300() {
    let h = Harness::start("[pool]\nsize = 1\ncheckout_timeout = \"300ms\"\n").await;
    let holder = h.connect().await;
    holder.batch_execute("begin; select 1").await.unwrap();
    let waiter = h.connect().await;
    let err = waiter
        .batch_execute("insert into nowhere values (1)")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "53300", "{err}");
    holder.batch_execute("commit").await.unwrap();
    waiter.batch_execute("select 1").await.unwrap();
}

/// The values of `table`'s column `v` on the primary, in order.
async fn written(client: &tokio_postgres::Client, table: &str) -> String {
    let sql =
        format!("/* tidepool: primary */ select string_agg(v::text, ',' order by v) from {table}");
    simple_value(client, &sql).await
}

/// A client that leaves while its write waits for a server never has it
/// run: it saw its connection fail and may be retrying elsewhere.
#[tokio::test(flavor = "multi_thread")]
async fn a_write_whose_client_left_while_it_waited_for_a_server_never_runs() {
    let h = Harness::start_with("[pool]\nsize = 1\ncheckout_timeout = \"20s\"\n", |c| {
        c.users[0].allow_md5 = true
    })
    .await;
    let holder = h.connect().await;
    holder
        .batch_execute("create table queued (v int); begin; insert into queued values (1)")
        .await
        .unwrap();
    let mut raw = RawClient::connect(h.port()).await;
    raw.send(&[fe::query("insert into queued values (2)")])
        .await;
    let waiting = "tidepool_clients{state=\"waiting\"}";
    wait_for(Duration::from_secs(10), "the insert waits", async || {
        h.metric(waiting).await == Some(1)
    })
    .await;
    drop(raw);
    wait_for(Duration::from_secs(10), "the waiter is gone", async || {
        h.metric(waiting).await == Some(0)
    })
    .await;
    holder.batch_execute("commit").await.unwrap();
    // Had it been kept, the insert would run as soon as the commit freed the
    // pool's one connection.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(written(&holder, "queued").await, "1");
    assert_eq!(h.metric("tidepool_session_panics_total").await, Some(0));
}

/// The same for a statement held by a pause (`tidepool ctl pause`, and
/// every switchover): resumed, it does not run for a client that has gone.
#[tokio::test(flavor = "multi_thread")]
async fn a_write_whose_client_left_during_a_pause_never_runs() {
    let h = Harness::start_with("", |c| c.users[0].allow_md5 = true).await;
    let c = h.connect().await;
    c.batch_execute("create table held_back (v int)")
        .await
        .unwrap();
    h.proxy().ha().pause().await.unwrap();
    let mut gone = RawClient::connect(h.port()).await;
    gone.send(&[fe::query("insert into held_back values (1)")])
        .await;
    let mut stays = RawClient::connect(h.port()).await;
    stays
        .send(&[fe::query("insert into held_back values (2)")])
        .await;
    let clients = async || h.metric("tidepool_clients_connected").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(clients().await, Some(3));
    drop(gone);
    // Its session ends while the pause lasts, its statement with it.
    wait_for(
        Duration::from_secs(5),
        "the client that left is gone",
        async || clients().await == Some(2),
    )
    .await;
    h.proxy().ha().resume().await.unwrap();
    // (The ParameterStatus of the write's commit LSN token aside.)
    let (tags, code) = stays.until_ready().await;
    assert_eq!((tags.replace('S', ""), code), ("CZ".into(), None));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(written(&c, "held_back").await, "2");
}

/// A replica shutting down (smart shutdown, waiting for an open session)
/// refuses new connections with 57P03 while the monitor's connection still
/// answers for it: a read that meets the refusal goes to another node
/// instead of passing the refusal on.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_refusing_new_connections_sends_reads_elsewhere() {
    let h = Harness::start("").await;
    let refusing = h.cluster.nodes()[1].port;
    let holder = connect(&h.admin_url(refusing)).await.unwrap();
    h.cluster.signal(1, libc::SIGTERM);
    let direct = connect(&h.admin_url(refusing)).await.unwrap_err();
    assert_eq!(sqlstate(&direct), "57P03", "{direct}");
    let c = h.connect().await;
    for _ in 0..10 {
        let port = served_by(&c, "select inet_server_port()").await;
        assert_ne!(port, refusing);
    }
    drop(holder);
}
