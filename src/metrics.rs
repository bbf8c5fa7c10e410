//! Prometheus metrics: one registry per proxy, owned by `Metrics` and passed
//! to whoever records (no global registry, so two proxies in one process,
//! as in the tests, never mix their numbers).
//!
//! Labels are bounded: `node` is a node's configured address, `pool` is
//! `user/database`, the rest are fixed enums. Query text and client
//! addresses never become labels.
//!
//! The per-query path touches only pre-resolved children (an array index and
//! an atomic add); label lookups happen once per node, pool handle or label
//! value. State that already lives elsewhere (topology, pool sizes, the
//! classifier's cache counters) is copied in at scrape time by `refresh`.

use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::config::ConsistencyMode;
use crate::frontend::busy_poll::Spin;
use crate::frontend::cancel::ClientState;
use crate::frontend::session::PinReason;
use crate::ha::HaStatus;
use crate::pool::PoolKey;
use crate::route::classify::ClassifyStats;
use crate::route::policy::{Fallback, RouteReason};
use crate::topology::{Health, NodeId, Role, Topology};

/// The content type of `Metrics::encode`'s output.
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

#[derive(Debug, thiserror::Error)]
#[error("encoding metrics: {0}")]
pub struct EncodeError(#[from] prometheus::Error);

const ROLES: [Role; 3] = [Role::Primary, Role::Replica, Role::Unknown];
const UNIT_SLOTS: usize = ROLES.len() * RouteReason::ALL.len();

/// Server checkouts are usually instant; the tail up to `checkout_timeout` matters.
const CHECKOUT_BUCKETS: &[f64] = &[
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Units of work span sub-millisecond reads to long transactions.
const UNIT_BUCKETS: &[f64] = &[
    0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0,
];
/// A read-your-writes wait is bounded by `routing.ryw_wait` (20 ms by default).
const RYW_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0,
];

/// Everything tidepool measures, registered in its own registry.
pub struct Metrics {
    registry: Registry,
    /// Node labels by `NodeId`: nodes are fixed for the process lifetime.
    nodes: Vec<String>,

    clients_connected: IntGauge,
    clients_by_state: IntGaugeVec,
    client_errors: IntCounterVec,

    checkout_seconds: Vec<Histogram>,
    clients_waiting: IntGaugeVec,
    pool_servers: IntGaugeVec,
    pool_servers_max: IntGaugeVec,

    units: IntCounterVec,
    /// `units` children by node, then role and reason, resolved on first use.
    unit_children: Vec<[OnceLock<IntCounter>; UNIT_SLOTS]>,
    /// By route: primary, replica.
    unit_seconds: [Histogram; 2],

    /// Replica reads with a floor: known fresh enough (0), or probed (1).
    ryw_checks: [IntCounter; 2],
    ryw_waits: IntCounter,
    ryw_wait_seconds: Histogram,
    fallbacks: [IntCounter; Fallback::ALL.len()],
    /// By consistency mode, then served by a replica (0) or the primary (1).
    reads: [[IntCounter; 2]; ConsistencyMode::ALL.len()],
    pins: [IntCounter; PinReason::ALL.len()],
    prepared_hits: IntCounter,
    prepared_misses: IntCounter,
    prepared_evictions: IntCounter,
    pipelined_reads: IntCounter,
    /// Caught (0) and parked (1), as `busy_poll::Spin`.
    busy_poll_waits: [IntCounter; 2],
    classify_hits: IntCounter,
    classify_misses: IntCounter,
    classify_too_long: IntCounter,

    epoch: IntGauge,
    worker_threads: IntGauge,
    node_up: IntGaugeVec,
    node_role: IntGaugeVec,
    node_lagging: IntGaugeVec,
    node_timeline: IntGaugeVec,
    node_current_lsn: IntGaugeVec,
    node_replay_lsn: IntGaugeVec,
    node_receive_lsn: IntGaugeVec,
    node_lag_bytes: IntGaugeVec,
    node_lag_seconds: GaugeVec,
    session_panics: IntCounter,
    ha_is_leader: IntGauge,
    ha_coordinator_reachable: IntGauge,
    ha_writes_refused: IntGauge,
    ha_paused: IntGauge,
    ha_fenced_nodes: IntGauge,
    ha_failovers: IntCounter,
    ha_switchovers: IntCounter,
    ha_last_failover_seconds: prometheus::Gauge,

    /// Two scrapes at once would interleave their reset-and-set of the
    /// scrape-time gauges; only scrapes take it.
    scrape: Mutex<()>,
}

/// Registers collectors as they are made, so that none is forgotten.
struct Builder(Registry);

impl Builder {
    fn add<C: prometheus::core::Collector + Clone + 'static>(&self, collector: C) -> C {
        self.0
            .register(Box::new(collector.clone()))
            .expect("metric names are unique and valid");
        collector
    }

    fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.add(IntCounter::new(name, help).expect("valid metric"))
    }

    fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    /// A counter with one label whose values are known up front, resolved
    /// once: counting is then an index, not a label lookup.
    fn counters<const N: usize>(
        &self,
        name: &str,
        help: &str,
        label: &str,
        values: [&str; N],
    ) -> [IntCounter; N] {
        let vec = self.counter_vec(name, help, &[label]);
        values.map(|v| vec.with_label_values(&[v]))
    }

    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.add(IntGauge::new(name, help).expect("valid metric"))
    }

    fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    fn histogram(&self, name: &str, help: &str, buckets: &[f64]) -> Histogram {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        self.add(Histogram::with_opts(opts).expect("valid metric"))
    }

    fn histogram_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
        buckets: &[f64],
    ) -> HistogramVec {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        self.add(HistogramVec::new(opts, labels).expect("valid metric"))
    }
}

