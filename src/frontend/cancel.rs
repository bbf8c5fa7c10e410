//! Cancel keys: the proxy hands each client its own key and remembers which
//! server connection, if any, is serving that client right now. That makes
//! this registry the one place that knows every client from outside its
//! session, so SHOW CLIENTS reads it too.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;

use crate::pool::ServerError;
use crate::pool::stream::ServerStream;
use crate::protocol::backend::BackendKey;
use crate::protocol::startup;
use crate::server_tls::ServerTls;

/// Who a client is, fixed at login.
pub struct ClientInfo {
    pub user: String,
    pub database: String,
    pub addr: SocketAddr,
    pub local: Option<SocketAddr>,
    pub application_name: String,
    pub tls: bool,
    pub connected_at: SystemTime,
}

/// PgBouncer's client states: linked to a server, between transactions, or
/// waiting for a server connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    Active,
    Idle,
    Waiting,
}

impl ClientState {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientState::Active => "active",
            ClientState::Idle => "idle",
            ClientState::Waiting => "waiting",
        }
    }
}

struct Entry {
    secret: i32,
    /// The server connection currently serving the client.
    target: Option<(SocketAddr, BackendKey)>,
    info: Arc<ClientInfo>,
    state: ClientState,
    /// When the client last got a server (PgBouncer's request_time).
    request_at: Option<SystemTime>,
    waiting_since: Option<Instant>,
    /// Woken by a cancel while the client waits for a server connection:
    /// its statement has reached no server, so the proxy cancels it itself.
    waiter: Option<Arc<Notify>>,
    /// A cancel came during the wait; its session may have taken a server
    /// connection before it woke (see `CancelHandle::attach`).
    cancelled_waiting: bool,
}

impl Entry {
    fn serve_from(&mut self, target: Option<(SocketAddr, BackendKey)>) {
        self.target = target;
        self.waiting_since = None;
        self.waiter = None;
        self.cancelled_waiting = false;
        self.state = match target {
            Some(_) => {
                self.request_at = Some(SystemTime::now());
                ClientState::Active
            }
            None => ClientState::Idle,
        };
    }
}

/// One client as SHOW CLIENTS lists it.
pub struct ClientView {
    pub pid: i32,
    pub info: Arc<ClientInfo>,
    pub state: ClientState,
    pub request_at: Option<SystemTime>,
    pub waiting: Duration,
    pub server: Option<(SocketAddr, BackendKey)>,
}

#[derive(Clone)]
pub struct CancelRegistry {
    entries: Arc<Mutex<HashMap<i32, Entry>>>,
    /// A cancel reaches the node the way the pools' connections do, over
    /// TLS when `[cluster] sslmode` says so: the server's key stays private.
    tls: ServerTls,
    /// Connecting to the node (and the TLS handshake) must end within this.
    connect_timeout: Duration,
}

/// A client's registration; dropping it forgets the key.
pub struct CancelHandle {
    registry: CancelRegistry,
    pub key: BackendKey,
}

impl CancelRegistry {
    pub fn new(tls: ServerTls, connect_timeout: Duration) -> CancelRegistry {
        CancelRegistry {
            entries: Arc::default(),
            tls,
            connect_timeout,
        }
    }

    /// A new key, with `pid` when one is wanted and free (session mode: the
    /// server backend's own pid), else a random one.
    pub fn register(&self, pid: Option<i32>, info: Arc<ClientInfo>) -> CancelHandle {
        let mut rng = rand::thread_rng();
        let mut entries = self.entries.lock().expect("cancel lock");
        let mut wanted = pid;
        let key = loop {
            let pid = wanted.take().unwrap_or_else(|| rng.gen_range(1..i32::MAX));
            if !entries.contains_key(&pid) {
                break BackendKey {
                    pid,
                    secret: rng.r#gen(),
                };
            }
        };
        entries.insert(
            key.pid,
            Entry {
                secret: key.secret,
                target: None,
                info,
                state: ClientState::Idle,
                request_at: None,
                waiting_since: None,
                waiter: None,
                cancelled_waiting: false,
            },
        );
        CancelHandle {
            registry: self.clone(),
            key,
        }
    }

    /// Every registered client, for SHOW CLIENTS.
    pub fn clients(&self) -> Vec<ClientView> {
        let entries = self.entries.lock().expect("cancel lock");
        let mut views: Vec<ClientView> = entries
            .iter()
            .map(|(&pid, e)| ClientView {
                pid,
                info: e.info.clone(),
                state: e.state,
                request_at: e.request_at,
                waiting: e.waiting_since.map(|w| w.elapsed()).unwrap_or_default(),
                server: e.target,
            })
            .collect();
        views.sort_by_key(|v| v.info.connected_at);
        views
    }

