//! The wire protocol passes through intact: COPY, large results, notices,
//! cancellation, pipelining and prepared statements across transactions.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::raw::{self, RawClient};
use common::{Harness, simple_value, sqlstate};
use futures_util::{SinkExt, StreamExt, TryStreamExt, pin_mut};
use tidepool::protocol::frontend as fe;

#[tokio::test(flavor = "multi_thread")]
async fn copy_in_and_out() {
    let h = Harness::start("").await;
    let c = h.connect().await;
    c.batch_execute("create table c (id int, name text)")
        .await
        .unwrap();
    let sink = c.copy_in("copy c from stdin").await.unwrap();
    pin_mut!(sink);
    let mut data = String::new();
    for i in 0..10_000 {
        data.push_str(&format!("{i}\tname {i}\n"));
    }
    sink.send(Bytes::from(data.clone())).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 10_000);

    h.caught_up().await;
    let stream = c.copy_out("copy c to stdout").await.unwrap();
    let chunks: Vec<Bytes> = stream.try_collect().await.unwrap();
    let out: Vec<u8> = chunks.concat();
    assert_eq!(out, data.as_bytes());
    let n: i64 = c
        .query_one("select count(*) from c", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 10_000);
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_100_mb_result_streams_with_bounded_memory() {
    let h = Harness::start("").await;
    let c = h.connect().await;
    let before = rss_kib();
    let rows = c
        .query_raw(
            "select repeat('x', 1000) from generate_series(1, 100000)",
            std::iter::empty::<i32>(),
        )
        .await
        .unwrap();
    pin_mut!(rows);
    let (mut n, mut bytes) = (0u64, 0u64);
    let mut peak = before;
    while let Some(row) = rows.next().await {
        let row = row.unwrap();
        bytes += row.get::<_, &str>(0).len() as u64;
        n += 1;
        if n % 10_000 == 0 {
            peak = peak.max(rss_kib());
        }
    }
    assert_eq!((n, bytes), (100_000, 100_000_000));
    let growth_mib = (peak.saturating_sub(before)) / 1024;
    println!(
        "RSS before {before} KiB, peak {peak} KiB, growth {growth_mib} MiB for 100 MB streamed"
    );
    assert!(
        growth_mib < 40,
        "proxy + client grew {growth_mib} MiB streaming 100 MB"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_reaches_the_right_query_only() {
    let h = Harness::start("").await;
    let victim = h.connect().await;
    let bystander = h.connect().await;
    let token = victim.cancel_token();
    let started = Instant::now();
    let sleeping = tokio::spawn(async move { victim.simple_query("select pg_sleep(20)").await });
    let other = tokio::spawn(async move {
        bystander
            .simple_query("/* tidepool: primary */ select pg_sleep(1.5)")
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let err = sleeping.await.unwrap().unwrap_err();
    assert_eq!(sqlstate(&err), "57014", "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    other
        .await
        .unwrap()
        .expect("the other client's query was not cancelled");

    // An idle client's old key cancels nothing.
    let c = h.connect().await;
    let token = c.cancel_token();
    c.simple_query("select 1").await.unwrap();
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    // The driver returns once the request is written, before the proxy has
    // read it: a query sent at once could be the one it meets, as with
    // PostgreSQL itself. Let it arrive while the client is idle.
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.simple_query("select pg_sleep(0.3)").await.unwrap();
}

/// A statement still waiting for a server connection has reached no
/// server: its cancel is answered by the proxy (57014), the wait ends, and
/// the session goes on.
#[tokio::test(flavor = "multi_thread")]
async fn cancel_ends_a_wait_for_a_server() {
    let h = Harness::start("[pool]\nsize = 1\ncheckout_timeout = \"30s\"\n").await;
    // Logged in first: a login takes a server connection for a moment too.
    let waiter = h.connect().await;
    let holder = h.connect().await;
    holder
        .batch_execute("begin; select pg_advisory_xact_lock(7)")
        .await
        .unwrap();
    let token = waiter.cancel_token();
    let started = Instant::now();
    let waiting = tokio::spawn(async move {
        let result = waiter
            .simple_query("/* tidepool: primary */ select now()")
            .await;
        (waiter, result)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let (waiter, result) = waiting.await.unwrap();
    let err = result.unwrap_err();
    assert_eq!(sqlstate(&err), "57014", "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    holder.batch_execute("commit").await.unwrap();
    assert_eq!(
        simple_value(&waiter, "/* tidepool: primary */ select 41 + 1").await,
        "42"
    );
}

/// PostgreSQL keeps the unnamed statement past Sync, until the next unnamed
/// Parse or simple query (asyncpg with `statement_cache_size=0` relies on
/// it): a Bind of it in a later transaction, which round-robin sends to the
/// other replica, finds it there.
#[tokio::test(flavor = "multi_thread")]
async fn the_unnamed_statement_outlives_its_transaction() {
    // md5: the raw client speaks no SCRAM.
    let h = Harness::start_with("", |c| c.users[0].allow_md5 = true).await;
    let mut raw = RawClient::connect(h.port()).await;
    raw.send(&[
        raw::parse("", "select inet_server_port()::text"),
        fe::sync(),
    ])
    .await;
    assert_eq!(raw.until_ready().await, ("1Z".to_string(), None));
    let mut ports = HashSet::new();
    for _ in 0..2 {
        raw.send(&[raw::bind(""), raw::execute(), fe::sync()]).await;
        let frames = raw.frames_until_ready().await;
        let tags: String = frames.iter().map(|f| f.tag() as char).collect();
        assert_eq!(tags, "2DCZ", "{frames:?}");
        ports.insert(String::from_utf8_lossy(&frames[1].body()[6..]).into_owned());
    }
    let replicas: HashSet<String> = h.replica_ports().iter().map(u16::to_string).collect();
    assert_eq!(ports, replicas, "one Bind on each replica");
    // A simple query destroys it, as in PostgreSQL.
    raw.send(&[fe::query("select 1")]).await;
    raw.until_ready().await;
    raw.send(&[raw::bind(""), raw::execute(), fe::sync()]).await;
    assert_eq!(raw.until_ready().await.1.as_deref(), Some("26000"));
}

/// Drivers without named statements send the same Parse before every Bind;
/// the proxy reuses the route it learned from that text, and classifies a
/// new text anew: a write after reads, then reads after writes, each on
/// the right node.
#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_unnamed_parse_keeps_its_own_route() {
    let h = Harness::start_with("", |c| c.users[0].allow_md5 = true).await;
    let mut raw = RawClient::connect(h.port()).await;
    raw.send(&[fe::query("create sequence memo_seq")]).await;
    assert_eq!(raw.until_ready().await.1, None);
    let read = "select inet_server_port()::text";
    let write = "select inet_server_port()::text from (select nextval('memo_seq')) s";
    let primary = h.primary_port().to_string();
    for (sql, on_primary) in [
        (read, false),
        (read, false),
        (write, true),
        (write, true),
        (read, false),
    ] {
        raw.send(&[
            raw::parse("", sql),
            raw::bind(""),
            raw::execute(),
            fe::sync(),
        ])
        .await;
        // A write's answer carries its commit LSN (ParameterStatus) too.
        let frames = raw.frames_until_ready().await;
        let frames: Vec<_> = frames.into_iter().filter(|f| f.tag() != b'S').collect();
        let tags: String = frames.iter().map(|f| f.tag() as char).collect();
        assert_eq!(tags, "12DCZ", "{sql}: {frames:?}");
        let port = String::from_utf8_lossy(&frames[2].body()[6..]).into_owned();
        assert_eq!(port == primary, on_primary, "{sql} ran on {port}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn prepared_statements_survive_transaction_pooling() {
    let h = Harness::start("[pool]\nsize = 2\n").await;
    // More clients than server connections: statements must follow the client.
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(h.connect().await);
    }
    let mut statements = Vec::new();
    for c in &clients {
        statements.push(c.prepare("select $1::int * 2").await.unwrap());
    }
    for round in 0..5 {
        let mut tasks = Vec::new();
        for (c, s) in clients.iter().zip(&statements) {
            tasks.push(async move { c.query_one(s, &[&round]).await.map(|r| r.get::<_, i32>(0)) });
        }
        for r in futures_util::future::join_all(tasks).await {
            assert_eq!(r.unwrap(), round * 2);
        }
    }
    // A failed Parse leaves no name behind: the same name can be prepared again.
    let c = &clients[0];
    let err = c.prepare("select * from no_such_table").await.unwrap_err();
    assert_eq!(sqlstate(&err), "42P01");
    let s = c.prepare("select 41 + 1").await.unwrap();
    assert_eq!(c.query_one(&s, &[]).await.unwrap().get::<_, i32>(0), 42);
    // Pipelined queries on one client (tokio-postgres sends them back to back).
    let (a, b, d) = tokio::join!(
        c.query_one("select 1::int", &[]),
        c.query_one("select 2::int", &[]),
        c.query_one("select 3::int", &[]),
    );
    assert_eq!(
        (
            a.unwrap().get::<_, i32>(0),
            b.unwrap().get::<_, i32>(0),
            d.unwrap().get::<_, i32>(0)
        ),
        (1, 2, 3)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn notices_and_errors_reach_psql() {
    let h = Harness::start("").await;
    let out = std::process::Command::new("psql")
        .envs(h.pg_env())
        .args(["-X", "-v", "ON_ERROR_STOP=0", "-c"])
        .arg("do $$ begin raise notice 'hello from the primary'; end $$")
        .args(["-c", "select 1/0", "-c", "select 'still here'"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stderr.contains("NOTICE:  hello from the primary"),
        "{stderr}"
    );
    assert!(stderr.contains("division by zero"), "{stderr}");
    assert!(stdout.contains("still here"), "{stdout}");
}
