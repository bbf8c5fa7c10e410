//! deadpool glue: how to make, check and retire a server connection.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};

use deadpool::managed::{Metrics, RecycleError, RecycleResult};

use super::listing::{ServerInfo, ServerList};
use super::server::{Login, ServerConnection, ServerError};
use crate::config::PoolConfig;
use crate::server_tls::ServerTls;
use crate::topology::NodeId;

pub struct ServerManager {
    pub node: NodeId,
    pub addr: SocketAddr,
    pub login: Login,
    pub tls: ServerTls,
    /// Shared by every pool and read at each use, so that a reload applies
    /// to the connections already pooled.
    pub settings: Arc<ArcSwap<PoolConfig>>,
    pub servers: ServerList,
    /// The ParameterStatus values the newest connection reported at
    /// startup, before any client's SET: what a login is told when every
    /// connection is busy (see `PoolHandle::defaults_if_busy`).
    pub fresh_params: ArcSwapOption<Vec<(String, String)>>,
}

impl deadpool::managed::Manager for ServerManager {
    /// Boxed: deadpool moves its object in and out of its slots some ten
    /// times a checkout and return, and a connection (buffers, statement
    /// cache, parameters) was copied each time (callgrind: 79.6K against
    /// 77.6K instructions per TPC-B transaction, unboxed and boxed).
    type Type = Box<ServerConnection>;
    type Error = ServerError;

    async fn create(&self) -> Result<Box<ServerConnection>, ServerError> {
        let settings = self.settings.load_full();
        // Boxed: connecting (TLS handshake, SCRAM) is a large state machine
        // that every checkout future would otherwise carry inline, in every
        // client's task, for the rare checkout that opens a connection.
        tokio::time::timeout(
            settings.connect_timeout,
            Box::pin(ServerConnection::connect(
                self.node,
                self.addr,
                &self.login,
                &self.tls,
                settings.prepared_statements_cap,
            )),
        )
        .await
        .map_err(|_| ServerError::Timeout)?
        .map(|mut conn| {
            self.fresh_params.store(Some(Arc::new(conn.params.clone())));
            conn.listed = Some(self.servers.add(ServerInfo {
                addr: self.addr,
                local: conn.stream.local_addr().ok(),
                tls: conn.stream.is_tls(),
                user: self.login.user.clone(),
                database: self.login.database.clone(),
                key: conn.key,
                connected_at: std::time::SystemTime::now(),
            }));
            Box::new(conn)
        })
    }

    async fn recycle(
        &self,
        conn: &mut Box<ServerConnection>,
        metrics: &Metrics,
    ) -> RecycleResult<ServerError> {
        let settings = self.settings.load_full();
        if !conn.clean {
            return Err(RecycleError::message("returned mid-transaction"));
        }
        if metrics.age() > settings.max_lifetime {
            return Err(RecycleError::message("past max_lifetime"));
        }
        if conn.stream.spoke_while_idle() {
            return Err(RecycleError::message("closed by the server while idle"));
        }
        // A connection that sat idle may have been closed under us (server
        // restart, idle timeout, network): check it rather than hand it to a
        // client that would see the failure.
        if metrics.last_used() > settings.health_check_after {
            // Boxed for the same reason as `create`'s connect: rare, and
            // otherwise inline in every checkout.
            Box::pin(conn.check(settings.connect_timeout))
                .await
                .map_err(RecycleError::Backend)?;
        }
        Ok(())
    }
}
