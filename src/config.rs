//! The configuration contract (design.md): one TOML file, typed, validated at
//! start so that a bad value is refused with the key that holds it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("{key}: {problem}")]
    Invalid { key: String, problem: String },
}

fn invalid(key: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        problem: problem.into(),
    }
}

/// A wait for a server or a client on loopback or a LAN ends within this
/// or takes long enough that sleeping through it costs nothing that shows.
const MAX_BUSY_POLL: Duration = Duration::from_millis(10);

/// A parse of a statement this long already holds the proxy's thread for
/// a few hundred milliseconds.
const MAX_CLASSIFY_BYTES: usize = 1 << 20;

/// Keys bound at start, which a reload cannot change (a trailing `.`: the
/// whole table): sockets and TLS files, the classifier's setup, the cluster
/// and coordinator wiring, the console login. Everything else takes effect
/// on reload.
pub const FIXED_KEYS: [&str; 12] = [
    "listen.address",
    "listen.admin",
    "listen.tls_cert",
    "listen.tls_key",
    "listen.workers",
    "routing.write_functions",
    "routing.classify_cache_size",
    "routing.classify_max_bytes",
    "cluster.",
    "coordinator.",
    "admin.user",
    "admin.password",
];

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub listen: ListenConfig,
    #[serde(default)]
    pub pool: PoolConfig,
    #[serde(default)]
    pub routing: RoutingConfig,
    pub cluster: ClusterConfig,
    #[serde(default)]
    pub coordinator: CoordinatorConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub users: Vec<UserConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// PostgreSQL protocol listener.
    pub address: String,
    /// HTTP listener for metrics, health and topology.
    pub admin: String,
    /// Beyond this many clients, new connections get 53300 instead of a hang.
    pub max_clients: usize,
    /// A client that has not finished startup and authentication by then is dropped.
    #[serde(with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// On SIGTERM, open transactions get this long to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Largest client message accepted (PostgreSQL's own limit is 1 GiB).
    pub max_message_size: usize,
    /// A client that sends nothing for this long between transactions is
    /// disconnected (57P05, as PostgreSQL's idle_session_timeout); 0: never.
    #[serde(with = "humantime_serde")]
    pub client_idle_timeout: Duration,
    /// A client that sits this long inside a transaction without sending
    /// anything is disconnected (25P03) and its transaction rolled back, so
    /// it cannot hold a server connection and its locks for ever; 0: never.
    #[serde(with = "humantime_serde")]
    pub idle_in_transaction_timeout: Duration,
    /// While nothing else runs in the proxy, a session waiting for its
    /// server or client polls for this long before it sleeps: the latency
    /// of waking a sleeping thread is saved, for CPU (up to a core while
    /// one client works back to back). 0: off. See `frontend::busy_poll`.
    #[serde(with = "humantime_serde")]
    pub busy_poll: Duration,
    /// PEM certificate chain and key: when both are set, clients may use TLS.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Threads serving clients (tokio workers); 0: one per CPU core. Where
    /// PostgreSQL shares the machine's few cores, fewer leave it more. With
    /// 1, tokio's single-thread scheduler runs everything on the main
    /// thread, without the multi-thread one's cross-thread bookkeeping.
    pub workers: usize,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            address: "127.0.0.1:6432".into(),
            admin: "127.0.0.1:9930".into(),
            max_clients: 10_000,
            startup_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(30),
            max_message_size: 64 << 20,
            client_idle_timeout: Duration::ZERO,
            idle_in_transaction_timeout: Duration::ZERO,
            busy_poll: Duration::ZERO,
            workers: 0,
            tls_cert: None,
            tls_key: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolMode {
    /// A server connection is held from a transaction's first message to its end.
    Transaction,
    /// A server connection is held for the client's lifetime.
    Session,
}

