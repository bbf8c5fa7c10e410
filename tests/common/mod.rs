//! Integration test support: a real cluster with tidepool in front of it.
#![allow(dead_code)]

pub mod etcd;
pub mod http;
pub mod load;
pub mod pki;
pub mod raw;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use tidepool::config::Config;
use tidepool::demo::{
    self,
    cluster::{Cluster, ClusterSpec},
};
use tidepool::proxy::Proxy;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

pub struct Harness {
    pub cluster: Cluster,
    pub proxy: Option<Proxy>,
}

impl Harness {
    /// A primary, 2 replicas and a proxy on a free port; `extra` is appended
    /// to the generated TOML configuration.
    pub async fn start(extra: &str) -> Harness {
        Self::start_with(extra, |_| {}).await
    }

    /// Like `start`, with a last say on the parsed configuration.
    pub async fn start_with(extra: &str, adjust: impl FnOnce(&mut Config)) -> Harness {
        Self::start_spec(ClusterSpec::default(), |_| extra.to_owned(), adjust).await
    }

    /// A cluster made to `spec`; `extra` may use the cluster (e.g. its
    /// `rejoin_command`).
    pub async fn start_spec(
        spec: ClusterSpec,
        extra: impl FnOnce(&Cluster) -> String,
        adjust: impl FnOnce(&mut Config),
    ) -> Harness {
        let cluster = start_cluster(spec).await;
        let mut config = demo::config(&cluster, "127.0.0.1:0", &extra(&cluster));
        adjust(&mut config);
        config.validate().expect("adjusted config is valid");
        let proxy = Proxy::start(config).await.expect("proxy starts");
        Harness {
            cluster,
            proxy: Some(proxy),
        }
    }

    /// Like `start`, with the proxy started from a TOML file (returned) so
    /// that reloads have something to reread.
    pub async fn start_from_file(extra: &str) -> (Harness, std::path::PathBuf) {
        let cluster = start_cluster(ClusterSpec::default()).await;
        let path = cluster.dir().join("tidepool.toml");
        std::fs::write(&path, demo::config_toml(&cluster, "127.0.0.1:0", extra)).unwrap();
        let proxy = Proxy::start_from_file(&path).await.expect("proxy starts");
        let harness = Harness {
            cluster,
            proxy: Some(proxy),
        };
        (harness, path)
    }

    /// Rewrites the configuration file with `extra` in place of the original.
    pub fn rewrite_config(&self, path: &std::path::Path, extra: &str) {
        std::fs::write(path, demo::config_toml(&self.cluster, "127.0.0.1:0", extra)).unwrap();
    }

