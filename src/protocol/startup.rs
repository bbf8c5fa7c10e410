//! The untagged packets a connection opens with: SSLRequest, GSSENCRequest,
//! CancelRequest and StartupMessage.

use bytes::{BufMut, Bytes, BytesMut};

use super::backend::BackendKey;
use super::frame::get_i32;
use super::{Frame, ProtocolError, read_cstr};

/// PostgreSQL refuses startup packets longer than this; so do we.
pub const MAX_STARTUP_LEN: usize = 10_000;

const SSL_REQUEST: i32 = 80877103;
const GSSENC_REQUEST: i32 = 80877104;
const CANCEL_REQUEST: i32 = 80877102;
const PROTOCOL_3_0: i32 = 196608;

#[derive(Debug, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel(BackendKey),
    Startup(StartupMessage),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    /// The minor protocol version asked for; anything above 0 is negotiated down.
    pub minor_version: u16,
    /// Parameters in the order the client sent them.
    pub params: Vec<(String, String)>,
}

impl StartupMessage {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The length of the packet at the front of `buf` once its length has arrived.
pub fn packet_len(buf: &[u8]) -> Result<Option<usize>, ProtocolError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if !(8..=MAX_STARTUP_LEN as i32).contains(&len) {
        return Err(ProtocolError::BadLength(len.into()));
    }
    Ok(Some(len as usize))
}

/// Decodes one complete startup packet (length prefix included).
pub fn decode(packet: &[u8]) -> Result<StartupPacket, ProtocolError> {
    let mut body = &packet[4..];
    let code = get_i32(&mut body, "startup packet")?;
    match code {
        SSL_REQUEST => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST => Ok(StartupPacket::Cancel(BackendKey {
            pid: get_i32(&mut body, "CancelRequest")?,
            secret: get_i32(&mut body, "CancelRequest")?,
        })),
        version => {
            let (major, minor) = ((version >> 16) as u16, (version & 0xffff) as u16);
            if major != 3 {
                return Err(ProtocolError::UnsupportedVersion { major, minor });
            }
            let mut params = Vec::new();
            loop {
                let (name, rest) = read_cstr(body, "StartupMessage")?;
                if name.is_empty() {
                    break;
                }
                let (value, rest) = read_cstr(rest, "StartupMessage")?;
                let text = |b: &[u8]| {
                    String::from_utf8(b.to_vec())
                        .map_err(|_| ProtocolError::Malformed("StartupMessage (not UTF-8)"))
                };
                params.push((text(name)?, text(value)?));
                body = rest;
            }
            Ok(StartupPacket::Startup(StartupMessage {
                minor_version: minor,
                params,
            }))
        }
    }
}

/// A StartupMessage for protocol 3.0 with the given parameters.
pub fn encode_startup(params: &[(&str, &str)]) -> Bytes {
    let mut buf = BytesMut::new();
    buf.put_i32(0);
    buf.put_i32(PROTOCOL_3_0);
    for (k, v) in params {
        buf.put_slice(k.as_bytes());
        buf.put_u8(0);
        buf.put_slice(v.as_bytes());
        buf.put_u8(0);
    }
    buf.put_u8(0);
    let len = buf.len() as i32;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    buf.freeze()
}

/// Asks a server for TLS before the StartupMessage.
pub fn encode_ssl_request() -> Bytes {
    let mut buf = BytesMut::with_capacity(8);
    buf.put_i32(8);
    buf.put_i32(SSL_REQUEST);
    buf.freeze()
}

pub fn encode_cancel(key: BackendKey) -> Bytes {
    let mut buf = BytesMut::with_capacity(16);
    buf.put_i32(16);
    buf.put_i32(CANCEL_REQUEST);
    buf.put_i32(key.pid);
    buf.put_i32(key.secret);
    buf.freeze()
}

/// Tells a client asking for protocol 3.x (x > 0) that we speak 3.0, and which
/// `_pq_.` options we did not recognise.
pub fn negotiate_protocol_version(unrecognised: &[&str]) -> Frame {
    Frame::build(b'v', |b| {
        b.put_i32(PROTOCOL_3_0);
        b.put_i32(unrecognised.len() as i32);
        for name in unrecognised {
            b.put_slice(name.as_bytes());
            b.put_u8(0);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_round_trip() {
        let packet = encode_startup(&[("user", "app"), ("database", "db")]);
        assert_eq!(packet_len(&packet).unwrap(), Some(packet.len()));
        let StartupPacket::Startup(msg) = decode(&packet).unwrap() else {
            panic!("not a startup message");
        };
        assert_eq!(msg.get("user"), Some("app"));
        assert_eq!(msg.get("database"), Some("db"));
        assert_eq!(msg.minor_version, 0);
    }

    #[test]
    fn special_requests() {
        let key = BackendKey { pid: 7, secret: -3 };
        assert_eq!(
            decode(&encode_cancel(key)).unwrap(),
            StartupPacket::Cancel(key)
        );
        let ssl = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        assert_eq!(decode(&ssl).unwrap(), StartupPacket::SslRequest);
    }

    #[test]
    fn refuses_bad_packets() {
        assert!(packet_len(&[0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(packet_len(&[0, 1, 0, 0]).is_err());
        let v2 = [0, 0, 0, 8, 0, 2, 0, 0];
        assert!(matches!(
            decode(&v2),
            Err(ProtocolError::UnsupportedVersion { major: 2, .. })
        ));
        let bad_utf8 = [0, 0, 0, 13, 0, 3, 0, 0, b'u', 0, 0xff, 0, 0];
        assert!(decode(&bad_utf8).is_err());
    }
}
