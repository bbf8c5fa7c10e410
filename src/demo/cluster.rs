//! A throwaway local PostgreSQL cluster (one primary, N streaming replicas) in a temp dir.
//!
//! Used by `tidepool demo`, the integration tests and the benchmarks, so it optimises
//! for start-up time (no fsync, parallel base backups, no `pg_ctl` polling loops) and
//! for never leaking servers: every postmaster is our direct child, tracked by PID,
//! and stopped in `Drop` before the temp dir is removed; a cluster whose owner died
//! without its `Drop` is stopped and removed by the next one started (`orphans`).
//!
//! The API is synchronous on purpose: `Cluster::start` blocks for a couple of seconds,
//! and async callers can wrap it in `tokio::task::spawn_blocking`.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt, chown};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

mod orphans;

/// How long a node may take to accept connections before we give up on it.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Grace period for shutdown signals before escalating to SIGKILL.
const DROP_GRACE: Duration = Duration::from_secs(5);
const STOP_GRACE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(10);
const ADMIN_USER: &str = "postgres";
/// Per-node settings (port, name), rewritten before every start. Replicas get
/// the `include` line and everything else through the base backup.
const NODE_CONF: &str = "tidepool-node.conf";
const REJOIN_SCRIPT: &str = "rejoin.sh";
const REJOIN_SH: &str = include_str!("../../scripts/rejoin.sh");
const HBA: &str = "local all all trust
local replication all trust
host all all 127.0.0.1/32 scram-sha-256
host replication all 127.0.0.1/32 scram-sha-256
";
/// Durability is pointless for a throwaway cluster and costs start-up time.
/// Parallel base backups take two WAL senders each, on top of one per replica.
/// `pg_rewind` (the rejoin hook, scripts/rejoin.sh) needs hint-bit changes
/// WAL-logged on the node it rewinds and full page writes on its source.
const CONF: &str = "listen_addresses = '127.0.0.1'
wal_level = replica
max_wal_senders = 32
max_replication_slots = 10
hot_standby = on
hot_standby_feedback = on
fsync = off
full_page_writes = on
wal_log_hints = on
synchronous_commit = on
wal_keep_size = '256MB'
max_connections = 200
shared_buffers = '32MB'
huge_pages = off
password_encryption = 'scram-sha-256'
logging_collector = off
";

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub replicas: usize,
    pub admin_password: String,
    /// `(name, password)` LOGIN roles created on the primary (before the base backups,
    /// so replicas have them too), allowed to create tables in `public` and to use
    /// the tables the admin creates there (so fixtures can be set up via `psql`).
    pub users: Vec<(String, String)>,
    /// Serve TLS (`ssl = on`) with this certificate; `None`: plain TCP only.
    pub ssl: Option<NodeSsl>,
    /// Every node (whichever is primary) waits for one standby to flush a
    /// commit before acknowledging it (`synchronous_standby_names = 'ANY 1 (*)'`),
    /// so a failover to the most advanced replica loses no acknowledged write.
    pub synchronous: bool,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        Self {
            replicas: 2,
            admin_password: "postgres".into(),
            users: vec![("app".into(), "app".into())],
            ssl: None,
            synchronous: false,
        }
    }
}

