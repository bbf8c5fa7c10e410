//! One client's session after authentication: reads its messages, routes each
//! unit of work (a transaction, or a statement outside one) to a server
//! connection, and streams the responses back.
//!
//! In transaction mode a server connection is held from the first message of
//! a unit of work until the server reports ReadyForQuery Idle with nothing
//! outstanding; then it goes back to its pool.

mod consistency;
mod pending;
mod state;
mod statements;

pub use state::{Params, startup_params, sync_sql};

use std::sync::Arc;

use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use self::consistency::Consistency;
use self::pending::{Capture, Kind, ParseUndo, Pending};
use self::state::{ParamChange, PinReason};
use self::statements::{Statement, Statements};
use super::Shared;
use super::cancel::CancelHandle;
use super::client::ClientConn;
use super::error::{ClientError, RouteError};
use super::users::UserEntry;
use crate::config::{ConsistencyMode, PoolMode};
use crate::pool::registry::CheckoutError;
use crate::pool::{Checkout, PoolKey, ServerError};
use crate::protocol::backend::{self, ErrorFields, Severity, TxStatus};
use crate::protocol::frontend::{self as fe, Bind, Named, Parse, Target};
use crate::protocol::{Frame, frame};
use crate::route::classify::{Intent, ProxyCommand};
use crate::route::hint::leading_hint;
use crate::route::policy::{Destination, SessionRoute, destination};
use crate::topology::{Lsn, NodeId, Role};

/// Who the client is and what it asked for at startup.
pub struct SessionSetup {
    pub user: Arc<UserEntry>,
    pub database: String,
    pub cancel: CancelHandle,
    /// Its startup parameters, as SQL values.
    pub params: Params,
    pub mode: ConsistencyMode,
}

/// A server connection serving this client right now.
struct Attached {
    conn: Checkout,
    /// The node's role when this connection was attached.
    role: Role,
    /// Status from the server's last ReadyForQuery.
    status: TxStatus,
    /// A read sent to a replica, kept until the first byte of an answer: if
    /// the connection turns out dead (a replica killed, a stale pooled
    /// connection), it is replayed elsewhere and the client never knows.
    replay: Option<Replay>,
    /// The server's last words (a FATAL error) before it closes the connection.
    fatal: Option<String>,
}

struct Replay {
    frames: Vec<Frame>,
    bytes: usize,
    held_begin: Option<HeldBegin>,
}

/// Reads bigger than this are not kept for replay.
const REPLAY_LIMIT: usize = 64 * 1024;

/// A BEGIN answered by the proxy and not yet sent: the statement after it
/// decides where the transaction runs.
struct HeldBegin {
    frame: Frame,
    read_only: bool,
}

pub struct Session {
    shared: Arc<Shared>,
    client: ClientConn,
    user: Arc<UserEntry>,
    database: String,
    cancel: CancelHandle,
    server: Option<Attached>,
    pending: Pending,
    /// Transaction status as the client last saw it.
    client_status: TxStatus,
    /// Extended-protocol messages were sent since the last Sync.
    unsynced: bool,
    route: SessionRoute,
    held_begin: Option<HeldBegin>,
    statements: Statements,
    /// After an error the proxy raised mid-batch, client messages are
    /// dropped until Sync, as PostgreSQL does.
    skip_to_sync: bool,
    /// A message that must wait for the server to answer everything before it.
    waiting: Option<Frame>,
    /// The server died while the client sat in a transaction: told at its next message.
    lost: Option<RouteError>,
    /// Bytes of a streamed DataRow/CopyData still to pass through, and whether the client sees them.
    passthrough: usize,
    passthrough_visible: bool,
    /// Parameters the client has now (startup values and SETs), applied to
    /// whichever server connection serves it next.
    params: Params,
    /// What RESET / RESET ALL go back to: the client's startup parameters.
    startup_params: Params,
    /// A SET/RESET/DISCARD in flight: takes effect when it succeeds.
    param_change: Option<ParamChange>,
    /// Changes made inside a transaction block: kept only if it commits.
    txn_param_changes: Vec<ParamChange>,
    last_command: Option<Vec<u8>>,
    /// Held on its server connection for good (transaction mode only).
    pinned: Option<PinReason>,
    consistency: Consistency,
    /// Messages of the current extended batch write: learn the commit LSN at Sync.
    unit_writes: bool,
    /// ...or run a COPY: then learn it only once the unit is over.
    unit_copies: bool,
    /// A capture owed once the server is ready again (after a COPY); `true` after a write.
    capture_when_ready: Option<bool>,
    /// The replica turned out behind the session's floor: the read in flight
    /// is hidden from the client and redone.
    stale_read: bool,
    /// When a read that keeps finding stale replicas gives up on them.
    read_deadline: Option<std::time::Instant>,
    /// The next unit of work goes to the primary whatever it is.
    force_primary: bool,
    shutdown: watch::Receiver<bool>,
    draining: bool,
}

