//! Cancel keys: the proxy hands each client its own key and remembers which
//! server connection, if any, is serving that client right now.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::io::AsyncWriteExt;

use crate::pool::ServerError;
use crate::pool::stream::ServerStream;
use crate::protocol::backend::BackendKey;
use crate::protocol::startup;
use crate::server_tls::ServerTls;

struct Entry {
    secret: i32,
    /// The server connection currently serving the client.
    target: Option<(SocketAddr, BackendKey)>,
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
    pub fn register(&self, pid: Option<i32>) -> CancelHandle {
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
            },
        );
        CancelHandle {
            registry: self.clone(),
            key,
        }
    }

    /// Forwards a client's CancelRequest to the server connection serving it.
    /// A wrong secret, an unknown key or an idle client: nothing happens, as
    /// with PostgreSQL.
    pub async fn cancel(&self, key: BackendKey) {
        let target = {
            let entries = self.entries.lock().expect("cancel lock");
            entries
                .get(&key.pid)
                .filter(|e| e.secret == key.secret)
                .and_then(|e| e.target)
        };
        let Some((addr, server_key)) = target else {
            return;
        };
        let connect = ServerStream::connect(addr, &self.tls);
        let connected = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .unwrap_or(Err(ServerError::Timeout));
        let mut stream = match connected {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(%addr, error = %e, "could not forward cancel request");
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
    pub fn set_target(&self, target: Option<(SocketAddr, BackendKey)>) {
        if let Some(entry) = self
            .registry
            .entries
            .lock()
            .expect("cancel lock")
            .get_mut(&self.key.pid)
        {
            entry.target = target;
        }
    }
}

impl Drop for CancelHandle {
    fn drop(&mut self) {
        if let Ok(mut entries) = self.registry.entries.lock() {
            entries.remove(&self.key.pid);
        }
    }
}
