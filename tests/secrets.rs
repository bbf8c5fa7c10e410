//! No password, SCRAM secret or token may show up in what tidepool prints
//! or serves: its logs at debug level (the real binary, as operators run
//! it), error messages, /metrics, /topology, SHOW CONFIG. The secrets are
//! distinctive strings, read from the TOML, a file and an environment
//! variable, and every path that handles them is driven: good and bad
//! logins, a user the servers refuse, the admin console, HTTP mutations
//! with a wrong and a right token.

mod common;

use std::fs::File;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{connect, http, simple_rows, sqlstate};
use tidepool::demo::{self, cluster::ClusterSpec};
use tokio_postgres::SimpleQueryMessage;

const ADMIN_PASSWORD: &str = "AdmPw5ecretQ7f3a9";
const APP_PASSWORD: &str = "UsrPw5ecretK2b8c1";
/// A user tidepool knows and the servers do not: the server's refusal passes
/// through the proxy's error path with the password just used.
const GHOST_PASSWORD: &str = "GhostPw5ecretM9d4e2";
const CONSOLE_PASSWORD: &str = "ConsPw5ecretW4x6y8";
const TOKEN: &str = "Tok5ecretZ1n3v5b7";
/// Wrong guesses are often near-misses of the real secret: never shown either.
const WRONG_PASSWORD: &str = "WrongPw5ecretH6j0p";
const WRONG_TOKEN: &str = "WrongTok5ecretR3k7l";
const TOKEN_ENV: &str = "TIDEPOOL_SECRETS_TEST_TOKEN";

/// Stops the child (SIGTERM, then SIGKILL) if the test fails half way.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The "tidepool listening" JSON log line's addresses, once it is written
/// (tracing's formatter writes to stdout).
async fn listening(log: &std::path::Path) -> (String, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let line = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|l| l["fields"]["message"] == "tidepool listening");
        if let Some(line) = line {
            let field = |name: &str| line["fields"][name].as_str().unwrap().to_owned();
            return (field("addr"), field("admin_addr"));
        }
        assert!(Instant::now() < deadline, "tidepool did not start:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_in_logs_errors_or_admin_views() {
    let cluster = common::start_cluster(ClusterSpec {
        replicas: 1,
        admin_password: ADMIN_PASSWORD.into(),
        users: vec![("app".into(), APP_PASSWORD.into())],
        ..ClusterSpec::default()
    })
    .await;
    // The servers' own SCRAM secrets for both roles: not to be shown either.
    let server_secrets = tokio::task::block_in_place(|| {
        cluster.psql(
            0,
            "select rolpassword from pg_authid where rolname in ('postgres', 'app')",
        )
    })
    .unwrap();
    let mut secrets: Vec<String> = [
        ADMIN_PASSWORD,
        APP_PASSWORD,
        GHOST_PASSWORD,
        CONSOLE_PASSWORD,
        TOKEN,
        WRONG_PASSWORD,
        WRONG_TOKEN,
    ]
    .map(str::to_owned)
    .to_vec();
    for secret in server_secrets.lines() {
        // SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>
        let (_, keys) = secret.rsplit_once('$').expect("a SCRAM secret");
        secrets.extend(keys.split(':').map(str::to_owned));
        secrets.push(secret.to_owned());
    }

    let dir = tempfile::tempdir().unwrap();
    let console_password = dir.path().join("console-password");
    std::fs::write(&console_password, format!("{CONSOLE_PASSWORD}\n")).unwrap();
    let extra = format!(
        "[admin]\nuser = \"tidepool\"\npassword = \"file:{}\"\ntoken = \"env:{TOKEN_ENV}\"\n",
        console_password.display()
    );
    let toml = demo::config_toml(&cluster, "127.0.0.1:0", &extra)
        + &format!("[[users]]\nname = \"ghost\"\npassword = \"{GHOST_PASSWORD}\"\n");
    let config = dir.path().join("tidepool.toml");
    std::fs::write(&config, toml).unwrap();
    let (log, out) = (dir.path().join("stderr.log"), dir.path().join("stdout.log"));
    let child = Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .args(["--log-format", "json", "run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "debug")
        .env(TOKEN_ENV, TOKEN)
        .stdin(Stdio::null())
        .stdout(File::create(&out).unwrap())
        .stderr(File::create(&log).unwrap())
        .spawn()
        .expect("tidepool runs");
    let mut child = Running(child);
    let (addr, admin) = listening(&out).await;
    let admin = admin.parse().unwrap();
    let port = addr.rsplit_once(':').unwrap().1;
    let url = |user: &str, password: &str, db: &str| {
        format!(
            "host=127.0.0.1 port={port} user={user} password={password} dbname={db} connect_timeout=10"
        )
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while http::get(admin, "/topology").await.json()["primary"].is_null() {
        assert!(Instant::now() < deadline, "no primary seen");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Everything the proxy says to anyone goes into one haystack.
    let mut seen = String::new();
    let app = connect(&url("app", APP_PASSWORD, "postgres"))
        .await
        .unwrap();
    seen += &simple_rows(&app, "select current_user").await.join("\n");
    app.batch_execute("create table t (x int); insert into t values (1)")
        .await
        .unwrap();
    seen += &simple_rows(&app, "select x from t").await.join("\n");
    for (user, password, db) in [
        ("app", WRONG_PASSWORD, "postgres"),
        ("ghost", GHOST_PASSWORD, "postgres"),
        ("tidepool", WRONG_PASSWORD, "tidepool"),
    ] {
        let err = connect(&url(user, password, db)).await.unwrap_err();
        assert_eq!(sqlstate(&err), "28P01", "{user}: {err}");
        seen += &format!("{err}\n{err:?}\n");
    }
    let console = connect(&url("tidepool", CONSOLE_PASSWORD, "tidepool"))
        .await
        .unwrap();
    for command in ["SHOW CONFIG", "SHOW POOLS", "SHOW SERVERS", "SHOW CLIENTS"] {
        for message in console.simple_query(command).await.unwrap_or_default() {
            if let SimpleQueryMessage::Row(row) = message {
                for i in 0..row.len() {
                    seen += row.get(i).unwrap_or("");
                    seen += "\n";
                }
            }
        }
    }
    assert!(
        seen.contains("cluster.admin_user"),
        "SHOW CONFIG ran: {seen}"
    );

    let bearer = |token: &str| format!("Bearer {token}");
    let refused = http::request(
        admin,
        "POST",
        "/pause",
        &[("Authorization", &bearer(WRONG_TOKEN))],
    )
    .await;
    assert_eq!(refused.status, 401);
    let resumed = http::request(
        admin,
        "POST",
        "/resume",
        &[("Authorization", &bearer(TOKEN))],
    )
    .await;
    // Past the token check; whether there was a pause to lift is not the point.
    assert!(![401, 403].contains(&resumed.status), "{}", resumed.body);
    for response in [refused, resumed] {
        seen += &response.body;
    }
    for path in ["/metrics", "/topology", "/health", "/ready"] {
        seen += &http::get(admin, path).await.body;
    }
    drop((app, console));

    let _ = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(40);
    while child.0.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "tidepool did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logs = std::fs::read_to_string(&log).unwrap() + &std::fs::read_to_string(&out).unwrap();
    // The capture is real: debug lines and the failed logins are in it.
    assert!(logs.contains("\"level\":\"DEBUG\""), "{logs}");
    assert!(logs.contains("ghost"), "{logs}");
    seen += &logs;
    for secret in &secrets {
        if let Some(line) = seen.lines().find(|l| l.contains(secret.as_str())) {
            panic!("{secret:?} leaked:\n{line}");
        }
    }
}
