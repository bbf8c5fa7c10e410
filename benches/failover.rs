//! HA timings: time from `kill -9` of the primary to the first write that
//! succeeds through tidepool, and the longest a write waits (and how many
//! fail) across a planned switchover. Each run on a fresh local cluster
//! (primary + 2 replicas, `synchronous_standby_names = 'ANY 1 (*)'`) with
//! the embedded coordinator, `lease_ttl = 2s`, `failover_timeout = 1s`.
//!
//! `cargo bench --bench failover`; `TIDEPOOL_BENCH_RUNS` (default 5) runs of
//! each; medians and maxima are printed and written to `target/bench-failover.md`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tidepool::demo::cluster::{Cluster, ClusterSpec};
use tidepool::proxy::Proxy;
use tokio_postgres::NoTls;

const EXTRA: &str =
    "failures_before_down = 2\n\n[coordinator]\nlease_ttl = \"2s\"\nfailover_timeout = \"1s\"\n";
/// Writers in the switchover runs, each one autocommit insert after another.
const WRITERS: usize = 4;

struct Setup {
    cluster: Cluster,
    proxy: Proxy,
}

async fn setup() -> Setup {
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(ClusterSpec::default()))
        .await
        .unwrap()
        .expect("cluster starts");
    cluster
        .psql(
            0,
            "alter system set synchronous_standby_names = 'ANY 1 (*)'",
        )
        .unwrap();
    cluster.psql(0, "select pg_reload_conf()").unwrap();
    let config = tidepool::demo::config(&cluster, "127.0.0.1:0", EXTRA);
    let proxy = Proxy::start(config).await.expect("proxy starts");
    let url = url(&proxy);
    let client = connect(&url).await.unwrap();
    client
        .batch_execute("create table w (n bigint)")
        .await
        .unwrap();
    Setup { cluster, proxy }
}

fn url(proxy: &Proxy) -> String {
    format!(
        "host=127.0.0.1 port={} user=app password=app dbname=postgres connect_timeout=5",
        proxy.addr().port()
    )
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// Kill -9 the primary; returns the time to the first write acknowledged after it.
async fn failover_run() -> Duration {
    let mut s = setup().await;
    let url = url(&s.proxy);
    let mut client = connect(&url).await.unwrap();
    client
        .batch_execute("insert into w values (0)")
        .await
        .unwrap();
    tokio::task::block_in_place(|| s.cluster.kill(0));
    let killed = Instant::now();
    loop {
        if client.is_closed() {
            match connect(&url).await {
                Ok(c) => client = c,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        if client
            .batch_execute("insert into w values (1)")
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(killed.elapsed() < Duration::from_secs(60), "no failover");
    }
    let took = killed.elapsed();
    s.proxy.shutdown().await;
    tokio::task::spawn_blocking(move || drop(s.cluster))
        .await
        .unwrap();
    took
}

/// A switchover under `WRITERS` busy writers: (longest write, failed writes,
/// writes done, controller's own duration).
async fn switchover_run() -> (Duration, u64, u64, Duration) {
    let s = setup().await;
    let url = url(&s.proxy);
    let stop = Arc::new(AtomicBool::new(false));
    let (longest_us, failed, done) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut writers = Vec::new();
    for _ in 0..WRITERS {
        let client = connect(&url).await.unwrap();
        let (stop, longest_us, failed, done) = (
            stop.clone(),
            longest_us.clone(),
            failed.clone(),
            done.clone(),
        );
        writers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                match client.batch_execute("insert into w values (1)").await {
                    Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
                longest_us.fetch_max(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    longest_us.store(0, Ordering::Relaxed);
    let entry = s.proxy.ha().switchover(None).await.expect("switchover");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    s.proxy.shutdown().await;
    tokio::task::spawn_blocking(move || drop(s.cluster))
        .await
        .unwrap();
    (
        Duration::from_micros(longest_us.load(Ordering::Relaxed)),
        failed.load(Ordering::Relaxed),
        done.load(Ordering::Relaxed),
        Duration::from_millis(entry.took_ms),
    )
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

fn main() {
    let runs: usize = std::env::var("TIDEPOOL_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut out = String::from(
        "| run | kill -9 → first write ms | switchover: longest write ms | failed writes | writes | controller ms |\n|---|---|---|---|---|---|\n",
    );
    let (mut failovers, mut stalls, mut total_failed) = (Vec::new(), Vec::new(), 0);
    for run in 1..=runs {
        let failover = runtime.block_on(failover_run());
        let (stall, failed, done, took) = runtime.block_on(switchover_run());
        total_failed += failed;
        out.push_str(&format!(
            "| {run} | {} | {} | {failed} | {done} | {} |\n",
            ms(failover),
            ms(stall),
            ms(took)
        ));
        eprintln!("run {run}: failover {failover:?}, switchover stall {stall:?}, {failed} failed");
        failovers.push(failover);
        stalls.push(stall);
    }
    out.push_str(&format!(
        "| median | {} | {} (max {}) | {total_failed} in all | | |\n",
        ms(median(failovers)),
        ms(median(stalls.clone())),
        ms(stalls.iter().copied().max().unwrap_or_default()),
    ));
    println!("{out}");
    let _ = std::fs::write("target/bench-failover.md", &out);
}
