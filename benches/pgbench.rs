//! pgbench figures: direct to the primary vs. through tidepool vs. through PgBouncer.
//!
//! Not a timed test but a report: `cargo bench --bench pgbench` starts a local
//! primary + 2 replicas, loads `pgbench -i -s 10`, runs tidepool in this process
//! (so `VmHWM` of this process is the proxy's peak RSS) and PgBouncer as a child,
//! then runs each workload against every target in interleaved rounds, so that
//! drift (cache warm-up, table bloat from TPC-B, other load) hits all targets alike.
//!
//! Env: `TIDEPOOL_BENCH_SECS` (per pgbench run, default 20), `TIDEPOOL_BENCH_ROUNDS`
//! (default 2; the median per target is reported), `RUST_LOG` (proxy logs to stderr).
//! The report goes to stdout and to `target/bench-pgbench.md`.

use std::fs;
use std::net::{Ipv4Addr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tidepool::demo::cluster::{Cluster, ClusterSpec, free_port};
use tidepool::proxy::Proxy;

const PGBOUNCER: &str = "/usr/sbin/pgbouncer";
/// Server connections per node (tidepool) and per (user, db) (PgBouncer): the same
/// number, and equal to the client count, so neither proxy makes clients queue.
const POOL_SIZE: usize = 16;
const TARGETS: [&str; 3] = ["direct", "tidepool", "pgbouncer"];
const TPS_COLS: &str = "direct TPS | tidepool TPS | pgbouncer TPS | tidepool/direct | tidepool/pgbouncer | direct lat ms | tidepool lat ms | pgbouncer lat ms | tidepool CPU µs/txn | pgbouncer CPU µs/txn";
const LATENCY_COLS: &str = "direct lat ms | tidepool lat ms | pgbouncer lat ms | added µs tidepool | added µs pgbouncer | direct TPS | tidepool TPS | pgbouncer TPS | tidepool CPU µs/txn | pgbouncer CPU µs/txn";

/// `(name, pgbench args)`. Throughput workloads first; the 1-client run must stay
/// last: it is reported separately, as the latency each proxy adds per query.
const WORKLOADS: &[(&str, &str)] = &[
    ("select-only -c16", "-S -M simple -c 16 -j 2"),
    ("TPC-B-like -c16", "-M simple -c 16 -j 2"),
    ("select-only -M extended -c16", "-S -M extended -c 16 -j 2"),
    ("select-only -c1", "-S -M simple -c 1 -j 1"),
];

#[derive(Clone, Copy)]
struct Run {
    tps: f64,
    latency_ms: f64,
    transactions: f64,
    /// CPU time (user + system) the proxy process spent per transaction: on a small
    /// machine where proxies and PostgreSQL share cores, that is what a proxy costs.
    proxy_cpu_us: Option<f64>,
}

/// Kills PgBouncer however `main` ends, so a failed run never leaks a daemon.
struct Bouncer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    let value = std::env::var(name).ok().and_then(|v| v.parse().ok());
    value.unwrap_or(default).max(1)
}

fn first_line(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().ok();
    out.and_then(|o| {
        let text = String::from_utf8_lossy(&o.stdout);
        text.lines().next().map(|l| l.trim().to_owned())
    })
    .unwrap_or_else(|| "unknown".into())
}

fn is_root() -> bool {
    first_line("id", &["-u"]) == "0"
}

/// Installs PgBouncer when missing and we may; `false` means: skip its column.
fn ensure_pgbouncer() -> bool {
    if !Path::new(PGBOUNCER).exists() && is_root() {
        eprintln!("{PGBOUNCER} missing: apt-get install -y pgbouncer");
        let apt = |args: &[&str]| {
            let mut cmd = Command::new("apt-get");
            cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
            cmd.status().is_ok_and(|s| s.success())
        };
        if !apt(&["install", "-y", "pgbouncer"]) && apt(&["update"]) {
            apt(&["install", "-y", "pgbouncer"]);
        }
    }
    let found = Path::new(PGBOUNCER).exists();
    if !found {
        eprintln!("NOTE: {PGBOUNCER} unavailable and not installable: no PgBouncer column");
    }
    found
}

