//! pgbench figures: direct to the primary vs. through tidepool vs. through PgBouncer,
//! and the cost of tidepool's consistency modes on a write-then-read workload.
//!
//! Not a timed test but a report: `cargo bench --bench pgbench` starts a local
//! primary + 2 replicas, loads `pgbench -i -s 10`, runs tidepool (`tidepool run`,
//! as deployed) and PgBouncer as child processes, then runs each workload against every target in interleaved rounds, so that
//! drift (cache warm-up, table bloat from TPC-B, other load) hits all targets alike.
//! PgBouncer is Debian's 1.18 and, for the `-M extended` and `-M prepared` workloads,
//! also 1.24.1 with `max_prepared_statements`, built from Debian's source package.
//! Then, with both proxies closed, "counted runs" through fresh tidepool instances
//! show where reads went (pgbench_accounts index scans per node): each workload once,
//! and a custom write-then-read script direct and per `routing.consistency` mode.
//!
//! Env: `TIDEPOOL_BENCH_SECS` (per pgbench run, default 20), `TIDEPOOL_BENCH_ROUNDS`
//! (default 2; the median per target is reported, and ratios are medians of per-round
//! ratios), `TIDEPOOL_BENCH_MODE_ROUNDS` (rounds of the write-then-read table, default
//! `TIDEPOOL_BENCH_ROUNDS`), `TIDEPOOL_BENCH_ONLY=write-then-read` (that table alone,
//! on a fresh cluster) or `TIDEPOOL_BENCH_ONLY=WORKLOAD` (one row of the throughput
//! tables, e.g. `TPC-B-like -c16`, and nothing after them), `RUST_LOG` (proxy logs
//! to stderr).
//! The report goes to stdout and to `target/bench-pgbench.md`.

