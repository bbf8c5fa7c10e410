//! Transaction pooling that drivers cannot tell from a direct connection:
//! small pools shared by many clients, in both pool modes.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::raw::{RawClient, bind, execute, parse};
use common::{Harness, simple_value};
use futures_util::StreamExt;
use tidepool::protocol::frontend as fe;
use tokio_postgres::{AsyncMessage, NoTls};

const SMALL_POOL: &str = "[pool]\nsize = 2\n";
const SESSION_MODE: &str = "[pool]\nsize = 25\nmode = \"session\"\n";

#[tokio::test(flavor = "multi_thread")]
async fn prepared_statements_follow_clients_across_server_connections() {
    let h = Harness::start(SMALL_POOL).await;
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(h.connect().await);
    }
    let mut tasks = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let s = c
                .prepare("select $1::int + 1, pg_backend_pid(), inet_server_port()::int")
                .await
                .unwrap();
            let mut servers = HashSet::new();
            for round in 0..15 {
                let row = c.query_one(&s, &[&(i as i32 * 100 + round)]).await.unwrap();
                assert_eq!(row.get::<_, i32>(0), i as i32 * 100 + round + 1);
                servers.insert((row.get::<_, i32>(2), row.get::<_, i32>(1)));
            }
            servers
        }));
    }
    let mut all = HashSet::new();
    let mut moved = 0;
    for t in tasks {
        let servers = t.await.unwrap();
        if servers.len() > 1 {
            moved += 1;
        }
        all.extend(servers);
    }
    assert!(all.len() <= 4, "2 replicas x pool size 2, saw {all:?}");
    assert!(
        moved >= 10,
        "only {moved} of 20 clients ever changed server connection"
    );
}

