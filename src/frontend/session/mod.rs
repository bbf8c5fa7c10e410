//! One client's session after authentication: reads its messages, routes each
//! unit of work (a transaction, or a statement outside one) to a server
//! connection, and streams the responses back.
//!
//! In transaction mode a server connection is held from the first message of
//! a unit of work until the server reports ReadyForQuery Idle with nothing
//! outstanding; then it goes back to its pool.

mod pending;
mod state;
mod statements;

pub use state::{Params, startup_params, sync_sql};

use std::sync::Arc;

use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use self::pending::{Kind, ParseUndo, Pending};
use self::state::{ParamChange, PinReason};
use self::statements::{Statement, Statements};
use super::Shared;
use super::cancel::CancelHandle;
use super::client::ClientConn;
use super::error::{ClientError, RouteError};
use super::users::UserEntry;
use crate::config::PoolMode;
use crate::pool::registry::CheckoutError;
use crate::pool::{Checkout, PoolKey, ServerError};
use crate::protocol::backend::{self, ErrorFields, Severity, TxStatus};
use crate::protocol::frontend::{self as fe, Bind, Named, Parse, Target};
use crate::protocol::{Frame, frame};
use crate::route::classify::{Intent, ProxyCommand};
use crate::route::hint::leading_hint;
use crate::route::policy::{Destination, SessionRoute, destination};
use crate::topology::NodeId;

/// A server connection serving this client right now.
struct Attached {
    conn: Checkout,
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
    shutdown: watch::Receiver<bool>,
    draining: bool,
}

impl Session {
    pub fn new(
        shared: Arc<Shared>,
        client: ClientConn,
        user: Arc<UserEntry>,
        database: String,
        cancel: CancelHandle,
        params: Params,
        shutdown: watch::Receiver<bool>,
    ) -> Session {
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
                    Ok(n) if n > 0 => {
                        if let Some(server) = &mut self.server {
                            server.replay = None;
                        }
                        self.pump_server().await?
                    }
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
        self.forward(&frame, Kind::Query).await
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
                return Ok(());
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
            if let Ok(sql) = std::str::from_utf8(parse.query) {
                self.pin_if_needed_extended(sql);
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
        let destination = match self.mode() {
            PoolMode::Session => Destination::Primary,
            PoolMode::Transaction => destination(
                intent,
                hint,
                self.route,
                self.held_begin.as_ref().map(|h| h.read_only),
            ),
        };
        if let Err(e) = self.attach(destination).await {
            tracing::debug!(error = %e, "no server for statement");
            self.client.send(&e.to_frame(Severity::Error)).await?;
            if self.held_begin.is_some() {
                self.client_status = TxStatus::Failed;
            }
            return Ok(false);
        }
        self.sync_params().await?;
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

    async fn attach(&mut self, destination: Destination) -> Result<(), RouteError> {
        let candidates: Vec<(NodeId, std::net::SocketAddr)> = {
            let topology = self.shared.topology.load();
            self.shared
                .picker
                .candidates(&topology, destination)
                .into_iter()
                .map(|id| (id, topology.node(id).addr))
                .collect()
        };
        let mut last_error = match destination {
            Destination::Primary => RouteError::NoPrimary,
            Destination::Replica => RouteError::NoServer,
        };
        for (node, addr) in candidates {
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
            if tag == backend::DATA_ROW || tag == fe::COPY_DATA {
                self.emit_synthetic().await?;
                self.passthrough = total;
                self.passthrough_visible = self.pending.head_visible();
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
                if visible {
                    self.client.send(&frame).await?;
                } else if let Ok(fields) = ErrorFields::decode(&frame) {
                    tracing::warn!(code = %fields.code, message = %fields.message, "error from a statement the proxy inserted");
                }
            }
            backend::READY_FOR_QUERY => {
                let status = TxStatus::decode(&frame).map_err(lost_protocol)?;
                if let Some(server) = &mut self.server {
                    server.status = status;
                }
                if self.pending.on_reply(backend::READY_FOR_QUERY) {
                    self.client_status = status;
                    self.client.send(&frame).await?;
                    self.settle_param_changes(status).await?;
                }
                self.emit_synthetic().await?;
                self.release_if_done();
            }
            backend::COPY_IN_RESPONSE if self.pending.head_is_execute() => {
                // The client's next Sync, after CopyDone, is the one that answers.
                self.pending.forget_next_sync();
                self.unsynced = true;
                self.pending.on_reply(backend::COPY_IN_RESPONSE);
                self.client.send(&frame).await?;
            }
            tag => {
                if self.pending.on_reply(tag) {
                    if tag == backend::COMMAND_COMPLETE {
                        self.last_command = Some(frame.body().to_vec());
                    }
                    self.client.send(&frame).await?;
                }
            }
        }
        Ok(())
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

    async fn proxy_command(&mut self, command: &ProxyCommand) -> Result<(), ClientError> {
        let unknown = |name: &str| {
            backend::error_response(
                Severity::Error,
                "42704",
                &format!("unrecognized configuration parameter \"tidepool.{name}\""),
            )
        };
        match command {
            ProxyCommand::Set { name, value } if name == "route" => {
                match SessionRoute::parse(value) {
                    Some(route) => {
                        self.route = route;
                        self.client.send(&backend::command_complete("SET")).await?;
                    }
                    None => {
                        let message = format!(
                            "invalid value for parameter \"tidepool.route\": \"{value}\" (expected primary or auto)"
                        );
                        self.client
                            .send(&backend::error_response(Severity::Error, "22023", &message))
                            .await?;
                    }
                }
            }
            ProxyCommand::Reset { name } if name == "route" => {
                self.route = SessionRoute::Auto;
                self.client
                    .send(&backend::command_complete("RESET"))
                    .await?;
            }
            ProxyCommand::Show { name } if name == "route" => {
                for frame in backend::text_rows("tidepool.route", &[self.route.as_str()]) {
                    self.client.send(&frame).await?;
                }
            }
            ProxyCommand::Set { name, .. }
            | ProxyCommand::Reset { name }
            | ProxyCommand::Show { name } => self.client.send(&unknown(name)).await?,
        }
        self.ready(self.client_status).await
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
    if let Err(e) = server.conn.send(frame).await {
        tracing::debug!(error = %e, "write to server failed");
    }
}

fn lost_protocol(e: crate::protocol::ProtocolError) -> ClientError {
    ClientError::Route(RouteError::ServerLost(format!("protocol error: {e}")))
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
