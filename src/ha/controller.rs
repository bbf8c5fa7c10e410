//! The controller: runs on the one member holding the leader key, and only
//! while its lease is valid. Every write it makes is guarded by the leader
//! key's create revision, so a deposed controller's late write fails.
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::node_sql::{NodeSql, run_hook};
use super::store::{Guard, Store};
use super::{
    EventKind, HaError, HaSettings, HistoryEntry, MemberRecord, PauseRecord, SwitchoverRequest,
    TopologyRecord, apply_record, record_of, unix_ms,
};
use crate::topology::{Epoch, Health, NodeId, Role, SharedTopology, Topology};

/// The controller looks at least this often (switchover requests, member votes).
const MAX_TICK: Duration = Duration::from_millis(200);
/// SQL on a node the controller acts on must answer within this.
const NODE_TIMEOUT: Duration = Duration::from_secs(2);

pub fn spawn(
    store: Store,
    settings: Arc<HaSettings>,
    topology: SharedTopology,
    guard: Guard,
    valid_until: watch::Receiver<Option<Instant>>,
) -> JoinHandle<()> {
    let controller = Controller {
        store,
        settings,
        topology,
        guard,
        valid_until,
        down_since: None,
        warned: None,
        hooked: HashSet::new(),
    };
    tokio::spawn(controller.run())
}

struct Controller {
    store: Store,
    settings: Arc<HaSettings>,
    topology: SharedTopology,
    guard: Guard,
    valid_until: watch::Receiver<Option<Instant>>,
    /// Since when a quorum of members has seen the primary down.
    down_since: Option<Instant>,
    /// The last reason a failover could not go ahead, logged once.
    warned: Option<String>,
    /// Returned old primaries already fenced over SQL and handed to the
    /// rejoin hook in this epoch.
    hooked: HashSet<(NodeId, Epoch)>,
}

#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error(transparent)]
    Ha(#[from] HaError),
    #[error("no longer the leader")]
    Deposed,
}

impl From<super::store::StoreError> for StepError {
    fn from(e: super::store::StoreError) -> Self {
        StepError::Ha(e.into())
    }
}

