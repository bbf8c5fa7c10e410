//! Messages a server sends: typed views of the ones the proxy must read, and
//! encoders for the ones the proxy answers with itself.

use bytes::BufMut;

use super::frame::get_i32;
use super::{Frame, ProtocolError, read_cstr};

pub const AUTHENTICATION: u8 = b'R';
pub const BACKEND_KEY_DATA: u8 = b'K';
pub const PARAMETER_STATUS: u8 = b'S';
pub const READY_FOR_QUERY: u8 = b'Z';
pub const ERROR_RESPONSE: u8 = b'E';
pub const NOTICE_RESPONSE: u8 = b'N';
pub const PARSE_COMPLETE: u8 = b'1';
pub const BIND_COMPLETE: u8 = b'2';
pub const CLOSE_COMPLETE: u8 = b'3';
pub const COMMAND_COMPLETE: u8 = b'C';
pub const EMPTY_QUERY: u8 = b'I';
pub const PORTAL_SUSPENDED: u8 = b's';
pub const PARAMETER_DESCRIPTION: u8 = b't';
pub const ROW_DESCRIPTION: u8 = b'T';
pub const NO_DATA: u8 = b'n';
pub const DATA_ROW: u8 = b'D';
pub const COPY_IN_RESPONSE: u8 = b'G';
pub const COPY_OUT_RESPONSE: u8 = b'H';
pub const COPY_BOTH_RESPONSE: u8 = b'W';
pub const COPY_DONE: u8 = b'c';
pub const FUNCTION_CALL_RESPONSE: u8 = b'V';

/// Transaction status carried by ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    Idle,
    InTransaction,
    Failed,
}

impl TxStatus {
    pub fn decode(frame: &Frame) -> Result<TxStatus, ProtocolError> {
        match frame.body() {
            [b'I'] => Ok(TxStatus::Idle),
            [b'T'] => Ok(TxStatus::InTransaction),
            [b'E'] => Ok(TxStatus::Failed),
            _ => Err(ProtocolError::Malformed("ReadyForQuery")),
        }
    }

    fn byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InTransaction => b'T',
            TxStatus::Failed => b'E',
        }
    }
}