/// `(uid, gid)` via `id`, because the crate's style forbids `unsafe` (`getpwnam`).
fn user_ids(user: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| first_line("id", &[flag, user]).parse().ok();
    Some((id("-u")?, id("-g")?))
}

/// Starts PgBouncer in the foreground, transaction mode, SCRAM on both sides (1.18
/// needs the plaintext password in auth_file to do SCRAM towards the server).
/// It refuses to run as root, so as root it runs as `postgres` (or `nobody`).
fn start_pgbouncer(primary_port: u16) -> Result<Bouncer, String> {
    let dir = tempfile::Builder::new().prefix("tp-bouncer-").tempdir();
    let dir = dir.map_err(|e| e.to_string())?;
    let (port, d) = (free_port(), dir.path().display());
    let ini = format!(
        "[databases]\npostgres = host=127.0.0.1 port={primary_port} dbname=postgres\n\n\
         [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
         auth_type = scram-sha-256\nauth_file = {d}/userlist.txt\npool_mode = transaction\n\
         default_pool_size = {POOL_SIZE}\nmax_client_conn = 200\n\
         ignore_startup_parameters = extra_float_digits\n\
         logfile = {d}/pgbouncer.log\npidfile = {d}/pgbouncer.pid\n"
    );
    let users = "\"app\" \"app\"\n";
    let files = [("pgbouncer.ini", ini.as_str()), ("userlist.txt", users)];
    for (name, text) in files {
        fs::write(dir.path().join(name), text).map_err(|e| format!("{name}: {e}"))?;
    }
    let stderr_path = dir.path().join("stderr.log");
    let stderr = fs::File::create(&stderr_path).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(PGBOUNCER);
    cmd.arg(dir.path().join("pgbouncer.ini"))
        .current_dir(dir.path());
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    if is_root() {
        let (uid, gid) = user_ids("postgres")
            .or_else(|| user_ids("nobody"))
            .ok_or("running as root, but neither `postgres` nor `nobody` exists")?;
        for name in [".", files[0].0, files[1].0] {
            let path = dir.path().join(name);
            std::os::unix::fs::chown(&path, Some(uid), Some(gid)).map_err(|e| e.to_string())?;
        }
        cmd.uid(uid).gid(gid);
    }
    let child = cmd.spawn();
    let child = child.map_err(|e| format!("spawning {PGBOUNCER}: {e}"))?;
    let mut bouncer = Bouncer {
        child,
        port,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
        let exited = bouncer.child.try_wait().ok().flatten();
        if exited.is_some() || Instant::now() > deadline {
            let log = fs::read_to_string(&stderr_path).unwrap_or_default();
            return Err(format!("pgbouncer did not come up ({exited:?}):\n{log}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(bouncer)
}

fn pgbench(port: u16, args: &[&str]) -> Command {
    let mut cmd = Command::new("pgbench");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "app"]);
    cmd.args(args).arg("postgres").env("PGPASSWORD", "app");
    // The same wire for all three targets: no TLS negotiation anywhere.
    cmd.env("PGSSLMODE", "disable").env_remove("PGOPTIONS");
    cmd
}

/// One measured run. `Err` carries the text to show instead of panicking. pgbench 15
/// aborts a client on most errors (non-zero exit); serialization failures and
/// deadlocks are counted as "failed transactions" instead, which we also report.
fn run_pgbench(port: u16, args: &str, secs: u64) -> Result<Run, String> {
    let secs = secs.to_string();
    let args: Vec<&str> = ["-n", "-T", &secs]
        .into_iter()
        .chain(args.split(' '))
        .collect();
    let out = pgbench(port, &args).output();
    let out = out.map_err(|e| format!("spawning pgbench: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let field = |prefix: &str| {
        let rest = stdout.lines().find_map(|l| l.strip_prefix(prefix))?;
        rest.split_whitespace().next()?.parse::<f64>().ok()
    };
    let failed = field("number of failed transactions: ").unwrap_or(0.0);
    let transactions = field("number of transactions actually processed: ");
    match (field("tps = "), field("latency average = "), transactions) {
        (Some(tps), Some(latency_ms), Some(transactions))
            if out.status.success() && failed == 0.0 =>
        {
            let proxy_cpu_us = None; // filled in by the caller, who knows the proxy
            Ok(Run {
                tps,
                latency_ms,
                transactions,
                proxy_cpu_us,
            })
        }
        _ => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let lines: Vec<&str> = stderr.lines().collect();
            let tail = lines[lines.len().saturating_sub(10)..].join("\n");
            let status = out.status;
            Err(format!(
                "pgbench {status} ({failed} failed transactions):\n{tail}"
            ))
        }
    }
}

/// Committed transactions per node, from `pg_stat_database`.
fn xacts(cluster: &Cluster) -> Vec<u64> {
    let sql = "select sum(xact_commit) from pg_stat_database";
    let count = |i| cluster.psql(i, sql).ok().and_then(|s| s.parse().ok());
    let nodes = 0..cluster.nodes().len();
    nodes.map(|i| count(i).unwrap_or(0)).collect()
}

/// Where tidepool sent each -c16 workload: the share of transactions committed on
/// each node during a 3 s tidepool-only run. Idle backends (pooled server
/// connections) flush those counters only every 10 s (PGSTAT_IDLE_INTERVAL), so this
/// runs apart from the measured runs, with an 11 s settle around each run.
fn routing_check(cluster: &Cluster, port: u16) -> Vec<String> {
    let settle = || std::thread::sleep(Duration::from_secs(11));
    settle();
    let mut before = xacts(cluster);
    let workloads = &WORKLOADS[..WORKLOADS.len() - 1];
    let check = |&(name, args): &(&str, &str)| {
        eprintln!("[routing check] {name} via tidepool ...");
        let failed = run_pgbench(port, args, 3).err().map(|_| " (run failed)");
        settle();
        let after = xacts(cluster);
        let counts: Vec<f64> = after
            .iter()
            .zip(&before)
            .map(|(a, b)| a.saturating_sub(*b) as f64)
            .collect();
        before = after;
        let total = counts.iter().sum::<f64>().max(1.0);
        let pct: Vec<String> = counts
            .iter()
            .map(|c| format!("{:.0}%", c * 1e2 / total))
            .collect();
        format!("{name}: {}{}", pct.join(" / "), failed.unwrap_or_default())
    };
    workloads.iter().map(check).collect()
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

fn cell(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "n/a".into(), |v| format!("{v:.decimals$}"))
}

fn row(cells: &[String]) -> String {
    format!("| {} |\n", cells.join(" | "))
}

/// A markdown header row from `a | b | c`, numbers right-aligned.
fn header(cols: &str) -> String {
    let rule = (0..cols.split(" | ").count()).map(|i| if i == 0 { "---" } else { "---:" });
    format!("| {cols} |\n| {} |\n", rule.collect::<Vec<_>>().join(" | "))
}

/// utime + stime of a process, in seconds.
fn cpu_secs(pid: &str) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name start at field 3 (state).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / first_line("getconf", &["CLK_TCK"]).parse::<f64>().ok()?)
}

