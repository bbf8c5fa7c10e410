//! The etcd v3 store. Every call has a deadline shorter than a lease TTL, so
//! an unreachable etcd shows as errors in time for the lease logic to act.
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, KeyValue,
    PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::{Mutex, mpsc};

use super::{Created, Guard, LeaseId, Snapshot, StoreError, Versioned, Watch, WatchEvent};

/// etcd 3.4 closes connections whose gRPC keep-alive pings come faster than 5 s.
const KEEP_ALIVE: Duration = Duration::from_secs(5);
const WATCH_BUFFER: usize = 1024;

#[derive(Clone)]
pub struct EtcdStore {
    endpoints: Arc<Vec<String>>,
    timeout: Duration,
    /// Connected on first use and kept: the client reconnects by itself.
    client: Arc<Mutex<Option<Client>>>,
}

impl EtcdStore {
    /// `timeout` bounds each call (connecting included).
    pub fn new(endpoints: Vec<String>, timeout: Duration) -> EtcdStore {
        EtcdStore {
            endpoints: Arc::new(endpoints),
            timeout,
            client: Arc::new(Mutex::new(None)),
        }
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    async fn client(&self) -> Result<Client, StoreError> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref() {
            return Ok(client.clone());
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(self.timeout)
            .with_timeout(self.timeout)
            .with_keep_alive(KEEP_ALIVE, KEEP_ALIVE);
        let connect = Client::connect(self.endpoints.as_slice(), Some(options));
        let client = self.deadline(connect).await?;
        *slot = Some(client.clone());
        Ok(client)
    }

    async fn deadline<T>(
        &self,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        }
    }

    pub async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let mut client = self.client().await?;
        let ttl = ttl.as_secs().max(1) as i64;
        let granted = self.deadline(client.lease_grant(ttl, None)).await?;
        Ok(LeaseId(granted.id()))
    }

    pub async fn keep_alive(&self, lease: LeaseId) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let renewed = self
            .deadline(async {
                let (mut keeper, mut stream) = client.lease_keep_alive(lease.0).await?;
                keeper.keep_alive().await?;
                stream.message().await
            })
            .await;
        match renewed {
            Ok(r) => Ok(r.is_some_and(|r| r.ttl() > 0)),
            // etcd forgot the lease (expired while we could not reach it).
            Err(StoreError::Etcd(etcd_client::Error::LeaseKeepAliveError(e)))
                if e.contains("not found") =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    pub async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        self.deadline(client.lease_revoke(lease.0)).await?;
        Ok(())
    }

    pub async fn list(&self, key: &str, prefix: bool) -> Result<Snapshot, StoreError> {
        let mut client = self.client().await?;
        let options = prefix.then(|| GetOptions::new().with_prefix());
        let got = self.deadline(client.get(key, options)).await?;
        Ok(Snapshot {
            entries: got.kvs().iter().map(versioned).collect(),
            revision: got.header().map_or(0, |h| h.revision()),
        })
    }

    pub async fn put(
        &self,
        key: &str,
        value: &str,
        lease: Option<LeaseId>,
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let options = lease.map(|l| PutOptions::new().with_lease(l.0));
        self.deadline(client.put(key, value, options)).await?;
        Ok(())
    }

    pub async fn delete(&self, key: &str, guard: Option<&Guard>) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let Some(guard) = guard else {
            self.deadline(client.delete(key, None::<DeleteOptions>))
                .await?;
            return Ok(true);
        };
        let txn = Txn::new()
            .when([held(guard)])
            .and_then([TxnOp::delete(key, None)]);
        Ok(self.deadline(client.txn(txn)).await?.succeeded())
    }

    pub async fn create(
        &self,
        key: &str,
        value: &str,
        lease: LeaseId,
    ) -> Result<Created, StoreError> {
        let mut client = self.client().await?;
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                value,
                Some(PutOptions::new().with_lease(lease.0)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let response = self.deadline(client.txn(txn)).await?;
        if response.succeeded() {
            return Ok(Created::Won(response.header().map_or(0, |h| h.revision())));
        }
        let holder = response.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(got) => got.kvs().first().map(versioned),
            _ => None,
        });
        // Gone between the compare and the get (its lease expired): whoever
        // retries first gets it.
        Ok(match holder {
            Some(holder) => Created::Held(holder),
            None => Created::Held(Versioned {
                key: key.to_owned(),
                value: String::new(),
                create_revision: 0,
                mod_revision: 0,
            }),
        })
    }

    pub async fn put_guarded(
        &self,
        guard: &Guard,
        key: &str,
        value: &str,
    ) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let txn = Txn::new()
            .when([held(guard)])
            .and_then([TxnOp::put(key, value, None)]);
        Ok(self.deadline(client.txn(txn)).await?.succeeded())
    }

    pub async fn watch(&self, prefix: &str, from_revision: i64) -> Result<Watch, StoreError> {
        let mut client = self.client().await?;
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from_revision);
        let mut stream = self.deadline(client.watch(prefix, Some(options))).await?;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(async move {
            // Ends (closing the channel) on error, cancel or compaction;
            // the reader lists again and watches from there.
            while let Ok(Some(response)) = stream.message().await {
                if response.canceled() {
                    return;
                }
                for event in response.events() {
                    let Some(kv) = event.kv() else { continue };
                    let event = match event.event_type() {
                        EventType::Put => WatchEvent::Put(versioned(kv)),
                        EventType::Delete => WatchEvent::Delete {
                            key: String::from_utf8_lossy(kv.key()).into_owned(),
                            revision: kv.mod_revision(),
                        },
                    };
                    if tx.send(event).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }
}

fn held(guard: &Guard) -> Compare {
    Compare::create_revision(guard.key.as_str(), CompareOp::Equal, guard.create_revision)
}

fn versioned(kv: &KeyValue) -> Versioned {
    Versioned {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: String::from_utf8_lossy(kv.value()).into_owned(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
    }
}
