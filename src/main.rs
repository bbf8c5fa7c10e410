//! The tidepool command line: `run`, `demo`, `check-config`, `ctl`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tidepool::config::Config;
use tidepool::demo::{
    self,
    cluster::{Cluster, ClusterSpec},
};
use tidepool::proxy::Proxy;
use tidepool::server_tls::ServerTls;

#[derive(Parser)]
#[command(name = "tidepool", version, about = "A replica-aware PostgreSQL proxy")]
struct Cli {
    /// Log output format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy against an existing cluster.
    Run {
        /// The TOML configuration file (see config/tidepool.toml).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Start a local primary and 2 streaming replicas in a temp dir, and the proxy in front of them.
    Demo {
        /// Where the proxy listens.
        #[arg(long, default_value = "127.0.0.1:6432")]
        listen: String,
    },
    /// Validate a configuration file and exit.
    CheckConfig {
        /// The TOML configuration file.
        file: PathBuf,
    },
    /// Talk to a running tidepool through its admin HTTP listener.
    Ctl {
        /// The admin listener (`[listen] admin`).
        #[arg(long, default_value = "127.0.0.1:9930", global = true)]
        admin: String,
        /// The `[admin] token`, for operations that change the cluster.
        #[arg(
            long,
            env = "TIDEPOOL_ADMIN_TOKEN",
            global = true,
            hide_env_values = true
        )]
        token: Option<String>,
        #[command(subcommand)]
        command: CtlCommand,
    },
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Nodes, roles, lag, epoch and the HA leader.
    Status {
        /// The raw JSON of `GET /topology`.
        #[arg(long)]
        json: bool,
    },
    /// A planned switchover: clients see a pause, not an error.
    Switchover {
        /// The replica to promote (address as in `[cluster] nodes`);
        /// default: the most advanced eligible one.
        #[arg(long)]
        to: Option<String>,
    },
    /// Hold new transactions at every proxy (until resume or switchover_timeout).
    Pause,
    /// Let transactions flow again.
    Resume,
    /// Reread the configuration file (as SIGHUP does).
    Reload,
}

/// glibc's malloc keeps per-thread caches only for blocks up to 1 KiB; a
/// session's state machine and its buffers are larger and churn on every
/// transaction, which mimalloc serves from thread-local free lists.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // A file that does not load is reported by `run`, as any other start error.
    let workers = match &cli.command {
        Command::Run { config } => Config::load(config).map_or(0, |c| c.listen.workers),
        _ => 0,
    };
    let mut runtime = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if workers > 1 {
        runtime.worker_threads(workers);
    }
    let runtime = runtime.enable_all().build().expect("tokio runtime");
    let result = match cli.command {
        Command::Run { config } => runtime.block_on(run(config)),
        Command::Demo { listen } => runtime.block_on(run_demo(listen)),
        // The CA file too: a start must not fail on what the check passed.
        Command::CheckConfig { file } => Config::load(&file)
            .map_err(|e| e.to_string())
            .and_then(|c| ServerTls::from_config(&c.cluster).map_err(|e| e.to_string()))
            .map(|_| println!("{}: ok", file.display()))
            .map_err(|e| format!("{}: {e}", file.display())),
        Command::Ctl {
            admin,
            token,
            command,
        } => runtime.block_on(ctl(&admin, token.as_deref(), command)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("tidepool: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The demo's admin token: a local throwaway cluster, not a secret.
const DEMO_TOKEN: &str = "demo";

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(path: PathBuf) -> Result<(), String> {
    use tokio::signal::unix::{SignalKind, signal};
    let proxy = Proxy::start_from_file(&path)
        .await
        .map_err(|e| e.to_string())?;
    let mut hangup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    let stop = wait_for_stop_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = hangup.recv() => {
                // reload logs what it changed; a refusal must be seen too.
                if let Err(e) = proxy.reload() {
                    tracing::error!(error = %e, "SIGHUP: configuration not reloaded");
                }
            }
        }
    }
    tracing::info!("stopping: waiting for open transactions");
    proxy.shutdown().await;
    Ok(())
}

async fn run_demo(listen: String) -> Result<(), String> {
    install_postgres_if_missing()?;
    println!("starting a local PostgreSQL cluster (1 primary, 2 streaming replicas)...");
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(ClusterSpec::default()))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    // A token so that the HA operations can be tried from another terminal,
    // and a rejoin hook so that after one the old primary is a replica again.
    let config = demo::config(
        &cluster,
        &listen,
        &format!(
            "[admin]\ntoken = \"{DEMO_TOKEN}\"\n\n[coordinator]\nrejoin_command = {:?}\n",
            cluster.rejoin_command()
        ),
    );
    let proxy = Proxy::start(config).await.map_err(|e| e.to_string())?;
    print_demo_banner(&cluster, &proxy);
    let status = tokio::spawn(print_status_lines(proxy.topology().clone()));
    wait_for_stop_signal().await;
    status.abort();
    println!("\nstopping tidepool and the cluster...");
    proxy.shutdown().await;
    let dir = cluster.dir().to_owned();
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .map_err(|e| e.to_string())?;
    println!("stopped; removed {}", dir.display());
    Ok(())
}

