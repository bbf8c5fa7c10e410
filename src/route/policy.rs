//! Where a statement runs: the destination its intent asks for, then the
//! node that serves it. Every routing decision of the data plane is made here.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::classify::Intent;
use super::hint::Hint;
use crate::topology::{Lsn, NodeId, Topology};

/// What kind of node a statement needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    Primary,
    /// Any replica; the primary serves when none can.
    Replica,
}

/// `SET tidepool.route`: a session may send everything to the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionRoute {
    Auto,
    Primary,
}

impl SessionRoute {
    pub fn parse(value: &str) -> Option<SessionRoute> {
        match value.to_ascii_lowercase().as_str() {
            "auto" | "default" => Some(SessionRoute::Auto),
            "primary" => Some(SessionRoute::Primary),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SessionRoute::Auto => "auto",
            SessionRoute::Primary => "primary",
        }
    }
}

/// Why a unit of work went where it did: the label of `tidepool_units_total`,
/// so the set is fixed (see `ALL`) and an operator can tell reads that fell
/// back to the primary from reads that were meant for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteReason {
    /// Classified read-only (or a `BEGIN READ ONLY` transaction).
    Read,
    /// Classified as a write, or not recognized as read-only.
    Write,
    /// A `/* tidepool: ... */` comment or `SET tidepool.route = primary`.
    Hint,
    /// A read-write transaction: everything in it runs on the primary.
    Transaction,
    /// Consistency `strong`, or serializable isolation (refused by standbys).
    Strong,
    /// `pool.mode = "session"`: every client lives on the primary.
    SessionMode,
    /// A read meant for a replica that ran on the primary.
    Fallback(Fallback),
}

/// Why a read meant for a replica ran on the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// Replicas are up but over the lag limits.
    Lag,
    /// No replica is up (or none accepted a connection).
    NoReplica,
    /// No replica replayed the session's floor within `routing.ryw_wait`.
    RywTimeout,
    /// The session's last commit LSN is unknown (not asked, with
    /// `tidepool.report_lsn` off, before the session moved to a mode that
    /// reads its own writes; or its server died while reporting it): no
    /// replica can be trusted for its reads until a later write's is known.
    UnknownLsn,
}

impl Fallback {
    pub const ALL: [Fallback; 4] = [
        Fallback::Lag,
        Fallback::NoReplica,
        Fallback::RywTimeout,
        Fallback::UnknownLsn,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::Lag => "lag",
            Fallback::NoReplica => "no_replica",
            Fallback::RywTimeout => "ryw_timeout",
            Fallback::UnknownLsn => "unknown_lsn",
        }
    }

    /// Position in `ALL`.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl RouteReason {
    pub const ALL: [RouteReason; 10] = [
        RouteReason::Read,
        RouteReason::Write,
        RouteReason::Hint,
        RouteReason::Transaction,
        RouteReason::Strong,
        RouteReason::SessionMode,
        RouteReason::Fallback(Fallback::Lag),
        RouteReason::Fallback(Fallback::NoReplica),
        RouteReason::Fallback(Fallback::RywTimeout),
        RouteReason::Fallback(Fallback::UnknownLsn),
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RouteReason::Read => "read",
            RouteReason::Write => "write",
            RouteReason::Hint => "hint",
            RouteReason::Transaction => "transaction",
            RouteReason::Strong => "strong",
            RouteReason::SessionMode => "session_mode",
            RouteReason::Fallback(Fallback::Lag) => "fallback_lag",
            RouteReason::Fallback(Fallback::NoReplica) => "fallback_no_replica",
            RouteReason::Fallback(Fallback::RywTimeout) => "fallback_ryw_timeout",
            RouteReason::Fallback(Fallback::UnknownLsn) => "fallback_unknown_lsn",
        }
    }

    /// Position in `ALL`, for tables indexed by reason.
    pub fn index(self) -> usize {
        match self {
            RouteReason::Read => 0,
            RouteReason::Write => 1,
            RouteReason::Hint => 2,
            RouteReason::Transaction => 3,
            RouteReason::Strong => 4,
            RouteReason::SessionMode => 5,
            RouteReason::Fallback(f) => 6 + f.index(),
        }
    }
}

/// The destination of a statement that starts a unit of work (a transaction
/// or a single statement outside one), and why. `read_only_txn` is set when
/// it runs inside a transaction opened with BEGIN (READ ONLY or not).
pub fn destination(
    intent: &Intent,
    hint: Option<Hint>,
    session: SessionRoute,
    read_only_txn: Option<bool>,
) -> (Destination, RouteReason) {
    if session == SessionRoute::Primary {
        return (Destination::Primary, RouteReason::Hint);
    }
    match hint {
        Some(Hint::Primary) => return (Destination::Primary, RouteReason::Hint),
        Some(Hint::Replica) => return (Destination::Replica, RouteReason::Hint),
        None => {}
    }
    match read_only_txn {
        // A transaction goes where its BEGIN says, unless it turns itself
        // read-only before any statement.
        Some(read_only) if read_only || *intent == Intent::SetTransactionReadOnly => {
            (Destination::Replica, RouteReason::Read)
        }
        Some(_) => (Destination::Primary, RouteReason::Transaction),
        None if matches!(intent, Intent::Read | Intent::Begin { read_only: true }) => {
            (Destination::Replica, RouteReason::Read)
        }
        None => (Destination::Primary, RouteReason::Write),
    }
}