/// PEM files every node serves TLS with. They are copied into the cluster's
/// temp dir, because PostgreSQL wants its key owned by the server's user
/// and readable by nobody else.
#[derive(Debug, Clone)]
pub struct NodeSsl {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("PostgreSQL binaries not found ({0}); set TIDEPOOL_PG_BIN")]
    Binaries(String),
    #[error("invalid cluster spec: {0}")]
    Spec(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed ({status}):\n{stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{node} did not become ready: {reason}\n--- tail of {log} ---\n{tail}")]
    NotReady {
        node: String,
        reason: String,
        log: PathBuf,
        tail: String,
    },
    #[error("{0}")]
    Timeout(String),
    #[error("no node with index {0}")]
    NoSuchNode(usize),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> ClusterError {
    let context = context.into();
    move |source| ClusterError::Io { context, source }
}

/// One postmaster. `child` is `None` while the node is stopped or killed.
#[derive(Debug)]
pub struct NodeProcess {
    pub name: String,
    pub port: u16,
    pub data_dir: PathBuf,
    /// Server log. Kept outside the data dir so `pg_basebackup` does not copy the
    /// primary's log into every replica.
    pub log_path: PathBuf,
    child: Option<Child>,
}

impl NodeProcess {
    /// PID of the running postmaster, if any: our own child, or one that the
    /// rejoin hook started with `pg_ctl` (found by its `postmaster.pid`), so
    /// that such a node can be killed, stopped and cleaned up like the others.
    pub fn pid(&self) -> Option<u32> {
        let own = self
            .child
            .as_ref()
            .map(Child::id)
            .filter(|&pid| is_alive(pid));
        own.or_else(|| self.started_elsewhere())
    }

    fn started_elsewhere(&self) -> Option<u32> {
        let pid = pid_file(&self.data_dir)?;
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        (is_alive(pid) && comm.trim() == "postgres").then_some(pid)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }
}

/// Everything needed to run PostgreSQL binaries, shared (read-only) by the
/// threads that build replicas in parallel.
struct Env {
    bin: PathBuf,
    psql: PathBuf,
    root: PathBuf,
    /// PostgreSQL refuses to run as root, so when we are root every server-side
    /// binary runs as this `(uid, gid)` instead.
    run_as: Option<(u32, u32)>,
    admin_password: String,
    /// Appended to every node's postgresql.conf (TLS settings).
    server_conf: String,
}

/// A running cluster; dropping it stops every node and deletes the temp dir.
pub struct Cluster {
    env: Env,
    nodes: Vec<NodeProcess>,
    users: Vec<(String, String)>,
    /// Declared last so it is removed after `Drop::drop` has stopped the servers.
    dir: TempDir,
}

impl Cluster {
    /// Initialises and starts the primary, creates the users, then base-backs-up
    /// and starts the replicas in parallel. Blocks until every node accepts
    /// connections. On error, whatever was already started is torn down.
    ///
    /// The temp dir lives in `/tmp` (short, because unix socket paths are limited
    /// to 107 bytes), or in `$TIDEPOOL_TMPDIR`: on disk, creating the ~1000 files
    /// of a data dir dominates start-up, and a tmpfs such as `/dev/shm` makes
    /// `initdb` 3x and `pg_basebackup` 10x faster.
    pub fn start(spec: ClusterSpec) -> Result<Cluster, ClusterError> {
        let started = Instant::now();
        let bad = |p: &String| p.contains(['\n', '\r', '\0']);
        if bad(&spec.admin_password) || spec.users.iter().any(|(_, p)| bad(p)) {
            return Err(ClusterError::Spec(
                "passwords may not contain newlines or NUL".into(),
            ));
        }
        let (mut env, dir) = Env::new(spec.admin_password)?;
        if let Some(ssl) = &spec.ssl {
            env.server_conf = env.install_ssl(ssl)?;
        }
        env.write_rejoin_files()?;
        let mut cluster = Cluster {
            env,
            nodes: Vec::new(),
            users: spec.users,
            dir,
        };

        let ports = free_ports(spec.replicas + 1).map_err(io_err("reserving ports"))?;
        let primary = cluster.env.init_primary(ports[0])?;
        cluster.nodes.push(primary);
        let mut sql = String::new();
        for (name, password) in &cluster.users {
            let (name, password) = (quote_ident(name), quote_literal(password));
            sql += &format!(
                "CREATE ROLE {name} LOGIN PASSWORD {password};
                 GRANT ALL ON SCHEMA public TO {name};
                 ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO {name};
                 ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON SEQUENCES TO {name};"
            );
        }
        if !sql.is_empty() {
            cluster.psql(0, &sql)?;
        }

        // Not `ports[0]`: the primary may have moved if that port got taken.
        let primary_port = cluster.primary().port;
        let env = &cluster.env;
        let results: Vec<_> = thread::scope(|s| {
            let handles: Vec<_> = (1..=spec.replicas)
                .map(|i| {
                    let port = ports[i];
                    s.spawn(move || env.init_replica(i, port, primary_port))
                })
                .collect();
            handles.into_iter().map(|h| h.join()).collect()
        });
        let mut first_error = None;
        for result in results {
            let panicked = || io_err("building a replica")(io::Error::other("thread panicked"));
            match result.unwrap_or_else(|_| Err(panicked())) {
                Ok(node) => cluster.nodes.push(node),
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        // Only now that there are standbys (the setup's own commits would
        // wait for one), and on every node, since any may be promoted.
        if spec.synchronous {
            let sql = "alter system set synchronous_standby_names = 'ANY 1 (*)'";
            for index in 0..cluster.nodes.len() {
                cluster.psql(index, sql)?;
                cluster.psql(index, "select pg_reload_conf()")?;
            }
        }
        let elapsed = started.elapsed();
        tracing::info!(dir = %cluster.dir().display(), ?elapsed, "local cluster started");
        Ok(cluster)
    }

    pub fn nodes(&self) -> &[NodeProcess] {
        &self.nodes
    }

    pub fn primary(&self) -> &NodeProcess {
        &self.nodes[0]
    }

    pub fn replicas(&self) -> &[NodeProcess] {
        &self.nodes[1..]
    }

    pub fn admin_user(&self) -> &str {
        ADMIN_USER
    }

    pub fn admin_password(&self) -> &str {
        &self.env.admin_password
    }

    /// The `(name, password)` login roles from the spec.
    pub fn users(&self) -> &[(String, String)] {
        &self.users
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A `[coordinator] rejoin_command` that makes a fenced former primary of
    /// this cluster a streaming replica of the new one (scripts/rejoin.sh,
    /// written into the cluster's dir, which it searches for the node's data
    /// dir by port).
    pub fn rejoin_command(&self) -> String {
        let root = self.env.root.display().to_string();
        let script = format!("{root}/{REJOIN_SCRIPT}");
        let bin = self.env.bin.display().to_string();
        format!(
            "sh {} {} {} {{host}} {{port}} {{primary_host}} {{primary_port}}",
            quote_shell(&script),
            quote_shell(&root),
            quote_shell(&bin)
        )
    }

    /// Simulates a crash of the node: SIGKILLs the postmaster *and* its children
    /// (orphaned backends would otherwise keep the shared memory attached and make
    /// an immediate `start_node` fail), then waits until they are gone.
    pub fn kill(&mut self, index: usize) {
        if let Some(node) = self.nodes.get_mut(index) {
            kill_hard(node);
        }
    }

    /// Fast shutdown (SIGINT); escalates to SIGKILL if the node is still up after 30 s.
    pub fn stop_node(&mut self, index: usize) {
        if let Some(node) = self.nodes.get_mut(index) {
            if let Some(pid) = node.pid() {
                send_signal(&[pid], libc::SIGINT);
                send_signal(&[pid], libc::SIGCONT);
            }
            reap_or_kill(node, Instant::now() + STOP_GRACE);
        }
    }

    /// Restarts a stopped or killed node on its old port and data dir (crash
    /// recovery included) and waits until it accepts connections. No-op if running.
    pub fn start_node(&mut self, index: usize) -> Result<(), ClusterError> {
        let node = self
            .nodes
            .get_mut(index)
            .ok_or(ClusterError::NoSuchNode(index))?;
        if node.pid().is_none() {
            if let Some(mut exited) = node.child.take() {
                let _ = exited.wait();
            }
            // A killed postmaster the rejoin hook had started is not our
            // child: it stays a zombie until init reaps it, and PostgreSQL
            // takes a lock file naming a zombie for a live server.
            let socket_lock = self.env.root.join(format!(".s.PGSQL.{}.lock", node.port));
            for lock in [node.data_dir.join("postmaster.pid"), socket_lock] {
                let _ = fs::remove_file(lock);
            }
            self.env.launch(node, false)?;
        }
        Ok(())
    }

    /// Sends `sig` (e.g. `libc::SIGSTOP`) to the node's postmaster only.
    pub fn signal(&self, index: usize, sig: i32) {
        if let Some(pid) = self.nodes.get(index).and_then(NodeProcess::pid) {
            send_signal(&[pid], sig);
        }
    }

    /// SIGSTOPs the postmaster and every process it forked: the node hangs as
    /// a paused VM would, its open connections included (a SIGSTOP by
    /// `signal` stops the postmaster only, and backends go on serving).
    pub fn pause(&self, index: usize) {
        self.signal_tree(index, libc::SIGSTOP);
    }

    /// Undoes `pause`.
    pub fn resume(&self, index: usize) {
        self.signal_tree(index, libc::SIGCONT);
    }

    fn signal_tree(&self, index: usize, sig: i32) {
        if let Some(pid) = self.nodes.get(index).and_then(NodeProcess::pid) {
            let mut pids = child_pids(pid);
            pids.push(pid);
            send_signal(&pids, sig);
        }
    }

    /// Runs `sql` as the admin user over TCP and returns psql's unaligned, tuples-only
    /// output (rows separated by `\n`, columns by `|`) without the trailing newline.
    pub fn psql(&self, index: usize, sql: &str) -> Result<String, ClusterError> {
        let node = self
            .nodes
            .get(index)
            .ok_or(ClusterError::NoSuchNode(index))?;
        self.env.psql(node.port, sql)
    }

    /// Waits until every *running* replica has replayed the primary's WAL up to the
    /// position it had when this was called. Stopped replicas are skipped, since
    /// waiting for them could only time out.
    pub fn wait_replicas_caught_up(&self, timeout: Duration) -> Result<(), ClusterError> {
        let deadline = Instant::now() + timeout;
        let target = self.psql(0, "select pg_current_wal_lsn()")?;
        let lsn = quote_literal(&target);
        let query = format!("select pg_last_wal_replay_lsn() >= {lsn}::pg_lsn");
        for (index, node) in self.nodes.iter().enumerate().skip(1) {
            if node.child.is_none() {
                continue;
            }
            loop {
                let answer = self.psql(index, &query);
                if matches!(&answer, Ok(t) if t == "t") {
                    break;
                }
                if Instant::now() >= deadline {
                    let name = &node.name;
                    return Err(ClusterError::Timeout(format!(
                        "{name} did not replay up to {target} within {timeout:?}: {answer:?}"
                    )));
                }
                thread::sleep(POLL);
            }
        }
        Ok(())
    }
}

impl Drop for Cluster {
    /// Immediate shutdown (SIGQUIT) of all nodes at once, SIGCONT in case a test
    /// left one stopped, then SIGKILL whatever survives the grace period.
    fn drop(&mut self) {
        let pids: Vec<u32> = self.nodes.iter().filter_map(NodeProcess::pid).collect();
        send_signal(&pids, libc::SIGQUIT);
        send_signal(&pids, libc::SIGCONT);
        let deadline = Instant::now() + DROP_GRACE;
        for node in &mut self.nodes {
            reap_or_kill(node, deadline);
        }
    }
}

impl Env {
    fn new(admin_password: String) -> Result<(Env, TempDir), ClusterError> {
        let (bin, psql) = find_binaries()?;
        let parent =
            std::env::var_os("TIDEPOOL_TMPDIR").map_or_else(|| "/tmp".into(), PathBuf::from);
        for dir in orphans::reap(&parent) {
            tracing::warn!(%dir, "stopped and removed a cluster whose owner had died");
        }
        let dir = tempfile::Builder::new().prefix("tp-").tempdir_in(&parent);
        let dir = dir.map_err(io_err(format!("creating temp dir in {}", parent.display())))?;
        let root = dir.path().to_path_buf();
        if let Some(owner) = orphans::this_owner() {
            fs::write(root.join(orphans::OWNER_FILE), owner)
                .map_err(io_err("writing the cluster's owner"))?;
        }
        // Files we create are owned by our effective uid: a cheap, safe `geteuid`.
        let euid = fs::metadata(&root).map_err(io_err("stat temp dir"))?.uid();
        let run_as = if euid == 0 {
            Some(unprivileged_user()?)
        } else {
            None
        };
        let env = Env {
            bin,
            psql,
            root,
            run_as,
            admin_password,
            server_conf: String::new(),
        };
        env.chown(&env.root)?;
        Ok((env, dir))
    }

    /// A command for a server-side binary: clean environment, unprivileged user
    /// when we are root, cwd in the temp dir (the caller's cwd may be unreadable
    /// for that user).
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        cmd.env_clear()
            .env("PATH", format!("{}:/usr/bin:/bin", self.bin.display()))
            .env("HOME", &self.root)
            .env("LC_ALL", "C")
            .current_dir(&self.root)
            .stdin(Stdio::null());
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    fn chown(&self, path: &Path) -> Result<(), ClusterError> {
        match self.run_as {
            Some((uid, gid)) => chown(path, Some(uid), Some(gid))
                .map_err(io_err(format!("chown {}", path.display()))),
            None => Ok(()),
        }
    }

    /// Copies the certificate and key where the server may read them; the
    /// postgresql.conf lines that use them.
    fn install_ssl(&self, ssl: &NodeSsl) -> Result<String, ClusterError> {
        let (cert, key) = (self.root.join("server.crt"), self.root.join("server.key"));
        for (from, to) in [(&ssl.cert, &cert), (&ssl.key, &key)] {
            fs::copy(from, to).map_err(io_err(format!("copying {}", from.display())))?;
            self.chown(to)?;
        }
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600))
            .map_err(io_err(format!("chmod {}", key.display())))?;
        Ok(format!(
            "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
            cert.display(),
            key.display()
        ))
    }

    fn node(&self, index: usize, port: u16) -> NodeProcess {
        let name = format!("pg{index}");
        NodeProcess {
            data_dir: self.root.join(&name),
            log_path: self.root.join(format!("{name}.log")),
            name,
            port,
            child: None,
        }
    }

    /// The rejoin hook and the password file it and the replicas it makes
    /// use (a `passfile=` in `primary_conninfo` survives the controller's
    /// re-pointing, which only replaces host and port).
    fn write_rejoin_files(&self) -> Result<(), ClusterError> {
        let script = self.root.join(REJOIN_SCRIPT);
        fs::write(&script, REJOIN_SH).map_err(io_err("writing the rejoin hook"))?;
        let pgpass = self.root.join("pgpass");
        let escaped = self
            .admin_password
            .replace('\\', "\\\\")
            .replace(':', "\\:");
        let line = format!("*:*:*:{ADMIN_USER}:{escaped}\n");
        fs::write(&pgpass, line).map_err(io_err("writing pgpass"))?;
        fs::set_permissions(&pgpass, fs::Permissions::from_mode(0o600))
            .map_err(io_err("chmod pgpass"))?;
        self.chown(&pgpass)
    }

    fn init_primary(&self, port: u16) -> Result<NodeProcess, ClusterError> {
        let mut node = self.node(0, port);
        let pwfile = self.root.join("pwfile");
        let password = format!("{}\n", self.admin_password);
        fs::write(&pwfile, password).map_err(io_err("writing pwfile"))?;
        self.chown(&pwfile)?;
        let mut initdb = self.command("initdb");
        initdb
            .args(
                "--no-sync --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C"
                    .split(' '),
            )
            .args(["-U", ADMIN_USER, "-D"])
            .arg(&node.data_dir)
            .arg(format!("--pwfile={}", pwfile.display()));
        run(&mut initdb)?;
        fs::remove_file(&pwfile).map_err(io_err("removing pwfile"))?;

        let hba = node.data_dir.join("pg_hba.conf");
        fs::write(hba, HBA).map_err(io_err("writing pg_hba.conf"))?;
        let conf = node.data_dir.join("postgresql.conf");
        let sockets = format!("unix_socket_directories = '{}'\n", self.root.display());
        OpenOptions::new()
            .append(true)
            .open(&conf)
            .and_then(|mut f| {
                let ssl = &self.server_conf;
                writeln!(f, "{CONF}{sockets}{ssl}include = '{NODE_CONF}'")
            })
            .map_err(io_err(format!("appending to {}", conf.display())))?;
        self.launch(&mut node, true)?;
        Ok(node)
    }

    fn init_replica(
        &self,
        index: usize,
        port: u16,
        primary: u16,
    ) -> Result<NodeProcess, ClusterError> {
        let mut node = self.node(index, port);
        let mut backup = self.command("pg_basebackup");
        backup
            .args("-h 127.0.0.1 -R --checkpoint=fast -X stream --no-sync -w".split(' '))
            .args(["-U", ADMIN_USER, "-p", &primary.to_string(), "-D"])
            .arg(&node.data_dir)
            .env("PGPASSWORD", &self.admin_password)
            .env("PGCONNECT_TIMEOUT", "10");
        run(&mut backup)?;
        self.launch(&mut node, true)?;
        Ok(node)
    }

    /// Spawns the postmaster and waits until it is ready. If `may_move` and the
    /// port got taken since `free_ports` released it, retries once on a new port.
    fn launch(&self, node: &mut NodeProcess, may_move: bool) -> Result<(), ClusterError> {
        let (port, name) = (node.port, &node.name);
        let conf = format!(
            "port = {port}\ncluster_name = '{name}'\nlog_line_prefix = '%m {name} [%p] '\n"
        );
        let path = node.data_dir.join(NODE_CONF);
        fs::write(&path, conf).map_err(io_err(format!("writing {}", path.display())))?;
        // pg_rewind (the rejoin hook) overwrites it as the server's user.
        self.chown(&path)?;
        match self.spawn_and_wait(node) {
            Err(ClusterError::NotReady { tail, .. })
                if may_move && tail.contains("could not bind") =>
            {
                node.port = free_ports(1).map_err(io_err("reserving a port"))?[0];
                tracing::warn!(node = %node.name, port = node.port, "port was taken, retrying");
                self.launch(node, false)
            }
            other => other,
        }
    }

    fn spawn_and_wait(&self, node: &mut NodeProcess) -> Result<(), ClusterError> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log_path)
            .map_err(io_err(format!("opening {}", node.log_path.display())))?;
        // The rejoin hook's `pg_ctl start` appends to it as the server's user.
        self.chown(&node.log_path)?;
        let stderr = log.try_clone().map_err(io_err("duplicating log fd"))?;
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(&node.data_dir)
            .args(["-p", &node.port.to_string()]);
        let child = cmd
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .map_err(io_err(format!("spawning {cmd:?}")))?;
        let pid = child.id();
        node.child = Some(child);

        let deadline = Instant::now() + READY_TIMEOUT;
        let pid_file = node.data_dir.join("postmaster.pid");
        let reason = loop {
            if let Some(Ok(Some(status))) = node.child.as_mut().map(Child::try_wait) {
                node.child = None;
                break format!("postmaster exited with {status}");
            }
            // Line 1 is the PID (a stale file from a killed run must not count),
            // line 8 the status PG writes once it accepts connections.
            let ready = fs::read_to_string(&pid_file).is_ok_and(|s| {
                let lines: Vec<&str> = s.lines().collect();
                lines.first() == Some(&pid.to_string().as_str())
                    && lines.get(7).map(|l| l.trim()) == Some("ready")
            });
            if ready && TcpStream::connect_timeout(&node.addr(), Duration::from_millis(200)).is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                kill_hard(node);
                break format!("not ready after {READY_TIMEOUT:?}");
            }
            thread::sleep(POLL);
        };
        Err(ClusterError::NotReady {
            node: format!("{} (port {})", node.name, node.port),
            reason,
            log: node.log_path.clone(),
            tail: log_tail(&node.log_path),
        })
    }

    fn psql(&self, port: u16, sql: &str) -> Result<String, ClusterError> {
        let mut cmd = Command::new(&self.psql);
        cmd.env_clear()
            .env("HOME", &self.root)
            .env("PGPASSWORD", &self.admin_password)
            .env("PGCONNECT_TIMEOUT", "5")
            .args("-X -A -t -q -w -v ON_ERROR_STOP=1 -h 127.0.0.1 -d postgres".split(' '))
            .args(["-U", ADMIN_USER, "-p", &port.to_string(), "-c", sql])
            .stdin(Stdio::null());
        let stdout = run(&mut cmd)?;
        Ok(stdout.trim_end_matches('\n').to_string())
    }
}

