//! The SQL admin console: psql -U <admin> tidepool, PgBouncer's habit.

mod common;

use common::{Harness, simple_error};

const ADMIN: &str =
    "failures_before_down = 2\n\n[admin]\nuser = \"tidepool\"\npassword = \"adm\"\n";

fn psql(h: &Harness, password: &str, sql: &str) -> std::process::Output {
    std::process::Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &h.port().to_string(),
            "-U",
            "tidepool",
            "-At",
            "-c",
            sql,
            "tidepool",
        ])
        .env("PGPASSWORD", password)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_shows_nodes_pools_and_config_and_runs_a_switchover() {
    let h = Harness::start(ADMIN).await;
    let app = h.connect().await;
    app.batch_execute("create table c (x int); select 1")
        .await
        .unwrap();

    let out = tokio::task::block_in_place(|| psql(&h, "adm", "SHOW NODES"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let primary = format!("127.0.0.1:{}|primary|up|false|", h.primary_port());
    assert!(text.lines().any(|l| l.starts_with(&primary)), "{text}");
    assert_eq!(
        text.lines().filter(|l| l.contains("|replica|up|")).count(),
        2,
        "{text}"
    );

    let pools = tokio::task::block_in_place(|| psql(&h, "adm", "show pools;"));
    let pools = String::from_utf8_lossy(&pools.stdout);
    assert!(
        pools.lines().any(|l| l.starts_with("postgres|app|")),
        "{pools}"
    );
    let config = tokio::task::block_in_place(|| psql(&h, "adm", "SHOW CONFIG"));
    let config = String::from_utf8_lossy(&config.stdout);
    assert!(config.contains("pool.mode|transaction|yes"), "{config}");
    assert!(
        config.contains("cluster.admin_user|postgres|no"),
        "{config}"
    );
    assert!(
        !config.contains("password") && !config.contains("|adm|") && !config.contains("token"),
        "{config}"
    );

    let wrong = tokio::task::block_in_place(|| psql(&h, "nope", "SHOW NODES"));
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("password authentication failed"),
        "{wrong:?}"
    );

    let console = h.console().await;
    assert_eq!(simple_error(&console, "SHOW ME EVERYTHING").await, "42601");
    // Started from a Config value, not a file: there is nothing to reread.
    assert_eq!(simple_error(&console, "RELOAD").await, "55000");
    console.simple_query("PAUSE").await.unwrap();
    console.simple_query("RESUME").await.unwrap();
    let to = h.cluster.nodes()[1].addr().to_string();
    let done = tokio::task::block_in_place(|| psql(&h, "adm", &format!("SWITCHOVER TO '{to}'")));
    assert!(done.status.success(), "{done:?}");
    assert!(String::from_utf8_lossy(&done.stdout).contains(&to));
    // The app's session goes on, writing to the new primary.
    app.batch_execute("insert into c values (1)").await.unwrap();
    let port =
        common::simple_value(&app, "/* tidepool: primary */ select inet_server_port()").await;
    assert_eq!(port, h.cluster.nodes()[1].port.to_string());
}

#[tokio::test(flavor = "multi_thread")]
async fn show_clients_servers_and_stats_follow_a_transaction() {
    let h = Harness::start(ADMIN).await;
    let app = common::connect(&format!(
        "{} application_name=showme",
        h.url("app", "app", "postgres")
    ))
    .await
    .unwrap();
    app.batch_execute("create table s (x int)").await.unwrap();
    app.batch_execute("begin").await.unwrap();
    let pid =
        common::simple_value(&app, "insert into s values (1) returning pg_backend_pid()").await;
    let console = h.console().await;

    // The server connection in the transaction is listed, active, linked to
    // the client, which is listed active and linked back to it.
    let servers = common::simple_table(&console, "SHOW SERVERS").await;
    let server = servers
        .iter()
        .find(|s| s["remote_pid"] == pid)
        .unwrap_or_else(|| panic!("backend {pid} in {servers:?}"));
    assert_eq!(server["type"], "S");
    assert_eq!(server["state"], "active");
    assert_eq!(server["port"], h.primary_port().to_string());
    assert_eq!(
        (server["user"].as_str(), server["database"].as_str()),
        ("app", "postgres")
    );
    let clients = common::simple_table(&console, "SHOW CLIENTS").await;
    let client = clients
        .iter()
        .find(|c| c["application_name"] == "showme")
        .unwrap_or_else(|| panic!("the app in {clients:?}"));
    assert_eq!(client["state"], "active");
    assert_eq!(client["link"], server["ptr"]);
    assert_eq!(server["link"], client["ptr"]);
    assert_eq!(client["addr"], "127.0.0.1");
    assert!(
        clients
            .iter()
            .any(|c| c["user"] == "tidepool" && c["database"] == "tidepool")
    );

    // Committed: the server goes back to the pool idle, the client unlinked.
    app.batch_execute("commit").await.unwrap();
    let servers = common::simple_table(&console, "SHOW SERVERS").await;
    let server = servers.iter().find(|s| s["remote_pid"] == pid).unwrap();
    assert_eq!(
        (server["state"].as_str(), server["link"].as_str()),
        ("idle", "")
    );
    let clients = common::simple_table(&console, "SHOW CLIENTS").await;
    let client = clients
        .iter()
        .find(|c| c["application_name"] == "showme")
        .unwrap();
    assert_eq!(
        (client["state"].as_str(), client["link"].as_str()),
        ("idle", "")
    );

    let lag = common::simple_table(&console, "SHOW LAG").await;
    assert_eq!(lag.len(), 2, "{lag:?}");
    assert!(lag.iter().all(|r| r["lagging"] == "false"), "{lag:?}");
    let databases = common::simple_table(&console, "SHOW DATABASES").await;
    assert_eq!(databases.len(), 3, "{databases:?}");
    assert!(
        databases.iter().all(|d| d["pool_size"] == "20"),
        "{databases:?}"
    );
    let help = common::simple_table(&console, "SHOW HELP").await;
    for command in ["SHOW CLIENTS", "SHOW STATS", "RELOAD"] {
        assert!(help.iter().any(|r| r["command"] == command), "{help:?}");
    }

    let stats = common::simple_table(&console, "SHOW STATS").await;
    let db = stats
        .iter()
        .find(|s| s["database"] == "postgres")
        .unwrap_or_else(|| panic!("postgres in {stats:?}"));
    let n = |column: &str| db[column].parse::<u64>().unwrap();
    assert!(n("total_xact_count") >= 2, "{db:?}");
    assert!(n("total_query_count") >= 4, "{db:?}");
    assert!(n("total_received") > 0 && n("total_sent") > 0, "{db:?}");
    assert!(n("total_xact_time") > 0, "{db:?}");
}