impl Metrics {
    /// `nodes` are `[cluster] nodes` in order, so that `NodeId(i)` is labelled `nodes[i]`.
    pub fn new(nodes: &[SocketAddr]) -> Metrics {
        let b = Builder(Registry::new());
        let nodes: Vec<String> = nodes.iter().map(SocketAddr::to_string).collect();
        let checkout = b.histogram_vec(
            "tidepool_server_checkout_seconds",
            "Time a client waited for a server connection from a node's pool, connecting included",
            &["node"],
            CHECKOUT_BUCKETS,
        );
        let unit_seconds = b.histogram_vec(
            "tidepool_unit_duration_seconds",
            "Units of work (a transaction, or a statement outside one) from routing to the server's release, by the role of the node that ran them",
            &["route"],
            UNIT_BUCKETS,
        );
        let reads = b.counter_vec(
            "tidepool_reads_total",
            "Read-only units of work by the session's consistency mode and the role of the node that served them",
            &["mode", "served_by"],
        );
        let lsn = |which: &str, help: &str| {
            b.gauge_vec(
                &format!("tidepool_node_{which}_lsn_bytes"),
                &format!("{help}, as a byte position in the WAL"),
                &["node"],
            )
        };
        Metrics {
            checkout_seconds: nodes
                .iter()
                .map(|n| checkout.with_label_values(&[n]))
                .collect(),
            unit_children: nodes
                .iter()
                .map(|_| std::array::from_fn(|_| OnceLock::new()))
                .collect(),
            nodes,
            clients_connected: b.gauge(
                "tidepool_clients_connected",
                "Client connections open, from accept to close",
            ),
            clients_by_state: b.gauge_vec(
                "tidepool_clients",
                "Logged-in clients by state (active: a server serves it; idle: between transactions; waiting: for a server connection)",
                &["state"],
            ),
            client_errors: b.counter_vec(
                "tidepool_client_errors_total",
                "ErrorResponses sent to clients, by SQLSTATE class (its first two characters)",
                &["class"],
            ),
            clients_waiting: b.gauge_vec(
                "tidepool_clients_waiting",
                "Clients waiting for a server connection, by pool",
                &["node", "pool"],
            ),
            pool_servers: b.gauge_vec(
                "tidepool_pool_servers",
                "Server connections by pool and state (active: serving a client; idle: in the pool)",
                &["node", "pool", "state"],
            ),
            pool_servers_max: b.gauge_vec(
                "tidepool_pool_servers_max",
                "Most server connections a pool may open (pool.size)",
                &["node", "pool"],
            ),
            units: b.counter_vec(
                "tidepool_units_total",
                "Units of work routed (a transaction, or a statement outside one; a read redone elsewhere counts again), by node, its role and why it went there",
                &["node", "role", "reason"],
            ),
            unit_seconds: [
                unit_seconds.with_label_values(&["primary"]),
                unit_seconds.with_label_values(&["replica"]),
            ],
            ryw_checks: b.counters(
                "tidepool_ryw_checks_total",
                "Replica reads that needed a session floor: the replica known past it (known), or asked in the read's flight (probed)",
                "result",
                ["known", "probed"],
            ),
            ryw_waits: b.counter(
                "tidepool_ryw_waits_total",
                "Reads that found their replica behind the session's floor and waited for it to catch up",
            ),
            ryw_wait_seconds: b.histogram(
                "tidepool_ryw_wait_seconds",
                "Time a read waited for a replica to reach the session's floor (bounded by routing.ryw_wait)",
                RYW_BUCKETS,
            ),
            fallbacks: b.counters(
                "tidepool_primary_fallbacks_total",
                "Reads meant for a replica that ran on the primary, by reason",
                "reason",
                Fallback::ALL.map(Fallback::as_str),
            ),
            reads: ConsistencyMode::ALL.map(|mode| {
                ["replica", "primary"].map(|by| reads.with_label_values(&[mode.as_str(), by]))
            }),
            pins: b.counters(
                "tidepool_pins_total",
                "Clients pinned to their server connection for the rest of their session, by reason",
                "reason",
                PinReason::ALL.map(PinReason::as_str),
            ),
            prepared_hits: b.counter(
                "tidepool_prepared_statement_cache_hits_total",
                "Binds and Describes of a prepared statement the server connection already held",
            ),
            prepared_misses: b.counter(
                "tidepool_prepared_statement_cache_misses_total",
                "Prepared statements parsed on a server connection that did not hold them yet",
            ),
            prepared_evictions: b.counter(
                "tidepool_prepared_statement_cache_evictions_total",
                "Prepared statements closed on a server connection to stay within pool.prepared_statements_cap",
            ),
            pipelined_reads: b.counter(
                "tidepool_pipelined_reads_total",
                "Autocommit reads answered on a server connection shared with other clients' reads (pool.pipeline_depth)",
            ),
            busy_poll_waits: b.counters(
                "tidepool_busy_poll_waits_total",
                "Session waits polled without sleeping (listen.busy_poll): what was awaited came while polling (caught), or the budget ran out or other work started (parked)",
                "outcome",
                ["caught", "parked"],
            ),
            classify_hits: b.counter(
                "tidepool_classify_cache_hits_total",
                "Statement classifications answered from the cache",
            ),
            classify_misses: b.counter(
                "tidepool_classify_cache_misses_total",
                "Statement classifications that needed a parse",
            ),
            classify_too_long: b.counter(
                "tidepool_classify_too_long_total",
                "Statements sent to the primary without a parse for their length (routing.classify_max_bytes)",
            ),
            epoch: b.gauge(
                "tidepool_topology_epoch",
                "The topology epoch (fencing token) this proxy follows",
            ),
            worker_threads: b.gauge(
                "tidepool_worker_threads",
                "Threads serving clients (listen.workers, or one per CPU core)",
            ),
            session_panics: b.counter(
                "tidepool_session_panics_total",
                "Client sessions ended by a bug (a panic), each logged with its message",
            ),
            ha_is_leader: b.gauge(
                "tidepool_ha_is_leader",
                "1 while this proxy runs the HA controller",
            ),
            ha_coordinator_reachable: b.gauge(
                "tidepool_ha_coordinator_reachable",
                "1 while this proxy's lease in the coordinator store is confirmed",
            ),
            ha_writes_refused: b.gauge(
                "tidepool_ha_writes_refused",
                "1 while writes are refused because the epoch cannot be confirmed",
            ),
            ha_paused: b.gauge(
                "tidepool_ha_paused",
                "1 while a switchover holds new transactions",
            ),
            ha_fenced_nodes: b.gauge(
                "tidepool_ha_fenced_nodes",
                "Former primaries fenced until they are replicas again",
            ),
            ha_failovers: b.counter(
                "tidepool_ha_failovers_total",
                "Failovers in the cluster's history",
            ),
            ha_switchovers: b.counter(
                "tidepool_ha_switchovers_total",
                "Planned switchovers in the cluster's history",
            ),
            ha_last_failover_seconds: b.add(
                prometheus::Gauge::new(
                    "tidepool_ha_last_failover_seconds",
                    "How long the last failover took, from the decision to the new primary",
                )
                .expect("valid metric"),
            ),
            node_up: b.gauge_vec(
                "tidepool_node_up",
                "1 when the node answers the monitor's polls",
                &["node"],
            ),
            node_role: b.gauge_vec(
                "tidepool_node_role",
                "1 for the node's current role (primary, replica or unknown)",
                &["node", "role"],
            ),
            node_lagging: b.gauge_vec(
                "tidepool_node_lagging",
                "1 when a replica is over the lag limits and gets no reads",
                &["node"],
            ),
            node_timeline: b.gauge_vec(
                "tidepool_node_timeline",
                "The timeline the node writes or receives WAL on",
                &["node"],
            ),
            node_current_lsn: lsn("current", "The primary's pg_current_wal_lsn()"),
            node_replay_lsn: lsn("replay", "A replica's pg_last_wal_replay_lsn()"),
            node_receive_lsn: lsn("receive", "A replica's pg_last_wal_receive_lsn()"),
            node_lag_bytes: b.gauge_vec(
                "tidepool_node_replication_lag_bytes",
                "WAL bytes a replica has yet to replay",
                &["node"],
            ),
            node_lag_seconds: b.add(
                GaugeVec::new(
                    Opts::new(
                        "tidepool_node_replication_lag_seconds",
                        "Upper bound on how stale a replica's reads are",
                    ),
                    &["node"],
                )
                .expect("valid metric"),
            ),
            registry: b.0,
            scrape: Mutex::new(()),
        }
    }

