//! The chaos driver: a 3-node cluster with a synchronous standby, a real
//! etcd, two `tidepool run` processes (clients list both, as libpq
//! multi-host URLs, half of them each way round) and a steady mixed load
//! (tests/common/load.rs). Faults are injected one after the other, and a
//! table of what each cost is printed and written to `target/chaos.md`:
//!
//! - kill -9 the primary, 5 times (the rejoin hook, scripts/rejoin.sh, makes
//!   each old primary a replica again before the next);
//! - pause (SIGSTOP) the primary beyond `failover_timeout`, then SIGCONT;
//! - stop etcd for twice the lease TTL, then start it;
//! - kill -9 the leading proxy, then start it again;
//! - kill -9 a replica, then start it again;
//! - fill one proxy's pool with open transactions, then end them;
//! - 10,000 idle authenticated clients on one proxy, opened and closed 3
//!   times: its RSS before, with them and after (bytes per idle client).
//!
//! `scripts/chaos.sh` (which is `cargo bench --bench chaos`). Acknowledged
//! writes lost are counted against the primary through a `strong` session;
//! writes on a fenced node are writes acknowledged by the old primary after
//! the new epoch was seen (each write returns `inet_server_port()`), and,
//! for the paused one, rows that reached it after it was fenced over SQL.

