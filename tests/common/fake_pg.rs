//! A scriptable fake PostgreSQL server, for hostile-upstream cases: each connection runs a
//! script (an async closure) that reads what pgsluice sends and answers whatever bytes the
//! test wants, well-formed or not.
//!
//! ```ignore
//! let fake = FakePg::start(|mut c| async move {
//!     c.read_startup().await;
//!     c.send(&fake_pg::error_without_code("boom")).await;
//! }).await;
//! // point a database at fake.port
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How a fake server answers one connection.
pub type Script = Arc<dyn Fn(FakeConn) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

pub struct FakePg {
    pub port: u16,
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

/// One connection from pgsluice to the fake server.
pub struct FakeConn {
    pub stream: TcpStream,
}

impl FakePg {
    pub async fn start<F, Fut>(script: F) -> FakePg
    where
        F: Fn(FakeConn) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let script: Script = Arc::new(move |c| Box::pin(script(c)));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let script = script.clone();
                tokio::spawn(script(FakeConn { stream }));
            }
        });
        FakePg {
            port,
            accepted,
            task,
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for FakePg {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeConn {
    /// Reads a startup-phase packet (length-prefixed, no tag): its body.
    pub async fn read_startup(&mut self) -> Vec<u8> {
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len).await.unwrap();
        let len = u32::from_be_bytes(len) as usize;
        let mut body = vec![0u8; len - 4];
        self.stream.read_exact(&mut body).await.unwrap();
        body
    }

    /// Reads one tagged frontend message: (tag, body). `None` at end of stream.
    pub async fn read_message(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut head = [0u8; 5];
        self.stream.read_exact(&mut head).await.ok()?;
        let len = u32::from_be_bytes(head[1..].try_into().unwrap()) as usize;
        let mut body = vec![0u8; len.checked_sub(4)?];
        self.stream.read_exact(&mut body).await.ok()?;
        Some((head[0], body))
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// [`FakeConn::send`], telling whether the peer took the bytes.
    pub async fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Holds the connection open, reading and dropping whatever comes, until the peer
    /// closes (or a minute passes).
    pub async fn hold(mut self) {
        let mut buf = [0u8; 4096];
        let _ = tokio::time::timeout(Duration::from_secs(60), async {
            while let Ok(n) = self.stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }

    /// Answers queries like a tiny server: each Query gets an empty result and
    /// ReadyForQuery; Terminate or EOF ends it.
    pub async fn serve_queries(mut self) {
        while let Some((tag, _)) = self.read_message().await {
            match tag {
                b'Q' => {
                    let mut out = message(b'I', b"");
                    out.extend(ready(b'I'));
                    self.send(&out).await;
                }
                b'X' => return,
                _ => {}
            }
        }
    }
}

/// A backend message.
pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

pub fn auth_ok() -> Vec<u8> {
    message(b'R', &0u32.to_be_bytes())
}

/// An Authentication request with `code` and extra `data`.
pub fn auth(code: u32, data: &[u8]) -> Vec<u8> {
    let mut b = code.to_be_bytes().to_vec();
    b.extend_from_slice(data);
    message(b'R', &b)
}

pub fn parameter_status(name: &str, value: &[u8]) -> Vec<u8> {
    let mut b = name.as_bytes().to_vec();
    b.push(0);
    b.extend_from_slice(value);
    b.push(0);
    message(b'S', &b)
}

pub fn backend_key(body: &[u8]) -> Vec<u8> {
    message(b'K', body)
}

pub fn ready(status: u8) -> Vec<u8> {
    message(b'Z', &[status])
}

/// An ErrorResponse from `(code, value)` fields.
pub fn error(fields: &[(u8, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    for (f, v) in fields {
        b.push(*f);
        b.extend_from_slice(v.as_bytes());
        b.push(0);
    }
    b.push(0);
    message(b'E', &b)
}

/// A normal login: AuthenticationOk, a few parameters, BackendKeyData, ReadyForQuery.
pub fn login_ok() -> Vec<u8> {
    let mut out = auth_ok();
    for (k, v) in [
        ("server_version", "15.0"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
    ] {
        out.extend(parameter_status(k, v.as_bytes()));
    }
    out.extend(backend_key(&[0, 0, 0, 42, 0, 0, 0, 7]));
    out.extend(ready(b'I'));
    out
}
