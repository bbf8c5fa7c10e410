//! One authenticated connection to a PostgreSQL server.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use lru::LruCache;
use postgres_protocol::authentication::sasl::{
    ChannelBinding, SCRAM_SHA_256, SCRAM_SHA_256_PLUS, ScramSha256,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::lsn_query::{LsnQuery, REPLAY_LSN};
use super::stream::ServerStream;
use crate::config::{Secret, ServerSslMode};
use crate::metrics::Metrics;
use crate::protocol::backend::{
    self, Auth, BackendKey, ErrorFields, TxStatus, decode_parameter_status,
};
use crate::protocol::{Frame, ProtocolError, frame, frontend, startup};
use crate::server_tls::ServerTls;
use crate::topology::{Lsn, NodeId};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("timed out")]
    Timeout,
    #[error("protocol error from server: {0}")]
    Protocol(#[from] ProtocolError),
    /// The server said no (bad database, bad password, too many connections):
    /// the client should see exactly what the server said.
    #[error("{}", .0.message)]
    Rejected(ErrorFields),
    #[error("server asked for unsupported authentication ({0})")]
    UnsupportedAuth(String),
    #[error("server closed the connection")]
    Closed,
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("server does not support TLS, and sslmode is {}", .0.as_str())]
    TlsRefused(ServerSslMode),
}

/// How a server connection went silent, for a client's error when the
/// server said nothing itself (a killed backend sends no FATAL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    Closed,
    Failed(std::io::ErrorKind),
}

impl Loss {
    /// What a read from the server says of the connection: `None` when it
    /// brought bytes.
    pub fn of_read(read: &std::io::Result<usize>) -> Option<Loss> {
        match read {
            Ok(0) => Some(Loss::Closed),
            Ok(_) => None,
            Err(e) => Some(Loss::Failed(e.kind())),
        }
    }
}

impl std::fmt::Display for Loss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Loss::Closed => f.write_str("closed by the server without a message"),
            Loss::Failed(kind) => write!(f, "{kind}"),
        }
    }
}

/// Why a node refused a connection that another node may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// No answer, or starting up, shutting down or in crash recovery
    /// (57P01-57P03).
    Down,
    /// Out of connection slots (53300).
    Full,
}

impl ServerError {
    /// `None` when the login itself is refused (bad password, unknown
    /// database): every node would refuse it alike.
    pub fn unavailable(&self) -> Option<Unavailable> {
        match self {
            ServerError::Rejected(fields) => match fields.code.as_str() {
                "57P01" | "57P02" | "57P03" => Some(Unavailable::Down),
                "53300" => Some(Unavailable::Full),
                _ => None,
            },
            _ => Some(Unavailable::Down),
        }
    }
}

/// What SCRAM binds the exchange to, so that a man in the middle of a TLS
/// connection whose certificate was not checked (sslmode prefer, require)
/// cannot relay the authentication.
#[derive(Debug, PartialEq, Eq)]
enum Binding {
    /// Plain TCP, or a certificate whose hash cannot be bound to: "n".
    None,
    /// TLS, and the server did not offer binding: "y", so that a server that
    /// does support it sees the downgrade and refuses.
    NotOffered,
    /// SCRAM-SHA-256-PLUS over the certificate's end-point hash.
    EndPoint(Vec<u8>),
}

impl From<Binding> for ChannelBinding {
    fn from(binding: Binding) -> ChannelBinding {
        match binding {
            Binding::None => ChannelBinding::unsupported(),
            Binding::NotOffered => ChannelBinding::unrequested(),
            Binding::EndPoint(hash) => ChannelBinding::tls_server_end_point(hash),
        }
    }
}

/// The SASL mechanism and channel binding to use, as libpq chooses them.
fn scram_binding(
    offered: &[&[u8]],
    tls: bool,
    end_point: Option<Vec<u8>>,
) -> Result<(&'static str, Binding), ServerError> {
    let has = |m: &str| offered.contains(&m.as_bytes());
    let choice = match (has(SCRAM_SHA_256_PLUS), end_point) {
        (true, Some(hash)) => return Ok((SCRAM_SHA_256_PLUS, Binding::EndPoint(hash))),
        (true, None) => Binding::None,
        (false, _) if tls => Binding::NotOffered,
        (false, _) => Binding::None,
    };
    match has(SCRAM_SHA_256) {
        true => Ok((SCRAM_SHA_256, choice)),
        false => Err(ServerError::UnsupportedAuth(
            "SASL without SCRAM-SHA-256".into(),
        )),
    }
}

