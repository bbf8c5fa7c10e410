//! Local PostgreSQL clusters for the demo, the integration tests and the benchmarks.
pub mod cluster;

use crate::config::Config;
use cluster::Cluster;

/// A proxy configuration for `cluster`, written as the TOML a user would
/// write, so that the demo and the tests go through the same contract.
/// A proxy listening on port 0 gets its admin HTTP listener on port 0 too,
/// so that proxies started side by side (tests run in parallel) never collide.
pub fn config_toml(cluster: &Cluster, listen: &str, extra: &str) -> String {
    let admin = match listen.rsplit_once(':') {
        Some((host, "0")) => format!("admin = \"{host}:0\"\n"),
        _ => String::new(),
    };
    let nodes: Vec<String> = cluster
        .nodes()
        .iter()
        .map(|n| format!("\"{}\"", n.addr()))
        .collect();
    let users: String = cluster
        .users()
        .iter()
        .map(|(name, password)| format!("[[users]]\nname = {name:?}\npassword = {password:?}\n\n"))
        .collect();
    format!(
        r#"[listen]
address = "{listen}"
{admin}
[cluster]
nodes = [{nodes}]
admin_user = {admin_user:?}
admin_password = {admin_password:?}

{extra}

{users}"#,
        nodes = nodes.join(", "),
        admin_user = cluster.admin_user(),
        admin_password = cluster.admin_password(),
    )
}

pub fn config(cluster: &Cluster, listen: &str, extra: &str) -> Config {
    Config::parse(&config_toml(cluster, listen, extra)).expect("generated config is valid")
}