/// A fresh Debian machine has psql but not the server: the demo installs
/// Debian's postgresql-15 (as the test command does) rather than stop at
/// "no initdb". `TIDEPOOL_PG_BIN` points at other binaries instead.
fn install_postgres_if_missing() -> Result<(), String> {
    let installed = std::env::var_os("TIDEPOOL_PG_BIN").is_some()
        || std::fs::read_dir("/usr/lib/postgresql").is_ok_and(|dirs| {
            dirs.flatten()
                .any(|d| d.path().join("bin/initdb").is_file())
        });
    if installed {
        return Ok(());
    }
    println!("PostgreSQL server binaries not found: installing Debian's postgresql-15...");
    let root = std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
    });
    let apt = |args: &[&str]| {
        let mut cmd = if root {
            std::process::Command::new("apt-get")
        } else {
            let mut sudo = std::process::Command::new("sudo");
            sudo.arg("apt-get");
            sudo
        };
        cmd.env("DEBIAN_FRONTEND", "noninteractive").args(args);
        cmd.status()
            .map_err(|e| format!("running apt-get: {e}"))
            .and_then(|s| {
                s.success()
                    .then_some(())
                    .ok_or(format!("apt-get {} failed", args.join(" ")))
            })
    };
    apt(&["update", "-q"])?;
    apt(&["install", "-y", "-q", "postgresql-15"])
}

fn print_demo_banner(cluster: &Cluster, proxy: &Proxy) {
    let topology = proxy.topology().load();
    println!("\n  node   role      address");
    for node in &topology.nodes {
        let name = &cluster.nodes()[node.id.0].name;
        println!("  {name:<6} {:<9} {}", node.role.as_str(), node.addr);
    }
    let addr = proxy.addr();
    let (user, password) = &cluster.users()[0];
    println!("\ntidepool is listening on {addr}. Connect with:\n");
    println!(
        "  psql \"postgresql://{user}:{password}@{}:{}/postgres\"\n",
        addr.ip(),
        addr.port()
    );
    println!(
        "  metrics, health, topology: http://{}/metrics /health /ready /topology\n",
        proxy.admin_addr()
    );
    println!("  try: select inet_server_port(), pg_is_in_recovery();   -- reads go to replicas");
    println!(
        "       create table t (x int); insert into t values (1); -- writes go to the primary"
    );
    let admin = proxy.admin_addr();
    println!("  and: tidepool ctl --admin {admin} status");
    println!(
        "       tidepool ctl --admin {admin} --token {DEMO_TOKEN} switchover   -- clients see a pause, not an error"
    );
    println!(
        "       (the old primary is rewound and back as a replica moments later: scripts/rejoin.sh)"
    );
    println!(
        "\nCtrl-C stops tidepool and the cluster and removes {}",
        cluster.dir().display()
    );
}

