//! A read run on a lane (`pool::lane`), sharing a server connection with
//! other clients' reads: a one-statement autocommit read, from a session
//! that needs nothing of a connection but its parameters.

use tokio::sync::mpsc;

use super::unit::wait_while_paused;
use super::*;
use crate::pool::lane::{LaneEvent, LaneReply};
use crate::route::hint::Hint;

/// Answers a lane may queue for the session before it reads them.
const LANE_REPLIES: usize = 8;

enum Outcome {
    Answered,
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
        // A read alone has nobody to share with: a lane would only add
        // the hops to its task.
        let alone = self.shared.busy.load(std::sync::atomic::Ordering::Relaxed) == 0;
        if alone || self.shared.pools.pipeline_depth() < 2 || !self.may_share_a_connection() {
            return Ok(false);
        }
        wait_while_paused(self.shared.topology.clone()).await;
        let (destination, reason) = self.route_unit(&Intent::Read, hint);
        // A hinted read asked for a replica, whatever its freshness.
        let floor = (destination == Destination::Replica && hint.is_none())
            .then(|| self.consistency.floor())
            .flatten();
        let (node, addr, role) = {
            let topology = self.shared.topology.load();
            if destination == Destination::Primary && topology.writes_refused.is_some() {
                return Ok(false);
            }
            let candidates =
                self.shared
                    .picker
                    .candidates_with_floor(&topology, destination, floor);
            let Some(&id) = candidates.first() else {
                return Ok(false);
            };
            let node = topology.node(id);
            // Read-your-writes with no replica known past the session's
            // floor: the probe, and the wait, need a connection of its own.
            if floor.is_some() && node.role != Role::Replica {
                return Ok(false);
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
        let ticket = pool.submit_read(
            &self.params,
            query.clone(),
            tx.clone(),
            &self.shared.cancels,
        );
        let mut cancel_asked = false;
        let outcome = loop {
            let reply = tokio::select! {
                reply = rx.recv() => reply,
                _ = cancelled.notified(), if !cancel_asked => {
                    cancel_asked = true;
                    ticket.cancel();
                    continue;
                }
            };
            let Some(LaneReply { id, event }) = reply else {
                break Outcome::HandedBack;
            };
            if id != ticket.id {
                continue;
            }
            match event {
                LaneEvent::Data(bytes) => self.client.send_messages(&bytes).await?,
                LaneEvent::Done(bytes) => {
                    // A read outside a transaction block ends idle (a lane
                    // breaks, after this answer, on one that does not).
                    self.client.send_messages(&bytes).await?;
                    break Outcome::Answered;
                }
                LaneEvent::Redo => break Outcome::HandedBack,
                LaneEvent::Lost => break Outcome::Lost,
                LaneEvent::Cancelled => break Outcome::Cancelled,
            }
        };
        self.cancel.set_target(None);
        match outcome {
            Outcome::HandedBack if !cancel_asked => return Ok(false),
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
            Outcome::Answered => {
                self.count_routed(node, role, destination, reason);
                let took = started.elapsed();
                self.shared.metrics.unit_done(role, took);
                self.shared.metrics.read_pipelined();
                self.stats.transaction_done(took);
            }
        }
        // A simple query destroys the unnamed statement, wherever it ran.
        self.unnamed = None;
        Ok(true)
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
