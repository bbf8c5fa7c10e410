//! The live topology against real clusters: WAL positions and lag are
//! measured, lagging replicas leave the read rotation and come back, and a
//! promotion is picked up with a new epoch, also by the data plane.

use std::future::Future;
use std::time::{Duration, Instant};

use tidepool::demo::{
    self,
    cluster::{Cluster, ClusterSpec},
};
use tidepool::proxy::Proxy;
use tidepool::route::policy::{Destination, ReplicaPicker};
use tidepool::topology::{Epoch, Lsn, NodeId, Role, SharedTopology, Topology};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

struct Setup {
    cluster: Cluster,
    proxy: Proxy,
}

impl Setup {
    /// A primary, 2 replicas and a proxy; `extra` is appended to its TOML.
    async fn start(extra: &str) -> Setup {
        let cluster = tokio::task::spawn_blocking(|| Cluster::start(ClusterSpec::default()))
            .await
            .unwrap()
            .expect("cluster starts");
        let config = demo::config(&cluster, "127.0.0.1:0", extra);
        let proxy = Proxy::start(config).await.expect("proxy starts");
        Setup { cluster, proxy }
    }

    fn topology(&self) -> &SharedTopology {
        self.proxy.topology()
    }

    /// `sql` on node `index` as the admin (psql blocks, so off the async threads).
    fn psql(&self, index: usize, sql: &str) -> String {
        tokio::task::block_in_place(|| self.cluster.psql(index, sql))
            .unwrap_or_else(|e| panic!("{sql} on node {index}: {e}"))
    }

    fn caught_up(&self) {
        tokio::task::block_in_place(|| {
            self.cluster
                .wait_replicas_caught_up(Duration::from_secs(20))
        })
        .expect("replicas catch up");
    }

    async fn connect(&self) -> Client {
        let url = format!(
            "host=127.0.0.1 port={} user=app password=app dbname=postgres connect_timeout=10",
            self.proxy.addr().port()
        );
        let (client, connection) = tokio_postgres::connect(&url, NoTls)
            .await
            .expect("connect through tidepool");
        tokio::spawn(connection);
        client
    }

    async fn shutdown(self) {
        self.proxy.shutdown().await;
        tokio::task::spawn_blocking(move || drop(self.cluster))
            .await
            .unwrap();
    }
}

