//! Limits and timeouts: idle clients, clients idle inside a transaction,
//! queries a server does not answer, and a client that stops reading a huge
//! result. Each is cut off with PostgreSQL's own SQLSTATE while every other
//! session goes on.

mod common;

use std::time::{Duration, Instant};

use common::raw::RawClient;
use common::{Harness, simple_value, sqlstate};
use tidepool::protocol::backend::{self, ErrorFields};
use tidepool::protocol::frontend as fe;

/// The FATAL a raw client is sent, and that the connection closes after it.
async fn fatal_code(client: &mut RawClient) -> String {
    let frame = client.read().await;
    assert_eq!(frame.tag(), backend::ERROR_RESPONSE);
    let fields = ErrorFields::decode(&frame).unwrap();
    assert!(client.closed().await, "closed after the FATAL");
    fields.code
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_clients_and_idle_transactions_are_cut_off() {
    let h = Harness::start_with("", |c| {
        c.users[0].allow_md5 = true;
        c.listen.client_idle_timeout = Duration::from_secs(1);
        c.listen.idle_in_transaction_timeout = Duration::from_millis(600);
    })
    .await;
    h.admin()
        .await
        .batch_execute("create table idle (x int)")
        .await
        .unwrap();

    // Busy clients are never idle: one query every 300 ms for 2 s.
    let busy = h.connect().await;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        assert_eq!(simple_value(&busy, "select 1").await, "1");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let mut in_txn = RawClient::connect(h.port()).await;
    in_txn
        .send(&[fe::query("begin; insert into idle values (1)")])
        .await;
    assert_eq!(in_txn.until_ready().await.1, None);
    let mut idle = RawClient::connect(h.port()).await;
    let waited = Instant::now();
    assert_eq!(fatal_code(&mut in_txn).await, "25P03");
    assert!(
        waited.elapsed() < Duration::from_millis(900),
        "{:?}",
        waited.elapsed()
    );
    assert_eq!(fatal_code(&mut idle).await, "57P05");
    assert!(
        waited.elapsed() >= Duration::from_millis(900),
        "{:?}",
        waited.elapsed()
    );

    // The abandoned transaction was rolled back; the busy client, idle
    // since, was cut off too, while new clients are served.
    fatal_or_closed(&busy).await;
    let fresh = h.connect().await;
    let rows = simple_value(&fresh, "/* tidepool: primary */ select count(*) from idle").await;
    assert_eq!(rows, "0");
}

/// A tokio-postgres client whose connection the proxy closed.
async fn fatal_or_closed(client: &tokio_postgres::Client) {
    let err = client.simple_query("select 1").await.unwrap_err();
    assert!(err.is_closed() || sqlstate(&err) == "57P05", "{err:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn query_timeout_cancels_then_gives_up_on_a_silent_server() {
    // A new connection to the stopped node waits connect_timeout instead.
    let h = Harness::start("[pool]\nquery_timeout = \"400ms\"\nconnect_timeout = \"1s\"\n").await;
    h.caught_up().await;
    let app = h.connect().await;

    // A slow query is cancelled, with PostgreSQL's code; the session goes on.
    let started = Instant::now();
    let err = app
        .simple_query("/* tidepool: primary */ select pg_sleep(10)")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "57014", "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(simple_value(&app, "select 1").await, "1");

    // A stopped replica answers neither the read nor the cancel: the read
    // is given up on it and redone on another node, well before the
    // monitor marks the replica down.
    let stopped = h.cluster.replicas()[0].port;
    let postmaster = h.cluster.nodes()[1].pid().unwrap();
    signal_node(postmaster, "-STOP");
    for _ in 0..4 {
        let started = Instant::now();
        let port = simple_value(&app, "select inet_server_port()").await;
        assert_ne!(port, stopped.to_string());
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }
    signal_node(postmaster, "-CONT");
}

/// Signals a postmaster and its children (the backends serving the pool's
/// connections), as a frozen machine would stop them all.
fn signal_node(postmaster: u32, signal: &str) {
    let pid = postmaster.to_string();
    let children = std::process::Command::new("pkill")
        .args([signal, "-P", &pid])
        .status()
        .unwrap();
    assert!(children.success());
    let own = std::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .unwrap();
    assert!(own.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_does_not_make_the_proxy_buffer_its_result() {
    let h = Harness::start_with("", |c| c.users[0].allow_md5 = true).await;
    let rss = || {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap();
        kb * 1024
    };
    let other = h.connect().await;
    assert_eq!(simple_value(&other, "select 1").await, "1");
    let before = rss();

    // About 2 GB of rows, never read.
    let mut slow = RawClient::connect(h.port()).await;
    slow.send(&[fe::query(
        "select repeat('x', 2000) from generate_series(1, 1000000)",
    )])
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let grown = rss().saturating_sub(before);
    assert!(grown < 64 << 20, "the proxy grew by {grown} bytes");

    // Everyone else is served meanwhile.
    for _ in 0..20 {
        assert_eq!(simple_value(&other, "select 1").await, "1");
    }
    drop(slow);
}