/// Runs a command to completion; a non-zero exit becomes an error carrying the
/// command line and its stderr.
fn run(cmd: &mut Command) -> Result<String, ClusterError> {
    let describe = |cmd: &Command| {
        std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let output = cmd
        .output()
        .map_err(io_err(format!("running `{}`", describe(cmd))))?;
    if !output.status.success() {
        return Err(ClusterError::Command {
            command: describe(cmd),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `TIDEPOOL_PG_BIN`, else the newest `/usr/lib/postgresql/<major>/bin` with an
/// `initdb` (`pg_config` on `PATH` may belong to a different installation).
fn find_binaries() -> Result<(PathBuf, PathBuf), ClusterError> {
    let bin = match std::env::var_os("TIDEPOOL_PG_BIN") {
        Some(dir) => PathBuf::from(dir),
        None => fs::read_dir("/usr/lib/postgresql")
            .map_err(|e| ClusterError::Binaries(format!("/usr/lib/postgresql: {e}")))?
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let major: u32 = entry.file_name().to_str()?.parse().ok()?;
                let bin = entry.path().join("bin");
                bin.join("initdb").is_file().then_some((major, bin))
            })
            .max()
            .map(|(_, bin)| bin)
            .ok_or_else(|| ClusterError::Binaries("no /usr/lib/postgresql/*/bin/initdb".into()))?,
    };
    for program in ["initdb", "postgres", "pg_basebackup"] {
        if !bin.join(program).is_file() {
            let missing = format!("{} has no {program}", bin.display());
            return Err(ClusterError::Binaries(missing));
        }
    }
    let psql = [bin.join("psql"), PathBuf::from("/usr/bin/psql")]
        .into_iter()
        .find(|p| p.is_file());
    let missing = || ClusterError::Binaries(format!("no psql in {} or /usr/bin", bin.display()));
    let psql = psql.ok_or_else(missing)?;
    Ok((bin, psql))
}

/// `(uid, gid)` of `postgres`, else `nobody`, read from /etc/passwd because the
/// crate forbids the `unsafe` a `getpwnam` call would need.
fn unprivileged_user() -> Result<(u32, u32), ClusterError> {
    let passwd = fs::read_to_string("/etc/passwd").map_err(io_err("reading /etc/passwd"))?;
    let lookup = |wanted: &str| {
        let fields: Vec<&str> = passwd
            .lines()
            .map(|l| l.split(':').collect())
            .find(|f: &Vec<&str>| f.len() > 3 && f[0] == wanted)?;
        Some((fields[2].parse().ok()?, fields[3].parse().ok()?))
    };
    lookup("postgres")
        .or_else(|| lookup("nobody"))
        .ok_or_else(|| {
            ClusterError::Spec("running as root, but neither `postgres` nor `nobody` exists".into())
        })
}

/// A port that was free a moment ago on 127.0.0.1.
///
/// # Panics
/// If nothing can bind to the loopback interface at all.
pub fn free_port() -> u16 {
    free_ports(1).expect("binding 127.0.0.1:0")[0]
}

/// Holds all listeners until every port is chosen, so the ports are distinct.
fn free_ports(n: usize) -> io::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// Signals via the `kill` command, since the crate forbids `unsafe` (`libc::kill`).
fn send_signal(pids: &[u32], sig: i32) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .args(pids.iter().map(u32::to_string))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Waits for the postmaster to exit until `deadline`, then kills it hard.
fn reap_or_kill(node: &mut NodeProcess, deadline: Instant) {
    while node.pid().is_some() {
        if Instant::now() >= deadline {
            return kill_hard(node);
        }
        thread::sleep(POLL);
    }
    if let Some(mut exited) = node.child.take() {
        let _ = exited.wait();
    }
}

/// SIGKILLs the postmaster and its children, reaps it if it is ours, and
/// waits (up to 5 s) for the others, which we may not reap, to die or become
/// zombies.
fn kill_hard(node: &mut NodeProcess) {
    let deadline = Instant::now() + DROP_GRACE;
    let mut doomed = Vec::new();
    // Until no postmaster is left: ours, or one the rejoin hook started.
    while let Some(pid) = node.pid() {
        let mut these = child_pids(pid);
        these.push(pid);
        send_signal(&these, libc::SIGKILL);
        doomed.extend(these);
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if Instant::now() >= deadline {
            break;
        }
        thread::sleep(POLL);
    }
    if let Some(mut exited) = node.child.take() {
        let _ = exited.wait();
    }
    while doomed.iter().any(|&pid| is_alive(pid)) && Instant::now() < deadline {
        thread::sleep(POLL);
    }
}

/// PIDs whose parent is `parent`, from /proc/*/stat.
fn child_pids(parent: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| proc_stat(pid).is_some_and(|(_, ppid)| ppid == parent))
        .collect()
}

/// A zombie counts as dead: it holds no shared memory or sockets any more.
fn is_alive(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|(state, _)| state != 'Z' && state != 'X')
}

/// The PID in a data dir's `postmaster.pid`, whether or not it still runs.
fn pid_file(data_dir: &Path) -> Option<u32> {
    let text = fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// `(state, ppid)` of a process.
fn proc_stat(pid: u32) -> Option<(char, u32)> {
    let fields = stat_fields(pid)?;
    let mut fields = fields.split_whitespace();
    let state = fields.next()?.chars().next()?;
    Some((state, fields.next()?.parse().ok()?))
}

/// `/proc/PID/stat` from field 3 (the state) on. The command name before
/// it may contain spaces and parentheses, so the fields start after the
/// last `)`.
fn stat_fields(pid: u32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat[stat.rfind(')')? + 1..].to_owned())
}

/// The last 4 KiB of a server log.
fn log_tail(path: &Path) -> String {
    let bytes = fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(4096)..]).into_owned()
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn quote_shell(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
