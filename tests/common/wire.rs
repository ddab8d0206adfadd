//! A raw protocol client for tests that need exact message sequences.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Wire {
    pub stream: TcpStream,
}

/// A backend message: tag and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub tag: u8,
    pub body: Vec<u8>,
}

impl Msg {
    /// The SQLSTATE of an ErrorResponse.
    pub fn code(&self) -> Option<String> {
        let mut rest = &self.body[..];
        while let Some((&f, tail)) = rest.split_first() {
            let end = tail.iter().position(|&b| b == 0)?;
            if f == b'C' {
                return Some(String::from_utf8_lossy(&tail[..end]).into_owned());
            }
            rest = &tail[end + 1..];
        }
        None
    }

    /// The text columns of a DataRow.
    pub fn row(&self) -> Vec<Option<String>> {
        let b = &self.body;
        let n = i16::from_be_bytes([b[0], b[1]]) as usize;
        let mut i = 2;
        (0..n)
            .map(|_| {
                let len = i32::from_be_bytes(b[i..i + 4].try_into().unwrap());
                i += 4;
                if len < 0 {
                    None
                } else {
                    let v = String::from_utf8_lossy(&b[i..i + len as usize]).into_owned();
                    i += len as usize;
                    Some(v)
                }
            })
            .collect()
    }
}

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

pub fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut b = cstr(name);
    b.extend(cstr(sql));
    b.extend_from_slice(&0i16.to_be_bytes());
    msg(b'P', &b)
}

/// Bind with text parameters and text results.
pub fn bind(portal: &str, stmt: &str, params: &[&str]) -> Vec<u8> {
    let mut b = cstr(portal);
    b.extend(cstr(stmt));
    b.extend_from_slice(&0i16.to_be_bytes());
    b.extend_from_slice(&(params.len() as i16).to_be_bytes());
    for p in params {
        b.extend_from_slice(&(p.len() as i32).to_be_bytes());
        b.extend_from_slice(p.as_bytes());
    }
    b.extend_from_slice(&0i16.to_be_bytes());
    msg(b'B', &b)
}

pub fn describe_statement(name: &str) -> Vec<u8> {
    let mut b = vec![b'S'];
    b.extend(cstr(name));
    msg(b'D', &b)
}

pub fn execute(portal: &str) -> Vec<u8> {
    let mut b = cstr(portal);
    b.extend_from_slice(&0i32.to_be_bytes());
    msg(b'E', &b)
}

pub fn close_statement(name: &str) -> Vec<u8> {
    let mut b = vec![b'S'];
    b.extend(cstr(name));
    msg(b'C', &b)
}

pub fn sync() -> Vec<u8> {
    msg(b'S', b"")
}

pub fn flush() -> Vec<u8> {
    msg(b'H', b"")
}

pub fn query(sql: &str) -> Vec<u8> {
    msg(b'Q', &cstr(sql))
}

impl Wire {
    /// Connects and logs in (the user must need no password: `auth_type = "trust"`).
    pub async fn connect(port: u16, user: &str, database: &str) -> Wire {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut w = Wire { stream };
        let mut body = 196608i32.to_be_bytes().to_vec();
        for (k, v) in [("user", user), ("database", database)] {
            body.extend(cstr(k));
            body.extend(cstr(v));
        }
        body.push(0);
        let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        packet.extend(body);
        w.stream.write_all(&packet).await.unwrap();
        let login = w.until_ready().await;
        assert!(
            login.iter().all(|m| m.tag != b'E'),
            "login failed: {login:?}"
        );
        w
    }

