//! One proxy's side of HA: its lease, its vote on the primary's health, the
//! topology and pause it follows, the election, and what it does when the
//! store cannot be reached.
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::store::{Created, Guard, LeaseId, Store, Watch, WatchEvent};
use super::{HaSettings, HaStatus, MemberRecord, PauseRecord, TopologyRecord, controller, unix_ms};
use crate::config::CoordinatorLoss;
use crate::topology::{Health, Role, SharedTopology, Topology};

pub fn spawn(
    store: Store,
    settings: Arc<HaSettings>,
    topology: SharedTopology,
    busy: Arc<AtomicU64>,
    status: watch::Sender<HaStatus>,
    shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let (valid_until, _) = watch::channel(None);
    let member = Member {
        store,
        settings,
        topology,
        busy,
        status,
        lease: None,
        valid_until,
        watch: None,
        published: None,
        controller: None,
        leader_seen: None,
        history: History::default(),
    };
    tokio::spawn(member.run(shutdown))
}

struct Member {
    store: Store,
    settings: Arc<HaSettings>,
    topology: SharedTopology,
    busy: Arc<AtomicU64>,
    status: watch::Sender<HaStatus>,
    lease: Option<LeaseId>,
    /// When this proxy's lease may have expired on the store's side (last
    /// renewal *sent* + TTL − margin). Past it, this proxy cannot know its
    /// epoch is current, and its controller must have stopped.
    valid_until: watch::Sender<Option<Instant>>,
    /// In sync with the store: everything up to the watch's start applied.
    watch: Option<Watch>,
    published: Option<MemberRecord>,
    controller: Option<(Guard, JoinHandle<()>)>,
    leader_seen: Option<String>,
    history: History,
}

/// The history entries seen, by key: a re-read after a broken watch must
/// not count them twice.
#[derive(Default)]
struct History {
    seen: std::collections::HashSet<String>,
    failovers: u64,
    switchovers: u64,
    last_failover_ms: Option<u64>,
}

impl History {
    fn record(&mut self, key: &str, json: &str) {
        let Ok(entry) = serde_json::from_str::<super::HistoryEntry>(json) else {
            return;
        };
        if !self.seen.insert(key.to_owned()) {
            return;
        }
        match entry.kind {
            super::EventKind::Failover => {
                self.failovers += 1;
                self.last_failover_ms = Some(entry.took_ms);
            }
            super::EventKind::Switchover => self.switchovers += 1,
            _ => {}
        }
    }
}

