//! A history checker that can fail: many clients write then read their own
//! keys, read again, and pass causal tokens between connections, against a
//! cluster where one replica applies WAL 300 ms late.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use common::raw::RawClient;
use common::{Harness, simple_error, simple_rows, simple_value};
use tidepool::config::ConsistencyMode;
use tidepool::protocol::backend;
use tidepool::protocol::frontend as fe;
use tidepool::topology::Lsn;

#[derive(Default)]
struct Tally {
    ryw_violations: AtomicU64,
    monotonic_violations: AtomicU64,
    token_violations: AtomicU64,
    replica_reads: AtomicU64,
    primary_reads: AtomicU64,
}

const CLIENTS: i32 = 6;
const ROUNDS: i32 = 20;

async fn read_max(c: &tokio_postgres::Client, key: i32, primary: u16, tally: &Tally) -> i32 {
    let rows = simple_rows(
        c,
        &format!("select coalesce(max(seq), -1)::text || ':' || inet_server_port() from kv where client = {key}"),
    )
    .await;
    let (max, port) = rows[0]
        .split_once(':')
        .unwrap_or_else(|| panic!("key {key}: unexpected answer {rows:?}"));
    if port.parse::<u16>().unwrap() == primary {
        tally.primary_reads.fetch_add(1, Ordering::Relaxed);
    } else {
        tally.replica_reads.fetch_add(1, Ordering::Relaxed);
    }
    max.parse().unwrap()
}

