//! Pipelined reads (`pool.pipeline_depth`): autocommit reads of different
//! clients share server connections, and no client can tell: each gets its
//! own answer, its own settings, its own errors and cancels.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{Harness, http, metric_value, simple_error, simple_value, sqlstate};
use tokio_postgres::types::Type;

const ONE_CONNECTION: &str =
    "[pool]\nsize = 1\npipeline_depth = 8\n\n[routing]\nconsistency = \"eventual\"\n";
const PIPELINED: &str =
    "[pool]\nsize = 2\npipeline_depth = 8\n\n[routing]\nconsistency = \"eventual\"\n";
const ON_PRIMARY: &str = "/* tidepool: primary */";

/// A read-only transaction left open on a replica: a read alone takes a
/// connection of its own (nobody to share with), so the tests keep one
/// unit of work running for as long as they need reads to share.
async fn someone_else_busy(h: &Harness) -> (tokio_postgres::Client, String) {
    let c = h.connect().await;
    c.simple_query("BEGIN READ ONLY").await.unwrap();
    let pid = simple_value(&c, "SELECT pg_backend_pid()").await;
    (c, pid)
}

async fn pipelined_reads(h: &Harness) -> u64 {
    h.metric("tidepool_pipelined_reads_total")
        .await
        .expect("tidepool_pipelined_reads_total")
}

#[tokio::test(flavor = "multi_thread")]
async fn each_client_gets_its_own_answers_settings_and_errors() {
    let h = Harness::start(PIPELINED).await;
    let (_busy, _) = someone_else_busy(&h).await;
    let mut tasks = Vec::new();
    for client in 0..20 {
        let c = h.connect().await;
        tasks.push(tokio::spawn(async move {
            let name = format!("client{client}");
            c.simple_query(&format!("SET application_name = '{name}'"))
                .await
                .unwrap();
            let mut servers = HashSet::new();
            for round in 0..40 {
                let sql = format!(
                    "SELECT concat_ws('|', {client}, {round}, current_setting('application_name'), \
                     inet_server_port(), pg_backend_pid())"
                );
                let row = simple_value(&c, &sql).await;
                let fields: Vec<&str> = row.split('|').collect();
                assert_eq!(
                    fields[..3],
                    [&*client.to_string(), &*round.to_string(), &*name]
                );
                servers.insert((fields[3].to_owned(), fields[4].to_owned()));
                // The extended protocol, unnamed statement (Parse, Bind,
                // Describe, Execute, Sync in one batch).
                let value = client * 1000 + round;
                let row = c
                    .query_typed_one(
                        "SELECT $1::int + 1, current_setting('application_name')",
                        &[(&value, Type::INT4)],
                    )
                    .await
                    .unwrap();
                assert_eq!(row.get::<_, i32>(0), value + 1);
                assert_eq!(row.get::<_, String>(1), name);
                if round % 10 == 3 {
                    assert_eq!(simple_error(&c, "SELECT 1/0").await, "22012");
                    let zero = 0;
                    let e = c
                        .query_typed("SELECT 1/$1::int", &[(&zero, Type::INT4)])
                        .await
                        .unwrap_err();
                    assert_eq!(sqlstate(&e), "22012");
                    let e = c.query_typed("SELEC 1", &[]).await.unwrap_err();
                    assert_eq!(sqlstate(&e), "42601");
                }
            }
            assert_eq!(simple_value(&c, "SHOW application_name").await, name);
            servers
        }));
    }
    let mut backends = HashSet::new();
    for t in tasks {
        backends.extend(t.await.unwrap());
    }
    assert!(
        backends.len() <= 4,
        "2 replicas x pool size 2, saw {backends:?}"
    );
    let replicas: HashSet<String> = h.replica_ports().iter().map(u16::to_string).collect();
    assert!(backends.iter().all(|(port, _)| replicas.contains(port)));
    assert!(pipelined_reads(&h).await >= 20 * 40 * 2);
}

