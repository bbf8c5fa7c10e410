//! What the controller does to PostgreSQL nodes, over admin connections:
//! fence, promote, re-point replicas; and the hook commands.
use std::net::SocketAddr;
use std::time::Duration;

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::topology::{Credentials, Lsn, open_admin, postgres_error_text};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{addr}: {}", postgres_error_text(.source))]
    Postgres {
        addr: SocketAddr,
        source: tokio_postgres::Error,
    },
    #[error("{0}: no answer in time")]
    Timeout(SocketAddr),
    #[error("{addr}: {problem}")]
    Unexpected { addr: SocketAddr, problem: String },
}

/// One node, reached with the admin credentials for a few statements.
pub struct NodeSql {
    addr: SocketAddr,
    client: Client,
    timeout: Duration,
}

impl NodeSql {
    pub async fn connect(
        addr: SocketAddr,
        credentials: &Credentials,
        timeout: Duration,
    ) -> Result<NodeSql, NodeError> {
        let connect = open_admin(addr, credentials.clone(), "tidepool-controller");
        let client = match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(client)) => client,
            Ok(Err(source)) => return Err(NodeError::Postgres { addr, source }),
            Err(_) => return Err(NodeError::Timeout(addr)),
        };
        Ok(NodeSql {
            addr,
            client,
            timeout,
        })
    }

    /// The first column of the first row, as text.
    async fn value(&self, sql: &str) -> Result<Option<String>, NodeError> {
        let addr = self.addr;
        let messages = match tokio::time::timeout(self.timeout, self.client.simple_query(sql)).await
        {
            Ok(Ok(messages)) => messages,
            Ok(Err(source)) => return Err(NodeError::Postgres { addr, source }),
            Err(_) => return Err(NodeError::Timeout(addr)),
        };
        Ok(messages.iter().find_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        }))
    }

    async fn lsn(&self, sql: &str) -> Result<Lsn, NodeError> {
        let text = self.value(sql).await?.unwrap_or_default();
        text.parse().map_err(|_| NodeError::Unexpected {
            addr: self.addr,
            problem: format!("`{sql}` gave {text:?}"),
        })
    }

    pub async fn current_lsn(&self) -> Result<Lsn, NodeError> {
        self.lsn("select pg_current_wal_lsn()").await
    }

    pub async fn replay_lsn(&self) -> Result<Lsn, NodeError> {
        self.lsn("select pg_last_wal_replay_lsn()").await
    }

    /// A replica's (receive, replay) LSNs.
    pub async fn positions(&self) -> Result<(Option<Lsn>, Option<Lsn>), NodeError> {
        let receive = self.value("select pg_last_wal_receive_lsn()").await?;
        let replay = self.value("select pg_last_wal_replay_lsn()").await?;
        Ok((
            receive.and_then(|v| v.parse().ok()),
            replay.and_then(|v| v.parse().ok()),
        ))
    }

    pub async fn in_recovery(&self) -> Result<bool, NodeError> {
        Ok(self.value("select pg_is_in_recovery()").await?.as_deref() == Some("t"))
    }

    /// SQL fencing: new transactions are read-only (persisted, so a restart
    /// keeps it), and every client backend is terminated, so nothing that
    /// started as a write goes on.
    pub async fn fence(&self) -> Result<(), NodeError> {
        self.value("alter system set default_transaction_read_only = on")
            .await?;
        self.value("select pg_reload_conf()").await?;
        self.terminate_clients().await
    }

    /// Undoes `fence`'s setting: on a node about to take writes (a fenced
    /// node may have been a primary before, and the setting survives).
    pub async fn unfence(&self) -> Result<(), NodeError> {
        self.value("alter system reset default_transaction_read_only")
            .await?;
        self.value("select pg_reload_conf()").await?;
        Ok(())
    }

    pub async fn terminate_clients(&self) -> Result<(), NodeError> {
        self.value(
            "select count(pg_terminate_backend(pid)) from pg_stat_activity \
             where backend_type = 'client backend' and pid <> pg_backend_pid() \
             and application_name not like 'tidepool-%'",
        )
        .await?;
        Ok(())
    }

    /// `pg_promote(wait => true)`, then confirms the node left recovery.
    pub async fn promote(&self) -> Result<(), NodeError> {
        self.value("select pg_promote(true, 60)").await?;
        for _ in 0..100 {
            if !self.in_recovery().await? {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(NodeError::Unexpected {
            addr: self.addr,
            problem: "still in recovery after pg_promote".into(),
        })
    }

    /// Makes a replica stream from `primary`: its `primary_conninfo` with
    /// host and port replaced (user, password, application_name kept), then
    /// a reload, which PostgreSQL 13+ applies without a restart.
    pub async fn follow(&self, primary: SocketAddr) -> Result<(), NodeError> {
        let current = self
            .value("show primary_conninfo")
            .await?
            .unwrap_or_default();
        let conninfo = repointed(&current, primary);
        let quoted = conninfo.replace('\'', "''");
        self.value(&format!("alter system set primary_conninfo = '{quoted}'"))
            .await?;
        self.value("select pg_reload_conf()").await?;
        Ok(())
    }
}

/// `conninfo` with its host and port set to `primary`'s.
fn repointed(conninfo: &str, primary: SocketAddr) -> String {
    let mut parts: Vec<String> = conninfo
        .split_whitespace()
        .filter(|p| {
            !p.starts_with("host=") && !p.starts_with("port=") && !p.starts_with("hostaddr=")
        })
        .map(str::to_owned)
        .collect();
    parts.push(format!("host={}", primary.ip()));
    parts.push(format!("port={}", primary.port()));
    parts.join(" ")
}

/// Runs an operator's hook through `sh -c` with `{name}` placeholders
/// replaced; true when it exits 0 within `timeout`.
pub async fn run_hook(template: &str, values: &[(&str, String)], timeout: Duration) -> bool {
    let mut command = template.to_owned();
    for (name, value) in values {
        command = command.replace(&format!("{{{name}}}"), value);
    }
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&command)
        .kill_on_drop(true)
        .status();
    match tokio::time::timeout(timeout, child).await {
        Ok(Ok(status)) if status.success() => true,
        Ok(Ok(status)) => {
            tracing::error!(%command, %status, "hook failed");
            false
        }
        Ok(Err(e)) => {
            tracing::error!(%command, error = %e, "hook could not run");
            false
        }
        Err(_) => {
            tracing::error!(%command, ?timeout, "hook timed out");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repointing_keeps_everything_but_the_address() {
        let primary: SocketAddr = "127.0.0.1:6000".parse().unwrap();
        let old = "user=postgres password=secret host=127.0.0.1 port=5432 application_name=r1 sslmode=prefer";
        let new = repointed(old, primary);
        assert_eq!(
            new,
            "user=postgres password=secret application_name=r1 sslmode=prefer host=127.0.0.1 port=6000"
        );
    }
}