fn peak_rss(pid: &str) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let line = status.lines().find(|l| l.starts_with("VmHWM:"));
    let kib = line.and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok());
    kib.map_or_else(|| "n/a".into(), |k| format!("{:.1} MiB", k / 1024.0))
}

fn main() {
    if std::env::var_os("RUST_LOG").is_some() {
        let logs = tracing_subscriber::fmt().with_writer(std::io::stderr);
        logs.init();
    }
    let secs = env_u64("TIDEPOOL_BENCH_SECS", 20);
    let rounds = env_u64("TIDEPOOL_BENCH_ROUNDS", 2);
    let have_bouncer = ensure_pgbouncer();

    let started = Instant::now();
    let cluster = Cluster::start(ClusterSpec::default()).expect("starting the local cluster");
    let primary = cluster.primary().port;
    let (elapsed, dir) = (started.elapsed(), cluster.dir().display());
    eprintln!("cluster up in {elapsed:?} in {dir}");
    let init = pgbench(primary, &["-i", "-q", "-s", "10"]).output();
    let init = init.expect("spawning pgbench");
    let init_err = String::from_utf8_lossy(&init.stderr);
    assert!(init.status.success(), "pgbench -i failed:\n{init_err}");
    if let Err(e) = cluster.wait_replicas_caught_up(Duration::from_secs(120)) {
        eprintln!("WARNING: replicas not caught up: {e}");
    }

    // The proxy runs on this runtime's worker threads while `main` blocks on pgbench.
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let pool = format!("[pool]\nsize = {POOL_SIZE}\n");
    let config = tidepool::demo::config(&cluster, "127.0.0.1:0", &pool);
    let proxy = rt.block_on(Proxy::start(config));
    let mut problems = String::new();
    let mut skip = |what: &str, e: String| {
        eprintln!("{what} did not start, no column for it: {e}");
        problems += &format!("- PROBLEM: {what} did not start: {e}\n");
    };
    let proxy = proxy.map_err(|e| skip("tidepool", e.to_string())).ok();
    let bouncer = have_bouncer.then(|| start_pgbouncer(primary));
    let bouncer = bouncer.and_then(|b| b.map_err(|e| skip("PgBouncer", e)).ok());
    let (proxy_port, bouncer_port) = (
        proxy.as_ref().map(|p| p.addr().port()),
        bouncer.as_ref().map(|b| b.port),
    );
    let ports = [Some(primary), proxy_port, bouncer_port];

    // Warm-up, not recorded: fills replica caches and lets both proxies open their
    // server connections, which pgbench's "without initial connection time" misses.
    for (name, port) in TARGETS.iter().zip(ports) {
        if let Some(Err(e)) = port.map(|port| run_pgbench(port, WORKLOADS[0].1, 2)) {
            eprintln!("warm-up via {name} failed: {e}");
        }
    }

    let bouncer_pid = bouncer.as_ref().map(|b| b.child.id().to_string());
    let proxy_pid = proxy.as_ref().map(|_| "self".to_owned());
    let pids = [None, proxy_pid, bouncer_pid.clone()];
    // runs[workload][target]: the successful runs.
    let mut runs = vec![vec![Vec::new(); TARGETS.len()]; WORKLOADS.len()];
    for (w, &(workload, args)) in WORKLOADS.iter().enumerate() {
        for round in 1..=rounds {
            for (t, (name, port)) in TARGETS.iter().zip(ports).enumerate() {
                let Some(port) = port else { continue };
                eprintln!("[{workload}] round {round}/{rounds} via {name} ...");
                let cpu_before = pids[t].as_deref().and_then(cpu_secs);
                match run_pgbench(port, args, secs) {
                    Ok(mut run) => {
                        let cpu = pids[t].as_deref().and_then(cpu_secs).zip(cpu_before);
                        run.proxy_cpu_us = cpu.map(|(a, b)| (a - b) * 1e6 / run.transactions);
                        eprintln!("  tps {:.1}, latency {:.3} ms", run.tps, run.latency_ms);
                        runs[w][t].push(run);
                    }
                    Err(e) => {
                        eprintln!("  FAILED: {e}");
                        let what = e.lines().nth(1).filter(|l| !l.is_empty());
                        let what = what.or(e.lines().next()).unwrap_or_default();
                        let line =
                            format!("- PROBLEM: {workload} via {name}, round {round}: {what}\n");
                        problems += &line;
                    }
                }
            }
        }
    }
    let routing = ports[1].map(|port| routing_check(&cluster, port).join("; "));
    let [rss, bouncer_rss] = [peak_rss("self"), peak_rss(&bouncer_pid.unwrap_or_default())];
    let cpus = first_line("nproc", &[]);
    let pgbench_version = first_line("pgbench", &["--version"]);
    let bouncer_version = match have_bouncer {
        true => first_line(PGBOUNCER, &["--version"]),
        false => "PgBouncer: not available".into(),
    };
    let mut md = tables(&runs);
    md += &format!(
        "\nNotes:\n\
         - Reads through tidepool go to the 2 replicas (the point of the product); direct and \
         PgBouncer send everything to the primary. TPC-B-like transactions (BEGIN…END) go whole \
         to the primary. Share of transactions committed per node (primary / replica 1 / \
         replica 2) in separate 3 s tidepool runs, from pg_stat_database: {routing}.\n\
         - Pool size {POOL_SIZE}: tidepool per node, PgBouncer per (user, db) on the primary. \
         PostgreSQL x3, both proxies and pgbench share one machine ({cpus} CPUs), so the proxies \
         compete with PostgreSQL and pgbench for CPU.\n\
         - Median of {rounds} interleaved round(s) of {secs} s per target, after an unrecorded 2 s \
         select-only warm-up per target; TPS excludes initial connection time.\n\
         - Peak RSS (VmHWM): tidepool {rss} (the whole bench process, which hosts the proxy \
         in-process), PgBouncer {bouncer_rss}. Proxy CPU µs/txn: user + system CPU time of \
         the proxy process during the run / transactions.\n\
         - {pgbench_version}; {bouncer_version}.\n\
         - Command: `TIDEPOOL_BENCH_SECS={secs} TIDEPOOL_BENCH_ROUNDS={rounds} cargo bench --bench pgbench`; \
         each run is `pgbench -h 127.0.0.1 -p PORT -U app -n -T {secs} ARGS postgres`, ARGS:\n",
        routing = routing.as_deref().unwrap_or("n/a"),
    );
    for (name, args) in WORKLOADS {
        md += &format!("  - {name}: `{args}`\n");
    }
    md += &problems;
    println!("\n{md}");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-pgbench.md");
    match fs::create_dir_all(path.parent().unwrap()).and_then(|()| fs::write(&path, &md)) {
        Ok(()) => eprintln!("written to {}", path.display()),
        Err(e) => eprintln!("could not write {}: {e}", path.display()),
    }

    drop(bouncer);
    if let Some(proxy) = proxy {
        rt.block_on(proxy.shutdown());
    }
}

