//! Polls every node for its role and health and publishes the topology.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use super::{Health, NodeId, Role, SharedTopology};
use crate::config::Secret;

/// Consecutive failed polls before a node is marked down: one lost packet
/// should not take a node out of rotation.
const FAILURES_BEFORE_DOWN: u32 = 3;

#[derive(Clone)]
pub struct MonitorSettings {
    pub admin_user: String,
    pub admin_password: Secret,
    pub poll_interval: Duration,
    pub poll_timeout: Duration,
}

/// One node's poller: a kept-open admin connection and its failure streak.
struct NodePoller {
    id: NodeId,
    addr: SocketAddr,
    client: Option<Client>,
    failures: u32,
}

#[derive(Debug, thiserror::Error)]
enum PollError {
    #[error("{0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("timed out")]
    Timeout,
    #[error("unexpected answer to the role query")]
    BadAnswer,
}

impl NodePoller {
    async fn poll(&mut self, settings: &MonitorSettings) -> Result<Role, PollError> {
        tokio::time::timeout(settings.poll_timeout, self.poll_inner(settings))
            .await
            .map_err(|_| PollError::Timeout)?
    }

    async fn poll_inner(&mut self, settings: &MonitorSettings) -> Result<Role, PollError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = Some(connect(self.addr, settings).await?);
        }
        let client = self.client.as_ref().expect("connected above");
        let rows = client.simple_query("select pg_is_in_recovery()").await?;
        let in_recovery = rows
            .iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(row) => row.get(0),
                _ => None,
            })
            .ok_or(PollError::BadAnswer)?;
        Ok(if in_recovery == "t" {
            Role::Replica
        } else {
            Role::Primary
        })
    }
}

async fn connect(addr: SocketAddr, settings: &MonitorSettings) -> Result<Client, PollError> {
    let (client, connection) = tokio_postgres::Config::new()
        .host(addr.ip().to_string())
        .port(addr.port())
        .user(&settings.admin_user)
        .password(settings.admin_password.expose())
        .dbname("postgres")
        .application_name("tidepool-monitor")
        .connect_timeout(settings.poll_timeout)
        .connect(NoTls)
        .await?;
    tokio::spawn(connection);
    Ok(client)
}

/// Polls every node once, then keeps polling every `poll_interval` until
/// `shutdown` fires. Returns after the first round so that the proxy starts
/// with known roles.
pub async fn start(
    topology: SharedTopology,
    settings: MonitorSettings,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let mut pollers: Vec<NodePoller> = topology
        .load()
        .nodes
        .iter()
        .map(|n| NodePoller {
            id: n.id,
            addr: n.addr,
            client: None,
            failures: 0,
        })
        .collect();
    poll_all(&mut pollers, &topology, &settings, true).await;
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(settings.poll_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => poll_all(&mut pollers, &topology, &settings, false).await,
                _ = shutdown.changed() => return,
            }
        }
    })
}

async fn poll_all(
    pollers: &mut [NodePoller],
    topology: &SharedTopology,
    settings: &MonitorSettings,
    first: bool,
) {
    let results =
        futures_util::future::join_all(pollers.iter_mut().map(|p| p.poll(settings))).await;
    let mut changes = Vec::new();
    for (poller, result) in pollers.iter_mut().zip(results) {
        match result {
            Ok(role) => {
                poller.failures = 0;
                changes.push((poller.id, Some(role)));
            }
            Err(e) => {
                poller.client = None;
                poller.failures += 1;
                if first || poller.failures >= FAILURES_BEFORE_DOWN {
                    if poller.failures == FAILURES_BEFORE_DOWN || first {
                        tracing::warn!(node = %poller.id, addr = %poller.addr, error = %e, "node poll failed");
                    }
                    changes.push((poller.id, None));
                }
            }
        }
    }
    let current = topology.load();
    let differs = changes.iter().any(|&(id, role)| {
        let node = current.node(id);
        match role {
            Some(role) => node.role != role || node.health != Health::Up,
            None => node.health != Health::Down,
        }
    });
    if !differs {
        return;
    }
    topology.update(|t| {
        for &(id, role) in &changes {
            let node = &mut t.nodes[id.0];
            match role {
                Some(role) => {
                    if node.role != role || node.health != Health::Up {
                        tracing::info!(node = %id, addr = %node.addr, role = role.as_str(), "node up");
                    }
                    node.role = role;
                    node.health = Health::Up;
                }
                None => node.health = Health::Down,
            }
        }
    });
}