async fn set_isolation(extra: &str) {
    let h = Harness::start(extra).await;
    let a = h.connect().await;
    let b = h.connect().await;
    a.simple_query("set search_path = a_schema, public")
        .await
        .unwrap();
    a.simple_query("set timezone = 'Asia/Tokyo'").await.unwrap();
    b.simple_query("set search_path to b_schema").await.unwrap();
    b.simple_query("set time zone 'America/New_York'")
        .await
        .unwrap();
    for round in 0..10 {
        let primary = if round % 2 == 0 {
            "/* tidepool: primary */ "
        } else {
            ""
        };
        assert_eq!(
            simple_value(&a, &format!("{primary}show search_path")).await,
            "a_schema, public"
        );
        assert_eq!(
            simple_value(&b, &format!("{primary}show search_path")).await,
            "b_schema"
        );
        assert_eq!(
            simple_value(&a, &format!("{primary}show timezone")).await,
            "Asia/Tokyo"
        );
        assert_eq!(
            simple_value(&b, &format!("{primary}show timezone")).await,
            "America/New_York"
        );
        // A fresh client sees neither.
        let c = h.connect().await;
        assert_eq!(
            simple_value(&c, "show search_path").await,
            "\"$user\", public"
        );
    }
    // SET inside a rolled-back transaction does not stick; inside a committed one it does.
    a.batch_execute("begin").await.unwrap();
    a.simple_query("set timezone = 'UTC'").await.unwrap();
    a.batch_execute("rollback").await.unwrap();
    assert_eq!(simple_value(&a, "show timezone").await, "Asia/Tokyo");
    a.batch_execute("begin").await.unwrap();
    a.simple_query("set timezone = 'UTC'").await.unwrap();
    a.batch_execute("commit").await.unwrap();
    for _ in 0..4 {
        assert_eq!(simple_value(&a, "show timezone").await, "UTC");
    }
    // SET LOCAL is the transaction's business only.
    a.batch_execute("begin").await.unwrap();
    a.simple_query("set local timezone = 'Europe/Paris'")
        .await
        .unwrap();
    assert_eq!(simple_value(&a, "show timezone").await, "Europe/Paris");
    a.batch_execute("commit").await.unwrap();
    assert_eq!(simple_value(&a, "show timezone").await, "UTC");
    // RESET ALL goes back to the startup values.
    let started = common::connect(&format!(
        "{} application_name=starter options='-c statement_timeout=4s'",
        h.url("app", "app", "postgres")
    ))
    .await
    .unwrap();
    started
        .simple_query("set statement_timeout = '9s'")
        .await
        .unwrap();
    started
        .simple_query("set application_name = 'changed'")
        .await
        .unwrap();
    started.simple_query("reset all").await.unwrap();
    for _ in 0..4 {
        assert_eq!(simple_value(&started, "show statement_timeout").await, "4s");
        assert_eq!(
            simple_value(&started, "show application_name").await,
            "starter"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn settings_never_leak_between_clients_in_transaction_mode() {
    set_isolation(SMALL_POOL).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn settings_never_leak_between_clients_in_session_mode() {
    set_isolation(SESSION_MODE).await;
}

/// A client whose notifications and notices are kept.
async fn connect_with_messages(
    h: &Harness,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<AsyncMessage>,
) {
    let (client, mut connection) = tokio_postgres::connect(&h.url("app", "app", "postgres"), NoTls)
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            let _ = tx.send(message);
        }
    });
    (client, rx)
}

#[tokio::test(flavor = "multi_thread")]
async fn session_state_that_cannot_move_pins_the_client() {
    // Pinned clients hold their connection: leave room for the others.
    let h = Harness::start("[pool]\nsize = 4\n").await;
    let (listener, mut messages) = connect_with_messages(&h).await;
    listener.simple_query("listen chan").await.unwrap();
    // Other clients keep the pool busy in between.
    let other = h.connect().await;
    for _ in 0..4 {
        other
            .simple_query("/* tidepool: primary */ select 1")
            .await
            .unwrap();
    }
    other.simple_query("notify chan, 'hello'").await.unwrap();
    listener.simple_query("select 1").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(AsyncMessage::Notification(n)) = messages.recv().await {
                return n;
            }
        }
    })
    .await
    .expect("notification delivered");
    assert_eq!((got.channel(), got.payload()), ("chan", "hello"));

    let t = h.connect().await;
    t.simple_query("create temp table scratch (x int)")
        .await
        .unwrap();
    for i in 0..5 {
        t.simple_query(&format!("insert into scratch values ({i})"))
            .await
            .unwrap();
        other
            .simple_query("/* tidepool: primary */ select 1")
            .await
            .unwrap();
    }
    assert_eq!(simple_value(&t, "select count(*) from scratch").await, "5");

    let l = h.connect().await;
    assert_eq!(
        simple_value(&l, "select pg_advisory_lock(42)::text").await,
        ""
    );
    other
        .simple_query("/* tidepool: primary */ select 1")
        .await
        .unwrap();
    assert_eq!(simple_value(&l, "select pg_advisory_unlock(42)").await, "t");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_parse_leaves_no_name_behind() {
    let h = Harness::start_with(SMALL_POOL, |c| c.users[0].allow_md5 = true).await;
    let mut c = RawClient::connect(h.port()).await;
    // The Supavisor case: a Parse that fails, then the same name again.
    c.send(&[parse("stmt", "select * from missing_table"), fe::sync()])
        .await;
    let (tags, code) = c.until_ready().await;
    assert_eq!((tags.as_str(), code.as_deref()), ("EZ", Some("42P01")));
    c.send(&[
        parse("stmt", "select 1"),
        bind("stmt"),
        execute(),
        fe::sync(),
    ])
    .await;
    assert_eq!(c.until_ready().await, ("12DCZ".into(), None));
    // Reusing a live name is the client's error, as with PostgreSQL, and skips to Sync.
    c.send(&[
        parse("stmt", "select 2"),
        bind("stmt"),
        execute(),
        fe::sync(),
    ])
    .await;
    assert_eq!(c.until_ready().await, ("EZ".into(), Some("42P05".into())));
    // Pipelined: several statements and executions before one Sync, across pooled connections.
    c.send(&[
        parse("a", "select 'a'"),
        parse("b", "select 'b'"),
        bind("a"),
        execute(),
        bind("b"),
        execute(),
        fe::sync(),
        bind("stmt"),
        execute(),
        fe::sync(),
    ])
    .await;
    assert_eq!(c.until_ready().await, ("112DC2DCZ".into(), None));
    assert_eq!(c.until_ready().await, ("2DCZ".into(), None));
    // Close, then the name is free again.
    c.send(&[
        fe::Named::encode(fe::CLOSE, fe::Target::Statement, b"stmt"),
        fe::sync(),
    ])
    .await;
    assert_eq!(c.until_ready().await, ("3Z".into(), None));
    c.send(&[
        parse("stmt", "select 3"),
        bind("stmt"),
        execute(),
        fe::sync(),
    ])
    .await;
    assert_eq!(c.until_ready().await, ("12DCZ".into(), None));
    // An unknown statement is an error, not a hang.
    c.send(&[bind("nope"), execute(), fe::sync()]).await;
    let (tags, code) = c.until_ready().await;
    assert_eq!((tags.as_str(), code.as_deref()), ("EZ", Some("26000")));
}

