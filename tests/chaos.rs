//! Faults injected under a steady mixed load (tests/common/load.rs), the
//! cheaper cases of benches/chaos.rs: kill -9 failovers with the rejoin
//! hook (scripts/rejoin.sh) bringing the old primary back as a replica, a
//! paused primary resumed after its failover, a replica killed, the pool
//! filled. Every wait is on a condition with a deadline.

mod common;

use std::time::{Duration, Instant};

use common::load::{self, Load, Side};
use common::{Harness, sqlstate, wait_for};
use tidepool::demo::cluster::ClusterSpec;
use tidepool::topology::{Health, NodeId, Role};

const FAST: &str =
    "failures_before_down = 2\n\n[coordinator]\nlease_ttl = \"2s\"\nfailover_timeout = \"1s\"\n";

/// Three nodes, each commit waiting for one standby: a failover to the most
/// advanced replica loses no acknowledged write.
async fn synchronous_cluster(rejoin: bool) -> Harness {
    let spec = ClusterSpec {
        synchronous: true,
        ..ClusterSpec::default()
    };
    let h = Harness::start_spec(
        spec,
        |cluster| match rejoin {
            true => format!("{FAST}rejoin_command = {:?}\n", cluster.rejoin_command()),
            false => FAST.to_owned(),
        },
        |_| {},
    )
    .await;
    create_table(&h).await;
    h
}

async fn create_table(h: &Harness) {
    h.connect().await.batch_execute(load::TABLE).await.unwrap();
    h.caught_up().await;
}

async fn strong_client(h: &Harness) -> tokio_postgres::Client {
    let c = h.connect().await;
    c.batch_execute("set tidepool.consistency = strong")
        .await
        .unwrap();
    c
}

fn psql(h: &Harness, node: usize, sql: &str) -> Option<String> {
    tokio::task::block_in_place(|| h.cluster.psql(node, sql)).ok()
}

/// Waits for a new epoch whose primary is not `old`; returns it.
async fn failed_over(h: &Harness, old: NodeId) -> NodeId {
    let topology = h.proxy().topology().clone();
    let epoch = topology.load().epoch;
    wait_for(Duration::from_secs(30), "a failover", async || {
        let t = topology.load();
        t.epoch > epoch && t.primary().is_some_and(|p| p.id != old)
    })
    .await;
    topology.load().primary().expect("a primary").id
}

#[tokio::test(flavor = "multi_thread")]
async fn two_kill_9_failovers_in_a_row_each_old_primary_rejoins_as_a_streaming_replica() {
    let mut h = synchronous_cluster(true).await;
    let load = Load::start(&[h.url("app", "app", "postgres")], 2, 2);
    let tally = load.tally.clone();
    let started = Instant::now();
    wait_for(Duration::from_secs(20), "writes flow", async || {
        tally.acks_since(started) > 20
    })
    .await;
    let topology = h.proxy().topology().clone();
    let reader = h.connect().await;
    reader
        .batch_execute("set tidepool.consistency = eventual")
        .await
        .unwrap();

    for round in 1..=2 {
        let old = topology.load().primary().expect("a primary").id;
        let old_port = h.cluster.nodes()[old.0].port;
        let killed = Instant::now();
        tokio::task::block_in_place(|| h.cluster.kill(old.0));
        let new = failed_over(&h, old).await;
        // From here on, the old primary is fenced: an answer it sent before
        // it died may still arrive, none may come after.
        let fenced = Instant::now();
        let new_port = h.cluster.nodes()[new.0].port;
        wait_for(
            Duration::from_secs(20),
            "writes on the new primary",
            async || tally.acks_on_since(new_port, killed) > 10,
        )
        .await;
        println!(
            "round {round}: node {} killed, node {} took writes, recovered in {:?}",
            old.0,
            new.0,
            tally.recovered_in(killed)
        );
        assert_eq!(
            tally.acks_on_since(old_port, fenced),
            0,
            "a write acknowledged by the fenced node"
        );

        // Back, out of recovery: fenced, then rewound and restarted as a
        // replica by the hook, then unfenced.
        tokio::task::block_in_place(|| h.cluster.start_node(old.0)).unwrap();
        let rejoined = wait_for(
            Duration::from_secs(60),
            "the old primary rejoins as a replica",
            async || {
                let t = topology.load();
                let n = t.node(old);
                n.role == Role::Replica && n.health == Health::Up && !t.is_fenced(old)
            },
        )
        .await;
        println!(
            "round {round}: node {} a replica again {rejoined:?} after its restart",
            old.0
        );
        wait_for(
            Duration::from_secs(20),
            "it streams from the new primary",
            async || {
                let sql = "select status || ' ' || sender_port from pg_stat_wal_receiver";
                psql(&h, old.0, sql) == Some(format!("streaming {new_port}"))
            },
        )
        .await;
        wait_for(
            Duration::from_secs(20),
            "it serves reads through tidepool",
            async || {
                let port = common::simple_value(&reader, "select inet_server_port()").await;
                port == old_port.to_string()
            },
        )
        .await;
    }

    let tally = load.stop().await;
    let acked = tally.acked();
    let lost = load::lost(&strong_client(&h).await, &acked).await;
    assert_eq!(lost, 0, "acknowledged writes lost ({} acked)", acked.len());
    let read_failures = tally.failures_since(started, Side::Read);
    let write_failures = tally.failures_since(started, Side::Write);
    println!(
        "{} writes acked, {} failed, {} reads failed",
        acked.len(),
        write_failures.len(),
        read_failures.len()
    );
}