    /// Connects and logs in with a password (SCRAM-SHA-256 or cleartext, as the server
    /// asks): for PostgreSQL itself, or a proxy user that needs one.
    pub async fn connect_password(port: u16, user: &str, database: &str, password: &str) -> Wire {
        use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
        let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut w = Wire { stream };
        let mut body = 196608i32.to_be_bytes().to_vec();
        for (k, v) in [("user", user), ("database", database)] {
            body.extend(cstr(k));
            body.extend(cstr(v));
        }
        body.push(0);
        let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        packet.extend(body);
        w.stream.write_all(&packet).await.unwrap();
        let mut scram = None;
        loop {
            let m = w.recv().await;
            match m.tag {
                b'R' => match i32::from_be_bytes(m.body[..4].try_into().unwrap()) {
                    0 => {}
                    3 => w.send(&[msg(b'p', &cstr(password))]).await,
                    10 => {
                        let s =
                            ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
                        let mut b = cstr("SCRAM-SHA-256");
                        b.extend_from_slice(&(s.message().len() as i32).to_be_bytes());
                        b.extend_from_slice(s.message());
                        w.send(&[msg(b'p', &b)]).await;
                        scram = Some(s);
                    }
                    11 => {
                        let s = scram.as_mut().expect("SASL continue before SASL start");
                        s.update(&m.body[4..]).expect("SCRAM server-first message");
                        let reply = s.message().to_vec();
                        w.send(&[msg(b'p', &reply)]).await;
                    }
                    12 => scram
                        .as_mut()
                        .expect("SASL final before SASL start")
                        .finish(&m.body[4..])
                        .expect("SCRAM server signature"),
                    other => panic!("unsupported authentication request {other}"),
                },
                b'E' => panic!(
                    "login as {user} failed: {:?}",
                    String::from_utf8_lossy(&m.body)
                ),
                b'Z' => return w,
                _ => {}
            }
        }
    }

    pub async fn send(&mut self, parts: &[Vec<u8>]) {
        let all: Vec<u8> = parts.concat();
        self.stream.write_all(&all).await.unwrap();
    }

    pub async fn recv(&mut self) -> Msg {
        let mut hdr = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(10), self.stream.read_exact(&mut hdr))
            .await
            .expect("reply within 10 s")
            .unwrap();
        let len = i32::from_be_bytes(hdr[1..5].try_into().unwrap()) as usize;
        let mut body = vec![0u8; len - 4];
        self.stream.read_exact(&mut body).await.unwrap();
        Msg { tag: hdr[0], body }
    }

    /// Reads up to and including the next ReadyForQuery; skips notices and parameter status.
    pub async fn until_ready(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        loop {
            let m = self.recv().await;
            let done = m.tag == b'Z';
            if m.tag != b'N' && m.tag != b'S' {
                out.push(m);
            }
            if done {
                return out;
            }
        }
    }

    /// Reads to the next ReadyForQuery (as [`Wire::until_ready`]); returns the tags as a
    /// string.
    pub async fn ready_tags(&mut self) -> String {
        self.until_ready()
            .await
            .iter()
            .map(|m| m.tag as char)
            .collect()
    }

    /// Sends and reads to the next ReadyForQuery; returns the tags as a string.
    pub async fn round(&mut self, parts: &[Vec<u8>]) -> (String, Vec<Msg>) {
        self.send(parts).await;
        let msgs = self.until_ready().await;
        (msgs.iter().map(|m| m.tag as char).collect(), msgs)
    }
}

// ---------------------------------------------------------------------------------------
// Raw sockets with hand-made bytes (hostile clients): packets, and reads that expect what
// the proxy must answer. Every step is bounded.
// ---------------------------------------------------------------------------------------

/// Upper bound for any single network step of a raw client.
pub const STEP: Duration = Duration::from_secs(10);
/// How soon the proxy must close a connection it has rejected.
pub const CLOSE_WITHIN: Duration = Duration::from_secs(5);

/// A StartupMessage for protocol 3.0.
pub fn startup_packet(params: &[(&str, &str)]) -> Vec<u8> {
    startup_packet_version(3, 0, params)
}

/// A StartupMessage for protocol `major.minor`.
pub fn startup_packet_version(major: u16, minor: u16, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&major.to_be_bytes());
    body.extend_from_slice(&minor.to_be_bytes());
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    packet.extend(body);
    packet
}

/// A tagged frontend message.
pub fn tagged(tag: u8, body: &[u8]) -> Vec<u8> {
    msg(tag, body)
}