    /// Counts a client connection until the guard is dropped.
    pub fn client_connected(&self) -> ClientGuard {
        self.clients_connected.inc();
        ClientGuard(self.clients_connected.clone())
    }

    /// The counter of errors sent to clients, to count from the client's connection.
    pub fn client_errors(&self) -> ClientErrors {
        ClientErrors(self.client_errors.clone())
    }

    /// The checkout wait histogram for `node`, to keep in its pool handle.
    pub fn checkout_seconds(&self, node: NodeId) -> Option<Histogram> {
        self.checkout_seconds.get(node.0).cloned()
    }

    /// The runtime's worker count, as running (not as configured).
    pub fn set_worker_threads(&self, workers: usize) {
        self.worker_threads.set(clamp(workers as u64));
    }

    pub fn unit_routed(&self, node: NodeId, role: Role, reason: RouteReason) {
        let Some(children) = self.unit_children.get(node.0) else {
            return;
        };
        let role_index = ROLES.iter().position(|&r| r == role).unwrap_or(2);
        let slot = &children[role_index * RouteReason::ALL.len() + reason.index()];
        slot.get_or_init(|| {
            self.units
                .with_label_values(&[&self.nodes[node.0], role.as_str(), reason.as_str()])
        })
        .inc();
        if let RouteReason::Fallback(fallback) = reason {
            self.fallbacks[fallback.index()].inc();
        }
    }

