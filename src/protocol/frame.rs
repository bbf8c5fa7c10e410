//! Message framing: a tag byte, a big-endian length that counts itself, a body.
//! A `Frame` keeps the original bytes so forwarding never re-encodes.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::ProtocolError;

/// One complete tagged message, header included.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    raw: Bytes,
}

impl Frame {
    pub const HEADER_LEN: usize = 5;

    pub fn tag(&self) -> u8 {
        self.raw[0]
    }

    pub fn body(&self) -> &[u8] {
        &self.raw[Self::HEADER_LEN..]
    }

    /// The message exactly as it arrived, ready to forward.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    pub fn into_raw(self) -> Bytes {
        self.raw
    }

    /// Builds a message from a tag and a body written by `write`.
    pub fn build(tag: u8, write: impl FnOnce(&mut BytesMut)) -> Frame {
        let mut buf = BytesMut::with_capacity(64);
        buf.put_u8(tag);
        buf.put_i32(0);
        write(&mut buf);
        let len = (buf.len() - 1) as i32;
        buf[1..5].copy_from_slice(&len.to_be_bytes());
        Frame { raw: buf.freeze() }
    }
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Frame({:?}, {} bytes)",
            self.tag() as char,
            self.raw.len()
        )
    }
}

/// The tag and total size (header included) of the message at the front of `buf`,
/// once its header has arrived.
pub fn peek_header(buf: &[u8]) -> Result<Option<(u8, usize)>, ProtocolError> {
    if buf.len() < Frame::HEADER_LEN {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(ProtocolError::BadLength(len.into()));
    }
    Ok(Some((buf[0], len as usize + 1)))
}

/// Splits one complete message off the front of `buf`, or `None` until it has
/// all arrived. Messages over `max` bytes are refused before they are buffered.
pub fn try_split(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, ProtocolError> {
    let Some((_, total)) = peek_header(buf)? else {
        return Ok(None);
    };
    if total > max {
        return Err(ProtocolError::TooLarge { len: total, max });
    }
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    Ok(Some(Frame {
        raw: buf.split_to(total).freeze(),
    }))
}

/// The whole messages at the front of `bytes`, without copying them.
pub fn split_all(bytes: &Bytes) -> impl Iterator<Item = Frame> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        let (_, total) = peek_header(&bytes[at..]).ok()??;
        let end = at + total;
        if end > bytes.len() {
            return None;
        }
        let frame = Frame {
            raw: bytes.slice(at..end),
        };
        at = end;
        Some(frame)
    })
}

/// Reads a big-endian i32 from the front of a body.
pub(crate) fn get_i32(buf: &mut &[u8], what: &'static str) -> Result<i32, ProtocolError> {
    if buf.len() < 4 {
        return Err(ProtocolError::Malformed(what));
    }
    Ok(buf.get_i32())
}

/// Reads a big-endian i16 from the front of a body.
pub(crate) fn get_i16(buf: &mut &[u8], what: &'static str) -> Result<i16, ProtocolError> {
    if buf.len() < 2 {
        return Err(ProtocolError::Malformed(what));
    }
    Ok(buf.get_i16())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_only_complete_messages() {
        let q = Frame::build(b'Q', |b| b.put_slice(b"select 1\0"));
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&q.raw()[..7]);
        assert_eq!(try_split(&mut buf, 1024).unwrap(), None);
        buf.extend_from_slice(&q.raw()[7..]);
        buf.extend_from_slice(b"S\0\0");
        let got = try_split(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(got, q);
        assert_eq!(got.body(), b"select 1\0");
        assert_eq!(&buf[..], b"S\0\0");
    }

    #[test]
    fn refuses_bad_and_huge_lengths() {
        let mut buf = BytesMut::from(&b"Q\xff\xff\xff\xff"[..]);
        assert!(matches!(
            try_split(&mut buf, 1024),
            Err(ProtocolError::BadLength(-1))
        ));
        let mut buf = BytesMut::from(&b"Q\0\0\0\x02"[..]);
        assert!(matches!(
            try_split(&mut buf, 1024),
            Err(ProtocolError::BadLength(2))
        ));
        let mut buf = BytesMut::from(&b"Q\x10\0\0\0"[..]);
        assert!(matches!(
            try_split(&mut buf, 1024),
            Err(ProtocolError::TooLarge { .. })
        ));
    }
}
