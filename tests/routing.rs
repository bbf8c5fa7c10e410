//! Statements land where their intent says: proven by the port of the server
//! that answered.

mod common;

use std::collections::HashSet;

use common::{Harness, served_by, simple_error, simple_rows, simple_value};

#[tokio::test(flavor = "multi_thread")]
async fn writes_and_side_effects_go_to_the_primary_reads_spread_over_replicas() {
    let h = Harness::start("").await;
    let c = h.connect().await;
    let primary = h.primary_port();
    c.batch_execute("create table t (id serial primary key, v int); create sequence s")
        .await
        .unwrap();
    h.caught_up().await;

    let on_primary = [
        "insert into t (v) values (1) returning inet_server_port()",
        "select inet_server_port() from (select nextval('s')) x",
        "select inet_server_port() from t for update",
        "select inet_server_port() from t for share",
        "select inet_server_port() from t for no key update",
        "with x as (insert into t (v) values (2) returning id) select inet_server_port() from x",
        "select inet_server_port() from (select pg_advisory_xact_lock(1)) x",
        "select inet_server_port() from (select set_config('a.b', 'c', false)) x",
        "/* tidepool: primary */ select inet_server_port()",
    ];
    for sql in on_primary {
        assert_eq!(served_by(&c, sql).await, primary, "{sql}");
    }
    // A read longer than routing.classify_max_bytes (32 KiB) is not parsed.
    let long = format!(
        "select inet_server_port() where '{}' <> ''",
        "x".repeat(40_000)
    );
    assert_eq!(served_by(&c, &long).await, primary);
    assert_eq!(h.metric("tidepool_classify_too_long_total").await, Some(1));

    h.polled().await;
    let mut seen = HashSet::new();
    for _ in 0..10 {
        seen.insert(served_by(&c, "select inet_server_port()").await);
    }
    assert_eq!(
        seen,
        h.replica_ports(),
        "plain selects spread over both replicas"
    );
    assert_eq!(simple_value(&c, "select pg_is_in_recovery()").await, "t");

    // Extended protocol: named prepared statements keep their routing.
    let read = c
        .prepare("select inet_server_port()::int, $1::int + 1")
        .await
        .unwrap();
    let mut seen = HashSet::new();
    for i in 0..6 {
        let row = c.query_one(&read, &[&i]).await.unwrap();
        assert_eq!(row.get::<_, i32>(1), i + 1);
        seen.insert(row.get::<_, i32>(0) as u16);
    }
    assert_eq!(seen, h.replica_ports().into_iter().collect());
    let write = c
        .prepare("insert into t (v) values ($1) returning inet_server_port()::int")
        .await
        .unwrap();
    for i in 0..3 {
        let row = c.query_one(&write, &[&i]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0) as u16, primary);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn transactions_stay_on_one_node() {
    let h = Harness::start("").await;
    let c = h.connect().await;
    let primary = h.primary_port();

    // An explicit transaction goes to the primary as a whole, reads included.
    c.simple_query("begin").await.unwrap();
    for _ in 0..3 {
        assert_eq!(served_by(&c, "select inet_server_port()").await, primary);
    }
    c.simple_query("commit").await.unwrap();

    // BEGIN READ ONLY: one replica for the whole transaction.
    let read_only_starts: [&[&str]; 3] = [
        &["begin read only"],
        &["start transaction isolation level repeatable read, read only"],
        &["begin", "set transaction read only"],
    ];
    for begin in read_only_starts {
        let ports: Vec<_> = {
            for statement in begin {
                c.simple_query(statement).await.unwrap();
            }
            let mut ports = Vec::new();
            for _ in 0..4 {
                ports.push(served_by(&c, "select inet_server_port()").await);
            }
            c.simple_query("commit").await.unwrap();
            ports
        };
        assert!(
            h.replica_ports().contains(&ports[0]),
            "{begin:?}: {ports:?}"
        );
        assert!(ports.iter().all(|p| *p == ports[0]), "{begin:?}: {ports:?}");
    }

    // A BEGIN followed at once by COMMIT or ROLLBACK never needs a server.
    c.batch_execute("begin").await.unwrap();
    c.batch_execute("rollback").await.unwrap();

    // Through tokio-postgres' own transaction API (extended protocol inside).
    let mut c = c;
    let tx = c.transaction().await.unwrap();
    let row = tx
        .query_one("select inet_server_port()::int", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0) as u16, primary);
    tx.commit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn hints_and_session_route() {
    let h = Harness::start("").await;
    let c = h.connect().await;
    let primary = h.primary_port();
    let route = simple_value(&c, "show tidepool.route").await;
    assert!(
        route.contains("session=auto") && route.contains("replica"),
        "{route}"
    );
    assert!(
        h.replica_ports()
            .contains(&served_by(&c, "select inet_server_port()").await)
    );
    assert_eq!(
        served_by(&c, "/* tidepool: primary */ select inet_server_port()").await,
        primary
    );
    c.simple_query("set tidepool.route = primary")
        .await
        .unwrap();
    let route = simple_value(&c, "show tidepool.route").await;
    assert!(
        route.contains("session=primary") && route.contains("primary"),
        "{route}"
    );
    for _ in 0..3 {
        assert_eq!(served_by(&c, "select inet_server_port()").await, primary);
    }
    c.simple_query("reset tidepool.route").await.unwrap();
    assert!(
        h.replica_ports()
            .contains(&served_by(&c, "select inet_server_port()").await)
    );
    assert_eq!(
        simple_error(&c, "set tidepool.route = sideways").await,
        "22023"
    );
    assert_eq!(simple_error(&c, "show tidepool.nonsense").await, "42704");
    // The session is still fine after its errors.
    assert_eq!(simple_rows(&c, "select 1").await, vec!["1"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn session_mode_keeps_one_primary_connection() {
    let h = Harness::start("[pool]\nmode = \"session\"\n").await;
    let c = h.connect().await;
    c.simple_query("set application_name = 'mine'")
        .await
        .unwrap();
    let pid = simple_value(&c, "select pg_backend_pid()").await;
    for _ in 0..3 {
        assert_eq!(simple_value(&c, "select pg_backend_pid()").await, pid);
        assert_eq!(simple_value(&c, "show application_name").await, "mine");
        assert_eq!(
            served_by(&c, "select inet_server_port()").await,
            h.primary_port()
        );
    }
    drop(c);
    // The connection went back reset: a new client does not see the old setting.
    let c = h.connect().await;
    assert_ne!(simple_value(&c, "show application_name").await, "mine");
}
