//! The accept loop: a bounded number of clients, one task each, and a
//! graceful stop that lets open transactions finish.

use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use super::Shared;
use super::error::ClientError;

pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(shared.config.listen.max_clients));
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                match limit.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let shared = shared.clone();
                        let shutdown = shutdown.clone();
                        sessions.spawn(async move {
                            super::serve_client(shared, tcp, peer, shutdown).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        shared.metrics.client_errors().count("53300");
                        tokio::spawn(reject(tcp));
                    }
                }
            }
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    let deadline = shared.config.listen.shutdown_timeout;
    let drained = tokio::time::timeout(deadline, async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            remaining = sessions.len(),
            "shutdown deadline passed, closing remaining clients"
        );
        sessions.abort_all();
    }
}

/// Over the client limit: say so (53300) instead of leaving the client hanging.
async fn reject(mut tcp: TcpStream) {
    if let Some(frame) = ClientError::TooManyClients.to_frame() {
        let _ = tcp.write_all(frame.raw()).await;
    }
    let _ = tcp.shutdown().await;
}