/// Spreads reads over replicas in turn.
#[derive(Default)]
pub struct ReplicaPicker {
    next: AtomicUsize,
}

impl ReplicaPicker {
    /// The nodes to try, in order: for reads, the replicas that serve reads
    /// starting with the next in turn and then the primary; for writes, the primary.
    pub fn candidates(&self, topology: &Topology, destination: Destination) -> Vec<NodeId> {
        self.candidates_with_floor(topology, destination, None)
    }

    /// Like `candidates`, but for reads only replicas that have replayed at
    /// least up to `min_lsn` (read-your-writes, `tidepool.min_lsn`): the
    /// primary is always fresh enough, so it stays last in line.
    pub fn candidates_with_floor(
        &self,
        topology: &Topology,
        destination: Destination,
        min_lsn: Option<Lsn>,
    ) -> Vec<NodeId> {
        let mut nodes = Vec::with_capacity(topology.nodes.len());
        if destination == Destination::Replica {
            nodes.extend(topology.read_replicas(min_lsn).map(|n| n.id));
            self.rotate_in_turn(&mut nodes);
        }
        nodes.extend(topology.primary().map(|p| p.id));
        nodes
    }

    /// For monotonic reads: `preferred` (the session's sticky replica) first
    /// while it serves reads and has replayed up to `min_lsn`, then the other
    /// replicas that have, in turn, then the primary. The session passes the
    /// replay LSN it last saw on its replica as `min_lsn`, so moving never
    /// goes back in time.
    pub fn sticky_candidates(
        &self,
        topology: &Topology,
        preferred: Option<NodeId>,
        min_lsn: Option<Lsn>,
    ) -> Vec<NodeId> {
        let mut nodes = Vec::with_capacity(topology.nodes.len());
        let sticky = preferred
            .filter(|&id| id.0 < topology.nodes.len() && topology.serves_reads_at(id, min_lsn));
        nodes.extend(sticky);
        let first_other = nodes.len();
        nodes.extend(
            topology
                .read_replicas(min_lsn)
                .map(|n| n.id)
                .filter(|&id| Some(id) != sticky),
        );
        self.rotate_in_turn(&mut nodes[first_other..]);
        nodes.extend(topology.primary().map(|p| p.id));
        nodes
    }

