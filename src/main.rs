//! The tidepool command line: `run`, `demo`, `check-config`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tidepool::config::Config;
use tidepool::demo::{
    self,
    cluster::{Cluster, ClusterSpec},
};
use tidepool::proxy::Proxy;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = match cli.command {
        Command::Run { config } => runtime.block_on(run(config)),
        Command::Demo { listen } => runtime.block_on(run_demo(listen)),
        Command::CheckConfig { file } => Config::load(&file)
            .map(|_| println!("{}: ok", file.display()))
            .map_err(|e| format!("{}: {e}", file.display())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("tidepool: {message}");
            ExitCode::FAILURE
        }
    }
}

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
    let config = Config::load(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let proxy = Proxy::start(config).await.map_err(|e| e.to_string())?;
    wait_for_stop_signal().await;
    tracing::info!("stopping: waiting for open transactions");
    proxy.shutdown().await;
    Ok(())
}

async fn run_demo(listen: String) -> Result<(), String> {
    println!("starting a local PostgreSQL cluster (1 primary, 2 streaming replicas)...");
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(ClusterSpec::default()))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let config = demo::config(&cluster, &listen, "");
    let proxy = Proxy::start(config).await.map_err(|e| e.to_string())?;
    print_demo_banner(&cluster, &proxy);
    wait_for_stop_signal().await;
    println!("\nstopping tidepool and the cluster...");
    proxy.shutdown().await;
    let dir = cluster.dir().to_owned();
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .map_err(|e| e.to_string())?;
    println!("stopped; removed {}", dir.display());
    Ok(())
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
    println!(
        "\nCtrl-C stops tidepool and the cluster and removes {}",
        cluster.dir().display()
    );
}

async fn wait_for_stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
