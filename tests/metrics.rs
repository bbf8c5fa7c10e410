//! The admin HTTP listener: metrics that move with real traffic, an
//! exposition promtool accepts, and health, readiness and topology that
//! match the cluster.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::post;
use common::http::{self, Response};
use common::{Harness, served_by, simple_error, simple_value};
use tidepool::admin::http::guarded;
use tidepool::config::Secret;
use tokio::io::AsyncWriteExt;

async fn scrape(h: &Harness) -> String {
    let response = http::get(h.proxy().admin_addr(), "/metrics").await;
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(
        response.header("content-type"),
        Some("text/plain; version=0.0.4")
    );
    response.body
}

/// The sum of the samples of `name` whose labels include all of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .filter(|(series, _)| {
            let (series_name, rest) = series.split_once('{').unwrap_or((series, ""));
            series_name == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|(_, value)| value.parse::<f64>().expect("a number"))
        .sum()
}

/// A token no metric or JSON body could contain by chance.
const TOKEN: &str = "tok-5b0e2c91";

fn with_token() -> String {
    format!("[admin]\ntoken = \"{TOKEN}\"\n")
}

fn node(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

#[tokio::test(flavor = "multi_thread")]
async fn counters_move_with_real_traffic() {
    let h = Harness::start(&with_token()).await;
    let c = h.connect().await;
    let primary = node(h.primary_port());
    c.batch_execute("create table t (id serial primary key, v int)")
        .await
        .unwrap();
    h.caught_up().await;
    h.polled().await;
    for _ in 0..6 {
        served_by(&c, "select inet_server_port()").await;
    }
    c.simple_query("/* tidepool: primary */ select 1")
        .await
        .unwrap();
    let read = c.prepare("select $1::int + 1").await.unwrap();
    for i in 0..6 {
        c.query_one(&read, &[&i]).await.unwrap();
    }
    assert_eq!(simple_error(&c, "select 1/0").await, "22012");
    let listener = h.connect().await;
    listener.batch_execute("listen events").await.unwrap();

    let text = scrape(&h).await;
    let units = |labels: &[(&str, &str)]| sample(&text, "tidepool_units_total", labels);
    let replica_reads: f64 = h
        .replica_ports()
        .into_iter()
        .map(|port| {
            units(&[
                ("node", &node(port)),
                ("role", "replica"),
                ("reason", "read"),
            ])
        })
        .sum();
    assert!(replica_reads >= 12.0, "{replica_reads}\n{text}");
    for port in h.replica_ports() {
        assert!(
            units(&[("node", &node(port)), ("reason", "read")]) >= 1.0,
            "reads spread over both replicas\n{text}"
        );
    }
    assert!(units(&[("node", &primary), ("role", "primary"), ("reason", "write")]) >= 1.0);
    assert_eq!(
        units(&[("node", &primary), ("role", "primary"), ("reason", "hint")]),
        1.0
    );
    assert_eq!(units(&[("role", "replica"), ("reason", "write")]), 0.0);
    assert_eq!(
        sample(&text, "tidepool_pins_total", &[("reason", "listen")]),
        1.0
    );
    assert_eq!(
        sample(&text, "tidepool_client_errors_total", &[("class", "22")]),
        1.0
    );
    assert!(sample(&text, "tidepool_prepared_statement_cache_misses_total", &[]) >= 1.0);
    assert!(sample(&text, "tidepool_prepared_statement_cache_hits_total", &[]) >= 1.0);
    assert!(sample(&text, "tidepool_classify_cache_hits_total", &[]) >= 1.0);
    assert!(sample(&text, "tidepool_classify_cache_misses_total", &[]) >= 1.0);
    assert!(
        sample(
            &text,
            "tidepool_unit_duration_seconds_count",
            &[("route", "replica")]
        ) >= 12.0
    );
    assert!(
        sample(
            &text,
            "tidepool_server_checkout_seconds_count",
            &[("node", &primary)]
        ) >= 1.0
    );
    assert_eq!(sample(&text, "tidepool_clients_connected", &[]), 2.0);
    // The pinned one keeps its server: active; the other is between units.
    assert_eq!(
        sample(&text, "tidepool_clients", &[("state", "active")]),
        1.0
    );
    assert_eq!(sample(&text, "tidepool_clients", &[("state", "idle")]), 1.0);
    assert_eq!(
        sample(&text, "tidepool_clients", &[("state", "waiting")]),
        0.0
    );
    let pool = [("node", primary.as_str()), ("pool", "app/postgres")];
    assert_eq!(sample(&text, "tidepool_pool_servers_max", &pool), 20.0);
    // The pinned client holds its server connection.
    assert!(
        sample(
            &text,
            "tidepool_pool_servers",
            &[pool[0], pool[1], ("state", "active")]
        ) >= 1.0
    );
    assert_eq!(sample(&text, "tidepool_clients_waiting", &pool), 0.0);

    // Scrape-time views of the topology.
    assert_eq!(
        sample(
            &text,
            "tidepool_node_role",
            &[("node", &primary), ("role", "primary")]
        ),
        1.0
    );
    for port in h.replica_ports() {
        let at = [("node", node(port))];
        let at: Vec<(&str, &str)> = at.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(sample(&text, "tidepool_node_up", &at), 1.0);
        assert!(sample(&text, "tidepool_node_replay_lsn_bytes", &at) > 0.0);
        assert!(sample(&text, "tidepool_node_receive_lsn_bytes", &at) > 0.0);
        assert_eq!(sample(&text, "tidepool_node_lagging", &at), 0.0);
        assert!(text.contains(&format!(
            "tidepool_node_replication_lag_bytes{{node=\"{}\"}}",
            node(port)
        )));
    }
    assert!(
        sample(
            &text,
            "tidepool_node_current_lsn_bytes",
            &[("node", &primary)]
        ) > 0.0
    );
    assert_eq!(
        sample(&text, "tidepool_node_timeline", &[("node", &primary)]),
        1.0
    );
    assert!(text.contains("\ntidepool_topology_epoch 1\n"), "{text}");

    drop(listener);
    let deadline = Instant::now() + Duration::from_secs(5);
    while sample(&scrape(&h).await, "tidepool_clients_connected", &[]) != 1.0 {
        assert!(
            Instant::now() < deadline,
            "a closed client is still counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!scrape(&h).await.contains(TOKEN));
}

#[tokio::test(flavor = "multi_thread")]
async fn promtool_accepts_the_exposition() {
    let h = Harness::start("").await;
    let c = h.connect().await;
    c.batch_execute("create table t (v int); insert into t values (1)")
        .await
        .unwrap();
    h.caught_up().await;
    simple_value(&c, "select count(*) from t").await;
    c.batch_execute("listen x").await.unwrap();
    let _ = c.simple_query("select * from no_such_table").await;
    let text = scrape(&h).await;

    let mut promtool = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs (Debian package prometheus; scripts/test.sh installs it)");
    let mut stdin = promtool.stdin.take().expect("piped");
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let out = promtool.wait_with_output().await.unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool failed: {said}\n{text}");
    assert_eq!(said.trim(), "", "promtool lint complaints\n{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn health_ready_and_topology_match_the_cluster() {
    let mut h = Harness::start(&with_token()).await;
    let admin = h.proxy().admin_addr();
    let health = http::get(admin, "/health").await;
    assert_eq!((health.status, health.body.as_str()), (200, "ok"));

    let ready = http::get(admin, "/ready").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    let body = ready.json();
    assert_eq!(body["ready"], true);
    assert_eq!(body["primary"], node(h.primary_port()));

    h.caught_up().await;
    let topology = http::get(admin, "/topology").await;
    assert_eq!(topology.status, 200);
    assert_eq!(
        topology.header("content-type"),
        Some("application/json"),
        "{}",
        topology.body
    );
    let body = topology.json();
    // Epoch 1: the HA controller bootstrapped with the one primary.
    assert_eq!(body["epoch"], 1);
    assert_eq!(body["primary"], node(h.primary_port()));
    let nodes = body["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 3);
    for n in nodes {
        let address = n["address"].as_str().unwrap();
        let port: u16 = address.rsplit_once(':').unwrap().1.parse().unwrap();
        assert_eq!(n["health"], "up", "{n}");
        assert_eq!(n["lagging"], false, "{n}");
        if port == h.primary_port() {
            assert_eq!(n["role"], "primary", "{n}");
            assert!(n["current_lsn"].as_str().unwrap().contains('/'), "{n}");
            assert!(n["replay_lsn"].is_null(), "{n}");
        } else {
            assert!(h.replica_ports().contains(&port), "{n}");
            assert_eq!(n["role"], "replica", "{n}");
            for lsn in ["replay_lsn", "receive_lsn"] {
                let text = n[lsn].as_str().unwrap_or_else(|| panic!("{lsn}: {n}"));
                assert!(text.parse::<tidepool::topology::Lsn>().is_ok(), "{n}");
            }
            assert!(n["lag_bytes"].is_u64(), "{n}");
            assert!(n["lag_seconds"].is_number(), "{n}");
        }
        assert_eq!(n["timeline"], 1, "{n}");
    }
    assert!(!topology.body.contains(TOKEN));

    let missing = http::get(admin, "/nowhere").await;
    assert_eq!(missing.status, 404);

    // Without a primary, not ready, and the reason says so.
    h.cluster.kill(0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let not_ready = loop {
        let ready = http::get(admin, "/ready").await;
        if ready.status != 200 {
            break ready;
        }
        assert!(Instant::now() < deadline, "still ready without a primary");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(not_ready.status, 503);
    let body = not_ready.json();
    assert_eq!(body["ready"], false);
    assert!(
        body["reason"].as_str().unwrap().contains("no primary"),
        "{body}"
    );
    let text = scrape(&h).await;
    assert_eq!(
        sample(
            &text,
            "tidepool_node_up",
            &[("node", &node(h.primary_port()))]
        ),
        0.0
    );
    // Health is about the process, not the cluster.
    assert_eq!(http::get(admin, "/health").await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_that_fall_back_to_the_primary_say_why() {
    let mut h = Harness::start("").await;
    let c = h.connect().await;
    let primary = node(h.primary_port());
    c.batch_execute("create table t (v int)").await.unwrap();
    h.caught_up().await;

    // Replicas that apply commits late: a read right after a write finds
    // them behind the session's floor, waits routing.ryw_wait, then reads
    // from the primary.
    for replica in [1, 2] {
        h.delay_replay(replica, "2s");
    }
    // The standbys take the new delay a moment after the reload.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        c.batch_execute("insert into t values (1)").await.unwrap();
        if served_by(&c, "select inet_server_port() from t").await == h.primary_port() {
            break;
        }
        assert!(Instant::now() < deadline, "reads never fell back");
    }
    let text = scrape(&h).await;
    assert!(
        sample(&text, "tidepool_ryw_waits_total", &[]) >= 1.0,
        "{text}"
    );
    assert!(sample(&text, "tidepool_ryw_wait_seconds_count", &[]) >= 1.0);
    assert!(
        sample(&text, "tidepool_ryw_checks_total", &[("result", "probed")]) >= 1.0,
        "a delayed replica is never known past a fresh write's floor"
    );
    assert!(
        sample(
            &text,
            "tidepool_primary_fallbacks_total",
            &[("reason", "ryw_timeout")]
        ) >= 1.0
    );
    assert!(
        sample(
            &text,
            "tidepool_units_total",
            &[
                ("node", &primary),
                ("role", "primary"),
                ("reason", "fallback_ryw_timeout")
            ]
        ) >= 1.0,
        "{text}"
    );

    // The replica connection whose wait was cut short by the deadline did
    // not go back to the pool with that answer still on its way: other
    // clients get their own rows.
    let other = h.connect().await;
    other
        .batch_execute("set tidepool.consistency = eventual")
        .await
        .unwrap();
    for _ in 0..6 {
        let answer = simple_value(&other, "select inet_server_port()").await;
        let port: u16 = answer
            .parse()
            .unwrap_or_else(|_| panic!("another query's answer: {answer}"));
        assert!(h.replica_ports().contains(&port));
    }

    // No replica at all.
    h.cluster.kill(1);
    h.cluster.kill(2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while h
        .proxy()
        .topology()
        .load()
        .usable_replicas()
        .next()
        .is_some()
    {
        assert!(Instant::now() < deadline, "replicas still up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        served_by(&c, "select inet_server_port()").await,
        h.primary_port()
    );
    let text = scrape(&h).await;
    assert_eq!(
        sample(
            &text,
            "tidepool_primary_fallbacks_total",
            &[("reason", "no_replica")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            "tidepool_units_total",
            &[("reason", "fallback_no_replica"), ("role", "primary")]
        ),
        1.0
    );
}

/// Mutating endpoints (added by the HA controller) sit behind the bearer token.
#[tokio::test]
async fn guarded_routes_need_the_bearer_token() {
    let serve = |token: Option<&str>| {
        let routes = Router::new().route("/switchover", post(|| async { "done" }));
        let token = token.map(Secret::new);
        let app = guarded(routes, move || token.clone());
        async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move { axum::serve(listener, app).await });
            addr
        }
    };
    let post = |addr, auth: Option<&'static str>| async move {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        http::request(addr, "POST", "/switchover", &headers).await
    };

    let addr = serve(Some("s3cret")).await;
    let denied: Response = post(addr, None).await;
    assert_eq!(denied.status, 401);
    assert_eq!(denied.header("www-authenticate"), Some("Bearer"));
    assert_eq!(post(addr, Some("Bearer wrong")).await.status, 401);
    assert_eq!(post(addr, Some("Basic s3cret")).await.status, 401);
    let allowed = post(addr, Some("Bearer s3cret")).await;
    assert_eq!((allowed.status, allowed.body.as_str()), (200, "done"));
    assert!(!denied.body.contains("s3cret"));

    let addr = serve(None).await;
    let disabled = post(addr, Some("Bearer anything")).await;
    assert_eq!(disabled.status, 403);
    assert!(disabled.json()["error"].as_str().unwrap().contains("token"));
}

/// Reads are counted by the session's consistency mode and where they ran.
#[tokio::test(flavor = "multi_thread")]
async fn reads_are_counted_by_consistency_mode() {
    let h = Harness::start("").await;
    let ryw = h.connect().await;
    for _ in 0..2 {
        ryw.simple_query("select 1").await.unwrap();
    }
    let strong = h.connect().await;
    strong
        .batch_execute("set tidepool.consistency = strong")
        .await
        .unwrap();
    for _ in 0..3 {
        strong.simple_query("select 1").await.unwrap();
    }
    let text = scrape(&h).await;
    let reads = |mode: &str, by: &str| {
        sample(
            &text,
            "tidepool_reads_total",
            &[("mode", mode), ("served_by", by)],
        )
    };
    assert_eq!(reads("read_your_writes", "replica"), 2.0);
    assert_eq!(reads("read_your_writes", "primary"), 0.0);
    assert_eq!(reads("strong", "primary"), 3.0);
    assert_eq!(reads("eventual", "replica"), 0.0);
}