    /// How many clients are in each state, for the metrics.
    pub fn count_by_state(&self) -> Vec<(ClientState, usize)> {
        let entries = self.entries.lock().expect("cancel lock");
        [ClientState::Active, ClientState::Idle, ClientState::Waiting]
            .into_iter()
            .map(|state| (state, entries.values().filter(|e| e.state == state).count()))
            .collect()
    }

    /// Forwards a client's CancelRequest to the server connection serving it,
    /// or, while it waits for one, wakes its session to cancel the wait.
    /// A wrong secret, an unknown key or an idle client: nothing happens, as
    /// with PostgreSQL.
    pub async fn cancel(&self, key: BackendKey) {
        let target = {
            let mut entries = self.entries.lock().expect("cancel lock");
            let Some(entry) = entries.get_mut(&key.pid).filter(|e| e.secret == key.secret) else {
                return;
            };
            if let Some(waiter) = &entry.waiter {
                waiter.notify_one();
                entry.cancelled_waiting = true;
            }
            entry.target
        };
        if let Some((addr, server_key)) = target {
            self.send_cancel(addr, server_key).await;
        }
    }

    /// Asks the server at `addr` to cancel what the backend `key` is
    /// running, the way the pools reach that node (TLS or not).
    ///
    /// Boxed: a TLS connect is a future of over a kilobyte, and sessions
    /// await this on paths that every statement's future carries (and
    /// moves) even though they almost never run.
    pub async fn send_cancel(&self, addr: SocketAddr, server_key: BackendKey) {
        Box::pin(self.connect_and_cancel(addr, server_key)).await
    }

    async fn connect_and_cancel(&self, addr: SocketAddr, server_key: BackendKey) {
        let connect = ServerStream::connect(addr, &self.tls);
        let connected = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .unwrap_or(Err(ServerError::Timeout));
        let mut stream = match connected {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(%addr, error = %e, "could not send a cancel request");
                return;
            }
        };
        // The server closes once it has read the request: errors after the
        // write say nothing about the cancel.
        let send = async {
            stream
                .write_all(&startup::encode_cancel(server_key))
                .await?;
            stream.flush().await?;
            stream.shutdown().await
        };
        let _ = tokio::time::timeout(self.connect_timeout, send).await;
    }
}

impl CancelHandle {
    /// The server now serving the client (`None`: back between transactions).
    pub fn set_target(&self, target: Option<(SocketAddr, BackendKey)>) {
        self.update(|entry| entry.serve_from(target));
    }

    /// `set_target` for a server the client got after waiting, unless it
    /// cancelled during the wait: a cancel that arrived as the connection
    /// was handed over went to the waiter, not to a server, and is seen
    /// here under the same lock. On `false` the client is back between
    /// transactions and its statement, sent nowhere yet, is the one cancelled.
    pub fn attach(&self, target: (SocketAddr, BackendKey)) -> bool {
        let attached = self.update(|entry| {
            let cancelled = entry.cancelled_waiting;
            entry.serve_from((!cancelled).then_some(target));
            !cancelled
        });
        attached.unwrap_or(true)
    }

    /// The client waits for a server connection; the returned `Notify` is
    /// woken if it cancels meanwhile.
    pub fn set_waiting(&self) -> Arc<Notify> {
        let waiter = Arc::new(Notify::new());
        self.update(|entry| {
            entry.state = ClientState::Waiting;
            entry.waiting_since = Some(Instant::now());
            entry.waiter = Some(waiter.clone());
            entry.cancelled_waiting = false;
        });
        waiter
    }

    /// The client's read shares a server connection with other clients'
    /// (`pool::lane`): a cancel wakes its session, which cancels that read
    /// alone, rather than going to the server, which would cancel whichever
    /// read runs.
    pub fn set_sharing(&self) -> Arc<Notify> {
        let waiter = Arc::new(Notify::new());
        self.update(|entry| {
            entry.serve_from(None);
            entry.state = ClientState::Active;
            entry.request_at = Some(SystemTime::now());
            entry.waiter = Some(waiter.clone());
        });
        waiter
    }

    fn update<R>(&self, change: impl FnOnce(&mut Entry) -> R) -> Option<R> {
        let mut entries = self.registry.entries.lock().expect("cancel lock");
        entries.get_mut(&self.key.pid).map(change)
    }
}

impl Drop for CancelHandle {
    fn drop(&mut self) {
        if let Ok(mut entries) = self.registry.entries.lock() {
            entries.remove(&self.key.pid);
        }
    }
}
