//! Where a unit of work (a transaction, or a statement outside one) runs:
//! the destination, the node, and what the proxy pipelines around it.

use super::*;
use crate::pool::lsn_query::{COMMIT_LSN, REPLAY_LSN};
use crate::pool::server::{Prepared, Unavailable};

impl Session {
    /// Pipelined right behind the client's statement, so the client waits
    /// for nothing: after a write on the primary, its commit LSN; after a
    /// monotonic read on a replica, how far that replica had replayed.
    pub(super) async fn capture_after_unit(
        &mut self,
        wrote: bool,
        copies: bool,
    ) -> Result<(), ClientError> {
        let Some(role) = self.server.as_ref().map(|s| s.role) else {
            return Ok(());
        };
        let capture = match role {
            Role::Primary if wrote && !self.report_lsn && !self.consistency.reads_own_writes() => {
                self.consistency.last_write_unknown = true;
                return Ok(());
            }
            Role::Primary if wrote => Capture::CommitLsn,
            Role::Replica if self.consistency.tracks_reads() => Capture::Observed,
            _ => return Ok(()),
        };
        // Only a capture that will be made may hold the client's
        // ReadyForQuery (a COPY FROM sent to a replica fails, and captures
        // nothing).
        if copies {
            self.capture_when_ready = Some(wrote);
            return Ok(());
        }
        self.ask(capture).await;
        Ok(())
    }
    /// Sends the attached server the question `capture` wants answered,
    /// behind whatever was sent before it.
    async fn ask(&mut self, capture: Capture) {
        let server = self.server.as_mut().expect("attached");
        if capture != Capture::CommitLsn {
            // How far a replica has replayed: one FunctionCall.
            match server.conn.queue(&REPLAY_LSN).await {
                Ok(()) => self.pending.push_capture(capture, Kind::FunctionCall, None),
                Err(e) => tracing::debug!(error = %e, "write to server failed"),
            }
            return;
        }
        let query = &*COMMIT_LSN;
        // A failure before the Execute leaves the statement unknown on the
        // server: it is prepared again (after a Close) the next time.
        let undo = || {
            Some(ParseUndo {
                global: query.name.to_vec(),
                client_name: None,
            })
        };
        match server.conn.queue_lsn_query(query).await {
            Ok(Prepared::Held) => {}
            Ok(Prepared::Now { evicted }) => {
                self.pending.push_capture(capture, Kind::Close, None);
                if evicted {
                    self.shared.metrics.prepared_evicted();
                    self.pending.push_capture(capture, Kind::Close, None);
                }
                self.pending.push_capture(capture, Kind::Parse, undo());
            }
            Err(e) => {
                tracing::debug!(error = %e, "write to server failed");
                return;
            }
        }
        self.pending.push_capture(capture, Kind::Bind, undo());
        for kind in [Kind::Execute, Kind::Sync] {
            self.pending.push_capture(capture, kind, None);
        }
    }
    /// Picks a server for a new unit of work and attaches it. On failure the
    /// client has been sent the error and `false` is returned.
    pub(super) async fn start_unit(
        &mut self,
        intent: &Intent,
        hint: Option<crate::route::hint::Hint>,
    ) -> Result<bool, ClientError> {
        if let Some(pause) = pause(&self.shared.topology)
            && unless_client_leaves(&mut self.client, pause)
                .await
                .is_none()
        {
            return Err(ClientError::Gone);
        }
        let (destination, reason) = self.route_unit(intent, hint);
        // A hinted read asked for a replica, whatever its freshness.
        let floor = (destination == Destination::Replica && hint.is_none())
            .then(|| self.consistency.floor())
            .flatten();
        if let Err(e) = self.attach(destination, floor).await {
            if matches!(e, RouteError::ClientGone) {
                return Err(ClientError::Gone);
            }
            tracing::debug!(error = %e, "no server for statement");
            self.client.send(&e.to_frame(Severity::Error)).await?;
            if self.held_begin.is_some() {
                self.client_status = TxStatus::Failed;
            }
            return Ok(false);
        }
        self.count_unit(destination, reason);
        self.sync_params().await?;
        self.probe_if_unconfirmed(floor).await?;
        let held = self.held_begin.take();
        if let Some(held) = &held {
            self.send_to_server(&held.frame).await?;
            self.pending.push(Kind::Query, false);
        }
        let server = self.server.as_mut().expect("attached");
        // Only reads are replayed: a write may have run before its connection died.
        if destination == Destination::Replica && hint.is_none() {
            server.replay = Some(Replay {
                frames: Vec::new(),
                bytes: 0,
                held_begin: held,
            });
        }
        Ok(true)
    }
    /// Where a new unit of work goes, and why.
    pub(super) fn route_unit(
        &mut self,
        intent: &Intent,
        hint: Option<crate::route::hint::Hint>,
    ) -> (Destination, RouteReason) {
        let (destination, reason) = match self.mode() {
            PoolMode::Session => (Destination::Primary, RouteReason::SessionMode),
            PoolMode::Transaction => destination(
                intent,
                hint,
                self.route,
                self.held_begin.as_ref().map(|h| h.read_only),
            ),
        };
        let forced = self.force_primary.take();
        if destination == Destination::Replica {
            if let Some(fallback) = forced {
                return (Destination::Primary, RouteReason::Fallback(fallback));
            } else if self.consistency.floor_unknown() {
                return (
                    Destination::Primary,
                    RouteReason::Fallback(Fallback::UnknownLsn),
                );
            } else if self.consistency.mode == ConsistencyMode::Strong || serializable(&self.params)
            {
                return (Destination::Primary, RouteReason::Strong);
            }
        }
        (destination, reason)
    }
    /// Counts the unit just attached and starts its clock.
    fn count_unit(&mut self, destination: Destination, reason: RouteReason) {
        let Some(server) = &self.server else {
            return;
        };
        self.count_routed(server.conn.node, server.role, destination, reason);
        self.unit_started = Some(std::time::Instant::now());
    }
    /// A read meant for a replica that landed on the primary is a fallback,
    /// whatever the reason it was a read.
    pub(super) fn count_routed(
        &self,
        node: NodeId,
        role: Role,
        destination: Destination,
        mut reason: RouteReason,
    ) {
        if destination == Destination::Replica && role == Role::Primary {
            let lagging = self
                .shared
                .topology
                .load()
                .usable_replicas()
                .any(|n| n.lagging);
            reason = RouteReason::Fallback(if lagging {
                Fallback::Lag
            } else {
                Fallback::NoReplica
            });
        }
        self.shared.metrics.unit_routed(node, role, reason);
        if matches!(
            reason,
            RouteReason::Read | RouteReason::Strong | RouteReason::Fallback(_)
        ) {
            self.shared
                .metrics
                .read_served(self.consistency.mode, role == Role::Primary);
        }
    }
    /// Attaches a server for `destination`. For reads with a `floor`, the
    /// replicas the topology already shows at or past it come first; when
    /// none does, replicas are still tried (the topology's view is one poll
    /// old) and `probe_if_unconfirmed` checks the one attached.
    pub(super) async fn attach(
        &mut self,
        destination: Destination,
        floor: Option<Lsn>,
    ) -> Result<(), RouteError> {
        let candidates: Vec<(NodeId, std::net::SocketAddr, Role)> = {
            let topology = self.shared.topology.load();
            if destination == Destination::Primary
                && let Some(why) = &topology.writes_refused
            {
                return Err(RouteError::WritesRefused(why.clone()));
            }
            let picker = &self.shared.picker;
            let sticky = self.consistency.sticky;
            let monotonic = self.consistency.mode == ConsistencyMode::Monotonic;
            let pick = |floor| match (destination, monotonic) {
                (Destination::Replica, true) => picker.sticky_candidates(&topology, sticky, floor),
                _ => picker.candidates_with_floor(&topology, destination, floor),
            };
            let mut ids = pick(floor);
            let confirmed = ids
                .first()
                .is_some_and(|&id| topology.node(id).role == Role::Replica);
            if floor.is_some() && !confirmed {
                // Unconfirmed: the replica known to have replayed most (at
                // the last poll, or by a session since) is the likeliest to
                // have reached the floor by now.
                ids = pick(None);
                ids.sort_by_key(|&id| {
                    (
                        topology.node(id).role != Role::Replica,
                        std::cmp::Reverse(topology.replayed(id)),
                    )
                });
            }
            if let Some(preferred) = self.prefer_replica.take()
                && let Some(i) = ids.iter().position(|&id| id == preferred)
            {
                ids[..=i].rotate_right(1);
            }
            ids.into_iter()
                .map(|id| {
                    let node = topology.node(id);
                    (id, node.addr, node.role)
                })
                .collect()
        };
        let mut last_error = match destination {
            Destination::Primary => RouteError::NoPrimary,
            Destination::Replica => RouteError::NoServer,
        };
        for (node, addr, role) in candidates {
            let pool = self.pool_for(node, addr);
            // Listed as waiting only when the pool has no connection at hand.
            // Boxed: deadpool's checkout is a future of over a kilobyte,
            // which would otherwise be part of every statement's future,
            // moved on every event whether it checks out or not.
            let mut checkout = Box::pin(pool.checkout_timed());
            let (checkout, waited) = match futures_util::FutureExt::now_or_never(&mut checkout) {
                Some(done) => done,
                None => {
                    let cancelled = self.cancel.set_waiting();
                    let wait = async {
                        tokio::select! {
                            done = &mut checkout => Some(done),
                            _ = cancelled.notified() => None,
                        }
                    };
                    match unless_client_leaves(&mut self.client, wait).await {
                        Some(Some(done)) => done,
                        Some(None) => {
                            self.cancel.set_target(None);
                            return Err(RouteError::Cancelled);
                        }
                        None => {
                            self.cancel.set_target(None);
                            return Err(RouteError::ClientGone);
                        }
                    }
                }
            };
            self.stats.waited(waited);
            match checkout {
                Ok(conn) => {
                    // False when a cancel came as the connection did: the
                    // connection goes back unused.
                    if !self.cancel.attach((conn.addr, conn.key)) {
                        return Err(RouteError::Cancelled);
                    }
                    self.server = Some(Attached::new(conn, role, &self.shared));
                    return Ok(());
                }
                Err(CheckoutError::Connect { addr, source }) => {
                    let unavailable = source.unavailable();
                    if unavailable == Some(Unavailable::Down) {
                        self.shared.topology.report_unreachable(node);
                    }
                    last_error = CheckoutError::Connect { addr, source }.into();
                    if unavailable.is_none() {
                        break;
                    }
                }
                Err(e) => {
                    last_error = e.into();
                    break;
                }
            }
        }
        self.cancel.set_target(None);
        Err(last_error)
    }
    /// When the attached replica is not yet known to have replayed `floor`,
    /// asks it first, in the same flight as the read: if it is behind, the
    /// read's answer is hidden and the read redone (see `on_capture`).
    pub(super) async fn probe_if_unconfirmed(
        &mut self,
        floor: Option<Lsn>,
    ) -> Result<(), ClientError> {
        let (Some(floor), Some(server)) = (floor, self.server.as_ref()) else {
            return Ok(());
        };
        if server.role != Role::Replica {
            return Ok(());
        }
        let known = (self.shared.topology.load()).serves_reads_at(server.conn.node, Some(floor));
        self.shared.metrics.ryw_checked(!known);
        if known {
            return Ok(());
        }
        self.ask(Capture::ReplayFloor(floor)).await;
        Ok(())
    }

