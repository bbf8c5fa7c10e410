//! The embedded HA controller on real clusters: failover after `kill -9`
//! with a synchronous standby, the old primary fenced when it returns, and a
//! switchover under a pgbench TPC-B run without one failed transaction.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Harness, simple_value};
use tidepool::ha::EventKind;
use tidepool::topology::{NodeId, Role};
use tokio::sync::Mutex;

const FAST: &str =
    "failures_before_down = 2\n\n[coordinator]\nlease_ttl = \"2s\"\nfailover_timeout = \"1s\"\n";

#[tokio::test(flavor = "multi_thread")]
async fn failover_after_kill_loses_no_acknowledged_write_and_fences_the_old_primary() {
    let mut h = Harness::start(FAST).await;
    h.cluster
        .psql(
            0,
            "alter system set synchronous_standby_names = 'ANY 1 (*)'",
        )
        .unwrap();
    h.cluster.psql(0, "select pg_reload_conf()").unwrap();
    let c = h.connect().await;
    c.batch_execute("create table acked (seq int primary key)")
        .await
        .unwrap();
    h.caught_up().await;

    // A writer that records every insert the server acknowledged.
    let acked = Arc::new(Mutex::new(Vec::<i32>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, stop, url) = (acked.clone(), stop.clone(), h.url("app", "app", "postgres"));
        tokio::spawn(async move {
            let mut seq = 0;
            let mut client = None;
            while !stop.load(Ordering::Relaxed) {
                if client.is_none() {
                    client = common::connect(&url).await.ok();
                }
                let Some(c) = &client else { continue };
                seq += 1;
                match c
                    .simple_query(&format!("insert into acked values ({seq})"))
                    .await
                {
                    Ok(_) => acked.lock().await.push(seq),
                    Err(_) => {
                        if c.is_closed() {
                            client = None;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        })
    };
    common::wait_for(Duration::from_secs(10), "writes flow", async || {
        acked.try_lock().is_ok_and(|a| a.len() > 50)
    })
    .await;

    let topology = h.proxy().topology().clone();
    let old_epoch = topology.load().epoch;
    let killed_at = Instant::now();
    tokio::task::block_in_place(|| h.cluster.kill(0));
    // Backends outlive a killed postmaster for a moment and may still ack a
    // few writes: count only the writes after the new primary is published.
    common::wait_for(Duration::from_secs(20), "a new primary", async || {
        let t = topology.load();
        t.epoch > old_epoch && t.primary().is_some_and(|p| p.id != NodeId(0))
    })
    .await;
    let acked_before = acked.lock().await.len();
    common::wait_for(
        Duration::from_secs(20),
        "a write acknowledged after the failover",
        async || acked.try_lock().is_ok_and(|a| a.len() > acked_before + 10),
    )
    .await;
    let recovered = killed_at.elapsed();
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    println!("kill -9 to 10 writes on the new primary: {recovered:?}");

    let t = topology.load_full();
    let new_primary = t.primary().expect("a primary").id;
    assert_ne!(new_primary, NodeId(0));
    assert!(t.epoch > old_epoch);
    assert!(t.is_fenced(NodeId(0)), "{t:#?}");
    let history = h.proxy().ha().history().await.unwrap();
    let failover = history
        .iter()
        .find(|e| e.kind == EventKind::Failover)
        .expect("a failover in the history");
    println!("failover: {failover:?}");
    let metrics = common::http::get(h.proxy().admin_addr(), "/metrics")
        .await
        .body;
    for line in [
        "tidepool_ha_failovers_total 1",
        "tidepool_ha_is_leader 1",
        "tidepool_ha_fenced_nodes 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} missing:\n{metrics}"
        );
    }

    // Every acknowledged write is on the new primary.
    let acked = acked.lock().await.clone();
    let strong = h.connect().await;
    strong
        .simple_query("set tidepool.consistency = strong")
        .await
        .unwrap();
    let present: i64 = simple_value(&strong, "select count(*) from acked")
        .await
        .parse()
        .unwrap();
    let missing = simple_value(
        &strong,
        &format!("select count(*) from unnest(array{acked:?}::int[]) s where s not in (select seq from acked)"),
    )
    .await;
    assert_eq!(
        missing,
        "0",
        "acknowledged writes lost ({} acked, {present} present)",
        acked.len()
    );

    // The old primary comes back, out of recovery: fenced, it gets nothing.
    // Fencing terminates the node's client backends when it comes back,
    // this check's own connection included if it is there then: ask again.
    let old_max = |h: &Harness| {
        let mut tries = 0;
        loop {
            match h.cluster.psql(0, "select coalesce(max(seq), 0) from acked") {
                Ok(max) => return max,
                Err(e) if tries < 10 => {
                    tries += 1;
                    eprintln!("asking the old primary again: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("{e}"),
            }
        }
    };
    tokio::task::block_in_place(|| h.cluster.start_node(0)).unwrap();
    let before = tokio::task::block_in_place(|| old_max(&h));
    common::wait_for(
        Duration::from_secs(10),
        "the old primary seen again",
        async || {
            let t = topology.load();
            t.nodes[0].role == Role::Primary && t.nodes[0].health == tidepool::topology::Health::Up
        },
    )
    .await;
    for seq in 100_000..100_020 {
        strong
            .simple_query(&format!("insert into acked values ({seq})"))
            .await
            .unwrap();
    }
    let port = simple_value(&strong, "select inet_server_port()").await;
    assert_eq!(port, h.cluster.nodes()[new_primary.0].port.to_string());
    assert_eq!(
        tokio::task::block_in_place(|| old_max(&h)),
        before,
        "the fenced node received writes"
    );
    assert!(topology.load().is_fenced(NodeId(0)));
    common::wait_for(
        Duration::from_secs(5),
        "the old primary fenced over SQL",
        async || {
            h.cluster
                .psql(0, "show default_transaction_read_only")
                .is_ok_and(|v| v == "on")
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn switchover_under_pgbench_fails_no_transaction() {
    let h = Harness::start(FAST).await;
    let env = h.pg_env();
    let port = h.port().to_string();
    let pgbench = move |args: &[&str]| {
        let mut cmd = std::process::Command::new("pgbench");
        cmd.args(["-h", "127.0.0.1", "-p", &port, "-U", "app"])
            .args(args)
            .arg("postgres");
        for (k, v) in &env {
            cmd.env(k, v);
        }
        cmd.output().expect("pgbench runs")
    };
    let init = {
        let pgbench = pgbench.clone();
        tokio::task::spawn_blocking(move || pgbench(&["-i", "-s", "1", "-q"]))
            .await
            .unwrap()
    };
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    h.caught_up().await;
    let run = tokio::task::spawn_blocking(move || pgbench(&["-c", "4", "-T", "8", "-P", "1"]));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let old = h.proxy().topology().load().epoch_primary;
    let started = Instant::now();
    let entry = h
        .proxy()
        .ha()
        .switchover(None)
        .await
        .expect("switchover succeeds");
    println!(
        "switchover took {:?} (controller: {} ms): {entry:?}",
        started.elapsed(),
        entry.took_ms
    );
    let new = h.proxy().topology().load().epoch_primary;
    assert_ne!(new, old);
    let out = run.await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}\n{stderr}");
    assert!(out.status.success(), "pgbench failed: {stderr}");
    assert!(
        stdout.contains("number of failed transactions: 0"),
        "{stdout}"
    );
    let processed: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split('/').next()?.trim().parse().ok())
        .expect("a transaction count");
    assert!(processed > 100, "{stdout}");
    // Writes go to the new primary.
    let c = h.connect().await;
    c.batch_execute("create table after_switchover (x int)")
        .await
        .unwrap();
    let port = simple_value(&c, "/* tidepool: primary */ select inet_server_port()").await;
    assert_eq!(port, h.cluster.nodes()[new.unwrap().0].port.to_string());
}

/// `tidepool ctl` against the admin HTTP listener: status, and a switchover
/// that needs the token.
#[tokio::test(flavor = "multi_thread")]
async fn ctl_status_and_switchover_through_the_admin_api() {
    let h = Harness::start(&format!("{FAST}\n[admin]\ntoken = \"s3cret\"\n")).await;
    let admin = h.proxy().admin_addr().to_string();
    let ctl = move |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tidepool"))
            .args(["ctl", "--admin", &admin])
            .args(args)
            .env_remove("TIDEPOOL_ADMIN_TOKEN")
            .output()
            .unwrap()
    };
    let primary = h.cluster.nodes()[0].addr().to_string();
    let status = tokio::task::block_in_place(|| ctl(&["status"]));
    let table = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{status:?}");
    assert!(table.contains(&format!("primary {primary}")), "{table}");
    assert!(
        table.lines().filter(|l| l.contains(" replica ")).count() == 2,
        "{table}"
    );

    let refused = tokio::task::block_in_place(|| ctl(&["switchover"]));
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("HTTP 401"),
        "{refused:?}"
    );

    // Paused, a new transaction waits; resumed, it runs.
    let paused = tokio::task::block_in_place(|| ctl(&["--token", "s3cret", "pause"]));
    assert!(paused.status.success(), "{paused:?}");
    let app = h.connect().await;
    let held = tokio::spawn(async move { app.simple_query("select 1").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished(), "a paused proxy holds new transactions");
    let resumed = tokio::task::block_in_place(|| ctl(&["--token", "s3cret", "resume"]));
    assert!(resumed.status.success(), "{resumed:?}");
    tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("released by resume")
        .unwrap()
        .unwrap();

    let to = h.cluster.nodes()[2].addr().to_string();
    let done =
        tokio::task::block_in_place(|| ctl(&["--token", "s3cret", "switchover", "--to", &to]));
    assert!(done.status.success(), "{done:?}");
    assert!(String::from_utf8_lossy(&done.stdout).contains("\"switchover\""));
    let status = tokio::task::block_in_place(|| ctl(&["status", "--json"]));
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(json["primary"], to.as_str());
    let old = json["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["address"] == primary.as_str())
        .unwrap();
    assert_eq!(old["fenced"], true);
}

/// A transaction open on the primary when a new epoch names another one is
/// ended at once: its connection is dropped (the server rolls it back) and
/// the client hears 08006 saying why, instead of committing on a node that
/// is no longer the primary.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_epoch_ends_transactions_on_the_old_primary() {
    let h = Harness::start(FAST).await;
    let c = h.connect().await;
    c.batch_execute("create table e (x int)").await.unwrap();
    c.batch_execute("begin; insert into e values (1)")
        .await
        .unwrap();
    let t = h.proxy().topology().load_full();
    // As a controller elsewhere would publish it: node0 fenced, node1 next.
    let (old, other) = (t.nodes[0].addr, t.nodes[1].addr);
    let record = format!(
        "{{\"epoch\":{},\"primary\":\"{other}\",\"fenced\":[\"{old}\"]}}",
        t.epoch.0 + 1
    );
    let ha = h.proxy().ha();
    ha.store()
        .put(&format!("{}topology", ha.keys().root()), &record, None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let err = c
        .batch_execute("insert into e values (2)")
        .await
        .unwrap_err();
    assert_eq!(common::sqlstate(&err), "08006", "{err:?}");
    let message = err.as_db_error().unwrap().message().to_owned();
    assert!(message.contains("no longer the primary"), "{message}");
    // The client's ROLLBACK is answered even while there is no primary.
    c.batch_execute("rollback").await.unwrap();
    let count = h.cluster.psql(0, "select count(*) from e").unwrap();
    assert_eq!(
        count, "0",
        "the transaction was rolled back on the old primary"
    );
}
