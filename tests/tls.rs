//! TLS between tidepool and the PostgreSQL nodes (`[cluster] sslmode`), and
//! between clients and tidepool, with certificates from a CA made here.
//! What is asserted is what the servers saw: `pg_stat_ssl` of the backend
//! that ran the query, and of the monitor's connection.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::http;
use common::pki::Pki;
use tidepool::config::Config;
use tidepool::demo::{
    self,
    cluster::{Cluster, ClusterSpec, NodeSsl},
};
use tidepool::proxy::Proxy;

/// The node that served the query, and whether its backend was on TLS.
const WHO_AND_TLS: &str =
    "select inet_server_port(), ssl from pg_stat_ssl where pid = pg_backend_pid()";

async fn proxy(cluster: &Cluster, extra: &str, adjust: impl FnOnce(&mut Config)) -> Proxy {
    let mut config = demo::config(cluster, "127.0.0.1:0", extra);
    adjust(&mut config);
    config.validate().expect("adjusted config is valid");
    Proxy::start(config).await.expect("proxy starts")
}

fn server_tls(mode: &str, root_cert: Option<&Path>) -> String {
    let root = root_cert
        .map(|p| format!("ssl_root_cert = {:?}\n", p.display().to_string()))
        .unwrap_or_default();
    format!("sslmode = {mode:?}\n{root}")
}

/// psql through the proxy as `app`; `Ok(stdout)` or `Err(stderr)`.
fn psql(proxy: &Proxy, tls: &[(&str, &str)], sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .env_clear()
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", proxy.addr().port().to_string())
        .env("PGUSER", "app")
        .env("PGPASSWORD", "app")
        .env("PGDATABASE", "postgres")
        .env("PGCONNECT_TIMEOUT", "10")
        .envs(tls.iter().copied())
        .args(["-X", "-At", "-c", sql])
        .output()
        .expect("psql runs");
    match out.status.success() {
        true => Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned()),
        false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}

/// `(port, ssl)` of the backend that ran `sql` through the proxy.
fn served(proxy: &Proxy, tls: &[(&str, &str)], sql: &str) -> (u16, bool) {
    let out = tokio::task::block_in_place(|| psql(proxy, tls, sql))
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let (port, ssl) = out.split_once('|').unwrap_or_else(|| panic!("{out:?}"));
    (port.parse().unwrap(), ssl == "t")
}

