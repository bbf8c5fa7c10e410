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

/// Answers the client's queries until it leaves or the proxy stops (an
/// idle console must not hold up a shutdown).
pub async fn serve(
    shared: Arc<Shared>,
    mut client: ClientConn,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), ClientError> {
    loop {
        let frame = tokio::select! {
            frame = client.read_frame() => frame?,
            _ = async { drop(shutdown.wait_for(|&stop| stop).await) } => {
                if let Some(frame) = ClientError::ShuttingDown.to_frame() {
                    let _ = client.send(&frame).await;
                }
                client.shutdown().await;
                return Ok(());
            }
        };
        let Some(frame) = frame else {
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
        ["SHOW", "SERVERS"] => servers(shared),
        ["SHOW", "CLIENTS"] => clients(shared),
        ["SHOW", "STATS"] => stats(shared),
        ["SHOW", "DATABASES"] => databases(shared),
        ["SHOW", "CONFIG"] => config(shared),
        ["SHOW", "HELP"] => table(
            &["command"],
            [
                "SHOW NODES",
                "SHOW LAG",
                "SHOW POOLS",
                "SHOW SERVERS",
                "SHOW CLIENTS",
                "SHOW STATS",
                "SHOW DATABASES",
                "SHOW CONFIG",
                "PAUSE",
                "RESUME",
                "RELOAD",
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
        ["RELOAD"] => match crate::reload::from_file(shared) {
            Ok(_) => ok("RELOAD"),
            Err(e) => error("55000", &e.to_string()),
        },
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
    let mode = shared.config.load().pool.mode.as_str();
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

/// PgBouncer's columns for SHOW CLIENTS and SHOW SERVERS. `ptr` is a
/// client's cancel-key pid or a server's backend pid, in hex, and `link`
/// the `ptr` of the other side, so the two lists join as PgBouncer's do.
const CONNECTION_COLUMNS: [&str; 18] = [
    "type",
    "user",
    "database",
    "state",
    "addr",
    "port",
    "local_addr",
    "local_port",
    "connect_time",
    "request_time",
    "wait",
    "wait_us",
    "close_needed",
    "ptr",
    "link",
    "remote_pid",
    "tls",
    "application_name",
];

fn time(t: std::time::SystemTime) -> Option<String> {
    Some(humantime::format_rfc3339_seconds(t).to_string())
}

fn ptr(pid: i32) -> Option<String> {
    Some(format!("{pid:x}"))
}

fn clients(shared: &Shared) -> Vec<Frame> {
    let rows = shared
        .cancels
        .clients()
        .into_iter()
        .map(|c| {
            let local = c.info.local;
            vec![
                text("C"),
                text(&c.info.user),
                text(&c.info.database),
                text(c.state.as_str()),
                text(c.info.addr.ip()),
                text(c.info.addr.port()),
                local.map(|l| l.ip().to_string()),
                local.map(|l| l.port().to_string()),
                time(c.info.connected_at),
                c.request_at.and_then(time),
                text(c.waiting.as_secs()),
                text(c.waiting.subsec_micros()),
                text(0),
                ptr(c.pid),
                c.server.and_then(|(_, key)| ptr(key.pid)),
                text(0),
                text(if c.info.tls { "TLS" } else { "" }),
                text(&c.info.application_name),
            ]
        })
        .collect();
    table(&CONNECTION_COLUMNS, rows)
}

fn servers(shared: &Shared) -> Vec<Frame> {
    let clients = shared.cancels.clients();
    let rows = shared
        .pools
        .servers
        .snapshot()
        .into_iter()
        .map(|s| {
            let client = clients.iter().find(|c| c.server == Some((s.addr, s.key)));
            vec![
                text("S"),
                text(&s.user),
                text(&s.database),
                text(if client.is_some() { "active" } else { "idle" }),
                text(s.addr.ip()),
                text(s.addr.port()),
                s.local.map(|l| l.ip().to_string()),
                s.local.map(|l| l.port().to_string()),
                time(s.connected_at),
                client.and_then(|c| c.request_at).and_then(time),
                text(0),
                text(0),
                text(0),
                ptr(s.key.pid),
                client.and_then(|c| ptr(c.pid)),
                text(s.key.pid),
                text(if s.tls { "TLS" } else { "" }),
                text("tidepool"),
            ]
        })
        .collect();
    table(&CONNECTION_COLUMNS, rows)
}

fn stats(shared: &Shared) -> Vec<Frame> {
    let rows = shared
        .stats
        .rows()
        .into_iter()
        .map(|r| {
            let seconds = r.uptime.as_secs().max(1);
            let per_xact = |total: u64| total.checked_div(r.xacts).unwrap_or(0);
            vec![
                text(&r.database),
                text(r.xacts),
                text(r.queries),
                text(r.received),
                text(r.sent),
                text(r.xact_us),
                text(r.wait_us),
                text(r.xacts / seconds),
                text(r.queries / seconds),
                text(r.received / seconds),
                text(r.sent / seconds),
                text(per_xact(r.xact_us)),
                text(per_xact(r.wait_us)),
            ]
        })
        .collect();
    table(
        &[
            "database",
            "total_xact_count",
            "total_query_count",
            "total_received",
            "total_sent",
            "total_xact_time",
            "total_wait_time",
            "avg_xact_count",
            "avg_query_count",
            "avg_recv",
            "avg_sent",
            "avg_xact_time",
            "avg_wait_time",
        ],
        rows,
    )
}

fn databases(shared: &Shared) -> Vec<Frame> {
    let t = shared.topology.load();
    let c = shared.config.load();
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
    let c = shared.config.load();
    let k = &c.coordinator;
    let etcd = match k.etcd.is_empty() {
        true => "embedded".to_owned(),
        false => k.etcd.join(","),
    };
    let pairs: Vec<(&str, String)> = vec![
        ("listen.address", c.listen.address.clone()),
        ("listen.admin", c.listen.admin.clone()),
        ("listen.max_clients", c.listen.max_clients.to_string()),
        ("listen.workers", c.listen.workers.to_string()),
        ("listen.busy_poll", format!("{:?}", c.listen.busy_poll)),
        ("pool.mode", c.pool.mode.as_str().to_owned()),
        ("pool.size", c.pool.size.to_string()),
        ("pool.pipeline_depth", c.pool.pipeline_depth.to_string()),
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
        ("routing.report_lsn", c.routing.report_lsn.to_string()),
        (
            "routing.classify_max_bytes",
            c.routing.classify_max_bytes.to_string(),
        ),
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
        .map(|(key, value)| {
            let live = crate::config::Config::reloadable(key);
            vec![
                text(key),
                Some(value),
                text(if live { "yes" } else { "no" }),
            ]
        })
        .collect();
    table(&["key", "value", "changeable"], rows)
}
