//! Messages a client sends: typed views of the ones routing inspects, and
//! encoders for the ones the proxy sends to servers itself.

use bytes::BufMut;

use super::frame::{get_i16, get_i32};
use super::{Frame, ProtocolError, read_cstr};

pub const QUERY: u8 = b'Q';
pub const PARSE: u8 = b'P';
pub const BIND: u8 = b'B';
pub const DESCRIBE: u8 = b'D';
pub const EXECUTE: u8 = b'E';
pub const CLOSE: u8 = b'C';
pub const SYNC: u8 = b'S';
pub const FLUSH: u8 = b'H';
pub const TERMINATE: u8 = b'X';
pub const COPY_DATA: u8 = b'd';
pub const COPY_DONE: u8 = b'c';
pub const COPY_FAIL: u8 = b'f';
pub const FUNCTION_CALL: u8 = b'F';
pub const PASSWORD: u8 = b'p';

/// The SQL text of a simple Query; `None` when it is not valid UTF-8, which
/// routing treats like any statement it cannot parse.
pub fn query_text(frame: &Frame) -> Result<Option<&str>, ProtocolError> {
    let (sql, _) = read_cstr(frame.body(), "Query")?;
    Ok(std::str::from_utf8(sql).ok())
}

/// A Parse message's fields; the query stays bytes so nothing is lost.
pub struct Parse<'a> {
    pub name: &'a [u8],
    pub query: &'a [u8],
    /// Everything after the query: the parameter type count and OIDs.
    pub param_types: &'a [u8],
}

impl<'a> Parse<'a> {
    pub fn decode(frame: &'a Frame) -> Result<Parse<'a>, ProtocolError> {
        let (name, rest) = read_cstr(frame.body(), "Parse")?;
        let (query, param_types) = read_cstr(rest, "Parse")?;
        let mut types = param_types;
        let count = get_i16(&mut types, "Parse")?;
        if count < 0 || types.len() != count as usize * 4 {
            return Err(ProtocolError::Malformed("Parse"));
        }
        Ok(Parse {
            name,
            query,
            param_types,
        })
    }

    /// The same statement under another name.
    pub fn renamed(&self, name: &[u8]) -> Frame {
        Frame::build(PARSE, |b| {
            b.put_slice(name);
            b.put_u8(0);
            b.put_slice(self.query);
            b.put_u8(0);
            b.put_slice(self.param_types);
        })
    }
}

/// A Bind message's names; the parameters are carried along untouched.
pub struct Bind<'a> {
    pub portal: &'a [u8],
    pub statement: &'a [u8],
    rest: &'a [u8],
}

impl<'a> Bind<'a> {
    pub fn decode(frame: &'a Frame) -> Result<Bind<'a>, ProtocolError> {
        let (portal, rest) = read_cstr(frame.body(), "Bind")?;
        let (statement, rest) = read_cstr(rest, "Bind")?;
        Ok(Bind {
            portal,
            statement,
            rest,
        })
    }

    pub fn renamed(&self, statement: &[u8]) -> Frame {
        Frame::build(BIND, |b| {
            b.put_slice(self.portal);
            b.put_u8(0);
            b.put_slice(statement);
            b.put_u8(0);
            b.put_slice(self.rest);
        })
    }
}

/// What a Describe or Close names: a prepared statement or a portal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Statement,
    Portal,
}

/// Describe and Close share a body: a target kind and a name.
pub struct Named<'a> {
    pub target: Target,
    pub name: &'a [u8],
}

