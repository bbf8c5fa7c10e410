//! One client's session after authentication: reads its messages, routes each
//! unit of work (a transaction, or a statement outside one) to a server
//! connection, and streams the responses back.
//!
//! In transaction mode a server connection is held from the first message of
//! a unit of work until the server reports ReadyForQuery Idle with nothing
//! outstanding; then it goes back to its pool.

mod commands;
mod consistency;
mod extended;
mod lane;
mod params;
mod pending;
mod responses;
mod state;
mod statements;
mod unit;

pub use state::{Head, ParamChange, Params, PinReason, starts_copy, startup_params, sync_sql};
pub use statements::{StaleStatements, Statement};

use std::sync::Arc;
use std::time::{Duration, Instant};

use self::consistency::Consistency;
use self::pending::{Capture, Kind, ParseUndo, Pending};
use self::statements::Statements;
use super::Shared;
use super::busy_poll;
use super::cancel::CancelHandle;
use super::client::ClientConn;
use super::error::{ClientError, RouteError};
use super::stats::DatabaseStats;
use super::users::{UserEntry, UserSlot};
use crate::config::{ConsistencyMode, PoolMode};
use crate::pool::registry::CheckoutError;
use crate::pool::server::Loss;
use crate::pool::{Checkout, PoolKey, discard};
use crate::protocol::backend::{self, ErrorFields, Severity, TxStatus};
use crate::protocol::frontend::{self as fe, Bind, Named, Parse, Target};
use crate::protocol::{Frame, frame};
use crate::route::classify::{Intent, ProxyCommand};
use crate::route::hint::leading_hint;
use crate::route::policy::{Destination, Fallback, RouteReason, SessionRoute, destination};
use crate::topology::{Lsn, NodeId, Role};

/// Who the client is and what it asked for at startup.
pub struct SessionSetup {
    pub user: Arc<UserEntry>,
    /// Counts the session against the user's `max_connections` while it lives.
    pub slot: UserSlot,
    pub database: String,
    pub cancel: CancelHandle,
    /// Its startup parameters, as SQL values.
    pub params: Params,
    pub mode: ConsistencyMode,
    /// Fixed for the session's life: a reload changes it for new clients.
    pub pool_mode: PoolMode,
    /// Session mode: the primary connection checked out at startup, kept.
    pub attached: Option<Checkout>,
    /// The client's span (address, user, database), for the session's events.
    pub span: tracing::Span,
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
    /// The server's last words before it closes the connection: its FATAL
    /// ErrorResponse, or the proxy's own when it gives the server up.
    fatal: Option<Frame>,
    /// A statement the proxy inserted (a SET applying the client's settings)
    /// failed: the settings this connection has are unknown, so it is closed
    /// rather than pooled when the unit ends.
    settings_unknown: bool,
    /// The client's unnamed statement is on this connection (a simple
    /// query, the client's or the proxy's, destroys it).
    unnamed_ready: bool,
    /// Counts this unit of work among the proxy's running ones, which a
    /// switchover waits to drain.
    _busy: Busy,
}

impl Attached {
    /// A connection just taken for this client: not clean until its unit of
    /// work is over.
    fn new(mut conn: Checkout, role: Role, shared: &Shared) -> Box<Attached> {
        conn.clean = false;
        Box::new(Attached {
            conn,
            role,
            status: TxStatus::Idle,
            replay: None,
            fatal: None,
            settings_unknown: false,
            unnamed_ready: false,
            _busy: Busy::new(shared),
        })
    }
}

/// One running unit of work in `Shared::busy`, for as long as it lives.
struct Busy(Arc<std::sync::atomic::AtomicU64>);

