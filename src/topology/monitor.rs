//! Polls every node for its role, health and WAL positions, and publishes
//! one new topology snapshot per poll round that changed anything.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use tokio::sync::watch;

use super::lag::{self, Limits};
use super::probe::{Credentials, PollError, Probe, Sample};
use super::{Health, Lsn, NodeId, Role, SharedTopology, Topology};
use crate::config::{Config, Secret};
use crate::server_tls::ServerTls;

#[derive(Clone)]
pub struct MonitorSettings {
    pub admin_user: String,
    pub admin_password: Secret,
    pub poll_interval: Duration,
    /// Answering the poll query must fit in this. A connect that takes
    /// longer goes on in the background (up to `connect_timeout`) while the
    /// polls waiting for it count as failed.
    pub poll_timeout: Duration,
    pub connect_timeout: Duration,
    pub tls: ServerTls,
    /// Consecutive failed polls before a node is marked down: one lost packet
    /// should not take a node out of rotation.
    pub failures_before_down: u32,
    /// The lag limits are read from here at each round: a reload changes them.
    pub live: Arc<ArcSwap<Config>>,
}

impl MonitorSettings {
    pub fn from_config(live: &Arc<ArcSwap<Config>>, tls: &ServerTls) -> MonitorSettings {
        let config = live.load();
        MonitorSettings {
            admin_user: config.cluster.admin_user.clone(),
            admin_password: config.cluster.admin_password.clone(),
            poll_interval: config.cluster.poll_interval,
            poll_timeout: config.cluster.poll_timeout,
            connect_timeout: config.pool.connect_timeout,
            tls: tls.clone(),
            failures_before_down: config.cluster.failures_before_down,
            live: live.clone(),
        }
    }

    fn limits(&self) -> Limits {
        let routing = &self.live.load().routing;
        Limits {
            max_bytes: routing.max_replica_lag_bytes,
            max_time: routing.max_replica_lag,
        }
    }
}

/// One node's probe and its failure streak.
struct NodePoller {
    id: NodeId,
    probe: Probe,
    failures: u32,
}

/// What one round concluded about a node; `None` in `Observation` means down.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    sample: Sample,
    lag: lag::Lag,
}

type Observation = (NodeId, Option<Seen>);

struct Monitor {
    topology: SharedTopology,
    settings: MonitorSettings,
    credentials: Credentials,
    pollers: Vec<NodePoller>,
    primary_history: lag::PrimaryHistory,
}

/// Polls every node once, then keeps polling every `poll_interval` (or at
/// once on `SharedTopology::request_refresh`) until `shutdown` fires.
/// Returns after the first round so that the proxy starts with known roles.
pub async fn start(
    topology: SharedTopology,
    settings: MonitorSettings,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let pollers = topology
        .load()
        .nodes
        .iter()
        .map(|n| NodePoller {
            id: n.id,
            probe: Probe::new(n.addr),
            failures: 0,
        })
        .collect();
    let mut monitor = Monitor {
        credentials: Credentials {
            user: settings.admin_user.clone(),
            password: settings.admin_password.clone(),
            connect_timeout: settings.connect_timeout,
            tls: settings.tls.clone(),
        },
        topology,
        settings,
        pollers,
        primary_history: lag::PrimaryHistory::default(),
    };
    monitor.round(true).await;
    tokio::spawn(async move {
        // The first round has just run: the next is one interval away.
        let interval = monitor.settings.poll_interval;
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let topology = monitor.topology.clone();
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = topology.refresh_requested() => {
                    tracing::debug!("topology refresh requested");
                    ticker.reset();
                }
                _ = shutdown.changed() => return,
            }
            monitor.round(false).await;
        }
    })
}

