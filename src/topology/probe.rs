//! One poll of one node: a kept-open admin connection and a single query
//! that returns its role and WAL positions in one round trip.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio::time::error::Elapsed;
use tokio_postgres::{Client, SimpleQueryMessage, SimpleQueryRow};

use super::{Lsn, Role};
use crate::config::Secret;
use crate::server_tls::ServerTls;

/// Everything the monitor needs from a node, evaluated in one statement so
/// the values are consistent with each other:
/// - `pg_is_in_recovery()` once, in a subquery, so the role and the
///   functions that depend on it agree;
/// - `pg_current_wal_lsn()` only on a primary (it raises an error during recovery);
/// - the replay/receive positions and the age of the last replayed commit;
/// - the timeline: on a primary from the name of the WAL file being written
///   (`pg_control_checkpoint()` still shows the old timeline after a
///   promotion until the next checkpoint); on a replica the one its WAL
///   receiver streams, or the last restartpoint's when it is not streaming.
const QUERY: &str = "select r,
    case when r then null else pg_current_wal_lsn() end,
    pg_last_wal_replay_lsn(),
    pg_last_wal_receive_lsn(),
    extract(epoch from clock_timestamp() - pg_last_xact_replay_timestamp()),
    case when r then coalesce((select received_tli from pg_stat_wal_receiver),
                              (select timeline_id from pg_control_checkpoint()))
         else ('x' || left(pg_walfile_name(pg_current_wal_lsn()), 8))::bit(32)::bigint end
  from (select pg_is_in_recovery() as r) s";

/// What a poll saw. Position fields that do not apply to the role are `None`
/// (a promoted node still reports its last replay LSN, which means nothing now).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub role: Role,
    pub current_lsn: Option<Lsn>,
    pub replay_lsn: Option<Lsn>,
    pub receive_lsn: Option<Lsn>,
    /// Replica: its clock now minus the commit time (by the primary's clock)
    /// of the last transaction it replayed.
    pub replay_age: Option<Duration>,
    pub timeline: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("{}", error_text(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// `waited`: how long the poll actually waited. Far past `poll_timeout`,
    /// the proxy's own runtime was too busy to notice in time; near it, the
    /// server did not answer.
    #[error("timed out, no answer after {} ms", .waited.as_millis())]
    Timeout { waited: Duration },
    #[error("still connecting")]
    Connecting,
    #[error("connecting timed out")]
    ConnectTimeout,
    #[error("connect task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("unexpected answer to the poll query: {0}")]
    BadAnswer(String),
}

/// Connection settings shared by every node's probe.
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    pub password: Secret,
    /// Connecting and authenticating may take this long (SCRAM is slow on
    /// purpose, and a loaded host makes it slower).
    pub connect_timeout: Duration,
    /// The same TLS settings as the pools' connections to the nodes.
    pub tls: ServerTls,
}

type Connecting = JoinHandle<Result<Result<Client, tokio_postgres::Error>, Elapsed>>;

enum Connection {
    None,
    /// Runs in its own task so that it can outlive a poll that timed out:
    /// restarting a connect that always takes longer than the poll timeout
    /// would never bring the node back.
    Connecting(Connecting),
    Ready(Client),
}

/// One node's kept-open admin connection.
pub struct Probe {
    addr: SocketAddr,
    connection: Connection,
}

impl Drop for Probe {
    fn drop(&mut self) {
        if let Connection::Connecting(task) = &self.connection {
            task.abort();
        }
    }
}

impl Probe {
    pub fn new(addr: SocketAddr) -> Probe {
        Probe {
            addr,
            connection: Connection::None,
        }
    }

    /// Runs the query within `timeout`, connecting first if needed. A connect
    /// still under way at the deadline goes on for the next poll, and so does
    /// a connection whose answer is late; after any other error the
    /// connection is dropped so the next poll starts afresh.
    pub async fn poll(
        &mut self,
        credentials: &Credentials,
        timeout: Duration,
    ) -> Result<Sample, PollError> {
        let started = Instant::now();
        let result = tokio::time::timeout(timeout, self.poll_inner(credentials))
            .await
            .unwrap_or_else(|_| {
                let waited = started.elapsed();
                Err(PollError::Timeout { waited })
            });
        match result {
            Err(PollError::Timeout { .. })
                if matches!(self.connection, Connection::Connecting(_)) =>
            {
                Err(PollError::Connecting)
            }
            // A slow answer is no reason to log in again: a new backend and
            // a SCRAM exchange are the dearest thing to ask of a loaded
            // server, and under a CPU-bound benchmark the reconnects took
            // longer than the polls, until the primary was marked down
            // (57P03 for every writer) and once even failed over. The late
            // answer is dropped; a server that stays silent still fails poll
            // after poll.
            Err(e @ PollError::Timeout { .. })
                if matches!(self.connection, Connection::Ready(_)) =>
            {
                Err(e)
            }
            Err(e) => {
                self.connection = Connection::None;
                Err(e)
            }
            Ok(sample) => Ok(sample),
        }
    }

