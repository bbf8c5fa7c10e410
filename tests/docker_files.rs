//! What of docker/ can be checked without a Docker engine: the compose file
//! (docker-compose config), the Prometheus config (promtool), the tidepool
//! configs (the proxy's own validation), and that every metric the Grafana
//! dashboard queries is one tidepool exports.

mod common;

use std::path::Path;
use std::process::Command;

use common::{Harness, http};

fn docker(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("docker")
        .join(path)
}

fn succeeds(command: &mut Command) {
    let out = command.output().expect("the checker runs");
    assert!(out.status.success(), "{command:?}: {out:?}");
}

#[test]
fn compose_prometheus_and_tidepool_configs_are_valid() {
    succeeds(
        Command::new("docker-compose")
            .arg("-f")
            .arg(docker("compose.yaml"))
            .args(["config", "-q"]),
    );
    succeeds(
        Command::new("promtool")
            .args(["check", "config"])
            .arg(docker("prometheus/prometheus.yml")),
    );
    for id in ["a", "b"] {
        succeeds(
            Command::new(env!("CARGO_BIN_EXE_tidepool"))
                .arg("check-config")
                .arg(docker(&format!("tidepool/tidepool-{id}.toml")))
                .env("POSTGRES_PASSWORD", "x")
                .env("APP_PASSWORD", "x")
                .env("TIDEPOOL_ADMIN_PASSWORD", "x")
                .env("TIDEPOOL_ADMIN_TOKEN", "x"),
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_queries_only_exported_metrics() {
    let text = std::fs::read_to_string(docker("grafana/dashboards/tidepool.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().clone())
        .map(|t| t["expr"].as_str().unwrap().to_owned())
        .collect();
    assert!(exprs.len() >= 15, "{exprs:?}");

    let h = Harness::start("").await;
    // Labelled families appear in a scrape once they have a sample.
    let app = h.connect().await;
    app.batch_execute("select 1").await.unwrap();
    app.batch_execute("select 1/0").await.unwrap_err();
    let scrape = http::get(h.proxy().admin_addr(), "/metrics").await.body;
    let exported: std::collections::HashSet<&str> = scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for expr in &exprs {
        for name in metric_names(expr) {
            let family = name.strip_suffix("_bucket").unwrap_or(&name);
            assert!(
                exported.contains(family),
                "{name} (in {expr}) is not exported"
            );
        }
    }
}

/// The `tidepool_*` identifiers of a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(start) = rest.find("tidepool_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}
