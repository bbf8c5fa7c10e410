//! A read run on a lane (`pool::lane`), sharing a server connection with
//! other clients' reads: a one-statement autocommit read (a simple Query,
//! or an unnamed Parse/Bind/Describe/Execute batch with its Sync), from a
//! session that needs nothing of a connection but its parameters.

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use super::unit::wait_while_paused;
use super::*;
use crate::pool::lane::{LaneEvent, LaneReply};
use crate::route::hint::Hint;

/// Answers a lane may queue for the session before it reads them.
const LANE_REPLIES: usize = 8;

/// An extended batch bigger than this keeps the ordinary path.
const BATCH_LIMIT: usize = 64 * 1024;

enum Outcome {
    /// With the tag of the first message of the answer.
    Answered(Option<u8>),
    HandedBack,
    Lost,
    Cancelled,
}

impl Session {
    /// Runs `query` on a lane when pipelining is on and the session allows
    /// it; `false` when not taken (or handed back unanswered): the caller
    /// runs it on a connection of its own.
    pub(super) async fn read_on_lane(
        &mut self,
        query: &Frame,
        hint: Option<Hint>,
    ) -> Result<bool, ClientError> {
        let ran = self.on_lane(query.raw().clone(), hint).await?.is_some();
        if ran {
            // A simple query destroys the unnamed statement, wherever it ran.
            self.unnamed = None;
        }
        Ok(ran)
    }

    /// A Parse of the unnamed statement, a read, whose batch (Binds, Describes and
    /// Executes of the unnamed statement and portal, then Sync) has
    /// already arrived whole: the batch runs on a lane, as one read.
    pub(super) async fn batch_on_lane(
        &mut self,
        parse: &Frame,
        intent: &Intent,
    ) -> Result<bool, ClientError> {
        if *intent != Intent::Read || !Parse::decode(parse)?.name.is_empty() {
            return Ok(false);
        }
        let Some(rest) = unnamed_batch(self.client.buffered()) else {
            return Ok(false);
        };
        let mut batch = BytesMut::with_capacity(parse.raw().len() + rest);
        batch.extend_from_slice(parse.raw());
        batch.extend_from_slice(&self.client.buffered()[..rest]);
        let Some(first) = self.on_lane(batch.freeze(), None).await? else {
            return Ok(false);
        };
        self.client.consume(rest);
        // PostgreSQL drops the unnamed statement before parsing the new
        // one: it exists now only if the Parse succeeded.
        if first != Some(backend::PARSE_COMPLETE) {
            self.unnamed = None;
        } else if self.same_unnamed(parse).is_none() {
            self.unnamed = Some(Unnamed {
                parse: Frame::build(fe::PARSE, |b| b.extend_from_slice(parse.body())),
                intent: Intent::Read,
            });
        }
        Ok(true)
    }

    /// Runs `messages` on a lane; `None` when not taken, else the tag of
    /// the answer's first message (`None` if the proxy answered).
    async fn on_lane(
        &mut self,
        messages: Bytes,
        hint: Option<Hint>,
    ) -> Result<Option<Option<u8>>, ClientError> {
        // A read alone has nobody to share with: a lane would only add
        // the hops to its task.
        let alone = self.shared.busy.load(std::sync::atomic::Ordering::Relaxed) == 0;
        if alone || self.shared.pools.pipeline_depth() < 2 || !self.may_share_a_connection() {
            return Ok(None);
        }
        wait_while_paused(&self.shared.topology).await;
        let (destination, reason) = self.route_unit(&Intent::Read, hint);
        // A hinted read asked for a replica, whatever its freshness.
        let floor = (destination == Destination::Replica && hint.is_none())
            .then(|| self.consistency.floor())
            .flatten();
        let (node, addr, role) = {
            let topology = self.shared.topology.load();
            if destination == Destination::Primary && topology.writes_refused.is_some() {
                return Ok(None);
            }
            let candidates =
                self.shared
                    .picker
                    .candidates_with_floor(&topology, destination, floor);
            let Some(&id) = candidates.first() else {
                return Ok(None);
            };
            let node = topology.node(id);
            // Read-your-writes with no replica known past the session's
            // floor: the probe, and the wait, need a connection of its own.
            if floor.is_some() && node.role != Role::Replica {
                return Ok(None);
            }
            (id, node.addr, node.role)
        };
        let pool = self.pool_for(node, addr);
        if floor.is_some() {
            self.shared.metrics.ryw_checked(false);
        }
        let _busy = Busy::new(&self.shared);
        let started = Instant::now();
        let cancelled = self.cancel.set_sharing();
        let (tx, rx) = self
            .lane_replies
            .get_or_insert_with(|| Box::new(mpsc::channel(LANE_REPLIES)))
            .as_mut();
        let ticket = pool.submit_read(&self.params, messages, tx.clone(), &self.shared.cancels);
        let mut cancel_asked = false;
        let mut first = None;
        let outcome = loop {
            let reply = tokio::select! {
                // Answers first: those sent before the lane ended are here.
                biased;
                reply = rx.recv() => reply,
                _ = cancelled.notified(), if !cancel_asked => {
                    cancel_asked = true;
                    ticket.cancel();
                    continue;
                }
                _ = ticket.lane_gone() => None,
            };
            let Some(LaneReply { id, event }) = reply else {
                break match first {
                    Some(_) => Outcome::Lost,
                    None => Outcome::HandedBack,
                };
            };
            if id != ticket.id {
                continue;
            }
            if let LaneEvent::Data(bytes) | LaneEvent::Done(bytes) = &event {
                first = first.or(bytes.first().copied());
            }
            match event {
                LaneEvent::Data(bytes) => self.client.send_messages(&bytes).await?,
                LaneEvent::Done(bytes) => {
                    // A read outside a transaction block ends idle (a lane
                    // breaks, after this answer, on one that does not).
                    self.client.send_messages(&bytes).await?;
                    break Outcome::Answered(first);
                }
                LaneEvent::Redo => break Outcome::HandedBack,
                LaneEvent::Lost => break Outcome::Lost,
                LaneEvent::Cancelled => break Outcome::Cancelled,
            }
        };
        self.cancel.set_target(None);
        match outcome {
            Outcome::HandedBack if !cancel_asked => return Ok(None),
            // The cancel came before the read ran: it is the one cancelled,
            // as when a client waits for a connection.
            Outcome::HandedBack | Outcome::Cancelled => {
                let error = RouteError::Cancelled.to_frame(Severity::Error);
                self.client.send(&error).await?;
                self.ready(TxStatus::Idle).await?;
            }
            Outcome::Lost => {
                let error = backend::error_response(
                    Severity::Error,
                    "08006",
                    "the server connection was lost while answering",
                );
                self.client.send(&error).await?;
                self.ready(TxStatus::Idle).await?;
            }
            Outcome::Answered(first) => {
                self.count_routed(node, role, destination, reason);
                let took = started.elapsed();
                self.shared.metrics.unit_done(role, took);
                self.shared.metrics.read_pipelined();
                self.stats.transaction_done(took);
                return Ok(Some(first));
            }
        }
        Ok(Some(None))
    }