impl PoolMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolMode::Transaction => "transaction",
            PoolMode::Session => "session",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    pub mode: PoolMode,
    /// Server connections per node per (user, database).
    pub size: usize,
    /// How long a client waits for a server connection before 53300.
    #[serde(with = "humantime_serde")]
    pub checkout_timeout: Duration,
    /// Connecting and authenticating to a server must finish within this.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Idle server connections are closed after this.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Server connections are closed (when idle) after this age.
    #[serde(with = "humantime_serde")]
    pub max_lifetime: Duration,
    /// A connection idle longer than this is checked with an empty query before reuse.
    #[serde(with = "humantime_serde")]
    pub health_check_after: Duration,
    /// Prepared statements kept per server connection before the least recently used is closed.
    pub prepared_statements_cap: usize,
    /// A server that owes a reply and sends nothing for this long has its
    /// query cancelled (the client gets 57014); one that does not answer
    /// the cancel within as long again is given up (08006). 0: never.
    #[serde(with = "humantime_serde")]
    pub query_timeout: Duration,
    /// Autocommit reads of different clients that may be in flight at once
    /// on one server connection (`pool::lane`); 0 or 1: each has its own.
    /// Fewer busy backends cost a CPU-bound server less (on 2 cores, 16
    /// pipelined clients on 2 connections beat 16 connections), but a slow
    /// read delays the reads queued behind it: off by default.
    pub pipeline_depth: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            mode: PoolMode::Transaction,
            size: 20,
            checkout_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(3600),
            health_check_after: Duration::from_secs(30),
            prepared_statements_cap: 512,
            query_timeout: Duration::ZERO,
            pipeline_depth: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsistencyMode {
    Eventual,
    ReadYourWrites,
    Monotonic,
    Strong,
}

impl ConsistencyMode {
    pub const ALL: [ConsistencyMode; 4] = [
        ConsistencyMode::Eventual,
        ConsistencyMode::ReadYourWrites,
        ConsistencyMode::Monotonic,
        ConsistencyMode::Strong,
    ];

    pub fn parse(value: &str) -> Option<ConsistencyMode> {
        Some(match value.to_ascii_lowercase().as_str() {
            "eventual" => ConsistencyMode::Eventual,
            "read_your_writes" => ConsistencyMode::ReadYourWrites,
            "monotonic" => ConsistencyMode::Monotonic,
            "strong" => ConsistencyMode::Strong,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ConsistencyMode::Eventual => "eventual",
            ConsistencyMode::ReadYourWrites => "read_your_writes",
            ConsistencyMode::Monotonic => "monotonic",
            ConsistencyMode::Strong => "strong",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    pub consistency: ConsistencyMode,
    /// A replica further behind the primary than this (in WAL bytes) gets
    /// no reads until it is back under half of it.
    pub max_replica_lag_bytes: u64,
    /// The same limit in time: an upper bound on how stale a replica's reads are.
    #[serde(with = "humantime_serde")]
    pub max_replica_lag: Duration,
    /// How long a read-your-writes read waits for a replica to replay the
    /// session's last write before it goes to the primary instead.
    #[serde(with = "humantime_serde")]
    pub ryw_wait: Duration,
    /// After every write transaction, send its commit LSN to the client
    /// (ParameterStatus `tidepool.lsn`), the causal token of design.md. It
    /// costs the primary one statement per write transaction; off, the LSN
    /// is asked only where the session's mode needs it (`read_your_writes`,
    /// `monotonic`) and no token is sent. A session may override it with
    /// `SET tidepool.report_lsn`.
    pub report_lsn: bool,
    /// Functions that have side effects beyond the built-in list (nextval, ...).
    pub write_functions: Vec<String>,
    /// Statement classifications cached, keyed by a literal-free fingerprint.
    pub classify_cache_size: usize,
    /// Longer statements go to the primary without a parse: parsing takes
    /// the proxy's thread 0.2–2 µs a byte, while every session it serves
    /// waits. Statements that are writes by their first word (INSERT,
    /// UPDATE, ...) are never parsed, whatever their length.
    pub classify_max_bytes: usize,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            consistency: ConsistencyMode::ReadYourWrites,
            ryw_wait: Duration::from_millis(20),
            max_replica_lag_bytes: 16 << 20,
            max_replica_lag: Duration::from_secs(10),
            report_lsn: true,
            write_functions: Vec::new(),
            classify_cache_size: 10_000,
            classify_max_bytes: 32 << 10,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Every node of the cluster; roles are discovered, not configured.
    pub nodes: Vec<String>,
    pub admin_user: String,
    pub admin_password: Secret,
    /// How often every node is polled for its role and health.
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// A poll query that takes longer has failed. Connecting is allowed
    /// `pool.connect_timeout` and goes on in the background meanwhile.
    #[serde(default = "default_poll_timeout", with = "humantime_serde")]
    pub poll_timeout: Duration,
    /// Consecutive failed polls before a node is marked down.
    #[serde(default = "default_failures_before_down")]
    pub failures_before_down: u32,
    /// TLS to the nodes, for client traffic and admin connections alike.
    #[serde(default)]
    pub sslmode: ServerSslMode,
    /// PEM CA certificates that a node's certificate must chain to
    /// (`verify-full` only, where it is required).
    #[serde(default)]
    pub ssl_root_cert: Option<PathBuf>,
}

/// How the proxy uses TLS towards the nodes; the names and meanings are
/// libpq's `sslmode` (and PgBouncer's `server_tls_sslmode`), minus the modes
/// that offer no protection tidepool's users would choose.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerSslMode {
    /// Never TLS.
    Disable,
    /// TLS when the node offers it, plain text when it does not; the
    /// certificate is not checked (protects against eavesdropping only).
    #[default]
    Prefer,
    /// TLS or no connection; the certificate is not checked.
    Require,
    /// TLS or no connection, and the certificate must chain to
    /// `ssl_root_cert` and name the node's address (an IP SAN).
    VerifyFull,
}

impl ServerSslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ServerSslMode::Disable => "disable",
            ServerSslMode::Prefer => "prefer",
            ServerSslMode::Require => "require",
            ServerSslMode::VerifyFull => "verify-full",
        }
    }

    /// A node that answers an SSLRequest with 'N' may not be used.
    pub fn requires_tls(self) -> bool {
        matches!(self, ServerSslMode::Require | ServerSslMode::VerifyFull)
    }
}