    pub(super) fn pool_for(
        &mut self,
        node: NodeId,
        addr: std::net::SocketAddr,
    ) -> crate::pool::registry::PoolHandle {
        if self.pools.len() <= node.0 {
            self.pools.resize(node.0 + 1, None);
        }
        self.pools[node.0]
            .get_or_insert_with(|| {
                let key = PoolKey {
                    node,
                    user: self.user.name.clone(),
                    database: self.database.clone(),
                };
                self.shared.pools.handle(&key, addr, &self.user.password)
            })
            .clone()
    }
}

/// Waits for `wait` unless the client's connection closes first (`None`).
/// A statement held back (a full pool, up to `checkout_timeout`; a
/// switchover's pause) must not run once its client has gone: the client
/// has seen its connection fail and may be retrying the write elsewhere.
/// The socket is read once to see it close; what else the client sends
/// meanwhile stays buffered for after the wait. A client that sent more
/// (a Terminate after its statement, say) is not watched further: its
/// statement runs, as PostgreSQL runs every message it has received.
async fn unless_client_leaves<T>(
    client: &mut ClientConn,
    wait: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::pin!(wait);
    let mut watching = true;
    loop {
        tokio::select! {
            biased;
            done = &mut wait => return Some(done),
            read = client.fill(false), if watching => match read {
                Ok(0) | Err(_) => return None,
                Ok(_) => watching = false,
            },
        }
    }
}

/// The wait that holds a new unit of work while a switchover pauses
/// traffic (the client sees a pause, not an error; the pause carries its
/// own deadline), or `None`: the hot path, with no subscription to
/// topology changes and only a pointer (the wait is boxed) for every
/// statement's future to carry.
pub(super) fn pause(
    topology: &crate::topology::SharedTopology,
) -> Option<std::pin::Pin<Box<impl std::future::Future<Output = ()> + use<>>>> {
    let paused = topology.load().paused_until.is_some();
    paused.then(|| Box::pin(wait_out_pause(topology.clone())))
}

async fn wait_out_pause(topology: crate::topology::SharedTopology) {
    loop {
        let changed = topology.changed();
        let Some(until) = topology.load().paused_until else {
            return;
        };
        let until = tokio::time::Instant::from_std(until);
        if tokio::time::Instant::now() >= until {
            return;
        }
        tokio::select! {
            _ = changed => {}
            _ = tokio::time::sleep_until(until) => return,
        }
    }
}