/// Authentication requests a server makes.
#[derive(Debug, PartialEq, Eq)]
pub enum Auth<'a> {
    Ok,
    Cleartext,
    Md5 { salt: [u8; 4] },
    Sasl { mechanisms: Vec<&'a [u8]> },
    SaslContinue(&'a [u8]),
    SaslFinal(&'a [u8]),
    Other(i32),
}

impl<'a> Auth<'a> {
    pub fn decode(frame: &'a Frame) -> Result<Auth<'a>, ProtocolError> {
        let mut body = frame.body();
        Ok(match get_i32(&mut body, "Authentication")? {
            0 => Auth::Ok,
            3 => Auth::Cleartext,
            5 => {
                let salt = body
                    .try_into()
                    .map_err(|_| ProtocolError::Malformed("AuthenticationMD5Password"))?;
                Auth::Md5 { salt }
            }
            10 => {
                let mut mechanisms = Vec::new();
                while let Ok((m, rest)) = read_cstr(body, "AuthenticationSASL") {
                    if m.is_empty() {
                        break;
                    }
                    mechanisms.push(m);
                    body = rest;
                }
                Auth::Sasl { mechanisms }
            }
            11 => Auth::SaslContinue(body),
            12 => Auth::SaslFinal(body),
            other => Auth::Other(other),
        })
    }
}

/// The fields of an ErrorResponse or NoticeResponse the proxy looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

impl ErrorFields {
    pub fn decode(frame: &Frame) -> Result<ErrorFields, ProtocolError> {
        Self::decode_message(frame.raw())
    }

    /// Decodes a whole message (header included) still in a read buffer.
    pub fn decode_message(message: &[u8]) -> Result<ErrorFields, ProtocolError> {
        let mut fields = ErrorFields {
            severity: String::new(),
            code: String::new(),
            message: String::new(),
        };
        let mut body = message.get(Frame::HEADER_LEN..).unwrap_or_default();
        while let Some((&kind, rest)) = body.split_first() {
            if kind == 0 {
                break;
            }
            let (value, rest) = read_cstr(rest, "ErrorResponse")?;
            let value = String::from_utf8_lossy(value).into_owned();
            match kind {
                b'V' => fields.severity = value,
                b'S' if fields.severity.is_empty() => fields.severity = value,
                b'C' => fields.code = value,
                b'M' => fields.message = value,
                _ => {}
            }
            body = rest;
        }
        Ok(fields)
    }
}

/// Whether an ErrorResponse (a whole message) ends the connection: FATAL
/// or PANIC. Scans the fields without decoding them, as it runs on every
/// error the proxy forwards.
pub fn is_fatal(message: &[u8]) -> bool {
    let mut fields = &message[Frame::HEADER_LEN.min(message.len())..];
    while let Some((&kind, rest)) = fields.split_first() {
        let Some(nul) = rest.iter().position(|&b| b == 0) else {
            return false;
        };
        let value = &rest[..nul];
        if kind == b'V' || kind == b'S' {
            return value == b"FATAL" || value == b"PANIC";
        }
        fields = &rest[nul + 1..];
    }
    false
}

pub fn decode_parameter_status(frame: &Frame) -> Result<(String, String), ProtocolError> {
    let (name, rest) = read_cstr(frame.body(), "ParameterStatus")?;
    let (value, _) = read_cstr(rest, "ParameterStatus")?;
    Ok((
        String::from_utf8_lossy(name).into_owned(),
        String::from_utf8_lossy(value).into_owned(),
    ))
}

/// A process id and secret that a CancelRequest must quote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BackendKey {
    pub pid: i32,
    pub secret: i32,
}

impl BackendKey {
    pub fn decode(frame: &Frame) -> Result<BackendKey, ProtocolError> {
        let mut body = frame.body();
        Ok(BackendKey {
            pid: get_i32(&mut body, "BackendKeyData")?,
            secret: get_i32(&mut body, "BackendKeyData")?,
        })
    }

    pub fn encode(&self) -> Frame {
        Frame::build(BACKEND_KEY_DATA, |b| {
            b.put_i32(self.pid);
            b.put_i32(self.secret);
        })
    }
}

/// Severity of an error the proxy raises itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

pub fn error_response(severity: Severity, code: &str, message: &str) -> Frame {
    let severity = match severity {
        Severity::Error => "ERROR",
        Severity::Fatal => "FATAL",
    };
    fields_frame(ERROR_RESPONSE, severity, code, message)
}

/// A WARNING NoticeResponse, as PostgreSQL sends for a COMMIT outside a transaction.
pub fn warning(code: &str, message: &str) -> Frame {
    fields_frame(NOTICE_RESPONSE, "WARNING", code, message)
}

/// A NOTICE NoticeResponse.
pub fn notice(code: &str, message: &str) -> Frame {
    fields_frame(NOTICE_RESPONSE, "NOTICE", code, message)
}

fn fields_frame(tag: u8, severity: &str, code: &str, message: &str) -> Frame {
    Frame::build(tag, |b| {
        for (kind, value) in [
            (b'S', severity),
            (b'V', severity),
            (b'C', code),
            (b'M', message),
        ] {
            b.put_u8(kind);
            b.put_slice(value.as_bytes());
            b.put_u8(0);
        }
        b.put_u8(0);
    })
}

pub fn ready_for_query(status: TxStatus) -> Frame {
    Frame::build(READY_FOR_QUERY, |b| b.put_u8(status.byte()))
}

pub fn command_complete(tag: &str) -> Frame {
    Frame::build(COMMAND_COMPLETE, |b| {
        b.put_slice(tag.as_bytes());
        b.put_u8(0);
    })
}

pub fn parameter_status(name: &str, value: &str) -> Frame {
    Frame::build(PARAMETER_STATUS, |b| {
        b.put_slice(name.as_bytes());
        b.put_u8(0);
        b.put_slice(value.as_bytes());
        b.put_u8(0);
    })
}

pub fn parse_complete() -> Frame {
    Frame::build(PARSE_COMPLETE, |_| {})
}

pub fn close_complete() -> Frame {
    Frame::build(CLOSE_COMPLETE, |_| {})
}

fn auth(code: i32, data: &[u8]) -> Frame {
    Frame::build(AUTHENTICATION, |b| {
        b.put_i32(code);
        b.put_slice(data);
    })
}

pub fn auth_ok() -> Frame {
    auth(0, &[])
}

pub fn auth_md5(salt: [u8; 4]) -> Frame {
    auth(5, &salt)
}

pub fn auth_sasl(mechanisms: &[&str]) -> Frame {
    let mut data = Vec::new();
    for m in mechanisms {
        data.extend_from_slice(m.as_bytes());
        data.push(0);
    }
    data.push(0);
    auth(10, &data)
}

pub fn auth_sasl_continue(data: &[u8]) -> Frame {
    auth(11, data)
}

pub fn auth_sasl_final(data: &[u8]) -> Frame {
    auth(12, data)
}

/// The text of the first column of a DataRow; `None` when NULL or malformed.
pub fn single_text_value(frame: &Frame) -> Option<&str> {
    // After the column count.
    text_value_at(frame.body(), 2)
}

/// The text value of a FunctionCallResponse; `None` when it is NULL.
pub fn function_result_text(frame: &Frame) -> Option<&str> {
    text_value_at(frame.body(), 0)
}

/// A value as the protocol sends one (its length, -1 for NULL, then its
/// bytes) starting at `at`, read as text.
fn text_value_at(body: &[u8], at: usize) -> Option<&str> {
    let len = i32::from_be_bytes(body.get(at..at + 4)?.try_into().ok()?);
    let start = at + 4;
    std::str::from_utf8(body.get(start..start + usize::try_from(len).ok()?)?).ok()
}

/// A one-column text result set, for the proxy's own SHOW commands.
pub fn text_rows(column: &str, rows: &[&str]) -> Vec<Frame> {
    let rows: Vec<Vec<Option<String>>> = rows.iter().map(|r| vec![Some(r.to_string())]).collect();
    text_table(&[column], &rows, "SHOW")
}

/// A result set of text columns (`None` is NULL), ending with `tag`.
pub fn text_table(columns: &[&str], rows: &[Vec<Option<String>>], tag: &str) -> Vec<Frame> {
    let mut frames = Vec::with_capacity(rows.len() + 2);
    frames.push(Frame::build(ROW_DESCRIPTION, |b| {
        b.put_i16(columns.len() as i16);
        for name in columns {
            b.put_slice(name.as_bytes());
            b.put_u8(0);
            b.put_i32(0); // table oid
            b.put_i16(0); // column number
            b.put_i32(25); // text
            b.put_i16(-1);
            b.put_i32(-1);
            b.put_i16(0); // text format
        }
    }));
    for row in rows {
        frames.push(Frame::build(DATA_ROW, |b| {
            b.put_i16(row.len() as i16);
            for value in row {
                match value {
                    Some(v) => {
                        b.put_i32(v.len() as i32);
                        b.put_slice(v.as_bytes());
                    }
                    None => b.put_i32(-1),
                }
            }
        }));
    }
    frames.push(command_complete(tag));
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fatal_error_is_told_from_an_ordinary_one() {
        let fatal = error_response(Severity::Fatal, "57P01", "terminating connection");
        let error = error_response(Severity::Error, "42P01", "no such table");
        assert!(is_fatal(fatal.raw()));
        assert!(!is_fatal(error.raw()));
    }

    #[test]
    fn error_round_trip() {
        let frame = error_response(Severity::Fatal, "28P01", "password authentication failed");
        let fields = ErrorFields::decode(&frame).unwrap();
        assert_eq!(fields.severity, "FATAL");
        assert_eq!(fields.code, "28P01");
        assert_eq!(fields.message, "password authentication failed");
    }

    #[test]
    fn auth_requests_decode() {
        let sasl = auth_sasl(&["SCRAM-SHA-256"]);
        assert_eq!(
            Auth::decode(&sasl).unwrap(),
            Auth::Sasl {
                mechanisms: vec![b"SCRAM-SHA-256"]
            }
        );
        assert_eq!(
            Auth::decode(&auth_md5([1, 2, 3, 4])).unwrap(),
            Auth::Md5 { salt: [1, 2, 3, 4] }
        );
        assert_eq!(Auth::decode(&auth_ok()).unwrap(), Auth::Ok);
    }

    #[test]
    fn ready_for_query_round_trip() {
        for status in [TxStatus::Idle, TxStatus::InTransaction, TxStatus::Failed] {
            assert_eq!(TxStatus::decode(&ready_for_query(status)).unwrap(), status);
        }
    }
}