/// The health of every node in GET /topology once `done` holds, or the last seen.
async fn topology_health(proxy: &Proxy, done: impl Fn(&[String]) -> bool) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let view = http::get(proxy.admin_addr(), "/topology").await.json();
        let health: Vec<String> = view["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| format!("{}:{}", n["role"], n["health"]).replace('"', ""))
            .collect();
        if done(&health) || Instant::now() > deadline {
            return health;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn all_up(health: &[String]) -> bool {
    health.iter().all(|h| h.ends_with(":up"))
}

/// tidepool's log lines. One subscriber per test process: nextest gives
/// each test its own process, `cargo test` runs both tests in one, so the
/// checks pick the lines about their own nodes, or reasons only they cause.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

static LOGS: OnceLock<Logs> = OnceLock::new();

impl Logs {
    fn capture() -> Logs {
        LOGS.get_or_init(|| {
            let logs = Logs::default();
            let writer = logs.clone();
            tracing_subscriber::fmt()
                .with_env_filter("tidepool=debug")
                .with_ansi(false)
                .with_writer(move || writer.clone())
                .init();
            logs
        })
        .clone()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Where the log ends now: `about` looks only at what comes after it.
    fn mark(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    /// The lines since `mark` with `what` that name one of `cluster`'s nodes.
    fn about(&self, mark: usize, cluster: &Cluster, what: &str) -> Vec<String> {
        let addrs: Vec<String> = cluster
            .nodes()
            .iter()
            .map(|n| n.addr().to_string())
            .collect();
        self.text()[mark..]
            .lines()
            .filter(|l| l.contains(what) && addrs.iter().any(|a| l.contains(a.as_str())))
            .map(str::to_owned)
            .collect()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A client through a proxy that can reach no node gets the usual
/// node-unavailable error, promptly, the proxy itself stays up, and its log
/// says why the nodes are unreachable.
async fn refused_promptly(proxy: &Proxy, logs: &Logs, why: &str) {
    for _ in 0..2 {
        let started = Instant::now();
        let url = format!(
            "host=127.0.0.1 port={} user=app password=app dbname=postgres connect_timeout=20",
            proxy.addr().port()
        );
        let err = match common::connect(&url).await {
            Ok(client) => client.simple_query("select 1").await.unwrap_err(),
            Err(e) => e,
        };
        let code = common::sqlstate(&err);
        assert!(code == "57P03" || code == "08006", "{code}: {err}");
        assert!(started.elapsed() < Duration::from_secs(10), "{err}");
    }
    let health = http::get(proxy.admin_addr(), "/health").await;
    assert!(health.status > 0, "the admin listener answers");
    let nodes = topology_health(proxy, |h| h.iter().all(|h| h.ends_with(":down"))).await;
    assert!(nodes.iter().all(|h| h.ends_with(":down")), "{nodes:?}");
    let text = logs.text();
    assert!(
        text.lines()
            .any(|l| l.contains("node poll failed") && l.contains(why)),
        "no failed poll for {why:?} logged:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_full_encrypts_every_connection_to_every_node() {
    let logs = Logs::capture();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path(), "good");
    let stranger = Pki::generate(dir.path(), "other");
    let cluster = common::start_cluster(ClusterSpec {
        ssl: Some(NodeSsl {
            cert: pki.server_cert.clone(),
            key: pki.server_key.clone(),
        }),
        ..ClusterSpec::default()
    })
    .await;
    let primary = cluster.primary().port;
    let replicas: Vec<u16> = cluster.replicas().iter().map(|n| n.port).collect();

    // A CA that did not sign the nodes' certificate: no node is reachable.
    let wrong = proxy(
        &cluster,
        &server_tls("verify-full", Some(&stranger.ca_cert)),
        |_| {},
    )
    .await;
    refused_promptly(&wrong, &logs, "invalid peer certificate").await;
    wrong.shutdown().await;

    // disable sends no SSLRequest, even to a node that offers TLS.
    let plain = proxy(&cluster, &server_tls("disable", None), |_| {}).await;
    assert!(all_up(&topology_health(&plain, all_up).await));
    let (port, ssl) = served(&plain, &[], WHO_AND_TLS);
    assert!(replicas.contains(&port), "{port}");
    assert!(!ssl, "sslmode = disable stays in plain text");
    plain.shutdown().await;

    // require encrypts without checking the certificate (no root certificate
    // is configured at all).
    let unchecked = proxy(&cluster, &server_tls("require", None), |_| {}).await;
    assert!(all_up(&topology_health(&unchecked, all_up).await));
    let (port, ssl) = served(&unchecked, &[], WHO_AND_TLS);
    assert!(replicas.contains(&port), "{port}");
    assert!(ssl, "sslmode = require is on TLS");
    unchecked.shutdown().await;

    // Clients reach the proxy with verify-full too, against the same CA.
    let ca = pki.ca_cert.display().to_string();
    let client_tls = [("PGSSLMODE", "verify-full"), ("PGSSLROOTCERT", ca.as_str())];
    let verified = logs.mark();
    let p = proxy(
        &cluster,
        &server_tls("verify-full", Some(&pki.ca_cert)),
        |c| {
            c.listen.tls_cert = Some(pki.server_cert.clone());
            c.listen.tls_key = Some(pki.server_key.clone());
        },
    )
    .await;
    let nodes = topology_health(&p, all_up).await;
    assert!(
        all_up(&nodes),
        "the monitor sees every node over TLS: {nodes:?}"
    );

    let (port, ssl) = served(&p, &client_tls, WHO_AND_TLS);
    assert!(replicas.contains(&port), "a read goes to a replica: {port}");
    assert!(ssl, "the replica's backend is on TLS");
    let (port, ssl) = served(
        &p,
        &client_tls,
        &format!("/* tidepool: primary */ {WHO_AND_TLS}"),
    );
    assert_eq!(port, primary);
    assert!(ssl, "the primary's backend is on TLS");
    // The pools' logins are bound to the certificate (SCRAM channel binding).
    let logins = logs.about(verified, &cluster, "authenticating to the server");
    assert!(
        !logins.is_empty() && logins.iter().all(|l| l.contains("SCRAM-SHA-256-PLUS")),
        "{logins:#?}"
    );
    // The monitor's admin connections (tokio-postgres) are encrypted too
    // (the earlier proxies' ones may take a moment to go away).
    for index in 0..cluster.nodes().len() {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let seen = tokio::task::block_in_place(|| {
                cluster.psql(
                    index,
                    "select count(*), bool_and(s.ssl) from pg_stat_ssl s
                       join pg_stat_activity a using (pid)
                      where a.application_name = 'tidepool-monitor'",
                )
            })
            .unwrap();
            if seen == "1|t" {
                break;
            }
            assert!(Instant::now() < deadline, "node {index}: {seen}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // A client that does not trust the CA is refused by psql itself: the
    // proxy's certificate really is the one checked.
    let stranger_ca = stranger.ca_cert.display().to_string();
    let err = tokio::task::block_in_place(|| {
        psql(
            &p,
            &[
                ("PGSSLMODE", "verify-full"),
                ("PGSSLROOTCERT", &stranger_ca),
            ],
            "select 1",
        )
    })
    .unwrap_err();
    assert!(err.contains("certificate verify failed"), "{err}");
    // A cancel is forwarded to the node on its own TLS connection.
    let url = format!(
        "host=127.0.0.1 port={} user=app password=app dbname=postgres connect_timeout=10",
        p.addr().port()
    );
    let client = common::connect(&url).await.unwrap();
    let cancel = client.cancel_token();
    let sleeping = tokio::spawn(async move { client.simple_query("select pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), sleeping)
        .await
        .expect("the cancel arrives")
        .unwrap()
        .unwrap_err();
    assert_eq!(common::sqlstate(&err), "57014", "{err}");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn require_refuses_a_plain_server_and_prefer_falls_back() {
    let logs = Logs::capture();
    let cluster = common::start_cluster(ClusterSpec {
        replicas: 1,
        ..ClusterSpec::default()
    })
    .await;
    let required = proxy(&cluster, &server_tls("require", None), |_| {}).await;
    refused_promptly(&required, &logs, "server does not support TLS").await;
    required.shutdown().await;

    // prefer is the default: no sslmode line at all.
    let preferred = proxy(&cluster, "", |_| {}).await;
    let nodes = topology_health(&preferred, all_up).await;
    assert!(all_up(&nodes), "{nodes:?}");
    let (port, ssl) = served(&preferred, &[], WHO_AND_TLS);
    assert_eq!(port, cluster.replicas()[0].port);
    assert!(!ssl);
    let (port, ssl) = served(
        &preferred,
        &[],
        &format!("/* tidepool: primary */ {WHO_AND_TLS}"),
    );
    assert_eq!(port, cluster.primary().port);
    assert!(!ssl);
    let logins = logs.about(0, &cluster, "authenticating to the server");
    assert!(
        !logins.is_empty() && logins.iter().all(|l| !l.contains("SCRAM-SHA-256-PLUS")),
        "{logins:#?}"
    );
    preferred.shutdown().await;
}

/// `tidepool check-config` reads the CA file as a start would: an unusable
/// one fails the check, naming the key.
#[test]
fn check_config_reads_the_root_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path(), "check");
    let check = |root: &Path| {
        let config = dir.path().join("tidepool.toml");
        let toml = format!(
            "[cluster]\nnodes = [\"127.0.0.1:5432\"]\nadmin_user = \"postgres\"\nadmin_password = \"pw\"\n{}\n[[users]]\nname = \"app\"\npassword = \"app\"\n",
            server_tls("verify-full", Some(root))
        );
        std::fs::write(&config, toml).unwrap();
        Command::new(env!("CARGO_BIN_EXE_tidepool"))
            .arg("check-config")
            .arg(&config)
            .output()
            .unwrap()
    };
    let good = check(&pki.ca_cert);
    assert!(good.status.success(), "{good:?}");
    let bad = check(&pki.server_key);
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("cluster.ssl_root_cert"), "{stderr}");
}
