//! The SQL admin console: psql -U <admin> tidepool, PgBouncer's habit.

mod common;

use common::{Harness, sqlstate};

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

    let console = common::connect(&format!(
        "host=127.0.0.1 port={} user=tidepool password=adm dbname=tidepool",
        h.port()
    ))
    .await
    .unwrap();
    let err = console
        .simple_query("SHOW ME EVERYTHING")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "42601");
    // Started from a Config value, not a file: there is nothing to reread.
    let err = console.simple_query("RELOAD").await.unwrap_err();
    assert_eq!(sqlstate(&err), "55000");
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
