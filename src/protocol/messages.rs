//! The few messages the proxy builds itself or reads whole.
//!
//! Messages to clients are encoded with pgwire. Backend messages are read whole only outside
//! the relay (server login, the proxy's own queries), always after the frame was split and
//! its length checked, by the small non-panicking readers below.

use bytes::{BufMut, BytesMut};
use pgwire::error::ErrorInfo;
use pgwire::messages::response::{ErrorResponse, NoticeResponse};
use pgwire::messages::startup::NegotiateProtocolVersion;
use pgwire::messages::Message;

use super::TransactionStatus;

fn put<M: Message>(buf: &mut BytesMut, m: M) {
    // Encoding into a growable buffer fails only for messages over 1 GB; ours are tiny.
    m.encode(buf).expect("encoding a small proxy-built message");
}

/// Severity of an error the proxy sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The statement failed; the connection stays usable.
    Error,
    /// The connection is about to be closed.
    Fatal,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// An ErrorResponse the proxy builds (or copies from a server during login).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ErrorFields {
    pub fn new(severity: Severity, code: &str, message: impl Into<String>) -> Self {
        ErrorFields {
            severity: severity.as_str().to_owned(),
            code: code.to_owned(),
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    fn info(&self) -> ErrorInfo {
        let mut info = ErrorInfo::new(
            self.severity.clone(),
            self.code.clone(),
            self.message.clone(),
        );
        info.detail = self.detail.clone();
        info.hint = self.hint.clone();
        info
    }

    pub fn encode(&self, buf: &mut BytesMut) {
        put(buf, ErrorResponse::from(self.info()));
    }

    pub fn encode_notice(&self, buf: &mut BytesMut) {
        put(buf, NoticeResponse::from(self.info()));
    }

    /// Parses the body of an ErrorResponse or NoticeResponse (fields after the header).
    pub fn parse(body: &[u8]) -> ErrorFields {
        let mut f = ErrorFields::new(Severity::Error, "XX000", "");
        let mut rest = body;
        while let Some((&code, tail)) = rest.split_first() {
            if code == 0 {
                break;
            }
            let end = memchr::memchr(0, tail).unwrap_or(tail.len());
            let value = String::from_utf8_lossy(&tail[..end]).into_owned();
            match code {
                b'S' => f.severity = value,
                b'C' => f.code = value,
                b'M' => f.message = value,
                b'D' => f.detail = Some(value),
                b'H' => f.hint = Some(value),
                _ => {}
            }
            rest = tail.get(end + 1..).unwrap_or(&[]);
        }
        f
    }
}

pub fn ready_for_query(buf: &mut BytesMut, status: TransactionStatus) {
    header(buf, b'Z', 1);
    buf.put_u8(match status {
        TransactionStatus::Idle => b'I',
        TransactionStatus::InTransaction => b'T',
        TransactionStatus::Failed => b'E',
    });
}

// The login messages below are written directly (every login sends them; pgwire's types
// would allocate a String or Bytes per field). A test checks each against pgwire.

/// Tag and length word of a message whose body is `body` bytes long.
fn header(buf: &mut BytesMut, tag: u8, body: usize) {
    buf.reserve(5 + body);
    buf.put_u8(tag);
    buf.put_i32((body + 4) as i32);
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    header(buf, b'S', name.len() + value.len() + 2);
    buf.put_slice(name.as_bytes());
    buf.put_u8(0);
    buf.put_slice(value.as_bytes());
    buf.put_u8(0);
}

pub fn backend_key_data(buf: &mut BytesMut, pid: i32, secret: i32) {
    header(buf, b'K', 8);
    buf.put_i32(pid);
    buf.put_i32(secret);
}

/// An Authentication message: `code`, then `data`.
fn authentication(buf: &mut BytesMut, code: i32, data: &[u8]) {
    header(buf, b'R', 4 + data.len());
    buf.put_i32(code);
    buf.put_slice(data);
}

pub fn auth_ok(buf: &mut BytesMut) {
    authentication(buf, 0, &[]);
}

pub fn auth_md5(buf: &mut BytesMut, salt: [u8; 4]) {
    authentication(buf, 5, &salt);
}

pub fn auth_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    let body: usize = mechanisms.iter().map(|m| m.len() + 1).sum::<usize>() + 1;
    header(buf, b'R', 4 + body);
    buf.put_i32(10);
    for m in mechanisms {
        buf.put_slice(m.as_bytes());
        buf.put_u8(0);
    }
    buf.put_u8(0);
}

pub fn auth_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    authentication(buf, 11, data);
}

pub fn auth_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    authentication(buf, 12, data);
}

pub fn negotiate_protocol_version(buf: &mut BytesMut, newest_minor: i32, unsupported: Vec<String>) {
    put(
        buf,
        NegotiateProtocolVersion::new(newest_minor, unsupported),
    );
}

