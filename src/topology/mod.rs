//! Who is primary, who is up, how far behind each replica is: a snapshot
//! published through `ArcSwap` so that every routing decision reads it
//! without a lock, plus a change signal for sessions waiting on a replica.
mod lag;
mod lsn;
pub mod monitor;
mod probe;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{Notify, watch};

use crate::bell::{self, Bell};

pub use lsn::{Lsn, LsnParseError};
pub use probe::Credentials;
pub(crate) use probe::{error_text as postgres_error_text, open as open_admin};

/// A node's position in `[cluster] nodes`; stable for the process lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub usize);

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "node{}", self.0)
    }
}

/// The fencing token: it grows whenever the primary changes identity, so a
/// write stamped with an older epoch can be recognised as aimed at a node
/// that may no longer be the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Epoch(pub u64);

impl Epoch {
    pub fn next(self) -> Epoch {
        Epoch(self.0 + 1)
    }
}

impl std::fmt::Display for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Replica,
    /// Never answered a poll: it gets no traffic until it does.
    Unknown,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
            Role::Unknown => "unknown",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Up,
    Down,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Up => "up",
            Health::Down => "down",
        }
    }
}

/// A node as the monitor last saw it. The WAL fields are the last values a
/// poll returned; they are kept while the node is down (the last known
/// position matters when choosing whom to promote).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub id: NodeId,
    pub addr: SocketAddr,
    pub role: Role,
    pub health: Health,
    /// Primary only: `pg_current_wal_lsn()`, where new WAL is written.
    pub current_lsn: Option<Lsn>,
    /// Replica only: `pg_last_wal_replay_lsn()`, what its queries can see.
    pub replay_lsn: Option<Lsn>,
    /// Replica only: `pg_last_wal_receive_lsn()`, flushed but maybe not yet replayed.
    pub receive_lsn: Option<Lsn>,
    /// The timeline the node writes (primary) or receives (replica) WAL on.
    pub timeline: Option<u32>,
    /// Replica only: primary's current LSN minus this replay LSN, from the same
    /// poll round; `None` when that round had no single primary to compare with.
    pub lag_bytes: Option<u64>,
    /// Replica only: an upper bound on how stale its reads are (see `lag::measure`).
    pub lag: Option<Duration>,
    /// Replica only: over a lag limit, so it gets no reads until it is well
    /// under them again (see `lag::Limits`).
    pub lagging: bool,
}

impl Node {
    fn new(id: NodeId, addr: SocketAddr) -> Node {
        Node {
            id,
            addr,
            role: Role::Unknown,
            health: Health::Down,
            current_lsn: None,
            replay_lsn: None,
            receive_lsn: None,
            timeline: None,
            lag_bytes: None,
            lag: None,
            lagging: false,
        }
    }

    /// Up and with a known role: may take traffic its role allows.
    pub fn is_usable(&self) -> bool {
        self.health == Health::Up && self.role != Role::Unknown
    }

    /// A replica that may take reads: usable and within the lag limits.
    pub fn serves_reads(&self) -> bool {
        self.role == Role::Replica && self.is_usable() && !self.lagging
    }
}

/// Replay positions sessions saw on replicas between the monitor's polls
/// (every read-your-writes probe and monotonic read learns one): a read
/// whose floor a replica is already known to have passed needs no probe.
/// Each is a lower bound, good for one epoch and dropped when its node
/// stops serving reads, as a restarted replica may come back behind where
/// it was.
#[derive(Debug, Clone)]
pub struct ReplayHints(Arc<Hints>);

#[derive(Debug)]
struct Hints {
    lsns: Box<[AtomicU64]>,
    /// Fires when any hint moves forward: a read waiting for a replica to
    /// replay its floor learns it from other sessions' probes instead of
    /// asking the replica itself.
    advanced: Notify,
}

impl ReplayHints {
    fn new(nodes: usize) -> ReplayHints {
        ReplayHints(Arc::new(Hints {
            lsns: (0..nodes).map(|_| AtomicU64::new(0)).collect(),
            advanced: Notify::new(),
        }))
    }

    /// `node` had replayed at least up to `lsn`.
    pub fn record(&self, node: NodeId, lsn: Lsn) {
        if self.0.lsns[node.0].fetch_max(lsn.0, Ordering::Relaxed) < lsn.0 {
            self.0.advanced.notify_waiters();
        }
    }

    /// Resolves at the next `record` that moves a hint forward, counted
    /// from this call, not from the first poll.
    pub fn advanced(&self) -> tokio::sync::futures::Notified<'_> {
        self.0.advanced.notified()
    }

    fn get(&self, node: NodeId) -> Option<Lsn> {
        let lsn = self.0.lsns[node.0].load(Ordering::Relaxed);
        (lsn > 0).then_some(Lsn(lsn))
    }

    fn forget(&self, node: NodeId) {
        self.0.lsns[node.0].store(0, Ordering::Relaxed);
    }
}

