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

    /// Sends and reads to the next ReadyForQuery; returns the tags as a string.
    pub async fn round(&mut self, parts: &[Vec<u8>]) -> (String, Vec<Msg>) {
        self.send(parts).await;
        let msgs = self.until_ready().await;
        (msgs.iter().map(|m| m.tag as char).collect(), msgs)
    }
}
