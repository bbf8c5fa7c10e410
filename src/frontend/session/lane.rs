//! A read run on a lane (`pool::lane`), sharing a server connection with
//! other clients' reads: a one-statement autocommit read (a simple Query,
//! an unnamed Parse/Bind/Describe/Execute batch with its Sync, or a
//! Bind/Describe/Execute batch of a named statement with its Sync), from a
//! session that needs nothing of a connection but its parameters.

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::mpsc;

use super::unit::pause;
use super::*;
use crate::pool::lane::{LaneEvent, LaneReply};
use crate::route::hint::Hint;

/// Answers a lane may queue for the session before it reads them.
const LANE_REPLIES: usize = 8;

/// An extended batch bigger than this keeps the ordinary path.
const BATCH_LIMIT: usize = 64 * 1024;

enum Outcome {
    /// With the first message of the answer.
    Answered(Option<Frame>),
    HandedBack,
    /// Why, when known (see `LaneEvent::Lost`).
    Lost(Option<String>),
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
        let ran = self
            .on_lane(query.raw().clone(), hint, None)
            .await?
            .is_some();
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
        let Some(rest) = batch_len(self.client.buffered(), b"") else {
            return Ok(false);
        };
        let mut batch = BytesMut::with_capacity(parse.raw().len() + rest);
        batch.extend_from_slice(parse.raw());
        batch.extend_from_slice(&self.client.buffered()[..rest]);
        let Some(first) = self.on_lane(batch.freeze(), None, None).await? else {
            return Ok(false);
        };
        self.client.consume(rest);
        // PostgreSQL drops the unnamed statement before parsing the new
        // one: it exists now only if the Parse succeeded.
        if first.is_none_or(|first| first.tag() != backend::PARSE_COMPLETE) {
            self.unnamed = None;
        } else if self.same_unnamed(parse).is_none() {
            self.unnamed = Some(Unnamed {
                parse: Frame::build(fe::PARSE, |b| b.extend_from_slice(parse.body())),
                intent: Intent::Read,
            });
        }
        Ok(true)
    }

    /// A Bind of one of the client's named statements, a read, to the
    /// unnamed portal, whose batch (Binds, Describes and Executes of that
    /// statement and portal, then Sync) has already arrived whole: the
    /// batch runs on a lane under the statement's global name, the lane
    /// preparing it first on a connection that lacks it.
    pub(super) async fn bound_on_lane(
        &mut self,
        bind: &Frame,
        intent: &Intent,
    ) -> Result<bool, ClientError> {
        if *intent != Intent::Read {
            return Ok(false);
        }
        let decoded = Bind::decode(bind)?;
        let name = decoded.statement;
        let Some(statement) = self.statements.get(name).cloned() else {
            return Ok(false);
        };
        if !decoded.portal.is_empty() || statement.copies || self.outdated(&statement) {
            return Ok(false);
        }
        let Some(rest) = batch_len(self.client.buffered(), name) else {
            return Ok(false);
        };
        let global = &statement.global;
        let mut batch = BytesMut::with_capacity(bind.raw().len() + rest + 4 * global.len());
        put_renamed(&mut batch, bind.raw(), name, global);
        put_renamed(&mut batch, &self.client.buffered()[..rest], name, global);
        let used = Some(statement.clone());
        let Some(first) = self.on_lane(batch.freeze(), None, used).await? else {
            return Ok(false);
        };
        self.client.consume(rest);
        let refused = first
            .filter(|first| first.tag() == backend::ERROR_RESPONSE)
            .and_then(|error| ErrorFields::decode(&error).ok())
            .is_some_and(|fields| fields.code == "0A000");
        if refused {
            // As on a connection of its own (see `StaleStatements`).
            self.shared.stale_statements.retire(&statement);
        }
        Ok(true)
    }

    /// Runs `messages`, which use the client's `statement` if any, on a lane;
    /// `None` when not taken, else the answer's first message (`None` if
    /// the proxy answered).
    async fn on_lane(
        &mut self,
        messages: Bytes,
        hint: Option<Hint>,
        statement: Option<Arc<Statement>>,
    ) -> Result<Option<Option<Frame>>, ClientError> {
        // A read alone has nobody to share with: a lane would only add
        // the hops to its task.
        let alone = self.shared.busy.load(std::sync::atomic::Ordering::Relaxed) == 0;
        if alone || self.shared.pools.pipeline_depth() < 2 || !self.may_share_a_connection() {
            return Ok(None);
        }
        if let Some(pause) = pause(&self.shared.topology) {
            pause.await;
        }
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
        let cancels = &self.shared.cancels;
        let ticket = pool.submit_read(&self.params, messages, statement, tx.clone(), cancels);
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
                    Some(_) => Outcome::Lost(None),
                    None => Outcome::HandedBack,
                };
            };
            if id != ticket.id {
                continue;
            }
            if let LaneEvent::Data(bytes) | LaneEvent::Done(bytes) = &event
                && first.is_none()
            {
                first = frame::split_all(bytes).next();
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
                LaneEvent::Lost(why) => break Outcome::Lost(why),
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
            Outcome::Lost(why) => {
                let lost = RouteError::server_lost(addr, why);
                tracing::warn!(parent: &self.span, %node, error = %lost, "server connection lost under a pipelined read");
                self.client.send(&lost.to_frame(Severity::Error)).await?;
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

/// The length of the messages at the front of `buf` that complete a batch
/// of `statement` (empty: the unnamed one): Bind, Describe and Execute of
/// that statement and the unnamed portal only, up to and including Sync.
fn batch_len(buf: &[u8], statement: &[u8]) -> Option<usize> {
    let mut at = 0;
    loop {
        let (tag, total) = frame::peek_header(&buf[at..]).ok()??;
        if at + total > buf.len().min(BATCH_LIMIT) {
            return None;
        }
        let body = &buf[at + Frame::HEADER_LEN..at + total];
        let names = |kind: &[u8], name: &[u8]| {
            body.len() == kind.len() + name.len() + 1
                && body.starts_with(kind)
                && body[kind.len()..].starts_with(name)
        };
        let ours = match tag {
            fe::BIND => {
                body.first() == Some(&0)
                    && body[1..].starts_with(statement)
                    && body.get(1 + statement.len()) == Some(&0)
            }
            fe::DESCRIBE => names(b"S", statement) || names(b"P", b""),
            fe::EXECUTE => body.first() == Some(&0),
            fe::SYNC => return Some(at + total),
            _ => false,
        };
        if !ours {
            return None;
        }
        at += total;
    }
}

/// Appends `messages`, whole messages of a batch of the client's statement
/// `name` (see `batch_len`), naming the statement by its global name.
fn put_renamed(batch: &mut BytesMut, mut messages: &[u8], name: &[u8], global: &[u8]) {
    while let Ok(Some((tag, total))) = frame::peek_header(messages) {
        let (message, rest) = messages.split_at(total);
        let body = &message[Frame::HEADER_LEN..];
        // Both name the statement after one byte: Bind's empty portal
        // name, Describe's 'S'.
        if tag == fe::BIND || (tag == fe::DESCRIBE && body[0] == b'S') {
            let tail = &body[1 + name.len()..];
            let len = 4 + 1 + global.len() + tail.len();
            batch.put_u8(tag);
            batch.put_u32(u32::try_from(len).expect("within BATCH_LIMIT"));
            batch.put_u8(body[0]);
            batch.put_slice(global);
            batch.put_slice(tail);
        } else {
            batch.put_slice(message);
        }
        messages = rest;
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
        assert_eq!(batch_len(&whole, b""), Some(whole.len()));
        let more = [whole.clone(), fe::query("SELECT 1").raw().to_vec()].concat();
        assert_eq!(batch_len(&more, b""), Some(whole.len()));
        assert_eq!(batch_len(&whole[..whole.len() - 1], b""), None);
        let named = Named::encode(fe::DESCRIBE, Target::Statement, b"s1");
        let to_named = fe::bind_no_params(b"s1");
        assert_eq!(batch_len(&batch(&[to_named, fe::sync()]), b""), None);
        assert_eq!(
            batch_len(&batch(&[bind, named, execute, fe::sync()]), b""),
            None
        );
        let flush = Frame::build(fe::FLUSH, |_| {});
        assert_eq!(batch_len(&batch(&[flush, fe::sync()]), b""), None);
    }

    #[test]
    fn a_named_statements_batch_names_that_statement_only() {
        let describe_s1 = Named::encode(fe::DESCRIBE, Target::Statement, b"s1");
        let portal = Named::encode(fe::DESCRIBE, Target::Portal, b"");
        let (execute, sync) = (fe::execute_all(), fe::sync());
        let whole = batch(&[
            fe::bind_no_params(b"s1"),
            describe_s1.clone(),
            portal.clone(),
            execute.clone(),
            sync.clone(),
        ]);
        assert_eq!(batch_len(&whole, b"s1"), Some(whole.len()));
        assert_eq!(batch_len(&whole, b"s"), None);
        assert_eq!(batch_len(&whole, b""), None);
        let other = Named::encode(fe::DESCRIBE, Target::Statement, b"s2");
        let with_other = batch(&[other, execute.clone(), sync.clone()]);
        assert_eq!(batch_len(&with_other, b"s1"), None);
        let to_unnamed = batch(&[fe::bind_no_params(b""), sync.clone()]);
        assert_eq!(batch_len(&to_unnamed, b"s1"), None);
    }

    #[test]
    fn a_named_statements_batch_goes_out_under_the_global_name() {
        let global = b"_tp_0123456789abcdef0123456789abcdef";
        // No parameter formats, one parameter ("42"), no result formats.
        let params = b"\0\0\0\x01\0\0\0\x0242\0\0";
        let bind = Frame::build(fe::BIND, |b| {
            b.put_slice(&[b"\0s1\0", &params[..]].concat())
        });
        let messages = batch(&[
            bind,
            Named::encode(fe::DESCRIBE, Target::Statement, b"s1"),
            Named::encode(fe::DESCRIBE, Target::Portal, b""),
            fe::execute_all(),
            fe::sync(),
        ]);
        let mut renamed = BytesMut::new();
        put_renamed(&mut renamed, &messages, b"s1", global);
        let frames: Vec<Frame> = frame::split_all(&renamed.freeze()).collect();
        let tags: Vec<u8> = frames.iter().map(Frame::tag).collect();
        assert_eq!(
            tags,
            [fe::BIND, fe::DESCRIBE, fe::DESCRIBE, fe::EXECUTE, fe::SYNC]
        );
        let bind = Bind::decode(&frames[0]).unwrap();
        assert_eq!((bind.portal, bind.statement), (&b""[..], &global[..]));
        let body = [&b"\0"[..], global, b"\0", params].concat();
        assert_eq!(frames[0].body(), &body[..]);
        let describe = Named::decode(&frames[1]).unwrap();
        assert_eq!(
            (describe.target, describe.name),
            (Target::Statement, &global[..])
        );
        assert_eq!(Named::decode(&frames[2]).unwrap().target, Target::Portal);
    }
}
