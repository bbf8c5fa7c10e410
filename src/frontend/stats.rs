//! Per-database totals for the console's SHOW STATS, in PgBouncer's columns:
//! Prometheus has the same events by node and route, but PgBouncer users'
//! scripts and dashboards read them by database.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One database's counters; sessions hold it and add with relaxed atomics.
#[derive(Default)]
pub struct DatabaseStats {
    xacts: AtomicU64,
    queries: AtomicU64,
    received: AtomicU64,
    sent: AtomicU64,
    xact_us: AtomicU64,
    wait_us: AtomicU64,
}

impl DatabaseStats {
    pub fn transaction_done(&self, took: Duration) {
        self.xacts.fetch_add(1, Ordering::Relaxed);
        self.xact_us.fetch_add(micros(took), Ordering::Relaxed);
    }

    pub fn query(&self) {
        self.queries.fetch_add(1, Ordering::Relaxed);
    }

    pub fn waited(&self, took: Duration) {
        self.wait_us.fetch_add(micros(took), Ordering::Relaxed);
    }

    pub fn received(&self, bytes: usize) {
        self.received.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn sent(&self, bytes: usize) {
        self.sent.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

pub struct Stats {
    started: Instant,
    databases: Mutex<HashMap<String, Arc<DatabaseStats>>>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: Instant::now(),
            databases: Mutex::default(),
        }
    }
}

/// One SHOW STATS row. PgBouncer's averages are over its last stats period;
/// these are over the proxy's lifetime (rates per second, times per
/// transaction), which a scraper differencing the totals can refine.
pub struct StatsRow {
    pub database: String,
    pub xacts: u64,
    pub queries: u64,
    pub received: u64,
    pub sent: u64,
    pub xact_us: u64,
    pub wait_us: u64,
    pub uptime: Duration,
}

impl Stats {
    pub fn database(&self, name: &str) -> Arc<DatabaseStats> {
        self.databases
            .lock()
            .expect("stats lock")
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    pub fn rows(&self) -> Vec<StatsRow> {
        let uptime = self.started.elapsed();
        let mut rows: Vec<StatsRow> = self
            .databases
            .lock()
            .expect("stats lock")
            .iter()
            .map(|(name, s)| StatsRow {
                database: name.clone(),
                xacts: s.xacts.load(Ordering::Relaxed),
                queries: s.queries.load(Ordering::Relaxed),
                received: s.received.load(Ordering::Relaxed),
                sent: s.sent.load(Ordering::Relaxed),
                xact_us: s.xact_us.load(Ordering::Relaxed),
                wait_us: s.wait_us.load(Ordering::Relaxed),
                uptime,
            })
            .collect();
        rows.sort_by(|a, b| a.database.cmp(&b.database));
        rows
    }
}
