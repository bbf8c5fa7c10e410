//! The client side: accept connections, run startup and authentication, then
//! hand each client to its session.
pub mod busy_poll;
pub mod cancel;
pub mod client;
pub mod error;
pub mod handshake;
pub mod listener;
pub mod session;
pub mod stats;
pub mod users;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use self::cancel::{CancelRegistry, ClientInfo};
use self::client::ClientConn;
use self::error::{ClientError, RouteError};
use self::handshake::Opened;
use self::users::{UserEntry, Users};
use crate::config::{Config, PoolMode};
use crate::metrics::Metrics;
use crate::pool::registry::CheckoutError;
use crate::pool::{Checkout, PoolKey, Pools};
use crate::protocol::backend::{self, TxStatus};
use crate::route::classify::Classifier;
use crate::route::policy::{Destination, ReplicaPicker};
use crate::topology::SharedTopology;

/// What every session shares: configuration, pools, topology, routing state.
pub struct Shared {
    /// Swapped whole by a reload; sessions read what they need when they need it.
    pub config: Arc<ArcSwap<Config>>,
    /// The file a reload reads (none when started from a `Config` value).
    pub config_file: Option<std::path::PathBuf>,
    pub users: ArcSwap<Users>,
    pub client_slots: listener::ClientSlots,
    pub pools: Pools,
    pub topology: SharedTopology,
    pub classifier: Classifier,
    pub picker: ReplicaPicker,
    pub cancels: CancelRegistry,
    pub stale_statements: session::StaleStatements,
    /// Per-database totals for SHOW STATS.
    pub stats: stats::Stats,
    pub tls: Option<TlsAcceptor>,
    /// Units of work running now (a server attached), which a switchover
    /// waits to drain.
    pub busy: Arc<std::sync::atomic::AtomicU64>,
    pub metrics: Arc<Metrics>,
    pub ha: crate::ha::HaHandle,
    /// `[admin] user`, for the admin console (none: no console).
    pub admin: Option<Arc<users::UserEntry>>,
    /// 1 once the proxy stops accepting: what sessions hear the shutdown by
    /// (rung by the accept loop, see `crate::bell` for why not the watch).
    pub stopping: Arc<crate::bell::Bell>,
}

/// Serves one client connection from its first byte to its last.
pub async fn serve_client(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
) {
    let span = tracing::info_span!(
        "client",
        client.addr = %peer,
        user = tracing::field::Empty,
        db = tracing::field::Empty,
        pool_mode = tracing::field::Empty,
    );
    let _connected = shared.metrics.client_connected();
    // Entering a span costs hundreds of instructions, and a task enters its
    // span on every poll: 3% of what tidepool spends on a TPC-B transaction
    // (callgrind: 85.1K instructions with it, 82.4K without). So the
    // client's task runs in the span only when debug logging is on;
    // otherwise only its login does, and the session's events name the
    // span as their parent.
    let every_poll = tracing::enabled!(tracing::Level::DEBUG);
    let served = async {
        // A bug in one session must not take the process or another session
        // with it: the panic ends this client's connection, is logged and
        // counted, and everything else goes on.
        let session =
            std::panic::AssertUnwindSafe(start_session(&shared, tcp, peer, shutdown, &span));
        match futures_util::FutureExt::catch_unwind(session).await {
            Ok(Ok(()) | Err(ClientError::Gone)) => {
                tracing::debug!(parent: &span, "client disconnected")
            }
            Ok(Err(e)) => tracing::info!(parent: &span, error = %e, "client session ended"),
            Err(panic) => {
                shared.metrics.session_panicked();
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(parent: &span, panic = %what, "client session panicked; connection closed");
            }
        }
    };
    if every_poll {
        served.instrument(span.clone()).await
    } else {
        served.await
    }
}

async fn start_session(
    shared: &Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
    span: &tracing::Span,
) -> Result<(), ClientError> {
    // The startup phase's futures (a TLS handshake, SCRAM, the first
    // checkout) are boxed: inline, they would size every client's task for
    // its whole life, though they are done before the session starts.
    let login = Box::pin(log_in(shared, tcp, peer, &shutdown)).instrument(span.clone());
    let Some((client, setup)) = login.await? else {
        return Ok(());
    };
    // Owned here and lent to `run`: an async fn's arguments are stored
    // twice in its future, and the session is the biggest part of an idle
    // client.
    let mut session = session::Session::new(shared.clone(), client, setup);
    session.run().await
}