impl Session {
    pub fn new(
        shared: Arc<Shared>,
        client: ClientConn,
        setup: SessionSetup,
        shutdown: watch::Receiver<bool>,
    ) -> Session {
        let SessionSetup {
            user,
            database,
            cancel,
            params,
            mode,
        } = setup;
        Session {
            shared,
            client,
            user,
            database,
            cancel,
            server: None,
            pending: Pending::default(),
            client_status: TxStatus::Idle,
            unsynced: false,
            route: SessionRoute::Auto,
            held_begin: None,
            statements: Statements::default(),
            skip_to_sync: false,
            waiting: None,
            lost: None,
            passthrough: 0,
            passthrough_visible: true,
            startup_params: params.clone(),
            params,
            param_change: None,
            txn_param_changes: Vec::new(),
            last_command: None,
            pinned: None,
            consistency: Consistency::new(mode),
            unit_writes: false,
            unit_copies: false,
            capture_when_ready: None,
            stale_read: false,
            read_deadline: None,
            force_primary: false,
            shutdown,
            draining: false,
        }
    }

    pub async fn run(mut self) -> Result<(), ClientError> {
        let result = self.serve().await;
        self.detach_for_good().await;
        match &result {
            Err(e) => {
                if let Some(frame) = e.to_frame() {
                    let _ = self.client.send(&frame).await;
                }
                self.client.shutdown().await;
            }
            Ok(()) => self.client.shutdown().await,
        }
        result
    }

    async fn serve(&mut self) -> Result<(), ClientError> {
        loop {
            if self.waiting.is_some() && self.pending.is_empty() {
                let frame = self.waiting.take().expect("checked");
                if !self.on_client_message(frame).await? {
                    return Ok(());
                }
            }
            while self.waiting.is_none() {
                let Some(frame) = self.client.try_frame()? else {
                    break;
                };
                if !self.on_client_message(frame).await? {
                    return Ok(());
                }
            }
            self.emit_synthetic().await?;
            if let Some(server) = &mut self.server
                && let Err(e) = server.conn.flush().await
            {
                tracing::debug!(error = %e, "write to server failed");
            }
            self.client.flush().await?;
            if self.draining && self.is_between_transactions() {
                return Err(ClientError::ShuttingDown);
            }
            let server = self.server.as_mut();
            tokio::select! {
                read = self.client.fill(), if self.waiting.is_none() => {
                    if read? == 0 {
                        return Ok(());
                    }
                }
                read = read_server(server) => match read {
                    Ok(n) if n > 0 => self.pump_server().await?,
                    _ => self.on_server_lost().await?,
                },
                _ = self.shutdown.changed(), if !self.draining => self.draining = true,
            }
        }
    }

    fn mode(&self) -> PoolMode {
        self.shared.config.pool.mode
    }

    fn is_between_transactions(&self) -> bool {
        self.pending.is_empty()
            && !self.unsynced
            && self.held_begin.is_none()
            && self.client_status == TxStatus::Idle
    }

    /// Handles one client message; `false` when the client said Terminate.
    async fn on_client_message(&mut self, frame: Frame) -> Result<bool, ClientError> {
        let kept = frame.clone();
        let go_on = self.dispatch(frame).await?;
        if self.waiting.is_none()
            && let Some(replay) = self.server.as_mut().and_then(|s| s.replay.as_mut())
        {
            replay.bytes += kept.raw().len();
            replay.frames.push(kept);
            if replay.bytes > REPLAY_LIMIT {
                self.server.as_mut().expect("attached").replay = None;
            }
        }
        Ok(go_on)
    }

    async fn dispatch(&mut self, frame: Frame) -> Result<bool, ClientError> {
        if frame.tag() == fe::TERMINATE {
            return Ok(false);
        }
        if self.skip_to_sync {
            if frame.tag() == fe::SYNC {
                self.skip_to_sync = false;
                self.sync_after_error(frame).await?;
            }
            return Ok(true);
        }
        if let Some(lost) = self.lost.take() {
            self.client.send(&lost.to_frame(Severity::Error)).await?;
            self.client_status = TxStatus::Idle;
            return match frame.tag() {
                fe::QUERY | fe::SYNC => {
                    self.ready(TxStatus::Idle).await?;
                    Ok(true)
                }
                _ => {
                    self.skip_to_sync = true;
                    Ok(true)
                }
            };
        }
        match frame.tag() {
            fe::QUERY => self.on_query(frame).await?,
            fe::PARSE
            | fe::BIND
            | fe::DESCRIBE
            | fe::EXECUTE
            | fe::CLOSE
            | fe::SYNC
            | fe::FLUSH => self.on_extended(frame).await?,
            fe::COPY_DATA | fe::COPY_DONE | fe::COPY_FAIL => {
                // Outside COPY, PostgreSQL ignores these too.
                if let Some(server) = &mut self.server {
                    send_quietly(server, &frame).await;
                }
            }
            fe::FUNCTION_CALL => {
                if !self.pending.is_empty() {
                    self.waiting = Some(frame);
                } else if self.server.is_some() || self.start_unit(&Intent::Write, None).await? {
                    self.forward(&frame, Kind::FunctionCall).await?;
                }
            }
            other => return Err(crate::protocol::ProtocolError::Unexpected(other as char).into()),
        }
        Ok(true)
    }

