//! Every open server connection, for SHOW SERVERS: deadpool keeps its
//! objects to itself, so each connection lists itself here for its lifetime.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::protocol::backend::BackendKey;

pub struct ServerInfo {
    pub addr: SocketAddr,
    pub local: Option<SocketAddr>,
    pub tls: bool,
    pub user: String,
    pub database: String,
    /// The backend's pid and secret: a client linked to this connection
    /// holds the same key as its cancel target.
    pub key: BackendKey,
    pub connected_at: SystemTime,
}

#[derive(Clone, Default)]
pub struct ServerList {
    next: Arc<AtomicU64>,
    entries: Arc<Mutex<HashMap<u64, Arc<ServerInfo>>>>,
}

/// A connection's place in the list; dropping it (with the connection)
/// takes it off.
pub struct Listed {
    list: ServerList,
    id: u64,
}

impl ServerList {
    pub fn add(&self, info: ServerInfo) -> Listed {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.entries
            .lock()
            .expect("server list lock")
            .insert(id, Arc::new(info));
        Listed {
            list: self.clone(),
            id,
        }
    }

    /// The open connections, oldest first.
    pub fn snapshot(&self) -> Vec<Arc<ServerInfo>> {
        let mut servers: Vec<_> = self
            .entries
            .lock()
            .expect("server list lock")
            .values()
            .cloned()
            .collect();
        servers.sort_by_key(|s| s.connected_at);
        servers
    }
}

impl Drop for Listed {
    fn drop(&mut self) {
        if let Ok(mut entries) = self.list.entries.lock() {
            entries.remove(&self.id);
        }
    }
}
