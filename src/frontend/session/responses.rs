//! What comes back from the server: streamed to the client, matched to the
//! messages it answers, or read by the proxy itself (captures, probes); and
//! what happens when the server goes away.

use super::*;

/// How often a read waiting for its replica to replay its floor asks that
/// replica itself. Between asks it waits for news: every other session's
/// probe lands in the topology's replay hints, and under load such news
/// comes first (the monitor's polls are seen at the next wake-up). Each
/// ask is a round trip to a replica whose CPU the reads need: asked back
/// to back for the first millisecond, as before, write-then-read `-c 8`
/// here ran 0.55 asks a transaction; waiting for news, 0.2, and the waits
/// ended as soon (48% within 0.5 ms and 80% within 1 ms, against 43% and
/// 82%). The timer rounds the pause up to its millisecond tick.
const REPLAY_ASK_PAUSE: std::time::Duration = std::time::Duration::from_millis(1);

impl Session {
    pub(super) async fn emit_synthetic(&mut self) -> Result<(), ClientError> {
        while let Some(frame) = self.pending.pop_synthetic() {
            if let Some(server) = &mut self.server {
                // The client has seen part of the answer: too late to replay.
                server.replay = None;
            }
            self.client.send(&frame).await?;
        }
        Ok(())
    }
    /// Handles everything the server has sent so far. DataRow and CopyData,
    /// the bulk of any result, pass through as raw bytes, even before a whole
    /// message has arrived, so a huge row is never buffered whole.
    pub(super) async fn pump_server(&mut self) -> Result<(), ClientError> {
        loop {
            let Some(server) = self.server.as_mut() else {
                return Ok(());
            };
            let buf = &mut server.conn.read_buf;
            if self.passthrough > 0 {
                let n = self.passthrough.min(buf.len());
                if n == 0 {
                    return Ok(());
                }
                let chunk = buf.split_to(n);
                self.passthrough -= n;
                if self.passthrough_visible {
                    self.client.send_bytes(&chunk).await?;
                }
                continue;
            }
            let Some((tag, total)) = frame::peek_header(buf).map_err(lost_protocol)? else {
                return Ok(());
            };
            if (tag == backend::DATA_ROW || tag == fe::COPY_DATA)
                && self.pending.head_capture().is_none()
            {
                self.emit_synthetic().await?;
                self.passthrough = total;
                self.passthrough_visible = self.pending.head_visible();
                if self.passthrough_visible {
                    self.answered();
                }
                continue;
            }
            let Some(frame) = frame::try_split(buf, usize::MAX).map_err(lost_protocol)? else {
                return Ok(());
            };
            self.on_server_message(frame).await?;
            // A batch the client ended with Flush, not Sync (asyncpg
            // prepares that way) gets no ReadyForQuery: its stale read is
            // redone once the last of its hidden replies is in.
            if self.stale_read.is_some() && self.pending.is_empty() && self.unsynced {
                self.redo_stale_read().await?;
            }
        }
    }
    pub(super) async fn on_server_message(&mut self, frame: Frame) -> Result<(), ClientError> {
        self.emit_synthetic().await?;
        match frame.tag() {
            // ParameterStatus goes through even for statements the proxy
            // inserted: after them the client's view matches the server's.
            backend::PARAMETER_STATUS | b'A' => self.client.send(&frame).await?,
            // A notice belongs to the statement being answered: one the
            // proxy inserted (a SET applying the client's settings on this
            // connection, an LSN capture) is the proxy's business, and the
            // client would hear it again on every connection it moves to.
            backend::NOTICE_RESPONSE => {
                if self.pending.head_visible() {
                    self.client.send(&frame).await?
                }
            }
            backend::DATA_ROW | backend::FUNCTION_CALL_RESPONSE
                if self.pending.head_capture().is_some() =>
            {
                let capture = self.pending.head_capture().expect("checked");
                self.pending.on_reply(frame.tag());
                match (crate::pool::lsn_query::lsn_value(&frame), capture) {
                    (Some(lsn), _) => self.on_capture(capture, lsn).await?,
                    (None, Capture::ReplayFloor(floor)) => {
                        // NULL: the node has not been in recovery since it
                        // started (restarted as a primary behind the
                        // monitor's back). It has shown no floor, and the
                        // topology is out of date. (A promoted replica
                        // answers with where its recovery ended: behind.)
                        tracing::warn!(parent: &self.span, "a replica answered the probe as a primary: refreshing the topology");
                        self.shared.topology.request_refresh();
                        self.treat_read_as_stale(floor);
                    }
                    (None, _) => {}
                }
            }
            backend::ERROR_RESPONSE if backend::is_fatal(frame.raw()) => {
                // The server is closing this connection, not (in transaction
                // mode) the client's session: the client hears about it from
                // `on_server_lost`, as an error it can carry on after.
                if let Some(server) = &mut self.server {
                    server.fatal = Some(frame);
                }
            }
            backend::ERROR_RESPONSE => {
                if self.pending.head_visible() {
                    self.param_change = None;
                }
                let used = self.pending.head_statement().cloned();
                let probe_floor = match self.pending.head_capture() {
                    Some(Capture::ReplayFloor(floor)) => Some(floor),
                    _ => None,
                };
                let (visible, undone) = self.pending.on_error();
                // A read found stale is redone from its first message: what
                // it failed with on the stale replica (a table not there
                // yet) is not the client's.
                let visible = visible && self.stale_read.is_none();
                self.undo_parses(undone);
                if self.pending.is_empty() && self.unsynced && self.stale_read.is_none() {
                    // The error answers an extended message whose Sync the
                    // client has not sent yet: the server ignores everything
                    // up to that Sync, so the proxy must not expect answers
                    // to what comes before it (they would never arrive and
                    // the session would wait for them forever).
                    self.skip_to_sync = true;
                }
                let fields = ErrorFields::decode(&frame).ok();
                if let Some(statement) = used
                    && fields.as_ref().is_some_and(|f| f.code == "0A000")
                {
                    // "cached plan must not change result type": this copy
                    // is dead for good; the client's next Parse of the text
                    // must not come back to it.
                    self.shared.stale_statements.retire(&statement);
                }
                if !visible && let Some(server) = &mut self.server {
                    server.settings_unknown = true;
                    // The client's cancel met a statement the proxy put in
                    // front of the client's own, which the server runs next:
                    // that one is what the client wants cancelled.
                    let cancel_missed =
                        !self.query_cancelled && fields.as_ref().is_some_and(|f| f.code == "57014");
                    if cancel_missed {
                        let (addr, key) = (server.conn.addr, server.conn.key);
                        self.shared.cancels.send_cancel(addr, key).await;
                    }
                }
                // A replica that could not say how far it has replayed has
                // not shown the read's floor: the read behind the question
                // is treated as stale. A cancel that met the question goes
                // on to the client's read (above), which must stay visible.
                if let Some(floor) = probe_floor
                    && fields.as_ref().is_none_or(|f| f.code != "57014")
                {
                    self.treat_read_as_stale(floor);
                }
                if let Some(fields) = &fields
                    && fields.code == "25006"
                    && self
                        .server
                        .as_ref()
                        .is_some_and(|s| s.role == Role::Primary)
                {
                    // Read-only transaction on the node believed primary: it
                    // was demoted. Never write there again; look now.
                    tracing::warn!(
                        parent: &self.span,
                        "the primary refused a write as read-only: refreshing the topology"
                    );
                    self.shared.topology.request_refresh();
                }
                if visible {
                    self.answered();
                    self.client.send(&frame).await?;
                } else if let Some(fields) = fields {
                    tracing::debug!(code = %fields.code, message = %fields.message, "error from a statement the proxy inserted");
                }
            }
            backend::READY_FOR_QUERY => {
                let status = TxStatus::decode(&frame).map_err(lost_protocol)?;
                if let Some(server) = &mut self.server {
                    server.status = status;
                }
                if self.pending.on_reply(backend::READY_FOR_QUERY) {
                    self.answered();
                    self.client_status = status;
                    let learns_commit_lsn = self.pending.head_capture() == Some(Capture::CommitLsn)
                        || (self.pending.is_empty() && self.capture_when_ready == Some(true));
                    if learns_commit_lsn {
                        self.held_ready = Some(frame);
                    } else {
                        self.client.send(&frame).await?;
                    }
                    self.settle_param_changes(status).await?;
                } else if self.pending.head_capture() != Some(Capture::CommitLsn) {
                    self.release_held_ready().await?;
                }
                self.emit_synthetic().await?;
                if self.stale_read.is_some() && self.pending.is_empty() {
                    return self.redo_stale_read().await;
                }
                if self.pending.is_empty()
                    && let Some(wrote) = self.capture_when_ready.take()
                {
                    self.capture_after_unit(wrote, false).await?;
                }
                self.release_if_done();
            }
            backend::COPY_IN_RESPONSE if self.pending.head_is_execute() => {
                // The client's next Sync, after CopyDone, is the one that answers.
                self.pending.forget_next_sync();
                self.unsynced = true;
                self.pending.on_reply(backend::COPY_IN_RESPONSE);
                self.answered();
                self.client.send(&frame).await?;
            }
            tag => {
                if self.pending.on_reply(tag) {
                    if tag == backend::COMMAND_COMPLETE {
                        self.last_command = Some(frame.body().to_vec());
                    }
                    self.answered();
                    self.client.send(&frame).await?;
                }
            }
        }
        Ok(())
    }
    /// The client has seen part of the answer: the unit can no longer be
    /// replayed elsewhere.
    pub(super) fn answered(&mut self) {
        if let Some(server) = &mut self.server {
            server.replay = None;
        }
    }
    pub(super) async fn on_capture(
        &mut self,
        capture: Capture,
        lsn: Lsn,
    ) -> Result<(), ClientError> {
        if let (Capture::ReplayFloor(_) | Capture::Observed, Some(server)) = (capture, &self.server)
        {
            self.shared
                .topology
                .load()
                .seen
                .record(server.conn.node, lsn);
        }
        match capture {
            Capture::CommitLsn => {
                self.consistency.record_write(lsn);
                if self.report_lsn {
                    let token = lsn.to_string();
                    self.client
                        .send(&backend::parameter_status("tidepool.lsn", &token))
                        .await?;
                }
            }
            Capture::ReplayFloor(floor) if lsn < floor => {
                tracing::debug!(%lsn, %floor, "replica behind the session's floor: redoing the read");
                self.treat_read_as_stale(floor);
            }
            Capture::ReplayFloor(_) => {}
            Capture::Observed => {
                if let Some(server) = &self.server {
                    self.consistency.record_read(server.conn.node, lsn);
                }
            }
        }
        Ok(())
    }
    /// The replica has not shown the read's `floor`: the answers still to
    /// come are hidden, and the read is redone once they are in.
    fn treat_read_as_stale(&mut self, floor: Lsn) {
        self.stale_read = Some(floor);
        self.pending.hide_rest();
    }
    /// Sends the ReadyForQuery held for a commit LSN capture, if any.
    async fn release_held_ready(&mut self) -> Result<(), ClientError> {
        match self.held_ready.take() {
            Some(ready) => Ok(self.client.send(&ready).await?),
            None => Ok(()),
        }
    }
    /// The replica was behind the session's floor. Watch it replay (news
    /// from other sessions, and a question of its own once a millisecond)
    /// until it or another replica is known past the floor, or `ryw_wait`
    /// runs out; then redo the read there, or on the primary.
    ///
    /// Boxed: the wait is a large future, and every server message's
    /// handling would carry it.
    pub(super) async fn redo_stale_read(&mut self) -> Result<(), ClientError> {
        Box::pin(self.wait_and_redo_read()).await
    }