/// Hints are not part of what the monitor publishes: a snapshot equals
/// another whatever sessions learnt meanwhile.
impl PartialEq for ReplayHints {
    fn eq(&self, _: &ReplayHints) -> bool {
        true
    }
}

impl Eq for ReplayHints {}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// The fencing token of the HA controller's last published topology.
    pub epoch: Epoch,
    /// The primary of `epoch`, as the HA controller published it: the only
    /// node writes may go to, whatever other nodes claim (see `ha`).
    pub epoch_primary: Option<NodeId>,
    /// Former primaries the controller fenced: no traffic until they come
    /// back as replicas.
    pub fenced: Vec<NodeId>,
    /// Why this proxy routes no writes now (it cannot confirm its epoch:
    /// the coordinator is unreachable and `on_coordinator_loss = refuse_writes`).
    pub writes_refused: Option<String>,
    /// A planned switchover holds new transactions at their boundary until
    /// this instant (or until the pause is lifted, whichever comes first).
    pub paused_until: Option<std::time::Instant>,
    pub nodes: Vec<Node>,
    pub seen: ReplayHints,
}

impl Topology {
    /// Every configured node, role not yet known.
    pub fn unknown(addrs: &[SocketAddr]) -> Topology {
        Topology {
            epoch: Epoch::default(),
            epoch_primary: None,
            fenced: Vec::new(),
            writes_refused: None,
            paused_until: None,
            nodes: addrs
                .iter()
                .enumerate()
                .map(|(i, &addr)| Node::new(NodeId(i), addr))
                .collect(),
            seen: ReplayHints::new(addrs.len()),
        }
    }

    /// How far `id` is known to have replayed: at the last poll, or since.
    pub fn replayed(&self, id: NodeId) -> Option<Lsn> {
        self.node(id).replay_lsn.max(self.seen.get(id))
    }

    /// Serves reads and has replayed at least up to `lsn`.
    pub fn serves_reads_at(&self, id: NodeId, lsn: Option<Lsn>) -> bool {
        self.node(id).serves_reads()
            && lsn.is_none_or(|lsn| self.replayed(id).is_some_and(|r| r >= lsn))
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.0]
    }

    pub fn node_by_addr(&self, addr: SocketAddr) -> Option<&Node> {
        self.nodes.iter().find(|n| n.addr == addr)
    }

    /// The primary of the current epoch, while it is up and still out of
    /// recovery. A node that claims the role without the epoch (a promotion
    /// the controller has not adopted, an old primary back from the dead)
    /// gets nothing: that is what fencing means at the proxy.
    pub fn primary(&self) -> Option<&Node> {
        let node = self.node(self.epoch_primary?);
        (node.role == Role::Primary && node.health == Health::Up && !self.is_fenced(node.id))
            .then_some(node)
    }

    /// Nodes out of recovery, up, other than the epoch's primary.
    pub fn rogue_primaries(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(move |n| {
            n.role == Role::Primary && n.health == Health::Up && Some(n.id) != self.epoch_primary
        })
    }

    pub fn is_fenced(&self, id: NodeId) -> bool {
        self.fenced.contains(&id)
    }

    /// A switchover holds new transactions now.
    pub fn is_paused(&self) -> bool {
        self.paused_until
            .is_some_and(|u| std::time::Instant::now() < u)
    }

    /// A connection attached to `node` as the primary no longer is one:
    /// the epoch names another primary (or none).
    pub fn lost_its_epoch(&self, node: NodeId, attached_as: Role) -> bool {
        attached_as == Role::Primary && self.epoch_primary != Some(node)
    }

    /// Replicas that are up, lagging or not.
    pub fn usable_replicas(&self) -> impl Iterator<Item = &Node> {
        self.nodes
            .iter()
            .filter(|n| n.role == Role::Replica && n.is_usable() && !self.is_fenced(n.id))
    }

    /// Replicas that serve reads and have replayed at least up to `min_lsn`.
    pub fn read_replicas(&self, min_lsn: Option<Lsn>) -> impl Iterator<Item = &Node> {
        self.nodes
            .iter()
            .filter(move |n| self.serves_reads_at(n.id, min_lsn) && !self.is_fenced(n.id))
    }
}

/// The live topology, shared by the monitor (writer) and every session (readers).
#[derive(Clone)]
pub struct SharedTopology(Arc<Shared>);

struct Shared {
    snapshot: ArcSwap<Topology>,
    /// Bumped on every publish; waiters subscribe to it.
    version: watch::Sender<u64>,
    /// Changes only with the epoch: what sessions holding a primary
    /// connection watch, without waking on every poll round.
    epoch: Arc<Bell>,
    /// Wakes the monitor for an immediate poll round.
    refresh: Notify,
}