/// Startup and authentication: the client and what its session needs, or
/// `None` when there is no session to run (a cancel request, the console).
async fn log_in(
    shared: &Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    shutdown: &watch::Receiver<bool>,
) -> Result<Option<(ClientConn, session::SessionSetup)>, ClientError> {
    let local = tcp.local_addr().ok();
    let config = shared.config.load_full();
    let startup_timeout = config.listen.startup_timeout;
    let opened = tokio::time::timeout(
        startup_timeout,
        handshake::open(
            tcp,
            shared.tls.as_ref(),
            &shared.cancels,
            config.listen.max_message_size,
            shared.metrics.client_errors(),
        ),
    )
    .await
    .map_err(|_| ClientError::StartupTimeout)??;
    let Opened::Startup {
        mut client,
        startup,
        tls,
    } = opened
    else {
        return Ok(None);
    };
    if let Some(mode) = startup.get("replication").filter(|m| !is_false(m)) {
        let refused = ClientError::Replication(mode.to_owned());
        return Err(refuse(client, refused).await);
    }
    let info = |user: &str, database: &str| {
        Arc::new(ClientInfo {
            user: user.to_owned(),
            database: database.to_owned(),
            addr: peer,
            local,
            application_name: startup.get("application_name").unwrap_or("").to_owned(),
            tls,
            connected_at: std::time::SystemTime::now(),
        })
    };
    if let Some(admin) = console_user(shared, &startup) {
        tracing::Span::current().record("user", admin.name.as_str());
        tracing::Span::current().record("db", crate::admin::console::DATABASE);
        let login = tokio::time::timeout(
            startup_timeout,
            handshake::authenticate(&mut client, &admin),
        )
        .await
        .map_err(|_| ClientError::StartupTimeout)
        .and_then(|r| r);
        if let Err(e) = login {
            return Err(refuse(client, e).await);
        }
        for (name, value) in CONSOLE_PARAMETERS {
            client.send(&backend::parameter_status(name, value)).await?;
        }
        let registration = shared
            .cancels
            .register(None, info(&admin.name, crate::admin::console::DATABASE));
        client.send(&registration.key.encode()).await?;
        client
            .send(&backend::ready_for_query(TxStatus::Idle))
            .await?;
        client.flush().await?;
        // Boxed: the console's commands (a switchover through etcd) are large
        // futures that application clients' logins should not be sized for.
        return Box::pin(crate::admin::console::serve(
            shared.clone(),
            client,
            shutdown.clone(),
        ))
        .await
        .map(|()| None);
    }
    let login = tokio::time::timeout(startup_timeout, async {
        let users = shared.users.load();
        let (user, database) = handshake::find_user(&users, &startup)?;
        let user = user.clone();
        drop(users);
        tracing::Span::current().record("user", user.name.as_str());
        tracing::Span::current().record("db", database.as_str());
        tracing::Span::current().record("pool_mode", config.pool.mode.as_str());
        handshake::authenticate(&mut client, &user).await?;
        let slot = user
            .take_slot()
            .ok_or_else(|| ClientError::TooManyForUser(user.name.clone()))?;
        let wanted = session::startup_params(&startup.params);
        let (params, kept) = server_parameters(shared, &user, &database, &wanted).await?;
        Ok::<_, ClientError>((user, slot, database, params, wanted, kept))
    })
    .await
    .map_err(|_| ClientError::StartupTimeout)
    .and_then(|r| r);
    let (user, slot, database, params, wanted, kept) = match login {
        Ok(login) => login,
        Err(e) => return Err(refuse(client, e).await),
    };
    if let Some(notice) = handshake::truncation_notice(&startup) {
        client.send(&notice).await?;
    }
    for (name, value) in &params {
        client.send(&backend::parameter_status(name, value)).await?;
    }
    // In session mode the client is one server backend for life: it gets
    // that backend's pid (NOTIFY and pg_backend_pid() agree), with a secret
    // of the proxy's.
    let cancel = shared.cancels.register(
        kept.as_ref().map(|c| c.key.pid),
        info(&user.name, &database),
    );
    if let Some(conn) = &kept {
        cancel.set_target(Some((conn.addr, conn.key)));
    }
    client.send(&cancel.key.encode()).await?;
    client
        .send(&backend::ready_for_query(TxStatus::Idle))
        .await?;
    client.flush().await?;
    let consistency = user.consistency.unwrap_or(config.routing.consistency);
    let setup = session::SessionSetup {
        user,
        slot,
        database,
        cancel,
        params: wanted,
        mode: consistency,
        pool_mode: config.pool.mode,
        attached: kept,
        span: tracing::Span::current(),
    };
    Ok(Some((client, setup)))
}

/// What psql needs to hear from the console (it is no PostgreSQL server).
const CONSOLE_PARAMETERS: [(&str, &str); 5] = [
    ("server_version", "15.0 (tidepool admin console)"),
    ("server_encoding", "UTF8"),
    ("client_encoding", "UTF8"),
    ("DateStyle", "ISO, MDY"),
    ("standard_conforming_strings", "on"),
];

/// The admin console's user, when the client asks for the console database
/// as that user.
fn console_user(
    shared: &Shared,
    startup: &crate::protocol::startup::StartupMessage,
) -> Option<Arc<UserEntry>> {
    let admin = shared.admin.as_ref()?;
    let user = startup.get("user")?;
    let database = startup.get("database").unwrap_or(user);
    (database == crate::admin::console::DATABASE && user == admin.name).then(|| admin.clone())
}