use std::fs;
use std::net::{Ipv4Addr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sha2::Digest;
use tidepool::demo::cluster::{Cluster, ClusterSpec, free_port};

const PGBOUNCER: &str = "/usr/sbin/pgbouncer";
/// PgBouncer with `max_prepared_statements` (≥ 1.21), which `-M prepared` in
/// transaction mode needs and bookworm's 1.18 lacks: the source package of
/// Debian trixie's 1.24.1 (its binary needs a newer libc than bookworm's).
const PGBOUNCER_NEW: &str = "1.24.1";
const PGBOUNCER_NEW_URL: &str =
    "http://deb.debian.org/debian/pool/main/p/pgbouncer/pgbouncer_1.24.1.orig.tar.gz";
/// From trixie's `Sources`: a tarball that does not match is not built.
const PGBOUNCER_NEW_SHA256: &str =
    "da72a3aba13072876d055a3e58dd4aba4a5de4ed6148e73033185245598fd3e0";
/// Debian packages the build needs.
const PGBOUNCER_NEW_BUILD_DEPS: [&str; 6] = [
    "libevent-dev",
    "libc-ares-dev",
    "libssl-dev",
    "pkg-config",
    "make",
    "gcc",
];
/// The configuration of the new PgBouncer on top of the one both share.
const PGBOUNCER_NEW_CONF: &str = "max_prepared_statements = 200\n";
/// Server connections per node (tidepool) and per (user, db) (PgBouncer): the same
/// number, and equal to the client count, so neither proxy makes clients queue.
const POOL_SIZE: usize = 16;
/// `pool.pipeline_depth` of the two tidepools of the throughput tables: on
/// this box, where PostgreSQL is CPU-bound, reads of different clients
/// share a few server connections. The write-then-read table runs without
/// it, so that it compares the consistency modes alone.
const PIPELINE_DEPTH: usize = 8;
/// tidepool twice: as deployed (reads to the replicas, a causal token after each
/// write) and with every statement on the primary and no token (`consistency =
/// "strong"`, `report_lsn = false`), which does exactly PgBouncer's work.
/// PgBouncer 1.24 runs only the workloads `runs_workload` gives it.
const TARGETS: [&str; 5] = [
    "direct",
    "tidepool",
    "tidepool→primary",
    "pgbouncer",
    "pgbouncer 1.24",
];
/// Index of PgBouncer (Debian's 1.18) in `TARGETS`: the baseline of the main table.
const BOUNCER: usize = 3;
/// Index of PgBouncer 1.24 in `TARGETS`.
const BOUNCER_NEW: usize = 4;
const TPS_COLS: &str = "direct TPS | tidepool TPS | tidepool→primary TPS | pgbouncer TPS | tidepool/pgbouncer | tidepool→primary/pgbouncer | direct lat ms | tidepool lat ms | tidepool→primary lat ms | pgbouncer lat ms | tidepool CPU µs/txn | tidepool→primary CPU µs/txn | pgbouncer CPU µs/txn";
const LATENCY_COLS: &str = "direct lat ms | tidepool lat ms | tidepool→primary lat ms | pgbouncer lat ms | added µs tidepool | added µs tidepool→primary | added µs pgbouncer | tidepool CPU µs/txn | tidepool→primary CPU µs/txn | pgbouncer CPU µs/txn";
const BOUNCER_NEW_COLS: &str = "pgbouncer 1.24 TPS | tidepool/pgbouncer 1.24 | tidepool→primary/pgbouncer 1.24 | pgbouncer 1.24 lat ms | pgbouncer 1.24 CPU µs/txn";
const MODE_COLS: &str = "TPS | TPS vs eventual | lat ms | reads served by replicas | reads on primary | SELECTs run on replicas (per replica) | replay lag ms median / max";

/// `(name, pgbench args)`. Throughput workloads first; the 1-client run must stay
/// last: it is reported separately, as the latency each proxy adds per query.
const WORKLOADS: &[(&str, &str)] = &[
    ("select-only -c16", "-S -M simple -c 16 -j 2"),
    ("TPC-B-like -c16", "-M simple -c 16 -j 2"),
    ("select-only -M extended -c16", "-S -M extended -c 16 -j 2"),
    ("select-only -M prepared -c16", "-S -M prepared -c 16 -j 2"),
    ("TPC-B-like -M prepared -c16", "-M prepared -c 16 -j 2"),
    ("select-only -c1", "-S -M simple -c 1 -j 1"),
];

/// Write-then-read: each tidepool instance's name and `[routing]`, in table order.
/// The last shows what `ryw_wait` buys: a read that finds its replica behind goes
/// to the primary at once instead of waiting for the replica.
const MODES: [(&str, &str); 5] = [
    ("eventual", "consistency = \"eventual\""),
    ("read_your_writes", "consistency = \"read_your_writes\""),
    ("monotonic", "consistency = \"monotonic\""),
    ("strong", "consistency = \"strong\""),
    (
        "read_your_writes, ryw_wait = 0",
        "consistency = \"read_your_writes\"\nryw_wait = \"0ms\"",
    ),
];
/// Custom scripts know the scale only from `-s` (`:scale` is 1 otherwise).
const MODE_ARGS: &str = "-M simple -c 8 -j 2 -s 10";
/// One transaction = two autocommit statements: UPDATE a random account, read it back.
const WRITE_THEN_READ: &str = "\\set aid random(1, 100000 * :scale)
\\set delta random(-5000, 5000)
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance, inet_server_port() FROM pgbench_accounts WHERE aid = :aid;
";
/// Opens a fresh proxy's server connections (primary and replicas) without touching
/// pgbench_accounts, whose scan counters tell where the measured SELECTs ran.
const WARM_UP: &str = "\\set bid random(1, :scale)
UPDATE pgbench_branches SET bbalance = bbalance WHERE bid = :bid;
SELECT bbalance FROM pgbench_branches WHERE bid = :bid;
";

/// What every phase needs; `problems` collects the report's PROBLEM lines.
struct Bench {
    cluster: Cluster,
    /// `listen.workers` of every `tidepool run` the bench starts.
    workers: usize,
    /// `listen.busy_poll` of every `tidepool run` the bench starts.
    busy_poll: String,
    secs: u64,
    rounds: u64,
    /// Rounds of the write-then-read table, whose differences are smaller.
    mode_rounds: u64,
    /// `TIDEPOOL_BENCH_ONLY`: the one workload measured.
    only: Option<String>,
    problems: String,
}

#[derive(Clone, Copy)]
struct Run {
    tps: f64,
    latency_ms: f64,
    transactions: f64,
    /// CPU time (user + system) the proxy process spent per transaction: on a small
    /// machine where proxies and PostgreSQL share cores, that is what a proxy costs.
    proxy_cpu_us: Option<f64>,
}

/// A run, or the text to show instead (pgbench's exit status and errors).
type Outcome = Result<Run, String>;
/// `runs[workload][target][round]`.
type Runs = Vec<Vec<Vec<Outcome>>>;

/// A run with where it scanned pgbench_accounts: direct, or through a fresh tidepool.
struct Counted {
    run: Run,
    /// Per node (primary first): `idx_scan` of pgbench_accounts during the run, per
    /// transaction. Write-then-read has one UPDATE (primary) and one SELECT each, so
    /// `scans[0] - 1` of its reads ran on the primary; a replica's share includes reads
    /// tidepool redid because that replica had not yet replayed the session's floor.
    scans: Vec<f64>,
    /// `pg_stat_replication.replay_lag` (max over replicas, ms), sampled during the run.
    lag_ms: Vec<f64>,
}

impl Counted {
    /// Write-then-read reads served by the primary; the rest were served by replicas.
    fn on_primary(&self) -> f64 {
        self.scans[0] - 1.0
    }
}

/// A proxy in its own process (PgBouncer, `tidepool run`), killed however `main`
/// ends, so a failed run never leaks a daemon.
struct ChildProxy {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl ChildProxy {
    /// The warnings and errors a tidepool logged while the bench ran (none for
    /// PgBouncer, whose log has no `tidepool.log`), past its start: what a
    /// failed run needs to be explained after the temp dir is gone.
    fn warnings(&self) -> Vec<String> {
        let log = fs::read_to_string(self._dir.path().join("tidepool.log")).unwrap_or_default();
        // Logged once at start; a second one is news (an epoch mid-run).
        let mut startup = vec!["new topology epoch", "new primary published"];
        log.lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .filter(|l| match startup.iter().position(|s| l.contains(s)) {
                Some(i) => {
                    startup.remove(i);
                    false
                }
                None => true,
            })
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for ChildProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    let value = std::env::var(name).ok().and_then(|v| v.parse().ok());
    value.unwrap_or(default).max(1)
}

fn first_line(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> String {
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

/// `apt-get install -y`, again after an `apt-get update` if that fails (stale lists).
fn apt_install(packages: &[&str]) -> bool {
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd.status().is_ok_and(|s| s.success())
    };
    let install = || apt(&[&["install", "-y"], packages].concat());
    install() || (apt(&["update"]) && install())
}

/// Installs PgBouncer when missing and we may; `false` means: skip its column.
fn ensure_pgbouncer() -> bool {
    if !Path::new(PGBOUNCER).exists() && is_root() {
        eprintln!("{PGBOUNCER} missing: apt-get install -y pgbouncer");
        apt_install(&["pgbouncer"]);
    }
    let found = Path::new(PGBOUNCER).exists();
    if !found {
        eprintln!("NOTE: {PGBOUNCER} unavailable and not installable: no PgBouncer column");
    }
    found
}

/// PgBouncer 1.24.1's binary, built on the first run into `pgbouncer-1.24.1/` under
/// the cargo target dir (tarball, sources, `build.log`, and the install prefix);
/// later runs reuse it.
fn pgbouncer_new() -> Result<PathBuf, String> {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).parent();
    let prefix = target.ok_or("no cargo target dir")?;
    let prefix = prefix.join(format!("pgbouncer-{PGBOUNCER_NEW}"));
    let bin = prefix.join("bin/pgbouncer");
    if !bin.exists() {
        eprintln!(
            "building PgBouncer {PGBOUNCER_NEW} into {}",
            prefix.display()
        );
        install_build_deps()?;
        let tarball = download_source(&prefix)?;
        build_pgbouncer(&tarball, &prefix)?;
    }
    if is_root() {
        let_others_run(&bin, &prefix)?;
    }
    Ok(bin)
}

/// Installs the build's missing Debian packages when we may; fails if some stay missing.
fn install_build_deps() -> Result<(), String> {
    let installed = |package: &&str| {
        let status = ["-W", "-f=${db:Status-Status}", package];
        first_line("dpkg-query", &status) == "installed"
    };
    let missing = || {
        let deps = PGBOUNCER_NEW_BUILD_DEPS.into_iter();
        deps.filter(|p| !installed(p)).collect::<Vec<_>>()
    };
    if !missing().is_empty() && is_root() {
        eprintln!("apt-get install -y {}", missing().join(" "));
        apt_install(&missing());
    }
    match missing() {
        m if m.is_empty() => Ok(()),
        m => Err(format!("build packages missing: {}", m.join(" "))),
    }
}

/// The source tarball in `prefix`, downloaded unless already there; one whose
/// sha256 is not the expected one is deleted and nothing is built.
fn download_source(prefix: &Path) -> Result<PathBuf, String> {
    fs::create_dir_all(prefix).map_err(|e| format!("{}: {e}", prefix.display()))?;
    let name = PGBOUNCER_NEW_URL.rsplit('/').next().unwrap_or_default();
    let tarball = prefix.join(name);
    if !tarball.exists() {
        let mut curl = Command::new("curl");
        curl.args(["-sf", PGBOUNCER_NEW_URL, "-o"]).arg(&tarball);
        build_step(&mut curl, &prefix.join("build.log"))?;
    }
    let bytes = fs::read(&tarball).map_err(|e| format!("{}: {e}", tarball.display()))?;
    let sum: String = sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if sum != PGBOUNCER_NEW_SHA256 {
        let _ = fs::remove_file(&tarball);
        return Err(format!(
            "{name}: sha256 {sum}, expected {PGBOUNCER_NEW_SHA256}: deleted, not built"
        ));
    }
    Ok(tarball)
}

/// Unpacks `tarball` into `prefix/src`, then configure, make, make install into `prefix`.
fn build_pgbouncer(tarball: &Path, prefix: &Path) -> Result<(), String> {
    let (src, log) = (prefix.join("src"), prefix.join("build.log"));
    let _ = fs::remove_dir_all(&src);
    fs::create_dir_all(&src).map_err(|e| format!("{}: {e}", src.display()))?;
    let mut untar = Command::new("tar");
    untar.arg("xzf").arg(tarball).arg("--strip-components=1");
    build_step(untar.arg("-C").arg(&src), &log)?;
    let prefix_arg = format!("--prefix={}", prefix.display());
    let steps: [&[&str]; 3] = [
        &[
            "./configure",
            &prefix_arg,
            "--without-pam",
            "--without-systemd",
        ],
        &["make", "-j2"],
        &["make", "install"],
    ];
    for step in steps {
        build_step(
            Command::new(step[0]).args(&step[1..]).current_dir(&src),
            &log,
        )?;
    }
    Ok(())
}

/// Runs `cmd` with its output appended to `log`; a failure quotes the log's last lines.
fn build_step(cmd: &mut Command, log: &Path) -> Result<(), String> {
    let open = fs::OpenOptions::new().create(true).append(true).open(log);
    let out = open.map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let status = match cmd.stdin(Stdio::null()).stdout(out).stderr(err).status() {
        Ok(status) if status.success() => return Ok(()),
        Ok(status) => status.to_string(),
        Err(e) => e.to_string(),
    };
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(3)..].join("\n");
    let log = log.display();
    Err(format!("{cmd:?}: {status} (in {log}):\n{tail}"))
}

/// As root, PgBouncer runs as another user (it refuses root), who must reach the
/// binary: `prefix` and what leads to the binary in it get 755, the dirs above
/// `prefix` the search bits only.
fn let_others_run(bin: &Path, prefix: &Path) -> Result<(), String> {
    for path in bin.ancestors() {
        let bits = if path.starts_with(prefix) {
            0o755
        } else {
            0o111
        };
        let meta = fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mode = meta.permissions().mode();
        if mode & bits != bits {
            let chmod = fs::set_permissions(path, fs::Permissions::from_mode(mode | bits));
            chmod.map_err(|e| format!("chmod {}: {e}", path.display()))?;
        }
    }
    Ok(())
}

/// `(uid, gid)` via `id`, because the crate's style forbids `unsafe` (`getpwnam`).
fn user_ids(user: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| first_line("id", &[flag, user]).parse().ok();
    Some((id("-u")?, id("-g")?))
}

/// Starts the PgBouncer binary `bin` in the foreground, transaction mode, SCRAM on
/// both sides (1.18 needs the plaintext password in auth_file to do SCRAM towards
/// the server), with `extra` appended to its `[pgbouncer]` section.
/// It refuses to run as root, so as root it runs as `postgres` (or `nobody`).
fn start_pgbouncer(bin: &Path, primary_port: u16, extra: &str) -> Result<ChildProxy, String> {
    let dir = tempfile::Builder::new().prefix("tp-bouncer-").tempdir();
    let dir = dir.map_err(|e| e.to_string())?;
    let (port, d) = (free_port(), dir.path().display());
    let ini = format!(
        "[databases]\npostgres = host=127.0.0.1 port={primary_port} dbname=postgres\n\n\
         [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
         auth_type = scram-sha-256\nauth_file = {d}/userlist.txt\npool_mode = transaction\n\
         default_pool_size = {POOL_SIZE}\nmax_client_conn = 200\n\
         ignore_startup_parameters = extra_float_digits\n\
         logfile = {d}/pgbouncer.log\npidfile = {d}/pgbouncer.pid\n{extra}"
    );
    let users = "\"app\" \"app\"\n";
    let files = [("pgbouncer.ini", ini.as_str()), ("userlist.txt", users)];
    for (name, text) in files {
        fs::write(dir.path().join(name), text).map_err(|e| format!("{name}: {e}"))?;
    }
    let stderr_path = dir.path().join("stderr.log");
    let stderr = fs::File::create(&stderr_path).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(bin);
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
    let child = child.map_err(|e| format!("spawning {}: {e}", bin.display()))?;
    let bouncer = ChildProxy {
        child,
        port,
        _dir: dir,
    };
    bouncer.listening(&stderr_path)
}

impl ChildProxy {
    /// Waits until the proxy accepts connections; its log tells why if it never does.
    fn listening(mut self, log: &Path) -> Result<ChildProxy, String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_err() {
            let exited = self.child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                let log = fs::read_to_string(log).unwrap_or_default();
                return Err(format!("did not come up ({exited:?}):\n{log}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(self)
    }
}

/// `tidepool run` on its own config file, as it is deployed, with `listen`
/// (`Bench::listen`) under `[listen]`.
///
/// The bench runs two tidepools at once against one cluster, each with its own
/// embedded coordinator (a deployment shares etcd instead), on a box that all
/// of PostgreSQL, pgbench and the proxies saturate: there, polls have gone
/// unanswered for over 3 s (`poll_timeout` × `failures_before_down`), the primary
/// was marked down (57P03 for every writer), and once one tidepool failed over
/// and fenced it, leaving every later write run to fail. A throughput bench
/// must not test HA: no replica may be promoted, and polls wait 5 s.
fn start_tidepool(cluster: &Cluster, listen: &str, extra: &str) -> Result<ChildProxy, String> {
    let dir = tempfile::Builder::new().prefix("tp-proxy-").tempdir();
    let dir = dir.map_err(|e| e.to_string())?;
    let port = free_port();
    let replicas: Vec<String> = cluster
        .replicas()
        .iter()
        .map(|r| format!("\"{}\"", r.addr()))
        .collect();
    let toml = tidepool::demo::config_toml(cluster, &format!("127.0.0.1:{port}"), extra)
        .replacen(
            "[listen]\n",
            &format!("[listen]\nadmin = \"127.0.0.1:0\"\n{listen}"),
            1,
        )
        .replacen("[cluster]\n", "[cluster]\npoll_timeout = \"5s\"\n", 1)
        + &format!("\n[coordinator]\nnofailover = [{}]\n", replicas.join(", "));
    let (config, log_path) = (
        dir.path().join("tidepool.toml"),
        dir.path().join("tidepool.log"),
    );
    fs::write(&config, toml).map_err(|e| e.to_string())?;
    let log = fs::File::create(&log_path).map_err(|e| e.to_string())?;
    // tidepool logs to stdout; stderr would carry a panic's message.
    let log_too = log.try_clone().map_err(|e| e.to_string())?;
    let child = Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .args(["run", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_too)
        // Plain log lines: `ChildProxy::warnings` reads them.
        .env("NO_COLOR", "1")
        .spawn()
        .map_err(|e| format!("spawning tidepool: {e}"))?;
    let proxy = ChildProxy {
        child,
        port,
        _dir: dir,
    };
    proxy.listening(&log_path)
}

fn pgbench(port: u16, args: &[&str]) -> Command {
    let mut cmd = Command::new("pgbench");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "app"]);
    cmd.args(args).arg("postgres").env("PGPASSWORD", "app");
    // The same wire for all three targets: no TLS negotiation anywhere.
    cmd.env("PGSSLMODE", "disable").env_remove("PGOPTIONS");
    cmd
}

/// One measured run. pgbench 15 aborts a client on most errors (non-zero exit);
/// serialization failures and deadlocks are counted as "failed transactions"
/// instead, which also make the run an `Err`.
fn run_pgbench(port: u16, args: &str, secs: u64) -> Outcome {
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
            let (status, done) = (out.status, transactions.unwrap_or(0.0));
            Err(format!(
                "pgbench {status} ({failed} failed, {done} processed transactions)\n{tail}"
            ))
        }
    }
}

impl Bench {
    /// The `[listen]` lines of every tidepool the bench starts.
    fn listen(&self) -> String {
        format!(
            "workers = {}\nbusy_poll = \"{}\"\n",
            self.workers, self.busy_poll
        )
    }

    /// Logs a run to stderr; a failure also becomes a PROBLEM line of the report,
    /// with pgbench's exit status and its first error.
    fn log_run(&mut self, outcome: Result<&Run, &String>, what: &str) {
        match outcome {
            Ok(run) => eprintln!("  tps {:.1}, latency {:.3} ms", run.tps, run.latency_ms),
            Err(e) => {
                eprintln!("  FAILED: {e}");
                let mut lines = e.lines();
                let first = lines.next().unwrap_or_default();
                let error = lines.find(|l| l.contains("ERROR") || l.contains("error:"));
                let error = error.unwrap_or_default();
                self.problems += &format!("- PROBLEM: {what}: {first}: {error}\n");
            }
        }
    }

    /// `runs[workload][target]`: one outcome per round, rounds interleaved across
    /// the targets that run the workload (`runs_workload`).
    fn measure(
        &mut self,
        ports: [Option<u16>; TARGETS.len()],
        pids: &[Option<String>; TARGETS.len()],
    ) -> Runs {
        let rounds = self.rounds;
        let mut runs = vec![vec![Vec::new(); TARGETS.len()]; WORKLOADS.len()];
        for (w, &(workload, args)) in WORKLOADS.iter().enumerate() {
            if self.only.as_ref().is_some_and(|only| only != workload) {
                continue;
            }
            self.settle();
            for round in 1..=rounds {
                for t in rotated(TARGETS.len(), round) {
                    let (name, Some(port)) = (TARGETS[t], ports[t]) else {
                        continue;
                    };
                    if !runs_workload(t, args) {
                        continue;
                    }
                    eprintln!("[{workload}] round {round}/{rounds} via {name} ...");
                    let pid = pids[t].as_deref();
                    let cpu_before = pid.and_then(cpu_secs);
                    let outcome = run_pgbench(port, args, self.secs).map(|mut run| {
                        let cpu = pid.and_then(cpu_secs).zip(cpu_before);
                        run.proxy_cpu_us = cpu.map(|(a, b)| (a - b) * 1e6 / run.transactions);
                        run
                    });
                    let what = format!("{workload} via {name}, round {round}");
                    self.log_run(outcome.as_ref(), &what);
                    runs[w][t].push(outcome);
                }
            }
        }
        runs
    }

    /// Where tidepool sends each -c16 workload: the share of pgbench_accounts index scans
    /// per node during a 3 s run through a fresh tidepool (configured as the measured one).
    fn routing_check(&self) -> Vec<String> {
        let check = |&(name, args): &(&str, &str)| {
            eprintln!("[routing check] {name} via tidepool ...");
            let counted = self.counted_run(Some(""), None, args, 3);
            let counted = counted.map_err(|e| eprintln!("  FAILED: {e}"));
            let pct = counted.map(|c| {
                let total = c.scans.iter().sum::<f64>();
                let pct = c.scans.iter().map(|s| pct(Some(s / total), 0));
                pct.collect::<Vec<_>>().join(" / ")
            });
            format!("{name}: {}", pct.unwrap_or_else(|()| "run failed".into()))
        };
        WORKLOADS[..WORKLOADS.len() - 1].iter().map(check).collect()
    }

    /// `idx_scan` of pgbench_accounts per node: every pgbench statement on it (the
    /// UPDATEs on the primary, the SELECTs wherever they ran) scans its primary key
    /// once; neither WAL replay nor tidepool's own queries do.
    fn account_scans(&self) -> Result<Vec<f64>, String> {
        let sql = "select idx_scan from pg_stat_user_tables where relname = 'pgbench_accounts'";
        let scans = |i| {
            let out = self.cluster.psql(i, sql).map_err(|e| e.to_string())?;
            out.parse()
                .map_err(|e| format!("idx_scan on node {i}: {out:?}: {e}"))
        };
        (0..self.cluster.nodes().len()).map(scans).collect()
    }

    /// Vacuums the pgbench tables, checkpoints and waits for the replicas to
    /// replay it all, so that the cleanup of one workload's writes does not
    /// fall on the next workload's first runs: in the 2026-12-06 run, every
    /// target of the first `-M extended` round after the TPC-B rounds ran 12–28%
    /// below its two later rounds (the first targets of the round the most), and
    /// replicas fell up to 325 ms behind during the read_your_writes runs.
    fn settle(&self) {
        let started = Instant::now();
        let sql = [
            "vacuum (analyze) pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history",
            "checkpoint",
        ];
        for sql in sql {
            if let Err(e) = self.cluster.psql(0, sql) {
                eprintln!("WARNING: {sql}: {e}");
            }
        }
        if let Err(e) = self
            .cluster
            .wait_replicas_caught_up(Duration::from_secs(120))
        {
            eprintln!("WARNING: replicas not caught up: {e}");
        }
        eprintln!("settled in {:?}", started.elapsed());
    }

    /// Waits until no `app` backend is left on any node. A backend flushes its pending
    /// statistics as it exits (before leaving pg_stat_activity); idle ones may keep
    /// them for up to 10 s. So after this, the scan counters are complete.
    fn wait_idle(&self) {
        let sql = "select count(*) from pg_stat_activity where usename = 'app'";
        let busy = |i| self.cluster.psql(i, sql).map_or(true, |n| n != "0");
        let deadline = Instant::now() + Duration::from_secs(15);
        while (0..self.cluster.nodes().len()).any(busy) {
            if Instant::now() > deadline {
                eprintln!("WARNING: `app` backends still open after 15 s: counts may be short");
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `f` while sampling the replicas' replay lag (ms) every 500 ms, over one
    /// connection: a psql started per sample (fork, exec, SCRAM) took CPU in bursts
    /// that held up WAL replay, which read_your_writes then waited for (it cost that
    /// mode 9% against eventual in runs by hand, 4% without the sampler).
    fn sampling_lag<T>(&self, f: impl FnOnce() -> T) -> (T, Vec<f64>) {
        let sql =
            "select (max(extract(epoch from replay_lag)) * 1000)::float8 from pg_stat_replication";
        let stop = AtomicBool::new(false);
        let url = format!(
            "host=127.0.0.1 port={} user={} password={} dbname=postgres",
            self.cluster.primary().port,
            self.cluster.admin_user(),
            self.cluster.admin_password()
        );
        std::thread::scope(|s| {
            let sampler = s.spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                let runtime = runtime.expect("a runtime for the lag sampler");
                runtime.block_on(async {
                    let mut samples = Vec::new();
                    let Ok((client, conn)) =
                        tokio_postgres::connect(&url, tokio_postgres::NoTls).await
                    else {
                        return samples;
                    };
                    tokio::spawn(conn);
                    while !stop.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        if let Ok(row) = client.query_one(sql, &[]).await {
                            samples.extend(row.get::<_, Option<f64>>(0)); // NULL: skipped
                        }
                    }
                    samples
                })
            });
            let out = f();
            stop.store(true, Ordering::Relaxed);
            (out, sampler.join().unwrap_or_default())
        })
    }

    /// A run whose pgbench_accounts scans are counted per node: direct (`routing` None)
    /// or through a fresh tidepool with this `[routing]` table, shut down afterwards so
    /// that its server backends exit and flush their statistics.
    fn counted_run(
        &self,
        routing: Option<&str>,
        warm_up: Option<&str>,
        args: &str,
        secs: u64,
    ) -> Result<Counted, String> {
        self.settle();
        self.wait_idle();
        let before = self.account_scans()?;
        let proxy = routing.map(|routing| {
            let extra = format!("[pool]\nsize = {POOL_SIZE}\n\n[routing]\n{routing}\n");
            let proxy = start_tidepool(&self.cluster, &self.listen(), &extra);
            proxy.map_err(|e| format!("tidepool did not start: {e}"))
        });
        let proxy = proxy.transpose()?;
        let primary = self.cluster.primary().port;
        let port = proxy.as_ref().map_or(primary, |p| p.port);
        if let Some(Err(e)) = warm_up.map(|args| run_pgbench(port, args, 1)) {
            eprintln!("  warm-up failed: {e}");
        }
        let (run, lag_ms) = self.sampling_lag(|| run_pgbench(port, args, secs));
        // Its server backends exit with it and flush their statistics.
        drop(proxy);
        let run = run?;
        self.wait_idle();
        let after = self.account_scans()?;
        let delta = after
            .iter()
            .zip(&before)
            .map(|(a, b)| (a - b) / run.transactions);
        let scans = delta.collect();
        Ok(Counted { run, scans, lag_ms })
    }

    /// The write-then-read table: direct, then tidepool in each mode, rounds interleaved.
    fn consistency(&mut self) -> String {
        let dir = tempfile::Builder::new().prefix("tp-bench-").tempdir();
        let dir = dir.expect("creating a temp dir for the pgbench scripts");
        let script = |name: &str, text: &str| {
            let path = dir.path().join(name);
            fs::write(&path, text).expect("writing a pgbench script");
            format!("-f {} {MODE_ARGS}", path.display())
        };
        let scripts = [
            script("warm-up.sql", WARM_UP),
            script("write-then-read.sql", WRITE_THEN_READ),
        ];
        let modes = || std::iter::once(None).chain(MODES.map(Some));
        let name =
            |m: Option<(&str, &str)>| m.map_or("direct".into(), |(m, _)| format!("tidepool {m}"));
        let modes: Vec<_> = modes().collect();
        let mut results: Vec<Vec<_>> = modes.iter().map(|_| Vec::new()).collect();
        let rounds = self.mode_rounds;
        for round in 1..=rounds {
            for i in rotated(modes.len(), round) {
                let (mode, name) = (modes[i], name(modes[i]));
                eprintln!("[write-then-read] round {round}/{rounds} via {name} ...");
                let routing = mode.map(|(_, routing)| routing);
                let (warm_up, args) = (Some(scripts[0].as_str()), &scripts[1]);
                let outcome = self.counted_run(routing, warm_up, args, self.secs);
                let what = format!("write-then-read via {name}, round {round}");
                self.log_run(outcome.as_ref().map(|r| &r.run), &what);
                results[i].push(outcome);
            }
        }
        consistency_table(&results, modes.into_iter().map(name))
    }
}

/// Whether target `t` runs the workload with these pgbench args: PgBouncer 1.24 is
/// there for `-M prepared`, which 1.18 cannot pool, and `-M extended`, the same
/// protocol with unnamed statements; the `-M simple` workloads keep 1.18 alone.
fn runs_workload(t: usize, args: &str) -> bool {
    t != BOUNCER_NEW || args.contains("-M extended") || args.contains("-M prepared")
}

/// The targets of one round, each round starting one later: a checkpoint or an
/// autovacuum that follows the heaviest run then lands on every target in turn.
fn rotated(targets: usize, round: u64) -> impl Iterator<Item = usize> {
    (0..targets).map(move |k| (k + round as usize) % targets)
}

/// The median over rounds of `a`'s TPS over `b`'s in the same round. Load on this
/// machine drifts by ±8% between rounds (autovacuum, checkpoints, table bloat)
/// and moves runs that are close in time together, so pairing them by round
/// cancels most of it; a ratio of medians mixes rounds.
fn paired_ratio<T, E>(
    a: &[Result<T, E>],
    b: &[Result<T, E>],
    tps: impl Fn(&T) -> f64,
) -> Option<f64> {
    paired(a, b, |a, b| tps(a) / tps(b))
}

/// The median over rounds of `f` of `a`'s and `b`'s runs in the same round.
fn paired<T, E>(a: &[Result<T, E>], b: &[Result<T, E>], f: impl Fn(&T, &T) -> f64) -> Option<f64> {
    let pairs = a
        .iter()
        .zip(b)
        .filter_map(|(a, b)| Some(f(a.as_ref().ok()?, b.as_ref().ok()?)));
    median(pairs.collect())
}

fn consistency_table(
    results: &[Vec<Result<Counted, String>>],
    names: impl Iterator<Item = String>,
) -> String {
    let med = |i: usize, f: &dyn Fn(&Counted) -> f64| {
        median(results[i].iter().flatten().map(f).collect())
    };
    let tps = |i| med(i, &|r| r.run.tps);
    let served = |i| med(i, &|r| 1.0 - r.on_primary());
    let vs_eventual = |i: usize| paired_ratio(&results[i], &results[1], |r| r.run.tps);
    let mut md = String::from("\n## write-then-read: consistency modes through tidepool\n\n");
    md += &header(&["target", MODE_COLS].join(" | "));
    for (i, name) in names.enumerate() {
        let failed = results[i].iter().filter(|r| r.is_err()).count();
        let vs = vs_eventual(i).map(|r| format!("{:+.1}%", (r - 1.0) * 1e2));
        let nodes = results[i].iter().flatten().map(|r| r.scans.len()).max();
        let per = (1..nodes.unwrap_or(1)).map(|k| pct(med(i, &|r| r.scans[k]), 0));
        let per = per.collect::<Vec<_>>().join(" / ");
        let run_on_replicas = pct(med(i, &|r| r.scans[1..].iter().sum()), 0);
        let lags: Vec<f64> = results[i]
            .iter()
            .flatten()
            .flat_map(|r| r.lag_ms.clone())
            .collect();
        let max_lag = lags.iter().copied().reduce(f64::max);
        md += &row(&[
            name,
            tps_text(tps(i), failed, results[i].len()),
            vs.unwrap_or_else(|| "n/a".into()),
            cell(med(i, &|r| r.run.latency_ms), 3),
            pct(served(i), 1),
            pct(med(i, &|r| r.on_primary()), 1),
            format!("{run_on_replicas} ({per})"),
            format!("{} / {}", cell(median(lags), 2), cell(max_lag, 2)),
        ]);
    }
    let cost = vs_eventual(2).map(|r| (1.0 - r) * 1e2);
    let verdict = match cost.zip(served(2)) {
        Some((c, s)) if c <= 5.0 && s >= 0.8 => "target met",
        Some(_) => "target NOT met",
        None => "n/a",
    };
    let cost = cost.map_or_else(|| "n/a".into(), |c| format!("{c:.1}%"));
    md + &format!(
        "\nread_your_writes vs eventual: TPS cost {cost} (target ≤ 5%), reads served by replicas \
         {} (target ≥ 80%): {verdict}.\n",
        pct(served(2), 1),
    )
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

fn pct(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "n/a".into(), |v| format!("{:.decimals$}%", v * 1e2))
}

/// A TPS cell that shows failed runs: "fails (2/2)" when none succeeded.
fn tps_text(tps: Option<f64>, failed: usize, runs: usize) -> String {
    match tps {
        _ if failed == 0 => cell(tps, 0),
        None => format!("fails ({failed}/{runs})"),
        Some(v) => format!("{v:.0} ({failed}/{runs} failed)"),
    }
}

/// The cluster, loaded with `pgbench -i -s 10`, replicas caught up.
fn start_cluster() -> Cluster {
    let started = Instant::now();
    let cluster = Cluster::start(ClusterSpec::default()).expect("starting the local cluster");
    let (elapsed, dir) = (started.elapsed(), cluster.dir().display());
    eprintln!("cluster up in {elapsed:?} in {dir}");
    let init = pgbench(cluster.primary().port, &["-i", "-q", "-s", "10"]).output();
    let init = init.expect("spawning pgbench");
    let init_err = String::from_utf8_lossy(&init.stderr);
    assert!(init.status.success(), "pgbench -i failed:\n{init_err}");
    if let Err(e) = cluster.wait_replicas_caught_up(Duration::from_secs(120)) {
        eprintln!("WARNING: replicas not caught up: {e}");
    }
    cluster
}

fn main() {
    if std::env::var_os("RUST_LOG").is_some() {
        let logs = tracing_subscriber::fmt().with_writer(std::io::stderr);
        logs.init();
    }
    let have_bouncer = ensure_pgbouncer();
    let bouncer_new = pgbouncer_new();
    let rounds = env_u64("TIDEPOOL_BENCH_ROUNDS", 2);
    let only = std::env::var("TIDEPOOL_BENCH_ONLY").ok();
    if let Some(only) = &only
        && only != "write-then-read"
        && !WORKLOADS.iter().any(|(w, _)| w == only)
    {
        let names = WORKLOADS.iter().map(|(w, _)| *w).collect::<Vec<_>>();
        eprintln!("TIDEPOOL_BENCH_ONLY: no workload {only:?} (write-then-read, {names:?})");
        std::process::exit(2);
    }
    let mut bench = Bench {
        cluster: start_cluster(),
        workers: env_u64("TIDEPOOL_BENCH_WORKERS", 1) as usize,
        busy_poll: std::env::var("TIDEPOOL_BENCH_BUSY_POLL").unwrap_or_else(|_| "200us".into()),
        secs: env_u64("TIDEPOOL_BENCH_SECS", 20),
        rounds,
        mode_rounds: env_u64("TIDEPOOL_BENCH_MODE_ROUNDS", rounds),
        only,
        problems: String::new(),
    };
    if bench.only.as_deref() == Some("write-then-read") {
        let md = bench.consistency();
        println!("\n{md}");
        return;
    }
    let primary = bench.cluster.primary().port;
    let pool = format!("[pool]\nsize = {POOL_SIZE}\npipeline_depth = {PIPELINE_DEPTH}\n");
    let on_primary = format!("{pool}\n[routing]\nconsistency = \"strong\"\nreport_lsn = false\n");
    let listen = bench.listen();
    let mut skip = |what: &str, e: String| {
        eprintln!("{what} did not start, no column for it: {e}");
        bench.problems += &format!("- PROBLEM: {what} did not start: {e}\n");
    };
    let proxies = [
        ("tidepool", start_tidepool(&bench.cluster, &listen, &pool)),
        (
            "tidepool→primary",
            start_tidepool(&bench.cluster, &listen, &on_primary),
        ),
        (
            "PgBouncer",
            match have_bouncer {
                true => start_pgbouncer(Path::new(PGBOUNCER), primary, ""),
                false => Err("not installed".into()),
            },
        ),
        (
            "PgBouncer 1.24",
            bouncer_new
                .as_ref()
                .map_err(Clone::clone)
                .and_then(|bin| start_pgbouncer(bin, primary, PGBOUNCER_NEW_CONF)),
        ),
    ];
    let proxies = proxies.map(|(what, p)| p.map_err(|e| skip(what, e)).ok());
    let ports = [Some(primary)]
        .into_iter()
        .chain(proxies.iter().map(|p| p.as_ref().map(|p| p.port)));
    let ports: [Option<u16>; TARGETS.len()] = ports
        .collect::<Vec<_>>()
        .try_into()
        .expect("a port per target");

    // Warm-up, not recorded: fills replica caches and lets the proxies open their
    // server connections, which pgbench's "without initial connection time" misses.
    for (name, port) in TARGETS.iter().zip(ports) {
        if let Some(Err(e)) = port.map(|port| run_pgbench(port, WORKLOADS[0].1, 2)) {
            eprintln!("warm-up via {name} failed: {e}");
        }
    }

    let pid = |p: &Option<ChildProxy>| p.as_ref().map(|p| p.child.id().to_string());
    let pids = [
        None,
        pid(&proxies[0]),
        pid(&proxies[1]),
        pid(&proxies[2]),
        pid(&proxies[3]),
    ];
    let runs = bench.measure(ports, &pids);
    let rss = [&pids[1], &pids[BOUNCER], &pids[BOUNCER_NEW]];
    let rss = rss.map(|pid| peak_rss(pid.as_deref().unwrap_or_default()));
    for (name, proxy) in ["tidepool", "tidepool→primary"].iter().zip(&proxies) {
        let warnings = proxy.as_ref().map(ChildProxy::warnings).unwrap_or_default();
        for line in warnings.iter().take(10) {
            bench.problems += &format!("- PROBLEM: {name} logged: {line}\n");
        }
        if warnings.len() > 10 {
            bench.problems += &format!("- PROBLEM: {name} logged {} more\n", warnings.len() - 10);
        }
    }
    // Closing the pools ends their server backends, which flushes their statistics:
    // the counted runs below need quiet pgbench_accounts scan counters.
    drop(proxies);
    let mut md = tables(&runs);
    if bench.only.is_some() {
        println!("\n{md}");
        return;
    }
    let routing = ports[1].map(|_| bench.routing_check().join("; "));
    if ports[1].is_some() {
        md += &bench.consistency();
    }
    let bouncers = [
        have_bouncer.then_some(Path::new(PGBOUNCER)),
        bouncer_new.as_deref().ok(),
    ];
    md += &bench.notes(&runs, routing.as_deref(), &rss, bouncers);
    md += &bench.problems;
    println!("\n{md}");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-pgbench.md");
    match fs::create_dir_all(path.parent().unwrap()).and_then(|()| fs::write(&path, &md)) {
        Ok(()) => eprintln!("written to {}", path.display()),
        Err(e) => eprintln!("could not write {}: {e}", path.display()),
    }
}

impl Bench {
    fn notes(
        &self,
        runs: &Runs,
        routing: Option<&str>,
        rss: &[String; 3],
        bouncers: [Option<&Path>; 2],
    ) -> String {
        let (secs, rounds, cpus) = (self.secs, self.rounds, first_line("nproc", &[]));
        let mode_rounds = self.mode_rounds;
        let (workers, busy_poll) = (self.workers, &self.busy_poll);
        let pgbench_version = first_line("pgbench", &["--version"]);
        let version = |bin: Option<&Path>, missing: &str| {
            bin.map_or_else(|| missing.into(), |bin| first_line(bin, &["--version"]))
        };
        let bouncer_version = version(bouncers[0], "PgBouncer: not available");
        let new_version = version(bouncers[1], "PgBouncer 1.24: not available");
        let prepared = WORKLOADS
            .iter()
            .zip(runs)
            .filter(|((_, a), _)| a.contains("prepared"));
        let prepared_failed = prepared
            .flat_map(|(_, by_target)| &by_target[BOUNCER])
            .any(Result::is_err);
        let mut md = format!(
            "\nNotes:\n\
             - Reads through tidepool go to the 2 replicas (the point of the product); direct, \
             PgBouncer and tidepool→primary (a second tidepool, `consistency = \"strong\"` and \
             `report_lsn = false`: the same work as PgBouncer's, no causal token) send everything \
             to the primary; the token costs the primary one statement per write transaction. TPC-B-like transactions (BEGIN…END) go whole \
             to the primary. Share of pgbench_accounts index scans per node (primary / replica 1 / \
             replica 2) in separate 3 s runs through a fresh tidepool: {}.\n\
             - Pool size {POOL_SIZE}: tidepool per node, PgBouncer per (user, db) on the primary. \
             PostgreSQL x3, both proxies and pgbench share one machine ({cpus} CPUs), so the proxies \
             compete with PostgreSQL and pgbench for CPU.\n\
             - Median of {rounds} interleaved round(s) of {secs} s per target (each round starts \
             with the next target), after an unrecorded 2 s select-only warm-up per target; ratios \
             are medians of the per-round ratios. TPS excludes initial connection time. \"fails \
             (f/n)\": f of n runs failed (pgbench's error is in the PROBLEM lines).\n\
             - Both tidepools are `tidepool run` processes with `listen.workers = {workers}` \
             (`TIDEPOOL_BENCH_WORKERS`) and `listen.busy_poll = \"{busy_poll}\"` \
             (`TIDEPOOL_BENCH_BUSY_POLL`: a session waiting while nothing else runs in the proxy \
             polls this long before it sleeps), PgBouncer runs on its one thread; so are the fresh \
             tidepools of the counted runs below. Both have `pool.pipeline_depth = \
             {PIPELINE_DEPTH}`: autocommit reads of different clients share server connections, \
             up to {PIPELINE_DEPTH} in flight on one (the write-then-read table runs without).\n\
             - Peak RSS (VmHWM): tidepool {} (the `tidepool run` process), PgBouncer {}, \
             PgBouncer 1.24 {}. Proxy CPU µs/txn: user + system CPU time of \
             the proxy process during the run / transactions.\n\
             - PgBouncer 1.24 (its own table, after the 1-client one): Debian bookworm ships PgBouncer 1.18, which has \
             no `max_prepared_statements` (added in 1.21), and the issue asks for the comparison \
             with it set. So the bench also runs PgBouncer {PGBOUNCER_NEW}, built once from \
             Debian's source package (trixie's `pgbouncer_{PGBOUNCER_NEW}.orig.tar.gz`, sha256 \
             checked; trixie's binary needs a newer libc than bookworm's) into \
             `pgbouncer-{PGBOUNCER_NEW}/` under the cargo target dir, configured as the 1.18 one \
             plus `{}` (also 1.24's default, set so that the config says it). It runs the `-M extended` and `-M prepared` workloads only, in the same \
             interleaved rounds; everywhere else the PgBouncer baseline is Debian's 1.18.\n",
            routing.unwrap_or("n/a"),
            rss[0],
            rss[1],
            rss[2],
            PGBOUNCER_NEW_CONF.trim_end(),
        );
        if prepared_failed {
            md += "- `-M prepared` through PgBouncer fails: 1.18 has no `max_prepared_statements` \
                   (added in 1.21), so in transaction mode a client's next transaction runs on a \
                   server connection that lacks its statement (\"prepared statement … does not \
                   exist\") or has another client's under the same name (\"bind message supplies \
                   0 parameters…\"), and pgbench aborts the client. It needs PgBouncer ≥ 1.21 \
                   with `max_prepared_statements` set: see the PgBouncer 1.24 table.\n";
        }
        md += &format!(
            "- Write-then-read (how, in bench/README.md): one fresh tidepool per mode, {mode_rounds} \
             rounds interleaved; TPS vs eventual is the median of per-round ratios. Reads on primary = Δ idx_scan of pgbench_accounts on the primary / \
             transactions − 1 (the UPDATE); served by replicas = the rest. SELECTs run on \
             replicas = their Δ / transactions: above the served share, reads redone because \
             the replica had not replayed the session's floor yet. Replay lag: \
             pg_stat_replication.replay_lag, max over replicas, sampled every 0.5 s.\n\
             - {pgbench_version}; {bouncer_version}; {new_version}.\n\
             - Command: `TIDEPOOL_BENCH_SECS={secs} TIDEPOOL_BENCH_ROUNDS={rounds} \
             TIDEPOOL_BENCH_MODE_ROUNDS={mode_rounds} \
             TIDEPOOL_BENCH_WORKERS={workers} TIDEPOOL_BENCH_BUSY_POLL={busy_poll} cargo bench --bench pgbench`; each run is `pgbench -h 127.0.0.1 -p PORT -U app -n -T {secs} ARGS \
             postgres`, ARGS:\n"
        );
        for (name, args) in WORKLOADS {
            md += &format!("  - {name}: `{args}`\n");
        }
        md + &format!(
            "  - write-then-read: `-f write-then-read.sql {MODE_ARGS}`, the script:\n\n\
             ```\n{WRITE_THEN_READ}```\n\n"
        )
    }
}

/// The three markdown tables, from `runs[workload][target]`, medians per target.
fn tables(runs: &Runs) -> String {
    let med = |w: usize, t: usize, f: fn(&Run) -> Option<f64>| median_of(&runs[w][t], f);
    let lat = |w, t| med(w, t, |r| Some(r.latency_ms));
    let cpu = |w, t| med(w, t, |r| r.proxy_cpu_us);
    let ratio =
        |w: usize, t: usize| cell(paired_ratio(&runs[w][t], &runs[w][BOUNCER], |r| r.tps), 2);
    let mut md = String::from("## pgbench: direct vs tidepool vs PgBouncer\n\n");
    md += &header(&["workload", TPS_COLS].join(" | "));
    let last = WORKLOADS.len() - 1;
    // PgBouncer 1.24 has a table of its own.
    let (targets, proxies) = (0..=BOUNCER, 1..=BOUNCER);
    for (w, (name, _)) in WORKLOADS.iter().enumerate().take(last) {
        let mut cells = vec![name.to_string()];
        cells.extend(targets.clone().map(|t| tps_cell(&runs[w][t])));
        cells.extend((1..BOUNCER).map(|t| ratio(w, t)));
        cells.extend(targets.clone().map(|t| cell(lat(w, t), 3)));
        cells.extend(proxies.clone().map(|t| cell(cpu(w, t), 0)));
        md += &row(&cells);
    }
    md += "\n";
    md += &header(&["1 client, select-only", LATENCY_COLS].join(" | "));
    // Paired by round, as the ratios are: one client's latency moves with
    // the machine's load from round to round, for every target alike.
    let added = |t: usize| {
        paired(&runs[last][t], &runs[last][0], |proxy, direct| {
            (proxy.latency_ms - direct.latency_ms) * 1e3
        })
    };
    let mut cells = vec![WORKLOADS[last].0.to_owned()];
    cells.extend(targets.map(|t| cell(lat(last, t), 3)));
    cells.extend(proxies.clone().map(|t| cell(added(t), 0)));
    cells.extend(proxies.map(|t| cell(cpu(last, t), 0)));
    md += &row(&cells);
    md + &bouncer_new_table(runs)
}

/// PgBouncer 1.24 on the workloads it runs, and the tidepools against it.
fn bouncer_new_table(runs: &Runs) -> String {
    let conf = PGBOUNCER_NEW_CONF.trim_end();
    let mut md = format!("\n## -M extended and -M prepared vs PgBouncer 1.24 (`{conf}`)\n\n");
    md += &header(&["workload", BOUNCER_NEW_COLS].join(" | "));
    let workloads = WORKLOADS.iter().zip(runs);
    for ((name, _), by_target) in workloads.filter(|((_, a), _)| runs_workload(BOUNCER_NEW, a)) {
        let bouncer = &by_target[BOUNCER_NEW];
        let ratio = |t: usize| cell(paired_ratio(&by_target[t], bouncer, |r| r.tps), 2);
        let mut cells = vec![name.to_string(), tps_cell(bouncer)];
        cells.extend((1..BOUNCER).map(ratio));
        cells.push(cell(median_of(bouncer, |r| Some(r.latency_ms)), 3));
        cells.push(cell(median_of(bouncer, |r| r.proxy_cpu_us), 0));
        md += &row(&cells);
    }
    md
}

/// The median of `f` over the runs of one target that succeeded.
fn median_of(rounds: &[Outcome], f: fn(&Run) -> Option<f64>) -> Option<f64> {
    median(rounds.iter().flatten().filter_map(f).collect())
}

/// A TPS cell for one target's rounds, failed runs shown as `tps_text` does.
fn tps_cell(rounds: &[Outcome]) -> String {
    let failed = rounds.iter().filter(|r| r.is_err()).count();
    tps_text(median_of(rounds, |r| Some(r.tps)), failed, rounds.len())
}