/// Who a server connection logs in as.
#[derive(Debug, Clone)]
pub struct Login {
    pub user: String,
    pub password: Secret,
    pub database: String,
}

/// Whether a statement was already on the connection, or its Close and
/// Parse (and the Close of the statement it evicted) went out just now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prepared {
    Held,
    Now { evicted: bool },
}

pub struct ServerConnection {
    pub stream: ServerStream,
    /// Bytes read from the server but not yet handled.
    pub read_buf: BytesMut,
    /// Messages queued for the server, written together by `flush`: a
    /// pipelined Parse/Bind/Describe/Execute/Sync leaves in one write.
    write_buf: BytesMut,
    pub node: NodeId,
    pub addr: SocketAddr,
    /// What a CancelRequest for this connection must quote.
    pub key: BackendKey,
    /// ParameterStatus values the server reported at startup.
    pub params: Vec<(String, String)>,
    /// Prepared statements this connection holds, by proxy-global name.
    pub prepared: LruCache<Vec<u8>, ()>,
    /// Session parameters SET on this connection beyond its startup defaults.
    pub applied: crate::frontend::session::Params,
    /// Set by a session that hands the connection back idle; a connection
    /// dropped any other way (mid-transaction, a panic) is never reused.
    pub clean: bool,
    /// Its entry in SHOW SERVERS, for as long as it is open.
    pub listed: Option<super::listing::Listed>,
}

impl ServerConnection {
    pub async fn connect(
        node: NodeId,
        addr: SocketAddr,
        login: &Login,
        tls: &ServerTls,
        prepared_cap: usize,
    ) -> Result<ServerConnection, ServerError> {
        let stream = ServerStream::connect(addr, tls).await?;
        tracing::debug!(%addr, tls = stream.is_tls(), user = %login.user, "server connection opened");
        let mut conn = ServerConnection {
            stream,
            read_buf: BytesMut::with_capacity(16 * 1024),
            write_buf: BytesMut::new(),
            node,
            addr,
            key: BackendKey { pid: 0, secret: 0 },
            params: Vec::new(),
            prepared: LruCache::new(prepared_cap.try_into().expect("validated cap > 0")),
            applied: Default::default(),
            clean: true,
            listed: None,
        };
        conn.startup(login).await?;
        Ok(conn)
    }

