//! The PostgreSQL wire protocol, as much as a proxy needs: framing that keeps
//! the original bytes, typed views of the few messages routing inspects, and
//! encoders for the messages the proxy itself sends.
pub mod backend;
pub mod frame;
pub mod frontend;
pub mod startup;

pub use frame::Frame;

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("invalid message length {0}")]
    BadLength(i64),
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("malformed {0} message")]
    Malformed(&'static str),
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0")]
    UnsupportedVersion { major: u16, minor: u16 },
    #[error("unexpected message type {0:?}")]
    Unexpected(char),
}

/// Reads a NUL-terminated string at the front of `buf`, returning it and the rest.
pub(crate) fn read_cstr<'a>(
    buf: &'a [u8],
    what: &'static str,
) -> Result<(&'a [u8], &'a [u8]), ProtocolError> {
    let end = memchr::memchr(0, buf).ok_or(ProtocolError::Malformed(what))?;
    Ok((&buf[..end], &buf[end + 1..]))
}
