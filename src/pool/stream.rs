//! The byte stream to a server: plain TCP or TLS over it, chosen once at
//! connect time by `[cluster] sslmode` and what the server answers.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;

use super::server::ServerError;
use crate::config::ServerSslMode;
use crate::protocol::{ProtocolError, startup};
use crate::server_tls::ServerTls;

/// An enum rather than a boxed trait object: the plain path stays a direct
/// call into the `TcpStream`, as fast as before TLS existed.
pub enum ServerStream {
    Plain(TcpStream),
    /// Boxed: rustls' connection state is large, and most servers are plain.
    Tls(Box<TlsStream<TcpStream>>),
}

impl ServerStream {
    /// Connects to `addr` and, unless TLS is disabled, asks for TLS first.
    ///
    /// Only the one-byte answer is read before the handshake, so that bytes
    /// a man in the middle might put after it are fed to rustls (and fail)
    /// rather than taken as the server's (CVE-2021-23222).
    pub async fn connect(addr: SocketAddr, tls: &ServerTls) -> Result<ServerStream, ServerError> {
        let mut tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        if tls.mode() == ServerSslMode::Disable {
            return Ok(ServerStream::Plain(tcp));
        }
        tcp.write_all(&startup::encode_ssl_request()).await?;
        let mut answer = [0u8; 1];
        if tcp.read(&mut answer).await? == 0 {
            return Err(ServerError::Closed);
        }
        match answer[0] {
            b'S' => {
                // Nodes are configured as IP:port, and a certificate names
                // an IP address in a subjectAltName.
                let name = ServerName::IpAddress(addr.ip().into());
                let stream = tls
                    .connector()
                    .connect(name, tcp)
                    .await
                    .map_err(ServerError::Tls)?;
                Ok(ServerStream::Tls(Box::new(stream)))
            }
            b'N' if tls.mode().requires_tls() => Err(ServerError::TlsRefused(tls.mode())),
            b'N' => Ok(ServerStream::Plain(tcp)),
            other => Err(ProtocolError::Unexpected(other as char).into()),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, ServerStream::Tls(_))
    }
}

impl AsyncRead for ServerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ServerStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ServerStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ServerStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ServerStream::Plain(s) => s.is_write_vectored(),
            ServerStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ServerStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ServerStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
