//! What the proxy expects back from a server, in order. The proxy inserts
//! messages the client never sent (a Parse a server lacks, the BEGIN it held
//! back) and owes the client replies the server never sends (a ParseComplete
//! for a statement the server already holds); this queue keeps each response
//! matched to the message it answers so those can be hidden or supplied at
//! exactly the right place in the stream.

use std::collections::VecDeque;
use std::sync::Arc;

use super::statements::Statement;

use crate::protocol::Frame;
use crate::protocol::backend::*;

/// The kind of message a response answers; it decides which response ends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Parse,
    Bind,
    Describe,
    Execute,
    Close,
    Sync,
    Query,
    FunctionCall,
}

impl Kind {
    fn completed_by(self, tag: u8) -> bool {
        match self {
            Kind::Parse => tag == PARSE_COMPLETE,
            Kind::Bind => tag == BIND_COMPLETE,
            Kind::Close => tag == CLOSE_COMPLETE,
            Kind::Describe => tag == ROW_DESCRIPTION || tag == NO_DATA,
            Kind::Execute => {
                tag == COMMAND_COMPLETE || tag == EMPTY_QUERY || tag == PORTAL_SUSPENDED
            }
            Kind::Sync | Kind::Query | Kind::FunctionCall => tag == READY_FOR_QUERY,
        }
    }

    /// An error skips everything up to the next of these, which still answer.
    fn ends_batch(self) -> bool {
        matches!(self, Kind::Sync | Kind::Query | Kind::FunctionCall)
    }
}

/// A question the proxy inserted to learn a WAL position (see
/// `pool::lsn_query`): its one value is read, not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capture {
    /// `pg_current_wal_lsn()` after a write: the session's commit LSN.
    CommitLsn,
    /// `pg_last_wal_replay_lsn()` before a read that needs at least this LSN.
    ReplayFloor(crate::topology::Lsn),
    /// `pg_last_wal_replay_lsn()` after a read: what the session has seen.
    Observed,
}

/// Bookkeeping to undo when a Parse the proxy sent fails or is skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseUndo {
    pub global: Vec<u8>,
    /// The client's name for it, when the client's own Parse failed.
    pub client_name: Option<Vec<u8>>,
}

#[derive(Debug)]
pub enum Expect {
    Reply {
        kind: Kind,
        /// False for messages the proxy inserted: their responses are hidden.
        visible: bool,
        undo: Option<ParseUndo>,
        capture: Option<Capture>,
        /// The client's statement a Bind or Describe uses under its global name.
        statement: Option<Arc<Statement>>,
    },
    /// A response the client is owed that the server will not send.
    Synthetic(Frame),
}

#[derive(Debug, Default)]
pub struct Pending {
    queue: VecDeque<Expect>,
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn clear(&mut self) {
        self.queue.clear();
    }

    pub fn push(&mut self, kind: Kind, visible: bool) {
        self.queue.push_back(Expect::Reply {
            kind,
            visible,
            undo: None,
            capture: None,
            statement: None,
        });
    }

    /// A Bind or Describe of the client's statement `statement`.
    pub fn push_using(&mut self, kind: Kind, statement: Arc<Statement>) {
        self.queue.push_back(Expect::Reply {
            kind,
            visible: true,
            undo: None,
            capture: None,
            statement: Some(statement),
        });
    }

    /// The client's statement the oldest outstanding message uses, if any.
    pub fn head_statement(&self) -> Option<&Arc<Statement>> {
        match self.queue.front() {
            Some(Expect::Reply { statement, .. }) => statement.as_ref(),
            _ => None,
        }
    }

    pub fn push_parse(&mut self, visible: bool, undo: ParseUndo) {
        self.queue.push_back(Expect::Reply {
            kind: Kind::Parse,
            visible,
            undo: Some(undo),
            capture: None,
            statement: None,
        });
    }

    /// One of the messages the proxy inserted to learn a value: every reply
    /// to them is the proxy's, and the one DataRow among them carries it.
    pub fn push_capture(&mut self, capture: Capture, kind: Kind, undo: Option<ParseUndo>) {
        self.queue.push_back(Expect::Reply {
            kind,
            visible: false,
            undo,
            capture: Some(capture),
            statement: None,
        });
    }

    /// What the oldest outstanding message captures, if it is a capture.
    pub fn head_capture(&self) -> Option<Capture> {
        match self.queue.front() {
            Some(Expect::Reply { capture, .. }) => *capture,
            _ => None,
        }
    }

    /// Hides every response still to come after the current one, and drops
    /// the replies the proxy owed: the work they answer will be redone.
    pub fn hide_rest(&mut self) {
        let head = self.queue.pop_front();
        self.queue.retain(|e| matches!(e, Expect::Reply { .. }));
        for e in &mut self.queue {
            if let Expect::Reply { visible, .. } = e {
                *visible = false;
            }
        }
        if let Some(head) = head {
            self.queue.push_front(head);
        }
    }

    pub fn push_synthetic(&mut self, frame: Frame) {
        self.queue.push_back(Expect::Synthetic(frame));
    }

    /// COPY FROM STDIN started by Execute: the server ignores Sync until the
    /// copy ends, so the Sync already sent behind the Execute gets no answer.
    pub fn forget_next_sync(&mut self) {
        if let Some(i) = self.queue.iter().position(|e| {
            matches!(
                e,
                Expect::Reply {
                    kind: Kind::Sync,
                    ..
                }
            )
        }) {
            self.queue.remove(i);
        }
    }

