//! Configuration reload: RELOAD, POST /reload and SIGHUP apply pool sizes,
//! users, routing mode and limits without dropping a client, and refuse what
//! cannot change live.

mod common;

use std::time::Duration;

use common::{Harness, http, simple_value, sqlstate};

const ADMIN: &str = "[admin]\nuser = \"tidepool\"\npassword = \"adm\"\n";

fn extra(pool: &str, routing: &str, admin_token: &str, users: &str) -> String {
    format!(
        "[pool]\n{pool}\ncheckout_timeout = \"1s\"\n\n[routing]\n{routing}\n\n{ADMIN}token = \"{admin_token}\"\n\n{users}"
    )
}

fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_default()
}

async fn config_value(console: &tokio_postgres::Client, key: &str) -> String {
    common::simple_table(console, "SHOW CONFIG")
        .await
        .into_iter()
        .find(|row| row["key"] == key)
        .unwrap_or_else(|| panic!("{key} in SHOW CONFIG"))
        .remove("value")
        .expect("a value column")
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_resizes_pools_adds_users_and_keeps_clients() {
    let first = extra("size = 1", "consistency = \"read_your_writes\"", "t1", "");
    let (h, path) = Harness::start_from_file(&first).await;
    h.admin()
        .await
        .batch_execute("create table r (x int); create role app2 login password 'p2'")
        .await
        .unwrap();
    h.caught_up().await;

    // One primary connection: a second writer times out while the first
    // holds it in a transaction.
    let a = h.connect().await;
    a.batch_execute("begin; insert into r values (1)")
        .await
        .unwrap();
    let b = h.connect().await;
    let err = b
        .batch_execute("insert into r values (2)")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "53300", "{err}");

    let app2 = "[[users]]\nname = \"app2\"\npassword = \"p2\"\nmax_connections = 1\n\n";
    h.rewrite_config(
        &path,
        &extra("size = 3", "consistency = \"eventual\"", "t1", app2),
    );
    let console = h.console().await;
    console.simple_query("RELOAD").await.unwrap();
    assert_eq!(config_value(&console, "pool.size").await, "3");
    assert_eq!(
        config_value(&console, "routing.consistency").await,
        "eventual"
    );

    // The bigger pool serves the second writer while the first still holds
    // its transaction, which then commits: nobody was dropped.
    b.batch_execute("insert into r values (2)").await.unwrap();
    a.batch_execute("insert into r values (3); commit")
        .await
        .unwrap();
    let count = simple_value(&b, "/* tidepool: primary */ select count(*) from r").await;
    assert_eq!(count, "3");

    // The new user logs in; its limit of one connection holds.
    let url = |user: &str, password: &str| {
        format!(
            "host=127.0.0.1 port={} user={user} password={password} dbname=postgres",
            h.port()
        )
    };
    let first_app2 = common::connect(&url("app2", "p2")).await.unwrap();
    assert_eq!(
        simple_value(&first_app2, "select current_user").await,
        "app2"
    );
    let err = common::connect(&url("app2", "p2")).await.unwrap_err();
    assert_eq!(sqlstate(&err), "53300", "{err}");
    drop(first_app2);
    let mut again = None;
    for _ in 0..50 {
        if let Ok(c) = common::connect(&url("app2", "p2")).await {
            again = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        again.is_some(),
        "app2's slot is freed when its client leaves"
    );

    // A key that cannot change live refuses the whole reload.
    let moved = std::fs::read_to_string(&path)
        .unwrap()
        .replace("size = 3", "size = 7")
        .replace(
            "[listen]\naddress = \"127.0.0.1:0\"",
            "[listen]\naddress = \"127.0.0.1:1\"",
        );
    std::fs::write(&path, moved).unwrap();
    let err = console.simple_query("RELOAD").await.unwrap_err();
    assert_eq!(sqlstate(&err), "55000");
    assert!(message(&err).contains("listen.address"), "{err:?}");
    assert_eq!(config_value(&console, "pool.size").await, "3");

    // A broken file is refused with its key; the proxy goes on.
    h.rewrite_config(&path, &extra("size = 0", "", "t1", ""));
    let err = console.simple_query("RELOAD").await.unwrap_err();
    assert!(message(&err).contains("pool.size"), "{err:?}");
    assert_eq!(simple_value(&a, "select 1").await, "1");
}

#[tokio::test(flavor = "multi_thread")]
async fn post_reload_needs_the_token_and_can_change_it() {
    let (h, path) = Harness::start_from_file(&extra("size = 2", "", "t1", "")).await;
    let admin = h.proxy().admin_addr();
    let post = |token: &'static str| async move {
        let auth = format!("Bearer {token}");
        http::request(
            admin,
            "POST",
            "/reload",
            &[("Authorization", auth.as_str())],
        )
        .await
    };
    assert_eq!(post("wrong").await.status, 401);

    h.rewrite_config(&path, &extra("size = 4", "", "t2", ""));
    let done = post("t1").await;
    assert_eq!(done.status, 200, "{}", done.body);
    let changed = done.json()["changed"].clone();
    assert_eq!(
        changed,
        serde_json::json!(["pool", "admin"]),
        "{}",
        done.body
    );
    assert!(!done.body.contains("t2"));
    // The new token is the one that counts now.
    assert_eq!(post("t1").await.status, 401);
    assert_eq!(post("t2").await.status, 200);
}

/// `tidepool run` rereads its file on SIGHUP, and runs on `listen.workers` threads.
#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_the_running_binary() {
    let cluster = common::start_cluster(Default::default()).await;
    let port = tidepool::demo::cluster::free_port();
    let admin_port = tidepool::demo::cluster::free_port();
    let path = cluster.dir().join("run.toml");
    let write = |size: u32| {
        let extra = format!("[pool]\nsize = {size}\n\n{ADMIN}");
        let toml = tidepool::demo::config_toml(&cluster, &format!("127.0.0.1:{port}"), &extra)
            .replace(
                "[listen]\n",
                &format!("[listen]\nadmin = \"127.0.0.1:{admin_port}\"\nworkers = 1\n"),
            );
        std::fs::write(&path, toml).unwrap();
    };
    write(2);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .args(["run", "--config"])
        .arg(&path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("host=127.0.0.1 port={port} user=tidepool password=adm dbname=tidepool");
    let mut console = None;
    for _ in 0..200 {
        if let Ok(c) = common::connect(&url).await {
            console = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let console = console.expect("tidepool run starts");
    assert_eq!(config_value(&console, "pool.size").await, "2");
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], admin_port));
    let metrics = common::http::get(admin, "/metrics").await.body;
    assert!(
        metrics.contains("\ntidepool_worker_threads 1\n"),
        "{metrics}"
    );

    write(9);
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    let mut size = String::new();
    for _ in 0..100 {
        size = config_value(&console, "pool.size").await;
        if size == "9" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(size, "9");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}