    async fn on_query(&mut self, frame: Frame) -> Result<(), ClientError> {
        if !self.pending.is_empty() {
            // Let the server finish the previous unit of work: where this one
            // runs depends on the transaction state that work leaves.
            self.waiting = Some(frame);
            return Ok(());
        }
        let sql = fe::query_text(&frame)?;
        let intent = sql.map_or(Intent::Write, |sql| self.shared.classifier.classify(sql));
        if let Intent::Proxy(command) = &intent {
            return self.proxy_command(command).await;
        }
        if let Some(sql) = sql {
            if let Some(reason) = state::pin_reason(sql) {
                self.pin(reason);
            }
            match state::param_change(sql) {
                Ok(Some(ParamChange::Deallocate { name }))
                    if self.statements.get(name.as_bytes()).is_some() =>
                {
                    // A protocol-level statement: it lives in the proxy.
                    self.statements.remove(name.as_bytes());
                    self.client
                        .send(&backend::command_complete("DEALLOCATE"))
                        .await?;
                    return self.ready(self.client_status).await;
                }
                Ok(change) => self.param_change = change,
                Err(reason) => self.pin(reason),
            }
        }
        if self.server.is_none() {
            match intent {
                Intent::Begin { read_only }
                    if self.mode() == PoolMode::Transaction && self.held_begin.is_none() =>
                {
                    self.held_begin = Some(HeldBegin { frame, read_only });
                    self.client
                        .send(&backend::command_complete("BEGIN"))
                        .await?;
                    return self.ready(TxStatus::InTransaction).await;
                }
                Intent::End if self.held_begin.is_some() => {
                    self.held_begin = None;
                    let committed = self.client_status == TxStatus::InTransaction
                        && sql.is_some_and(|s| !is_rollback(s));
                    let tag = if committed { "COMMIT" } else { "ROLLBACK" };
                    self.client.send(&backend::command_complete(tag)).await?;
                    return self.ready(TxStatus::Idle).await;
                }
                _ => {}
            }
            if !self.start_unit(&intent, sql.and_then(leading_hint)).await? {
                return self.ready(self.client_status).await;
            }
        }
        let ends_writes = intent == Intent::End
            || (intent == Intent::Write && self.client_status == TxStatus::Idle);
        self.forward(&frame, Kind::Query).await?;
        self.capture_after_unit(ends_writes, sql.is_none_or(state::starts_copy))
            .await
    }

    /// Pipelined right behind the client's statement, so the client waits
    /// for nothing: after a write on the primary, its commit LSN; after a
    /// monotonic read on a replica, how far that replica had replayed.
    async fn capture_after_unit(&mut self, wrote: bool, copies: bool) -> Result<(), ClientError> {
        let Some(role) = self.server.as_ref().map(|s| s.role) else {
            return Ok(());
        };
        if copies {
            self.capture_when_ready = Some(wrote);
            return Ok(());
        }
        let capture = match role {
            Role::Primary if wrote => Capture::CommitLsn,
            Role::Replica if self.consistency.tracks_reads() => Capture::Observed,
            _ => return Ok(()),
        };
        let sql = match capture {
            Capture::CommitLsn => "select pg_current_wal_lsn()",
            _ => "select pg_last_wal_replay_lsn()",
        };
        self.send_to_server(&fe::query(sql)).await?;
        self.pending.push_capture(capture);
        Ok(())
    }

    async fn on_extended(&mut self, frame: Frame) -> Result<(), ClientError> {
        if !self.unsynced && !self.pending.is_empty() && frame.tag() != fe::FLUSH {
            self.waiting = Some(frame);
            return Ok(());
        }
        if self.server.is_none() {
            match frame.tag() {
                fe::SYNC => return self.ready(self.client_status).await,
                fe::FLUSH => return Ok(()),
                fe::CLOSE => {
                    // Statements live in the proxy between transactions and
                    // portals do not outlive them: nothing to ask a server.
                    let named = Named::decode(&frame)?;
                    if named.target == Target::Statement {
                        self.statements.remove(named.name);
                    }
                    self.client.send(&backend::close_complete()).await?;
                    self.unsynced = true;
                    return Ok(());
                }
                _ => {}
            }
            let intent = self.extended_intent(&frame)?;
            if !self.start_unit(&intent, None).await? {
                self.skip_to_sync = true;
                return Ok(());
            }
        }
        match frame.tag() {
            fe::PARSE => self.forward_parse(&frame).await?,
            fe::BIND => {
                let bind = Bind::decode(&frame)?;
                match self.statements.get(bind.statement).cloned() {
                    Some(statement) => {
                        self.unit_writes |= writes(&statement.intent);
                        self.unit_copies |= statement.copies;
                        self.prepare_on_server(&statement, None).await?;
                        let renamed = bind.renamed(&statement.global);
                        self.forward(&renamed, Kind::Bind).await?;
                    }
                    None => self.forward(&frame, Kind::Bind).await?,
                }
            }
            fe::DESCRIBE => {
                let named = Named::decode(&frame)?;
                let known = (named.target == Target::Statement)
                    .then(|| self.statements.get(named.name).cloned())
                    .flatten();
                match known {
                    Some(statement) => {
                        self.prepare_on_server(&statement, None).await?;
                        let renamed =
                            Named::encode(fe::DESCRIBE, Target::Statement, &statement.global);
                        self.forward(&renamed, Kind::Describe).await?;
                    }
                    None => self.forward(&frame, Kind::Describe).await?,
                }
            }
            fe::CLOSE => {
                let named = Named::decode(&frame)?;
                if named.target == Target::Statement && !named.name.is_empty() {
                    // The server keeps its copy for whoever prepares it next;
                    // its statement cache evicts it when full.
                    self.statements.remove(named.name);
                    self.pending.push_synthetic(backend::close_complete());
                } else {
                    self.forward(&frame, Kind::Close).await?;
                }
            }
            fe::EXECUTE => self.forward(&frame, Kind::Execute).await?,
            fe::SYNC => {
                self.forward(&frame, Kind::Sync).await?;
                self.unsynced = false;
                let wrote = std::mem::take(&mut self.unit_writes);
                let copies = std::mem::take(&mut self.unit_copies);
                return self.capture_after_unit(wrote, copies).await;
            }
            _ => {
                self.send_to_server(&frame).await?;
                return Ok(());
            }
        }
        self.unsynced = true;
        Ok(())
    }

