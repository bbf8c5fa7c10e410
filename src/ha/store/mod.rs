//! The coordinator store: etcd when configured, else an in-process store for
//! a single proxy. Both give the few primitives the HA layer is built on:
//! leases, create-if-absent, writes guarded by the leader key's create
//! revision, prefix reads and watches that resume from a revision.
mod embedded;
mod etcd;

use std::time::Duration;

use tokio::sync::mpsc;

pub use embedded::EmbeddedStore;
pub use etcd::EtcdStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("watch history from revision {0} is gone (compacted)")]
    Compacted(i64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseId(pub i64);

/// A key's value with the revisions that guards compare against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub key: String,
    pub value: String,
    pub create_revision: i64,
    pub mod_revision: i64,
}

/// Keys under a prefix and the store revision they were read at: a watch
/// from `revision + 1` misses nothing.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub entries: Vec<Versioned>,
    pub revision: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(Versioned),
    Delete { key: String, revision: i64 },
}

/// Who holds the leader key: its writes are valid only while that key
/// still has this create revision (a new holder gets a new one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guard {
    pub key: String,
    pub create_revision: i64,
}

/// What `create` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// The key was absent and now holds our value, created at this revision.
    Won(i64),
    /// Someone holds it.
    Held(Versioned),
}

/// Events in order; the channel closes when the watch breaks (the caller
/// reads again and watches from there).
pub type Watch = mpsc::Receiver<WatchEvent>;

#[derive(Clone)]
pub enum Store {
    Embedded(EmbeddedStore),
    Etcd(EtcdStore),
}

impl Store {
    pub fn describe(&self) -> String {
        match self {
            Store::Embedded(_) => "embedded".into(),
            Store::Etcd(s) => format!("etcd {}", s.endpoints().join(",")),
        }
    }

    pub async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        match self {
            Store::Embedded(s) => Ok(s.grant(ttl)),
            Store::Etcd(s) => s.grant(ttl).await,
        }
    }

    /// Renews the lease; false when it has expired (its keys are gone).
    pub async fn keep_alive(&self, lease: LeaseId) -> Result<bool, StoreError> {
        match self {
            Store::Embedded(s) => Ok(s.keep_alive(lease)),
            Store::Etcd(s) => s.keep_alive(lease).await,
        }
    }

    pub async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => {
                s.revoke(lease);
                Ok(())
            }
            Store::Etcd(s) => s.revoke(lease).await,
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let snapshot = self.list_exact(key).await?;
        Ok(snapshot.entries.into_iter().find(|e| e.key == key))
    }

    async fn list_exact(&self, key: &str) -> Result<Snapshot, StoreError> {
        match self {
            Store::Embedded(s) => Ok(s.list(key, false)),
            Store::Etcd(s) => s.list(key, false).await,
        }
    }

    pub async fn list(&self, prefix: &str) -> Result<Snapshot, StoreError> {
        match self {
            Store::Embedded(s) => Ok(s.list(prefix, true)),
            Store::Etcd(s) => s.list(prefix, true).await,
        }
    }

    pub async fn put(
        &self,
        key: &str,
        value: &str,
        lease: Option<LeaseId>,
    ) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => {
                s.put(key, value, lease);
                Ok(())
            }
            Store::Etcd(s) => s.put(key, value, lease).await,
        }
    }

    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => {
                s.delete(key, None);
                Ok(())
            }
            Store::Etcd(s) => s.delete(key, None).await.map(|_| ()),
        }
    }

    /// Puts `value` at `key` only if the key does not exist (etcd: Txn if
    /// CreateRevision(key) == 0).
    pub async fn create(
        &self,
        key: &str,
        value: &str,
        lease: LeaseId,
    ) -> Result<Created, StoreError> {
        match self {
            Store::Embedded(s) => Ok(s.create(key, value, lease)),
            Store::Etcd(s) => s.create(key, value, lease).await,
        }
    }

    /// Puts only while `guard` still holds: a deposed leader's write fails.
    pub async fn put_guarded(
        &self,
        guard: &Guard,
        key: &str,
        value: &str,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Embedded(s) => Ok(s.put_guarded(guard, key, value)),
            Store::Etcd(s) => s.put_guarded(guard, key, value).await,
        }
    }

    pub async fn delete_guarded(&self, guard: &Guard, key: &str) -> Result<bool, StoreError> {
        match self {
            Store::Embedded(s) => Ok(s.delete(key, Some(guard))),
            Store::Etcd(s) => s.delete(key, Some(guard)).await,
        }
    }

    /// Every change under `prefix` from `from_revision` on.
    pub async fn watch(&self, prefix: &str, from_revision: i64) -> Result<Watch, StoreError> {
        match self {
            Store::Embedded(s) => s.watch(prefix, from_revision),
            Store::Etcd(s) => s.watch(prefix, from_revision).await,
        }
    }
}