/// A simple Query message.
pub fn query(buf: &mut BytesMut, sql: &str) {
    buf.put_u8(super::frontend::QUERY);
    buf.put_i32((sql.len() + 5) as i32);
    buf.put_slice(sql.as_bytes());
    buf.put_u8(0);
}

/// Terminate (`X`), the polite way to close a server connection.
pub const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];

/// Reads C strings one after another from a message body.
pub struct CStrings<'a>(pub &'a [u8]);

impl<'a> CStrings<'a> {
    /// The next string, or `None` when no terminator is left.
    pub fn next_str(&mut self) -> Option<&'a [u8]> {
        let end = memchr::memchr(0, self.0)?;
        let s = &self.0[..end];
        self.0 = &self.0[end + 1..];
        Some(s)
    }
}

/// Quotes a string as an SQL literal (`'it''s'`), for the proxy's own SET statements.
pub fn quote_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    if s.contains('\\') {
        out.push('E');
    }
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// Quotes a parameter name for `RESET`: each dotted part quoted (`"app"."user"`), so that
/// a part that is a reserved word (`user`) or holds other characters still parses.
pub fn quote_ident(s: &str) -> String {
    s.split('.')
        .map(|part| format!("\"{}\"", part.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(".")
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgwire::messages::response::{ReadyForQuery, TransactionStatus as PgStatus};
    use pgwire::messages::startup::{Authentication, BackendKeyData, ParameterStatus, SecretKey};

    #[test]
    fn error_round_trip() {
        let mut buf = BytesMut::new();
        ErrorFields::new(Severity::Fatal, "53300", "too many")
            .with_hint("wait")
            .encode(&mut buf);
        assert_eq!(buf[0], b'E');
        let parsed = ErrorFields::parse(&buf[5..]);
        assert_eq!(parsed.severity, "FATAL");
        assert_eq!(parsed.code, "53300");
        assert_eq!(parsed.message, "too many");
        assert_eq!(parsed.hint.as_deref(), Some("wait"));
    }

    #[test]
    fn parse_tolerates_garbage() {
        let f = ErrorFields::parse(b"Mno terminator");
        assert_eq!(f.message, "no terminator");
        ErrorFields::parse(b"");
        ErrorFields::parse(b"\0\0\0");
    }

    /// The login messages written by hand are byte for byte what pgwire encodes.
    #[test]
    fn login_messages_match_pgwire() {
        fn ours(f: impl FnOnce(&mut BytesMut)) -> BytesMut {
            let mut b = BytesMut::from(&b"x"[..]);
            f(&mut b);
            b.split_off(1)
        }
        fn theirs<M: Message>(m: M) -> BytesMut {
            let mut b = BytesMut::new();
            put(&mut b, m);
            b
        }
        assert_eq!(
            ours(|b| parameter_status(b, "TimeZone", "Europe/Paris")),
            theirs(ParameterStatus::new(
                "TimeZone".into(),
                "Europe/Paris".into()
            ))
        );
        assert_eq!(
            ours(|b| parameter_status(b, "application_name", "")),
            theirs(ParameterStatus::new("application_name".into(), "".into()))
        );
        assert_eq!(
            ours(|b| backend_key_data(b, 12345, -7)),
            theirs(BackendKeyData::new(12345, SecretKey::I32(-7)))
        );
        assert_eq!(ours(auth_ok), theirs(Authentication::Ok));
        assert_eq!(
            ours(|b| auth_md5(b, [1, 2, 3, 4])),
            theirs(Authentication::MD5Password(vec![1, 2, 3, 4]))
        );
        assert_eq!(
            ours(|b| auth_sasl(b, &["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"])),
            theirs(Authentication::SASL(vec![
                "SCRAM-SHA-256".into(),
                "SCRAM-SHA-256-PLUS".into()
            ]))
        );
        assert_eq!(
            ours(|b| auth_sasl_continue(b, b"r=abc,s=xyz,i=4096")),
            theirs(Authentication::SASLContinue(bytes::Bytes::from_static(
                b"r=abc,s=xyz,i=4096"
            )))
        );
        assert_eq!(
            ours(|b| auth_sasl_final(b, b"v=sig")),
            theirs(Authentication::SASLFinal(bytes::Bytes::from_static(
                b"v=sig"
            )))
        );
        for (status, pg) in [
            (TransactionStatus::Idle, PgStatus::Idle),
            (TransactionStatus::InTransaction, PgStatus::Transaction),
            (TransactionStatus::Failed, PgStatus::Error),
        ] {
            assert_eq!(
                ours(|b| ready_for_query(b, status)),
                theirs(ReadyForQuery::new(pg))
            );
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal(r"a\b"), r"E'a\\b'");
        assert_eq!(quote_ident("timezone"), "\"timezone\"");
        assert_eq!(quote_ident("DateStyle"), "\"DateStyle\"");
        assert_eq!(quote_ident("app.user"), "\"app\".\"user\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