impl Monitor {
    async fn round(&mut self, first: bool) {
        let started = Instant::now();
        let epoch = self.topology.load().epoch;
        // Nothing is served before the first round: it may wait for the
        // connects to finish, so that the proxy starts with known roles.
        let timeout = match first {
            true => self
                .settings
                .poll_timeout
                .max(self.credentials.connect_timeout),
            false => self.settings.poll_timeout,
        };
        let credentials = &self.credentials;
        let polls = self
            .pollers
            .iter_mut()
            .map(|p| p.probe.poll(credentials, timeout));
        let results = futures_util::future::join_all(polls).await;
        let now = Instant::now();
        let observations = self.observe(results, first, started, now);

        let before = self.topology.load_full();
        let limits = self.settings.limits();
        // A poll made before a new epoch says nothing about its primary,
        // which the controller saw out of recovery after (see `ha::apply_record`).
        let stale = |t: &Topology| (t.epoch != epoch).then_some(t.epoch_primary).flatten();
        if self
            .topology
            .update(|t| apply(t, &observations, limits, stale(t)))
        {
            log_changes(&before, &self.topology.load());
        }
    }

    /// Turns the round's poll results into observations: lag against the
    /// primary's LSN of this same round, failure streaks, down after
    /// `failures_before_down` (at once on the first round: nothing is known yet).
    fn observe(
        &mut self,
        results: Vec<Result<Sample, PollError>>,
        first: bool,
        started: Instant,
        now: Instant,
    ) -> Vec<Observation> {
        let epoch_primary = self.topology.load().epoch_primary;
        let primaries: Vec<(NodeId, Option<Lsn>)> = self
            .pollers
            .iter()
            .zip(&results)
            .filter_map(|(p, r)| {
                r.as_ref()
                    .ok()
                    .filter(|s| s.role == Role::Primary)
                    .map(|s| (p.id, s.current_lsn))
            })
            .collect();
        // Lag is measured against the epoch's primary (a fenced old primary
        // may still be out of recovery); without an epoch, against the one
        // primary, and two give no reference at all.
        let of_epoch = primaries.iter().find(|(p, _)| Some(*p) == epoch_primary);
        let primary_lsn = match (of_epoch, &primaries[..]) {
            (Some((_, lsn)), _) | (None, [(_, lsn)]) => *lsn,
            _ => None,
        };
        if let Some(lsn) = primary_lsn {
            // A replica further behind than this is over the time limit
            // by its replay age anyway, or by the byte limit.
            let horizon = 2 * self.settings.limits().max_time;
            self.primary_history.record(started, lsn, horizon);
        }
        let threshold = self.settings.failures_before_down;
        let mut observations = Vec::with_capacity(results.len());
        for (poller, result) in self.pollers.iter_mut().zip(results) {
            match result {
                Ok(sample) => {
                    poller.failures = 0;
                    let since_replayed = sample
                        .replay_lsn
                        .and_then(|replay| self.primary_history.replayed_at(replay))
                        .map(|t| now - t);
                    let lag = lag::measure(
                        sample.replay_lsn,
                        primary_lsn,
                        sample.replay_age,
                        since_replayed,
                    );
                    observations.push((poller.id, Some(Seen { sample, lag })));
                }
                Err(e) => {
                    poller.failures = poller.failures.saturating_add(1);
                    if first || poller.failures == threshold {
                        tracing::warn!(node = %poller.id, error = %e, "node poll failed");
                    } else {
                        tracing::debug!(node = %poller.id, error = %e, "node poll failed");
                    }
                    if first || poller.failures >= threshold {
                        observations.push((poller.id, None));
                    }
                }
            }
        }
        observations
    }
}

/// Applies a round's observations to a snapshot (the epoch follows in
/// `SharedTopology::update`). Depends only on its arguments: `update` may
/// call it again on a newer snapshot.
fn apply(t: &mut Topology, observations: &[Observation], limits: Limits, skip: Option<NodeId>) {
    for (id, seen) in observations.iter().filter(|(id, _)| Some(*id) != skip) {
        let node = &mut t.nodes[id.0];
        let Some(Seen { sample, lag }) = seen else {
            node.health = Health::Down;
            continue;
        };
        let replica = sample.role == Role::Replica;
        node.health = Health::Up;
        node.role = sample.role;
        node.current_lsn = sample.current_lsn;
        node.replay_lsn = sample.replay_lsn;
        node.receive_lsn = sample.receive_lsn;
        node.timeline = sample.timeline;
        node.lag_bytes = lag.bytes.filter(|_| replica);
        node.lag = lag.time.filter(|_| replica);
        node.lagging = replica && limits.lagging(node.lagging, lag.bytes, lag.time);
    }
}

