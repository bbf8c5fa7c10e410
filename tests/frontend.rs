//! The client-facing edge: TLS, md5, and a graceful stop.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Harness, connect, simple_value, sqlstate};

fn psql(h: &Harness, sslmode: &str, sql: &str) -> std::process::Output {
    Command::new("psql")
        .envs(h.pg_env())
        .env("PGSSLMODE", sslmode)
        .args(["-X", "-At", "-c", sql])
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_is_offered_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let h = Harness::start_with("", |c| {
        c.listen.tls_cert = Some(cert.clone());
        c.listen.tls_key = Some(key.clone());
    })
    .await;
    let out = psql(&h, "require", "select 'over tls'");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "over tls");
    let out = psql(&h, "disable", "select 'in the clear'");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_tls_sslmode_require_is_refused_and_prefer_works() {
    let h = Harness::start("").await;
    let out = psql(&h, "require", "select 1");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not support SSL"));
    let out = psql(&h, "prefer", "select 'plain'");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A walsender cannot be pooled: pg_basebackup or a logical replication
/// client is told so at once (PostgreSQL's feature_not_supported), not
/// handed an ordinary backend that answers its first command with 42601.
#[tokio::test(flavor = "multi_thread")]
async fn replication_connections_are_refused_and_replication_false_is_ordinary() {
    let h = Harness::start("").await;
    let with = |replication: &str| {
        Command::new("psql")
            .envs(h.pg_env())
            .args(["-X", "-At", "-c", "select 'ordinary'", "-d"])
            .arg(format!("replication={replication}"))
            .output()
            .unwrap()
    };
    for refused in ["database", "true", "on"] {
        let out = with(refused);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "replication={refused}");
        assert!(
            stderr.contains("replication connections (replication=")
                && stderr.contains("not supported through tidepool"),
            "{stderr}"
        );
    }
    let out = with("false");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ordinary",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn md5_when_allowed_for_the_user() {
    let h = Harness::start_with("", |c| c.users[0].allow_md5 = true).await;
    let c = h.connect().await;
    assert_eq!(simple_value(&c, "select 'md5 ok'").await, "md5 ok");
    let err = connect(&h.url("app", "bad", "postgres")).await.unwrap_err();
    assert_eq!(sqlstate(&err), "28P01");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_open_transactions_finish() {
    let mut h = Harness::start("").await;
    let busy = h.connect().await;
    let idle = h.connect().await;
    busy.batch_execute("create table g (v int); begin; insert into g values (1)")
        .await
        .unwrap();
    let proxy = h.proxy.take().unwrap();
    let port = proxy.addr().port();
    let stopping = tokio::spawn(proxy.shutdown());
    tokio::time::sleep(Duration::from_millis(300)).await;

    // New clients are refused, the idle client has been told why it is closed.
    let url = format!("host=127.0.0.1 port={port} user=app password=app dbname=postgres");
    assert!(connect(&url).await.is_err());
    let err = idle.simple_query("select 1").await.unwrap_err();
    assert!(err.is_closed() || sqlstate(&err) == "57P01", "{err:?}");

    // The open transaction finishes and commits.
    busy.batch_execute("insert into g values (2)")
        .await
        .unwrap();
    busy.batch_execute("commit").await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("shutdown finishes once the transaction is over")
        .unwrap();
    let admin = h.admin().await;
    let n: i64 = admin
        .query_one("select count(*) from g", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
}