fn default_poll_interval() -> Duration {
    Duration::from_millis(100)
}

fn default_poll_timeout() -> Duration {
    Duration::from_secs(1)
}

fn default_failures_before_down() -> u32 {
    3
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CoordinatorLoss {
    RefuseWrites,
    Continue,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// etcd endpoints; empty: the embedded single-instance store.
    pub etcd: Vec<String>,
    /// Keys live under `/tidepool/<cluster>/`: several clusters may share an etcd.
    pub cluster: String,
    /// This proxy's name among the members; default `<hostname>:<listen port>`.
    pub proxy_id: Option<String>,
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub failover_timeout: Duration,
    pub on_coordinator_loss: CoordinatorLoss,
    /// A replica further behind the lost primary's last known LSN than this
    /// is not promoted: failing over to it would lose those bytes of commits.
    pub max_lag_on_failover: u64,
    /// Run to fence a primary that cannot be reached over SQL (STONITH);
    /// `{host}` and `{port}` are replaced. Exit status 0 means fenced.
    pub fence_command: Option<String>,
    /// Run for a fenced former primary, to make it a replica of the new one
    /// (e.g. pg_rewind and a restart); `{host}` `{port}` `{primary_host}`
    /// `{primary_port}` are replaced.
    pub rejoin_command: Option<String>,
    /// Nodes never promoted (addresses as in `[cluster] nodes`).
    pub nofailover: Vec<String>,
    /// How long a planned switchover may hold new transactions; stragglers
    /// still in a transaction after half of it are aborted.
    #[serde(with = "humantime_serde")]
    pub switchover_timeout: Duration,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            etcd: Vec::new(),
            cluster: "tidepool".into(),
            proxy_id: None,
            lease_ttl: Duration::from_secs(5),
            failover_timeout: Duration::from_secs(3),
            on_coordinator_loss: CoordinatorLoss::RefuseWrites,
            max_lag_on_failover: 16 * 1024 * 1024,
            fence_command: None,
            rejoin_command: None,
            nofailover: Vec::new(),
            switchover_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub token: Option<Secret>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// Used both to authenticate the client (SCRAM) and to log in to the servers.
    pub password: Secret,
    /// Let this user authenticate with md5 instead of SCRAM-SHA-256.
    #[serde(default)]
    pub allow_md5: bool,
    /// This user's sessions start in this mode instead of `routing.consistency`.
    #[serde(default)]
    pub consistency: Option<ConsistencyMode>,
    /// At most this many clients logged in as this user at once (53300 beyond).
    #[serde(default)]
    pub max_connections: Option<usize>,
}

/// A password or token: its `Debug` never shows it, so no log line can.
///
/// In the TOML, `"env:NAME"` reads it from the environment variable NAME and
/// `"file:/path"` from a file (trailing newline dropped), so that secrets
/// need not sit in the configuration file.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Secret, D::Error> {
        deserializer.deserialize_str(SecretVisitor)
    }
}