impl<'a> Named<'a> {
    pub fn decode(frame: &'a Frame) -> Result<Named<'a>, ProtocolError> {
        let body = frame.body();
        let target = match body.first() {
            Some(b'S') => Target::Statement,
            Some(b'P') => Target::Portal,
            _ => return Err(ProtocolError::Malformed("Describe/Close")),
        };
        let (name, _) = read_cstr(&body[1..], "Describe/Close")?;
        Ok(Named { target, name })
    }

    pub fn encode(tag: u8, target: Target, name: &[u8]) -> Frame {
        Frame::build(tag, |b| {
            b.put_u8(match target {
                Target::Statement => b'S',
                Target::Portal => b'P',
            });
            b.put_slice(name);
            b.put_u8(0);
        })
    }
}

pub fn query(sql: &str) -> Frame {
    Frame::build(QUERY, |b| {
        b.put_slice(sql.as_bytes());
        b.put_u8(0);
    })
}

/// A Parse without parameter types.
pub fn parse(name: &[u8], sql: &str) -> Frame {
    Frame::build(PARSE, |b| {
        b.put_slice(name);
        b.put_u8(0);
        b.put_slice(sql.as_bytes());
        b.put_u8(0);
        b.put_i16(0);
    })
}

/// Binds `statement`, which takes no parameters, to the unnamed portal, results in text.
pub fn bind_no_params(statement: &[u8]) -> Frame {
    Frame::build(BIND, |b| {
        b.put_u8(0);
        b.put_slice(statement);
        b.put_u8(0);
        b.put_i16(0);
        b.put_i16(0);
        b.put_i16(0);
    })
}

/// Executes the unnamed portal to the end.
pub fn execute_all() -> Frame {
    Frame::build(EXECUTE, |b| {
        b.put_u8(0);
        b.put_i32(0);
    })
}

/// Calls the function with this OID, which takes no arguments; result in text.
pub fn function_call_no_args(oid: u32) -> Frame {
    Frame::build(FUNCTION_CALL, |b| {
        b.put_u32(oid);
        b.put_i16(0);
        b.put_i16(0);
        b.put_i16(0);
    })
}

pub fn sync() -> Frame {
    Frame::build(SYNC, |_| {})
}

pub fn terminate() -> Frame {
    Frame::build(TERMINATE, |_| {})
}

pub fn password(password: &[u8]) -> Frame {
    Frame::build(PASSWORD, |b| {
        b.put_slice(password);
        b.put_u8(0);
    })
}

pub fn sasl_initial_response(mechanism: &str, data: &[u8]) -> Frame {
    Frame::build(PASSWORD, |b| {
        b.put_slice(mechanism.as_bytes());
        b.put_u8(0);
        b.put_i32(data.len() as i32);
        b.put_slice(data);
    })
}

pub fn sasl_response(data: &[u8]) -> Frame {
    Frame::build(PASSWORD, |b| b.put_slice(data))
}

/// The client's SASLInitialResponse: the mechanism it chose and its first message.
pub fn decode_sasl_initial(frame: &Frame) -> Result<(&[u8], &[u8]), ProtocolError> {
    let (mechanism, mut rest) = read_cstr(frame.body(), "SASLInitialResponse")?;
    let len = get_i32(&mut rest, "SASLInitialResponse")?;
    if len < 0 || rest.len() != len as usize {
        return Err(ProtocolError::Malformed("SASLInitialResponse"));
    }
    Ok((mechanism, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_bind_rename_keep_everything_else() {
        let parse = Frame::build(PARSE, |b| {
            b.put_slice(b"s1\0select $1\0");
            b.put_i16(1);
            b.put_i32(23);
        });
        let p = Parse::decode(&parse).unwrap();
        assert_eq!(p.name, b"s1");
        let renamed = p.renamed(b"tp_abc");
        let p2 = Parse::decode(&renamed).unwrap();
        assert_eq!(p2.name, b"tp_abc");
        assert_eq!(p2.query, b"select $1");
        assert_eq!(p2.param_types, p.param_types);

        let bind = Frame::build(BIND, |b| {
            b.put_slice(b"\0s1\0");
            b.put_i16(0);
            b.put_i16(1);
            b.put_i32(2);
            b.put_slice(b"42");
            b.put_i16(0);
        });
        let b = Bind::decode(&bind).unwrap();
        let renamed = b.renamed(b"tp_abc");
        let b2 = Bind::decode(&renamed).unwrap();
        assert_eq!((b2.portal, b2.statement), (&b""[..], &b"tp_abc"[..]));
        assert_eq!(
            &renamed.body()[renamed.body().len() - 12..],
            &bind.body()[4..]
        );
    }

    #[test]
    fn malformed_parse_is_an_error() {
        let parse = Frame::build(PARSE, |b| b.put_slice(b"s1\0select 1\0\0\x05"));
        assert!(Parse::decode(&parse).is_err());
        let parse = Frame::build(PARSE, |b| b.put_slice(b"s1"));
        assert!(Parse::decode(&parse).is_err());
    }
}