    /// Whether the oldest outstanding message is an Execute.
    pub fn head_is_execute(&self) -> bool {
        matches!(
            self.queue.front(),
            Some(Expect::Reply {
                kind: Kind::Execute,
                ..
            })
        )
    }

    /// A synthetic reply that is due now: everything sent before it has been answered.
    pub fn pop_synthetic(&mut self) -> Option<Frame> {
        match self.queue.front() {
            Some(Expect::Synthetic(_)) => match self.queue.pop_front() {
                Some(Expect::Synthetic(frame)) => Some(frame),
                _ => unreachable!("front was synthetic"),
            },
            _ => None,
        }
    }

    /// Whether the client sees the responses now arriving.
    pub fn head_visible(&self) -> bool {
        match self.queue.front() {
            Some(Expect::Reply { visible, .. }) => *visible,
            _ => true,
        }
    }

    /// A response (not an error, not ReadyForQuery's bookkeeping) arrived:
    /// whether the client sees it.
    pub fn on_reply(&mut self, tag: u8) -> bool {
        let Some(Expect::Reply { kind, visible, .. }) = self.queue.front() else {
            return true;
        };
        let visible = *visible;
        if kind.completed_by(tag) {
            self.queue.pop_front();
        }
        visible
    }

    /// An ErrorResponse arrived. In the extended protocol the server now skips
    /// to the next Sync, so the messages it will not answer are dropped and
    /// their Parse bookkeeping returned for undoing.
    pub fn on_error(&mut self) -> (bool, Vec<ParseUndo>) {
        let mut undone = Vec::new();
        if let Some(Expect::Reply { kind, visible, .. }) = self.queue.front()
            && kind.ends_batch()
        {
            return (*visible, undone);
        }
        // The error is the client's when any message it skips is: only a
        // batch the proxy sent whole (an LSN question) fails unseen.
        let mut visible = None;
        while let Some(front) = self.queue.front() {
            if let Expect::Reply { kind, .. } = front
                && kind.ends_batch()
            {
                break;
            }
            if let Some(Expect::Reply {
                visible: seen,
                undo,
                ..
            }) = self.queue.pop_front()
            {
                *visible.get_or_insert(false) |= seen;
                undone.extend(undo);
            }
        }
        (visible.unwrap_or(true), undone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn undo(name: &str) -> ParseUndo {
        ParseUndo {
            global: name.as_bytes().to_vec(),
            client_name: None,
        }
    }

    #[test]
    fn inserted_parse_is_hidden_and_synthetic_reply_waits_its_turn() {
        let mut p = Pending::default();
        p.push(Kind::Bind, true);
        p.push_synthetic(parse_complete());
        p.push_parse(false, undo("g"));
        p.push(Kind::Execute, true);
        p.push(Kind::Sync, true);
        assert_eq!(p.pop_synthetic(), None);
        assert!(p.on_reply(BIND_COMPLETE));
        assert_eq!(p.pop_synthetic(), Some(parse_complete()));
        assert!(!p.on_reply(PARSE_COMPLETE));
        assert!(p.on_reply(DATA_ROW));
        assert!(p.on_reply(COMMAND_COMPLETE));
        assert!(p.on_reply(READY_FOR_QUERY));
        assert!(p.is_empty());
    }

    #[test]
    fn error_skips_to_sync_and_returns_undo() {
        let mut p = Pending::default();
        p.push_parse(true, undo("a"));
        p.push(Kind::Bind, true);
        p.push_synthetic(close_complete());
        p.push_parse(false, undo("b"));
        p.push(Kind::Execute, true);
        p.push(Kind::Sync, true);
        let (visible, undone) = p.on_error();
        assert!(visible);
        assert_eq!(undone, vec![undo("a"), undo("b")]);
        assert_eq!(p.pop_synthetic(), None);
        assert!(p.on_reply(READY_FOR_QUERY));
        assert!(p.is_empty());
    }

    #[test]
    fn a_failed_lsn_question_stays_the_proxys() {
        let mut p = Pending::default();
        p.push(Kind::Query, true);
        let capture = Capture::CommitLsn;
        p.push_capture(capture, Kind::Bind, Some(undo("_tp_commit_lsn")));
        p.push_capture(capture, Kind::Execute, None);
        p.push_capture(capture, Kind::Sync, None);
        assert!(p.on_reply(COMMAND_COMPLETE));
        assert!(p.on_reply(READY_FOR_QUERY));
        assert_eq!(p.head_capture(), Some(capture));
        assert_eq!(p.on_error(), (false, vec![undo("_tp_commit_lsn")]));
        assert!(!p.on_reply(READY_FOR_QUERY));
        assert!(p.is_empty());
    }

    #[test]
    fn errors_in_simple_queries_wait_for_ready() {
        let mut p = Pending::default();
        p.push(Kind::Query, false);
        p.push(Kind::Query, true);
        assert_eq!(p.on_error(), (false, vec![]));
        assert!(!p.on_reply(COMMAND_COMPLETE));
        assert!(!p.on_reply(READY_FOR_QUERY));
        assert_eq!(p.on_error(), (true, vec![]));
        assert!(p.on_reply(READY_FOR_QUERY));
        assert!(p.is_empty());
    }
}