    /// A unit of work on a node of `role` ended after `elapsed`.
    pub fn unit_done(&self, role: Role, elapsed: Duration) {
        let route = usize::from(role != Role::Primary);
        self.unit_seconds[route].observe(elapsed.as_secs_f64());
    }

    /// A read-only unit, served by a replica or (`on_primary`) the primary.
    pub fn read_served(&self, mode: ConsistencyMode, on_primary: bool) {
        let by_mode = &self.reads[ConsistencyMode::ALL
            .iter()
            .position(|&m| m == mode)
            .unwrap_or(0)];
        by_mode[usize::from(on_primary)].inc();
    }

    pub fn ryw_checked(&self, probed: bool) {
        self.ryw_checks[usize::from(probed)].inc();
    }

    pub fn ryw_waited(&self, elapsed: Duration) {
        self.ryw_waits.inc();
        self.ryw_wait_seconds.observe(elapsed.as_secs_f64());
    }

    pub fn session_panicked(&self) {
        self.session_panics.inc();
    }

    pub fn pinned(&self, reason: PinReason) {
        self.pins[reason.index()].inc();
    }

    pub fn prepared_hit(&self) {
        self.prepared_hits.inc();
    }

    pub fn prepared_miss(&self) {
        self.prepared_misses.inc();
    }

    pub fn prepared_evicted(&self) {
        self.prepared_evictions.inc();
    }

    pub fn read_pipelined(&self) {
        self.pipelined_reads.inc();
    }

    pub fn busy_polled(&self, spin: Spin) {
        match spin {
            Spin::Skipped => {}
            Spin::Caught => self.busy_poll_waits[0].inc(),
            Spin::Parked => self.busy_poll_waits[1].inc(),
        }
    }