    async fn startup(&mut self, login: &Login) -> Result<(), ServerError> {
        let packet = startup::encode_startup(&[
            ("user", &login.user),
            ("database", &login.database),
            ("application_name", "tidepool"),
            ("client_encoding", "UTF8"),
        ]);
        self.write_buf.extend_from_slice(&packet);
        self.flush().await?;
        let mut scram: Option<ScramSha256> = None;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag() {
                backend::AUTHENTICATION => match Auth::decode(&frame)? {
                    Auth::Ok => {}
                    Auth::Cleartext => {
                        self.send(&frontend::password(login.password.expose().as_bytes()))
                            .await?
                    }
                    Auth::Md5 { salt } => {
                        let hash = postgres_protocol::authentication::md5_hash(
                            login.user.as_bytes(),
                            login.password.expose().as_bytes(),
                            salt,
                        );
                        self.send(&frontend::password(hash.as_bytes())).await?
                    }
                    Auth::Sasl { mechanisms } => {
                        let (mechanism, binding) = scram_binding(
                            &mechanisms,
                            self.stream.is_tls(),
                            self.stream.end_point_hash(),
                        )?;
                        tracing::debug!(addr = %self.addr, mechanism, "authenticating to the server");
                        let exchange =
                            ScramSha256::new(login.password.expose().as_bytes(), binding.into());
                        let first = frontend::sasl_initial_response(mechanism, exchange.message());
                        scram = Some(exchange);
                        self.send(&first).await?;
                    }
                    Auth::SaslContinue(data) => {
                        let exchange = scram
                            .as_mut()
                            .ok_or(ProtocolError::Malformed("SASLContinue"))?;
                        exchange.update(data)?;
                        let reply = frontend::sasl_response(exchange.message());
                        self.send(&reply).await?;
                    }
                    Auth::SaslFinal(data) => {
                        scram
                            .as_mut()
                            .ok_or(ProtocolError::Malformed("SASLFinal"))?
                            .finish(data)?;
                    }
                    Auth::Other(code) => {
                        return Err(ServerError::UnsupportedAuth(format!("method {code}")));
                    }
                },
                backend::PARAMETER_STATUS => self.params.push(decode_parameter_status(&frame)?),
                backend::BACKEND_KEY_DATA => self.key = BackendKey::decode(&frame)?,
                backend::ERROR_RESPONSE => {
                    return Err(ServerError::Rejected(ErrorFields::decode(&frame)?));
                }
                backend::READY_FOR_QUERY => return Ok(()),
                backend::NOTICE_RESPONSE | b'v' => {}
                other => return Err(ProtocolError::Unexpected(other as char).into()),
            }
        }
    }

    pub async fn send(&mut self, frame: &Frame) -> Result<(), ServerError> {
        self.queue(frame).await?;
        self.flush().await
    }

    /// Queues a message; it leaves at the next `flush`, or now if much is queued.
    pub async fn queue(&mut self, frame: &Frame) -> Result<(), ServerError> {
        self.queue_bytes(frame.raw()).await
    }

    /// `queue` for whole messages already framed.
    pub async fn queue_bytes(&mut self, messages: &[u8]) -> Result<(), ServerError> {
        self.write_buf.extend_from_slice(messages);
        if self.write_buf.len() >= 64 * 1024 {
            self.flush().await?;
        }
        Ok(())
    }

    /// The explicit flush matters for TLS only, where written bytes may wait
    /// in rustls' buffer; on TCP it returns at once.
    pub async fn flush(&mut self) -> Result<(), ServerError> {
        if !self.write_buf.is_empty() {
            self.stream.write_all(&self.write_buf).await?;
            self.write_buf.clear();
            self.stream.flush().await?;
        }
        Ok(())
    }

    /// Reads what the server has sent into `read_buf`, keeping room for a
    /// full read; 0 when it closed.
    pub async fn read_more(&mut self) -> std::io::Result<usize> {
        if self.read_buf.capacity() - self.read_buf.len() < 8192 {
            self.read_buf.reserve(32 * 1024);
        }
        self.stream.read_buf(&mut self.read_buf).await
    }

    /// Reads one whole message; only for startup and health checks, where
    /// messages are small. Sessions stream the server's bytes instead.
    pub async fn read_frame(&mut self) -> Result<Frame, ServerError> {
        loop {
            if let Some(frame) = frame::try_split(&mut self.read_buf, usize::MAX)? {
                return Ok(frame);
            }
            if self.stream.read_buf(&mut self.read_buf).await? == 0 {
                return Err(ServerError::Closed);
            }
        }
    }

    /// Runs an empty query: proves the connection is alive and idle.
    pub async fn check(&mut self, timeout: Duration) -> Result<(), ServerError> {
        tokio::time::timeout(timeout, async {
            self.send(&frontend::query("")).await?;
            loop {
                let frame = self.read_frame().await?;
                match frame.tag() {
                    backend::READY_FOR_QUERY => {
                        return match TxStatus::decode(&frame)? {
                            TxStatus::Idle => Ok(()),
                            _ => Err(ServerError::Protocol(ProtocolError::Malformed(
                                "connection not idle",
                            ))),
                        };
                    }
                    backend::ERROR_RESPONSE => {
                        return Err(ServerError::Rejected(ErrorFields::decode(&frame)?));
                    }
                    _ => {}
                }
            }
        })
        .await
        .map_err(|_| ServerError::Timeout)?
    }

    /// Queues the Parse of a statement this connection lacks, first closing
    /// the least recently used one when the cache is full. Returns whether
    /// it closed one, whose CloseComplete the caller must expect.
    pub async fn queue_prepare(&mut self, name: &[u8], parse: &Frame) -> Result<bool, ServerError> {
        let mut closed = false;
        if self.prepared.len() == self.prepared.cap().get()
            && let Some((evicted, ())) = self.prepared.pop_lru()
        {
            let close =
                frontend::Named::encode(frontend::CLOSE, frontend::Target::Statement, &evicted);
            self.queue(&close).await?;
            closed = true;
        }
        self.queue(parse).await?;
        self.prepared.put(name.to_vec(), ());
        Ok(closed)
    }

    /// Makes the connection hold a client's statement, `name` being its
    /// global name, for what is queued next: `Held` already, or its Parse
    /// queued now. Counted in the prepared-statement cache metrics.
    pub async fn prepare_counted(
        &mut self,
        name: &[u8],
        parse: &Frame,
        metrics: &Metrics,
    ) -> Result<Prepared, ServerError> {
        if self.prepared.get(name).is_some() {
            metrics.prepared_hit();
            return Ok(Prepared::Held);
        }
        metrics.prepared_miss();
        let evicted = self.queue_prepare(name, parse).await?;
        if evicted {
            metrics.prepared_evicted();
        }
        Ok(Prepared::Now { evicted })
    }

    /// Queues `query` (Bind, Execute, Sync), preparing it first when this
    /// connection is not known to hold it. That Parse comes after a Close of
    /// the same name (no error when there is none): a client's DISCARD ALL
    /// or DEALLOCATE ALL pipelined before the question leaves what the
    /// server holds unknown until it has run.
    pub async fn queue_lsn_query(&mut self, query: &LsnQuery) -> Result<Prepared, ServerError> {
        let prepared = match self.prepared.get(query.name) {
            Some(()) => Prepared::Held,
            None => {
                self.queue(&query.close).await?;
                let evicted = self.queue_prepare(query.name, &query.parse).await?;
                Prepared::Now { evicted }
            }
        };
        for frame in &query.run {
            self.queue(frame).await?;
        }
        Ok(prepared)
    }

    /// How far this replica has replayed, asked directly (`None` on a primary).
    pub async fn replay_lsn(&mut self, timeout: Duration) -> Result<Option<Lsn>, ServerError> {
        tokio::time::timeout(timeout, async {
            self.send(&REPLAY_LSN).await?;
            let mut lsn = None;
            loop {
                let frame = self.read_frame().await?;
                match frame.tag() {
                    backend::FUNCTION_CALL_RESPONSE => lsn = super::lsn_query::lsn_value(&frame),
                    backend::ERROR_RESPONSE => {
                        return Err(ServerError::Rejected(ErrorFields::decode(&frame)?));
                    }
                    backend::READY_FOR_QUERY => return Ok(lsn),
                    _ => {}
                }
            }
        })
        .await
        .map_err(|_| ServerError::Timeout)?
    }

    /// Runs a statement whose rows the proxy does not need (session reset,
    /// parameter setup), keeping the ParameterStatus values it reports.
    pub async fn execute(&mut self, sql: &str, timeout: Duration) -> Result<(), ServerError> {
        tokio::time::timeout(timeout, async {
            self.send(&frontend::query(sql)).await?;
            let mut error = None;
            loop {
                let frame = self.read_frame().await?;
                match frame.tag() {
                    backend::PARAMETER_STATUS => {
                        let (name, value) = decode_parameter_status(&frame)?;
                        match self.params.iter_mut().find(|(n, _)| *n == name) {
                            Some(param) => param.1 = value,
                            None => self.params.push((name, value)),
                        }
                    }
                    backend::ERROR_RESPONSE => error = Some(ErrorFields::decode(&frame)?),
                    backend::READY_FOR_QUERY => {
                        return match error {
                            Some(e) => Err(ServerError::Rejected(e)),
                            None => Ok(()),
                        };
                    }
                    _ => {}
                }
            }
        })
        .await
        .map_err(|_| ServerError::Timeout)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLUS: &[u8] = b"SCRAM-SHA-256-PLUS";
    const PLAIN: &[u8] = b"SCRAM-SHA-256";

    #[test]
    fn scram_binds_to_the_certificate_when_it_can() {
        let hash = || Some(vec![7; 32]);
        assert_eq!(
            scram_binding(&[PLUS, PLAIN], true, hash()).unwrap(),
            (SCRAM_SHA_256_PLUS, Binding::EndPoint(vec![7; 32]))
        );
        // A certificate we cannot hash: no binding, and say so honestly.
        assert_eq!(
            scram_binding(&[PLUS, PLAIN], true, None).unwrap(),
            (SCRAM_SHA_256, Binding::None)
        );
        // Binding stripped from a TLS server's offer: "y" lets it notice.
        assert_eq!(
            scram_binding(&[PLAIN], true, hash()).unwrap(),
            (SCRAM_SHA_256, Binding::NotOffered)
        );
        assert_eq!(
            scram_binding(&[PLAIN], false, None).unwrap(),
            (SCRAM_SHA_256, Binding::None)
        );
        assert!(scram_binding(&[b"SCRAM-SHA-1"], false, None).is_err());
    }
}
