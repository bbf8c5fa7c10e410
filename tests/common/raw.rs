//! A bare-bones protocol client, to send exactly the messages a test needs.

use bytes::{BufMut, BytesMut};
use tidepool::protocol::backend::{self, Auth};
use tidepool::protocol::frontend as fe;
use tidepool::protocol::{Frame, frame, startup};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A bare-bones protocol client (md5 login), to send exactly the messages a test needs.
pub struct RawClient {
    stream: TcpStream,
    buf: BytesMut,
}

impl RawClient {
    pub async fn connect(port: u16) -> RawClient {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let packet = startup::encode_startup(&[("user", "app"), ("database", "postgres")]);
        stream.write_all(&packet).await.unwrap();
        let mut client = RawClient {
            stream,
            buf: BytesMut::new(),
        };
        loop {
            let f = client.read().await;
            match f.tag() {
                backend::AUTHENTICATION => match Auth::decode(&f).unwrap() {
                    Auth::Md5 { salt } => {
                        let hash =
                            postgres_protocol::authentication::md5_hash(b"app", b"app", salt);
                        client.send(&[fe::password(hash.as_bytes())]).await;
                    }
                    Auth::Ok => {}
                    other => panic!("unexpected auth {other:?}"),
                },
                backend::READY_FOR_QUERY => return client,
                backend::ERROR_RESPONSE => panic!("login failed"),
                _ => {}
            }
        }
    }

    pub async fn send(&mut self, frames: &[Frame]) {
        for f in frames {
            self.stream.write_all(f.raw()).await.unwrap();
        }
    }

    /// Bytes exactly as given, whatever they are.
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Whether the server closed the connection (after any unread bytes).
    pub async fn closed(&mut self) -> bool {
        self.buf.clear();
        matches!(self.stream.read_buf(&mut self.buf).await, Ok(0) | Err(_))
    }

    pub async fn read(&mut self) -> Frame {
        loop {
            if let Some(f) = frame::try_split(&mut self.buf, 1 << 20).unwrap() {
                return f;
            }
            assert!(
                self.stream.read_buf(&mut self.buf).await.unwrap() > 0,
                "closed"
            );
        }
    }

    /// Every message up to and including ReadyForQuery.
    pub async fn frames_until_ready(&mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        loop {
            let f = self.read().await;
            let ready = f.tag() == backend::READY_FOR_QUERY;
            frames.push(f);
            if ready {
                return frames;
            }
        }
    }

    /// Tags of every message up to and including ReadyForQuery, plus any SQLSTATE.
    pub async fn until_ready(&mut self) -> (String, Option<String>) {
        let frames = self.frames_until_ready().await;
        let tags = frames.iter().map(|f| f.tag() as char).collect();
        let code = frames
            .iter()
            .rfind(|f| f.tag() == backend::ERROR_RESPONSE)
            .map(|f| backend::ErrorFields::decode(f).unwrap().code);
        (tags, code)
    }
}

pub fn parse(name: &str, sql: &str) -> Frame {
    Frame::build(fe::PARSE, |b| {
        b.put_slice(name.as_bytes());
        b.put_u8(0);
        b.put_slice(sql.as_bytes());
        b.put_u8(0);
        b.put_i16(0);
    })
}

pub fn bind(statement: &str) -> Frame {
    Frame::build(fe::BIND, |b| {
        b.put_u8(0);
        b.put_slice(statement.as_bytes());
        b.put_u8(0);
        b.put_i16(0);
        b.put_i16(0);
        b.put_i16(0);
    })
}

pub fn execute() -> Frame {
    Frame::build(fe::EXECUTE, |b| {
        b.put_u8(0);
        b.put_i32(0);
    })
}