async fn check(h: &Harness, mode: &str) -> Arc<Tally> {
    let tally = Arc::new(Tally::default());
    let primary = h.primary_port();
    let base = match mode {
        "eventual" => 0,
        "read_your_writes" => 1000,
        "monotonic" => 2000,
        _ => 3000,
    };
    let mut tasks = Vec::new();
    for n in 0..CLIENTS {
        let writer = h.connect().await;
        let reader = h.connect().await;
        let tally = tally.clone();
        let mode = mode.to_owned();
        tasks.push(tokio::spawn(async move {
            writer
                .simple_query(&format!("set tidepool.consistency = {mode}"))
                .await
                .unwrap();
            reader
                .simple_query(&format!("set tidepool.consistency = {mode}"))
                .await
                .unwrap();
            let key = base + n;
            let mut seen = -1;
            for seq in 0..ROUNDS {
                writer
                    .simple_query(&format!("insert into kv values ({key}, {seq})"))
                    .await
                    .unwrap();
                // Write then read, on the writer's own session.
                let got = read_max(&writer, key, primary, &tally).await;
                if got < seq {
                    tally.ryw_violations.fetch_add(1, Ordering::Relaxed);
                }
                // Read then read: never back in time.
                let again = read_max(&writer, key, primary, &tally).await;
                if again < got.max(seen) {
                    tally.monotonic_violations.fetch_add(1, Ordering::Relaxed);
                }
                seen = seen.max(again);
                // Another connection, handed the writer's token.
                let token = simple_value(&writer, "show tidepool.lsn").await;
                reader
                    .simple_query(&format!("set tidepool.min_lsn = '{token}'"))
                    .await
                    .unwrap();
                if read_max(&reader, key, primary, &tally).await < seq {
                    tally.token_violations.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    println!(
        "{mode:>17}: ryw violations {}, monotonic violations {}, token violations {}, reads on replicas {}, on primary {}",
        tally.ryw_violations.load(Ordering::Relaxed),
        tally.monotonic_violations.load(Ordering::Relaxed),
        tally.token_violations.load(Ordering::Relaxed),
        tally.replica_reads.load(Ordering::Relaxed),
        tally.primary_reads.load(Ordering::Relaxed),
    );
    tally
}

#[tokio::test(flavor = "multi_thread")]
async fn consistency_modes_hold_against_a_late_replica() {
    let h = Harness::start("").await;
    let admin = h.admin().await;
    admin
        .batch_execute("create table kv (client int, seq int, primary key (client, seq)); grant all on kv to app")
        .await
        .unwrap();
    h.caught_up().await;
    h.delay_replay(1, "300ms");

    let eventual = check(&h, "eventual").await;
    assert!(
        eventual.ryw_violations.load(Ordering::Relaxed) > 0,
        "the checker must be able to see stale reads"
    );
    for mode in ["read_your_writes", "monotonic"] {
        let t = check(&h, mode).await;
        assert_eq!(t.ryw_violations.load(Ordering::Relaxed), 0, "{mode}");
        assert_eq!(t.monotonic_violations.load(Ordering::Relaxed), 0, "{mode}");
        assert_eq!(t.token_violations.load(Ordering::Relaxed), 0, "{mode}");
        assert!(
            t.replica_reads.load(Ordering::Relaxed) > 0,
            "{mode}: no read went to a replica"
        );
    }
    let strong = check(&h, "strong").await;
    assert_eq!(strong.ryw_violations.load(Ordering::Relaxed), 0);
    assert_eq!(strong.replica_reads.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_and_route_explanations() {
    let h = Harness::start("").await;
    let c = h.connect().await;
    assert_eq!(simple_value(&c, "show tidepool.lsn").await, "0/0");
    c.batch_execute("create table t (x int)").await.unwrap();
    let token = simple_value(&c, "show tidepool.lsn").await;
    assert_ne!(token, "0/0", "a write reports its commit LSN");
    assert!(token.contains('/'));
    c.simple_query("set tidepool.min_lsn = 'FFFFFFFF/0'")
        .await
        .unwrap();
    let route = simple_value(&c, "show tidepool.route").await;
    assert!(route.contains("FFFFFFFF/0"), "{route}");
    assert_eq!(
        simple_error(&c, "set tidepool.min_lsn = 'nonsense'").await,
        "22023"
    );
    assert_eq!(
        simple_error(&c, "set tidepool.consistency = 'sometimes'").await,
        "22023"
    );
    c.simple_query("set tidepool.consistency = strong")
        .await
        .unwrap();
    assert_eq!(
        simple_value(&c, "show tidepool.consistency").await,
        "strong"
    );
    assert_eq!(
        simple_value(&c, "select inet_server_port()").await,
        h.primary_port().to_string()
    );
    c.simple_query("reset tidepool.consistency").await.unwrap();
    assert_eq!(
        simple_value(&c, "show tidepool.consistency").await,
        "read_your_writes"
    );
}

/// The token comes before the ReadyForQuery that ends the write, as
/// PostgreSQL orders ParameterStatus: the client has it when its COMMIT
/// returns, and nothing arrives while it sits idle afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn the_token_arrives_before_ready_for_query() {
    let h = Harness::start_with("", |c| c.users[0].allow_md5 = true).await;
    let mut c = RawClient::connect(h.port()).await;
    for sql in [
        "create table t (x int)",
        "begin; insert into t values (1); commit",
    ] {
        let token = token_before_ready(&mut c, sql).await;
        let token = token.unwrap_or_else(|| panic!("{sql}: no tidepool.lsn before ReadyForQuery"));
        assert!(token.contains('/'), "{token}");
        let after = tokio::time::timeout(std::time::Duration::from_millis(300), c.read()).await;
        assert!(
            after.is_err(),
            "{sql}: a message after ReadyForQuery: {after:?}"
        );
    }
}

/// Runs `sql` and reads up to its ReadyForQuery: the `tidepool.lsn` token
/// that came before it, if one did.
async fn token_before_ready(c: &mut RawClient, sql: &str) -> Option<String> {
    c.send(&[fe::query(sql)]).await;
    let mut token = None;
    loop {
        let f = c.read().await;
        if f.tag() == backend::PARAMETER_STATUS {
            let body = f.body();
            let mut parts = body.split(|&b| b == 0);
            if parts.next() == Some(b"tidepool.lsn") {
                token = parts
                    .next()
                    .map(|v| String::from_utf8_lossy(v).into_owned());
            }
        }
        if f.tag() == backend::READY_FOR_QUERY {
            return token;
        }
    }
}

/// `report_lsn = false`: a session whose mode does not read its own writes
/// gets no token, and its writes' LSNs are not asked (SHOW cannot tell
/// one); a session that moves into a mode that reads them after such
/// writes reads from the primary until a later write's LSN is known.
#[tokio::test(flavor = "multi_thread")]
async fn report_lsn_off_asks_for_commit_lsns_only_where_the_mode_reads_them() {
    let h = Harness::start_with("", |c| {
        c.routing.report_lsn = false;
        c.routing.consistency = ConsistencyMode::Eventual;
        c.users[0].allow_md5 = true;
    })
    .await;
    let mut raw = RawClient::connect(h.port()).await;
    for sql in ["create table t (x int)", "insert into t values (1)"] {
        assert_eq!(token_before_ready(&mut raw, sql).await, None, "{sql}");
    }
    token_before_ready(&mut raw, "set tidepool.report_lsn = on").await;
    let token = token_before_ready(&mut raw, "insert into t values (2)").await;
    assert!(
        token.is_some_and(|t| t.contains('/')),
        "on again per session"
    );

    let c = h.connect().await;
    assert_eq!(simple_value(&c, "show tidepool.report_lsn").await, "off");
    c.batch_execute("insert into t values (3)").await.unwrap();
    assert_eq!(
        simple_error(&c, "show tidepool.lsn").await,
        "55000",
        "not asked: unknown"
    );
    assert_eq!(
        simple_error(&c, "set tidepool.report_lsn = sometimes").await,
        "22023"
    );

    c.simple_query("set tidepool.consistency = read_your_writes")
        .await
        .unwrap();
    h.caught_up().await;
    let route = simple_value(&c, "show tidepool.route").await;
    assert!(route.contains("not known"), "{route}");
    for _ in 0..4 {
        let port = common::served_by(&c, "select inet_server_port()").await;
        assert_eq!(
            port,
            h.primary_port(),
            "a write of unknown LSN: reads on the primary"
        );
    }
    c.batch_execute("insert into t values (4)").await.unwrap();
    let token: Lsn = simple_value(&c, "show tidepool.lsn").await.parse().unwrap();
    assert!(token > Lsn(0), "read_your_writes asks: {token}");
    h.caught_up().await;
    let port = common::served_by(&c, "select inet_server_port()").await;
    assert!(
        h.replica_ports().contains(&port),
        "back on replicas: {port}"
    );
}

/// With `synchronous_commit = off` a COMMIT returns before its WAL is
/// written, so what has been written (`pg_current_wal_lsn()`) can be short
/// of the commit, and a replica that replayed that far lacks it: the token
/// must still be past everything the transaction wrote.
#[tokio::test(flavor = "multi_thread")]
async fn an_asynchronous_commit_gets_a_token_past_its_commit() {
    let h = Harness::start("").await;
    let admin = h.admin().await;
    admin
        .batch_execute("create table t (x int); grant all on t to app")
        .await
        .unwrap();
    let c = h.connect().await;
    c.batch_execute("set synchronous_commit = off")
        .await
        .unwrap();
    let mut short = 0;
    for i in 0..50 {
        c.batch_execute("begin").await.unwrap();
        c.batch_execute(&format!("insert into t values ({i})"))
            .await
            .unwrap();
        let written: Lsn = simple_value(&c, "select pg_current_wal_insert_lsn()")
            .await
            .parse()
            .unwrap();
        c.batch_execute("commit").await.unwrap();
        let token: Lsn = simple_value(&c, "show tidepool.lsn").await.parse().unwrap();
        // The commit record comes after the insert's: strictly past it.
        if token <= written {
            short += 1;
        }
    }
    assert_eq!(short, 0, "tokens short of their own transaction's WAL");
}

/// A replica that cannot say how far it has replayed (here the client's
/// user may not call `pg_last_wal_replay_lsn()`) has not shown a read's
/// floor: the read goes to the primary, never to that replica unconfirmed.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_that_cannot_answer_the_probe_gets_no_read_it_must_confirm() {
    let h = Harness::start("").await;
    let admin = h.admin().await;
    admin
        .batch_execute(
            "create table t (x int); grant all on t to app;
             revoke execute on function pg_last_wal_replay_lsn() from public",
        )
        .await
        .unwrap();
    h.caught_up().await;
    // Paused, not delayed: a reloaded `recovery_min_apply_delay` reaches
    // the startup process some time after `pg_reload_conf()` returns, and
    // a replica that replays the first insert at once (and is polled) may
    // rightly take its read unconfirmed. A pause holds the next record.
    for replica in 1..=2 {
        h.cluster
            .psql(replica, "select pg_wal_replay_pause()")
            .unwrap();
    }
    let c = h.connect().await;
    for i in 1..=10 {
        c.batch_execute(&format!("insert into t values ({i})"))
            .await
            .unwrap();
        let seen = simple_value(&c, "select count(*) || ':' || inet_server_port() from t").await;
        let primary = h.primary_port();
        assert_eq!(
            seen,
            format!("{i}:{primary}"),
            "read {i}: rows and the node"
        );
    }
    // The reads went to the primary because the replicas could not answer,
    // not because none was asked.
    let probed = h
        .metric("tidepool_ryw_checks_total{result=\"probed\"}")
        .await;
    assert!(probed.is_some_and(|n| n >= 10), "{probed:?}");
}

/// A primary and one replica the monitor polls once an hour, so that what
/// happens to the replica goes unseen; the session has read from the
/// replica, whose server connection is pooled and used again afterwards.
async fn one_replica_out_of_the_monitors_sight() -> (Harness, tokio_postgres::Client) {
    let spec = tidepool::demo::cluster::ClusterSpec {
        replicas: 1,
        ..Default::default()
    };
    // The generated TOML ends inside [cluster]: this line extends it.
    let h = Harness::start_spec(spec, |_| "poll_interval = \"1h\"\n".into(), |_| {}).await;
    let admin = h.admin().await;
    admin
        .batch_execute("create table t (x int); grant all on t to app")
        .await
        .unwrap();
    h.caught_up().await;
    let c = h.connect().await;
    assert_eq!(
        simple_value(&c, "select count(*) || ':' || inet_server_port() from t").await,
        format!("0:{}", h.cluster.nodes()[1].port)
    );
    (h, c)
}

/// Writes a row, then reads: the read must see it, on the primary.
async fn write_then_read_lands_on_the_primary(h: &Harness, c: &tokio_postgres::Client) {
    c.batch_execute("insert into t values (1)").await.unwrap();
    let seen = simple_value(c, "select count(*) || ':' || inet_server_port() from t").await;
    assert_eq!(seen, format!("1:{}", h.primary_port()));
}

/// A replica promoted behind the monitor's back left the primary's history
/// before the write: the probe finds it where its recovery ended, short of
/// the read's floor, and the read goes to the primary once `ryw_wait` is
/// out.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_promoted_behind_the_monitors_back_gets_no_read_it_must_confirm() {
    let (h, c) = one_replica_out_of_the_monitors_sight().await;
    h.cluster.psql(1, "select pg_promote()").unwrap();
    write_then_read_lands_on_the_primary(&h, &c).await;
}

/// Promoted, then restarted: the node has not been in recovery since it
/// started, answers the probe with NULL, which confirms no floor, and the
/// read goes to the primary.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_restarted_as_a_primary_behind_the_monitors_back_gets_no_read_it_must_confirm() {
    let (mut h, c) = one_replica_out_of_the_monitors_sight().await;
    h.cluster.psql(1, "select pg_promote()").unwrap();
    tokio::task::block_in_place(|| {
        h.cluster.stop_node(1);
        h.cluster.start_node(1).unwrap();
    });
    let probe = "select pg_last_wal_replay_lsn() is null";
    assert_eq!(h.cluster.psql(1, probe).unwrap().trim(), "t");
    write_then_read_lands_on_the_primary(&h, &c).await;
}
