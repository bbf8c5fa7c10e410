//! Where a statement runs: the destination its intent asks for, then the
//! node that serves it. Every routing decision of the data plane is made here.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::classify::Intent;
use super::hint::Hint;
use crate::topology::{NodeId, Topology};

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

/// The destination of a statement that starts a unit of work (a transaction
/// or a single statement outside one). `read_only_txn` is set when it runs
/// inside a transaction opened with BEGIN READ ONLY.
pub fn destination(
    intent: &Intent,
    hint: Option<Hint>,
    session: SessionRoute,
    read_only_txn: Option<bool>,
) -> Destination {
    if session == SessionRoute::Primary {
        return Destination::Primary;
    }
    match hint {
        Some(Hint::Primary) => return Destination::Primary,
        Some(Hint::Replica) => return Destination::Replica,
        None => {}
    }
    let read = match read_only_txn {
        // A transaction goes where its BEGIN says, unless it turns itself
        // read-only before any statement.
        Some(read_only) => read_only || *intent == Intent::SetTransactionReadOnly,
        None => matches!(intent, Intent::Read | Intent::Begin { read_only: true }),
    };
    if read {
        Destination::Replica
    } else {
        Destination::Primary
    }
}

/// Spreads reads over replicas in turn.
#[derive(Default)]
pub struct ReplicaPicker {
    next: AtomicUsize,
}

impl ReplicaPicker {
    /// The nodes to try, in order: for reads, the usable replicas starting
    /// with the next in turn and then the primary; for writes, the primary.
    pub fn candidates(&self, topology: &Topology, destination: Destination) -> Vec<NodeId> {
        let mut nodes = Vec::with_capacity(topology.nodes.len());
        if destination == Destination::Replica {
            let replicas: Vec<NodeId> = topology.usable_replicas().map(|n| n.id).collect();
            if !replicas.is_empty() {
                let start = self.next.fetch_add(1, Ordering::Relaxed) % replicas.len();
                nodes.extend(replicas[start..].iter().chain(&replicas[..start]));
            }
        }
        nodes.extend(topology.primary().map(|p| p.id));
        nodes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{Health, Role};

    #[test]
    fn destinations() {
        use Destination::*;
        let auto = SessionRoute::Auto;
        assert_eq!(destination(&Intent::Read, None, auto, None), Replica);
        assert_eq!(destination(&Intent::Write, None, auto, None), Primary);
        assert_eq!(
            destination(&Intent::Read, Some(Hint::Primary), auto, None),
            Primary
        );
        assert_eq!(
            destination(&Intent::Write, Some(Hint::Replica), auto, None),
            Replica
        );
        assert_eq!(
            destination(&Intent::Read, None, SessionRoute::Primary, None),
            Primary
        );
        assert_eq!(destination(&Intent::Read, None, auto, Some(false)), Primary);
        assert_eq!(destination(&Intent::Write, None, auto, Some(true)), Replica);
        assert_eq!(
            destination(&Intent::SetTransactionReadOnly, None, auto, Some(false)),
            Replica
        );
        assert_eq!(
            destination(&Intent::Begin { read_only: true }, None, auto, None),
            Replica
        );
    }

    #[test]
    fn round_robin_then_primary() {
        let addrs: Vec<_> = (0..3)
            .map(|i| format!("127.0.0.1:{}", 5000 + i).parse().unwrap())
            .collect();
        let mut t = Topology::unknown(&addrs);
        for (i, n) in t.nodes.iter_mut().enumerate() {
            n.role = if i == 0 { Role::Primary } else { Role::Replica };
            n.health = Health::Up;
        }
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
}