    async fn wait_and_redo_read(&mut self) -> Result<(), ClientError> {
        let floor = self.stale_read.take().expect("a stale read");
        self.cancel.set_target(None);
        let Some(mut server) = self.server.take() else {
            return Ok(());
        };
        let started = std::time::Instant::now();
        let deadline = started + self.shared.config.load().routing.ryw_wait;
        // A question cut short by the deadline leaves its answer on the way:
        // such a connection must not go back to the pool, where the next
        // client would read that answer as its own.
        let mut answered = true;
        let node = server.conn.node;
        // Any replica known past the floor (other sessions' probes and this
        // one's land in the topology) takes the read at once.
        let fresh = |topology: &crate::topology::Topology| {
            if topology.serves_reads_at(node, Some(floor)) {
                return Some(node);
            }
            topology.read_replicas(Some(floor)).map(|n| n.id).next()
        };
        // The answer that found the replica behind was the first ask.
        let mut next_ask = started + REPLAY_ASK_PAUSE;
        let hints = self.shared.topology.load().seen.clone();
        let caught_up = loop {
            let news = hints.advanced();
            if let Some(id) = fresh(&self.shared.topology.load()) {
                break Some(id);
            }
            let now = std::time::Instant::now();
            let left = deadline.saturating_duration_since(now);
            if left.is_zero() {
                break None;
            }
            if now < next_ask {
                let until = tokio::time::Instant::from_std(next_ask.min(deadline));
                tokio::select! {
                    _ = news => {}
                    _ = tokio::time::sleep_until(until) => {}
                }
                continue;
            }
            let replayed = server.conn.replay_lsn(left).await;
            next_ask = std::time::Instant::now() + REPLAY_ASK_PAUSE;
            if let Ok(Some(lsn)) = replayed {
                hints.record(node, lsn);
            }
            match replayed {
                Ok(Some(lsn)) if lsn >= floor => break Some(node),
                Ok(_) => {}
                Err(_) => {
                    answered = false;
                    break None;
                }
            }
        };
        self.shared.metrics.ryw_waited(started.elapsed());
        let replay = server.replay.take();
        self.prefer_replica = caught_up;
        if caught_up.is_none() {
            self.force_primary = Some(Fallback::RywTimeout);
        }
        // Mid-batch (no Sync yet) the connection is not between
        // transactions, whatever its last ReadyForQuery said.
        if server.status == TxStatus::Idle && answered && !self.unsynced {
            server.conn.clean = true;
            drop(server);
        } else {
            discard(server.conn);
        }
        match replay {
            Some(replay) => self.replay(replay).await,
            None => {
                // Too large to keep: never hand out a stale answer instead.
                let frame = backend::error_response(
                    Severity::Error,
                    "40001",
                    "could not serve this read at the session's consistency level; retry it",
                );
                self.client.send(&frame).await?;
                self.ready(TxStatus::Idle).await
            }
        }
    }

