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
use crate::server_tls::{self, ServerTls};

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

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            ServerStream::Plain(tcp) => tcp.local_addr(),
            ServerStream::Tls(tls) => tls.get_ref().0.local_addr(),
        }
    }

    /// Whether the server spoke, or hung up, while the connection sat idle
    /// in its pool: a server says nothing unasked between transactions
    /// except the FATAL it sends before closing (pg_terminate_backend, a
    /// restart, idle_session_timeout). Costs no system call unless the
    /// socket was reported readable; a connection that answers so is never
    /// handed to a client, whose statement it would lose.
    pub fn spoke_while_idle(&self) -> bool {
        let tcp = match self {
            ServerStream::Plain(tcp) => tcp,
            ServerStream::Tls(tls) => tls.get_ref().0,
        };
        let ready = futures_util::FutureExt::now_or_never(tcp.ready(tokio::io::Interest::READABLE));
        match ready {
            None => false,
            // Readiness may be left over from the last answer: only bytes
            // (or the end of the stream) now tell.
            Some(Ok(_)) => !matches!(
                tcp.try_read(&mut [0u8; 1]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock
            ),
            Some(Err(_)) => true,
        }
    }

    /// What SCRAM can bind to: the server certificate's end-point hash.
    pub fn end_point_hash(&self) -> Option<Vec<u8>> {
        let ServerStream::Tls(tls) = self else {
            return None;
        };
        let certificate = tls.get_ref().1.peer_certificates()?.first()?;
        server_tls::end_point_hash(certificate)
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

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;
    use crate::config::Config;

    fn tls(mode: &str) -> ServerTls {
        let config = Config::parse(&format!(
            "[cluster]\nnodes = [\"127.0.0.1:5432\"]\nadmin_user = \"postgres\"\nadmin_password = \"pw\"\nsslmode = \"{mode}\"\n\n[[users]]\nname = \"app\"\npassword = \"app\"\n"
        ))
        .unwrap();
        ServerTls::from_config(&config.cluster).unwrap()
    }

    /// A server that answers the SSLRequest with `answer`, then closes; it
    /// hands back the bytes it was sent first.
    async fn server(answer: &'static [u8]) -> (SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut request = vec![0; 8];
            if tcp.read_exact(&mut request).await.is_err() {
                return Vec::new();
            }
            tcp.write_all(answer).await.unwrap();
            request
        });
        (addr, task)
    }

    #[tokio::test]
    async fn a_server_without_tls_is_refused_unless_preferred() {
        for (mode, refused) in [("require", true), ("prefer", false)] {
            let (addr, server) = server(b"N").await;
            let tls = tls(mode);
            let result = ServerStream::connect(addr, &tls).await;
            assert_eq!(
                server.await.unwrap(),
                startup::encode_ssl_request().to_vec()
            );
            match result {
                Err(ServerError::TlsRefused(m)) if refused => assert_eq!(m.as_str(), mode),
                Ok(ServerStream::Plain(_)) if !refused => {}
                Err(e) => panic!("{mode}: {e}"),
                Ok(_) => panic!("{mode}: connected"),
            }
        }
    }

    #[tokio::test]
    async fn a_failed_handshake_is_an_error_not_a_hang() {
        // 'S', then bytes that are no TLS record.
        let (addr, server) = server(b"SXXXXXXXXXXXXXXXXX").await;
        let result = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            ServerStream::connect(addr, &tls("require")),
        )
        .await
        .expect("no hang");
        server.await.unwrap();
        assert!(
            matches!(result, Err(ServerError::Tls(_))),
            "{:?}",
            result.err()
        );
    }

    #[tokio::test]
    async fn disable_sends_no_ssl_request() {
        let (addr, server) = server(b"").await;
        let stream = ServerStream::connect(addr, &tls("disable")).await.unwrap();
        assert!(!stream.is_tls());
        drop(stream);
        assert!(server.await.unwrap().is_empty(), "nothing was sent");
    }
}
