//! All pools, created on first use per (node, user, database).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use deadpool::Runtime;
use deadpool::managed::{Pool, PoolError, TimeoutType, Timeouts};

use super::Checkout;
use super::lane::{LaneReply, Lanes, Ticket};
use super::listing::ServerList;
use super::manager::ServerManager;
use super::server::{Login, ServerError};
use crate::config::{PoolConfig, Secret};
use crate::frontend::cancel::CancelRegistry;
use crate::frontend::session::{Params, Statement};
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
    settings: Arc<ArcSwap<PoolConfig>>,
    /// Resolved once per handle: a checkout records without a label lookup.
    wait_seconds: Option<prometheus::Histogram>,
    lanes: Arc<Lanes>,
}

impl PoolHandle {
    /// Runs an autocommit read on a lane (see `pool::lane`), its answer
    /// coming back through `reply`.
    pub fn submit_read(
        &self,
        params: &Params,
        messages: bytes::Bytes,
        statement: Option<Arc<Statement>>,
        reply: tokio::sync::mpsc::Sender<LaneReply>,
        cancels: &CancelRegistry,
    ) -> Ticket {
        let settings = self.settings.load();
        // Half the pool at most: writes and transactions, which cannot
        // share, always find connections that lanes do not hold.
        let max_lanes = (settings.size / 2).max(1);
        let depth = settings.pipeline_depth;
        drop(settings);
        self.lanes.submit(
            self, depth, max_lanes, params, messages, statement, reply, cancels,
        )
    }

    /// When every connection is in use and the pool is full: what a fresh
    /// connection of this pool reported at startup, if one was ever made.
    pub fn defaults_if_busy(&self) -> Option<Arc<Vec<(String, String)>>> {
        let status = self.pool.status();
        if status.available > 0 || status.size < status.max_size {
            return None;
        }
        self.pool.manager().fresh_params.load_full()
    }

    /// A server connection; the pool's own wait, create and recycle timeouts apply.
    pub async fn checkout(&self) -> Result<Checkout, CheckoutError> {
        self.checkout_timed().await.0
    }

    /// `checkout`, and how long it took (the caller's SHOW STATS wait time
    /// comes from the same clock reading as the histogram).
    pub async fn checkout_timed(&self) -> (Result<Checkout, CheckoutError>, Duration) {
        let addr = self.addr;
        let started = Instant::now();
        let checkout_timeout = self.settings.load().checkout_timeout;
        // First without waiting: most checkouts find a connection at hand,
        // and a wait timeout is a timer made and dropped for nothing. No
        // deadpool timeouts around connecting and the health check either:
        // both bound themselves by connect_timeout (`ServerManager`).
        let at_hand = Timeouts {
            wait: Some(Duration::ZERO),
            create: None,
            recycle: None,
        };
        let mut result = self.pool.timeout_get(&at_hand).await;
        if let Err(PoolError::Timeout(TimeoutType::Wait)) = result {
            let waiting = Timeouts {
                wait: Some(checkout_timeout),
                ..at_hand
            };
            result = self.pool.timeout_get(&waiting).await;
        }
        let waited = started.elapsed();
        if let Some(histogram) = &self.wait_seconds {
            histogram.observe(waited.as_secs_f64());
        }
        let result = result.map_err(|e| match e {
            PoolError::Timeout(TimeoutType::Wait) => CheckoutError::Exhausted(checkout_timeout),
            PoolError::Backend(source) => CheckoutError::Connect { addr, source },
            _ => CheckoutError::Closed,
        });
        (result, waited)
    }
}

/// A pool and the lanes its connections carry.
type PoolEntry = (Pool<ServerManager>, Arc<Lanes>);

pub struct Pools {
    settings: Arc<ArcSwap<PoolConfig>>,
    tls: ServerTls,
    /// Every open server connection, for SHOW SERVERS.
    pub servers: ServerList,
    pools: Mutex<HashMap<PoolKey, PoolEntry>>,
    metrics: Arc<Metrics>,
}

impl Pools {
    pub fn new(settings: PoolConfig, tls: ServerTls, metrics: Arc<Metrics>) -> Pools {
        Pools {
            settings: Arc::new(ArcSwap::from_pointee(settings)),
            tls,
            servers: ServerList::default(),
            pools: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    fn pool(&self, key: &PoolKey, addr: SocketAddr, password: &Secret) -> PoolEntry {
        let mut pools = self.pools.lock().expect("pool map lock");
        // A user whose password a reload changed gets a new pool: the old
        // one's connections stay with the sessions that hold them and close.
        if let Some((pool, lanes)) = pools.get(key)
            && pool.manager().login.password == *password
        {
            return (pool.clone(), lanes.clone());
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
            settings: self.settings.clone(),
            servers: self.servers.clone(),
            fresh_params: Default::default(),
        };
        // Last in, first out (deadpool's default is FIFO), as PgBouncer does:
        // a light load keeps reusing the few connections whose backends and
        // caches are warm, and the rest sit still long enough for
        // `idle_timeout` to close them instead of all being cycled forever.
        let pool = Pool::builder(manager)
            .max_size(self.settings.load().size)
            .queue_mode(deadpool::managed::QueueMode::Lifo)
            .runtime(Runtime::Tokio1)
            .build()
            .expect("the runtime is set");
        let lanes = Arc::new(Lanes::new(self.metrics.clone()));
        pools.insert(key.clone(), (pool.clone(), lanes.clone()));
        (pool, lanes)
    }

    /// The pool for `key`, made on first use. Sessions keep the handle so
    /// that a checkout takes neither this map's lock nor a hash of the key.
    pub fn handle(&self, key: &PoolKey, addr: SocketAddr, password: &Secret) -> PoolHandle {
        let (pool, lanes) = self.pool(key, addr, password);
        PoolHandle {
            pool,
            lanes,
            addr,
            settings: self.settings.clone(),
            wait_seconds: self.metrics.checkout_seconds(key.node),
        }
    }

    /// How many reads may share one server connection; 0 or 1: none.
    pub fn pipeline_depth(&self) -> usize {
        self.settings.load().pipeline_depth
    }

    /// Every pool's size and waiters, for a metrics scrape.
    pub fn statuses(&self) -> Vec<(PoolKey, deadpool::Status)> {
        self.pools
            .lock()
            .expect("pool map lock")
            .iter()
            .map(|(key, (pool, _))| (key.clone(), pool.status()))
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
            .map(|(pool, _)| pool.clone())
            .collect();
        let settings = self.settings.load();
        for pool in pools {
            pool.retain(|_, m| {
                m.last_used() < settings.idle_timeout && m.age() < settings.max_lifetime
            });
        }
    }

    /// New pool settings from a reload: sizes change at once (a smaller
    /// pool shrinks as connections come back), timeouts at the next use.
    pub fn apply(&self, settings: PoolConfig) {
        let size = settings.size;
        self.settings.store(Arc::new(settings));
        for (pool, _) in self.pools.lock().expect("pool map lock").values() {
            pool.resize(size);
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
            .map(|(_, (pool, _))| pool.clone())
            .collect();
        for pool in pools {
            pool.retain(|_, _| false);
        }
    }
}