    pub fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().expect("running")
    }

    pub fn port(&self) -> u16 {
        self.proxy().addr().port()
    }

    pub fn primary_port(&self) -> u16 {
        self.cluster.primary().port
    }

    pub fn replica_ports(&self) -> HashSet<u16> {
        self.cluster.replicas().iter().map(|n| n.port).collect()
    }

    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} password={password} dbname={db} connect_timeout=10",
            self.port()
        )
    }

    /// One sample of the proxy's /metrics (see `metric_value`).
    pub async fn metric(&self, sample: &str) -> Option<u64> {
        let text = http::get(self.proxy().admin_addr(), "/metrics").await.body;
        metric_value(&text, sample)
    }

    /// A client of the proxy as `app`.
    pub async fn connect(&self) -> Client {
        connect(&self.url("app", "app", "postgres"))
            .await
            .expect("connect through tidepool")
    }

    /// The admin console, as the `[admin]` user `tidepool` with password `adm`.
    pub async fn console(&self) -> Client {
        connect(&self.url("tidepool", "adm", "tidepool"))
            .await
            .expect("connect to the admin console")
    }

    /// A client straight to the primary as the admin, for setup and checks.
    pub async fn admin(&self) -> Client {
        connect(&self.admin_url(self.primary_port()))
            .await
            .expect("connect to primary")
    }

    /// The admin's connection string for the node on `port`, bypassing tidepool.
    pub fn admin_url(&self, port: u16) -> String {
        format!(
            "host=127.0.0.1 port={port} user=postgres password={} dbname=postgres",
            self.cluster.admin_password()
        )
    }

    /// Waits out a few of the monitor's polls (100 ms apart), so that the
    /// proxy's topology shows both replicas past the session's last write:
    /// until then reads go only to the replica a read has probed, the one
    /// known past it.
    pub async fn polled(&self) {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    /// Makes the replica at node `index` apply each commit `delay` (e.g.
    /// `300ms`) after it arrives, from its reload on.
    pub fn delay_replay(&self, index: usize, delay: &str) {
        let sql = format!("alter system set recovery_min_apply_delay = '{delay}'");
        self.cluster.psql(index, &sql).unwrap();
        self.cluster.psql(index, "select pg_reload_conf()").unwrap();
    }

    pub async fn caught_up(&self) {
        let cluster = &self.cluster;
        tokio::task::block_in_place(|| cluster.wait_replicas_caught_up(Duration::from_secs(20)))
            .expect("replicas catch up");
    }

    /// Environment for psql/pgbench pointed at the proxy.
    pub fn pg_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("PGHOST", "127.0.0.1".into()),
            ("PGPORT", self.port().to_string()),
            ("PGUSER", "app".into()),
            ("PGPASSWORD", "app".into()),
            ("PGDATABASE", "postgres".into()),
            ("PGCONNECT_TIMEOUT", "10".into()),
        ]
    }
}

/// Starts a cluster without blocking the test's runtime.
pub async fn start_cluster(spec: ClusterSpec) -> Cluster {
    tokio::task::spawn_blocking(|| Cluster::start(spec))
        .await
        .unwrap()
        .expect("cluster starts")
}

/// A simple query's rows as column name → text value (NULL as "").
pub async fn simple_table(client: &Client, sql: &str) -> Vec<HashMap<String, String>> {
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name().to_owned(), r.get(i).unwrap_or("").to_owned()))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

pub async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The value of one sample in a /metrics text, found by its name and
/// labels as they are written there (`name` or `name{label="value"}`).
pub fn metric_value(metrics: &str, sample: &str) -> Option<u64> {
    let value = metrics
        .lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))?;
    value.trim().parse().ok()
}

/// Runs a simple query and returns the first column of the first row.
pub async fn simple_value(client: &Client, sql: &str) -> String {
    simple_rows(client, sql)
        .await
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("{sql}: no rows"))
}

/// Runs a simple query and returns the first column of every row.
pub async fn simple_rows(client: &Client, sql: &str) -> Vec<String> {
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row.get(0).unwrap_or("").to_owned()),
            _ => None,
        })
        .collect()
}

/// The port of the server that ran `sql` (which must select inet_server_port() first).
pub async fn served_by(client: &Client, sql: &str) -> u16 {
    simple_value(client, sql).await.parse().expect("a port")
}

/// The SQLSTATE of the error a simple query must fail with.
pub async fn simple_error(client: &Client, sql: &str) -> String {
    match client.simple_query(sql).await {
        Ok(_) => panic!("{sql}: succeeded, where an error was expected"),
        Err(e) => sqlstate(&e),
    }
}

pub fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_owned())
        .unwrap_or_else(|| format!("no SQLSTATE: {e}"))
}

/// Polls `ready` until it holds; fails the test after `within`. Returns how
/// long it took.
pub async fn wait_for(
    within: Duration,
    what: &str,
    mut ready: impl AsyncFnMut() -> bool,
) -> Duration {
    let started = Instant::now();
    while !ready().await {
        assert!(started.elapsed() < within, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

/// Runs `scripts/NAME` from the repository root (the preparation of a
/// driver's own test suite) and returns what it printed; `what_it_needs`
/// tells whoever sees it fail where to look.
pub fn run_repo_script(name: &str, what_it_needs: &str) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("scripts").join(name);
    let out = std::process::Command::new("bash")
        .arg(&script)
        .current_dir(root)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{} failed: {what_it_needs}. Run it by hand to see why.\n{stdout}\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