#[tokio::test(flavor = "multi_thread")]
async fn leaving_clients_leave_nothing_behind() {
    let h = Harness::start("[pool]\nsize = 1\n").await;
    let primary = "/* tidepool: primary */ ";
    // A pinned client's temp table is gone when the next client gets its connection.
    let a = h.connect().await;
    a.simple_query("create temp table scratch (x int)")
        .await
        .unwrap();
    drop(a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b = h.connect().await;
    b.simple_query("create temp table scratch (x int)")
        .await
        .unwrap();
    drop(b);

    // A client that leaves mid-transaction releases its locks at once.
    let admin = h.admin().await;
    admin
        .batch_execute("create table locked (id int primary key, v int); insert into locked values (1, 0); grant all on locked to app")
        .await
        .unwrap();
    let holder = h.connect().await;
    holder
        .batch_execute("begin; update locked set v = 1 where id = 1")
        .await
        .unwrap();
    drop(holder);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let next = h.connect().await;
    next.batch_execute("set lock_timeout = '2s'").await.unwrap();
    next.batch_execute("update locked set v = 2 where id = 1")
        .await
        .unwrap();

    // One terminated backend is that client's error, not the node's.
    let victim = h.connect().await;
    let err = victim
        .simple_query(&format!(
            "{primary}select pg_terminate_backend(pg_backend_pid())"
        ))
        .await
        .unwrap_err();
    assert!(err.code().is_some(), "{err:?}");
    for _ in 0..5 {
        next.batch_execute("update locked set v = v + 1 where id = 1")
            .await
            .unwrap();
    }
    assert_eq!(
        simple_value(&victim, &format!("{primary}select 'still here'")).await,
        "still here"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_that_replicas_cannot_answer_go_to_the_primary() {
    let h = Harness::start("").await;
    let c = h.connect().await;
    let primary = h.primary_port().to_string();
    // Prepared transactions are listed only on the primary.
    assert_eq!(
        simple_value(&c, "select inet_server_port()::text from pg_prepared_xacts right join (select 1) one on true").await,
        primary
    );
    // A hot standby refuses serializable transactions.
    c.simple_query("set default_transaction_isolation = 'serializable'")
        .await
        .unwrap();
    assert_eq!(
        simple_value(&c, "select inet_server_port()::text").await,
        primary
    );
    c.simple_query("reset default_transaction_isolation")
        .await
        .unwrap();
    assert_ne!(
        simple_value(&c, "select inet_server_port()::text").await,
        primary
    );
}

/// With every server connection busy, a login is answered from what the
/// pool's servers reported at startup instead of waiting for one (and, past
/// checkout_timeout, failing): its own startup values apply at its first
/// statement.
#[tokio::test(flavor = "multi_thread")]
async fn a_login_does_not_wait_for_a_busy_pool() {
    let h = Harness::start("[pool]\nsize = 1\ncheckout_timeout = \"500ms\"\n").await;
    let holder = h.connect().await;
    holder
        .batch_execute("create table busy (v int); begin; insert into busy values (1)")
        .await
        .unwrap();
    let url = format!(
        "{} application_name=latecomer options='-c TimeZone=Asia/Tokyo'",
        h.url("app", "app", "postgres")
    );
    let started = std::time::Instant::now();
    let late = common::connect(&url)
        .await
        .expect("a login while the only primary connection is in a transaction");
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "the login waited {:?}",
        started.elapsed()
    );
    holder.batch_execute("commit").await.unwrap();
    let primary = "/* tidepool: primary */ ";
    assert_eq!(
        simple_value(&late, &format!("{primary}show timezone")).await,
        "Asia/Tokyo"
    );
    assert_eq!(
        simple_value(&late, &format!("{primary}show application_name")).await,
        "latecomer"
    );
}

/// A DDL that changes a prepared statement's result type leaves every copy
/// the servers hold dead ("cached plan must not change result type",
/// 0A000), and clients share those copies by text. Old statements fail as
/// they would directly (once one has met a dead copy, on every server
/// connection), and the ones prepared again run everywhere instead of
/// meeting another dead copy.
#[tokio::test(flavor = "multi_thread")]
async fn a_statement_prepared_again_after_its_result_type_changed_runs() {
    const SQL: &str = "select * from stale_plan";
    let h = Harness::start(SMALL_POOL).await;
    let admin = h.connect().await;
    admin
        .batch_execute("create table stale_plan (a int); insert into stale_plan values (1)")
        .await
        .unwrap();
    h.caught_up().await;
    let mut clients = Vec::new();
    for _ in 0..8 {
        let c = h.connect().await;
        let s = c.prepare(SQL).await.unwrap();
        clients.push((c, s));
    }
    // Every client runs it a few times at once: copies on every connection
    // of both replicas' pools.
    let runs = clients.iter().map(|(c, s)| async move {
        for _ in 0..5 {
            assert_eq!(c.query_one(s, &[]).await.unwrap().len(), 1);
        }
    });
    futures_util::future::join_all(runs).await;

    admin
        .batch_execute("alter table stale_plan add column b int default 2")
        .await
        .unwrap();
    h.caught_up().await;
    let mut dead = 0;
    for (i, (c, s)) in clients.iter().enumerate() {
        for _ in 0..3 {
            match c.query(s, &[]).await {
                Err(e) => {
                    let code = e.code().map(|c| c.code().to_owned());
                    assert_eq!(code.as_deref(), Some("0A000"), "{e}");
                    dead += 1;
                }
                Ok(_) => assert_eq!(dead, 0, "client {i} ran an old statement after a refusal"),
            }
        }
    }
    assert!(dead > 0, "no old statement met a dead copy");

    let runs = clients.iter().map(|(c, _)| async move {
        let s = c.prepare(SQL).await.unwrap();
        for _ in 0..10 {
            let row = c.query_one(&s, &[]).await.unwrap();
            assert_eq!((row.get::<_, i32>(0), row.get::<_, i32>(1)), (1, 2));
        }
    });
    futures_util::future::join_all(runs).await;
}

/// `listen.busy_poll`: sessions that poll their sockets instead of sleeping
/// still get every answer, their own and in order, alone or side by side.
#[tokio::test(flavor = "multi_thread")]
async fn busy_polling_sessions_get_their_own_answers_in_order() {
    let h = Harness::start_with("", |c| c.listen.busy_poll = Duration::from_millis(10)).await;
    let setup = h.connect().await;
    setup
        .simple_query("CREATE TABLE spun (client int, round int)")
        .await
        .unwrap();
    let caught = "tidepool_busy_poll_waits_total{outcome=\"caught\"}";
    let before = h.metric(caught).await.expect(caught);
    let work = |client: i32| {
        let c = h.connect();
        async move {
            let c = c.await;
            for round in 0..40 {
                let sql = format!("SELECT '{client}:{round}'");
                assert_eq!(simple_value(&c, &sql).await, format!("{client}:{round}"));
                let row = c
                    .query_one("SELECT $1::int * 2", &[&(client * 1000 + round)])
                    .await
                    .unwrap();
                assert_eq!(row.get::<_, i32>(0), (client * 1000 + round) * 2);
                c.batch_execute(&format!(
                    "BEGIN; INSERT INTO spun VALUES ({client}, {round}); COMMIT"
                ))
                .await
                .unwrap();
            }
            let mine = format!("SELECT count(*) FROM spun WHERE client = {client}");
            assert_eq!(
                simple_value(&c, &format!("/* tidepool: primary */ {mine}")).await,
                "40"
            );
        }
    };
    // Alone, every wait may spin; side by side, only while no other unit runs.
    work(0).await;
    let alone = h.metric(caught).await.expect(caught) - before;
    // Each of its 120 round trips waits for the server, then the client:
    // most waits are caught on an idle machine (367 seen), fewer on a busy
    // one (118 in a CI run beside other work), none with polling off.
    assert!(alone >= 30, "{alone} waits caught while polling");
    futures_util::future::join_all((1..5).map(work)).await;
    assert_eq!(
        simple_value(&setup, "SELECT count(*) FROM spun").await,
        "200"
    );
}
