//! A session's consistency state: how fresh its reads must be, and what it
//! has written and seen so far.

use crate::config::ConsistencyMode;
use crate::topology::{Lsn, NodeId};

#[derive(Debug)]
pub struct Consistency {
    pub mode: ConsistencyMode,
    /// Commit LSN of the session's last write: reported to the client as
    /// `tidepool.lsn`, the floor of its reads in `read_your_writes`.
    pub last_write: Option<Lsn>,
    /// A write committed after `last_write` whose commit LSN is not known:
    /// it was not asked (`tidepool.report_lsn` off in a mode that does not
    /// read its own writes), or its server died before answering. No
    /// replica can be shown to have it until a later write's LSN is known.
    pub last_write_unknown: bool,
    /// `SET tidepool.min_lsn`: a causal token from another connection.
    pub min_lsn: Option<Lsn>,
    /// `monotonic`: the highest replay LSN its reads have seen, and where.
    pub observed: Option<Lsn>,
    pub sticky: Option<NodeId>,
}

impl Consistency {
    pub fn new(mode: ConsistencyMode) -> Consistency {
        Consistency {
            mode,
            last_write: None,
            last_write_unknown: false,
            min_lsn: None,
            observed: None,
            sticky: None,
        }
    }

    /// The LSN a replica must have replayed to serve this session's reads.
    pub fn floor(&self) -> Option<Lsn> {
        let own = match self.mode {
            ConsistencyMode::Eventual | ConsistencyMode::Strong => None,
            ConsistencyMode::ReadYourWrites => self.last_write,
            ConsistencyMode::Monotonic => self.last_write.max(self.observed),
        };
        own.max(self.min_lsn)
    }

    /// A later commit's LSN is past every earlier commit of the session,
    /// the unknown one included.
    pub fn record_write(&mut self, lsn: Lsn) {
        self.last_write = self.last_write.max(Some(lsn));
        self.last_write_unknown = false;
    }

    /// Whether the mode bounds reads by the session's own commits.
    pub fn reads_own_writes(&self) -> bool {
        matches!(
            self.mode,
            ConsistencyMode::ReadYourWrites | ConsistencyMode::Monotonic
        )
    }

    /// Whether no replica can serve the next read: the floor it needs is
    /// a commit LSN nobody knows.
    pub fn floor_unknown(&self) -> bool {
        self.last_write_unknown && self.reads_own_writes()
    }

    /// A read on `node` saw everything up to `lsn`.
    pub fn record_read(&mut self, node: NodeId, lsn: Lsn) {
        self.observed = self.observed.max(Some(lsn));
        self.sticky = Some(node);
    }

    /// Whether reads need their replay LSN checked after the fact.
    pub fn tracks_reads(&self) -> bool {
        self.mode == ConsistencyMode::Monotonic
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floors_by_mode() {
        let mut c = Consistency::new(ConsistencyMode::Eventual);
        c.record_write(Lsn(100));
        c.record_read(NodeId(1), Lsn(200));
        assert_eq!(c.floor(), None);
        c.min_lsn = Some(Lsn(50));
        assert_eq!(c.floor(), Some(Lsn(50)));
        c.mode = ConsistencyMode::ReadYourWrites;
        assert_eq!(c.floor(), Some(Lsn(100)));
        c.mode = ConsistencyMode::Monotonic;
        assert_eq!(c.floor(), Some(Lsn(200)));
        c.mode = ConsistencyMode::Strong;
        assert_eq!(c.floor(), Some(Lsn(50)));
        c.record_write(Lsn(10));
        assert_eq!(c.last_write, Some(Lsn(100)), "never goes back");
    }

    #[test]
    fn an_unknown_commit_lsn_binds_only_modes_that_read_their_writes() {
        let mut c = Consistency::new(ConsistencyMode::Eventual);
        c.record_write(Lsn(100));
        c.last_write_unknown = true;
        assert!(!c.floor_unknown());
        c.mode = ConsistencyMode::Strong;
        assert!(!c.floor_unknown());
        c.mode = ConsistencyMode::ReadYourWrites;
        assert!(c.floor_unknown());
        c.mode = ConsistencyMode::Monotonic;
        assert!(c.floor_unknown());
        c.record_write(Lsn(150));
        assert!(!c.floor_unknown(), "a later commit's LSN covers it");
    }
}