    async fn poll_inner(&mut self, credentials: &Credentials) -> Result<Sample, PollError> {
        self.connect(credentials).await?;
        let Connection::Ready(client) = &self.connection else {
            return Err(PollError::Connecting);
        };
        let messages = client.simple_query(QUERY).await?;
        let row = messages
            .iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(row) => Some(row),
                _ => None,
            })
            .ok_or_else(|| PollError::BadAnswer("no row".into()))?;
        parse(row)
    }

    /// Makes the connection `Ready`, starting a connect task if there is
    /// none. Cancel-safe: dropped while waiting, the task stays in place.
    async fn connect(&mut self, credentials: &Credentials) -> Result<(), PollError> {
        if matches!(&self.connection, Connection::Ready(c) if c.is_closed()) {
            self.connection = Connection::None;
        }
        if let Connection::None = self.connection {
            let (addr, credentials) = (self.addr, credentials.clone());
            let limit = credentials.connect_timeout;
            let connect = async move { open(addr, credentials, "tidepool-monitor").await };
            let task = tokio::spawn(tokio::time::timeout(limit, connect));
            self.connection = Connection::Connecting(task);
        }
        if let Connection::Connecting(task) = &mut self.connection {
            let connected = task.await;
            self.connection = Connection::None;
            let client = connected?.map_err(|_| PollError::ConnectTimeout)??;
            self.connection = Connection::Ready(client);
        }
        Ok(())
    }
}

/// An admin connection to `addr`, named `application_name` in pg_stat_activity.
pub(crate) async fn open(
    addr: SocketAddr,
    credentials: Credentials,
    application_name: &str,
) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::Config::new()
        .host(addr.ip().to_string())
        .port(addr.port())
        .user(&credentials.user)
        .password(credentials.password.expose())
        .dbname("postgres")
        .application_name(application_name)
        .connect_timeout(credentials.connect_timeout)
        .ssl_mode(credentials.tls.postgres_ssl_mode())
        .connect(credentials.tls.postgres_connector())
        .await?;
    tokio::spawn(connection);
    Ok(client)
}

/// tokio-postgres keeps the reason (the failed TLS handshake's, the
/// server's message) in `source()`, out of its `Display`: an operator needs both.
pub(crate) fn error_text(error: &tokio_postgres::Error) -> String {
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(error);
    while let Some(reason) = cause {
        text = format!("{text}: {reason}");
        cause = reason.source();
    }
    text
}

fn parse(row: &SimpleQueryRow) -> Result<Sample, PollError> {
    let role = match row
        .try_get(0)
        .map_err(|e| PollError::BadAnswer(e.to_string()))?
    {
        Some("t") => Role::Replica,
        Some("f") => Role::Primary,
        other => return Err(PollError::BadAnswer(format!("pg_is_in_recovery {other:?}"))),
    };
    let replica = role == Role::Replica;
    // Negative when the replica's clock is behind the primary's: treat as 0.
    let replay_age = field::<f64>(row, 4, "replay age")?
        .map(|secs| Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(Duration::MAX));
    Ok(Sample {
        role,
        current_lsn: field(row, 1, "current LSN")?,
        replay_lsn: field(row, 2, "replay LSN")?.filter(|_| replica),
        receive_lsn: field(row, 3, "receive LSN")?.filter(|_| replica),
        replay_age: replay_age.filter(|_| replica),
        timeline: field(row, 5, "timeline")?,
    })
}

/// Column `index` parsed as a `T`; SQL null is `None`.
fn field<T: FromStr>(
    row: &SimpleQueryRow,
    index: usize,
    what: &str,
) -> Result<Option<T>, PollError> {
    let text = row
        .try_get(index)
        .map_err(|e| PollError::BadAnswer(format!("{what}: {e}")))?;
    text.map(|v| {
        v.parse()
            .map_err(|_| PollError::BadAnswer(format!("{what} {v:?}")))
    })
    .transpose()
}