#[path = "../tests/common/etcd.rs"]
mod etcd;
#[path = "../tests/common/load.rs"]
mod load;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Deserialize;
use tidepool::demo::cluster::{Cluster, ClusterSpec, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use etcd::Etcd;
use load::{Load, Side, Tally};

const LEASE_TTL: Duration = Duration::from_secs(2);
const POOL_SIZE: usize = 8;
const IDLE_CLIENTS: usize = 10_000;
/// Client connections opened at once while filling the proxy with idle ones.
const OPENING: usize = 200;
const KILLS: usize = 5;

/// One `tidepool run` child process, restartable on the same ports.
struct ProxyProcess {
    id: String,
    port: u16,
    admin: SocketAddr,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl ProxyProcess {
    fn new(cluster: &Cluster, etcd: &Etcd, dir: &Path, id: &str) -> ProxyProcess {
        let (port, admin) = (free_port(), free_port());
        let extra = format!(
            "failures_before_down = 2\n\n[pool]\nsize = {POOL_SIZE}\ncheckout_timeout = \"1s\"\n\n\
             [coordinator]\netcd = [\"{}\"]\nlease_ttl = \"2s\"\nfailover_timeout = \"1s\"\n\
             proxy_id = \"{id}\"\nrejoin_command = {:?}\n",
            etcd.endpoint(),
            cluster.rejoin_command()
        );
        let toml = tidepool::demo::config_toml(cluster, &format!("127.0.0.1:{port}"), &extra)
            .replacen(
                "[listen]\n",
                &format!("[listen]\nadmin = \"127.0.0.1:{admin}\"\nmax_clients = 12000\n"),
                1,
            );
        let config = dir.join(format!("{id}.toml"));
        std::fs::write(&config, toml).expect("writing a proxy config");
        ProxyProcess {
            id: id.to_owned(),
            port,
            admin: SocketAddr::from(([127, 0, 0, 1], admin)),
            config,
            log: dir.join(format!("{id}.log")),
            child: None,
        }
    }

    async fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("a proxy log");
        let child = Command::new(env!("CARGO_BIN_EXE_tidepool"))
            .args(["run", "--config"])
            .arg(&self.config)
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("tidepool runs");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "{} did not start", self.id);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The parts of the admin `/topology` answer the driver looks at.
#[derive(Debug, Deserialize)]
struct View {
    epoch: u64,
    primary: Option<String>,
    is_leader: bool,
    nodes: Vec<NodeView>,
}

#[derive(Debug, Deserialize)]
struct NodeView {
    address: String,
    role: String,
    health: String,
    fenced: bool,
}

impl View {
    fn primary_index(&self) -> Option<usize> {
        let primary = self.primary.as_deref()?;
        self.nodes.iter().position(|n| n.address == primary)
    }

    fn is_replica_again(&self, i: usize) -> bool {
        let n = &self.nodes[i];
        n.role == "replica" && n.health == "up" && !n.fenced
    }
}

async fn view(admin: SocketAddr) -> Option<View> {
    let mut tcp = tokio::net::TcpStream::connect(admin).await.ok()?;
    let request = format!("GET /topology HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.ok()?;
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).await.ok()?;
    serde_json::from_str(raw.split_once("\r\n\r\n")?.1).ok()
}

/// One line of the table.
struct Row {
    fault: String,
    injected: String,
    recovered: Option<Duration>,
    client_errors: usize,
    lost: i64,
    fenced_writes: usize,
    outcome: String,
}

struct Chaos {
    cluster: Cluster,
    etcd: Etcd,
    proxies: Vec<ProxyProcess>,
    tally: std::sync::Arc<Tally>,
}

impl Chaos {
    /// The topology as a running proxy sees it.
    async fn view(&self) -> View {
        for p in self.proxies.iter().filter(|p| p.child.is_some()) {
            if let Some(v) = view(p.admin).await {
                return v;
            }
        }
        panic!("no proxy answers /topology");
    }

    async fn wait(&self, within: Duration, what: &str, mut ready: impl AsyncFnMut(&Chaos) -> bool) {
        let deadline = Instant::now() + within;
        while !ready(self).await {
            assert!(Instant::now() < deadline, "not within {within:?}: {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn port(&self, node: usize) -> u16 {
        self.cluster.nodes()[node].port
    }

    fn url(&self, proxy: usize) -> String {
        let port = self.proxies[proxy].port;
        format!(
            "host=127.0.0.1 port={port} user=app password=app dbname=postgres connect_timeout=5"
        )
    }

    /// Acknowledged writes not on the primary, asked through a running proxy.
    async fn lost(&self) -> i64 {
        let proxy = self.proxies.iter().position(|p| p.child.is_some()).unwrap();
        let client = load::connect(&self.url(proxy))
            .await
            .expect("a strong client");
        client
            .batch_execute("set tidepool.consistency = strong")
            .await
            .unwrap();
        load::lost(&client, &self.tally.acked()).await
    }

    fn errors(&self, since: Instant) -> (usize, usize) {
        (
            self.tally.failures_since(since, Side::Write).len(),
            self.tally.failures_since(since, Side::Read).len(),
        )
    }

    /// A steady state again: writes and reads flowing.
    async fn settled(&self) {
        let now = Instant::now();
        self.wait(Duration::from_secs(30), "the load flows again", async |c| {
            c.tally.acks_since(now) > 20 && c.tally.reads_since(now) > 20
        })
        .await;
    }

    fn psql(&self, node: usize, sql: &str) -> Option<String> {
        tokio::task::block_in_place(|| self.cluster.psql(node, sql)).ok()
    }

    /// Nodes out of recovery and not read-only.
    fn writable(&self) -> usize {
        let sql =
            "select pg_is_in_recovery() or current_setting('default_transaction_read_only')::bool";
        (0..self.cluster.nodes().len())
            .filter(|&i| self.psql(i, sql).as_deref() == Some("f"))
            .count()
    }

    /// The new primary, and when the new epoch was seen: from then on the
    /// old primary is fenced (an answer it sent before may still arrive).
    async fn failed_over_from(&self, old: usize, epoch: u64) -> (usize, Instant) {
        self.wait(Duration::from_secs(30), "a failover", async |c| {
            let v = c.view().await;
            v.epoch > epoch && v.primary_index().is_some_and(|p| p != old)
        })
        .await;
        let fenced = Instant::now();
        let new = self.view().await.primary_index().unwrap();
        let port = self.port(new);
        let since = Instant::now();
        self.wait(
            Duration::from_secs(30),
            "writes on the new primary",
            async |c| c.tally.acks_on_since(port, since) > 5,
        )
        .await;
        (new, fenced)
    }

    async fn rejoined(&self, node: usize) -> Duration {
        let started = Instant::now();
        self.wait(
            Duration::from_secs(120),
            "the old primary rejoins",
            async |c| c.view().await.is_replica_again(node),
        )
        .await;
        started.elapsed()
    }

    async fn kill_primary(&mut self, round: usize) -> Row {
        let v = self.view().await;
        let old = v.primary_index().expect("a primary");
        let old_port = self.port(old);
        let t0 = Instant::now();
        tokio::task::block_in_place(|| self.cluster.kill(old));
        let (new, fenced) = self.failed_over_from(old, v.epoch).await;
        let failed_over = t0.elapsed();
        tokio::task::block_in_place(|| self.cluster.start_node(old)).expect("restarts");
        let rejoin = self.rejoined(old).await;
        self.settled().await;
        let (w, r) = self.errors(t0);
        Row {
            fault: format!("kill -9 primary ({round}/{KILLS})"),
            injected: format!("SIGKILL pg{old}"),
            recovered: self.tally.recovered_in(t0),
            client_errors: w + r,
            lost: self.lost().await,
            fenced_writes: self.tally.acks_on_since(old_port, fenced),
            outcome: format!(
                "pg{new} promoted, writes back {} ms after the kill; pg{old} restarted, rewound and streaming {} ms later; {w} write / {r} read errors",
                failed_over.as_millis(),
                rejoin.as_millis()
            ),
        }
    }

    async fn pause_primary(&mut self) -> Row {
        let v = self.view().await;
        let old = v.primary_index().expect("a primary");
        let old_port = self.port(old);
        let t0 = Instant::now();
        self.cluster.pause(old);
        let (new, fenced) = self.failed_over_from(old, v.epoch).await;
        let paused_for = t0.elapsed();
        self.cluster.resume(old);
        // Until the hook has made it a replica: never two writable nodes.
        let resumed = Instant::now();
        let mut most_writable = 0;
        // Rows on the old primary once it is read-only, and the most seen
        // after (until the hook stops it to rewind it).
        let count = |c: &Chaos| {
            c.psql(old, "select count(*) from chaos")
                .and_then(|n| n.parse::<usize>().ok())
        };
        let (mut rows_at_fence, mut rows_after) = (None, 0);
        while !self.view().await.is_replica_again(old) {
            assert!(resumed.elapsed() < Duration::from_secs(120), "no rejoin");
            most_writable = most_writable.max(self.writable());
            match rows_at_fence {
                None if self
                    .psql(old, "show default_transaction_read_only")
                    .as_deref()
                    == Some("on") =>
                {
                    rows_at_fence = count(self);
                }
                Some(at) => rows_after = rows_after.max(count(self).unwrap_or(at) - at),
                None => {}
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.settled().await;
        let (w, r) = self.errors(t0);
        Row {
            fault: "SIGSTOP primary > failover_timeout, SIGCONT".into(),
            injected: format!(
                "SIGSTOP pg{old} (all its processes) {} ms",
                paused_for.as_millis()
            ),
            recovered: self.tally.recovered_in(t0),
            client_errors: w + r,
            lost: self.lost().await,
            fenced_writes: self.tally.acks_on_since(old_port, fenced) + rows_after,
            outcome: format!(
                "pg{new} promoted; after SIGCONT at most {most_writable} writable node(s), pg{old} fenced{} then rewound as a replica ({} ms)",
                match rows_at_fence {
                    Some(_) => " over SQL",
                    None => "",
                },
                resumed.elapsed().as_millis()
            ),
        }
    }

    async fn etcd_outage(&mut self) -> Row {
        let t0 = Instant::now();
        tokio::task::block_in_place(|| self.etcd.stop());
        tokio::time::sleep(2 * LEASE_TTL).await;
        let reads_during = self.tally.reads_since(t0);
        let refused = self
            .tally
            .failures_since(t0, Side::Write)
            .iter()
            .filter(|f| f.what.starts_with("25006"))
            .count();
        tokio::task::block_in_place(|| self.etcd.resume());
        let back = Instant::now();
        self.wait(Duration::from_secs(30), "writes resume", async |c| {
            c.tally.acks_since(back) > 20
        })
        .await;
        let resumed_in = back.elapsed();
        self.settled().await;
        let (w, r) = self.errors(t0);
        Row {
            fault: "etcd stopped, started".into(),
            injected: format!(
                "SIGKILL etcd, restarted {} ms later",
                (back - t0).as_millis()
            ),
            recovered: self.tally.recovered_in(t0),
            client_errors: w + r,
            lost: self.lost().await,
            fenced_writes: 0,
            outcome: format!(
                "writes refused (25006) {refused} times while away, {reads_during} reads served; writes back {} ms after etcd",
                resumed_in.as_millis()
            ),
        }
    }

    async fn kill_proxy(&mut self) -> Row {
        let mut leader = 0;
        for (i, p) in self.proxies.iter().enumerate() {
            if view(p.admin).await.is_some_and(|v| v.is_leader) {
                leader = i;
            }
        }
        let other = 1 - leader;
        let t0 = Instant::now();
        self.proxies[leader].kill();
        let admin = self.proxies[other].admin;
        self.wait(
            Duration::from_secs(30),
            "the other proxy leads",
            async |_| view(admin).await.is_some_and(|v| v.is_leader),
        )
        .await;
        let took_lead = t0.elapsed();
        self.settled().await;
        self.proxies[leader].start().await;
        self.settled().await;
        let (w, r) = self.errors(t0);
        let id = &self.proxies[leader].id;
        Row {
            fault: "kill -9 the leading proxy".into(),
            injected: format!("SIGKILL {id}, restarted after the load settled"),
            recovered: self.tally.recovered_in(t0),
            client_errors: w + r,
            lost: self.lost().await,
            fenced_writes: 0,
            outcome: format!(
                "clients moved to the other proxy (multi-host URL), which led {} ms after the kill",
                took_lead.as_millis()
            ),
        }
    }

    async fn kill_replica(&mut self) -> Row {
        let v = self.view().await;
        let primary = v.primary_index().expect("a primary");
        let replica = (0..v.nodes.len()).find(|&i| i != primary).unwrap();
        let t0 = Instant::now();
        tokio::task::block_in_place(|| self.cluster.kill(replica));
        self.wait(
            Duration::from_secs(30),
            "the replica seen down",
            async |c| c.view().await.nodes[replica].health == "down",
        )
        .await;
        self.settled().await;
        let restarted = Instant::now();
        tokio::task::block_in_place(|| self.cluster.start_node(replica)).expect("restarts");
        self.wait(Duration::from_secs(30), "the replica back", async |c| {
            c.view().await.is_replica_again(replica)
        })
        .await;
        let back = restarted.elapsed();
        self.settled().await;
        let (w, r) = self.errors(t0);
        Row {
            fault: "kill -9 a replica".into(),
            injected: format!("SIGKILL pg{replica}, restarted after the load settled"),
            recovered: self.tally.recovered_in(t0),
            client_errors: w + r,
            lost: self.lost().await,
            fenced_writes: 0,
            outcome: format!(
                "reads moved to the others ({r} read errors); back in rotation {} ms after its restart",
                back.as_millis()
            ),
        }
    }

    /// Both proxies' primary pools: after a proxy was killed, every client
    /// may be on the other one.
    async fn fill_pool(&mut self) -> Row {
        let mut holders = Vec::new();
        let t0 = Instant::now();
        for proxy in 0..self.proxies.len() {
            let url = self.url(proxy);
            for n in 1..=POOL_SIZE {
                let c = load::connect(&url).await.expect("a holder");
                let seq = -((proxy * POOL_SIZE + n) as i64);
                c.batch_execute(&format!("begin; insert into chaos values ({seq}, 0)"))
                    .await
                    .expect("a holder's transaction");
                holders.push(c);
            }
        }
        self.wait(Duration::from_secs(30), "checkout timeouts", async |c| {
            c.tally
                .failures_since(t0, Side::Write)
                .iter()
                .any(|f| f.what.starts_with("53300"))
        })
        .await;
        let timeouts = |c: &Chaos| {
            c.tally
                .failures_since(t0, Side::Write)
                .iter()
                .filter(|f| f.what.starts_with("53300"))
                .count()
        };
        let held = t0.elapsed();
        for c in &holders {
            c.batch_execute("rollback").await.unwrap();
        }
        let released = Instant::now();
        self.settled().await;
        let (w, r) = self.errors(t0);
        Row {
            fault: "pool full".into(),
            injected: format!(
                "{POOL_SIZE} open transactions hold each proxy's primary pool for {} ms",
                held.as_millis()
            ),
            recovered: self.tally.recovered_in(released),
            client_errors: w + r,
            lost: self.lost().await,
            fenced_writes: 0,
            outcome: format!(
                "{} checkout timeouts (53300) after 1 s each; all clients served again once released",
                timeouts(self)
            ),
        }
    }
}

/// VmRSS and VmHWM of a process, in bytes.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Opens `IDLE_CLIENTS` authenticated clients to the first proxy, holds
/// them, closes them; three times. Returns the table row and a detail line.
async fn idle_clients(chaos: &Chaos) -> (Row, String) {
    let proxy = &chaos.proxies[0];
    let pid = proxy.pid();
    let url = chaos.url(0);
    let (baseline, _) = memory(pid);
    let mut detail = format!(
        "{} idle clients on {} (pid {pid}): ",
        IDLE_CLIENTS, proxy.id
    );
    let mut per_client = Vec::new();
    let mut errors = 0;
    let mut after = baseline;
    let started = Instant::now();
    for round in 1..=3 {
        let opened: Vec<_> = futures_util::stream::iter(0..IDLE_CLIENTS)
            .map(|_| load::connect(&url))
            .buffer_unordered(OPENING)
            .collect()
            .await;
        let clients: Vec<_> = opened.into_iter().filter_map(Result::ok).collect();
        errors += IDLE_CLIENTS - clients.len();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (with, peak) = memory(pid);
        per_client.push(with.saturating_sub(after) / clients.len().max(1) as u64);
        drop(clients);
        tokio::time::sleep(Duration::from_secs(3)).await;
        after = memory(pid).0;
        let _ = write!(
            detail,
            "round {round}: {} open, RSS {} -> {} KiB (peak {} KiB), after close {} KiB; ",
            IDLE_CLIENTS - errors,
            baseline / 1024,
            with / 1024,
            peak / 1024,
            after / 1024
        );
    }
    let worst = per_client.iter().max().copied().unwrap_or(0);
    let row = Row {
        fault: format!("{IDLE_CLIENTS} idle clients x3"),
        injected: "opened (SCRAM), held, closed, 3 rounds".into(),
        recovered: None,
        client_errors: errors,
        lost: 0,
        fenced_writes: 0,
        outcome: format!(
            "{} B per idle client (worst round); RSS {} KiB before, {} KiB after the last close; {} s",
            worst,
            baseline / 1024,
            after / 1024,
            started.elapsed().as_secs()
        ),
    };
    (row, detail)
}

/// `prlimit` rather than `setrlimit`: this crate forbids `unsafe`. The
/// proxies, started after, inherit the limit.
fn raise_open_files(wanted: u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse::<u64>().ok())
        .unwrap_or(0);
    if soft >= wanted {
        return;
    }
    // Only the soft limit: raising the hard one needs CAP_SYS_RESOURCE.
    let status = Command::new("prlimit")
        .args(["--pid", &std::process::id().to_string()])
        .arg(format!("--nofile={wanted}:"))
        .status();
    assert!(
        status.is_ok_and(|s| s.success()),
        "could not raise RLIMIT_NOFILE to {wanted} (needs prlimit; the hard limit must allow it)"
    );
}

fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| fault | injected | recovered in (ms) | client errors | acked writes lost | writes on fenced node | outcome |\n|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let recovered = r
            .recovered
            .map_or("-".to_owned(), |d| d.as_millis().to_string());
        let _ = writeln!(
            out,
            "| {} | {} | {recovered} | {} | {} | {} | {} |",
            r.fault, r.injected, r.client_errors, r.lost, r.fenced_writes, r.outcome
        );
    }
    out
}

fn main() {
    raise_open_files(IDLE_CLIENTS as u64 + 4096);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(run());
}

async fn run() {
    let spec = ClusterSpec {
        synchronous: true,
        ..ClusterSpec::default()
    };
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(spec))
        .await
        .unwrap()
        .expect("cluster starts");
    let etcd = tokio::task::spawn_blocking(Etcd::start).await.unwrap();
    let dir = tempfile::Builder::new()
        .prefix("tp-chaos-")
        .tempdir()
        .expect("a temp dir");
    let proxies = ["p1", "p2"].map(|id| ProxyProcess::new(&cluster, &etcd, dir.path(), id));
    let mut chaos = Chaos {
        cluster,
        etcd,
        proxies: proxies.into(),
        tally: Default::default(),
    };
    for p in &mut chaos.proxies {
        p.start().await;
    }
    chaos
        .wait(Duration::from_secs(30), "a primary", async |c| {
            c.view().await.primary.is_some()
        })
        .await;
    let setup = load::connect(&chaos.url(0)).await.expect("a client");
    setup.batch_execute(load::TABLE).await.expect("the table");
    tokio::task::block_in_place(|| {
        chaos
            .cluster
            .wait_replicas_caught_up(Duration::from_secs(20))
    })
    .expect("replicas catch up");
    let (p1, p2) = (chaos.proxies[0].port, chaos.proxies[1].port);
    let both = |a: u16, b: u16| {
        format!(
            "host=127.0.0.1,127.0.0.1 port={a},{b} user=app password=app dbname=postgres connect_timeout=5"
        )
    };
    let load = Load::start(&[both(p1, p2), both(p2, p1)], 4, 4);
    chaos.tally = load.tally.clone();
    chaos.settled().await;

    let mut rows = Vec::new();
    for round in 1..=KILLS {
        rows.push(chaos.kill_primary(round).await);
        println!("{}", table(&rows[rows.len() - 1..]));
    }
    rows.push(chaos.pause_primary().await);
    println!("{}", table(&rows[rows.len() - 1..]));
    rows.push(chaos.etcd_outage().await);
    println!("{}", table(&rows[rows.len() - 1..]));
    rows.push(chaos.kill_proxy().await);
    println!("{}", table(&rows[rows.len() - 1..]));
    rows.push(chaos.kill_replica().await);
    println!("{}", table(&rows[rows.len() - 1..]));
    rows.push(chaos.fill_pool().await);
    println!("{}", table(&rows[rows.len() - 1..]));
    let tally = load.stop().await;
    let acked = tally.acked().len();
    let (row, detail) = idle_clients(&chaos).await;
    rows.push(row);

    let report = format!(
        "{}\n{acked} writes acknowledged in all, {} lost; {detail}\n",
        table(&rows),
        chaos.lost().await
    );
    println!("\n{report}");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/chaos.md");
    std::fs::write(&out, &report).expect("writing target/chaos.md");
    println!("written to {}", out.display());
    for p in &mut chaos.proxies {
        p.kill();
    }
    tokio::task::spawn_blocking(move || drop(chaos.cluster))
        .await
        .unwrap();
}
