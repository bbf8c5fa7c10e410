//! End-to-end check of the local cluster harness: real postgres processes,
//! replication, crash/restart, and clean teardown.

use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tidepool::demo::cluster::{Cluster, ClusterSpec};

/// `kill -0`: does a process with this PID exist (zombies included)?
fn pid_exists(pid: u32) -> bool {
    Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn primary_replicas_crash_restart_teardown() {
    let started = Instant::now();
    let mut cluster = Cluster::start(ClusterSpec::default()).expect("cluster starts");
    println!("cluster with 2 replicas started in {:?}", started.elapsed());

    assert_eq!(cluster.nodes().len(), 3);
    assert_eq!(cluster.psql(0, "select pg_is_in_recovery()").unwrap(), "f");
    for i in 1..=2 {
        assert_eq!(cluster.psql(i, "select pg_is_in_recovery()").unwrap(), "t");
    }

    cluster
        .psql(
            0,
            "create table t (id int primary key, v text); insert into t values (1, 'one')",
        )
        .unwrap();
    cluster
        .wait_replicas_caught_up(Duration::from_secs(10))
        .unwrap();
    for i in 1..=2 {
        assert_eq!(cluster.psql(i, "select id, v from t").unwrap(), "1|one");
    }

    // SCRAM login as the app user against a replica, the way the proxy will connect.
    let replica_port = cluster.replicas()[0].port;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let conninfo =
            format!("host=127.0.0.1 port={replica_port} user=app password=app dbname=postgres");
        let (client, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
            .await
            .unwrap();
        let conn = tokio::spawn(conn);
        let row = client
            .query_one("select v, current_user::text from t where id = 1", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, &str>(0), "one");
        assert_eq!(row.get::<_, &str>(1), "app");
        drop(client);
        conn.await.unwrap().unwrap();
    });

    // Crash replica 1, check it is really gone, bring it back and let it catch up.
    let addr = cluster.nodes()[1].addr();
    cluster.kill(1);
    assert!(cluster.nodes()[1].pid().is_none());
    assert!(
        TcpStream::connect(addr).is_err(),
        "killed node still accepts connections"
    );
    cluster.psql(0, "insert into t values (2, 'two')").unwrap();
    let restarted = Instant::now();
    cluster.start_node(1).unwrap();
    println!(
        "replica restarted after kill -9 in {:?}",
        restarted.elapsed()
    );
    assert_eq!(cluster.psql(1, "select pg_is_in_recovery()").unwrap(), "t");
    cluster
        .wait_replicas_caught_up(Duration::from_secs(10))
        .unwrap();
    assert_eq!(cluster.psql(1, "select count(*) from t").unwrap(), "2");

    // Clean stop and restart of the primary keeps the data.
    cluster.stop_node(0);
    assert!(cluster.psql(0, "select 1").is_err());
    cluster.start_node(0).unwrap();
    assert_eq!(cluster.psql(0, "select count(*) from t").unwrap(), "2");

    // Leave a node SIGSTOPped: Drop must still take it down.
    cluster.signal(2, libc::SIGSTOP);
    let dir = cluster.dir().to_path_buf();
    let pids: Vec<u32> = cluster.nodes().iter().filter_map(|n| n.pid()).collect();
    assert_eq!(pids.len(), 3);
    let dropped = Instant::now();
    drop(cluster);
    println!("cluster dropped in {:?}", dropped.elapsed());
    assert!(!dir.exists(), "{} still exists", dir.display());
    for pid in pids {
        assert!(!pid_exists(pid), "postmaster {pid} survived Drop");
    }
}

#[test]
fn primary_only_with_awkward_names() {
    let spec = ClusterSpec {
        replicas: 0,
        admin_password: "adm'in \"pw\"".into(),
        users: vec![("o'brien \"x\"".into(), "it's".into())],
        synchronous: false,
    };
    let cluster = Cluster::start(spec).expect("cluster starts");
    assert!(cluster.replicas().is_empty());
    assert_eq!(cluster.admin_user(), "postgres");
    let roles = cluster
        .psql(
            0,
            "select rolname from pg_roles where rolcanlogin order by 1",
        )
        .unwrap();
    assert_eq!(roles, "o'brien \"x\"\npostgres");
    cluster
        .wait_replicas_caught_up(Duration::from_secs(1))
        .unwrap();
}
