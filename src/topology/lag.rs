//! How far behind a replica is, and whether that keeps it from serving reads.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::Lsn;

/// The `[routing]` lag limits. A replica over either one is marked lagging
/// and gets no reads; it becomes eligible again only once it is at or under
/// half of both. Without that gap, a replica hovering around a limit would
/// flap in and out of rotation with every poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_bytes: u64,
    pub max_time: Duration,
}

impl Limits {
    /// The new `lagging` flag of a replica that was `was_lagging`. An unknown
    /// measure does not count; with neither known (no primary to compare
    /// with this round) the replica keeps its state.
    pub fn lagging(&self, was_lagging: bool, bytes: Option<u64>, time: Option<Duration>) -> bool {
        if bytes.is_none() && time.is_none() {
            return was_lagging;
        }
        if was_lagging {
            let bytes_ok = bytes.is_none_or(|b| b <= self.max_bytes / 2);
            let time_ok = time.is_none_or(|t| t <= self.max_time / 2);
            !(bytes_ok && time_ok)
        } else {
            bytes.is_some_and(|b| b > self.max_bytes) || time.is_some_and(|t| t > self.max_time)
        }
    }
}

/// A replica's lag as measured in one poll round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lag {
    pub bytes: Option<u64>,
    pub time: Option<Duration>,
}

/// Measures a replica against the primary's current LSN of the same round
/// (`None` when that round had no single primary: then nothing is known).
///
/// Lag in time, honestly: PostgreSQL offers
/// `clock_timestamp() - pg_last_xact_replay_timestamp()` (`replay_age`), but
/// on its own it misleads: it is the age of the last replayed *commit*, so
/// while the primary is idle it grows although the replica is fully caught
/// up. Hence:
/// - replay LSN at or past the primary's current LSN: lag 0;
/// - otherwise the smaller of two upper bounds on how stale its reads are:
///   `replay_age` (whatever the replica lacks was committed after that
///   commit; subject to clock skew between the two hosts), and
///   `since_replayed`, the time since the primary was last seen at or
///   before the replica's replay LSN (whatever it lacks was written after
///   that; see `PrimaryHistory`). The second bound keeps the first commit
///   after a long idle period from looking like hours of lag, and WAL
///   written without commits (hint bits, pruning by reads on the primary)
///   from aging a replica that keeps up.
pub fn measure(
    replay_lsn: Option<Lsn>,
    primary_lsn: Option<Lsn>,
    replay_age: Option<Duration>,
    since_replayed: Option<Duration>,
) -> Lag {
    let (Some(replay), Some(primary)) = (replay_lsn, primary_lsn) else {
        return Lag {
            bytes: None,
            time: None,
        };
    };
    let bytes = replay.bytes_behind(primary);
    let time = if bytes == 0 {
        Some(Duration::ZERO)
    } else {
        match (replay_age, since_replayed) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    };
    Lag {
        bytes: Some(bytes),
        time,
    }
}

/// The primary's WAL position at the start of each recent poll round.
///
/// A replica that has replayed up to the primary's position of a round has
/// everything written before that round started: it is at most that old.
/// Comparing only with the current round (caught up or not) made a replica
/// always a few hundred bytes behind a busy primary look as stale as its
/// last replayed commit, 10 s and more when the primary wrote WAL but
/// committed nothing (reads setting hint bits and pruning pages), and drop
/// out of rotation although it replayed within milliseconds.
#[derive(Debug, Default)]
pub struct PrimaryHistory {
    rounds: VecDeque<(Instant, Lsn)>,
}

impl PrimaryHistory {
    /// Records the primary's LSN of the round started at `started`, keeping
    /// rounds back to `horizon` before it (and always the newest).
    pub fn record(&mut self, started: Instant, lsn: Lsn, horizon: Duration) {
        self.rounds.push_back((started, lsn));
        while self.rounds.len() > 1 && self.rounds[0].0 + horizon < started {
            self.rounds.pop_front();
        }
    }