    /// The intent of an extended-protocol message that starts a unit of work.
    fn extended_intent(&self, frame: &Frame) -> Result<Intent, ClientError> {
        Ok(match frame.tag() {
            fe::PARSE => {
                let parse = Parse::decode(frame)?;
                std::str::from_utf8(parse.query)
                    .map_or(Intent::Write, |sql| self.shared.classifier.classify(sql))
            }
            fe::BIND => {
                let bind = Bind::decode(frame)?;
                self.statements
                    .get(bind.statement)
                    .map_or(Intent::Write, |s| s.intent.clone())
            }
            fe::DESCRIBE => {
                let named = Named::decode(frame)?;
                self.statements
                    .get(named.name)
                    .filter(|_| named.target == Target::Statement)
                    .map_or(Intent::Write, |s| s.intent.clone())
            }
            _ => Intent::Write,
        })
    }

    async fn forward_parse(&mut self, frame: &Frame) -> Result<(), ClientError> {
        let parse = Parse::decode(frame)?;
        if parse.name.is_empty() {
            match std::str::from_utf8(parse.query) {
                Ok(sql) => {
                    self.pin_if_needed_extended(sql);
                    self.unit_writes |= writes(&self.shared.classifier.classify(sql));
                    self.unit_copies |= state::starts_copy(sql);
                }
                Err(_) => {
                    self.unit_writes = true;
                    self.unit_copies = true;
                }
            }
            return self.forward(frame, Kind::Parse).await;
        }
        if self.statements.get(parse.name).is_some() {
            let message = format!(
                "prepared statement \"{}\" already exists",
                String::from_utf8_lossy(parse.name)
            );
            self.pending.push_synthetic(backend::error_response(
                Severity::Error,
                "42P05",
                &message,
            ));
            self.skip_to_sync = true;
            return Ok(());
        }
        let sql = std::str::from_utf8(parse.query).ok();
        let intent = sql.map_or(Intent::Write, |sql| self.shared.classifier.classify(sql));
        if let Some(sql) = sql {
            self.pin_if_needed_extended(sql);
        }
        let statement = Statement::new(&parse, intent);
        self.statements.insert(parse.name, statement.clone());
        self.prepare_on_server(&statement, Some(parse.name.to_vec()))
            .await
    }

    /// Session state changed through the extended protocol is not followed:
    /// such a client keeps its server connection.
    fn pin_if_needed_extended(&mut self, sql: &str) {
        if let Some(reason) = state::pin_reason(sql) {
            self.pin(reason);
        } else if !matches!(state::param_change(sql), Ok(None)) {
            self.pin(PinReason::UntrackedSet);
        }
    }

    fn pin(&mut self, reason: PinReason) {
        if self.pinned.is_none() && self.mode() == PoolMode::Transaction {
            tracing::info!(
                reason = reason.as_str(),
                "client pinned to its server connection"
            );
            self.pinned = Some(reason);
        }
    }

    /// Makes sure the attached server holds `statement`. `client_name` is set
    /// when this answers the client's own Parse: then the client sees a
    /// ParseComplete either way; otherwise the inserted Parse stays hidden.
    async fn prepare_on_server(
        &mut self,
        statement: &Statement,
        client_name: Option<Vec<u8>>,
    ) -> Result<(), ClientError> {
        let visible = client_name.is_some();
        let server = self.server.as_mut().expect("attached");
        if server.conn.prepared.get(&statement.global).is_some() {
            if visible {
                self.pending.push_synthetic(backend::parse_complete());
            }
            return Ok(());
        }
        if server.conn.prepared.len() == server.conn.prepared.cap().get()
            && let Some((evicted, ())) = server.conn.prepared.pop_lru()
        {
            let close = Named::encode(fe::CLOSE, Target::Statement, &evicted);
            send_quietly(server, &close).await;
            self.pending.push(Kind::Close, false);
        }
        send_quietly(server, &statement.parse).await;
        server.conn.prepared.put(statement.global.clone(), ());
        self.pending.push_parse(
            visible,
            ParseUndo {
                global: statement.global.clone(),
                client_name,
            },
        );
        Ok(())
    }