    /// Rotates `replicas` to start with the next in turn.
    fn rotate_in_turn(&self, replicas: &mut [NodeId]) {
        if !replicas.is_empty() {
            let start = self.next.fetch_add(1, Ordering::Relaxed) % replicas.len();
            replicas.rotate_left(start);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{Health, Role};

    #[test]
    fn destinations() {
        use Destination::*;
        use RouteReason as R;
        let auto = SessionRoute::Auto;
        let cases = [
            (Intent::Read, None, auto, None, (Replica, R::Read)),
            (Intent::Write, None, auto, None, (Primary, R::Write)),
            (
                Intent::Read,
                Some(Hint::Primary),
                auto,
                None,
                (Primary, R::Hint),
            ),
            (
                Intent::Write,
                Some(Hint::Replica),
                auto,
                None,
                (Replica, R::Hint),
            ),
            (
                Intent::Read,
                None,
                SessionRoute::Primary,
                None,
                (Primary, R::Hint),
            ),
            (
                Intent::Read,
                None,
                auto,
                Some(false),
                (Primary, R::Transaction),
            ),
            (Intent::Write, None, auto, Some(true), (Replica, R::Read)),
            (
                Intent::SetTransactionReadOnly,
                None,
                auto,
                Some(false),
                (Replica, R::Read),
            ),
            (
                Intent::Begin { read_only: true },
                None,
                auto,
                None,
                (Replica, R::Read),
            ),
        ];
        for (intent, hint, session, txn, expected) in cases {
            assert_eq!(
                destination(&intent, hint, session, txn),
                expected,
                "{intent:?} {hint:?} {session:?} {txn:?}"
            );
        }
    }

    #[test]
    fn reason_table_matches_indexes() {
        for (i, reason) in RouteReason::ALL.iter().enumerate() {
            assert_eq!(reason.index(), i, "{reason:?}");
        }
        for (i, fallback) in Fallback::ALL.iter().enumerate() {
            assert_eq!(fallback.index(), i);
            assert!(
                RouteReason::Fallback(*fallback)
                    .as_str()
                    .ends_with(fallback.as_str())
            );
        }
    }

    /// A primary and `n - 1` replicas, all up; replica i has replayed up to 100 * i.
    fn cluster(n: usize) -> Topology {
        let addrs: Vec<_> = (0..n)
            .map(|i| format!("127.0.0.1:{}", 5000 + i).parse().unwrap())
            .collect();
        let mut t = Topology::unknown(&addrs);
        for (i, n) in t.nodes.iter_mut().enumerate() {
            n.role = if i == 0 { Role::Primary } else { Role::Replica };
            n.health = Health::Up;
            n.replay_lsn = (i > 0).then_some(Lsn(100 * i as u64));
        }
        t.epoch_primary = Some(NodeId(0));
        t
    }

    #[test]
    fn round_robin_then_primary() {
        let mut t = cluster(3);
        let picker = ReplicaPicker::default();
        let a = picker.candidates(&t, Destination::Replica);
        let b = picker.candidates(&t, Destination::Replica);
        assert_eq!(a, vec![NodeId(1), NodeId(2), NodeId(0)]);
        assert_eq!(b, vec![NodeId(2), NodeId(1), NodeId(0)]);
        assert_eq!(picker.candidates(&t, Destination::Primary), vec![NodeId(0)]);
        t.nodes[2].health = Health::Down;
        assert_eq!(
            picker.candidates(&t, Destination::Replica),
            vec![NodeId(1), NodeId(0)]
        );
    }

    #[test]
    fn lagging_replicas_get_no_reads() {
        let mut t = cluster(3);
        t.nodes[1].lagging = true;
        let picker = ReplicaPicker::default();
        for _ in 0..3 {
            assert_eq!(
                picker.candidates(&t, Destination::Replica),
                vec![NodeId(2), NodeId(0)]
            );
        }
    }

    #[test]
    fn floor_keeps_replicas_that_are_fresh_enough() {
        let mut t = cluster(4);
        let picker = ReplicaPicker::default();
        let reads = |t: &Topology, lsn: u64| {
            picker.candidates_with_floor(t, Destination::Replica, Some(Lsn(lsn)))
        };
        let a = reads(&t, 200);
        let b = reads(&t, 200);
        assert_eq!(a, vec![NodeId(2), NodeId(3), NodeId(0)]);
        assert_eq!(b, vec![NodeId(3), NodeId(2), NodeId(0)]);
        assert_eq!(reads(&t, 300), vec![NodeId(3), NodeId(0)]);
        assert_eq!(reads(&t, 301), vec![NodeId(0)]);
        // Unknown replay position: not known to be fresh enough.
        t.nodes[3].replay_lsn = None;
        assert_eq!(reads(&t, 300), vec![NodeId(0)]);
        assert_eq!(
            picker.candidates_with_floor(&t, Destination::Primary, Some(Lsn(1))),
            vec![NodeId(0)]
        );
        let all = picker.candidates_with_floor(&t, Destination::Replica, None);
        assert_eq!(all.len(), 4);
    }

    #[test]
    fn sticky_replica_first_while_fresh_enough() {
        let mut t = cluster(4);
        let picker = ReplicaPicker::default();
        let sticky = |t: &Topology, preferred: usize, lsn: u64| {
            picker.sticky_candidates(t, Some(NodeId(preferred)), Some(Lsn(lsn)))
        };
        for _ in 0..3 {
            let order = sticky(&t, 2, 150);
            assert_eq!(order[0], NodeId(2));
            assert_eq!(order[1..2], [NodeId(3)]);
            assert_eq!(order.last(), Some(&NodeId(0)));
        }
        // Behind the floor: it moves to one at least as fresh.
        let moved = sticky(&t, 1, 150);
        assert_eq!(moved.len(), 3, "{moved:?}");
        assert!(!moved.contains(&NodeId(1)));
        // Lagging or down: the others first.
        t.nodes[2].lagging = true;
        let order = sticky(&t, 2, 0);
        assert_eq!(order.len(), 3, "{order:?}");
        assert!(!order.contains(&NodeId(2)));
        assert_eq!(order[2], NodeId(0));
        t.nodes[3].health = Health::Down;
        assert_eq!(sticky(&t, 3, 0)[..1], [NodeId(1)]);
        // No preference: any fresh-enough replica, then the primary.
        assert_eq!(
            picker.sticky_candidates(&t, None, Some(Lsn(100))),
            vec![NodeId(1), NodeId(0)]
        );
        // Preferring the primary (or an unknown node) is no stickiness.
        assert_eq!(sticky(&t, 0, 100), vec![NodeId(1), NodeId(0)]);
        assert_eq!(sticky(&t, 9, 100), vec![NodeId(1), NodeId(0)]);
    }
}
