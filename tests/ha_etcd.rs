//! HA over a real etcd: the store behaves as the embedded one does; two
//! proxies share one controller; without etcd, writes are refused and reads
//! go on; with etcd back, writes resume.

mod common;

use std::time::{Duration, Instant};

use common::etcd::Etcd;
use common::{Harness, sqlstate, wait_for};
use tidepool::demo;
use tidepool::ha::store::{Created, EmbeddedStore, EtcdStore, Guard, Store, WatchEvent};
use tidepool::proxy::Proxy;

async fn next_event(watch: &mut tidepool::ha::store::Watch) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(5), watch.recv())
        .await
        .expect("an event in time")
        .expect("the watch goes on")
}

/// What the HA layer relies on, asserted the same way against each store.
async fn exercise(store: Store) {
    let root = "/test/";
    let a = store.grant(Duration::from_secs(5)).await.unwrap();
    let b = store.grant(Duration::from_secs(5)).await.unwrap();
    let start = store.list(root).await.unwrap().revision;
    let mut watch = store.watch(root, start + 1).await.unwrap();

    // Leader election: the first create wins, the second sees the holder.
    let Created::Won(revision) = store.create("/test/leader", "a", a).await.unwrap() else {
        panic!("the first create wins");
    };
    match store.create("/test/leader", "b", b).await.unwrap() {
        Created::Held(holder) => assert_eq!(holder.value, "a"),
        other => panic!("{other:?}"),
    }
    let WatchEvent::Put(put) = next_event(&mut watch).await else {
        panic!()
    };
    assert_eq!(
        (put.key.as_str(), put.value.as_str()),
        ("/test/leader", "a")
    );

    // Guarded writes: only while the leader key has that create revision.
    let guard = Guard {
        key: "/test/leader".into(),
        create_revision: put.create_revision,
    };
    assert!(revision >= put.create_revision);
    assert!(
        store
            .put_guarded(&guard, "/test/topology", "{\"epoch\":1}")
            .await
            .unwrap()
    );
    let stale = Guard {
        create_revision: put.create_revision - 1,
        ..guard.clone()
    };
    assert!(
        !store
            .put_guarded(&stale, "/test/topology", "{\"epoch\":9}")
            .await
            .unwrap()
    );
    assert_eq!(
        store.get("/test/topology").await.unwrap().unwrap().value,
        "{\"epoch\":1}"
    );
    let WatchEvent::Put(topology) = next_event(&mut watch).await else {
        panic!()
    };
    assert_eq!(topology.key, "/test/topology");

    // A watch resumed from an older revision replays what it missed.
    let mut replay = store.watch(root, start + 1).await.unwrap();
    assert!(matches!(next_event(&mut replay).await, WatchEvent::Put(v) if v.key == "/test/leader"));

    // Revoking the lease deletes its keys, and the next create wins.
    store.revoke(a).await.unwrap();
    assert!(
        matches!(next_event(&mut watch).await, WatchEvent::Delete { key, .. } if key == "/test/leader")
    );
    assert!(!store.keep_alive(a).await.unwrap());
    assert!(store.keep_alive(b).await.unwrap());
    assert!(matches!(
        store.create("/test/leader", "b", b).await.unwrap(),
        Created::Won(_)
    ));
    assert!(
        !store
            .put_guarded(&guard, "/test/topology", "x")
            .await
            .unwrap(),
        "the old leader's guard no longer holds"
    );

    // A lease left to expire takes its keys with it.
    let short = store.grant(Duration::from_secs(1)).await.unwrap();
    store
        .put("/test/members/p", "{}", Some(short))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.get("/test/members/p").await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "the member key outlived its lease"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let listed = store.list("/test/").await.unwrap();
    let keys: Vec<_> = listed.entries.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["/test/leader", "/test/topology"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_store_behaves_the_same_embedded_and_on_etcd() {
    exercise(Store::Embedded(EmbeddedStore::new())).await;
    let etcd = tokio::task::spawn_blocking(Etcd::start).await.unwrap();
    exercise(Store::Etcd(EtcdStore::new(
        vec![etcd.endpoint()],
        Duration::from_secs(2),
    )))
    .await;
}

fn extra(endpoint: &str, proxy: &str) -> String {
    format!(
        "failures_before_down = 2\n\n[coordinator]\netcd = [\"{endpoint}\"]\nlease_ttl = \"2s\"\nfailover_timeout = \"1s\"\nproxy_id = \"{proxy}\"\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn two_proxies_one_controller_and_no_writes_without_etcd() {
    let mut etcd = tokio::task::spawn_blocking(Etcd::start).await.unwrap();
    let mut h = Harness::start(&extra(&etcd.endpoint(), "p1")).await;
    let config = demo::config(&h.cluster, "127.0.0.1:0", &extra(&etcd.endpoint(), "p2"));
    let p2 = Proxy::start(config).await.expect("the second proxy starts");
    let url = format!(
        "host=127.0.0.1 port={} user=app password=app dbname=postgres connect_timeout=10",
        p2.addr().port()
    );

    // p1 started first and leads; p2 follows the same epoch.
    wait_for(Duration::from_secs(5), "p1 leads, p2 follows", async || {
        let (s1, s2) = (h.proxy().ha().status(), p2.ha().status());
        s1.is_leader && !s2.is_leader && s2.leader.as_deref() == Some("p1")
    })
    .await;
    assert_eq!(
        h.proxy().topology().load().epoch,
        p2.topology().load().epoch
    );
    let c2 = common::connect(&url).await.unwrap();
    c2.batch_execute("create table t (x int)").await.unwrap();

    // The leader goes away: p2 takes over.
    h.proxy.take().unwrap().shutdown().await;
    let took = wait_for(Duration::from_secs(3), "p2 leads", async || {
        p2.ha().status().is_leader
    })
    .await;
    println!("p2 took the lead in {took:?}");
    c2.batch_execute("insert into t values (1)").await.unwrap();

    // etcd gone: within a lease TTL (+1 s), writes are refused, reads go on.
    tokio::task::block_in_place(|| etcd.stop());
    let refused = wait_for(Duration::from_secs(3), "writes refused", async || {
        c2.batch_execute("insert into t values (2)")
            .await
            .is_err_and(|e| sqlstate(&e) == "25006")
    })
    .await;
    println!("writes refused {refused:?} after etcd stopped");
    let err = c2
        .batch_execute("insert into t values (3)")
        .await
        .unwrap_err();
    let message = err
        .as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_default();
    assert!(message.contains("coordinator"), "{message}");
    let read = c2.simple_query("select count(*) from t").await;
    assert!(read.is_ok(), "reads go on: {read:?}");

    // etcd back: writes resume.
    tokio::task::block_in_place(|| etcd.resume());
    let resumed = wait_for(Duration::from_secs(10), "writes resume", async || {
        c2.batch_execute("insert into t values (4)").await.is_ok()
    })
    .await;
    println!("writes resumed {resumed:?} after etcd restarted");
    p2.shutdown().await;
}

/// One proxy cut off from the primary (its monitor's role is rejected by
/// the primary's pg_hba.conf) votes it down, alone: no failover. When the
/// primary really dies, both vote, and the controller fails over.
#[tokio::test(flavor = "multi_thread")]
async fn one_proxy_cut_off_from_the_primary_cannot_fail_it_over() {
    let etcd = tokio::task::spawn_blocking(Etcd::start).await.unwrap();
    let mut h = Harness::start(&extra(&etcd.endpoint(), "p1")).await;
    let cluster = &h.cluster;
    cluster
        .psql(0, "create role monitor2 superuser login password 'm2'")
        .unwrap();
    let hba = cluster.psql(0, "show hba_file").unwrap();
    let rules = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("host all monitor2 127.0.0.1/32 reject\n{rules}"),
    )
    .unwrap();
    cluster.psql(0, "select pg_reload_conf()").unwrap();
    h.caught_up().await;

    let mut config = demo::config(&h.cluster, "127.0.0.1:0", &extra(&etcd.endpoint(), "p2"));
    config.cluster.admin_user = "monitor2".into();
    config.cluster.admin_password = tidepool::config::Secret::new("m2");
    let p2 = Proxy::start(config).await.expect("the second proxy starts");
    let epoch = h.proxy().topology().load().epoch;
    wait_for(
        Duration::from_secs(5),
        "p2 sees the primary down",
        async || p2.topology().load().nodes[0].health == tidepool::topology::Health::Down,
    )
    .await;
    // Three failover timeouts: p1 still sees the primary, so no majority.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t = h.proxy().topology().load_full();
    assert_eq!(t.epoch, epoch, "no failover on one proxy's word");
    assert_eq!(t.primary().map(|p| p.id.0), Some(0));
    h.connect()
        .await
        .batch_execute("create table still_here (x int)")
        .await
        .unwrap();

    // The primary dies for real: both proxies vote, the controller acts.
    tokio::task::block_in_place(|| h.cluster.kill(0));
    let took = wait_for(Duration::from_secs(10), "a failover", async || {
        let t = h.proxy().topology().load();
        t.epoch > epoch && t.primary().is_some_and(|p| p.id.0 != 0)
    })
    .await;
    println!("failover {took:?} after the kill, voted by both proxies");
    p2.shutdown().await;
    if let Some(p1) = h.proxy.take() {
        p1.shutdown().await;
    }
}

/// The leader proxy is a separate `tidepool run` process, killed with
/// SIGKILL: no lease revoked, no goodbye. The other proxy takes the lead
/// once the lease expires, within a TTL (+ its renewal period).
#[tokio::test(flavor = "multi_thread")]
async fn the_other_proxy_leads_within_a_ttl_after_the_leader_is_killed() {
    let etcd = tokio::task::spawn_blocking(Etcd::start).await.unwrap();
    let mut h = Harness::start(&extra(&etcd.endpoint(), "p1")).await;
    // The harness's own proxy only sets the cluster up: p0 must lead.
    h.proxy.take().unwrap().shutdown().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p0.toml");
    let toml = demo::config_toml(&h.cluster, "127.0.0.1:0", &extra(&etcd.endpoint(), "p0"));
    std::fs::write(&file, toml).unwrap();
    let mut p0 = std::process::Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .args(["run", "--config"])
        .arg(&file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let store = EtcdStore::new(vec![etcd.endpoint()], Duration::from_secs(2));
    let store = Store::Etcd(store);
    wait_for(Duration::from_secs(15), "p0 leads", async || {
        let leader = store.get("/tidepool/tidepool/leader").await.ok().flatten();
        leader.is_some_and(|l| l.value == "p0")
    })
    .await;
    let config = demo::config(&h.cluster, "127.0.0.1:0", &extra(&etcd.endpoint(), "p2"));
    let p2 = Proxy::start(config).await.expect("p2 starts");
    wait_for(Duration::from_secs(5), "p2 follows p0", async || {
        p2.ha().status().leader.as_deref() == Some("p0")
    })
    .await;
    p0.kill().unwrap();
    p0.wait().unwrap();
    let took = wait_for(
        Duration::from_secs(4),
        "p2 leads after p0's kill",
        async || p2.ha().status().is_leader,
    )
    .await;
    println!("p0 killed: p2 took the lead in {took:?} (lease_ttl 2s)");
    let c = common::connect(&format!(
        "host=127.0.0.1 port={} user=app password=app dbname=postgres",
        p2.addr().port()
    ))
    .await
    .unwrap();
    c.batch_execute("create table after_the_kill (x int)")
        .await
        .unwrap();
    p2.shutdown().await;
}