impl Busy {
    fn new(shared: &Shared) -> Busy {
        shared
            .busy
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Busy(shared.busy.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The timeouts of `[listen]` and `[pool]`, fixed at login (a reload
/// changes them for new clients); `None`: off.
struct SessionLimits {
    client_idle: Option<Duration>,
    idle_in_transaction: Option<Duration>,
    query: Option<Duration>,
    /// `listen.busy_poll`; zero: off.
    busy_poll: Duration,
}

impl SessionLimits {
    /// Whether the client's activity needs a clock reading.
    fn watch_client(&self) -> bool {
        self.client_idle.is_some() || self.idle_in_transaction.is_some()
    }

    fn from_config(config: &crate::config::Config) -> SessionLimits {
        let on = |d: Duration| (!d.is_zero()).then_some(d);
        SessionLimits {
            client_idle: on(config.listen.client_idle_timeout),
            idle_in_transaction: on(config.listen.idle_in_transaction_timeout),
            query: on(config.pool.query_timeout),
            busy_poll: config.listen.busy_poll,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Timeout {
    ClientIdle,
    IdleInTransaction,
    Query,
}

/// What woke an idle session.
#[derive(Debug, Clone, Copy)]
enum Event {
    /// The session just began: messages may already be buffered.
    Start,
    ClientBytes,
    ServerBytes,
    /// The server connection closed or failed.
    ServerLost(Loss),
    Timeout(Timeout),
    ShutdownStarted,
    NewEpoch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Wait,
    /// The client said Terminate, or closed.
    End,
}

struct Unnamed {
    parse: Frame,
    intent: Intent,
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
    _slot: UserSlot,
    database: String,
    cancel: CancelHandle,
    /// Boxed: most clients sit idle, without one, most of the time.
    server: Option<Box<Attached>>,
    pending: Pending,
    /// Transaction status as the client last saw it.
    client_status: TxStatus,
    /// Extended-protocol messages were sent since the last Sync.
    unsynced: bool,
    route: SessionRoute,
    held_begin: Option<HeldBegin>,
    statements: Statements,
    /// The client's last unnamed Parse: PostgreSQL keeps the unnamed
    /// statement past Sync until the next unnamed Parse or simple query, so
    /// a Bind of it may come in a later transaction, on another server.
    unnamed: Option<Unnamed>,
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
    /// Named as the parent of the session's events: the session's task runs
    /// outside it (see `frontend::serve_client`).
    span: tracing::Span,
    consistency: Consistency,
    pool_mode: PoolMode,
    /// This database's SHOW STATS counters.
    stats: Arc<DatabaseStats>,
    limits: SessionLimits,
    /// The client's last bytes, for the idle timeouts.
    client_active_at: Instant,
    /// Since when the server owes a reply and has sent nothing.
    owed_since: Option<Instant>,
    /// query_timeout has sent a cancel for the reply owed now.
    query_cancelled: bool,
    /// New topology epochs: a transaction on a primary that lost its epoch
    /// is ended at once, not left to write to a fenced node.
    epochs: crate::bell::Listener,
    /// The current extended batch ends a write: learn the commit LSN at Sync.
    unit_writes: bool,
    /// ...or run a COPY: then learn it only once the unit is over.
    unit_copies: bool,
    /// A capture owed once the server is ready again (after a COPY); `true` after a write.
    capture_when_ready: Option<bool>,
    /// The client's ReadyForQuery after a write, held until the commit LSN
    /// is known so that its `tidepool.lsn` ParameterStatus comes first, as
    /// PostgreSQL orders ParameterStatus: a client has the token as soon as
    /// its COMMIT returns, and nothing arrives while it sits idle (which a
    /// client waiting for notifications would take for one). The capture was
    /// pipelined behind the statement, so this costs its execution, not a
    /// round trip.
    held_ready: Option<Frame>,
    /// `tidepool.report_lsn`: every write's commit LSN is asked and sent as
    /// the `tidepool.lsn` token. Off, it is asked only when the session's
    /// mode reads its own writes: one statement less on the primary per
    /// write transaction, for sessions that pass no tokens.
    report_lsn: bool,
    /// The replica turned out behind this floor: the read in flight is
    /// hidden from the client and redone.
    stale_read: Option<Lsn>,
    /// The next unit of work goes to the primary whatever it is...
    force_primary: Option<Fallback>,
    /// ...or first to this replica, which has just been seen past the floor.
    prefer_replica: Option<NodeId>,
    /// When the unit of work on the attached server was routed.
    unit_started: Option<std::time::Instant>,
    /// Pool handles by node, filled on first use.
    pools: Vec<Option<crate::pool::registry::PoolHandle>>,
    /// Where lanes answer this session's reads, made on first use.
    lane_replies: Option<Box<crate::pool::lane::Replies>>,
    /// Hears the proxy start its shutdown (`Shared::stopping`).
    stopping: crate::bell::Listener,
    draining: bool,
}

impl Session {
    pub fn new(shared: Arc<Shared>, client: ClientConn, setup: SessionSetup) -> Session {
        let SessionSetup {
            user,
            slot,
            database,
            cancel,
            params,
            mode,
            pool_mode,
            attached,
            span,
        } = setup;
        let epochs = shared.topology.epochs();
        let stopping = shared.stopping.listen();
        let stats = shared.stats.database(&database);
        let config = shared.config.load();
        let limits = SessionLimits::from_config(&config);
        let report_lsn = config.routing.report_lsn;
        drop(config);
        let mut client = client;
        client.count_into(stats.clone());
        let server = attached.map(|conn| Attached::new(conn, Role::Primary, &shared));
        Session {
            shared,
            client,
            user,
            _slot: slot,
            database,
            cancel,
            server,
            pending: Pending::default(),
            client_status: TxStatus::Idle,
            unsynced: false,
            route: SessionRoute::Auto,
            held_begin: None,
            statements: Statements::default(),
            unnamed: None,
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
            span,
            consistency: Consistency::new(mode),
            pool_mode,
            stats,
            limits,
            client_active_at: Instant::now(),
            owed_since: None,
            query_cancelled: false,
            epochs,
            unit_writes: false,
            unit_copies: false,
            capture_when_ready: None,
            held_ready: None,
            report_lsn,
            stale_read: None,
            force_primary: None,
            prefer_replica: None,
            unit_started: None,
            pools: Vec::new(),
            lane_replies: None,
            stopping,
            draining: false,
        }
    }
    pub async fn run(&mut self) -> Result<(), ClientError> {
        let serving = std::panic::AssertUnwindSafe(self.serve());
        let result = match futures_util::FutureExt::catch_unwind(serving).await {
            Ok(result) => result,
            Err(panic) => {
                Box::pin(self.after_panic()).await;
                std::panic::resume_unwind(panic);
            }
        };
        // Boxed, as the event handling is: it runs once, at the end.
        Box::pin(self.end(&result)).await;
        result
    }
    /// Gives the server connection back (or closes it), tells the client
    /// why its session ended, and closes.
    async fn end(&mut self, result: &Result<(), ClientError>) {
        self.detach_for_good().await;
        if let Err(e) = result
            && let Some(frame) = e.to_frame()
        {
            let _ = self.client.send(&frame).await;
        }
        self.client.shutdown().await;
    }
    /// A bug ended the session: the client is told so (unless it is in the
    /// middle of a message it will never see the end of) and its server
    /// connection, in whatever state the bug left it, is closed. The panic
    /// then goes on to `serve_client`, which logs and counts it.
    async fn after_panic(&mut self) {
        if let Some(server) = self.server.take() {
            discard(server.conn);
        }
        if self.passthrough == 0 {
            let error = backend::error_response(
                Severity::Fatal,
                "XX000",
                "internal error in the proxy: this session was ended, others go on",
            );
            let _ = self.client.send(&error).await;
        }
        self.client.shutdown().await;
    }
    /// Waits for the next event and handles it. The handling (routing,
    /// checkouts, streaming responses) is a large future and is boxed: the
    /// task of a client that sits idle holds only the wait below, which is
    /// what makes an idle client cost a few KiB. A busy session keeps its
    /// box from event to event (see `handle_while_busy`).
    async fn serve(&mut self) -> Result<(), ClientError> {
        let mut event = Event::Start;
        loop {
            if Box::pin(self.handle_while_busy(event)).await? == Flow::End {
                return Ok(());
            }
            match self.next_event().await? {
                Some(next) => event = next,
                None => return Ok(()),
            }
        }
    }
    /// Handles `event` and the ones after it for as long as a server is
    /// attached (a transaction, replies owed): what woke the session, then
    /// every complete client message buffered, then a flush of both sides.
    /// A box per event was an allocation of over a KiB, too large for the
    /// allocator's fast path, and its copy: some 14 a TPC-B transaction. And
    /// one loop, not a call per event: an async call's future is built and
    /// moved before it runs, and a handler of any event holds the futures
    /// of all (callgrind: 81.5K instructions per TPC-B transaction with the
    /// call, 80.6K without).
    async fn handle_while_busy(&mut self, mut event: Event) -> Result<Flow, ClientError> {
        loop {
            if self.stopping.value() != 0 {
                self.draining = true;
            }
            match event {
                Event::Start => {}
                Event::ClientBytes => {
                    if self.limits.watch_client() {
                        self.client_active_at = Instant::now();
                    }
                }
                Event::ServerBytes => {
                    self.owed_since = None;
                    self.pump_server().await?;
                }
                Event::ServerLost(loss) => self.on_server_lost(Some(loss)).await?,
                Event::Timeout(timeout) => self.on_timeout(timeout).await?,
                // `draining` is set above, for a busy session too.
                Event::ShutdownStarted => {}
                Event::NewEpoch => self.on_new_epoch().await?,
            }
            // The message held until the server had answered what came
            // before it, then every complete one buffered. One call site:
            // each `.await` of a message's handling moves its future (over
            // a KiB) into place.
            loop {
                let frame = match self.waiting.take() {
                    Some(frame) if self.pending.is_empty() => frame,
                    Some(frame) => {
                        self.waiting = Some(frame);
                        break;
                    }
                    None => match self.client.try_frame()? {
                        Some(frame) => {
                            if matches!(frame.tag(), fe::QUERY | fe::EXECUTE) {
                                self.stats.query();
                            }
                            frame
                        }
                        None => break,
                    },
                };
                let kept = frame.clone();
                let go_on = self.on_client_message(frame).await?;
                self.keep_for_replay(kept);
                if !go_on {
                    return Ok(Flow::End);
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
            if self.server.is_none() {
                return Ok(Flow::Wait);
            }
            match self.next_event().await? {
                Some(next) => event = next,
                None => return Ok(Flow::End),
            }
        }
    }
    /// What wakes the session next; `None` when the client has closed.
    async fn next_event(&mut self) -> Result<Option<Event>, ClientError> {
        let on_primary = self
            .server
            .as_ref()
            .is_some_and(|s| s.role == Role::Primary);
        let timeout = self.next_timeout();
        let expiry = async {
            match timeout {
                Some((at, _)) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let idle = self.server.is_none();
        let server = self.server.as_deref_mut();
        // Polled in this order, not from a random start: a busy session
        // waits for its server, and the random start cost a draw and, half
        // the time, a poll of the client's socket first (callgrind: 71.7K to
        // 70.2K instructions a TPC-B transaction). While a server streams,
        // the client's next messages wait in its socket as they would for
        // PostgreSQL, query_timeout counts from the server's last bytes,
        // and a new epoch is seen when the stream pauses.
        let wait = async {
            Ok(Some(tokio::select! {
                biased;
                read = responses::read_server(server) => match Loss::of_read(&read) {
                    Some(loss) => Event::ServerLost(loss),
                    None => Event::ServerBytes,
                },
                read = self.client.fill(idle), if self.waiting.is_none() => match read? {
                    0 => return Ok(None),
                    _ => Event::ClientBytes,
                },
                _ = expiry => Event::Timeout(timeout.expect("armed").1),
                // Only an idle session is woken to end: a busy one sees the
                // shutdown at its next event (in `handle_while_busy`).
                _ = self.stopping.changed(), if !self.draining && idle => Event::ShutdownStarted,
                _ = self.epochs.changed(), if on_primary => Event::NewEpoch,
            }))
        };
        // Only while no other unit of work runs: this session's own, if
        // any, is the one waited on.
        let busy = &self.shared.busy;
        let own = u64::from(!idle);
        let may_spin = || busy.load(std::sync::atomic::Ordering::Relaxed) <= own;
        let (event, spin) = busy_poll::wait(wait, self.limits.busy_poll, may_spin).await;
        self.shared.metrics.busy_polled(spin);
        event
    }
    /// When the session's next timeout fires, if one is configured for what
    /// it is doing now: waiting for a server's answer (query_timeout), or for
    /// its client inside a transaction or between them.
    fn next_timeout(&mut self) -> Option<(Instant, Timeout)> {
        let owed = self.server.is_some() && !self.pending.is_empty();
        if !owed {
            self.owed_since = None;
            self.query_cancelled = false;
        }
        // Mid-batch without Sync the server may be waiting for the client:
        // no timer blames either side then.
        if owed || self.unsynced || self.waiting.is_some() {
            let limit = self.limits.query.filter(|_| owed && !self.unsynced)?;
            let since = *self.owed_since.get_or_insert_with(Instant::now);
            return Some((since + limit, Timeout::Query));
        }
        match self.client_status {
            TxStatus::Idle => self
                .limits
                .client_idle
                .map(|limit| (self.client_active_at + limit, Timeout::ClientIdle)),
            _ => self
                .limits
                .idle_in_transaction
                .map(|limit| (self.client_active_at + limit, Timeout::IdleInTransaction)),
        }
    }
    async fn on_timeout(&mut self, timeout: Timeout) -> Result<(), ClientError> {
        match timeout {
            Timeout::ClientIdle => Err(ClientError::IdleTimeout),
            Timeout::IdleInTransaction => Err(ClientError::IdleInTransactionTimeout),
            Timeout::Query if !self.query_cancelled => {
                let Some(server) = &self.server else {
                    return Ok(());
                };
                tracing::warn!(parent: &self.span, addr = %server.conn.addr, "query_timeout: cancelling the query");
                self.shared
                    .cancels
                    .send_cancel(server.conn.addr, server.conn.key)
                    .await;
                self.query_cancelled = true;
                self.owed_since = Some(Instant::now());
                Ok(())
            }
            Timeout::Query => {
                let span = &self.span;
                if let Some(server) = &mut self.server {
                    tracing::warn!(parent: span, addr = %server.conn.addr, "query_timeout: no answer to the cancel either; giving the server up");
                    server.fatal = Some(backend::error_response(
                        Severity::Fatal,
                        "08006",
                        "no answer within query_timeout, even to a cancel",
                    ));
                }
                self.on_server_lost(None).await
            }
        }
    }
    /// The attached primary connection belongs to a node that is no longer
    /// the epoch's primary: it is dropped, and the client hears 08006 with
    /// the reason, as for a lost server.
    async fn on_new_epoch(&mut self) -> Result<(), ClientError> {
        let demoted = self.server.as_ref().is_some_and(|s| {
            self.shared
                .topology
                .load()
                .lost_its_epoch(s.conn.node, s.role)
        });
        if demoted {
            tracing::warn!(parent: &self.span, "the primary lost its epoch: ending the work on it");
            self.on_server_lost(None).await?;
        }
        Ok(())
    }
    fn mode(&self) -> PoolMode {
        self.pool_mode
    }
    /// An extended batch without its Sync is open on a replica, outside
    /// any transaction block, with every reply in.
    fn ends_read_batch(&self) -> bool {
        self.unsynced
            && self.pending.is_empty()
            && self.pinned.is_none()
            && self.client_status == TxStatus::Idle
            && self.held_begin.is_none()
            && self.mode() == PoolMode::Transaction
            && self
                .server
                .as_ref()
                .is_some_and(|s| s.role == Role::Replica)
    }
    fn is_between_transactions(&self) -> bool {
        self.pending.is_empty()
            && !self.unsynced
            && self.held_begin.is_none()
            && self.client_status == TxStatus::Idle
    }
    /// Keeps a message the client sent for the unit of work under way, so
    /// that a read can be run again elsewhere if its server is lost before
    /// it answers (and not one it holds for later: that one is kept when
    /// it runs).
    fn keep_for_replay(&mut self, sent: Frame) {
        if self.waiting.is_none()
            && let Some(replay) = self.server.as_mut().and_then(|s| s.replay.as_mut())
        {
            replay.bytes += sent.raw().len();
            replay.frames.push(sent);
            if replay.bytes > REPLAY_LIMIT {
                self.server.as_mut().expect("attached").replay = None;
            }
        }
    }
    /// Handles one message from the client; `false` when it ends the session.
    async fn on_client_message(&mut self, frame: Frame) -> Result<bool, ClientError> {
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
        if self.ends_read_batch() {
            // Extended messages (Parse/Describe/Flush, as asyncpg sends to
            // learn a table's columns before a COPY) left a read open on a
            // replica, and a simple query follows without a Sync. PostgreSQL
            // would end that batch's implicit transaction at the query; the
            // proxy ends it with a Sync of its own, so that the query is
            // routed by what it is, not run on the replica.
            let sync = fe::sync();
            self.send_to_server(&sync).await?;
            self.pending.push(Kind::Sync, false);
            self.unsynced = false;
        }
        if !self.pending.is_empty() {
            // Let the server finish the previous unit of work: where this one
            // runs depends on the transaction state that work leaves.
            self.waiting = Some(frame);
            return Ok(());
        }
        let sql = fe::query_text(&frame)?;
        let classifier = &self.shared.classifier;
        let intent = match sql {
            None => Intent::Write,
            // Inside a transaction block, attached or with its BEGIN held,
            // the route is the block's.
            Some(sql) if self.client_status != TxStatus::Idle => {
                classifier.classify_in_transaction(sql)
            }
            Some(sql) => classifier.classify(sql),
        };
        if let Intent::Proxy(command) = &intent {
            return self.proxy_command(command).await;
        }
        let head = sql.map(state::Head::of);
        if let Some(head) = head {
            if let Some(reason) = head.pin_reason() {
                self.pin(reason);
            }
            match head.param_change() {
                Ok(Some(ParamChange::Deallocate { name }))
                    if self.mode() == PoolMode::Transaction
                        && self.statements.get(name.as_bytes()).is_some() =>
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
                // Outside a transaction, as PostgreSQL answers it, without a
                // server: after a lost connection, a client's ROLLBACK must
                // not depend on a primary being there.
                Intent::End
                    if self.held_begin.is_none() && self.client_status == TxStatus::Idle =>
                {
                    let tag = if sql.is_some_and(is_rollback) {
                        "ROLLBACK"
                    } else {
                        "COMMIT"
                    };
                    let warning = backend::warning("25P01", "there is no transaction in progress");
                    self.client.send(&warning).await?;
                    self.client.send(&backend::command_complete(tag)).await?;
                    return self.ready(TxStatus::Idle).await;
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
            let hint = sql.and_then(leading_hint);
            if intent == Intent::Read
                && head.is_some_and(|head| !head.starts_copy())
                && self.read_on_lane(&frame, hint).await?
            {
                return Ok(());
            }
            if !self.start_unit(&intent, hint).await? {
                return self.ready(self.client_status).await;
            }
        }
        // SET, RESET, DISCARD and DEALLOCATE go to the primary but write no
        // WAL: no commit LSN to learn.
        let ends_writes = ends_write(&intent, self.client_status) && self.param_change.is_none();
        self.unnamed = None;
        self.forward(&frame, Kind::Query).await?;
        self.capture_after_unit(ends_writes, head.is_none_or(|head| head.starts_copy()))
            .await
    }
    async fn send_to_server(&mut self, frame: &Frame) -> Result<(), ClientError> {
        let server = self.server.as_mut().expect("attached");
        if frame.tag() == fe::QUERY {
            server.unnamed_ready = false;
        }
        send_quietly(server, frame).await;
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
        // The failed batch committed nothing: no commit LSN to learn.
        self.unit_writes = false;
        self.unit_copies = false;
        if self.server.is_some() {
            self.forward(&sync, Kind::Sync).await?;
            self.unsynced = false;
            Ok(())
        } else {
            self.unsynced = false;
            self.ready(self.client_status).await
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
                if server.settings_unknown {
                    discard(server.conn);
                    return;
                }
                server.conn.clean = true;
                if let Some(started) = self.unit_started.take() {
                    let took = started.elapsed();
                    self.shared.metrics.unit_done(server.role, took);
                    self.stats.transaction_done(took);
                }
            }
        }
    }
    /// The session is over: a clean server goes back to its pool (reset with
    /// DISCARD ALL in session mode); one mid-transaction is closed.
    async fn detach_for_good(&mut self) {
        let Some(mut server) = self.server.take() else {
            return;
        };
        self.cancel.set_target(None);
        let clean = server.status == TxStatus::Idle && self.pending.is_empty() && !self.unsynced;
        if !clean {
            // Its transaction (and locks) must end now, not when the pool
            // next looks at it: close it. A backend notices a closed socket
            // only when it next reads or writes, so a statement still
            // running inside a transaction block would hold the block's
            // locks until it finished, for a transaction that can only roll
            // back: it is cancelled. One running outside a block is left to
            // finish, and commit, as it would if its client had gone from
            // a direct connection.
            if !self.pending.is_empty() && server.status != TxStatus::Idle {
                self.shared
                    .cancels
                    .send_cancel(server.conn.addr, server.conn.key)
                    .await;
            }
            discard(server.conn);
            return;
        }
        // A pinned client left session state (temp tables, LISTEN, locks).
        if self.mode() == PoolMode::Session || self.pinned.is_some() {
            let reset = server
                .conn
                .execute(
                    "DISCARD ALL",
                    self.shared.config.load().pool.connect_timeout,
                )
                .await;
            server.conn.prepared.clear();
            server.conn.applied.clear();
            if reset.is_err() {
                discard(server.conn);
                return;
            }
        }
        server.conn.clean = true;
    }
}

/// A failed write means the connection is gone; the session's next read from
/// it fails too and `on_server_lost` tells the client, in protocol order.
async fn send_quietly(server: &mut Attached, frame: &Frame) {
    if let Err(e) = server.conn.queue(frame).await {
        tracing::debug!(error = %e, "write to server failed");
    }
}

/// Whether a statement ends a write, so that its commit LSN is worth
/// learning: COMMIT, or a write outside a transaction block (inside one,
/// the LSN before COMMIT tells nothing).
fn ends_write(intent: &Intent, status: TxStatus) -> bool {
    match intent {
        Intent::End => true,
        Intent::Write => status == TxStatus::Idle,
        _ => false,
    }
}

/// A hot standby refuses serializable transactions: a session whose
/// default isolation is serializable reads from the primary.
fn serializable(params: &Params) -> bool {
    params
        .get("default_transaction_isolation")
        .is_some_and(|v| v.to_ascii_lowercase().contains("serializable"))
}

fn is_rollback(sql: &str) -> bool {
    let word = sql
        .trim_start()
        .split(|c: char| !c.is_ascii_alphabetic())
        .next()
        .unwrap_or("");
    word.eq_ignore_ascii_case("rollback") || word.eq_ignore_ascii_case("abort")
}