    /// Copies in the state that lives elsewhere, then encodes every metric in
    /// the text exposition format.
    pub fn scrape(&self, view: &ScrapeView<'_>) -> Result<String, EncodeError> {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(PoisonError::into_inner);
        self.refresh_topology(view.topology);
        self.refresh_ha(view.topology, view.ha);
        self.refresh_pools(view.topology, view.pools);
        for (state, count) in view.clients {
            self.clients_by_state
                .with_label_values(&[state.as_str()])
                .set(clamp(*count as u64));
        }
        // Counters only go up: add what the classifier counted since the last scrape.
        let counted = view.classify;
        for (counter, total) in [
            (&self.classify_hits, counted.hits),
            (&self.classify_misses, counted.misses),
            (&self.classify_too_long, counted.too_long),
        ] {
            counter.inc_by(total.saturating_sub(counter.get()));
        }
        let mut text = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut text)?;
        Ok(String::from_utf8_lossy(&text).into_owned())
    }

    fn refresh_topology(&self, topology: &Topology) {
        self.epoch.set(clamp(topology.epoch.0));
        // Reset first: a value that became unknown (a role change, a node
        // down) must disappear rather than linger at its last value.
        for vec in [
            &self.node_up,
            &self.node_role,
            &self.node_lagging,
            &self.node_timeline,
            &self.node_current_lsn,
            &self.node_replay_lsn,
            &self.node_receive_lsn,
            &self.node_lag_bytes,
        ] {
            vec.reset();
        }
        self.node_lag_seconds.reset();
        for node in &topology.nodes {
            let label = node.addr.to_string();
            let set = |vec: &IntGaugeVec, value: Option<u64>| {
                if let Some(value) = value {
                    vec.with_label_values(&[&label]).set(clamp(value));
                }
            };
            set(&self.node_up, Some(u64::from(node.health == Health::Up)));
            self.node_role
                .with_label_values(&[&label, node.role.as_str()])
                .set(1);
            set(&self.node_timeline, node.timeline.map(u64::from));
            set(&self.node_current_lsn, node.current_lsn.map(|l| l.0));
            set(&self.node_replay_lsn, node.replay_lsn.map(|l| l.0));
            set(&self.node_receive_lsn, node.receive_lsn.map(|l| l.0));
            if node.role == Role::Replica {
                set(&self.node_lagging, Some(u64::from(node.lagging)));
                set(&self.node_lag_bytes, node.lag_bytes);
                if let Some(lag) = node.lag {
                    self.node_lag_seconds
                        .with_label_values(&[&label])
                        .set(lag.as_secs_f64());
                }
            }
        }
    }

    fn refresh_ha(&self, topology: &Topology, ha: &HaStatus) {
        let flag = |gauge: &IntGauge, on: bool| gauge.set(i64::from(on));
        flag(&self.ha_is_leader, ha.is_leader);
        flag(&self.ha_coordinator_reachable, ha.coordinator_reachable);
        flag(&self.ha_writes_refused, topology.writes_refused.is_some());
        flag(&self.ha_paused, topology.is_paused());
        self.ha_fenced_nodes
            .set(clamp(topology.fenced.len() as u64));
        self.ha_failovers
            .inc_by(ha.failovers.saturating_sub(self.ha_failovers.get()));
        self.ha_switchovers
            .inc_by(ha.switchovers.saturating_sub(self.ha_switchovers.get()));
        if let Some(ms) = ha.last_failover_ms {
            self.ha_last_failover_seconds.set(ms as f64 / 1000.0);
        }
    }

    fn refresh_pools(&self, topology: &Topology, pools: &[(PoolKey, deadpool::Status)]) {
        self.clients_waiting.reset();
        self.pool_servers.reset();
        self.pool_servers_max.reset();
        for (key, status) in pools {
            let Some(node) = topology.nodes.get(key.node.0) else {
                continue;
            };
            let node = node.addr.to_string();
            let pool = format!("{}/{}", key.user, key.database);
            let labels = [node.as_str(), pool.as_str()];
            let idle = status.available;
            let active = status.size.saturating_sub(idle);
            let servers = |state: &str, n: usize| {
                self.pool_servers
                    .with_label_values(&[&node, &pool, state])
                    .set(clamp(n as u64));
            };
            servers("active", active);
            servers("idle", idle);
            self.pool_servers_max
                .with_label_values(&labels)
                .set(clamp(status.max_size as u64));
            self.clients_waiting
                .with_label_values(&labels)
                .set(clamp(status.waiting as u64));
        }
    }
}

