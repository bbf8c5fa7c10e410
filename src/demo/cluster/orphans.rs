//! Clusters whose owner died without running its `Drop` (a SIGKILL, an
//! abort such as a stack overflow in a test): their postmasters go on
//! running, orphaned, and their temp dirs stay. The next cluster started in
//! the same parent dir stops them and removes the dirs.
//!
//! A cluster's dir names its owner in [`OWNER_FILE`]: the PID and that
//! process's start time, so that a recycled PID does not pass for the owner.
//! A dir without the file is being created or predates it, and is left alone;
//! so is a postmaster whose command line does not name the dir.

use std::fs;
use std::path::Path;
use std::thread;
use std::time::Instant;

use super::{DROP_GRACE, POLL, is_alive, pid_file, send_signal, stat_fields};

pub(super) const OWNER_FILE: &str = "owner";

/// What goes in [`OWNER_FILE`] for this process; `None` without a
/// readable `/proc`, where no owner could be told alive or dead.
pub(super) fn this_owner() -> Option<String> {
    let pid = std::process::id();
    Some(format!("{pid} {}", start_time(pid)?))
}

/// Stops the postmasters of every `tp-*` dir in `parent` whose owner is
/// gone, and removes the dir. Returns the dirs removed.
pub(super) fn reap(parent: &Path) -> Vec<String> {
    let Some(entries) = this_owner().and_then(|_| fs::read_dir(parent).ok()) else {
        return Vec::new();
    };
    let mut reaped = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("tp-") || !owner_is_gone(&dir) {
            continue;
        }
        let postmasters: Vec<u32> = fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|node| postmaster_of(&node.path(), &dir))
            .collect();
        send_signal(&postmasters, libc::SIGQUIT);
        send_signal(&postmasters, libc::SIGCONT);
        let deadline = Instant::now() + DROP_GRACE;
        while postmasters.iter().any(|&pid| is_alive(pid)) && Instant::now() < deadline {
            thread::sleep(POLL);
        }
        let stuck: Vec<u32> = postmasters
            .into_iter()
            .filter(|&pid| is_alive(pid))
            .collect();
        send_signal(&stuck, libc::SIGKILL);
        if fs::remove_dir_all(&dir).is_ok() {
            reaped.push(dir.display().to_string());
        }
    }
    reaped
}

fn owner_is_gone(dir: &Path) -> bool {
    let Ok(owner) = fs::read_to_string(dir.join(OWNER_FILE)) else {
        return false;
    };
    let mut fields = owner.split_whitespace().map(str::parse::<u64>);
    let (Some(Ok(pid)), Some(Ok(started))) = (fields.next(), fields.next()) else {
        return false;
    };
    u32::try_from(pid).map_or(true, |pid| start_time(pid) != Some(started))
}

/// The postmaster of the data dir `node`, if it runs and is that dir's.
fn postmaster_of(node: &Path, cluster: &Path) -> Option<u32> {
    let pid = pid_file(node)?;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let needle = cluster.as_os_str().as_encoded_bytes();
    cmdline
        .windows(needle.len())
        .any(|w| w == needle)
        .then_some(pid)
}

/// Field 22 of `/proc/PID/stat`, in clock ticks since boot: with the PID,
/// it names one process for the machine's uptime.
fn start_time(pid: u32) -> Option<u64> {
    stat_fields(pid)?.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    use super::*;
    use crate::demo::cluster::{Cluster, ClusterSpec};

    const CHILD: &str = "demo::cluster::orphans::tests::own_a_cluster_until_killed";

    /// Run by the test below in a child process: starts a cluster in
    /// `TIDEPOOL_TMPDIR`, says where, and waits to be killed.
    #[test]
    #[ignore = "a helper process of an_orphaned_cluster_is_stopped_and_removed"]
    fn own_a_cluster_until_killed() {
        let spec = ClusterSpec {
            replicas: 0,
            ..ClusterSpec::default()
        };
        let cluster = Cluster::start(spec).unwrap();
        println!("DIR={}", cluster.dir().display());
        thread::sleep(std::time::Duration::from_secs(600));
    }

    #[test]
    fn an_orphaned_cluster_is_stopped_and_removed() {
        let parent = tempfile::tempdir().unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([CHILD, "--exact", "--ignored", "--nocapture"])
            .env("TIDEPOOL_TMPDIR", parent.path())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let dir = BufReader::new(child.stdout.take().unwrap())
            .lines()
            .map_while(Result::ok)
            .find_map(|line| line.strip_prefix("DIR=").map(str::to_owned))
            .expect("the child started a cluster");
        let dir = Path::new(&dir);
        let postmaster = postmaster_of(&dir.join("pg0"), dir).expect("its postmaster runs");
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(
            is_alive(postmaster),
            "orphaned, not stopped, by the owner's death"
        );

        assert_eq!(reap(parent.path()), [dir.display().to_string()]);
        assert!(!is_alive(postmaster));
        assert!(!dir.exists());
        assert!(reap(parent.path()).is_empty());
    }

    #[test]
    fn this_process_is_its_own_live_owner() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(OWNER_FILE), this_owner().unwrap()).unwrap();
        assert!(!owner_is_gone(dir.path()));
        let pid = std::process::id();
        fs::write(dir.path().join(OWNER_FILE), format!("{pid} 1")).unwrap();
        assert!(owner_is_gone(dir.path()), "a recycled PID");
        fs::remove_file(dir.path().join(OWNER_FILE)).unwrap();
        assert!(!owner_is_gone(dir.path()), "no owner file: left alone");
    }
}