/// What the demo does after `tidepool ctl switchover`: the old primary,
/// read-only and fenced, is rewound and streams from the new one.
#[tokio::test(flavor = "multi_thread")]
async fn after_a_switchover_the_old_primary_streams_from_the_new_one() {
    let h = synchronous_cluster(true).await;
    let topology = h.proxy().topology().clone();
    let old = topology.load().primary().expect("a primary").id;
    let entry = h.proxy().ha().switchover(None).await.expect("a switchover");
    let new = topology.load().primary().expect("a primary").id;
    assert_ne!(new, old, "{entry:?}");
    let new_port = h.cluster.nodes()[new.0].port;
    wait_for(
        Duration::from_secs(60),
        "the old primary a replica again",
        async || {
            let t = topology.load();
            let n = t.node(old);
            n.role == Role::Replica && n.health == Health::Up && !t.is_fenced(old)
        },
    )
    .await;
    wait_for(Duration::from_secs(20), "it streams", async || {
        let sql = "select status || ' ' || sender_port from pg_stat_wal_receiver";
        psql(&h, old.0, sql) == Some(format!("streaming {new_port}"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_primary_resumed_after_its_failover_is_fenced_no_split_brain() {
    let h = synchronous_cluster(false).await;
    let load = Load::start(&[h.url("app", "app", "postgres")], 2, 1);
    let tally = load.tally.clone();
    let started = Instant::now();
    wait_for(Duration::from_secs(20), "writes flow", async || {
        tally.acks_since(started) > 20
    })
    .await;
    let topology = h.proxy().topology().clone();
    let old = topology.load().primary().expect("a primary").id;
    let old_port = h.cluster.nodes()[old.0].port;

    // Paused (every process of it) for longer than failover_timeout.
    let paused = Instant::now();
    h.cluster.pause(old.0);
    let new = failed_over(&h, old).await;
    let fenced = Instant::now();
    let new_port = h.cluster.nodes()[new.0].port;
    wait_for(Duration::from_secs(20), "writes resume", async || {
        tally.acks_on_since(new_port, paused) > 10
    })
    .await;
    h.cluster.resume(old.0);
    let resumed = Instant::now();

    wait_for(
        Duration::from_secs(20),
        "the old primary is seen again, fenced",
        async || {
            let t = topology.load();
            let n = t.node(old);
            n.health == Health::Up && n.role == Role::Primary && t.is_fenced(old)
        },
    )
    .await;
    wait_for(
        Duration::from_secs(20),
        "the old primary is fenced over SQL",
        async || psql(&h, old.0, "show default_transaction_read_only").as_deref() == Some("on"),
    )
    .await;
    let old_rows = psql(&h, old.0, "select count(*) from chaos").unwrap();
    let more = Instant::now();
    wait_for(Duration::from_secs(20), "writes go on", async || {
        tally.acks_on_since(new_port, more) > 20
    })
    .await;

    // Exactly one node takes writes: the epoch's primary.
    let writable: Vec<usize> = (0..h.cluster.nodes().len())
        .filter(|&i| {
            let sql = "select pg_is_in_recovery() or current_setting('default_transaction_read_only')::bool";
            psql(&h, i, sql).as_deref() == Some("f")
        })
        .collect();
    assert_eq!(writable, [new.0], "the writable nodes");
    let t = topology.load();
    assert_eq!(t.primary().map(|p| p.id), Some(new));
    assert!(t.is_fenced(old));
    let direct = format!(
        "host=127.0.0.1 port={old_port} user=app password=app dbname=postgres connect_timeout=5"
    );
    let straight = load::connect(&direct)
        .await
        .expect("the old primary answers");
    let refused = straight
        .batch_execute("insert into chaos values (-1, 0)")
        .await
        .expect_err("the fenced node refuses writes");
    assert_eq!(sqlstate(&refused), "25006", "{refused}");
    assert_eq!(
        psql(&h, old.0, "select count(*) from chaos").unwrap(),
        old_rows,
        "rows reached the fenced node"
    );

    let tally = load.stop().await;
    assert_eq!(
        tally.acks_on_since(old_port, fenced),
        0,
        "a write acknowledged by the fenced node"
    );
    let acked = tally.acked();
    let lost = load::lost(&strong_client(&h).await, &acked).await;
    assert_eq!(lost, 0, "acknowledged writes lost ({} acked)", acked.len());
    println!(
        "paused: failover, writes back {:?}; resumed, fenced {:?} later; {} write failures",
        tally.recovered_in(paused),
        resumed.elapsed(),
        tally.failures_since(paused, Side::Write).len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_a_replica_under_load_fails_no_read() {
    let mut h = Harness::start(FAST).await;
    create_table(&h).await;
    let load = Load::start(&[h.url("app", "app", "postgres")], 1, 3);
    let tally = load.tally.clone();
    let started = Instant::now();
    wait_for(Duration::from_secs(20), "reads flow", async || {
        tally.reads_since(started) > 100
    })
    .await;
    let topology = h.proxy().topology().clone();
    let killed = Instant::now();
    tokio::task::block_in_place(|| h.cluster.kill(1));
    wait_for(
        Duration::from_secs(20),
        "the replica seen down",
        async || topology.load().node(NodeId(1)).health == Health::Down,
    )
    .await;
    wait_for(Duration::from_secs(20), "reads go on", async || {
        tally.reads_since(killed) > 300
    })
    .await;
    let tally = load.stop().await;
    let failed = tally.failures_since(started, Side::Read);
    assert!(failed.is_empty(), "reads failed: {failed:?}");
    let failed = tally.failures_since(started, Side::Write);
    assert!(failed.is_empty(), "writes failed: {failed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_pool_times_checkouts_out_with_53300_then_everyone_recovers() {
    let h = Harness::start("[pool]\nsize = 2\ncheckout_timeout = \"500ms\"\n").await;
    create_table(&h).await;
    // Both primary connections held by open transactions.
    let mut holders = Vec::new();
    for seq in 1..=2 {
        let c = h.connect().await;
        c.batch_execute(&format!(
            "begin; insert into chaos values ({seq}, inet_server_port())"
        ))
        .await
        .unwrap();
        holders.push(c);
    }
    let waiting = h.connect().await;
    let asked = Instant::now();
    let err = waiting
        .batch_execute("insert into chaos values (3, 0)")
        .await
        .expect_err("no primary connection free");
    assert_eq!(sqlstate(&err), "53300", "{err}");
    assert!(asked.elapsed() >= Duration::from_millis(500));
    // Reads have their own pools, on the replicas.
    common::simple_value(&waiting, "select count(*) from chaos").await;

    for c in &holders {
        c.batch_execute("commit").await.unwrap();
    }
    waiting
        .batch_execute("insert into chaos values (3, 0)")
        .await
        .unwrap();
    // Twenty clients at once through two connections: they queue, none fails.
    let url = h.url("app", "app", "postgres");
    let clients: Vec<_> = (10..30)
        .map(|seq| {
            let url = url.clone();
            tokio::spawn(async move {
                let c = load::connect(&url).await?;
                c.batch_execute(&format!("insert into chaos values ({seq}, 0)"))
                    .await
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap().expect("a queued write");
    }
    let c = strong_client(&h).await;
    assert_eq!(
        common::simple_value(&c, "select count(*) from chaos").await,
        "23"
    );
}
