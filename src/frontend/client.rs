//! A client's byte stream (plain or TLS) with read and write buffers.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::stats::DatabaseStats;
use crate::metrics::ClientErrors;
use crate::protocol::backend::{self, ErrorFields};
use crate::protocol::{Frame, ProtocolError, frame};

/// Anything a client can speak over: TCP, or TLS over TCP.
pub trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ClientIo for T {}

/// Responses are gathered here and written in one go; past this size they are
/// written at once so that a large result never piles up in memory.
const WRITE_HIGH_WATER: usize = 64 * 1024;
/// Read at once while the client has nothing pending: most messages fit.
const FIRST_READ: usize = 512;
/// What an idle client's write buffer starts at: a whole short answer.
const FIRST_WRITE: usize = 1024;
/// A read that continues a partial message reserves at least this much.
const READ_CHUNK: usize = 8 * 1024;

/// The largest message accepted before authentication, PostgreSQL's
/// `PG_MAX_AUTH_TOKEN_LENGTH`: a client nobody knows yet must not make the
/// proxy buffer `max_message_size` bytes.
pub const MAX_AUTH_MESSAGE: usize = 65535;

pub struct ClientConn {
    io: Box<dyn ClientIo>,
    read_buf: BytesMut,
    write_buf: BytesMut,
    max_message: usize,
    /// Until then, messages are held to [`MAX_AUTH_MESSAGE`].
    authenticated: bool,
    /// Every message a client is sent passes here, so errors are counted here.
    errors: ClientErrors,
    /// Bytes in and out, counted for SHOW STATS once the database is known.
    stats: Option<Arc<DatabaseStats>>,
}

impl ClientConn {
    pub fn new(io: Box<dyn ClientIo>, max_message: usize, errors: ClientErrors) -> ClientConn {
        ClientConn {
            io,
            read_buf: BytesMut::new(),
            write_buf: BytesMut::new(),
            max_message,
            authenticated: false,
            errors,
            stats: None,
        }
    }

    /// From now on, bytes read and written count toward `stats`.
    pub fn count_into(&mut self, stats: Arc<DatabaseStats>) {
        self.stats = Some(stats);
    }

    /// Reads more bytes; 0 means the client closed the connection.
    /// Cancel-safe, so it can sit in a `select!`.
    ///
    /// Most clients of a proxy are idle most of the time (thousands of
    /// application pool connections), so an `idle` client holds no buffer:
    /// with nothing pending, both buffers are given back and the next
    /// message is awaited in a small array in the task itself (16 KiB of
    /// buffers per idle client was most of its cost). A client in the
    /// middle of its work (a transaction, replies owed) keeps them: giving
    /// them back cost three allocations a statement. Its next message is
    /// most likely short, so between messages it reads into a small buffer
    /// (reused in place once the last message's frames are gone): an 8 KiB
    /// one there left ~9 KB more resident per client that had run a query.
    pub async fn fill(&mut self, idle: bool) -> std::io::Result<usize> {
        if self.read_buf.is_empty() {
            if idle {
                self.read_buf = BytesMut::new();
                if self.write_buf.is_empty() {
                    self.write_buf = BytesMut::new();
                }
                let mut first = [0u8; FIRST_READ];
                let n = self.io.read(&mut first).await?;
                self.read_buf.extend_from_slice(&first[..n]);
                self.count_received(n);
                return Ok(n);
            }
            self.read_buf.reserve(FIRST_READ);
        } else if self.read_buf.capacity() - self.read_buf.len() < READ_CHUNK / 2 {
            self.read_buf.reserve(READ_CHUNK);
        }
        let n = self.io.read_buf(&mut self.read_buf).await?;
        self.count_received(n);
        Ok(n)
    }

    fn count_received(&self, n: usize) {
        if let Some(stats) = &self.stats {
            stats.received(n);
        }
    }

    /// The client proved who it is: it may now send messages up to `max_message_size`.
    pub fn authenticated(&mut self) {
        self.authenticated = true;
    }

    /// The next complete message already received, if any.
    pub fn try_frame(&mut self) -> Result<Option<Frame>, ProtocolError> {
        let max = if self.authenticated {
            self.max_message
        } else {
            self.max_message.min(MAX_AUTH_MESSAGE)
        };
        frame::try_split(&mut self.read_buf, max)
    }

    /// Bytes received and not yet taken as messages.
    pub fn buffered(&self) -> &[u8] {
        &self.read_buf
    }

    /// Drops `n` buffered bytes, whose messages were handled whole.
    pub fn consume(&mut self, n: usize) {
        bytes::Buf::advance(&mut self.read_buf, n);
    }

    /// Waits for the next complete message; `None` when the client went away.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, ClientReadError> {
        loop {
            if let Some(frame) = self.try_frame()? {
                return Ok(Some(frame));
            }
            if self.fill(true).await? == 0 {
                return Ok(None);
            }
        }
    }

    /// Queues a message; it goes out at the next `flush` (or sooner when the
    /// buffer is large).
    pub async fn send(&mut self, frame: &Frame) -> std::io::Result<()> {
        if frame.tag() == backend::ERROR_RESPONSE
            && let Ok(fields) = ErrorFields::decode(frame)
        {
            self.errors.count(&fields.code);
        }
        self.send_bytes(frame.raw()).await
    }

    /// Whole server messages, passed on as they are (errors counted).
    pub async fn send_messages(&mut self, bytes: &bytes::Bytes) -> std::io::Result<()> {
        for frame in frame::split_all(bytes) {
            if frame.tag() == backend::ERROR_RESPONSE
                && let Ok(fields) = ErrorFields::decode(&frame)
            {
                self.errors.count(&fields.code);
            }
        }
        self.send_bytes(bytes).await
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.write_buf.capacity() == 0 {
            // An answer comes in several messages: grown from the first
            // one's size, the buffer was reallocated two or three times.
            self.write_buf.reserve(bytes.len().max(FIRST_WRITE));
        }
        self.write_buf.extend_from_slice(bytes);
        if self.write_buf.len() >= WRITE_HIGH_WATER {
            self.flush().await?;
        }
        Ok(())
    }

    pub async fn flush(&mut self) -> std::io::Result<()> {
        if !self.write_buf.is_empty() {
            self.io.write_all(&self.write_buf).await?;
            if let Some(stats) = &self.stats {
                stats.sent(self.write_buf.len());
            }
            self.write_buf.clear();
        }
        self.io.flush().await
    }

    pub async fn shutdown(&mut self) {
        let _ = self.flush().await;
        let _ = self.io.shutdown().await;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientReadError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
}
