//! The store of a single proxy: the same semantics as etcd (revisions,
//! leases whose keys vanish when they expire, guarded writes, watches that
//! replay from a revision), in memory. There is nobody to coordinate with,
//! so it never becomes unreachable.
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::{Created, Guard, LeaseId, Snapshot, StoreError, Versioned, Watch, WatchEvent};

/// Events kept for watches that resume from an older revision.
const HISTORY: usize = 4096;
const WATCH_BUFFER: usize = 1024;
/// How often expired leases are swept when nothing else touches the store.
const SWEEP_INTERVAL: Duration = Duration::from_millis(50);

#[derive(Clone, Default)]
pub struct EmbeddedStore(Arc<Mutex<State>>);

#[derive(Default)]
struct State {
    revision: i64,
    entries: BTreeMap<String, (Versioned, Option<LeaseId>)>,
    leases: HashMap<LeaseId, (Instant, Duration)>,
    next_lease: i64,
    history: VecDeque<WatchEvent>,
    /// The newest revision no longer in `history`.
    compacted: i64,
    watchers: Vec<(String, mpsc::Sender<WatchEvent>)>,
}

impl EmbeddedStore {
    /// A new store; inside a tokio runtime it also sweeps expired leases, so
    /// that watchers see their keys deleted without waiting for a call.
    pub fn new() -> EmbeddedStore {
        let store = EmbeddedStore::default();
        if tokio::runtime::Handle::try_current().is_ok() {
            let weak: Weak<Mutex<State>> = Arc::downgrade(&store.0);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(SWEEP_INTERVAL);
                loop {
                    tick.tick().await;
                    let Some(state) = weak.upgrade() else { return };
                    state.lock().expect("store lock").expire(Instant::now());
                }
            });
        }
        store
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        let mut state = self.0.lock().expect("store lock");
        state.expire(Instant::now());
        state
    }

    pub fn grant(&self, ttl: Duration) -> LeaseId {
        let mut state = self.state();
        state.next_lease += 1;
        let id = LeaseId(state.next_lease);
        state.leases.insert(id, (Instant::now() + ttl, ttl));
        id
    }

    pub fn keep_alive(&self, lease: LeaseId) -> bool {
        let mut state = self.state();
        match state.leases.get_mut(&lease) {
            Some((deadline, ttl)) => {
                *deadline = Instant::now() + *ttl;
                true
            }
            None => false,
        }
    }

    pub fn revoke(&self, lease: LeaseId) {
        let mut state = self.state();
        state.leases.remove(&lease);
        state.drop_lease_keys(lease);
    }

    pub fn list(&self, key: &str, prefix: bool) -> Snapshot {
        let state = self.state();
        let entries = state
            .entries
            .range(key.to_owned()..)
            .take_while(|(k, _)| {
                if prefix {
                    k.starts_with(key)
                } else {
                    *k == key
                }
            })
            .map(|(_, (v, _))| v.clone())
            .collect();
        Snapshot {
            entries,
            revision: state.revision,
        }
    }

    pub fn put(&self, key: &str, value: &str, lease: Option<LeaseId>) {
        self.state().put(key, value, lease);
    }

    pub fn delete(&self, key: &str, guard: Option<&Guard>) -> bool {
        let mut state = self.state();
        if guard.is_some_and(|g| !state.holds(g)) {
            return false;
        }
        state.delete(key);
        true
    }

    pub fn create(&self, key: &str, value: &str, lease: LeaseId) -> Created {
        let mut state = self.state();
        if let Some((held, _)) = state.entries.get(key) {
            return Created::Held(held.clone());
        }
        Created::Won(state.put(key, value, Some(lease)))
    }

    pub fn put_guarded(&self, guard: &Guard, key: &str, value: &str) -> bool {
        let mut state = self.state();
        if !state.holds(guard) {
            return false;
        }
        let lease = state.entries.get(key).and_then(|(_, lease)| *lease);
        state.put(key, value, lease);
        true
    }

    pub fn watch(&self, prefix: &str, from_revision: i64) -> Result<Watch, StoreError> {
        let mut state = self.state();
        if from_revision <= state.compacted {
            return Err(StoreError::Compacted(from_revision));
        }
        let (tx, rx) = mpsc::channel(WATCH_BUFFER.max(state.history.len() + 1));
        for event in state.history.iter() {
            if event_revision(event) >= from_revision && event_key(event).starts_with(prefix) {
                tx.try_send(event.clone())
                    .expect("buffer sized for the history");
            }
        }
        state.watchers.push((prefix.to_owned(), tx));
        Ok(rx)
    }
}

impl State {
    fn holds(&self, guard: &Guard) -> bool {
        self.entries
            .get(&guard.key)
            .is_some_and(|(v, _)| v.create_revision == guard.create_revision)
    }

    fn put(&mut self, key: &str, value: &str, lease: Option<LeaseId>) -> i64 {
        self.revision += 1;
        let revision = self.revision;
        let create_revision = self
            .entries
            .get(key)
            .map_or(revision, |(v, _)| v.create_revision);
        let versioned = Versioned {
            key: key.to_owned(),
            value: value.to_owned(),
            create_revision,
            mod_revision: revision,
        };
        self.entries
            .insert(key.to_owned(), (versioned.clone(), lease));
        self.publish(WatchEvent::Put(versioned));
        revision
    }

    fn delete(&mut self, key: &str) {
        if self.entries.remove(key).is_some() {
            self.revision += 1;
            let event = WatchEvent::Delete {
                key: key.to_owned(),
                revision: self.revision,
            };
            self.publish(event);
        }
    }

    fn expire(&mut self, now: Instant) {
        let expired: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, (deadline, _))| *deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for lease in expired {
            self.leases.remove(&lease);
            self.drop_lease_keys(lease);
        }
    }

    fn drop_lease_keys(&mut self, lease: LeaseId) {
        let keys: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, (_, l))| *l == Some(lease))
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            self.delete(&key);
        }
    }

    fn publish(&mut self, event: WatchEvent) {
        // A watcher that cannot keep up is dropped: its channel closes and
        // it reads again, as after a broken etcd watch.
        self.watchers.retain(|(prefix, tx)| {
            !event_key(&event).starts_with(prefix.as_str()) || tx.try_send(event.clone()).is_ok()
        });
        if self.history.len() == HISTORY
            && let Some(old) = self.history.pop_front()
        {
            self.compacted = event_revision(&old);
        }
        self.history.push_back(event);
    }
}

fn event_key(event: &WatchEvent) -> &str {
    match event {
        WatchEvent::Put(v) => &v.key,
        WatchEvent::Delete { key, .. } => key,
    }
}

fn event_revision(event: &WatchEvent) -> i64 {
    match event {
        WatchEvent::Put(v) => v.mod_revision,
        WatchEvent::Delete { revision, .. } => *revision,
    }
}