impl SharedTopology {
    pub fn new(topology: Topology) -> SharedTopology {
        let epoch = topology.epoch;
        SharedTopology(Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(topology),
            version: watch::Sender::new(0),
            epoch: Bell::new(epoch.0),
            refresh: Notify::new(),
        }))
    }

    pub fn load(&self) -> arc_swap::Guard<Arc<Topology>> {
        self.0.snapshot.load()
    }

    /// The current snapshot as an owned `Arc`, to keep beyond a short borrow.
    pub fn load_full(&self) -> Arc<Topology> {
        self.0.snapshot.load_full()
    }

    /// Applies `change` to the current snapshot and, if the result differs,
    /// publishes it (one store) and wakes the waiters. `change` may run more
    /// than once when writers race, so it must only depend on its argument.
    /// Returns whether anything was published.
    pub fn update(&self, mut change: impl FnMut(&mut Topology)) -> bool {
        let mut changed = false;
        self.0.snapshot.rcu(|current| {
            let mut next = Topology::clone(current);
            change(&mut next);
            if next.epoch != current.epoch {
                next.seen = ReplayHints::new(next.nodes.len());
            }
            for node in next.nodes.iter().filter(|n| !n.serves_reads()) {
                next.seen.forget(node.id);
            }
            changed = next != **current;
            if changed {
                Arc::new(next)
            } else {
                Arc::clone(current)
            }
        });
        if changed {
            self.0.version.send_modify(|v| *v = v.wrapping_add(1));
            self.0.epoch.ring(self.load().epoch.0);
        }
        changed
    }

    /// A session could not reach a node. A replica is taken out of rotation
    /// at once (reads have elsewhere to go) and the monitor brings it back
    /// when it answers again. The primary takes every write, so one failed
    /// connect must not fail every writer until the next poll: the monitor
    /// looks now and decides, after `failures_before_down` failed polls as
    /// for any node.
    pub fn report_unreachable(&self, id: NodeId) {
        let (role, health) = {
            let topology = self.load();
            (topology.node(id).role, topology.node(id).health)
        };
        if role == Role::Primary {
            self.request_refresh();
            return;
        }
        if health == Health::Down {
            return;
        }
        tracing::warn!(node = %id, "node unreachable, taken out of rotation");
        self.update(|t| t.nodes[id.0].health = Health::Down);
    }

    /// Hears every new epoch (a new primary, a fencing).
    pub fn epochs(&self) -> bell::Listener {
        self.0.epoch.listen()
    }

    /// Asks the monitor for a poll round now instead of at the next tick: for
    /// a session told by its "primary" that it is read-only (SQLSTATE 25006),
    /// a sign that the roles changed. Requests made during a round coalesce
    /// into one more round.
    pub fn request_refresh(&self) {
        self.0.refresh.notify_one();
    }

    /// Resolves when a request_refresh arrives; the monitor's side.
    pub(crate) async fn refresh_requested(&self) {
        self.0.refresh.notified().await
    }

    /// Resolves at the first publish after this call (not after the first
    /// poll of the future). To wait for a condition without missing a change,
    /// call this first, then check the snapshot, then await.
    pub fn changed(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut version = self.0.version.subscribe();
        async move {
            // The sender lives as long as the receiver's SharedTopology; an
            // error means it is gone, and then nothing will ever change.
            if version.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Resolves to true as soon as a replica that serves reads has replayed
    /// up to `lsn` (at once if one already has), false after `timeout`.
    /// Replay positions are as fresh as the last poll round, so this takes
    /// up to `poll_interval` longer than the replica itself.
    pub fn wait_for_replica_lsn(
        &self,
        lsn: Lsn,
        timeout: Duration,
    ) -> impl Future<Output = bool> + Send + 'static {
        let shared = self.clone();
        let mut version = self.0.version.subscribe();
        let reached = async move {
            loop {
                if shared.load().read_replicas(Some(lsn)).next().is_some() {
                    return;
                }
                // Cannot fail: `shared` keeps the sender alive.
                let _ = version.changed().await;
            }
        };
        async move { tokio::time::timeout(timeout, reached).await.is_ok() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology(roles: &[(Role, Health)]) -> Topology {
        let addrs: Vec<SocketAddr> = (0..roles.len())
            .map(|i| format!("127.0.0.1:{}", 5432 + i).parse().unwrap())
            .collect();
        let mut t = Topology::unknown(&addrs);
        for (node, &(role, health)) in t.nodes.iter_mut().zip(roles) {
            node.role = role;
            node.health = health;
        }
        t
    }

    #[test]
    fn only_the_epochs_primary_takes_writes() {
        use Health::*;
        use Role::*;
        let mut t = topology(&[(Primary, Up), (Replica, Up), (Replica, Down)]);
        assert!(t.primary().is_none(), "no epoch published yet");
        t.epoch_primary = Some(NodeId(0));
        assert_eq!(t.primary().unwrap().id, NodeId(0));
        assert_eq!(t.usable_replicas().count(), 1);
        // A second node out of recovery gets nothing: it is a rogue.
        t.nodes[1].role = Primary;
        assert_eq!(t.primary().unwrap().id, NodeId(0));
        assert_eq!(
            t.rogue_primaries().map(|n| n.id).collect::<Vec<_>>(),
            [NodeId(1)]
        );
        // The epoch's primary down, or in recovery: no primary at all.
        t.nodes[0].health = Down;
        assert!(t.primary().is_none());
        t.nodes[0].health = Up;
        t.nodes[0].role = Replica;
        assert!(t.primary().is_none());
        // Fenced: no reads either.
        t.fenced = vec![NodeId(0)];
        assert_eq!(t.usable_replicas().count(), 0);
    }

    fn with_replica_at(lsn: u64) -> impl FnMut(&mut Topology) {
        move |t| {
            t.nodes[1].role = Role::Replica;
            t.nodes[1].health = Health::Up;
            t.nodes[1].replay_lsn = Some(Lsn(lsn));
        }
    }

    #[tokio::test]
    async fn publishes_only_changes_and_wakes_waiters() {
        let shared = SharedTopology::new(topology(&[
            (Role::Primary, Health::Up),
            (Role::Unknown, Health::Down),
        ]));
        let changed = shared.changed();
        assert!(!shared.update(|_| {}));
        assert!(shared.update(with_replica_at(10)));
        tokio::time::timeout(Duration::from_secs(1), changed)
            .await
            .unwrap();
        let unchanged = shared.changed();
        assert!(!shared.update(with_replica_at(10)));
        let waited = tokio::time::timeout(Duration::from_millis(20), unchanged).await;
        assert!(waited.is_err(), "no publish, no wake-up");
    }

    #[test]
    fn replay_hints_count_until_the_node_stops_serving_reads_or_the_epoch_moves() {
        let shared = SharedTopology::new(topology(&[
            (Role::Primary, Health::Up),
            (Role::Unknown, Health::Down),
        ]));
        shared.update(with_replica_at(10));
        let replica = NodeId(1);
        assert!(!shared.load().serves_reads_at(replica, Some(Lsn(30))));
        shared.load().seen.record(replica, Lsn(30));
        shared.load().seen.record(replica, Lsn(20));
        assert_eq!(
            shared.load().replayed(replica),
            Some(Lsn(30)),
            "never goes back"
        );
        assert!(shared.load().serves_reads_at(replica, Some(Lsn(30))));
        assert_eq!(shared.load().read_replicas(Some(Lsn(30))).count(), 1);
        // Down, then back: the poll's position only, until a session learns more.
        shared.update(|t| t.nodes[1].health = Health::Down);
        shared.update(with_replica_at(10));
        assert_eq!(shared.load().replayed(replica), Some(Lsn(10)));
        shared.load().seen.record(replica, Lsn(30));
        shared.update(|t| t.epoch = Epoch(t.epoch.0 + 1));
        assert_eq!(shared.load().replayed(replica), Some(Lsn(10)));
    }

    #[tokio::test]
    async fn waits_for_a_replica_to_reach_an_lsn() {
        let shared = SharedTopology::new(topology(&[
            (Role::Primary, Health::Up),
            (Role::Unknown, Health::Down),
        ]));
        let short = Duration::from_millis(20);
        assert!(!shared.wait_for_replica_lsn(Lsn(1), short).await);
        shared.update(with_replica_at(10));
        assert!(shared.wait_for_replica_lsn(Lsn(10), short).await);
        let waiting = tokio::spawn(shared.wait_for_replica_lsn(Lsn(20), Duration::from_secs(5)));
        tokio::task::yield_now().await;
        shared.update(with_replica_at(15));
        shared.update(with_replica_at(25));
        assert!(waiting.await.unwrap());
        // A lagging replica does not count, however far it has replayed.
        shared.update(|t| t.nodes[1].lagging = true);
        assert!(!shared.wait_for_replica_lsn(Lsn(1), short).await);
    }

    #[tokio::test]
    async fn refresh_requests_are_kept_until_taken() {
        let shared = SharedTopology::new(topology(&[(Role::Primary, Health::Up)]));
        shared.request_refresh();
        shared.request_refresh();
        let taken = tokio::time::timeout(Duration::from_secs(1), shared.refresh_requested());
        taken.await.unwrap();
        let again = tokio::time::timeout(Duration::from_millis(20), shared.refresh_requested());
        assert!(again.await.is_err(), "requests coalesce");
    }
}
