//! A client's byte stream (plain or TLS) with read and write buffers.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::metrics::ClientErrors;
use crate::protocol::backend::{self, ErrorFields};
use crate::protocol::{Frame, ProtocolError, frame};

/// Anything a client can speak over: TCP, or TLS over TCP.
pub trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ClientIo for T {}

/// Responses are gathered here and written in one go; past this size they are
/// written at once so that a large result never piles up in memory.
const WRITE_HIGH_WATER: usize = 64 * 1024;

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
}

impl ClientConn {
    pub fn new(io: Box<dyn ClientIo>, max_message: usize, errors: ClientErrors) -> ClientConn {
        ClientConn {
            io,
            read_buf: BytesMut::with_capacity(8 * 1024),
            write_buf: BytesMut::with_capacity(8 * 1024),
            max_message,
            authenticated: false,
            errors,
        }
    }

    /// Reads more bytes; 0 means the client closed the connection.
    /// Cancel-safe, so it can sit in a `select!`.
    pub async fn fill(&mut self) -> std::io::Result<usize> {
        if self.read_buf.capacity() - self.read_buf.len() < 4096 {
            self.read_buf.reserve(8 * 1024);
        }
        self.io.read_buf(&mut self.read_buf).await
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

    /// Waits for the next complete message; `None` when the client went away.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, ClientReadError> {
        loop {
            if let Some(frame) = self.try_frame()? {
                return Ok(Some(frame));
            }
            if self.fill().await? == 0 {
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

    pub async fn send_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.write_buf.extend_from_slice(bytes);
        if self.write_buf.len() >= WRITE_HIGH_WATER {
            self.flush().await?;
        }
        Ok(())
    }

    pub async fn flush(&mut self) -> std::io::Result<()> {
        if !self.write_buf.is_empty() {
            self.io.write_all(&self.write_buf).await?;
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