fn log_changes(before: &Topology, after: &Topology) {
    for (old, new) in before.nodes.iter().zip(&after.nodes) {
        let (id, addr) = (new.id, new.addr);
        if (old.health, old.role) != (new.health, new.role) {
            match new.health {
                Health::Up => {
                    tracing::info!(node = %id, %addr, role = new.role.as_str(), "node up")
                }
                Health::Down => tracing::warn!(node = %id, %addr, "node down"),
            }
        }
        if old.lagging != new.lagging {
            let (bytes, lag) = (new.lag_bytes, new.lag);
            if new.lagging {
                tracing::warn!(node = %id, ?bytes, ?lag, "replica over the lag limit, no reads");
            } else {
                tracing::info!(node = %id, ?bytes, ?lag, "replica within the lag limit again");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::Epoch;

    const LIMITS: Limits = Limits {
        max_bytes: 1000,
        max_time: Duration::from_secs(10),
    };

    fn topology() -> Topology {
        let addrs: Vec<_> = (0..3)
            .map(|i| format!("127.0.0.1:{}", 5000 + i).parse().unwrap())
            .collect();
        Topology::unknown(&addrs)
    }

    fn seen(role: Role, current: u64, replay: u64, primary: u64) -> Option<Seen> {
        let replica = role == Role::Replica;
        let sample = Sample {
            role,
            current_lsn: (!replica).then_some(Lsn(current)),
            replay_lsn: replica.then_some(Lsn(replay)),
            receive_lsn: replica.then_some(Lsn(replay)),
            replay_age: None,
            timeline: Some(1),
        };
        let lag = lag::measure(sample.replay_lsn, Some(Lsn(primary)), None, None);
        Some(Seen { sample, lag })
    }

    #[test]
    fn applies_roles_positions_and_lag() {
        let mut t = topology();
        let round = [
            (NodeId(0), seen(Role::Primary, 5000, 0, 5000)),
            (NodeId(1), seen(Role::Replica, 0, 5000, 5000)),
            (NodeId(2), seen(Role::Replica, 0, 3000, 5000)),
        ];
        apply(&mut t, &round, LIMITS, None);
        assert_eq!(t.nodes[0].role, Role::Primary);
        assert_eq!(t.nodes[0].current_lsn, Some(Lsn(5000)));
        assert_eq!(t.nodes[0].lag_bytes, None);
        assert_eq!(t.nodes[1].lag_bytes, Some(0));
        assert!(t.nodes[1].serves_reads());
        assert_eq!(t.nodes[2].lag_bytes, Some(2000));
        assert!(t.nodes[2].lagging && !t.nodes[2].serves_reads());

        // Down after a failure streak: positions stay as last known.
        apply(&mut t, &[(NodeId(2), None)], LIMITS, None);
        assert_eq!(t.nodes[2].health, Health::Down);
        assert_eq!(t.nodes[2].replay_lsn, Some(Lsn(3000)));
    }

    #[test]
    fn a_promotion_swaps_roles_but_not_the_epoch() {
        let shared = SharedTopology::new(topology());
        let before = [
            (NodeId(0), seen(Role::Primary, 100, 0, 100)),
            (NodeId(1), seen(Role::Replica, 0, 100, 100)),
        ];
        shared.update(|t| apply(t, &before, LIMITS, None));
        // The old primary down and a replica promoted, in the same round:
        // the monitor reports it; only the HA controller moves the epoch.
        let promoted = [
            (NodeId(0), None),
            (NodeId(1), seen(Role::Primary, 200, 0, 200)),
        ];
        shared.update(|t| apply(t, &promoted, LIMITS, None));
        let t = shared.load_full();
        assert_eq!(t.nodes[1].role, Role::Primary);
        assert_eq!(t.nodes[0].health, Health::Down);
        assert_eq!((t.epoch, t.epoch_primary), (Epoch(0), None));
        assert_eq!((t.nodes[1].replay_lsn, t.nodes[1].lag_bytes), (None, None));
        assert!(!shared.update(|t| apply(t, &promoted, LIMITS, None)));
    }
}