/// The two markdown tables, from `runs[workload][target]`, medians per target.
fn tables(runs: &[Vec<Vec<Run>>]) -> String {
    let med = |w: usize, t: usize, f: fn(&Run) -> Option<f64>| {
        median(runs[w][t].iter().filter_map(f).collect())
    };
    let tps = |w, t| med(w, t, |r| Some(r.tps));
    let lat = |w, t| med(w, t, |r| Some(r.latency_ms));
    let cpu = |w, t| med(w, t, |r| r.proxy_cpu_us);
    let ratio = |a: Option<f64>, b: Option<f64>| cell(a.zip(b).map(|(a, b)| a / b), 2);
    let mut md = String::from("## pgbench: direct vs tidepool vs PgBouncer\n\n");
    md += &header(&["workload", TPS_COLS].join(" | "));
    let last = WORKLOADS.len() - 1;
    for (w, (name, _)) in WORKLOADS.iter().enumerate().take(last) {
        let mut cells = vec![name.to_string()];
        cells.extend((0..3).map(|t| cell(tps(w, t), 0)));
        cells.extend([ratio(tps(w, 1), tps(w, 0)), ratio(tps(w, 1), tps(w, 2))]);
        cells.extend((0..3).map(|t| cell(lat(w, t), 3)));
        cells.extend((1..3).map(|t| cell(cpu(w, t), 0)));
        md += &row(&cells);
    }
    md += "\n";
    md += &header(&["1 client, select-only", LATENCY_COLS].join(" | "));
    let added = |t| lat(last, t).zip(lat(last, 0)).map(|(p, d)| (p - d) * 1e3);
    let mut cells = vec![WORKLOADS[last].0.to_owned()];
    cells.extend((0..3).map(|t| cell(lat(last, t), 3)));
    cells.extend([cell(added(1), 0), cell(added(2), 0)]);
    cells.extend((0..3).map(|t| cell(tps(last, t), 0)));
    cells.extend((1..3).map(|t| cell(cpu(last, t), 0)));
    md += &row(&cells);

    md
}