/// What a scrape reads besides the registry.
pub struct ScrapeView<'a> {
    pub topology: &'a Topology,
    pub ha: &'a HaStatus,
    pub pools: &'a [(PoolKey, deadpool::Status)],
    pub classify: ClassifyStats,
    /// Logged-in clients per state.
    pub clients: &'a [(ClientState, usize)],
}

fn clamp(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Keeps `tidepool_clients_connected` counting a client while it lives.
pub struct ClientGuard(IntGauge);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Counts ErrorResponses by SQLSTATE class. Held by each client connection,
/// which sees every error a client is sent.
#[derive(Clone)]
pub struct ClientErrors(IntCounterVec);

impl ClientErrors {
    pub fn count(&self, sqlstate: &str) {
        // A server could send anything as a code; keep the label set bounded.
        let class = match sqlstate.as_bytes() {
            [a, b, ..] if a.is_ascii_alphanumeric() && b.is_ascii_alphanumeric() => &sqlstate[..2],
            _ => "invalid",
        };
        self.0.with_label_values(&[class]).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::Lsn;

    fn addrs() -> Vec<SocketAddr> {
        vec![
            "127.0.0.1:5432".parse().unwrap(),
            "127.0.0.1:5433".parse().unwrap(),
        ]
    }

    fn scrape(metrics: &Metrics, topology: &Topology) -> String {
        metrics
            .scrape(&ScrapeView {
                topology,
                ha: &HaStatus::default(),
                pools: &[],
                classify: ClassifyStats {
                    hits: 3,
                    misses: 1,
                    too_long: 2,
                },
                clients: &[],
            })
            .unwrap()
    }

    #[test]
    fn counts_units_by_node_role_and_reason() {
        let metrics = Metrics::new(&addrs());
        let topology = Topology::unknown(&addrs());
        metrics.unit_routed(NodeId(1), Role::Replica, RouteReason::Read);
        metrics.unit_routed(NodeId(1), Role::Replica, RouteReason::Read);
        metrics.unit_routed(
            NodeId(0),
            Role::Primary,
            RouteReason::Fallback(Fallback::Lag),
        );
        metrics.pinned(PinReason::Listen);
        metrics.client_errors().count("57P03");
        metrics.client_errors().count("?");
        let text = scrape(&metrics, &topology);
        for line in [
            r#"tidepool_units_total{node="127.0.0.1:5433",reason="read",role="replica"} 2"#,
            r#"tidepool_units_total{node="127.0.0.1:5432",reason="fallback_lag",role="primary"} 1"#,
            r#"tidepool_primary_fallbacks_total{reason="lag"} 1"#,
            r#"tidepool_pins_total{reason="listen"} 1"#,
            r#"tidepool_client_errors_total{class="57"} 1"#,
            r#"tidepool_client_errors_total{class="invalid"} 1"#,
            "tidepool_classify_cache_hits_total 3",
            "tidepool_classify_too_long_total 2",
            r#"tidepool_node_role{node="127.0.0.1:5432",role="unknown"} 1"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
        // A second scrape does not count the classifier's totals twice.
        let text = scrape(&metrics, &topology);
        assert!(text.contains("tidepool_classify_cache_hits_total 3\n"));
    }

    #[test]
    fn unknown_values_disappear() {
        let metrics = Metrics::new(&addrs());
        let mut topology = Topology::unknown(&addrs());
        topology.nodes[1].role = Role::Replica;
        topology.nodes[1].health = Health::Up;
        topology.nodes[1].replay_lsn = Some(Lsn(0x1_0000_0010));
        let text = scrape(&metrics, &topology);
        assert!(
            text.contains("tidepool_node_replay_lsn_bytes{node=\"127.0.0.1:5433\"} 4294967312")
        );
        topology.nodes[1].replay_lsn = None;
        topology.nodes[1].role = Role::Unknown;
        let text = scrape(&metrics, &topology);
        assert!(!text.contains("tidepool_node_replay_lsn_bytes{"), "{text}");
        assert!(!text.contains("role=\"replica\""), "{text}");
    }

    #[test]
    fn clients_connected_follows_guards() {
        let metrics = Metrics::new(&addrs());
        let a = metrics.client_connected();
        let b = metrics.client_connected();
        drop(a);
        assert_eq!(metrics.clients_connected.get(), 1);
        drop(b);
        assert_eq!(metrics.clients_connected.get(), 0);
    }
}