impl Msg {
    /// The fields of an ErrorResponse or NoticeResponse, by code.
    pub fn fields(&self) -> std::collections::BTreeMap<char, String> {
        let mut out = std::collections::BTreeMap::new();
        let mut rest = &self.body[..];
        while let Some((&code, tail)) = rest.split_first() {
            if code == 0 {
                break;
            }
            let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
            out.insert(
                code as char,
                String::from_utf8_lossy(&tail[..end]).into_owned(),
            );
            rest = tail.get(end + 1..).unwrap_or(&[]);
        }
        out
    }
}

/// A plain TCP connection to 127.0.0.1:`port`.
pub async fn raw_connect(port: u16) -> TcpStream {
    tokio::time::timeout(STEP, TcpStream::connect(("127.0.0.1", port)))
        .await
        .expect("connect timed out")
        .expect("connect")
}

/// Reads one backend message within `within`; `None` at end of stream (or reset).
pub async fn read_msg_within(s: &mut TcpStream, within: Duration) -> Option<Msg> {
    tokio::time::timeout(within, async {
        let mut tag = [0u8; 1];
        match s.read_exact(&mut tag).await {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                return None
            }
            Err(e) => panic!("read: {e}"),
        }
        let mut len = [0u8; 4];
        s.read_exact(&mut len).await.expect("message length");
        let len = i32::from_be_bytes(len);
        assert!(
            (4..=1 << 20).contains(&len),
            "implausible backend message length {len}"
        );
        let mut body = vec![0u8; len as usize - 4];
        s.read_exact(&mut body).await.expect("message body");
        Some(Msg { tag: tag[0], body })
    })
    .await
    .unwrap_or_else(|_| panic!("no backend message within {within:?}"))
}

pub async fn expect_msg(s: &mut TcpStream) -> Msg {
    read_msg_within(s, STEP)
        .await
        .expect("connection closed, expected a message")
}

/// The proxy closes the connection (EOF, or a reset when our bytes were left unread)
/// within `CLOSE_WITHIN`, sending nothing more.
pub async fn expect_closed(s: &mut TcpStream) {
    let mut buf = [0u8; 256];
    match tokio::time::timeout(CLOSE_WITHIN, s.read(&mut buf)).await {
        Err(_) => panic!("connection still open after {CLOSE_WITHIN:?}"),
        Ok(Ok(0)) => {}
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Ok(Ok(n)) => panic!("unexpected bytes before close: {:?}", &buf[..n]),
        Ok(Err(e)) => panic!("read: {e}"),
    }
}

/// Reads a FATAL ErrorResponse with `sqlstate`, then end of stream; returns the fields.
pub async fn expect_fatal(
    s: &mut TcpStream,
    sqlstate: &str,
) -> std::collections::BTreeMap<char, String> {
    let m = expect_msg(s).await;
    assert_eq!(m.tag, b'E', "expected ErrorResponse, got {m:?}");
    let f = m.fields();
    assert_eq!(f.get(&'C').map(String::as_str), Some(sqlstate), "{f:?}");
    assert_eq!(f.get(&'S').map(String::as_str), Some("FATAL"), "{f:?}");
    expect_closed(s).await;
    f
}

/// Reads messages up to ReadyForQuery (bounded), failing on an ErrorResponse.
pub async fn read_until_ready(s: &mut TcpStream) -> Vec<Msg> {
    let mut out = Vec::new();
    for _ in 0..200 {
        let m = expect_msg(s).await;
        assert_ne!(m.tag, b'E', "unexpected error: {:?}", m.fields());
        let done = m.tag == b'Z';
        out.push(m);
        if done {
            return out;
        }
    }
    panic!("no ReadyForQuery within 200 messages");
}

/// A raw client logged in as `name` to database `name` (the user must need no password:
/// `auth_type = "trust"`).
pub async fn raw_login(port: u16, name: &str) -> TcpStream {
    let mut s = raw_connect(port).await;
    s.write_all(&startup_packet(&[("user", name), ("database", name)]))
        .await
        .unwrap();
    let msgs = read_until_ready(&mut s).await;
    assert_eq!(
        (msgs[0].tag, &msgs[0].body[..]),
        (b'R', &[0u8, 0, 0, 0][..]),
        "AuthenticationOk first"
    );
    assert_eq!(msgs.last().unwrap().body, b"I");
    s
}