/// PostgreSQL's spellings of a false boolean (`parse_bool`): a prefix of
/// `false` or `no`, `of` or `off`, or `0`. `replication=false` asks for an
/// ordinary connection.
fn is_false(value: &str) -> bool {
    let v = value.to_ascii_lowercase();
    let prefix_of = |word: &str, min: usize| v.len() >= min && word.starts_with(v.as_str());
    v == "0" || prefix_of("false", 1) || prefix_of("no", 1) || prefix_of("off", 2)
}

/// Tells the client why it cannot have a session, then closes.
async fn refuse(mut client: ClientConn, error: ClientError) -> ClientError {
    if let Some(frame) = error.to_frame() {
        let _ = client.send(&frame).await;
    }
    client.shutdown().await;
    error
}

/// A server's ParameterStatus values with the client's startup values in
/// place of the server's own (`wanted` holds them as SQL literals, made by
/// `session::quote_literal`).
fn with_own_values(
    defaults: &[(String, String)],
    wanted: &session::Params,
) -> Vec<(String, String)> {
    let own = |name: &str| {
        let literal = wanted.get(&name.to_ascii_lowercase())?;
        crate::route::fingerprint::unquote_literal(literal)
    };
    defaults
        .iter()
        .map(|(name, value)| (name.clone(), own(name).unwrap_or_else(|| value.clone())))
        .collect()
}

/// The ParameterStatus set a client gets at startup: the primary's (any
/// usable node's when there is no primary), with the client's own startup
/// parameters applied so that it sees the values the server reports for them.
/// Checking a connection out also proves the database exists and the
/// credentials work on the server (a busy pool has proved that before).
/// In session mode the connection is kept for the client's whole session
/// (when it is the primary's), so that the client can be given its pid.
async fn server_parameters(
    shared: &Shared,
    user: &UserEntry,
    database: &str,
    wanted: &session::Params,
) -> Result<(Vec<(String, String)>, Option<Checkout>), ClientError> {
    let nodes: Vec<_> = {
        let topology = shared.topology.load();
        let mut ids = shared.picker.candidates(&topology, Destination::Primary);
        ids.extend(shared.picker.candidates(&topology, Destination::Replica));
        ids.dedup();
        ids.into_iter()
            .map(|id| (id, topology.node(id).addr))
            .collect()
    };
    let session_mode = shared.config.load().pool.mode == PoolMode::Session;
    let mut last_error = RouteError::NoServer;
    for (node, addr) in nodes {
        let key = PoolKey {
            node,
            user: user.name.clone(),
            database: database.to_owned(),
        };
        let pool = shared.pools.handle(&key, addr, &user.password);
        // Every connection busy: a login does not wait for one (PgBouncer
        // does not either). It is told the server's startup values with
        // its own over them; its first unit of work applies those.
        if !session_mode && let Some(defaults) = pool.defaults_if_busy() {
            return Ok((with_own_values(&defaults, wanted), None));
        }
        match pool.checkout().await {
            Ok(mut conn) => {
                if let Some(sql) = session::sync_sql(wanted, &conn.applied) {
                    let timeout = shared.config.load().pool.connect_timeout;
                    if let Err(e) = conn.execute(&sql, timeout).await {
                        conn.clean = false;
                        return Err(
                            RouteError::from(CheckoutError::Connect { addr, source: e }).into()
                        );
                    }
                    conn.applied = wanted.clone();
                }
                let params = conn.params.clone();
                let keep = session_mode
                    && shared
                        .topology
                        .load()
                        .primary()
                        .is_some_and(|p| p.id == node);
                return Ok((params, keep.then_some(conn)));
            }
            Err(e) => last_error = e.into(),
        }
    }
    Err(last_error.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replication_false_is_spelled_as_postgresql_spells_it() {
        for value in ["false", "F", "fal", "no", "N", "off", "OF", "0"] {
            assert!(is_false(value), "{value}");
        }
        for value in ["true", "on", "o", "1", "database", "yes", "", "falsey"] {
            assert!(!is_false(value), "{value}");
        }
    }

    #[test]
    fn a_busy_pools_login_hears_its_own_values() {
        let defaults = vec![
            ("application_name".to_owned(), String::new()),
            ("TimeZone".to_owned(), "Etc/UTC".to_owned()),
            ("server_version".to_owned(), "15.18".to_owned()),
        ];
        let wanted = session::startup_params(&[
            ("application_name".into(), "it's me".into()),
            ("options".into(), "-c timezone=Asia/Tokyo".into()),
        ]);
        assert_eq!(
            with_own_values(&defaults, &wanted),
            [
                ("application_name".to_owned(), "it's me".to_owned()),
                ("TimeZone".to_owned(), "Asia/Tokyo".to_owned()),
                ("server_version".to_owned(), "15.18".to_owned()),
            ]
        );
    }
}