/// The demo's live status: one line whenever the picture changes (roles,
/// health, epoch, a replica crossing a lag limit), and every 10 s anyway,
/// with the replicas' lag.
async fn print_status_lines(topology: tidepool::topology::SharedTopology) {
    use std::time::Duration;
    let mut last = String::new();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut since = 0;
    loop {
        ticker.tick().await;
        let t = topology.load_full();
        let shape: String = t
            .nodes
            .iter()
            .map(|n| {
                format!(
                    "{}{:?}{:?}{}",
                    n.role.as_str(),
                    n.health,
                    n.lagging,
                    t.is_fenced(n.id)
                )
            })
            .chain([t.epoch.to_string()])
            .collect();
        since += 1;
        if shape == last && since < 10 {
            continue;
        }
        (last, since) = (shape, 0);
        let primary = t
            .primary()
            .map_or("none".to_owned(), |p| p.addr.to_string());
        let replicas: Vec<String> = t
            .nodes
            .iter()
            .filter(|n| Some(n.id) != t.epoch_primary)
            .map(|n| {
                let state = match (t.is_fenced(n.id), n.health, n.role) {
                    (true, _, _) => "fenced".to_owned(),
                    (_, tidepool::topology::Health::Down, _) => "down".to_owned(),
                    _ => format!(
                        "lag {} B",
                        n.lag_bytes.map_or("?".into(), |b| b.to_string())
                    ),
                };
                format!("{} {state}", n.addr)
            })
            .collect();
        println!(
            "[status] epoch {}  primary {primary}  replicas: {}",
            t.epoch,
            replicas.join(", ")
        );
    }
}

async fn wait_for_stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn ctl(admin: &str, token: Option<&str>, command: CtlCommand) -> Result<(), String> {
    use std::time::Duration;
    use tidepool::admin::client::request;
    let (method, path, limit) = match &command {
        CtlCommand::Status { .. } => ("GET", "/topology".to_owned(), Duration::from_secs(5)),
        CtlCommand::Switchover { to } => {
            let query = to.as_ref().map(|t| format!("?to={t}")).unwrap_or_default();
            (
                "POST",
                format!("/switchover{query}"),
                Duration::from_secs(120),
            )
        }
        CtlCommand::Pause => ("POST", "/pause".to_owned(), Duration::from_secs(10)),
        CtlCommand::Resume => ("POST", "/resume".to_owned(), Duration::from_secs(10)),
        CtlCommand::Reload => ("POST", "/reload".to_owned(), Duration::from_secs(10)),
    };
    let answer = request(admin, method, &path, token, limit)
        .await
        .map_err(|e| e.to_string())?;
    if answer.status != 200 {
        return Err(format!(
            "{method} {path}: HTTP {}: {}",
            answer.status,
            answer.body.trim()
        ));
    }
    let json: serde_json::Value =
        serde_json::from_str(&answer.body).map_err(|e| format!("{path}: {e}"))?;
    match command {
        CtlCommand::Status { json: false } => print!("{}", status_table(&json)),
        _ => println!(
            "{}",
            serde_json::to_string_pretty(&json).expect("valid JSON")
        ),
    }
    Ok(())
}

/// `GET /topology` as a table an operator reads at a glance.
fn status_table(t: &serde_json::Value) -> String {
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "-".to_owned(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut out = format!(
        "epoch {}  primary {}  leader {}{}{}\n",
        text(&t["epoch"]),
        text(&t["primary"]),
        text(&t["leader"]),
        if t["paused"] == true { "  PAUSED" } else { "" },
        match &t["writes_refused"] {
            serde_json::Value::String(why) => format!("\nwrites refused: {why}"),
            _ => String::new(),
        },
    );
    out.push_str(&format!(
        "{:<22} {:<8} {:<6} {:<7} {:>14} {:>12} {:>10} {:>9}\n",
        "node", "role", "health", "fenced", "lsn", "lag bytes", "lag s", "timeline"
    ));
    for n in t["nodes"].as_array().into_iter().flatten() {
        let lsn = if n["current_lsn"].is_null() {
            &n["replay_lsn"]
        } else {
            &n["current_lsn"]
        };
        out.push_str(&format!(
            "{:<22} {:<8} {:<6} {:<7} {:>14} {:>12} {:>10} {:>9}\n",
            text(&n["address"]),
            text(&n["role"]),
            text(&n["health"]),
            if n["fenced"] == true { "yes" } else { "no" },
            text(lsn),
            text(&n["lag_bytes"]),
            n["lag_seconds"]
                .as_f64()
                .map_or("-".into(), |s| format!("{s:.3}")),
            text(&n["timeline"]),
        ));
    }
    out
}