    pub(super) fn undo_parses(&mut self, undone: Vec<ParseUndo>) {
        for undo in undone {
            if let Some(server) = &mut self.server {
                server.conn.prepared.pop(&undo.global);
            }
            if let Some(name) = &undo.client_name {
                self.statements.remove_if(name, &undo.global);
            }
        }
    }
    /// The attached server is gone: `loss` says how, when it went silent
    /// rather than being given up by the proxy.
    pub(super) async fn on_server_lost(&mut self, loss: Option<Loss>) -> Result<(), ClientError> {
        let Some(mut server) = self.server.take() else {
            return Ok(());
        };
        self.cancel.set_target(None);
        let fatal = server.fatal.take();
        let node = server.conn.node;
        let topology = self.shared.topology.load();
        let demoted = topology.lost_its_epoch(server.conn.node, server.role);
        let why = match (&fatal, demoted) {
            (_, true) => Some(format!(
                "it is no longer the primary: topology epoch {} has another",
                topology.epoch
            )),
            (Some(said), false) => ErrorFields::decode(said).ok().map(|f| f.message),
            (None, false) => loss.map(|loss| loss.to_string()),
        };
        drop(topology);
        let lost = RouteError::server_lost(server.conn.addr, why);
        let replay = server.replay;
        drop(server.conn);
        if self.held_ready.is_some() {
            // The write is done but its commit LSN is unknown: the session's
            // reads must not trust a replica until a later write's is known.
            self.consistency.last_write_unknown = true;
            self.pending.clear();
            return self.release_held_ready().await;
        }
        // Whether the unit can be replayed says, when a client hears of a
        // loss, why it did: part of the answer was out, or it sent more.
        let replayable = replay.is_some() && self.waiting.is_none();
        tracing::warn!(parent: &self.span, %node, error = %lost, replayable, "server connection lost");
        // One dead connection (a terminated backend) says little about the
        // node: ask the monitor to look now. New connections that fail mark
        // the node unreachable at once (`attach`).
        self.shared.topology.request_refresh();
        if let Some(replay) = replay.filter(|_| replayable) {
            tracing::info!(
                parent: &self.span,
                frames = replay.frames.len(),
                "replaying a read on another node"
            );
            return self.replay(replay).await;
        }
        if self.mode() == PoolMode::Session {
            // The client's backend, and with it its session, is gone: it
            // hears the server's own last words, as on a direct connection
            // (57P01 for a terminated backend), and is closed.
            return Err(match fatal {
                Some(said) if !demoted => ClientError::ServerEnded(said),
                _ => lost.into(),
            });
        }
        let awaiting = !self.pending.is_empty();
        self.pending.clear();
        self.passthrough = 0;
        if awaiting {
            self.client.send(&lost.to_frame(Severity::Error)).await?;
            self.client_status = TxStatus::Idle;
            if self.unsynced {
                self.skip_to_sync = true;
            } else {
                self.ready(TxStatus::Idle).await?;
            }
        } else if self.client_status != TxStatus::Idle {
            self.lost = Some(lost);
        }
        self.unsynced = false;
        Ok(())
    }
    /// Runs a read that got no answer again, from the start, on another
    /// connection. Nothing reached the client yet, so it sees one answer, as
    /// if nothing happened.
    /// Logged by the callers: a lost connection is news, a read redone
    /// behind a replica's replay (one in ten reads after a write, under
    /// load) is counted in `tidepool_ryw_waits_total` instead.
    pub(super) async fn replay(&mut self, replay: Replay) -> Result<(), ClientError> {
        self.pending.clear();
        self.unsynced = false;
        self.held_begin = replay.held_begin;
        for frame in &replay.frames {
            if frame.tag() == fe::PARSE
                && let Ok(parse) = Parse::decode(frame)
                && !parse.name.is_empty()
            {
                self.statements.remove(parse.name);
            }
        }
        // Boxed: a replay is rare, and every future that can reach one
        // (server loss, stale reads, new epochs) would otherwise carry a
        // whole message's state inline in every idle client's task.
        for frame in replay.frames {
            let kept = frame.clone();
            Box::pin(self.on_client_message(frame)).await?;
            self.keep_for_replay(kept);
        }
        Ok(())
    }
}

fn lost_protocol(e: crate::protocol::ProtocolError) -> ClientError {
    ClientError::Route(RouteError::ServerLost(format!("protocol error: {e}")))
}

pub(super) async fn read_server(server: Option<&mut Attached>) -> std::io::Result<usize> {
    match server {
        Some(server) => server.conn.read_more().await,
        None => std::future::pending().await,
    }
}
