//! deadpool glue: how to make, check and retire a server connection.

use std::net::SocketAddr;
use std::time::Duration;

use deadpool::managed::{Metrics, RecycleError, RecycleResult};

use super::server::{Login, ServerConnection, ServerError};
use crate::server_tls::ServerTls;
use crate::topology::NodeId;

pub struct ServerManager {
    pub node: NodeId,
    pub addr: SocketAddr,
    pub login: Login,
    pub tls: ServerTls,
    pub connect_timeout: Duration,
    pub max_lifetime: Duration,
    pub health_check_after: Duration,
    pub prepared_cap: usize,
}

impl deadpool::managed::Manager for ServerManager {
    type Type = ServerConnection;
    type Error = ServerError;

    async fn create(&self) -> Result<ServerConnection, ServerError> {
        tokio::time::timeout(
            self.connect_timeout,
            ServerConnection::connect(
                self.node,
                self.addr,
                &self.login,
                &self.tls,
                self.prepared_cap,
            ),
        )
        .await
        .map_err(|_| ServerError::Timeout)?
    }

    async fn recycle(
        &self,
        conn: &mut ServerConnection,
        metrics: &Metrics,
    ) -> RecycleResult<ServerError> {
        if !conn.clean {
            return Err(RecycleError::message("returned mid-transaction"));
        }
        if metrics.age() > self.max_lifetime {
            return Err(RecycleError::message("past max_lifetime"));
        }
        // A connection that sat idle may have been closed under us (server
        // restart, idle timeout, network): check it rather than hand it to a
        // client that would see the failure.
        if metrics.last_used() > self.health_check_after {
            conn.check(self.connect_timeout)
                .await
                .map_err(RecycleError::Backend)?;
        }
        Ok(())
    }
}