/// Polls the topology every 10 ms until `ready` holds; panics with `what`
/// and the last snapshot after `within`.
async fn eventually(
    topology: &SharedTopology,
    within: Duration,
    what: &str,
    ready: impl Fn(&Topology) -> bool,
) {
    let deadline = Instant::now() + within;
    loop {
        let snapshot = topology.load_full();
        if ready(&snapshot) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not within {within:?}: {what}\n{snapshot:#?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn within<T>(limit: Duration, what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, future)
        .await
        .unwrap_or_else(|_| panic!("not within {limit:?}: {what}"))
}

async fn first_value(client: &Client, sql: &str) -> String {
    let messages = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    messages
        .into_iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no rows"))
}

#[tokio::test(flavor = "multi_thread")]
async fn positions_and_lag_are_measured() {
    let s = Setup::start("").await;
    let topology = s.topology();
    eventually(topology, Duration::from_secs(1), "positions known", |t| {
        let primary = t.primary().is_some_and(|p| {
            p.current_lsn.is_some() && p.timeline == Some(1) && p.replay_lsn.is_none()
        });
        let replicas = t.nodes[1..].iter().all(|n| {
            n.role == Role::Replica
                && n.replay_lsn.is_some()
                && n.receive_lsn.is_some()
                && n.lag_bytes.is_some()
                && n.timeline == Some(1)
                && n.current_lsn.is_none()
        });
        primary && replicas
    })
    .await;

    s.psql(
        0,
        "create table positions as select generate_series(1, 1000) x",
    );
    let written: Lsn = s.psql(0, "select pg_current_wal_lsn()").parse().unwrap();
    s.caught_up();
    eventually(
        topology,
        Duration::from_secs(1),
        "replicas caught up",
        |t| {
            let primary = t.primary().and_then(|p| p.current_lsn);
            primary.is_some_and(|lsn| lsn >= written)
                && t.nodes[1..].iter().all(|n| {
                    n.replay_lsn.is_some_and(|r| r >= written)
                        && n.lag_bytes.is_some_and(|b| b < 64 << 10)
                        && n.lag.is_some_and(|l| l < Duration::from_secs(1))
                        && n.serves_reads()
                })
        },
    )
    .await;

    // Waiting for a position the replicas have: immediate; one nobody has: times out.
    let now = Duration::from_millis(50);
    assert!(topology.wait_for_replica_lsn(written, now).await);
    let started = Instant::now();
    let future = Lsn(written.0 + (1 << 40));
    assert!(!topology.wait_for_replica_lsn(future, now).await);
    assert!(started.elapsed() < Duration::from_secs(1));
    // And one written after the call: true once a replica has replayed it.
    let waiting = topology.wait_for_replica_lsn(Lsn(written.0 + 1), Duration::from_secs(5));
    s.psql(0, "insert into positions values (0)");
    assert!(within(Duration::from_secs(6), "waiter resolves", waiting).await);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_over_the_byte_limit_gets_no_reads_until_it_catches_up() {
    let s = Setup::start("[routing]\nmax_replica_lag_bytes = 1048576\n").await;
    let topology = s.topology();
    s.caught_up();
    eventually(topology, Duration::from_secs(3), "all serve reads", |t| {
        t.nodes[1..].iter().all(|n| n.serves_reads())
    })
    .await;

    s.psql(1, "select pg_wal_replay_pause()");
    s.psql(0, "create table w as select generate_series(1, 200000) x");
    // Node 2 may be over the limit for a moment too, while it replays.
    eventually(
        topology,
        Duration::from_secs(5),
        "node1 lagging, node2 not",
        |t| {
            let n = &t.nodes[1];
            n.lagging
                && !n.serves_reads()
                && n.lag_bytes.is_some_and(|b| b > 1 << 20)
                && t.nodes[2].serves_reads()
        },
    )
    .await;
    let snapshot = topology.load_full();
    let picker = ReplicaPicker::default();
    for _ in 0..4 {
        let order = picker.candidates(&snapshot, Destination::Replica);
        assert_eq!(order, vec![NodeId(2), NodeId(0)]);
    }
    let client = s.connect().await;
    let paused = s.cluster.nodes()[1].port.to_string();
    for _ in 0..6 {
        let port = first_value(&client, "select inet_server_port()").await;
        assert_ne!(port, paused, "a read went to the lagging replica");
    }

    s.psql(1, "select pg_wal_replay_resume()");
    eventually(topology, Duration::from_secs(5), "node1 back", |t| {
        let n = &t.nodes[1];
        n.serves_reads() && n.lag_bytes.is_some_and(|b| b <= 1 << 19)
    })
    .await;
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn time_lag_counts_only_while_behind() {
    let s = Setup::start("[routing]\nmax_replica_lag = \"1s\"\n").await;
    let topology = s.topology();
    s.psql(0, "create table t (x int)");
    s.caught_up();
    // An idle primary: the last replayed commit ages past the limit, yet the
    // replicas are caught up and must stay in rotation.
    let idle_until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < idle_until {
        let t = topology.load_full();
        for n in &t.nodes[1..] {
            assert!(n.serves_reads(), "idle but caught up: {n:#?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Behind by one small commit, for longer than the limit: lagging by time.
    s.psql(1, "select pg_wal_replay_pause()");
    s.psql(0, "insert into t values (1)");
    eventually(
        topology,
        Duration::from_secs(4),
        "node1 lagging by time",
        |t| {
            let n = &t.nodes[1];
            !n.serves_reads()
                && n.lag_bytes.is_some_and(|b| b < 64 << 10)
                && n.lag > Some(Duration::from_secs(1))
        },
    )
    .await;
    assert!(topology.load().nodes[2].serves_reads());
    s.psql(1, "select pg_wal_replay_resume()");
    eventually(topology, Duration::from_secs(3), "node1 back", |t| {
        t.nodes[1].serves_reads() && t.nodes[1].lag == Some(Duration::ZERO)
    })
    .await;
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_promoted_replica_becomes_the_primary_with_a_new_epoch() {
    let mut s = Setup::start("").await;
    let topology = s.topology().clone();
    eventually(&topology, Duration::from_secs(1), "node0 primary", |t| {
        t.primary().is_some_and(|p| p.id == NodeId(0))
    })
    .await;
    // Epoch 1: the controller bootstrapped with the one primary it found.
    assert_eq!(topology.load().epoch, Epoch(1));

    tokio::task::block_in_place(|| s.cluster.kill(0));
    s.psql(1, "select pg_promote()");
    eventually(&topology, Duration::from_secs(3), "node1 primary", |t| {
        t.primary()
            .is_some_and(|p| p.id == NodeId(1) && p.timeline == Some(2))
    })
    .await;
    // Adopted as it is, in a new epoch; the old primary is fenced when it returns.
    let t = topology.load_full();
    assert_eq!(t.epoch, Epoch(2), "{t:#?}");
    assert!(t.nodes[1].replay_lsn.is_none() && t.nodes[1].current_lsn.is_some());

    let client = s.connect().await;
    client
        .simple_query(
            "create table after_promotion (x int); insert into after_promotion values (1)",
        )
        .await
        .expect("writes follow the new primary");
    let port = first_value(&client, "/* tidepool: primary */ select inet_server_port()").await;
    assert_eq!(port, s.cluster.nodes()[1].port.to_string());
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refresh_request_polls_at_once() {
    // Polls every hour: only a refresh request can notice the promotion in time.
    // (The generated TOML ends inside [cluster], so these lines extend it.)
    let mut s = Setup::start("poll_interval = \"1h\"\nfailures_before_down = 1\n").await;
    let topology = s.topology().clone();
    assert_eq!(topology.load().primary().map(|p| p.id), Some(NodeId(0)));
    tokio::task::block_in_place(|| s.cluster.kill(0));
    s.psql(1, "select pg_promote()");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        topology.load().primary().map(|p| p.id),
        Some(NodeId(0)),
        "no poll yet"
    );

    let changed = topology.changed();
    topology.request_refresh();
    within(
        Duration::from_secs(2),
        "a publish after the refresh",
        changed,
    )
    .await;
    eventually(&topology, Duration::from_secs(1), "node1 primary", |t| {
        t.primary().is_some_and(|p| p.id == NodeId(1))
    })
    .await;
    assert_eq!(topology.load().epoch, Epoch(2));
    s.shutdown().await;
}

/// WAL written without commits (reads on the primary setting hint bits and
/// pruning pages) keeps a replica a few bytes behind at every poll while its
/// last replayed commit ages: it still keeps up, and stays in rotation.
#[tokio::test(flavor = "multi_thread")]
async fn wal_without_commits_does_not_age_a_replica_that_keeps_up() {
    let s = Setup::start("[routing]\nmax_replica_lag = \"1s\"\n").await;
    s.psql(0, "create table t (x int)");
    s.caught_up();
    let url = format!(
        "host=127.0.0.1 port={} user=postgres password=postgres dbname=postgres",
        s.cluster.primary().port
    );
    let (primary, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(connection);
    let until = Instant::now() + Duration::from_millis(2500);
    let mut seen_behind = 0;
    while Instant::now() < until {
        primary
            .batch_execute("select pg_logical_emit_message(false, 'tidepool', 'x')")
            .await
            .unwrap();
        let t = s.topology().load_full();
        for n in &t.nodes[1..] {
            assert!(n.serves_reads(), "keeps up, yet out of rotation: {n:#?}");
            seen_behind += usize::from(n.lag_bytes.is_some_and(|b| b > 0));
        }
    }
    assert!(seen_behind > 0, "never seen behind: the test shows nothing");
    s.shutdown().await;
}
