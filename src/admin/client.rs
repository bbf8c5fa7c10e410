//! The few admin HTTP requests `tidepool ctl` makes: one request per
//! connection, HTTP/1.0, no body beyond JSON. Small enough not to need an
//! HTTP client crate.
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    #[error("{addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0}: no answer in time")]
    Timeout(String),
    #[error("{0}: not an HTTP answer")]
    Malformed(String),
}

pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// `method path` on the admin listener at `addr`, with a bearer token when given.
pub async fn request(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    timeout: Duration,
) -> Result<Answer, AdminClientError> {
    let io = |source| AdminClientError::Io {
        addr: addr.to_owned(),
        source,
    };
    let exchange = async {
        let mut tcp = TcpStream::connect(addr).await.map_err(io)?;
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let head =
            format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\n\r\n");
        tcp.write_all(head.as_bytes()).await.map_err(io)?;
        let mut raw = Vec::new();
        tcp.read_to_end(&mut raw).await.map_err(io)?;
        Ok(raw)
    };
    let raw = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| AdminClientError::Timeout(addr.to_owned()))??;
    let text = String::from_utf8_lossy(&raw);
    let malformed = || AdminClientError::Malformed(addr.to_owned());
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(malformed)?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(malformed)?;
    Ok(Answer {
        status,
        body: body.to_owned(),
    })
}