/// serde's own messages for a value of the wrong type quote numbers and
/// booleans: a numeric password must not end up in an error.
struct SecretVisitor;

impl serde::de::Visitor<'_> for SecretVisitor {
    type Value = Secret;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a string: the secret, \"env:NAME\" or \"file:/path\"")
    }

    fn visit_str<E: serde::de::Error>(self, given: &str) -> Result<Secret, E> {
        Secret::resolve(given).map_err(E::custom)
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Secret, E> {
        Err(E::invalid_type(
            serde::de::Unexpected::Other("integer"),
            &self,
        ))
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Secret, E> {
        Err(E::invalid_type(
            serde::de::Unexpected::Other("integer"),
            &self,
        ))
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Secret, E> {
        Err(E::invalid_type(
            serde::de::Unexpected::Other("float"),
            &self,
        ))
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Secret, E> {
        Err(E::invalid_type(
            serde::de::Unexpected::Other("boolean"),
            &self,
        ))
    }
}

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    fn resolve(given: &str) -> Result<Secret, String> {
        if let Some(name) = given.strip_prefix("env:") {
            return std::env::var(name)
                .map(Secret)
                .map_err(|_| format!("environment variable {name} is not set"));
        }
        if let Some(path) = given.strip_prefix("file:") {
            return std::fs::read_to_string(path)
                .map(|s| Secret(s.trim_end_matches(['\n', '\r']).to_owned()))
                .map_err(|e| format!("cannot read {path}: {e}"));
        }
        Ok(Secret(given.to_owned()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| parse_error(text, &e))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        parse_addr("listen.address", &self.listen.address)?;
        parse_addr("listen.admin", &self.listen.admin)?;
        if self.listen.max_clients == 0 {
            return Err(invalid("listen.max_clients", "must be at least 1"));
        }
        if self.listen.max_message_size < 1024 {
            return Err(invalid(
                "listen.max_message_size",
                "must be at least 1024 bytes",
            ));
        }
        if self.listen.busy_poll > MAX_BUSY_POLL {
            return Err(invalid(
                "listen.busy_poll",
                "must be at most 10ms: a longer spin burns a core without saving more latency",
            ));
        }
        if self.listen.tls_cert.is_some() != self.listen.tls_key.is_some() {
            return Err(invalid(
                "listen.tls_cert",
                "tls_cert and tls_key must be set together",
            ));
        }
        if self.pool.size == 0 {
            return Err(invalid("pool.size", "must be at least 1"));
        }
        if self.pool.checkout_timeout.is_zero() {
            return Err(invalid("pool.checkout_timeout", "must be more than 0"));
        }
        if self.pool.connect_timeout.is_zero() {
            return Err(invalid("pool.connect_timeout", "must be more than 0"));
        }
        if self.pool.prepared_statements_cap == 0 {
            return Err(invalid(
                "pool.prepared_statements_cap",
                "must be at least 1",
            ));
        }
        if self.routing.classify_cache_size == 0 {
            return Err(invalid("routing.classify_cache_size", "must be at least 1"));
        }
        if !(1 << 10..=MAX_CLASSIFY_BYTES).contains(&self.routing.classify_max_bytes) {
            return Err(invalid(
                "routing.classify_max_bytes",
                "must be from 1024 to 1048576 (1 MiB)",
            ));
        }
        if self.cluster.nodes.is_empty() {
            return Err(invalid("cluster.nodes", "must list at least one node"));
        }
        for (i, node) in self.cluster.nodes.iter().enumerate() {
            parse_addr(&format!("cluster.nodes[{i}]"), node)?;
        }
        if self.cluster.admin_user.is_empty() {
            return Err(invalid("cluster.admin_user", "must not be empty"));
        }
        if self.cluster.poll_interval < Duration::from_millis(10) {
            return Err(invalid("cluster.poll_interval", "must be at least 10ms"));
        }
        if self.cluster.poll_timeout < Duration::from_millis(10) {
            return Err(invalid("cluster.poll_timeout", "must be at least 10ms"));
        }
        if self.cluster.failures_before_down == 0 {
            return Err(invalid(
                "cluster.failures_before_down",
                "must be at least 1",
            ));
        }
        match (self.cluster.sslmode, &self.cluster.ssl_root_cert) {
            (ServerSslMode::VerifyFull, None) => {
                return Err(invalid(
                    "cluster.ssl_root_cert",
                    "sslmode = \"verify-full\" needs the CA certificates to verify against",
                ));
            }
            // Silently not verifying would give a false sense of security.
            (mode, Some(_)) if mode != ServerSslMode::VerifyFull => {
                return Err(invalid(
                    "cluster.ssl_root_cert",
                    format!(
                        "only used with sslmode = \"verify-full\" (sslmode is {:?})",
                        mode.as_str()
                    ),
                ));
            }
            _ => {}
        }
        if self.coordinator.cluster.is_empty() || self.coordinator.cluster.contains('/') {
            return Err(invalid(
                "coordinator.cluster",
                "must be a non-empty name without '/'",
            ));
        }
        for node in &self.coordinator.nofailover {
            if !self.cluster.nodes.contains(node) {
                return Err(invalid(
                    "coordinator.nofailover",
                    format!("{node} is not one of [cluster] nodes"),
                ));
            }
        }
        if self.coordinator.failover_timeout.is_zero() {
            return Err(invalid(
                "coordinator.failover_timeout",
                "must be more than 0",
            ));
        }
        if self.coordinator.switchover_timeout < Duration::from_secs(1) {
            return Err(invalid(
                "coordinator.switchover_timeout",
                "must be at least 1s",
            ));
        }
        if self.coordinator.lease_ttl < Duration::from_secs(1) {
            return Err(invalid("coordinator.lease_ttl", "must be at least 1s"));
        }
        if self.users.is_empty() {
            return Err(invalid("users", "at least one [[users]] entry is needed"));
        }
        for (i, user) in self.users.iter().enumerate() {
            if user.name.is_empty() {
                return Err(invalid(&format!("users[{i}].name"), "must not be empty"));
            }
            if self.users[..i].iter().any(|u| u.name == user.name) {
                return Err(invalid(
                    &format!("users[{i}].name"),
                    format!("user {:?} is listed twice", user.name),
                ));
            }
        }
        Ok(())
    }

    /// Whether a reload changes `key` (a SHOW CONFIG key) in the running
    /// process.
    pub fn reloadable(key: &str) -> bool {
        !FIXED_KEYS
            .iter()
            .any(|fixed| match fixed.strip_suffix('.') {
                Some(table) => key.strip_prefix(table).is_some_and(|k| k.starts_with('.')),
                None => key == *fixed,
            })
    }

    /// The keys that differ in `new` but are fixed for the process's life:
    /// sockets, TLS, the cluster and coordinator wiring, the console login and
    /// the classifier's setup. A reload that changes one of them is refused
    /// as a whole, so that what runs is always exactly one file's settings.
    pub fn fixed_keys_changed(&self, new: &Config) -> Vec<&'static str> {
        let (a, b) = (self, new);
        // In the order of FIXED_KEYS.
        let changed = [
            a.listen.address != b.listen.address,
            a.listen.admin != b.listen.admin,
            a.listen.tls_cert != b.listen.tls_cert,
            a.listen.tls_key != b.listen.tls_key,
            a.listen.workers != b.listen.workers,
            a.routing.write_functions != b.routing.write_functions,
            a.routing.classify_cache_size != b.routing.classify_cache_size,
            a.routing.classify_max_bytes != b.routing.classify_max_bytes,
            a.cluster != b.cluster,
            a.coordinator != b.coordinator,
            a.admin.user != b.admin.user,
            a.admin.password != b.admin.password,
        ];
        FIXED_KEYS
            .into_iter()
            .zip(changed)
            .filter_map(|(key, changed)| changed.then_some(key.trim_end_matches('.')))
            .collect()
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.listen.address.parse().expect("validated")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.listen.admin.parse().expect("validated")
    }

    pub fn node_addrs(&self) -> Vec<SocketAddr> {
        self.cluster
            .nodes
            .iter()
            .map(|n| n.parse().expect("validated"))
            .collect()
    }

    pub fn user(&self, name: &str) -> Option<&UserConfig> {
        self.users.iter().find(|u| u.name == name)
    }
}

/// Keys whose values are secrets (`Secret` fields).
const SECRET_KEYS: [&str; 3] = ["password", "admin_password", "token"];

/// toml's message quotes the line it failed on, which may hold a password:
/// an error on a secret's line says where and why (`SecretVisitor` keeps
/// the why free of the value), not what was there.
fn parse_error(text: &str, error: &toml::de::Error) -> ConfigError {
    let Some(span) = error.span() else {
        return ConfigError::Parse(error.to_string());
    };
    let start = span.start.min(text.len());
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let key = line.split_once('=').map(|(key, _)| {
        let key = key.trim().rsplit('.').next().unwrap_or("");
        key.trim().trim_matches(['"', '\''])
    });
    match key {
        Some(key) if SECRET_KEYS.contains(&key) => ConfigError::Parse(format!(
            "TOML parse error at line {} (`{key}`, value not shown): {}",
            text[..start].matches('\n').count() + 1,
            error.message().trim_end(),
        )),
        _ => ConfigError::Parse(error.to_string()),
    }
}

fn parse_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value
        .parse()
        .map_err(|_| invalid(key, format!("{value:?} is not an IP:port address")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[cluster]
nodes = ["127.0.0.1:5432", "127.0.0.1:5433"]
admin_user = "postgres"
admin_password = "pw"

[[users]]
name = "app"
password = "app"
"#;

    #[test]
    fn fixed_keys_name_what_show_config_marks_unchangeable() {
        for key in [
            "listen.address",
            "listen.tls_key",
            "listen.workers",
            "routing.write_functions",
            "routing.classify_max_bytes",
            "cluster.nodes",
            "coordinator.lease_ttl",
        ] {
            assert!(!Config::reloadable(key), "{key}");
        }
        for key in [
            "listen.max_clients",
            "listen.startup_timeout",
            "pool.size",
            "routing.consistency",
            "clusters.x",
        ] {
            assert!(Config::reloadable(key), "{key}");
        }
        let a = Config::parse(MINIMAL).unwrap();
        let mut b = a.clone();
        b.listen.tls_key = Some("k.pem".into());
        b.listen.workers = 1;
        b.cluster.poll_interval = Duration::from_secs(1);
        b.pool.size = 3;
        assert_eq!(
            a.fixed_keys_changed(&b),
            ["listen.tls_key", "listen.workers", "cluster"]
        );
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config = Config::parse(MINIMAL).unwrap();
        assert_eq!(config.pool.mode, PoolMode::Transaction);
        assert_eq!(config.pool.size, 20);
        assert_eq!(config.routing.consistency, ConsistencyMode::ReadYourWrites);
        assert_eq!(config.node_addrs().len(), 2);
        assert_eq!(config.routing.max_replica_lag, Duration::from_secs(10));
        assert_eq!(config.cluster.poll_timeout, Duration::from_secs(1));
        assert_eq!(config.cluster.failures_before_down, 3);
        assert_eq!(config.cluster.sslmode, ServerSslMode::Prefer);
    }

    #[test]
    fn server_sslmode_and_root_cert_go_together() {
        let with = |lines: &str| {
            Config::parse(&MINIMAL.replace(
                "admin_password = \"pw\"",
                &format!("admin_password = \"pw\"\n{lines}"),
            ))
        };
        let config = with("sslmode = \"verify-full\"\nssl_root_cert = \"/ca.pem\"").unwrap();
        assert_eq!(config.cluster.sslmode, ServerSslMode::VerifyFull);
        assert_eq!(
            with("sslmode = \"disable\"").unwrap().cluster.sslmode,
            ServerSslMode::Disable
        );
        assert_eq!(
            with("sslmode = \"require\"").unwrap().cluster.sslmode,
            ServerSslMode::Require
        );
        let err = with("sslmode = \"verify-full\"").unwrap_err();
        assert!(err.to_string().contains("cluster.ssl_root_cert"), "{err}");
        let err = with("sslmode = \"require\"\nssl_root_cert = \"/ca.pem\"").unwrap_err();
        assert!(err.to_string().contains("cluster.ssl_root_cert"), "{err}");
        let err = with("sslmode = \"verify-ca\"").unwrap_err();
        assert!(err.to_string().contains("sslmode"), "{err}");
    }

    #[test]
    fn poll_settings_are_validated() {
        let with = |line: &str| {
            Config::parse(&MINIMAL.replace(
                "admin_password = \"pw\"",
                &format!("admin_password = \"pw\"\n{line}"),
            ))
        };
        let config = with("poll_timeout = \"250ms\"\nfailures_before_down = 1").unwrap();
        assert_eq!(config.cluster.poll_timeout, Duration::from_millis(250));
        assert_eq!(config.cluster.failures_before_down, 1);
        let err = with("poll_timeout = \"1ms\"").unwrap_err();
        assert!(err.to_string().contains("cluster.poll_timeout"), "{err}");
        let err = with("failures_before_down = 0").unwrap_err();
        assert!(
            err.to_string().contains("cluster.failures_before_down"),
            "{err}"
        );
    }

    #[test]
    fn example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tidepool.toml");
        Config::load(&path).unwrap();
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("[pool]\nsize = 0\n", "pool.size"),
            ("[pool]\nmode = \"statement\"\n", "mode"),
            ("[listen]\naddress = \"nowhere\"\n", "listen.address"),
            ("[routing]\nconsistency = \"sometimes\"\n", "consistency"),
            ("[pool]\nsise = 3\n", "sise"),
            ("[coordinator]\nlease_ttl = \"fast\"\n", "lease_ttl"),
            ("[routing]\nmax_replica_lag = \"soon\"\n", "max_replica_lag"),
            ("[listen]\nbusy_poll = \"1s\"\n", "listen.busy_poll"),
            (
                "[routing]\nclassify_max_bytes = 2000000\n",
                "routing.classify_max_bytes",
            ),
        ];
        for (extra, key) in cases {
            let err = Config::parse(&format!("{MINIMAL}\n{extra}")).unwrap_err();
            assert!(err.to_string().contains(key), "{extra:?}: {err}");
        }
        let err =
            Config::parse("[cluster]\nnodes = []\nadmin_user = \"p\"\nadmin_password = \"\"\n")
                .unwrap_err();
        assert!(err.to_string().contains("cluster.nodes"), "{err}");
    }

    #[test]
    fn parse_errors_never_quote_a_secret() {
        let cases = [
            (
                "admin_password = \"pw\"",
                "admin_password = \"Hunter2Secret",
            ),
            ("admin_password = \"pw\"", "admin_password = 20242024"),
            ("admin_password = \"pw\"", "admin_password = Hunter2Secret"),
            ("password = \"app\"", "password = [\"Hunter2Secret\"]"),
            ("password = \"app\"", "\"password\" = Hunter2Secret"),
        ];
        for (good, bad) in cases {
            let text = MINIMAL.replace(good, bad);
            let err = Config::parse(&text).unwrap_err().to_string();
            assert!(!err.contains("Hunter2") && !err.contains("2024"), "{err}");
            assert!(err.contains("password") && err.contains("line"), "{err}");
        }
        let text = format!("{MINIMAL}\n[admin]\ntoken = 12345678\n");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(!err.contains("12345678") && err.contains("token"), "{err}");
    }

    #[test]
    fn debug_never_shows_passwords() {
        let config = Config::parse(MINIMAL).unwrap();
        let shown = format!("{config:?}");
        assert!(!shown.contains("\"pw\""), "{shown}");
        assert!(!shown.contains("password: \"app\""), "{shown}");
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn secrets_come_from_env_or_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-file\n").unwrap();
        let key = "TIDEPOOL_TEST_SECRET_ENV";
        assert!(Secret::resolve(&format!("env:{key}")).is_err_and(|e| e.contains(key)));
        assert_eq!(
            Secret::resolve(&format!("file:{}", file.display()))
                .unwrap()
                .expose(),
            "from-file"
        );
        assert_eq!(Secret::resolve("plain").unwrap().expose(), "plain");
        let toml = format!(
            "[cluster]\nnodes = [\"127.0.0.1:5432\"]\nadmin_user = \"postgres\"\nadmin_password = \"file:{}\"\n\n[[users]]\nname = \"app\"\npassword = \"env:{key}\"\n",
            file.display()
        );
        let err = Config::parse(&toml).unwrap_err().to_string();
        assert!(err.contains(key), "{err}");
    }
}