impl Member {
    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut lease_tick = tokio::time::interval(self.settings.lease_ttl / 3);
        lease_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let view_every = self
            .settings
            .poll_interval
            .clamp(Duration::from_millis(10), Duration::from_millis(200));
        let mut view_tick = tokio::time::interval(view_every);
        view_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = lease_tick.tick() => self.renew().await,
                _ = view_tick.tick() => self.publish_view().await,
                event = next_event(&mut self.watch) => match event {
                    Some(event) => self.on_event(event).await,
                    None => {
                        tracing::debug!("coordinator watch ended; reading again");
                        self.watch = None;
                        self.sync().await;
                    }
                },
                _ = shutdown.changed() => break,
            }
        }
        if let Some((_, task)) = self.controller.take() {
            task.abort();
        }
        if let Some(lease) = self.lease {
            // Hand the leadership over now rather than after a TTL.
            let _ = self.store.revoke(lease).await;
        }
    }

    fn lease_valid(&self) -> bool {
        super::lease_holds(*self.valid_until.borrow())
    }

    /// Keeps the lease alive (granting one when there is none), then acts on
    /// what that says about reaching the store.
    async fn renew(&mut self) {
        let sent = Instant::now();
        let renewed = match self.lease {
            None => match self.store.grant(self.settings.lease_ttl).await {
                Ok(lease) => {
                    self.lease = Some(lease);
                    self.published = None;
                    true
                }
                Err(e) => {
                    tracing::debug!(error = %e, "lease grant failed");
                    false
                }
            },
            Some(lease) => match self.store.keep_alive(lease).await {
                Ok(true) => true,
                Ok(false) => {
                    tracing::warn!("this proxy's lease expired; taking a new one");
                    self.lease = None;
                    self.stop_controller();
                    false
                }
                Err(e) => {
                    tracing::debug!(error = %e, "lease keep-alive failed");
                    false
                }
            },
        };
        if renewed {
            let until = sent + self.settings.lease_ttl - self.settings.lease_margin();
            self.valid_until.send_replace(Some(until));
        }
        if !self.lease_valid() {
            self.stop_controller();
        }
        if self.lease_valid() && self.watch.is_none() {
            self.sync().await;
        }
        self.judge_reachability();
        if self.lease_valid() && self.controller.is_none() {
            self.campaign().await;
        }
        self.publish_view().await;
    }

    /// Reads everything under the cluster's root, applies it, and watches
    /// from the next revision on.
    async fn sync(&mut self) {
        let root = self.settings.keys.root().to_owned();
        let snapshot = match self.store.list(&root).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "reading the coordinator store failed");
                return;
            }
        };
        let keys = &self.settings.keys;
        let (topology_key, pause_key, leader_key) = (keys.topology(), keys.pause(), keys.leader());
        let mut paused = false;
        self.leader_seen = None;
        for entry in &snapshot.entries {
            if entry.key == topology_key {
                self.apply_topology(&entry.value);
            } else if entry.key == pause_key {
                paused = true;
                self.apply_pause(Some(&entry.value));
            } else if entry.key == leader_key {
                self.leader_seen = Some(entry.value.clone());
            } else if entry.key.starts_with(&keys.histories()) {
                self.history.record(&entry.key, &entry.value);
            }
        }
        if !paused {
            self.apply_pause(None);
        }
        match self.store.watch(&root, snapshot.revision + 1).await {
            Ok(watch) => self.watch = Some(watch),
            Err(e) => tracing::debug!(error = %e, "watching the coordinator store failed"),
        }
        self.judge_reachability();
    }

    async fn on_event(&mut self, event: WatchEvent) {
        let keys = &self.settings.keys;
        match event {
            WatchEvent::Put(v) if v.key == keys.topology() => self.apply_topology(&v.value),
            WatchEvent::Put(v) if v.key == keys.pause() => self.apply_pause(Some(&v.value)),
            WatchEvent::Delete { key, .. } if key == keys.pause() => self.apply_pause(None),
            WatchEvent::Put(v) if v.key.starts_with(&keys.histories()) => {
                self.history.record(&v.key, &v.value);
                self.judge_reachability();
            }
            WatchEvent::Put(v) if v.key == keys.leader() => {
                self.leader_seen = Some(v.value);
                self.judge_reachability();
            }
            WatchEvent::Delete { key, .. } if key == keys.leader() => {
                self.leader_seen = None;
                self.judge_reachability();
                // The leader is gone: run for it now, not at the next tick.
                if self.lease_valid() && self.controller.is_none() {
                    self.campaign().await;
                }
            }
            _ => {}
        }
    }

    fn apply_topology(&self, json: &str) {
        match serde_json::from_str::<TopologyRecord>(json) {
            Ok(record) => {
                super::apply_record(&self.topology, &record);
            }
            Err(e) => tracing::error!(error = %e, "unreadable topology record in the store"),
        }
    }

    fn apply_pause(&self, json: Option<&str>) {
        let until = json
            .and_then(|j| serde_json::from_str::<PauseRecord>(j).ok())
            .map(|p| {
                // The deadline is wall-clock (shared between hosts); held as an
                // Instant, and never longer than this proxy's own limit.
                let left = Duration::from_millis(p.until_ms.saturating_sub(unix_ms()));
                Instant::now() + left.min(self.settings.switchover_timeout)
            });
        let changed = self.topology.update(|t| t.paused_until = until);
        if changed {
            match until {
                Some(_) => tracing::info!("switchover: holding new transactions"),
                None => tracing::info!("switchover over: transactions flow again"),
            }
        }
    }

    /// Writes are routed only while this proxy can confirm its epoch: its
    /// lease is valid (the CP choice, unless `on_coordinator_loss =
    /// continue`). A broken watch alone does not count: it is re-established
    /// at the next renewal, and the controller does not promote before every
    /// proxy has applied the new epoch or lost its lease.
    fn judge_reachability(&mut self) {
        let reachable = self.lease_valid();
        let refuse =
            !reachable && self.settings.on_coordinator_loss == CoordinatorLoss::RefuseWrites;
        let reason = refuse.then(|| {
            format!(
                "tidepool cannot reach its coordinator store to confirm who the primary is; \
                 writes are refused until it can (on_coordinator_loss = refuse_writes, lease_ttl = {:?})",
                self.settings.lease_ttl
            )
        });
        let was_refusing = self.topology.load().writes_refused.is_some();
        self.topology.update(|t| t.writes_refused = reason.clone());
        if was_refusing != reason.is_some() {
            match &reason {
                Some(_) => tracing::error!("coordinator unreachable: refusing writes"),
                None if was_refusing => {
                    tracing::info!("coordinator reachable again: routing writes")
                }
                None => {}
            }
        }
        if !reachable && self.settings.on_coordinator_loss == CoordinatorLoss::Continue {
            tracing::debug!("coordinator unreachable: writes go on to the last known primary");
        }
        let status = HaStatus {
            leader: self.leader_seen.clone(),
            is_leader: self.controller.is_some(),
            coordinator_reachable: reachable,
            failovers: self.history.failovers,
            switchovers: self.history.switchovers,
            last_failover_ms: self.history.last_failover_ms,
        };
        self.status.send_if_modified(|s| {
            let changed = *s != status;
            *s = status;
            changed
        });
    }

    async fn campaign(&mut self) {
        let Some(lease) = self.lease else { return };
        let key = self.settings.keys.leader();
        match self
            .store
            .create(&key, &self.settings.proxy_id, lease)
            .await
        {
            Ok(Created::Won(create_revision)) => {
                tracing::info!(proxy = %self.settings.proxy_id, "elected HA controller");
                let guard = Guard {
                    key,
                    create_revision,
                };
                let task = controller::spawn(
                    self.store.clone(),
                    self.settings.clone(),
                    self.topology.clone(),
                    guard.clone(),
                    self.valid_until.subscribe(),
                );
                self.controller = Some((guard, task));
                self.leader_seen = Some(self.settings.proxy_id.clone());
            }
            Ok(Created::Held(holder)) => {
                self.leader_seen = Some(holder.value).filter(|v| !v.is_empty())
            }
            Err(e) => tracing::debug!(error = %e, "leader election failed"),
        }
        self.judge_reachability();
    }

    fn stop_controller(&mut self) {
        if let Some((_, task)) = self.controller.take() {
            tracing::warn!("no longer the HA controller");
            task.abort();
            self.judge_reachability();
        }
    }

    /// Publishes this proxy's view when it changed (under its lease, so it
    /// vanishes with the proxy).
    async fn publish_view(&mut self) {
        let Some(lease) = self.lease.filter(|_| self.lease_valid()) else {
            return;
        };
        let record = view_of(&self.topology.load(), self.busy.load(Ordering::Relaxed));
        if self.published.as_ref() == Some(&record) {
            return;
        }
        let key = self.settings.keys.member(&self.settings.proxy_id);
        let json = serde_json::to_string(&record).expect("serializable");
        match self.store.put(&key, &json, Some(lease)).await {
            Ok(()) => self.published = Some(record),
            Err(e) => tracing::debug!(error = %e, "publishing this proxy's view failed"),
        }
    }
}

fn view_of(t: &Topology, busy: u64) -> MemberRecord {
    let paused = t.is_paused();
    MemberRecord {
        epoch: t.epoch.0,
        sees_primary: t.epoch_primary.is_some_and(|id| {
            let n = t.node(id);
            n.health == Health::Up && n.role == Role::Primary
        }),
        paused,
        // Only worth a store write while someone waits for it to reach 0.
        busy: if paused { busy } else { 0 },
    }
}

async fn next_event(watch: &mut Option<Watch>) -> Option<WatchEvent> {
    match watch {
        Some(w) => w.recv().await,
        None => std::future::pending().await,
    }
}