/// One connection per node, so that both reads share it: cancelling the
/// running one leaves the one queued behind it untouched, and cancelling a
/// queued one does not wait for the one ahead.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_reaches_only_the_read_it_was_meant_for() {
    let h = Harness::start(ONE_CONNECTION).await;
    let (_busy, _) = someone_else_busy(&h).await;
    let slow = h.connect().await;
    let queued = h.connect().await;
    let token = slow.cancel_token();
    let started = Instant::now();
    let running = tokio::spawn(async move {
        slow.simple_query(&format!("{ON_PRIMARY} SELECT pg_sleep(5)"))
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let behind = tokio::spawn(async move {
        let answer = simple_value(&queued, &format!("{ON_PRIMARY} SELECT 42")).await;
        (answer, queued)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let e = running.await.unwrap().unwrap_err();
    assert_eq!(sqlstate(&e), "57014");
    let (answer, queued) = behind.await.unwrap();
    assert_eq!(answer, "42");
    assert!(started.elapsed() < Duration::from_secs(4));

    let blocker = h.connect().await;
    let token = queued.cancel_token();
    let started = Instant::now();
    let ahead = tokio::spawn(async move {
        simple_value(
            &blocker,
            &format!("{ON_PRIMARY} SELECT pg_sleep(2)::text || 'done'"),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cancelled =
        tokio::spawn(async move { queued.simple_query(&format!("{ON_PRIMARY} SELECT 7")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let e = cancelled.await.unwrap().unwrap_err();
    assert_eq!(sqlstate(&e), "57014");
    assert!(started.elapsed() < Duration::from_millis(1500));
    assert_eq!(ahead.await.unwrap(), "done");
    assert!(pipelined_reads(&h).await >= 2);
}

/// Killing the replica backends that carry shared reads: every read is
/// answered, the unanswered ones run again on fresh connections.
#[tokio::test(flavor = "multi_thread")]
async fn reads_on_a_lost_connection_are_run_again() {
    let h = Harness::start(PIPELINED).await;
    let (_busy, busy_pid) = someone_else_busy(&h).await;
    let mut replicas = Vec::new();
    for port in h.replica_ports() {
        replicas.push(common::connect(&h.admin_url(port)).await.unwrap());
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for client in 0..10 {
        let c = h.connect().await;
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut round = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let sql = format!("SELECT {client} * 1000000 + {round}");
                let answer = simple_value(&c, &sql).await;
                assert_eq!(answer, (client * 1_000_000 + round).to_string());
                round += 1;
            }
            round
        }));
    }
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let kill = format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE usename = 'app' AND pid <> {busy_pid}"
        );
        for replica in &replicas {
            replica.simple_query(&kill).await.unwrap();
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        assert!(t.await.unwrap() > 0);
    }
    assert!(pipelined_reads(&h).await > 0);
}

/// A shared read whose answer had begun to reach its client cannot run
/// again: the client gets 08006 naming the server and what it said as it
/// went, as on a connection of its own, and carries on.
#[tokio::test(flavor = "multi_thread")]
async fn a_read_cut_off_mid_answer_hears_which_server_and_why() {
    let h = Harness::start(PIPELINED).await;
    let (_busy, busy_pid) = someone_else_busy(&h).await;
    let c = h.connect().await;
    // The first row (bigger than the server's 8 KB output buffer) is sent
    // before the second sleeps.
    let read = tokio::spawn(async move {
        let sql = "SELECT CASE WHEN x = 1 THEN repeat('x', 100000) \
                   ELSE (SELECT 'late' FROM pg_sleep(30)) END FROM generate_series(1, 2) x";
        let outcome = c.simple_query(sql).await;
        (c, outcome)
    });
    let mut replicas = Vec::new();
    for port in h.replica_ports() {
        replicas.push(common::connect(&h.admin_url(port)).await.unwrap());
    }
    let sleeping = format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE usename = 'app' AND pid <> {busy_pid} AND wait_event = 'PgSleep'"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut killed = 0;
    while killed == 0 {
        assert!(
            Instant::now() < deadline,
            "the read never reached its sleep"
        );
        // Time for the first row to reach the client before the kill.
        tokio::time::sleep(Duration::from_millis(200)).await;
        for replica in &replicas {
            killed += simple_value(replica, &sleeping)
                .await
                .parse::<u64>()
                .unwrap();
        }
    }
    let (c, outcome) = read.await.unwrap();
    let err = outcome.expect_err("a read cut off");
    assert_eq!(sqlstate(&err), "08006", "{err:?}");
    let message = err.as_db_error().expect("an ErrorResponse").message();
    assert!(
        h.replica_ports()
            .iter()
            .any(|port| message.contains(&format!(
                ":{port} (terminating connection due to administrator command)"
            ))),
        "{message}"
    );
    assert_eq!(simple_value(&c, "SELECT 1").await, "1");
    assert!(pipelined_reads(&h).await > 0);
}

/// Named prepared statements (`-M prepared`, drivers' statement caches) run
/// on lanes too: a lane's connection prepares a statement the first time a
/// client's Bind needs it, under the statement's global name, so clients
/// whose drivers give different statements the same name (tokio-postgres:
/// s0, s1, ... per connection) each run their own. A small statement cap
/// makes lanes evict and prepare again.
#[tokio::test(flavor = "multi_thread")]
async fn prepared_statements_run_on_lanes_under_their_own_text() {
    let config = PIPELINED.replace(
        "pipeline_depth = 8\n",
        "pipeline_depth = 8\nprepared_statements_cap = 3\n",
    );
    let h = Harness::start(&config).await;
    let (_busy, _) = someone_else_busy(&h).await;
    let before = pipelined_reads(&h).await;
    let replicas: HashSet<i32> = h.replica_ports().iter().map(|&p| p.into()).collect();
    let mut tasks = Vec::new();
    for client in 0..12 {
        let c = h.connect().await;
        let replicas = replicas.clone();
        tasks.push(tokio::spawn(async move {
            // Texts of their own (a cap of 3 cannot hold them all) and
            // one every client shares.
            let own = c
                .prepare(&format!("SELECT $1::int + {client}, inet_server_port()"))
                .await
                .unwrap();
            let shared = c.prepare("SELECT $1::int * 2").await.unwrap();
            let divide = c.prepare("SELECT 10 / $1::int").await.unwrap();
            for round in 0..30 {
                let row = c.query_one(&own, &[&round]).await.unwrap();
                assert_eq!(row.get::<_, i32>(0), round + client);
                assert!(replicas.contains(&row.get::<_, i32>(1)));
                let row = c.query_one(&shared, &[&round]).await.unwrap();
                assert_eq!(row.get::<_, i32>(0), round * 2);
                if round % 10 == 4 {
                    let e = c.query_one(&divide, &[&0]).await.unwrap_err();
                    assert_eq!(sqlstate(&e), "22012");
                    let row = c.query_one(&divide, &[&5]).await.unwrap();
                    assert_eq!(row.get::<_, i32>(0), 2);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let metrics = http::get(h.proxy().admin_addr(), "/metrics").await.body;
    let pipelined = pipelined_reads(&h).await - before;
    assert!(pipelined >= 12 * 30, "{pipelined} reads pipelined");
    let evictions = metric_value(
        &metrics,
        "tidepool_prepared_statement_cache_evictions_total",
    )
    .unwrap_or(0);
    assert!(evictions > 0, "a cap of 3 must evict");
    let hits = metric_value(&metrics, "tidepool_prepared_statement_cache_hits_total").unwrap_or(0);
    assert!(hits > 0);
}
