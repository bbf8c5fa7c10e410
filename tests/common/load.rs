//! A steady mixed load through one or more proxies, shared by tests/chaos.rs
//! and benches/chaos.rs (which includes this file by path, so it uses
//! nothing else from tests/common): writers insert sequence-numbered rows
//! and record every one the server acknowledged, with the node that took it
//! and when; readers read. Every failure a client sees is counted and timed,
//! so that a fault's cost can be read off afterwards.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

/// The table the writers fill; created once, before the load starts.
pub const TABLE: &str = "create table chaos (seq bigint primary key, port int not null)";
/// Between two operations of one client: a steady load, not a saturating one
/// (the machines this runs on have two cores, shared).
const PACE: Duration = Duration::from_millis(5);
/// After a failed operation or connection attempt.
const BACKOFF: Duration = Duration::from_millis(50);

/// One write the server acknowledged.
#[derive(Debug, Clone, Copy)]
pub struct Ack {
    pub seq: i64,
    /// The node that ran it (`inet_server_port()`).
    pub port: u16,
    pub at: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Write,
    Read,
}

#[derive(Debug, Clone)]
pub struct Failure {
    pub side: Side,
    pub at: Instant,
    pub what: String,
}

/// What the clients saw. The locks are never held across an `.await`.
#[derive(Debug, Default)]
pub struct Tally {
    acks: Mutex<Vec<Ack>>,
    failures: Mutex<Vec<Failure>>,
    reads: Mutex<Vec<Instant>>,
}

impl Tally {
    pub fn acked(&self) -> Vec<i64> {
        self.acks.lock().unwrap().iter().map(|a| a.seq).collect()
    }

    pub fn acks_since(&self, t: Instant) -> usize {
        self.acks
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.at >= t)
            .count()
    }

    /// Writes acknowledged by the node on `port` at or after `t`.
    pub fn acks_on_since(&self, port: u16, t: Instant) -> usize {
        let acks = self.acks.lock().unwrap();
        acks.iter().filter(|a| a.port == port && a.at >= t).count()
    }

    pub fn reads_since(&self, t: Instant) -> usize {
        self.reads
            .lock()
            .unwrap()
            .iter()
            .filter(|&&r| r >= t)
            .count()
    }

    pub fn failures_since(&self, t: Instant, side: Side) -> Vec<Failure> {
        let failures = self.failures.lock().unwrap();
        failures
            .iter()
            .filter(|f| f.at >= t && f.side == side)
            .cloned()
            .collect()
    }

    /// From `since` to the first write acknowledged after the last failure
    /// (of either kind) seen since then; zero when nothing failed, `None`
    /// when no write succeeded after the last failure.
    pub fn recovered_in(&self, since: Instant) -> Option<Duration> {
        let last_failure = {
            let failures = self.failures.lock().unwrap();
            failures
                .iter()
                .filter(|f| f.at >= since)
                .map(|f| f.at)
                .max()
        };
        let Some(last_failure) = last_failure else {
            return Some(Duration::ZERO);
        };
        let acks = self.acks.lock().unwrap();
        let first = acks
            .iter()
            .filter(|a| a.at > last_failure)
            .map(|a| a.at)
            .min();
        first.map(|at| at - since)
    }

    fn fail(&self, side: Side, what: String) {
        let failure = Failure {
            side,
            at: Instant::now(),
            what,
        };
        self.failures.lock().unwrap().push(failure);
    }
}

pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
    pub tally: Arc<Tally>,
}

impl Load {
    /// `writers` and `readers` clients, spread over `urls` in turn.
    pub fn start(urls: &[String], writers: usize, readers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let next = Arc::new(AtomicI64::new(1));
        let mut tasks = Vec::new();
        for i in 0..writers + readers {
            let url = urls[i % urls.len()].clone();
            let (stop, tally, next) = (stop.clone(), tally.clone(), next.clone());
            let side = if i < writers { Side::Write } else { Side::Read };
            tasks.push(tokio::spawn(client_loop(url, side, stop, tally, next)));
        }
        Load { stop, tasks, tally }
    }

    pub async fn stop(self) -> Arc<Tally> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("a load client panicked");
        }
        self.tally
    }
}

async fn client_loop(
    url: String,
    side: Side,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    next: Arc<AtomicI64>,
) {
    let mut client: Option<Client> = None;
    while !stop.load(Ordering::Relaxed) {
        let Some(c) = &client else {
            match connect(&url).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    tally.fail(side, format!("connect: {}", describe(&e)));
                    tokio::time::sleep(BACKOFF).await;
                }
            }
            continue;
        };
        let (sql, seq) = match side {
            Side::Write => {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                let sql =
                    format!("insert into chaos values ({seq}, inet_server_port()) returning port");
                (sql, seq)
            }
            Side::Read => ("select max(seq) from chaos".to_owned(), 0),
        };
        match c.simple_query(&sql).await {
            Ok(messages) => {
                let at = Instant::now();
                match side {
                    Side::Write => {
                        let port = first_value(&messages).and_then(|p| p.parse().ok());
                        let port = port.expect("the insert returns its node's port");
                        tally.acks.lock().unwrap().push(Ack { seq, port, at });
                    }
                    Side::Read => tally.reads.lock().unwrap().push(at),
                }
                tokio::time::sleep(PACE).await;
            }
            Err(e) => {
                tally.fail(side, describe(&e));
                if c.is_closed() {
                    client = None;
                }
                tokio::time::sleep(BACKOFF).await;
            }
        }
    }
}

pub async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

fn first_value(messages: &[SimpleQueryMessage]) -> Option<String> {
    messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
        _ => None,
    })
}

/// SQLSTATE and message, or the client library's own description.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

/// How many of `acked` are missing from the `chaos` table `client` sees.
pub async fn lost(client: &Client, acked: &[i64]) -> i64 {
    let row = client
        .query_one(
            "select count(*) from unnest($1::bigint[]) s where s not in (select seq from chaos)",
            &[&acked],
        )
        .await
        .expect("counting lost writes");
    row.get(0)
}
