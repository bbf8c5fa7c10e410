//! The accept loop: a bounded number of clients, one task each, and a
//! graceful stop that lets open transactions finish.

use std::sync::{Arc, Mutex};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError, watch};
use tokio::task::JoinSet;

use super::Shared;
use super::error::ClientError;

pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
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
                match shared.client_slots.try_acquire() {
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
    shared.stopping.ring(1);
    drop(listener);
    let deadline = shared.config.load().listen.shutdown_timeout;
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

/// `listen.max_clients`, resizable by a reload without touching the clients
/// already in.
pub struct ClientSlots {
    semaphore: Arc<Semaphore>,
    max: Mutex<usize>,
}

impl ClientSlots {
    pub fn new(max: usize) -> ClientSlots {
        ClientSlots {
            semaphore: Arc::new(Semaphore::new(max)),
            max: Mutex::new(max),
        }
    }

    fn try_acquire(&self) -> Result<OwnedSemaphorePermit, TryAcquireError> {
        self.semaphore.clone().try_acquire_owned()
    }

    /// A smaller limit takes effect as clients leave: the slots over it are
    /// taken out of circulation once they are free, nobody is disconnected.
    pub fn resize(&self, max: usize) {
        let mut current = self.max.lock().expect("client slots lock");
        if max > *current {
            self.semaphore.add_permits(max - *current);
        } else if max < *current {
            let fewer = *current - max;
            let now = self.semaphore.forget_permits(fewer);
            if let Ok(later) = u32::try_from(fewer - now)
                && later > 0
            {
                let semaphore = self.semaphore.clone();
                tokio::spawn(async move {
                    if let Ok(permits) = semaphore.acquire_many_owned(later).await {
                        permits.forget();
                    }
                });
            }
        }
        *current = max;
    }
}

/// Over the client limit: say so (53300) instead of leaving the client hanging.
async fn reject(mut tcp: TcpStream) {
    if let Some(frame) = ClientError::TooManyClients.to_frame() {
        let _ = tcp.write_all(frame.raw()).await;
    }
    let _ = tcp.shutdown().await;
}