    /// Nothing about the session needs a server connection of its own: in
    /// transaction mode, between transactions, not pinned, no parameter
    /// change, no read to check against the session's own history, no
    /// query timeout to enforce on a connection.
    fn may_share_a_connection(&self) -> bool {
        self.mode() == PoolMode::Transaction
            && self.server.is_none()
            && self.pinned.is_none()
            && self.is_between_transactions()
            && self.param_change.is_none()
            && self.force_primary.is_none()
            && self.prefer_replica.is_none()
            && self.limits.query.is_none()
            && !self.consistency.tracks_reads()
    }
}

/// The length of the messages at the front of `buf` that complete an
/// unnamed statement's batch: Bind, Describe and Execute of the unnamed
/// statement and portal only, up to and including Sync.
fn unnamed_batch(buf: &[u8]) -> Option<usize> {
    let mut at = 0;
    loop {
        let (tag, total) = frame::peek_header(&buf[at..]).ok()??;
        if at + total > buf.len().min(BATCH_LIMIT) {
            return None;
        }
        let body = &buf[at + Frame::HEADER_LEN..at + total];
        let unnamed = match tag {
            fe::BIND => body.starts_with(&[0, 0]),
            fe::DESCRIBE => matches!(body, [b'S' | b'P', 0]),
            fe::EXECUTE => body.first() == Some(&0),
            fe::SYNC => return Some(at + total),
            _ => false,
        };
        if !unnamed {
            return None;
        }
        at += total;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(frames: &[Frame]) -> Vec<u8> {
        frames.iter().flat_map(|f| f.raw().to_vec()).collect()
    }

    #[test]
    fn only_a_whole_batch_of_the_unnamed_statement_is_taken() {
        let bind = fe::bind_no_params(b"");
        let describe = Named::encode(fe::DESCRIBE, Target::Portal, b"");
        let execute = fe::execute_all();
        let whole = batch(&[bind.clone(), describe.clone(), execute.clone(), fe::sync()]);
        assert_eq!(unnamed_batch(&whole), Some(whole.len()));
        let more = [whole.clone(), fe::query("SELECT 1").raw().to_vec()].concat();
        assert_eq!(unnamed_batch(&more), Some(whole.len()));
        assert_eq!(unnamed_batch(&whole[..whole.len() - 1]), None);
        let named = Named::encode(fe::DESCRIBE, Target::Statement, b"s1");
        let to_named = fe::bind_no_params(b"s1");
        assert_eq!(unnamed_batch(&batch(&[to_named, fe::sync()])), None);
        assert_eq!(
            unnamed_batch(&batch(&[bind, named, execute, fe::sync()])),
            None
        );
        let flush = Frame::build(fe::FLUSH, |_| {});
        assert_eq!(unnamed_batch(&batch(&[flush, fe::sync()])), None);
    }
}
