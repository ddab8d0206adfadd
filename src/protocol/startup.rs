//! Untagged packets a client sends first: StartupMessage, SSLRequest, GSSENCRequest and
//! CancelRequest. They are read through the client's [`LoginInput`], which may hold bytes
//! past the packet: before TLS starts, the caller refuses any (see `client::handshake`).

use thiserror::Error;
use tokio::io::AsyncRead;

use super::login_input::LoginInput;

/// PostgreSQL's own cap on a startup packet (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_PACKET: usize = 10_000;
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;

/// The first packet of a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel { pid: i32, secret: i32 },
    Startup(Startup),
}

/// A StartupMessage: the protocol version and the parameters in the order sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Startup {
    pub major: u16,
    pub minor: u16,
    pub params: Vec<(String, String)>,
}

impl Startup {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Error)]
pub enum StartupError {
    #[error("length {0} is out of range")]
    BadLength(i64),
    #[error("{0}")]
    Malformed(&'static str),
    #[error("connection closed during startup")]
    Io(#[from] std::io::Error),
}

/// Reads one untagged packet through `input`. The length word is checked before the body
/// is waited for; the packet's bytes are consumed, what follows it stays buffered.
pub async fn read_packet<S: AsyncRead + Unpin>(
    stream: &mut S,
    input: &mut LoginInput,
) -> Result<StartupPacket, StartupError> {
    input.fill(stream, 4).await?;
    let b = input.buffered();
    let len = i32::from_be_bytes([b[0], b[1], b[2], b[3]]) as i64;
    if !(8..=MAX_STARTUP_PACKET as i64).contains(&len) {
        return Err(StartupError::BadLength(len));
    }
    let len = len as usize;
    input.fill(stream, len).await?;
    let packet = parse_packet(&input.buffered()[4..len]);
    input.consume(len);
    packet
}

/// Parses the body of an untagged packet (everything after the length word).
pub fn parse_packet(body: &[u8]) -> Result<StartupPacket, StartupError> {
    if body.len() < 4 {
        return Err(StartupError::Malformed("too short"));
    }
    let code = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    let rest = &body[4..];
    match code {
        SSL_REQUEST_CODE if rest.is_empty() => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST_CODE if rest.is_empty() => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST_CODE if rest.len() == 8 => Ok(StartupPacket::Cancel {
            pid: i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]),
            secret: i32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]),
        }),
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE | CANCEL_REQUEST_CODE => {
            Err(StartupError::Malformed("wrong length for a request code"))
        }
        _ => Ok(StartupPacket::Startup(Startup {
            major: (code >> 16) as u16,
            minor: (code & 0xffff) as u16,
            params: parse_params(rest)?,
        })),
    }
}

/// Name/value C-string pairs ended by an empty name.
fn parse_params(mut rest: &[u8]) -> Result<Vec<(String, String)>, StartupError> {
    let mut params: Vec<(String, String)> = Vec::new();
    loop {
        let name = cstr(&mut rest)?;
        if name.is_empty() {
            if !rest.is_empty() {
                return Err(StartupError::Malformed("bytes after the parameter list"));
            }
            // Sorted, not compared pairwise: 10,000 bytes hold 2,500 parameters, and
            // 3 million comparisons before authentication are a cheap way to burn CPU.
            let mut names: Vec<&str> = params.iter().map(|(k, _)| k.as_str()).collect();
            names.sort_unstable();
            if names.windows(2).any(|w| w[0] == w[1]) {
                return Err(StartupError::Malformed("a parameter appears twice"));
            }
            return Ok(params);
        }
        let value = cstr(&mut rest)?;
        params.push((name, value));
    }
}

fn cstr(rest: &mut &[u8]) -> Result<String, StartupError> {
    let end =
        memchr::memchr(0, rest).ok_or(StartupError::Malformed("missing string terminator"))?;
    let s = std::str::from_utf8(&rest[..end])
        .map_err(|_| StartupError::Malformed("parameter is not UTF-8"))?;
    *rest = &rest[end + 1..];
    Ok(s.to_owned())
}

