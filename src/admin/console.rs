//! The SQL admin console, PgBouncer's habit: `psql -U <[admin] user>
//! tidepool` opens a session that the proxy answers itself, over the simple
//! query protocol. Column names follow PgBouncer's where the concept is the
//! same, so existing scripts keep working.
use std::sync::Arc;

use crate::frontend::Shared;
use crate::frontend::client::ClientConn;
use crate::frontend::error::ClientError;
use crate::protocol::Frame;
use crate::protocol::backend::{self, Severity, TxStatus};
use crate::protocol::frontend as fe;
use crate::topology::Lsn;

/// The database name that selects the console.
pub const DATABASE: &str = "tidepool";

/// Answers the client's queries until it leaves.
pub async fn serve(shared: Arc<Shared>, mut client: ClientConn) -> Result<(), ClientError> {
    loop {
        let Some(frame) = client.read_frame().await? else {
            return Ok(());
        };
        match frame.tag() {
            fe::QUERY => {
                let sql = fe::query_text(&frame)
                    .ok()
                    .flatten()
                    .unwrap_or_default()
                    .to_owned();
                for reply in answer(&shared, &sql).await {
                    client.send(&reply).await?;
                }
            }
            fe::TERMINATE => return Ok(()),
            fe::SYNC => {}
            _ => {
                let message = "the tidepool admin console speaks the simple query protocol only";
                client
                    .send(&backend::error_response(Severity::Error, "0A000", message))
                    .await?;
            }
        }
        client
            .send(&backend::ready_for_query(TxStatus::Idle))
            .await?;
        client.flush().await?;
    }
}

/// One command's reply: a result set and its tag, or an error.
async fn answer(shared: &Shared, sql: &str) -> Vec<Frame> {
    let words: Vec<String> = sql
        .trim()
        .trim_end_matches(';')
        .split_whitespace()
        .map(|w| w.to_ascii_uppercase())
        .collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let original: Vec<&str> = sql
        .trim()
        .trim_end_matches(';')
        .split_whitespace()
        .collect();
    let ok = |tag: &str| vec![backend::command_complete(tag)];
    let error =
        |code: &str, message: &str| vec![backend::error_response(Severity::Error, code, message)];
    match words[..] {
        [] => vec![Frame::build(backend::EMPTY_QUERY, |_| {})],
        ["SHOW", "NODES"] => nodes(shared),
        ["SHOW", "LAG"] => lag(shared),
        ["SHOW", "POOLS"] => pools(shared),
        ["SHOW", "SERVERS"] => pools(shared),
        ["SHOW", "DATABASES"] => databases(shared),
        ["SHOW", "CONFIG"] => config(shared),
        ["SHOW", "HELP"] => table(
            &["command"],
            [
                "SHOW NODES",
                "SHOW LAG",
                "SHOW POOLS",
                "SHOW SERVERS",
                "SHOW DATABASES",
                "SHOW CONFIG",
                "PAUSE",
                "RESUME",
                "SWITCHOVER [TO 'host:port']",
            ]
            .iter()
            .map(|c| vec![Some(c.to_string())])
            .collect(),
        ),
        ["PAUSE"] => match shared.ha.pause().await {
            Ok(()) => ok("PAUSE"),
            Err(e) => error("57P03", &e.to_string()),
        },
        ["RESUME"] => match shared.ha.resume().await {
            Ok(()) => ok("RESUME"),
            Err(e) => error("57P03", &e.to_string()),
        },
        ["SWITCHOVER"] | ["SWITCHOVER", "TO", _] => {
            let to = match original.get(2).map(|t| t.trim_matches('\'').parse()) {
                None => None,
                Some(Ok(addr)) => Some(addr),
                Some(Err(e)) => return error("22023", &format!("SWITCHOVER TO: {e}")),
            };
            match shared.ha.switchover(to).await {
                Ok(entry) => {
                    let mut reply = table(
                        &["from", "to", "epoch", "took_ms"],
                        vec![vec![
                            entry.from,
                            entry.to,
                            Some(entry.epoch.to_string()),
                            Some(entry.took_ms.to_string()),
                        ]],
                    );
                    reply.pop();
                    reply.push(backend::command_complete("SWITCHOVER"));
                    reply
                }
                Err(e) => error("55000", &e.to_string()),
            }
        }
        ["RELOAD"] => error(
            "0A000",
            "RELOAD is not supported yet: restart tidepool to change its configuration",
        ),
        ["SHOW", "CLIENTS" | "STATS"] => error(
            "0A000",
            "not supported yet: see the Prometheus metrics at /metrics",
        ),
        _ => error(
            "42601",
            &format!("unknown admin console command {sql:?}: try SHOW HELP"),
        ),
    }
}

/// A result set of text columns, ending with its `SHOW n` tag.
fn table(columns: &[&str], rows: Vec<Vec<Option<String>>>) -> Vec<Frame> {
    backend::text_table(columns, &rows, &format!("SHOW {}", rows.len()))
}

