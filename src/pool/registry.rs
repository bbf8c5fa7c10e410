//! All pools, created on first use per (node, user, database).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool::Runtime;
use deadpool::managed::{Pool, PoolError};

use super::Checkout;
use super::manager::ServerManager;
use super::server::{Login, ServerError};
use crate::config::{PoolConfig, Secret};
use crate::metrics::Metrics;
use crate::server_tls::ServerTls;
use crate::topology::NodeId;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub node: NodeId,
    pub user: String,
    pub database: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error("timed out after {0:?} waiting for a server connection")]
    Exhausted(Duration),
    #[error("could not connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: ServerError,
    },
    #[error("pool closed")]
    Closed,
}

/// One pool, ready to check connections out of.
#[derive(Clone)]
pub struct PoolHandle {
    pool: Pool<ServerManager>,
    addr: SocketAddr,
    checkout_timeout: Duration,
    /// Resolved once per handle: a checkout records without a label lookup.
    wait_seconds: Option<prometheus::Histogram>,
}

impl PoolHandle {
    /// A server connection; the pool's own wait, create and recycle timeouts apply.
    pub async fn checkout(&self) -> Result<Checkout, CheckoutError> {
        let addr = self.addr;
        let started = Instant::now();
        let result = self.pool.get().await;
        if let Some(histogram) = &self.wait_seconds {
            histogram.observe(started.elapsed().as_secs_f64());
        }
        result.map_err(|e| match e {
            PoolError::Timeout(deadpool::managed::TimeoutType::Wait) => {
                CheckoutError::Exhausted(self.checkout_timeout)
            }
            PoolError::Timeout(_) => CheckoutError::Connect {
                addr,
                source: ServerError::Timeout,
            },
            PoolError::Backend(source) => CheckoutError::Connect { addr, source },
            _ => CheckoutError::Closed,
        })
    }
}

pub struct Pools {
    settings: PoolConfig,
    tls: ServerTls,
    pools: Mutex<HashMap<PoolKey, Pool<ServerManager>>>,
    metrics: Arc<Metrics>,
}

impl Pools {
    pub fn new(settings: PoolConfig, tls: ServerTls, metrics: Arc<Metrics>) -> Pools {
        Pools {
            settings,
            tls,
            pools: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    fn pool(&self, key: &PoolKey, addr: SocketAddr, password: &Secret) -> Pool<ServerManager> {
        let mut pools = self.pools.lock().expect("pool map lock");
        if let Some(pool) = pools.get(key) {
            return pool.clone();
        }
        let manager = ServerManager {
            node: key.node,
            addr,
            login: Login {
                user: key.user.clone(),
                password: password.clone(),
                database: key.database.clone(),
            },
            tls: self.tls.clone(),
            connect_timeout: self.settings.connect_timeout,
            max_lifetime: self.settings.max_lifetime,
            health_check_after: self.settings.health_check_after,
            prepared_cap: self.settings.prepared_statements_cap,
        };
        let pool = Pool::builder(manager)
            .max_size(self.settings.size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(self.settings.checkout_timeout))
            .create_timeout(Some(self.settings.connect_timeout))
            .recycle_timeout(Some(self.settings.connect_timeout))
            .build()
            .expect("runtime and timeouts are set");
        pools.insert(key.clone(), pool.clone());
        pool
    }

    /// The pool for `key`, made on first use. Sessions keep the handle so
    /// that a checkout takes neither this map's lock nor a hash of the key.
    pub fn handle(&self, key: &PoolKey, addr: SocketAddr, password: &Secret) -> PoolHandle {
        PoolHandle {
            pool: self.pool(key, addr, password),
            addr,
            checkout_timeout: self.settings.checkout_timeout,
            wait_seconds: self.metrics.checkout_seconds(key.node),
        }
    }

    /// Every pool's size and waiters, for a metrics scrape.
    pub fn statuses(&self) -> Vec<(PoolKey, deadpool::Status)> {
        self.pools
            .lock()
            .expect("pool map lock")
            .iter()
            .map(|(key, pool)| (key.clone(), pool.status()))
            .collect()
    }

    pub async fn checkout(
        &self,
        key: &PoolKey,
        addr: SocketAddr,
        password: &Secret,
    ) -> Result<Checkout, CheckoutError> {
        self.handle(key, addr, password).checkout().await
    }

    /// Closes idle connections past `idle_timeout` or `max_lifetime`; run periodically.
    pub fn reap(&self) {
        let pools: Vec<_> = self
            .pools
            .lock()
            .expect("pool map lock")
            .values()
            .cloned()
            .collect();
        for pool in pools {
            pool.retain(|_, m| {
                m.last_used() < self.settings.idle_timeout && m.age() < self.settings.max_lifetime
            });
        }
    }

    /// Drops every idle connection to `node` (it changed role or went away).
    pub fn close_node(&self, node: NodeId) {
        let pools: Vec<_> = self
            .pools
            .lock()
            .expect("pool map lock")
            .iter()
            .filter(|(k, _)| k.node == node)
            .map(|(_, p)| p.clone())
            .collect();
        for pool in pools {
            pool.retain(|_, _| false);
        }
    }
}
