//! Who is primary, who is up: a snapshot published through `ArcSwap` so that
//! every routing decision reads it without a lock.
pub mod monitor;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;

/// A node's position in `[cluster] nodes`; stable for the process lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub usize);

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "node{}", self.0)
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub id: NodeId,
    pub addr: SocketAddr,
    pub role: Role,
    pub health: Health,
}

impl Node {
    pub fn is_usable(&self) -> bool {
        self.health == Health::Up && self.role != Role::Unknown
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub nodes: Vec<Node>,
}

impl Topology {
    /// Every configured node, role not yet known.
    pub fn unknown(addrs: &[SocketAddr]) -> Topology {
        Topology {
            nodes: addrs
                .iter()
                .enumerate()
                .map(|(i, &addr)| Node {
                    id: NodeId(i),
                    addr,
                    role: Role::Unknown,
                    health: Health::Down,
                })
                .collect(),
        }
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.0]
    }

    /// The primary, when exactly one usable node claims the role.
    pub fn primary(&self) -> Option<&Node> {
        let mut primaries = self
            .nodes
            .iter()
            .filter(|n| n.role == Role::Primary && n.health == Health::Up);
        let first = primaries.next()?;
        // Two nodes out of recovery is a split brain: write nowhere rather than to the wrong one.
        primaries.next().is_none().then_some(first)
    }

    pub fn usable_replicas(&self) -> impl Iterator<Item = &Node> {
        self.nodes
            .iter()
            .filter(|n| n.role == Role::Replica && n.is_usable())
    }
}

/// The live topology, shared by the monitor (writer) and every session (readers).
#[derive(Clone)]
pub struct SharedTopology(Arc<ArcSwap<Topology>>);

impl SharedTopology {
    pub fn new(topology: Topology) -> SharedTopology {
        SharedTopology(Arc::new(ArcSwap::from_pointee(topology)))
    }

    pub fn load(&self) -> arc_swap::Guard<Arc<Topology>> {
        self.0.load()
    }

    /// Applies `change` to the current snapshot and publishes the result if it differs.
    pub fn update(&self, change: impl Fn(&mut Topology)) {
        self.0.rcu(|current| {
            let mut next = Topology::clone(current);
            change(&mut next);
            Arc::new(next)
        });
    }

    /// A session that could not reach a node takes it out of rotation at once;
    /// the monitor brings it back when it answers again.
    pub fn report_unreachable(&self, id: NodeId) {
        if self.load().node(id).health == Health::Down {
            return;
        }
        tracing::warn!(node = %id, "node unreachable, taken out of rotation");
        self.update(|t| t.nodes[id.0].health = Health::Down);
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
    fn primary_requires_exactly_one() {
        use Health::*;
        use Role::*;
        let t = topology(&[(Primary, Up), (Replica, Up), (Replica, Down)]);
        assert_eq!(t.primary().unwrap().id, NodeId(0));
        assert_eq!(t.usable_replicas().count(), 1);
        let split = topology(&[(Primary, Up), (Primary, Up)]);
        assert!(split.primary().is_none());
        let down = topology(&[(Primary, Down), (Replica, Up)]);
        assert!(down.primary().is_none());
    }
}
