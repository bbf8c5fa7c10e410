//! The HA layer embedded in every proxy. Each proxy is a *member*: it keeps
//! a lease in the coordinator store, publishes whether it can reach the
//! primary, follows the published topology (epoch, primary, fenced nodes)
//! and the switchover pause. One member at a time also runs the
//! *controller*: it bootstraps the topology, adopts a promotion made
//! outside tidepool, fails over when a quorum of members has seen the
//! primary down for `failover_timeout`, and runs planned switchovers.
//!
//! Keys, under `/tidepool/<cluster>/`: `leader` (the controller's proxy id,
//! under its lease), `topology` (a [`TopologyRecord`]), `members/<proxy-id>`
//! (a [`MemberRecord`] under that proxy's lease), `history/<epoch>`
//! (failovers, switchovers, adoptions), `pause` (held during a switchover)
//! and `switchover` (a request for the controller).
mod controller;
mod member;
mod node_sql;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::{Config, CoordinatorLoss};
use crate::server_tls::ServerTls;
use crate::topology::{Credentials, Epoch, Health, NodeId, Role, SharedTopology, Topology};
use store::{EmbeddedStore, EtcdStore, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum HaError {
    #[error("coordinator store: {0}")]
    Store(#[from] StoreError),
    #[error("no switchover: {0}")]
    Switchover(String),
    #[error("the switchover did not finish within {0:?}")]
    SwitchoverTimeout(Duration),
}

/// The store's key layout for one cluster.
#[derive(Debug, Clone)]
pub struct Keys {
    root: String,
}

impl Keys {
    pub fn new(cluster: &str) -> Keys {
        Keys {
            root: format!("/tidepool/{cluster}/"),
        }
    }
    pub fn root(&self) -> &str {
        &self.root
    }
    pub fn leader(&self) -> String {
        format!("{}leader", self.root)
    }
    pub fn topology(&self) -> String {
        format!("{}topology", self.root)
    }
    pub fn members(&self) -> String {
        format!("{}members/", self.root)
    }
    pub fn member(&self, proxy: &str) -> String {
        format!("{}members/{proxy}", self.root)
    }
    pub fn history(&self, epoch: Epoch) -> String {
        // Zero-padded so that the keys sort by epoch.
        format!("{}history/{:020}", self.root, epoch.0)
    }
    pub fn histories(&self) -> String {
        format!("{}history/", self.root)
    }
    pub fn pause(&self) -> String {
        format!("{}pause", self.root)
    }
    pub fn switchover(&self) -> String {
        format!("{}switchover", self.root)
    }
}

/// The published topology: which node is the primary of which epoch. Nodes
/// are named by address, which every proxy's configuration shares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopologyRecord {
    pub epoch: u64,
    /// None while a failover is between fencing and promotion.
    pub primary: Option<String>,
    /// Former primaries: no traffic until they are replicas again.
    #[serde(default)]
    pub fenced: Vec<String>,
}

/// What one proxy tells the controller, under its own lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// The epoch this proxy has applied.
    pub epoch: u64,
    /// Whether this proxy's monitor sees the epoch's primary up.
    pub sees_primary: bool,
    /// Holding new transactions for a switchover...
    pub paused: bool,
    /// ...with this many client transactions still running.
    pub busy: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseRecord {
    /// Unix milliseconds after which proxies stop holding transactions even
    /// if nobody lifts the pause (a controller that died mid-switchover).
    pub until_ms: u64,
}

impl PauseRecord {
    /// A pause that lasts at most `limit` from now, as stored.
    fn json_for(limit: Duration) -> String {
        let pause = PauseRecord {
            until_ms: unix_ms() + limit.as_millis() as u64,
        };
        serde_json::to_string(&pause).expect("serializable")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchoverRequest {
    pub id: String,
    pub to: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Bootstrap,
    /// A promotion made outside tidepool, taken as the new epoch.
    Adopt,
    Failover,
    Switchover,
    SwitchoverFailed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub epoch: u64,
    pub kind: EventKind,
    pub from: Option<String>,
    pub to: Option<String>,
    pub at_ms: u64,
    /// From the decision to the new primary published.
    pub took_ms: u64,
    pub detail: String,
    /// The switchover request this answers.
    #[serde(default)]
    pub request: Option<String>,
}

/// Whether a lease whose validity ends at `until` (see the member's
/// `valid_until`) may still be trusted.
fn lease_holds(until: Option<std::time::Instant>) -> bool {
    until.is_some_and(|t| std::time::Instant::now() < t)
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Everything the member and controller need, fixed at start.
#[derive(Clone)]
pub struct HaSettings {
    pub proxy_id: String,
    pub keys: Keys,
    pub lease_ttl: Duration,
    pub failover_timeout: Duration,
    pub on_coordinator_loss: CoordinatorLoss,
    pub max_lag_on_failover: u64,
    pub fence_command: Option<String>,
    pub rejoin_command: Option<String>,
    pub nofailover: Vec<SocketAddr>,
    pub switchover_timeout: Duration,
    pub poll_interval: Duration,
    pub credentials: Credentials,
}

impl HaSettings {
    pub fn from_config(config: &Config, listen: SocketAddr, tls: &ServerTls) -> HaSettings {
        let c = &config.coordinator;
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "localhost".into());
        HaSettings {
            proxy_id: c
                .proxy_id
                .clone()
                .unwrap_or_else(|| format!("{host}:{}", listen.port())),
            keys: Keys::new(&c.cluster),
            lease_ttl: c.lease_ttl,
            failover_timeout: c.failover_timeout,
            on_coordinator_loss: c.on_coordinator_loss,
            max_lag_on_failover: c.max_lag_on_failover,
            fence_command: c.fence_command.clone(),
            rejoin_command: c.rejoin_command.clone(),
            nofailover: c.nofailover.iter().filter_map(|n| n.parse().ok()).collect(),
            switchover_timeout: c.switchover_timeout,
            poll_interval: config.cluster.poll_interval,
            credentials: Credentials {
                user: config.cluster.admin_user.clone(),
                password: config.cluster.admin_password.clone(),
                connect_timeout: config.pool.connect_timeout,
                tls: tls.clone(),
            },
        }
    }

    /// Stop acting as leader (or trusting the epoch) this long before the
    /// lease would expire on the store's side: clocks and delays differ.
    fn lease_margin(&self) -> Duration {
        (self.lease_ttl / 5).max(Duration::from_millis(200))
    }

    /// Each store call must fail well within a lease.
    fn store_timeout(&self) -> Duration {
        (self.lease_ttl / 3).max(Duration::from_millis(300))
    }
}

/// The store named by the configuration.
pub fn store_for(config: &Config, settings: &HaSettings) -> Store {
    if config.coordinator.etcd.is_empty() {
        Store::Embedded(EmbeddedStore::new())
    } else {
        Store::Etcd(EtcdStore::new(
            config.coordinator.etcd.clone(),
            settings.store_timeout(),
        ))
    }
}

/// What this proxy knows of the HA state, for status pages and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HaStatus {
    pub leader: Option<String>,
    pub is_leader: bool,
    pub coordinator_reachable: bool,
    /// Failovers and switchovers in the cluster's history (every proxy
    /// sees the same history).
    pub failovers: u64,
    pub switchovers: u64,
    /// How long the last failover took, from the decision to the new primary.
    pub last_failover_ms: Option<u64>,
}

/// A running member (and, when elected, controller).
#[derive(Clone)]
pub struct HaHandle {
    store: Store,
    settings: Arc<HaSettings>,
    status: watch::Receiver<HaStatus>,
}

impl HaHandle {
    pub fn status(&self) -> HaStatus {
        self.status.borrow().clone()
    }

    pub fn proxy_id(&self) -> &str {
        &self.settings.proxy_id
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn keys(&self) -> &Keys {
        &self.settings.keys
    }

    /// Asks the controller (wherever it runs) for a planned switchover and
    /// waits for its outcome in the history.
    pub async fn switchover(&self, to: Option<SocketAddr>) -> Result<HistoryEntry, HaError> {
        let keys = &self.settings.keys;
        let id = format!("{}-{}", self.settings.proxy_id, unix_ms());
        let request = SwitchoverRequest {
            id: id.clone(),
            to: to.map(|a| a.to_string()),
        };
        let before = self.store.list(&keys.histories()).await?.revision;
        let mut watch = self.store.watch(&keys.histories(), before + 1).await?;
        let json = serde_json::to_string(&request).expect("serializable");
        self.store.put(&keys.switchover(), &json, None).await?;
        let limit = self.settings.switchover_timeout * 2 + self.settings.lease_ttl;
        let outcome = async {
            while let Some(event) = watch.recv().await {
                let store::WatchEvent::Put(v) = event else {
                    continue;
                };
                let Ok(entry) = serde_json::from_str::<HistoryEntry>(&v.value) else {
                    continue;
                };
                if entry.request.as_deref() == Some(id.as_str()) {
                    return Some(entry);
                }
            }
            None
        };
        match tokio::time::timeout(limit, outcome).await {
            Ok(Some(entry)) if entry.kind == EventKind::Switchover => Ok(entry),
            Ok(Some(entry)) => Err(HaError::Switchover(entry.detail)),
            Ok(None) => Err(HaError::Switchover("the watch broke".into())),
            Err(_) => Err(HaError::SwitchoverTimeout(limit)),
        }
    }

    /// Holds new transactions at every proxy (PgBouncer's PAUSE), until
    /// `resume` or `switchover_timeout`, whichever comes first.
    pub async fn pause(&self) -> Result<(), HaError> {
        let json = PauseRecord::json_for(self.settings.switchover_timeout);
        Ok(self
            .store
            .put(&self.settings.keys.pause(), &json, None)
            .await?)
    }

    pub async fn resume(&self) -> Result<(), HaError> {
        Ok(self.store.delete(&self.settings.keys.pause()).await?)
    }

    /// Every event recorded so far, oldest first.
    pub async fn history(&self) -> Result<Vec<HistoryEntry>, HaError> {
        let snapshot = self.store.list(&self.settings.keys.histories()).await?;
        Ok(snapshot
            .entries
            .iter()
            .filter_map(|v| serde_json::from_str(&v.value).ok())
            .collect())
    }
}

/// Starts the member (and the controller when elected). Returns once the
/// first topology record is applied or one lease TTL has passed, so that
/// the proxy starts routing with an epoch when one can be had.
pub async fn start(
    store: Store,
    settings: HaSettings,
    topology: SharedTopology,
    busy: Arc<std::sync::atomic::AtomicU64>,
    shutdown: watch::Receiver<bool>,
) -> (HaHandle, tokio::task::JoinHandle<()>) {
    let settings = Arc::new(settings);
    let (status_tx, status) = watch::channel(HaStatus::default());
    let task = member::spawn(
        store.clone(),
        settings.clone(),
        topology.clone(),
        busy,
        status_tx,
        shutdown,
    );
    let first_epoch = async {
        loop {
            let changed = topology.changed();
            if topology.load().epoch_primary.is_some() {
                return;
            }
            changed.await;
        }
    };
    let _ = tokio::time::timeout(settings.lease_ttl, first_epoch).await;
    (
        HaHandle {
            store,
            settings,
            status,
        },
        task,
    )
}

/// Applies a published record to this proxy's topology. Older epochs are
/// ignored: a delayed watch event must not undo a failover.
fn apply_record(topology: &SharedTopology, record: &TopologyRecord) -> bool {
    let current = topology.load();
    if record.epoch < current.epoch.0 {
        return false;
    }
    let id = |addr: &String| -> Option<NodeId> {
        let addr: SocketAddr = addr.parse().ok()?;
        current.node_by_addr(addr).map(|n| n.id)
    };
    let primary = record.primary.as_ref().and_then(id);
    let fenced: Vec<NodeId> = record.fenced.iter().filter_map(id).collect();
    let before = (current.epoch, current.epoch_primary);
    drop(current);
    // A primary that replaces another was seen out of recovery by the
    // controller just before it published it (promoted and confirmed, or
    // adopted). Until this proxy's monitor polls it, which takes a whole
    // round when a paused node makes every round wait out `poll_timeout`,
    // its last poll still says replica: writes would be refused, and this
    // proxy's vote would call the new primary down, so that a second,
    // needless failover followed the first (found by tests/chaos.rs).
    let replaces = before.0 > Epoch(0) && primary.is_some() && primary != before.1;
    let changed = topology.update(|t| {
        if record.epoch >= t.epoch.0 {
            t.epoch = Epoch(record.epoch);
            t.epoch_primary = primary;
            t.fenced = fenced.clone();
            if let Some(id) = primary.filter(|_| replaces) {
                let node = &mut t.nodes[id.0];
                node.role = Role::Primary;
                node.health = Health::Up;
            }
        }
    });
    if changed && before != (Epoch(record.epoch), primary) {
        tracing::warn!(
            epoch = record.epoch,
            primary = record.primary.as_deref().unwrap_or("none"),
            fenced = ?record.fenced,
            "new topology epoch"
        );
    }
    changed
}

/// The record that describes `t` as it is now.
fn record_of(t: &Topology) -> TopologyRecord {
    TopologyRecord {
        epoch: t.epoch.0,
        primary: t.epoch_primary.map(|id| t.node(id).addr.to_string()),
        fenced: t
            .fenced
            .iter()
            .map(|&id| t.node(id).addr.to_string())
            .collect(),
    }
}