/// Splits the `options` startup parameter into `-c name=value` / `--name=value` settings.
/// Returns the offending word when it holds anything else.
pub fn parse_options(options: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut words = split_options(options).into_iter();
    while let Some(word) = words.next() {
        let setting = if word == "-c" {
            words.next().ok_or_else(|| word.clone())?
        } else if let Some(s) = word.strip_prefix("--") {
            s.to_owned()
        } else if let Some(s) = word.strip_prefix("-c") {
            s.to_owned()
        } else {
            return Err(word);
        };
        let (name, value) = setting.split_once('=').ok_or_else(|| setting.clone())?;
        out.push((
            name.replace('-', "_").to_ascii_lowercase(),
            value.to_owned(),
        ));
    }
    Ok(out)
}

/// Splits on unescaped whitespace; a backslash escapes the next character (as libpq does).
fn split_options(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n)
                }
            }
            c if c.is_whitespace() => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur))
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur)
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(code: u32, rest: &[u8]) -> Vec<u8> {
        let mut v = code.to_be_bytes().to_vec();
        v.extend_from_slice(rest);
        v
    }

    #[test]
    fn parses_startup() {
        let p = parse_packet(&body(196608, b"user\0app\0database\0db\0\0")).unwrap();
        let StartupPacket::Startup(s) = p else {
            panic!("not a startup")
        };
        assert_eq!((s.major, s.minor), (3, 0));
        assert_eq!(s.get("user"), Some("app"));
        assert_eq!(s.get("database"), Some("db"));
    }

    #[test]
    fn parses_requests() {
        assert_eq!(
            parse_packet(&body(SSL_REQUEST_CODE, b"")).unwrap(),
            StartupPacket::SslRequest
        );
        assert_eq!(
            parse_packet(&body(GSSENC_REQUEST_CODE, b"")).unwrap(),
            StartupPacket::GssEncRequest
        );
        let mut c = 7i32.to_be_bytes().to_vec();
        c.extend_from_slice(&(-9i32).to_be_bytes());
        assert_eq!(
            parse_packet(&body(CANCEL_REQUEST_CODE, &c)).unwrap(),
            StartupPacket::Cancel { pid: 7, secret: -9 }
        );
    }

    #[test]
    fn rejects_malformed() {
        assert!(parse_packet(&body(196608, b"user\0app")).is_err());
        assert!(parse_packet(&body(196608, b"user\0app\0\0junk")).is_err());
        assert!(parse_packet(&body(196608, b"user\0a\0user\0b\0\0")).is_err());
        assert!(parse_packet(&body(196608, b"user\0\xff\0\0")).is_err());
        assert!(parse_packet(&body(CANCEL_REQUEST_CODE, b"abc")).is_err());
        assert!(parse_packet(b"ab").is_err());
    }

    /// Thousands of parameters (what a 10,000-byte packet can hold): all different they
    /// parse, one name twice, wherever it is, is refused.
    #[test]
    fn many_parameters_are_checked_for_duplicates() {
        let mut list = Vec::new();
        for i in 0..2_000u32 {
            list.extend(format!("p{i:04}\0\0").bytes());
        }
        let mut all = list.clone();
        all.push(0);
        let Ok(StartupPacket::Startup(s)) = parse_packet(&body(196608, &all)) else {
            panic!("2,000 different parameters are refused")
        };
        assert_eq!(s.params.len(), 2_000);
        let mut twice = list;
        twice.extend(b"p1234\0again\0\0");
        assert!(matches!(
            parse_packet(&body(196608, &twice)),
            Err(StartupError::Malformed("a parameter appears twice"))
        ));
    }

    #[tokio::test]
    async fn read_rejects_bad_lengths() {
        for len in [0i32, 3, -1, 10_001, i32::MAX] {
            let mut wire: &[u8] = &len.to_be_bytes();
            let err = read_packet(&mut wire, &mut LoginInput::new())
                .await
                .unwrap_err();
            assert!(matches!(err, StartupError::BadLength(_)), "{len}: {err}");
        }
    }

    #[test]
    fn options() {
        assert_eq!(
            parse_options("-c search_path=a,b --statement-timeout=5s -cwork_mem=1MB").unwrap(),
            vec![
                ("search_path".into(), "a,b".into()),
                ("statement_timeout".into(), "5s".into()),
                ("work_mem".into(), "1MB".into())
            ]
        );
        assert_eq!(
            parse_options(r"-c application_name=a\ b").unwrap(),
            vec![("application_name".into(), "a b".into())]
        );
        assert!(parse_options("-d 5").is_err());
    }
}