impl Controller {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(self.settings.poll_interval.min(MAX_TICK));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Whatever the monitor publishes may call for a decision.
            let changed = self.topology.changed();
            tokio::select! {
                _ = tick.tick() => {}
                _ = changed => {}
            }
            if !self.leading() {
                continue;
            }
            if let Err(e) = self.step().await {
                tracing::warn!(error = %e, "HA controller step failed");
            }
        }
    }

    fn leading(&self) -> bool {
        super::lease_holds(*self.valid_until.borrow())
    }

    async fn step(&mut self) -> Result<(), StepError> {
        let t = self.topology.load_full();
        if let Some(request) = self.take_switchover_request().await? {
            return self.switchover(request).await;
        }
        let Some(primary) = t.epoch_primary else {
            return self.without_primary(&t).await;
        };
        let p = t.node(primary);
        if p.health == Health::Up && p.role == Role::Primary {
            self.down_since = None;
            self.warned = None;
            return self.police(&t).await;
        }
        // The primary is gone or in recovery. A promotion made meanwhile
        // outside tidepool is taken as it is; else a quorum decides.
        if let [claimant] = claimants(&t)[..] {
            return self
                .publish_new_primary(
                    &t,
                    claimant,
                    EventKind::Adopt,
                    Instant::now(),
                    "promoted outside tidepool".into(),
                    None,
                )
                .await;
        }
        if !self.quorum_sees_primary_down(&t).await? {
            self.down_since = None;
            return Ok(());
        }
        let since = *self.down_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= self.settings.failover_timeout {
            self.failover(&t, Some(primary), since).await?;
        }
        Ok(())
    }

    /// No primary in the current epoch: the first start, or a failover that
    /// stopped between fencing and promotion.
    async fn without_primary(&mut self, t: &Topology) -> Result<(), StepError> {
        match claimants(t)[..] {
            [one] => {
                let kind = match t.epoch {
                    Epoch(0) => EventKind::Bootstrap,
                    _ => EventKind::Adopt,
                };
                self.publish_new_primary(
                    t,
                    one,
                    kind,
                    Instant::now(),
                    "the one node out of recovery".into(),
                    None,
                )
                .await
            }
            [] if t.epoch > Epoch(0) => {
                let since = *self.down_since.get_or_insert_with(Instant::now);
                self.failover(t, None, since).await
            }
            _ => Ok(()),
        }
    }

    /// With a healthy primary: a fenced former primary back out of recovery
    /// is fenced over SQL and handed to the rejoin hook (once per epoch);
    /// one back as a replica is unfenced. Another node out of recovery gets
    /// no traffic (only the epoch's primary does) and is not fenced here: it
    /// may be a promotion the operator made, adopted if the primary dies.
    async fn police(&mut self, t: &Topology) -> Result<(), StepError> {
        for rogue in t.rogue_primaries() {
            if !self.hooked.insert((rogue.id, t.epoch)) {
                continue;
            }
            if t.is_fenced(rogue.id) {
                tracing::warn!(node = %rogue.id, addr = %rogue.addr, "fenced former primary is back out of recovery: fencing it over SQL");
                self.fence_and_rejoin(t, rogue.addr).await;
            } else {
                tracing::error!(node = %rogue.id, addr = %rogue.addr, "a second node out of recovery, without the epoch: it gets no traffic");
            }
        }
        let mut fenced = t.fenced.clone();
        fenced.retain(|&id| {
            let n = t.node(id);
            let rejoined = n.health == Health::Up && n.role == Role::Replica;
            if rejoined {
                tracing::info!(node = %id, addr = %n.addr, "fenced node is a replica again: unfenced");
            }
            !rejoined
        });
        if fenced != t.fenced {
            let mut next = record_of(t);
            next.epoch += 1;
            next.fenced = addrs(t, &fenced);
            self.publish(&next).await?;
        }
        Ok(())
    }

    async fn fence_and_rejoin(&self, t: &Topology, addr: SocketAddr) {
        if let Ok(node) = NodeSql::connect(addr, &self.settings.credentials, NODE_TIMEOUT).await
            && let Err(e) = node.fence().await
        {
            tracing::warn!(%addr, error = %e, "SQL fencing failed");
        }
        let (Some(hook), Some(primary)) = (&self.settings.rejoin_command, t.primary()) else {
            return;
        };
        let values = [
            ("host", addr.ip().to_string()),
            ("port", addr.port().to_string()),
            ("primary_host", primary.addr.ip().to_string()),
            ("primary_port", primary.addr.port().to_string()),
        ];
        let hook = hook.clone();
        // A rejoin (pg_rewind, restart) takes a while: not on the controller's path.
        tokio::spawn(async move {
            if run_hook(&hook, &values, Duration::from_secs(600)).await {
                tracing::info!(%addr, "rejoin hook done");
            }
        });
    }

    /// The replicas' receive and replay positions asked now rather than
    /// taken from the last poll: the commits acknowledged since then decide
    /// which replica may be promoted without losing them.
    async fn freshen(&self, t: &Topology) -> Topology {
        let mut fresh = t.clone();
        for n in fresh
            .nodes
            .iter_mut()
            .filter(|n| n.role == Role::Replica && n.health == Health::Up)
        {
            let asked = async {
                let sql =
                    NodeSql::connect(n.addr, &self.settings.credentials, NODE_TIMEOUT).await?;
                sql.positions().await
            };
            match asked.await {
                Ok((receive, replay)) => {
                    n.receive_lsn = receive;
                    n.replay_lsn = replay;
                }
                Err(e) => {
                    tracing::warn!(addr = %n.addr, error = %e, "replica did not answer before failover");
                    n.health = Health::Down;
                }
            }
        }
        fresh
    }

    async fn members(&self) -> Result<Vec<(String, MemberRecord)>, StepError> {
        let prefix = self.settings.keys.members();
        let snapshot = self.store.list(&prefix).await?;
        Ok(snapshot
            .entries
            .into_iter()
            .filter_map(|v| {
                let record = serde_json::from_str(&v.value).ok()?;
                Some((v.key[prefix.len()..].to_owned(), record))
            })
            .collect())
    }

    /// A majority of the live members that have applied this epoch see its
    /// primary down: one proxy cut off from the primary cannot fail it over.
    async fn quorum_sees_primary_down(&self, t: &Topology) -> Result<bool, StepError> {
        let members = self.members().await?;
        let voters: Vec<&MemberRecord> = members
            .iter()
            .map(|(_, m)| m)
            .filter(|m| m.epoch == t.epoch.0)
            .collect();
        if voters.is_empty() {
            // Not even this proxy's own view is published yet: wait for it.
            return Ok(false);
        }
        let down = voters.iter().filter(|m| !m.sees_primary).count();
        Ok(down * 2 > voters.len())
    }

    /// The replica to promote: `to` if given, else the one with the most
    /// WAL; never a fenced or `nofailover` node, never one that would lose
    /// more than `max_lag_on_failover` bytes of the old primary's WAL.
    fn candidate(
        &self,
        t: &Topology,
        old: Option<NodeId>,
        to: Option<SocketAddr>,
    ) -> Result<NodeId, String> {
        let eligible: Vec<_> = t
            .nodes
            .iter()
            .filter(|n| n.health == Health::Up && n.role == Role::Replica)
            .filter(|n| Some(n.id) != old && !t.is_fenced(n.id))
            .filter(|n| !self.settings.nofailover.contains(&n.addr))
            .collect();
        let best = match to {
            Some(addr) => eligible
                .iter()
                .find(|n| n.addr == addr)
                .ok_or_else(|| format!("{addr} is not a healthy replica that may be promoted"))?,
            // Received WAL is replayed at promotion, so what a replica has
            // received is what it will have; with synchronous commit, some
            // replica has received every acknowledged commit.
            None => eligible
                .iter()
                .max_by_key(|n| (n.receive_lsn.max(n.replay_lsn), n.replay_lsn))
                .ok_or("no healthy replica that may be promoted")?,
        };
        let last = old.and_then(|id| t.node(id).current_lsn);
        let has = best.receive_lsn.max(best.replay_lsn);
        if let (Some(last), Some(has)) = (last, has) {
            let behind = last.0.saturating_sub(has.0);
            if behind > self.settings.max_lag_on_failover {
                return Err(format!(
                    "{} is {behind} bytes behind the old primary (max_lag_on_failover = {})",
                    best.addr, self.settings.max_lag_on_failover
                ));
            }
        }
        Ok(best.id)
    }

    async fn failover(
        &mut self,
        t: &Topology,
        old: Option<NodeId>,
        since: Instant,
    ) -> Result<(), StepError> {
        let t = &self.freshen(t).await;
        let candidate = match self.candidate(t, old, None) {
            Ok(c) => c,
            Err(why) => {
                if self.warned.as_deref() != Some(why.as_str()) {
                    tracing::error!(reason = %why, "primary down but no failover");
                    self.warned = Some(why);
                }
                return Ok(());
            }
        };
        let decided = Instant::now();
        let from = old.map(|id| t.node(id).addr);
        tracing::warn!(from = ?from, to = %t.node(candidate).addr, down_for = ?since.elapsed(), "failing over");
        // 1. A new epoch without a primary: every proxy stops writing to the old one.
        let mut fenced = t.fenced.clone();
        fenced.extend(old.filter(|o| !fenced.contains(o)));
        let fencing = TopologyRecord {
            epoch: t.epoch.0 + 1,
            primary: None,
            fenced: addrs(t, &fenced),
        };
        self.publish(&fencing).await?;
        // 2. Fence the old primary itself, or wait out the other proxies' leases.
        if let Some(addr) = from {
            self.fence_unreachable(addr).await?;
        }
        // 3. Promote, and point the other replicas at the new primary.
        let new = t.node(candidate).addr;
        let promoted = async {
            let node = NodeSql::connect(new, &self.settings.credentials, NODE_TIMEOUT).await?;
            node.promote().await?;
            node.unfence().await
        };
        if let Err(e) = promoted.await {
            tracing::error!(error = %e, "promotion failed; trying again next round");
            return Ok(());
        }
        self.repoint_replicas(t, new, &[Some(candidate), old]).await;
        // 4. The new primary, in a new epoch.
        let mut t_now = Topology::clone(&self.topology.load());
        t_now.fenced = fenced;
        // For the history: the primary this failover replaces.
        t_now.epoch_primary = old;
        let detail = format!("primary down for {:?}", since.elapsed());
        self.publish_new_primary(
            &t_now,
            candidate,
            EventKind::Failover,
            decided,
            detail,
            None,
        )
        .await?;
        self.down_since = None;
        Ok(())
    }

    /// The old primary is fenced over SQL if it answers; else by
    /// `fence_command`; else the controller waits until every other proxy
    /// has either applied the new epoch or lost its lease (and with it,
    /// under `refuse_writes`, its right to write).
    async fn fence_unreachable(&self, addr: SocketAddr) -> Result<(), StepError> {
        match NodeSql::connect(addr, &self.settings.credentials, Duration::from_millis(500)).await {
            Ok(node) => match node.fence().await {
                Ok(()) => return Ok(()),
                Err(e) => tracing::warn!(%addr, error = %e, "SQL fencing failed"),
            },
            Err(e) => tracing::info!(%addr, error = %e, "old primary unreachable for SQL fencing"),
        }
        if let Some(hook) = &self.settings.fence_command {
            let values = [
                ("host", addr.ip().to_string()),
                ("port", addr.port().to_string()),
            ];
            if run_hook(hook, &values, Duration::from_secs(30)).await {
                tracing::info!(%addr, "fence command succeeded");
                return Ok(());
            }
        }
        let epoch = self.topology.load().epoch.0;
        let deadline = Instant::now() + self.settings.lease_ttl + self.settings.lease_margin();
        while Instant::now() < deadline {
            let members = self.members().await?;
            let lagging = members
                .iter()
                .filter(|(id, m)| *id != self.settings.proxy_id && m.epoch < epoch)
                .count();
            if lagging == 0 {
                return Ok(());
            }
            tokio::time::sleep(self.settings.poll_interval).await;
        }
        Ok(())
    }

    async fn repoint_replicas(&self, t: &Topology, new: SocketAddr, skip: &[Option<NodeId>]) {
        for n in t
            .nodes
            .iter()
            .filter(|n| n.role == Role::Replica && !skip.contains(&Some(n.id)))
        {
            let follow = async {
                NodeSql::connect(n.addr, &self.settings.credentials, NODE_TIMEOUT)
                    .await?
                    .follow(new)
                    .await
            };
            if let Err(e) = follow.await {
                tracing::warn!(addr = %n.addr, error = %e, "could not point the replica at the new primary");
            }
        }
    }

    async fn publish_new_primary(
        &mut self,
        t: &Topology,
        primary: NodeId,
        kind: EventKind,
        started: Instant,
        detail: String,
        request: Option<String>,
    ) -> Result<(), StepError> {
        let from = t.epoch_primary.map(|id| t.node(id).addr.to_string());
        let mut fenced = t.fenced.clone();
        fenced.retain(|&id| id != primary);
        let record = TopologyRecord {
            epoch: t.epoch.0 + 1,
            primary: Some(t.node(primary).addr.to_string()),
            fenced: addrs(t, &fenced),
        };
        self.publish(&record).await?;
        let entry = HistoryEntry {
            epoch: record.epoch,
            kind,
            from,
            to: record.primary.clone(),
            at_ms: unix_ms(),
            took_ms: started.elapsed().as_millis() as u64,
            detail,
            request,
        };
        tracing::warn!(kind = ?entry.kind, epoch = entry.epoch, from = ?entry.from, to = ?entry.to, took_ms = entry.took_ms, "new primary published");
        self.record_history(&entry).await
    }

    async fn record_history(&self, entry: &HistoryEntry) -> Result<(), StepError> {
        let key = self.settings.keys.history(Epoch(entry.epoch));
        let json = serde_json::to_string(entry).expect("serializable");
        if !self.store.put_guarded(&self.guard, &key, &json).await? {
            return Err(StepError::Deposed);
        }
        Ok(())
    }

    async fn publish(&self, record: &TopologyRecord) -> Result<(), StepError> {
        if !self.leading() {
            return Err(StepError::Deposed);
        }
        let json = serde_json::to_string(record).expect("serializable");
        if !self
            .store
            .put_guarded(&self.guard, &self.settings.keys.topology(), &json)
            .await?
        {
            return Err(StepError::Deposed);
        }
        apply_record(&self.topology, record);
        Ok(())
    }

    async fn take_switchover_request(&self) -> Result<Option<SwitchoverRequest>, StepError> {
        let key = self.settings.keys.switchover();
        let Some(found) = self.store.get(&key).await? else {
            return Ok(None);
        };
        if !self.store.delete_guarded(&self.guard, &key).await? {
            return Err(StepError::Deposed);
        }
        Ok(serde_json::from_str(&found.value).ok())
    }

    /// A planned switchover: hold new transactions everywhere, let running
    /// ones finish, make the old primary read-only, wait for the candidate
    /// to replay its last WAL, promote, publish, resume.
    async fn switchover(&mut self, request: SwitchoverRequest) -> Result<(), StepError> {
        let started = Instant::now();
        let t = self.topology.load_full();
        let outcome = self.try_switchover(&t, &request, started).await;
        let pause = self.settings.keys.pause();
        self.store.delete_guarded(&self.guard, &pause).await?;
        if let Err(why) = outcome {
            tracing::error!(reason = %why, "switchover failed");
            let entry = HistoryEntry {
                epoch: self.topology.load().epoch.0,
                kind: EventKind::SwitchoverFailed,
                from: t.epoch_primary.map(|id| t.node(id).addr.to_string()),
                to: request.to.clone(),
                at_ms: unix_ms(),
                took_ms: started.elapsed().as_millis() as u64,
                detail: why,
                request: Some(request.id),
            };
            // Under its own key: a failure makes no epoch.
            let key = format!(
                "{}-failed-{}",
                self.settings.keys.history(Epoch(entry.epoch)),
                entry.at_ms
            );
            let json = serde_json::to_string(&entry).expect("serializable");
            self.store.put_guarded(&self.guard, &key, &json).await?;
        }
        Ok(())
    }

    async fn try_switchover(
        &mut self,
        t: &Topology,
        request: &SwitchoverRequest,
        started: Instant,
    ) -> Result<(), String> {
        let old = t
            .primary()
            .ok_or("there is no healthy primary to switch over from")?
            .id;
        let to = match &request.to {
            Some(addr) => Some(
                addr.parse::<SocketAddr>()
                    .map_err(|e| format!("{addr}: {e}"))?,
            ),
            None => None,
        };
        let candidate = self.candidate(t, Some(old), to)?;
        let (old_addr, new_addr) = (t.node(old).addr, t.node(candidate).addr);
        tracing::warn!(from = %old_addr, to = %new_addr, "switchover: pausing");
        let limit = self.settings.switchover_timeout;
        let json = PauseRecord::json_for(limit);
        let paused = self
            .store
            .put_guarded(&self.guard, &self.settings.keys.pause(), &json)
            .await;
        if !matches!(paused, Ok(true)) {
            return Err("could not set the pause".into());
        }
        self.wait_for_drain(t.epoch, started + limit / 2).await;
        let sql = |addr| NodeSql::connect(addr, &self.settings.credentials, NODE_TIMEOUT);
        let old_sql = sql(old_addr).await.map_err(|e| e.to_string())?;
        old_sql.fence().await.map_err(|e| e.to_string())?;
        let promoted = async {
            let last = old_sql.current_lsn().await?;
            let new_sql = sql(new_addr).await?;
            let deadline = started + limit;
            while new_sql.replay_lsn().await? < last {
                if Instant::now() > deadline {
                    return Ok::<_, super::node_sql::NodeError>(Err(format!(
                        "{new_addr} did not replay up to {last} in time"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            new_sql.promote().await?;
            new_sql.unfence().await?;
            Ok(Ok(last))
        };
        let last = match promoted.await {
            Ok(Ok(last)) => last,
            Ok(Err(why)) => {
                let _ = old_sql.unfence().await;
                return Err(why);
            }
            Err(e) => {
                let _ = old_sql.unfence().await;
                return Err(e.to_string());
            }
        };
        self.repoint_replicas(t, new_addr, &[Some(candidate), Some(old)])
            .await;
        let mut next = Topology::clone(&self.topology.load());
        next.fenced.retain(|&id| id != old);
        next.fenced.push(old);
        let detail = format!("old primary read-only at {last}");
        self.publish_new_primary(
            &next,
            candidate,
            EventKind::Switchover,
            started,
            detail,
            Some(request.id.clone()),
        )
        .await
        .map_err(|e| e.to_string())?;
        // The old primary, read-only and fenced, goes to the rejoin hook
        // from `police` on the next round.
        Ok(())
    }

    /// Until every live member on this epoch holds new transactions and has
    /// none running, or `deadline` (the stragglers are then aborted by fencing).
    async fn wait_for_drain(&self, epoch: Epoch, deadline: Instant) {
        while Instant::now() < deadline {
            match self.members().await {
                Ok(members)
                    if members
                        .iter()
                        .all(|(_, m)| m.epoch != epoch.0 || (m.paused && m.busy == 0)) =>
                {
                    return;
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "reading members failed"),
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tracing::warn!("switchover: transactions still running at the deadline; aborting them");
    }
}

/// Up, out of recovery, not fenced: nodes that could be the primary.
fn claimants(t: &Topology) -> Vec<NodeId> {
    t.nodes
        .iter()
        .filter(|n| n.health == Health::Up && n.role == Role::Primary && !t.is_fenced(n.id))
        .map(|n| n.id)
        .collect()
}

fn addrs(t: &Topology, ids: &[NodeId]) -> Vec<String> {
    ids.iter().map(|&id| t.node(id).addr.to_string()).collect()
}
