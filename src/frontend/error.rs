//! Everything that can end or interrupt a client's session, and the one place
//! that decides what the client is told: a SQLSTATE, a severity and a message
//! with no secrets in it.

use crate::pool::ServerError;
use crate::pool::registry::CheckoutError;
use crate::protocol::backend::{self, Severity};
use crate::protocol::{Frame, ProtocolError};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The client closed its connection; nothing to tell it.
    #[error("client went away")]
    Gone,
    #[error("client i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("startup did not finish in time")]
    StartupTimeout,
    /// A walsender's protocol (`replication=true` or `database` in the
    /// startup packet) cannot be pooled or routed: the client must reach
    /// the node itself.
    #[error(
        "replication connections (replication={0}) are not supported through tidepool: connect to the node directly"
    )]
    Replication(String),
    #[error("role {0:?} does not exist")]
    UnknownUser(String),
    #[error("password authentication failed for user {0:?}")]
    AuthFailed(String),
    #[error("too many clients already")]
    TooManyClients,
    #[error("too many connections for role \"{0}\"")]
    TooManyForUser(String),
    #[error("the proxy is shutting down")]
    ShuttingDown,
    #[error("terminating connection due to idle-session timeout")]
    IdleTimeout,
    #[error("terminating connection due to idle-in-transaction timeout")]
    IdleInTransactionTimeout,
    #[error(transparent)]
    Route(#[from] RouteError),
    /// Session mode: the client's server connection ended with this FATAL
    /// error, passed on as it is.
    #[error("the server ended the session")]
    ServerEnded(Frame),
}

impl From<super::client::ClientReadError> for ClientError {
    fn from(e: super::client::ClientReadError) -> Self {
        match e {
            super::client::ClientReadError::Io(e) => ClientError::Io(e),
            super::client::ClientReadError::Protocol(e) => ClientError::Protocol(e),
        }
    }
}

/// Why a statement found no server to run on. The session goes on after these.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("no primary is available")]
    NoPrimary,
    #[error("{0}")]
    WritesRefused(String),
    #[error("no server is available")]
    NoServer,
    #[error("{0}")]
    Checkout(#[from] CheckoutError),
    #[error("connection to server {0} was lost; the transaction was aborted")]
    ServerLost(String),
    /// The client cancelled while its statement waited for a server.
    #[error("canceling statement due to user request")]
    Cancelled,
    /// The client closed its connection while its statement waited for a
    /// server: the statement is dropped, never sent.
    #[error("the client closed its connection while its statement waited for a server")]
    ClientGone,
}

impl RouteError {
    /// The server at `addr` is gone; `why` when known (what it said as it
    /// went, how its connection failed).
    pub fn server_lost(addr: std::net::SocketAddr, why: Option<String>) -> RouteError {
        RouteError::ServerLost(match why {
            Some(why) => format!("{addr} ({why})"),
            None => addr.to_string(),
        })
    }

    /// The server's own refusal (3D000, 28P01, 53300...) is passed on as the
    /// server said it; the proxy's own failures get their SQLSTATE here.
    pub fn to_frame(&self, severity: Severity) -> Frame {
        match self {
            RouteError::Checkout(CheckoutError::Connect {
                source: ServerError::Rejected(fields),
                ..
            }) => backend::error_response(severity, &fields.code, &fields.message),
            _ => backend::error_response(severity, self.sqlstate(), &self.to_string()),
        }
    }

    fn sqlstate(&self) -> &'static str {
        match self {
            RouteError::NoPrimary | RouteError::NoServer => "57P03",
            RouteError::WritesRefused(_) => "25006",
            RouteError::Checkout(CheckoutError::Exhausted(_)) => "53300",
            RouteError::Checkout(_) | RouteError::ServerLost(_) | RouteError::ClientGone => "08006",
            RouteError::Cancelled => "57014",
        }
    }
}

impl ClientError {
    /// What the client is sent before its connection closes, if anything.
    pub fn to_frame(&self) -> Option<Frame> {
        let fatal = |code, msg: &str| Some(backend::error_response(Severity::Fatal, code, msg));
        match self {
            ClientError::Gone | ClientError::Io(_) => None,
            // As PostgreSQL answers a version it does not speak: not a
            // violation of the protocol, a feature it lacks.
            ClientError::Protocol(e @ ProtocolError::UnsupportedVersion { .. }) => {
                fatal("0A000", &e.to_string())
            }
            ClientError::Protocol(e) => fatal("08P01", &format!("protocol violation: {e}")),
            ClientError::StartupTimeout => {
                fatal("08P01", "canceling authentication due to timeout")
            }
            ClientError::Replication(_) => fatal("0A000", &self.to_string()),
            ClientError::UnknownUser(_) => fatal("28000", &self.to_string()),
            ClientError::AuthFailed(_) => fatal("28P01", &self.to_string()),
            ClientError::TooManyClients => fatal("53300", "sorry, too many clients already"),
            ClientError::TooManyForUser(_) => fatal("53300", &self.to_string()),
            ClientError::IdleTimeout => fatal("57P05", &self.to_string()),
            ClientError::IdleInTransactionTimeout => fatal("25P03", &self.to_string()),
            ClientError::ShuttingDown => fatal(
                "57P01",
                "terminating connection due to administrator command",
            ),
            ClientError::Route(e) => Some(e.to_frame(Severity::Fatal)),
            ClientError::ServerEnded(said) => Some(said.clone()),
        }
    }
}
