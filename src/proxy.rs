//! Wires the parts together: listeners (clients, admin HTTP), monitor,
//! pools, metrics, and their shutdown.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

use crate::admin;
use crate::config::Config;
use crate::frontend::cancel::CancelRegistry;
use crate::frontend::{Shared, listener, users};
use crate::ha::{self, HaHandle, HaSettings};
use crate::metrics::Metrics;
use crate::pool::Pools;
use crate::reload::{self, ReloadError};
use crate::route::classify::Classifier;
use crate::route::policy::ReplicaPicker;
use crate::server_tls::{ServerTls, ServerTlsError};
use crate::topology::monitor::{self, MonitorSettings};
use crate::topology::{SharedTopology, Topology};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("{}: {source}", path.display())]
    Config {
        path: PathBuf,
        source: crate::config::ConfigError,
    },
    #[error(transparent)]
    ServerTls(#[from] ServerTlsError),
}

/// A running proxy. Dropping it does not stop it; call `shutdown`.
pub struct Proxy {
    addr: SocketAddr,
    admin_addr: SocketAddr,
    topology: SharedTopology,
    ha: HaHandle,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// How often idle server connections are checked against idle_timeout and max_lifetime.
const REAP_INTERVAL: Duration = Duration::from_secs(5);

impl Proxy {
    pub async fn start(config: Config) -> Result<Proxy, StartError> {
        Self::start_with(config, None).await
    }

    /// Starts from a file, which SIGHUP, `RELOAD` and `POST /reload` reread.
    pub async fn start_from_file(path: &Path) -> Result<Proxy, StartError> {
        let config = Config::load(path).map_err(|e| StartError::Config {
            path: path.to_owned(),
            source: e,
        })?;
        Self::start_with(config, Some(path.to_owned())).await
    }

    async fn start_with(config: Config, file: Option<PathBuf>) -> Result<Proxy, StartError> {
        let addr = config.listen_addr();
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| StartError::Bind { addr, source })?;
        let admin_addr = config.admin_addr();
        let admin_listener =
            TcpListener::bind(admin_addr)
                .await
                .map_err(|source| StartError::Bind {
                    addr: admin_addr,
                    source,
                })?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| StartError::Bind {
                addr: admin_addr,
                source,
            })?;
        let tls = tls_acceptor(&config)?;
        let server_tls = ServerTls::from_config(&config.cluster)?;
        let metrics = Arc::new(Metrics::new(&config.node_addrs()));
        metrics.set_worker_threads(tokio::runtime::Handle::current().metrics().num_workers());
        let (shutdown, shutdown_rx) = watch::channel(false);

        let live = Arc::new(ArcSwap::from_pointee(config.clone()));
        let topology = SharedTopology::new(Topology::unknown(&config.node_addrs()));
        let monitor = monitor::start(
            topology.clone(),
            MonitorSettings::from_config(&live, &server_tls),
            shutdown_rx.clone(),
        )
        .await;
        let busy = Arc::new(AtomicU64::new(0));
        let settings = HaSettings::from_config(&config, addr, &server_tls);
        let store = ha::store_for(&config, &settings);
        tracing::info!(store = %store.describe(), proxy = %settings.proxy_id, "joining the cluster");
        let (ha, member) = ha::start(
            store,
            settings,
            topology.clone(),
            busy.clone(),
            shutdown_rx.clone(),
        )
        .await;

        let shared = Arc::new(Shared {
            users: ArcSwap::from_pointee(users::build(&config.users)),
            client_slots: listener::ClientSlots::new(config.listen.max_clients),
            pools: Pools::new(config.pool.clone(), server_tls.clone(), metrics.clone()),
            topology: topology.clone(),
            classifier: Classifier::new(
                config.routing.classify_cache_size,
                config.routing.classify_max_bytes,
                &config.routing.write_functions,
            ),
            picker: ReplicaPicker::default(),
            cancels: CancelRegistry::new(server_tls, config.pool.connect_timeout),
            stale_statements: Default::default(),
            stats: Default::default(),
            tls,
            busy,
            metrics,
            ha: ha.clone(),
            admin: users::admin(&config.admin),
            config: live,
            config_file: file,
            stopping: crate::bell::Bell::new(0),
        });
        let reaper = {
            let shared = shared.clone();
            let mut shutdown = shutdown_rx.clone();
            tokio::spawn(async move {
                let mut ticker = tokio::time::interval(REAP_INTERVAL);
                loop {
                    tokio::select! {
                        _ = ticker.tick() => shared.pools.reap(),
                        _ = shutdown.changed() => return,
                    }
                }
            })
        };
        let admin = tokio::spawn(admin::serve(
            admin_listener,
            shared.clone(),
            shutdown_rx.clone(),
        ));
        let listener = tokio::spawn(listener::serve(listener, shared.clone(), shutdown_rx));
        tracing::info!(%addr, %admin_addr, "tidepool listening");
        Ok(Proxy {
            addr,
            admin_addr,
            topology,
            ha,
            shared,
            shutdown,
            tasks: vec![listener, admin, monitor, reaper, member],
        })
    }

    /// The address clients connect to (the real port when configured with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin HTTP listener's address (the real port when configured with port 0).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn topology(&self) -> &SharedTopology {
        &self.topology
    }

    pub fn ha(&self) -> &HaHandle {
        &self.ha
    }

    /// Rereads the configuration file (SIGHUP does this).
    pub fn reload(&self) -> Result<Vec<&'static str>, ReloadError> {
        reload::from_file(&self.shared)
    }

    /// Applies `config` as a reload would.
    pub fn apply_config(&self, config: Config) -> Result<Vec<&'static str>, ReloadError> {
        reload::apply(&self.shared, config)
    }

    /// Stops accepting, lets open transactions finish (up to
    /// `listen.shutdown_timeout`), then stops everything else.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

fn tls_acceptor(config: &Config) -> Result<Option<TlsAcceptor>, StartError> {
    let (Some(cert), Some(key)) = (&config.listen.tls_cert, &config.listen.tls_key) else {
        return Ok(None);
    };
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| StartError::Tls(format!("{}: {e}", path.display())))
    };
    let certs = rustls_pemfile::certs(&mut read(cert)?.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StartError::Tls(format!("{}: {e}", cert.display())))?;
    let key = rustls_pemfile::private_key(&mut read(key)?.as_slice())
        .map_err(|e| StartError::Tls(format!("{}: {e}", key.display())))?
        .ok_or_else(|| StartError::Tls(format!("{}: no private key found", key.display())))?;
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| StartError::Tls(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| StartError::Tls(e.to_string()))?;
    Ok(Some(TlsAcceptor::from(Arc::new(server))))
}