fn text(value: impl ToString) -> Option<String> {
    Some(value.to_string())
}

fn lsn(value: Option<Lsn>) -> Option<String> {
    value.map(|l| l.to_string())
}

fn nodes(shared: &Shared) -> Vec<Frame> {
    let t = shared.topology.load();
    let rows = t
        .nodes
        .iter()
        .map(|n| {
            vec![
                text(n.addr),
                text(match Some(n.id) == t.epoch_primary {
                    true => "primary",
                    false => n.role.as_str(),
                }),
                text(n.health.as_str()),
                text(t.is_fenced(n.id)),
                lsn(n.current_lsn),
                lsn(n.replay_lsn),
                lsn(n.receive_lsn),
                n.timeline.map(|tl| tl.to_string()),
                text(t.epoch),
            ]
        })
        .collect();
    table(
        &[
            "node",
            "role",
            "health",
            "fenced",
            "current_lsn",
            "replay_lsn",
            "receive_lsn",
            "timeline",
            "epoch",
        ],
        rows,
    )
}

fn lag(shared: &Shared) -> Vec<Frame> {
    let t = shared.topology.load();
    let rows = t
        .usable_replicas()
        .map(|n| {
            vec![
                text(n.addr),
                n.lag_bytes.map(|b| b.to_string()),
                n.lag.map(|l| format!("{:.3}", l.as_secs_f64())),
                text(n.lagging),
            ]
        })
        .collect();
    table(&["node", "lag_bytes", "lag_seconds", "lagging"], rows)
}

fn pools(shared: &Shared) -> Vec<Frame> {
    let t = shared.topology.load();
    let mode = shared.config.pool.mode.as_str();
    let rows = shared
        .pools
        .statuses()
        .into_iter()
        .map(|(key, status)| {
            let idle = status.available;
            vec![
                text(&key.database),
                text(&key.user),
                t.nodes.get(key.node.0).map(|n| n.addr.to_string()),
                text(status.waiting),
                text(status.size.saturating_sub(idle)),
                text(idle),
                text(status.max_size),
                text(mode),
            ]
        })
        .collect();
    table(
        &[
            "database",
            "user",
            "node",
            "cl_waiting",
            "sv_active",
            "sv_idle",
            "pool_size",
            "pool_mode",
        ],
        rows,
    )
}

fn databases(shared: &Shared) -> Vec<Frame> {
    let t = shared.topology.load();
    let c = &shared.config;
    let rows = t
        .nodes
        .iter()
        .map(|n| {
            vec![
                text(n.addr),
                text(n.addr.ip()),
                text(n.addr.port()),
                text(c.pool.size),
                text(c.pool.mode.as_str()),
            ]
        })
        .collect();
    table(&["name", "host", "port", "pool_size", "pool_mode"], rows)
}

/// The settings that matter at 3 a.m.; never a password or token.
fn config(shared: &Shared) -> Vec<Frame> {
    let c = &shared.config;
    let k = &c.coordinator;
    let etcd = match k.etcd.is_empty() {
        true => "embedded".to_owned(),
        false => k.etcd.join(","),
    };
    let pairs: Vec<(&str, String)> = vec![
        ("listen.address", c.listen.address.clone()),
        ("listen.admin", c.listen.admin.clone()),
        ("listen.max_clients", c.listen.max_clients.to_string()),
        ("pool.mode", c.pool.mode.as_str().to_owned()),
        ("pool.size", c.pool.size.to_string()),
        (
            "routing.consistency",
            c.routing.consistency.as_str().to_owned(),
        ),
        (
            "routing.max_replica_lag_bytes",
            c.routing.max_replica_lag_bytes.to_string(),
        ),
        (
            "routing.max_replica_lag",
            format!("{:?}", c.routing.max_replica_lag),
        ),
        ("routing.ryw_wait", format!("{:?}", c.routing.ryw_wait)),
        ("cluster.nodes", c.cluster.nodes.join(",")),
        ("cluster.admin_user", c.cluster.admin_user.clone()),
        ("cluster.sslmode", c.cluster.sslmode.as_str().to_owned()),
        (
            "cluster.poll_interval",
            format!("{:?}", c.cluster.poll_interval),
        ),
        ("coordinator.etcd", etcd),
        ("coordinator.lease_ttl", format!("{:?}", k.lease_ttl)),
        (
            "coordinator.failover_timeout",
            format!("{:?}", k.failover_timeout),
        ),
        (
            "coordinator.switchover_timeout",
            format!("{:?}", k.switchover_timeout),
        ),
    ];
    let rows = pairs
        .into_iter()
        .map(|(key, value)| vec![text(key), Some(value), text("no")])
        .collect();
    table(&["key", "value", "changeable"], rows)
}