    /// Picks a server for a new unit of work and attaches it. On failure the
    /// client has been sent the error and `false` is returned.
    async fn start_unit(
        &mut self,
        intent: &Intent,
        hint: Option<crate::route::hint::Hint>,
    ) -> Result<bool, ClientError> {
        let mut destination = match self.mode() {
            PoolMode::Session => Destination::Primary,
            PoolMode::Transaction => destination(
                intent,
                hint,
                self.route,
                self.held_begin.as_ref().map(|h| h.read_only),
            ),
        };
        let forced = std::mem::take(&mut self.force_primary);
        if forced || self.consistency.mode == ConsistencyMode::Strong {
            destination = Destination::Primary;
        }
        // A hinted read asked for a replica, whatever its freshness.
        let floor = (destination == Destination::Replica && hint.is_none())
            .then(|| self.consistency.floor())
            .flatten();
        if let Err(e) = self.attach(destination, floor).await {
            tracing::debug!(error = %e, "no server for statement");
            self.client.send(&e.to_frame(Severity::Error)).await?;
            if self.held_begin.is_some() {
                self.client_status = TxStatus::Failed;
            }
            return Ok(false);
        }
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

    /// Attaches a server for `destination`. For reads with a `floor`, the
    /// replicas the topology already shows at or past it come first; when
    /// none does, replicas are still tried (the topology's view is one poll
    /// old) and `probe_if_unconfirmed` checks the one attached.
    async fn attach(
        &mut self,
        destination: Destination,
        floor: Option<Lsn>,
    ) -> Result<(), RouteError> {
        let candidates: Vec<(NodeId, std::net::SocketAddr, Role)> = {
            let topology = self.shared.topology.load();
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
                // Unconfirmed: the replica that had replayed most at the last
                // poll is the likeliest to have reached the floor by now.
                ids = pick(None);
                ids.sort_by_key(|&id| {
                    let node = topology.node(id);
                    (
                        node.role != Role::Replica,
                        std::cmp::Reverse(node.replay_lsn),
                    )
                });
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
            let key = PoolKey {
                node,
                user: self.user.name.clone(),
                database: self.database.clone(),
            };
            match self
                .shared
                .pools
                .checkout(&key, addr, &self.user.password)
                .await
            {
                Ok(mut conn) => {
                    conn.clean = false;
                    self.cancel.set_target(Some((conn.addr, conn.key)));
                    self.server = Some(Attached {
                        conn,
                        role,
                        status: TxStatus::Idle,
                        replay: None,
                        fatal: None,
                    });
                    return Ok(());
                }
                Err(
                    e @ CheckoutError::Connect {
                        source: ServerError::Rejected(_),
                        ..
                    },
                ) => return Err(e.into()),
                Err(e @ CheckoutError::Connect { .. }) => {
                    self.shared.topology.report_unreachable(node);
                    last_error = e.into();
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(last_error)
    }

    /// When the attached replica is not yet known to have replayed `floor`,
    /// asks it first, in the same flight as the read: if it is behind, the
    /// read's answer is hidden and the read redone (see `on_capture`).
    async fn probe_if_unconfirmed(&mut self, floor: Option<Lsn>) -> Result<(), ClientError> {
        let (Some(floor), Some(server)) = (floor, self.server.as_ref()) else {
            return Ok(());
        };
        let node = server.conn.node;
        if server.role != Role::Replica
            || self
                .shared
                .topology
                .load()
                .node(node)
                .serves_reads_at(Some(floor))
        {
            return Ok(());
        }
        self.send_to_server(&fe::query("select pg_last_wal_replay_lsn()"))
            .await?;
        self.pending.push_capture(Capture::ReplayFloor(floor));
        Ok(())
    }

    async fn send_to_server(&mut self, frame: &Frame) -> Result<(), ClientError> {
        send_quietly(self.server.as_mut().expect("attached"), frame).await;
        Ok(())
    }

    async fn forward(&mut self, frame: &Frame, kind: Kind) -> Result<(), ClientError> {
        self.send_to_server(frame).await?;
        self.pending.push(kind, true);
        Ok(())
    }

    async fn ready(&mut self, status: TxStatus) -> Result<(), ClientError> {
        self.client_status = status;
        self.client.send(&backend::ready_for_query(status)).await?;
        Ok(())
    }

    /// The Sync that ends a batch the proxy failed part of.
    async fn sync_after_error(&mut self, sync: Frame) -> Result<(), ClientError> {
        if self.server.is_some() {
            self.forward(&sync, Kind::Sync).await?;
            self.unsynced = false;
            Ok(())
        } else {
            self.unsynced = false;
            self.ready(self.client_status).await
        }
    }

    async fn emit_synthetic(&mut self) -> Result<(), ClientError> {
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
    async fn pump_server(&mut self) -> Result<(), ClientError> {
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
        }
    }

    async fn on_server_message(&mut self, frame: Frame) -> Result<(), ClientError> {
        self.emit_synthetic().await?;
        match frame.tag() {
            // ParameterStatus goes through even for statements the proxy
            // inserted: after them the client's view matches the server's.
            backend::NOTICE_RESPONSE | backend::PARAMETER_STATUS | b'A' => {
                self.client.send(&frame).await?
            }
            backend::DATA_ROW if self.pending.head_capture().is_some() => {
                let capture = self.pending.head_capture().expect("checked");
                self.pending.on_reply(backend::DATA_ROW);
                if let Some(lsn) = lsn_value(&frame) {
                    self.on_capture(capture, lsn).await?;
                }
            }
            backend::ERROR_RESPONSE if is_fatal(&frame) => {
                // The server is closing this connection, not the client's
                // session: the client hears about it from `on_server_lost`,
                // as an error it can carry on after.
                let message = ErrorFields::decode(&frame)
                    .map(|f| f.message)
                    .unwrap_or_default();
                if let Some(server) = &mut self.server {
                    server.fatal = Some(message);
                }
            }
            backend::ERROR_RESPONSE => {
                if self.pending.head_visible() {
                    self.param_change = None;
                }
                let (visible, undone) = self.pending.on_error();
                self.undo_parses(undone);
                let fields = ErrorFields::decode(&frame).ok();
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
                    self.client.send(&frame).await?;
                    self.settle_param_changes(status).await?;
                }
                self.emit_synthetic().await?;
                if self.stale_read && self.pending.is_empty() {
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
    fn answered(&mut self) {
        if let Some(server) = &mut self.server {
            server.replay = None;
        }
    }

    async fn on_capture(&mut self, capture: Capture, lsn: Lsn) -> Result<(), ClientError> {
        match capture {
            Capture::CommitLsn => {
                self.consistency.record_write(lsn);
                let token = lsn.to_string();
                self.client
                    .send(&backend::parameter_status("tidepool.lsn", &token))
                    .await?;
            }
            Capture::ReplayFloor(floor) if lsn < floor => {
                tracing::debug!(%lsn, %floor, "replica behind the session's floor: redoing the read");
                self.stale_read = true;
                self.pending.hide_rest();
            }
            Capture::ReplayFloor(_) => self.read_deadline = None,
            Capture::Observed => {
                if let Some(server) = &self.server {
                    self.consistency.record_read(server.conn.node, lsn);
                }
            }
        }
        Ok(())
    }

    /// The replica was behind: give it (or another) until `ryw_wait` runs
    /// out, a millisecond at a time, then read from the primary.
    async fn redo_stale_read(&mut self) -> Result<(), ClientError> {
        self.stale_read = false;
        self.cancel.set_target(None);
        let Some(mut server) = self.server.take() else {
            return Ok(());
        };
        server.conn.clean = server.status == TxStatus::Idle;
        let replay = server.replay.take();
        drop(server);
        let now = std::time::Instant::now();
        let deadline = *self
            .read_deadline
            .get_or_insert(now + self.shared.config.routing.ryw_wait);
        if now < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(1).min(deadline - now)).await;
        } else {
            self.read_deadline = None;
            self.force_primary = true;
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

    /// A statement that changed session parameters has finished: outside a
    /// transaction block its change holds now; inside one, only if the block
    /// commits.
    /// A RESET can leave the server short of the client's startup values
    /// (the server's own defaults differ): those are put back at once.
    async fn settle_param_changes(&mut self, status: TxStatus) -> Result<(), ClientError> {
        if let Some(change) = self.param_change.take() {
            self.txn_param_changes.push(change);
        }
        if status != TxStatus::Idle || self.txn_param_changes.is_empty() {
            return Ok(());
        }
        let ended_by_rollback = self
            .last_command
            .as_deref()
            .is_some_and(|tag| tag.starts_with(b"ROLLBACK"));
        let changes = std::mem::take(&mut self.txn_param_changes);
        if ended_by_rollback {
            return Ok(());
        }
        for change in changes {
            self.apply_param_change(change);
        }
        self.sync_params().await
    }

    /// Brings the attached server's parameters in line with the client's,
    /// ahead of whatever the client sends next.
    async fn sync_params(&mut self) -> Result<(), ClientError> {
        let Some(server) = self.server.as_mut() else {
            return Ok(());
        };
        if let Some(sql) = state::sync_sql(&self.params, &server.conn.applied) {
            server.conn.applied = self.params.clone();
            self.send_to_server(&fe::query(&sql)).await?;
            self.pending.push(Kind::Query, false);
        }
        Ok(())
    }

    fn apply_param_change(&mut self, change: ParamChange) {
        let server = self.server.as_mut().map(|s| &mut s.conn);
        match change {
            ParamChange::Set { name, value } => {
                if let Some(server) = server {
                    server.applied.insert(name.clone(), value.clone());
                }
                self.params.insert(name, value);
            }
            ParamChange::Reset { name } => {
                if let Some(server) = server {
                    server.applied.remove(&name);
                }
                match self.startup_params.get(&name) {
                    Some(value) => self.params.insert(name, value.clone()),
                    None => self.params.remove(&name),
                };
            }
            ParamChange::ResetAll | ParamChange::DiscardAll => {
                if let Some(server) = server {
                    server.applied.clear();
                    if change == ParamChange::DiscardAll {
                        server.prepared.clear();
                    }
                }
                if change == ParamChange::DiscardAll {
                    self.statements = Statements::default();
                }
                self.params = self.startup_params.clone();
            }
            ParamChange::DeallocateAll => {
                if let Some(server) = server {
                    server.prepared.clear();
                }
                self.statements = Statements::default();
            }
            ParamChange::Deallocate { .. } => {}
        }
    }

    fn undo_parses(&mut self, undone: Vec<ParseUndo>) {
        for undo in undone {
            if let Some(server) = &mut self.server {
                server.conn.prepared.pop(&undo.global);
            }
            if let Some(name) = &undo.client_name {
                self.statements.remove_if(name, &undo.global);
            }
        }
    }

    /// In transaction mode the server goes back to its pool once it is idle
    /// and owes nothing.
    fn release_if_done(&mut self) {
        let done = self.server.as_ref().is_some_and(|s| {
            s.status == TxStatus::Idle
                && self.pending.is_empty()
                && !self.unsynced
                && self.pinned.is_none()
        });
        if done && self.mode() == PoolMode::Transaction {
            self.cancel.set_target(None);
            if let Some(mut server) = self.server.take() {
                server.conn.clean = true;
            }
        }
    }

    async fn on_server_lost(&mut self) -> Result<(), ClientError> {
        let Some(server) = self.server.take() else {
            return Ok(());
        };
        self.cancel.set_target(None);
        let node = server.conn.node;
        let lost = RouteError::ServerLost(match &server.fatal {
            Some(said) => format!("{} ({said})", server.conn.addr),
            None => server.conn.addr.to_string(),
        });
        let replay = server.replay;
        drop(server.conn);
        tracing::warn!(%node, "server connection lost");
        self.shared.topology.report_unreachable(node);
        if let Some(replay) = replay
            && self.waiting.is_none()
        {
            return self.replay(replay).await;
        }
        if self.mode() == PoolMode::Session {
            return Err(lost.into());
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

    /// Runs a read that got no answer again, from the start, on another node.
    /// Nothing reached the client yet, so it sees one answer, as if nothing happened.
    async fn replay(&mut self, replay: Replay) -> Result<(), ClientError> {
        tracing::info!(
            frames = replay.frames.len(),
            "replaying a read on another node"
        );
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
        for frame in replay.frames {
            self.on_client_message(frame).await?;
        }
        Ok(())
    }

    /// `SET`/`RESET`/`SHOW tidepool.*`: answered by the proxy, never forwarded.
    async fn proxy_command(&mut self, command: &ProxyCommand) -> Result<(), ClientError> {
        let reply = match command {
            ProxyCommand::Set { name, value } => self.set_proxy_param(name, Some(value)),
            ProxyCommand::Reset { name } => self.set_proxy_param(name, None),
            ProxyCommand::Show { name } => self
                .show_proxy_param(name)
                .map(|value| backend::text_rows(&format!("tidepool.{name}"), &[&value])),
        };
        match reply {
            Ok(frames) => {
                for frame in frames {
                    self.client.send(&frame).await?;
                }
            }
            Err(error) => self.client.send(&error).await?,
        }
        self.ready(self.client_status).await
    }

    /// Sets (`Some`) or resets (`None`) a session setting of the proxy.
    fn set_proxy_param(&mut self, name: &str, value: Option<&str>) -> Result<Vec<Frame>, Frame> {
        let invalid = |expected: &str| {
            let message = format!(
                "invalid value for parameter \"tidepool.{name}\": \"{}\" (expected {expected})",
                value.unwrap_or_default()
            );
            backend::error_response(Severity::Error, "22023", &message)
        };
        match name {
            "route" => {
                self.route = match value {
                    None => SessionRoute::Auto,
                    Some(v) => SessionRoute::parse(v).ok_or_else(|| invalid("primary or auto"))?,
                }
            }
            "consistency" => {
                self.consistency.mode = match value {
                    None => self
                        .user
                        .consistency
                        .unwrap_or(self.shared.config.routing.consistency),
                    Some(v) => ConsistencyMode::parse(v).ok_or_else(|| {
                        invalid("eventual, read_your_writes, monotonic or strong")
                    })?,
                }
            }
            "min_lsn" => {
                self.consistency.min_lsn = match value {
                    None => None,
                    Some(v) => Some(
                        v.parse::<Lsn>()
                            .map_err(|_| invalid("an LSN such as 0/16B3748"))?,
                    ),
                }
            }
            _ => return Err(unknown_proxy_param(name)),
        }
        let tag = if value.is_some() { "SET" } else { "RESET" };
        Ok(vec![backend::command_complete(tag)])
    }

    fn show_proxy_param(&self, name: &str) -> Result<String, Frame> {
        Ok(match name {
            "route" => self.explain_route(),
            "consistency" => self.consistency.mode.as_str().to_owned(),
            "lsn" => self.consistency.last_write.unwrap_or_default().to_string(),
            "min_lsn" => self.consistency.min_lsn.unwrap_or_default().to_string(),
            _ => return Err(unknown_proxy_param(name)),
        })
    }

    /// Where the next plain read would go, and why: `SHOW tidepool.route`.
    fn explain_route(&self) -> String {
        let topology = self.shared.topology.load();
        let floor = self.consistency.floor();
        let mode = self.consistency.mode;
        let (node, why) = if self.route == SessionRoute::Primary {
            (topology.primary(), "tidepool.route = primary".to_owned())
        } else if mode == ConsistencyMode::Strong {
            (
                topology.primary(),
                "consistency strong: reads go to the primary".to_owned(),
            )
        } else {
            let fresh = topology.read_replicas(floor).next();
            let floor_text = floor.map_or("none".to_owned(), |f| f.to_string());
            match fresh {
                Some(replica) => (
                    Some(replica),
                    format!("{}: replica at or past floor {floor_text}", mode.as_str()),
                ),
                None if topology.read_replicas(None).next().is_some() => (
                    topology.read_replicas(None).next(),
                    format!(
                        "{}: replica checked against floor {floor_text} before reading, else primary after {:?}",
                        mode.as_str(),
                        self.shared.config.routing.ryw_wait
                    ),
                ),
                None => (
                    topology.primary(),
                    "no replica serves reads: primary".to_owned(),
                ),
            }
        };
        let target = node.map_or("none".to_owned(), |n| {
            format!("{} ({} {})", n.id, n.role.as_str(), n.addr)
        });
        format!(
            "mode={} pool={} session={} next read: {target}; {why}",
            mode.as_str(),
            match self.mode() {
                PoolMode::Transaction => "transaction",
                PoolMode::Session => "session",
            },
            self.route.as_str()
        )
    }

    /// The session is over: a clean server goes back to its pool (reset with
    /// DISCARD ALL in session mode); one mid-transaction is closed.
    async fn detach_for_good(&mut self) {
        let Some(mut server) = self.server.take() else {
            return;
        };
        self.cancel.set_target(None);
        let clean = server.status == TxStatus::Idle && self.pending.is_empty() && !self.unsynced;
        if clean && self.mode() == PoolMode::Session {
            let reset = server
                .conn
                .execute("DISCARD ALL", self.shared.config.pool.connect_timeout)
                .await;
            server.conn.prepared.clear();
            server.conn.clean = reset.is_ok();
        } else {
            server.conn.clean = clean;
        }
    }
}

async fn read_server(server: Option<&mut Attached>) -> std::io::Result<usize> {
    match server {
        Some(server) => {
            let conn = &mut *server.conn;
            if conn.read_buf.capacity() - conn.read_buf.len() < 8192 {
                conn.read_buf.reserve(32 * 1024);
            }
            conn.stream.read_buf(&mut conn.read_buf).await
        }
        None => std::future::pending().await,
    }
}

/// A failed write means the connection is gone; the session's next read from
/// it fails too and `on_server_lost` tells the client, in protocol order.
async fn send_quietly(server: &mut Attached, frame: &Frame) {
    if let Err(e) = server.conn.queue(frame).await {
        tracing::debug!(error = %e, "write to server failed");
    }
}

fn lost_protocol(e: crate::protocol::ProtocolError) -> ClientError {
    ClientError::Route(RouteError::ServerLost(format!("protocol error: {e}")))
}

fn unknown_proxy_param(name: &str) -> Frame {
    backend::error_response(
        Severity::Error,
        "42704",
        &format!("unrecognized configuration parameter \"tidepool.{name}\""),
    )
}

/// Whether a unit with this intent writes, so its commit LSN matters.
fn writes(intent: &Intent) -> bool {
    matches!(intent, Intent::Write | Intent::End)
}

/// The LSN in a one-column DataRow, `None` when it is NULL or not an LSN.
fn lsn_value(frame: &Frame) -> Option<Lsn> {
    let body = frame.body();
    let len = i32::from_be_bytes(body.get(2..6)?.try_into().ok()?);
    let text = std::str::from_utf8(body.get(6..6 + usize::try_from(len).ok()?)?).ok()?;
    text.parse().ok()
}

fn is_fatal(frame: &Frame) -> bool {
    ErrorFields::decode(frame).is_ok_and(|f| f.severity == "FATAL" || f.severity == "PANIC")
}

fn is_rollback(sql: &str) -> bool {
    let word = sql
        .trim_start()
        .split(|c: char| !c.is_ascii_alphabetic())
        .next()
        .unwrap_or("");
    word.eq_ignore_ascii_case("rollback") || word.eq_ignore_ascii_case("abort")
}