    /// The start of the latest round whose primary position the replica
    /// has replayed, if any is remembered.
    pub fn replayed_at(&self, replay: Lsn) -> Option<Instant> {
        self.rounds
            .iter()
            .rev()
            .find(|(_, lsn)| *lsn <= replay)
            .map(|(started, _)| *started)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_is_as_old_as_the_last_primary_position_it_replayed() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut history = PrimaryHistory::default();
        for (i, lsn) in [100, 200, 300, 400].into_iter().enumerate() {
            history.record(t0 + ms(100 * i as u64), Lsn(lsn), ms(10_000));
        }
        assert_eq!(history.replayed_at(Lsn(400)), Some(t0 + ms(300)));
        assert_eq!(history.replayed_at(Lsn(399)), Some(t0 + ms(200)));
        assert_eq!(history.replayed_at(Lsn(100)), Some(t0));
        assert_eq!(history.replayed_at(Lsn(99)), None);
        // Rounds past the horizon are forgotten.
        history.record(t0 + ms(10_150), Lsn(500), ms(10_000));
        assert_eq!(history.replayed_at(Lsn(299)), None);
        assert_eq!(history.replayed_at(Lsn(300)), Some(t0 + ms(200)));
    }

    const LIMITS: Limits = Limits {
        max_bytes: 1000,
        max_time: Duration::from_secs(10),
    };

    fn secs(s: u64) -> Option<Duration> {
        Some(Duration::from_secs(s))
    }

    #[test]
    fn over_either_limit_is_lagging() {
        assert!(!LIMITS.lagging(false, Some(1000), secs(10)));
        assert!(LIMITS.lagging(false, Some(1001), secs(0)));
        assert!(LIMITS.lagging(false, Some(0), secs(11)));
        assert!(LIMITS.lagging(false, Some(1001), None));
    }

    #[test]
    fn eligible_again_only_under_half_of_both() {
        assert!(LIMITS.lagging(true, Some(900), secs(0)));
        assert!(LIMITS.lagging(true, Some(501), secs(0)));
        assert!(LIMITS.lagging(true, Some(0), secs(6)));
        assert!(!LIMITS.lagging(true, Some(500), secs(5)));
        assert!(!LIMITS.lagging(true, Some(0), None));
    }

    #[test]
    fn unknown_lag_keeps_the_state() {
        assert!(LIMITS.lagging(true, None, None));
        assert!(!LIMITS.lagging(false, None, None));
    }

    #[test]
    fn zero_limits_mean_fully_caught_up() {
        let strict = Limits {
            max_bytes: 0,
            max_time: Duration::ZERO,
        };
        assert!(strict.lagging(false, Some(1), secs(0)));
        assert!(!strict.lagging(true, Some(0), secs(0)));
    }

    #[test]
    fn caught_up_replica_has_no_lag_however_old_its_last_commit() {
        let lag = measure(Some(Lsn(500)), Some(Lsn(500)), secs(3600), None);
        assert_eq!(lag.bytes, Some(0));
        assert_eq!(lag.time, Some(Duration::ZERO));
        // Sampled a moment after the primary: ahead of it, still 0.
        assert_eq!(
            measure(Some(Lsn(600)), Some(Lsn(500)), None, None).bytes,
            Some(0)
        );
    }

    #[test]
    fn behind_replica_takes_the_tighter_bound() {
        let lag = measure(Some(Lsn(100)), Some(Lsn(500)), secs(3600), secs(1));
        assert_eq!(lag.bytes, Some(400));
        assert_eq!(lag.time, secs(1));
        let lag = measure(Some(Lsn(100)), Some(Lsn(500)), secs(2), secs(30));
        assert_eq!(lag.time, secs(2));
        assert_eq!(
            measure(Some(Lsn(1)), Some(Lsn(2)), None, secs(3)).time,
            secs(3)
        );
        assert_eq!(measure(Some(Lsn(1)), Some(Lsn(2)), None, None).time, None);
    }

    #[test]
    fn without_a_primary_nothing_is_known() {
        let lag = measure(Some(Lsn(100)), None, secs(1), secs(1));
        assert_eq!((lag.bytes, lag.time), (None, None));
    }
}
