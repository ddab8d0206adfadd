//! A connection from the proxy to PostgreSQL ("server", as in PgBouncer): connect, log in,
//! run the proxy's own small queries, send cancels, close politely.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use postgres_protocol::message::frontend;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::auth::upstream::{UpstreamKeys, UpstreamLogin};
use crate::config::PoolSettings;
use crate::protocol::frame;
use crate::protocol::messages::{self, CStrings, ErrorFields};
use crate::protocol::{backend, TransactionStatus};
use crate::socket::{self, Addr, Socket};
use crate::stream::Stream;
use crate::tls::ServerTlsMode;

/// Largest message the proxy reads whole from a server outside the relay.
const MAX_WHOLE_MESSAGE: usize = 1 << 20;
/// Most ParameterStatus messages taken during a login (PostgreSQL sends about fifteen; a
/// hostile server could otherwise send them until `server_connect_timeout`, a megabyte
/// each). Their bytes together may not pass [`MAX_WHOLE_MESSAGE`] either.
const MAX_REPORTED: usize = 256;

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("could not connect to server {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("timed out connecting to server {0}")]
    ConnectTimeout(String),
    /// The server refused the login (its own ErrorResponse).
    #[error("server rejected login: {} ({})", .0.message, .0.code)]
    Rejected(ErrorFields),
    #[error("server asked for a password, but none is configured for upstream user \"{0}\"")]
    NoPassword(String),
    #[error("server asked for an unsupported authentication method ({0})")]
    UnsupportedAuth(String),
    #[error("server protocol error: {0}")]
    Protocol(String),
    #[error("TLS with server {addr}: {reason}")]
    Tls { addr: String, reason: String },
    /// A query the proxy ran itself failed.
    #[error("server query failed: {} ({})", .0.message, .0.code)]
    Query(ErrorFields),
    #[error("server connection lost: {0}")]
    Io(#[from] std::io::Error),
    /// A pool for writes reached a standby or read-only server (see `crate::pool::health`).
    #[error("{0}")]
    ReadOnly(String),
}

impl ServerError {
    /// A failure that may go away in a moment: the server restarts (refused, starting up,
    /// shutting down), is full, or the network dropped. Login errors such as a wrong
    /// password or a missing database are not.
    pub fn is_transient(&self) -> bool {
        match self {
            // A read-only server: a failover is under way, or DNS still points at the
            // old primary; the next connect resolves the name again.
            ServerError::Connect { .. }
            | ServerError::ConnectTimeout(_)
            | ServerError::Io(_)
            | ServerError::ReadOnly(_) => true,
            ServerError::Rejected(f) => matches!(
                f.code.as_str(),
                "57P03" | "57P01" | "57P02" | "53300" | "08006"
            ),
            _ => false,
        }
    }
}

/// What identifies a server session for CancelRequest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerKey {
    /// Where the server is: a cancel for it goes there (over TCP or its Unix socket).
    pub addr: Addr,
    pub pid: i32,
    pub secret: i32,
}

/// One server connection.
#[derive(Debug)]
pub struct ServerConn {
    pub stream: Stream,
    /// Bytes read from the server and not yet passed on; kept to reuse its allocation.
    pub buf: BytesMut,
    /// Where the relay stands in the server's message stream.
    pub cursor: crate::relay::Cursor,
    /// Named statements prepared on this connection (transaction mode).
    pub statements: crate::prepared::ServerStatements,
    pub key: ServerKey,
    /// ParameterStatus values the server reported at login.
    pub reported: Vec<(String, String)>,
    /// Tracked parameters the proxy has SET on this session (lower-case name → value);
    /// absent means the server's default. Shared with the clients whose sets are equal.
    pub session: crate::session_params::SessionParams,
    /// The state of a transaction, kept with the server (there are `pool_size` of them)
    /// from one transaction to the next, not with each client: a client's task would
    /// otherwise carry its room (~240 bytes) idle or not, and the reply queue's allocation
    /// is reused. Taken by the transaction running on the server; `None` until the first.
    pub txn: Option<Box<crate::relay::Txn>>,
    /// When it was opened, a [`crate::clock`] stamp.
    pub created: u64,
    /// Idle past `server_check_delay` (set by the janitor): the next checkout checks it.
    pub check_due: bool,
    /// `created` as wall-clock time (SHOW SERVERS, SHOW CLIENTS).
    pub connected: std::time::SystemTime,
    /// When its last transaction ended (or it was opened), a [`crate::clock`] stamp.
    pub last_used: u64,
    /// Index of the pool this connection belongs to.
    pub pool: usize,
    pub id: u64,
    /// What SHOW SERVERS and SHOW CLIENTS show of it, made at its first checkout and
    /// shared by the clients it serves.
    pub link: Option<std::sync::Arc<crate::clients::ServerLink>>,
}

async fn read_whole<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<(u8, BytesMut), ServerError> {
    loop {
        if let Some((tag, total)) = frame::header(buf, MAX_WHOLE_MESSAGE)
            .map_err(|e| ServerError::Protocol(e.to_string()))?
        {
            if buf.len() >= total {
                let mut msg = buf.split_to(total);
                msg.advance(frame::HEADER_LEN);
                return Ok((tag, msg));
            }
        }
        buf.reserve(8192);
        if stream.read_buf(buf).await? == 0 {
            return Err(ServerError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

/// A login refused for its startup parameters (the `options` of `server_tcp_keepalive`), not
/// for its credentials or database.
fn refuses_options(e: &ErrorFields) -> bool {
    e.code == "08P01" && e.message.contains("startup parameter")
}

fn io_other(e: impl std::fmt::Display) -> ServerError {
    ServerError::Protocol(e.to_string())
}

impl ServerConn {
    /// Opens and logs in a server connection for a pool.
    pub async fn connect(
        settings: &PoolSettings,
        keys: &UpstreamKeys,
        pool: usize,
        id: u64,
        timeout: Duration,
    ) -> Result<ServerConn, ServerError> {
        Self::connect_as(settings, keys, "pgsluice", pool, id, timeout).await
    }

    /// [`ServerConn::connect`] with the session's `application_name` (control connections
    /// use it to say who they are).
    pub async fn connect_as(
        settings: &PoolSettings,
        keys: &UpstreamKeys,
        application_name: &str,
        pool: usize,
        id: u64,
        timeout: Duration,
    ) -> Result<ServerConn, ServerError> {
        let addr = if socket::is_unix_host(&settings.host) {
            socket::socket_path(&settings.host, settings.port)
                .display()
                .to_string()
        } else {
            format!("{}:{}", settings.host, settings.port)
        };
        let connect = async {
            let options =
                (settings.server_keepalive.as_deref()).filter(|_| !keys.refuses_options(&addr));
            let once = |options| {
                Self::connect_inner(settings, keys, &addr, application_name, pool, id, options)
            };
            match once(options).await {
                // A pooler in between (PgBouncer: 08P01 "unsupported startup parameter:
                // options", or "... in options: tcp_keepalives_idle"): the login is tried
                // again without, and that upstream remembered once it works.
                Err(ServerError::Rejected(e)) if options.is_some() && refuses_options(&e) => {
                    let conn = once(None).await?;
                    if keys.note_refuses_options(&addr) {
                        tracing::warn!(
                            upstream = %addr,
                            error = %e.message,
                            "the upstream refuses the startup parameter `options`: its servers \
                             are opened without asking them to probe (server_tcp_keepalive)"
                        );
                    }
                    Ok(conn)
                }
                r => r,
            }
        };
        tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| ServerError::ConnectTimeout(addr.clone()))?
    }

    async fn connect_inner(
        settings: &PoolSettings,
        keys: &UpstreamKeys,
        addr: &str,
        application_name: &str,
        pool: usize,
        id: u64,
        options: Option<&str>,
    ) -> Result<ServerConn, ServerError> {
        let sock = socket::connect(&settings.host, settings.port)
            .await
            .map_err(|source| ServerError::Connect {
                addr: addr.to_owned(),
                source,
            })?;
        let peer = match &sock {
            #[cfg(feature = "io-uring")]
            Socket::Uring(_) => unreachable!("moved to the ring below"),
            Socket::Tcp(tcp) => {
                tcp.set_nodelay(true)?;
                let keepalive = socket2::TcpKeepalive::new()
                    .with_time(Duration::from_secs(60))
                    .with_interval(Duration::from_secs(10));
                let sock = socket2::SockRef::from(tcp);
                sock.set_tcp_keepalive(&keepalive)?;
                // New sockets have the kernel's default: nothing to set for zero.
                let user_timeout = settings.tcp_user_timeout;
                if !user_timeout.is_zero() {
                    if let Err(e) = crate::socket::set_user_timeout(&sock, user_timeout) {
                        // Usable without it: the kernel's default stays.
                        tracing::warn!(error = %e, "could not set tcp_user_timeout on a server connection");
                    }
                }
                Addr::Tcp(tcp.peer_addr()?)
            }
            // Its name as configured, for cancels (the kernel's may differ, e.g. a symlink).
            Socket::Unix(_) => Addr::unix(&settings.host, settings.port),
        };
        let mut stream = Stream::from(sock.into_ring_for_server()?);
        negotiate_tls(&mut stream, settings, addr).await?;
        let now = crate::clock::stamp_now();
        let mut conn = ServerConn {
            stream,
            buf: BytesMut::with_capacity(16 * 1024),
            cursor: Default::default(),
            statements: Default::default(),
            key: ServerKey {
                addr: peer,
                pid: 0,
                secret: 0,
            },
            reported: Vec::new(),
            session: Default::default(),
            txn: None,
            created: now,
            check_due: false,
            connected: std::time::SystemTime::now(),
            last_used: now,
            pool,
            id,
            link: None,
        };
        conn.login(settings, keys, application_name, options)
            .await?;
        Ok(conn)
    }

    async fn login(
        &mut self,
        s: &PoolSettings,
        keys: &UpstreamKeys,
        application_name: &str,
        options: Option<&str>,
    ) -> Result<(), ServerError> {
        let mut out = BytesMut::new();
        let params = [
            ("user", s.upstream_user.as_str()),
            ("database", s.upstream_dbname.as_str()),
            ("application_name", application_name),
        ];
        let options = options.map(|o| ("options", o));
        frontend::startup_message(params.iter().copied().chain(options), &mut out)
            .map_err(io_other)?;
        self.stream.write_all(&out).await?;
        // Without a password, what a client's own login taught (passthrough), for a pool
        // that logs in as its client user.
        let learned = match s.upstream_password {
            None if s.upstream_user == s.user => {
                keys.learned(&s.user, &format!("{}:{}", s.host, s.port))
            }
            _ => None,
        };
        let mut auth = UpstreamLogin::new(
            &s.upstream_user,
            s.upstream_password.as_deref(),
            learned,
            keys,
        );
        let mut reported_bytes = 0;
        loop {
            let (tag, body) = read_whole(&mut self.stream, &mut self.buf).await?;
            let mut out = BytesMut::new();
            // What follows AuthenticationOk must wait for it: a server (or a man in the
            // middle) that skips it, or a SCRAM exchange it began, is refused.
            if matches!(
                tag,
                backend::PARAMETER_STATUS | backend::BACKEND_KEY_DATA | backend::READY_FOR_QUERY
            ) && !auth.authenticated()
            {
                return Err(ServerError::Protocol(format!(
                    "server sent message {:?} before AuthenticationOk",
                    tag as char
                )));
            }
            match tag {
                backend::AUTHENTICATION => {
                    if body.len() < 4 {
                        return Err(ServerError::Protocol("short authentication message".into()));
                    }
                    let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                    auth.answer(code, &body[4..], &mut out)?;
                    if !out.is_empty() {
                        self.stream.write_all(&out).await?;
                    }
                }
                backend::PARAMETER_STATUS => {
                    reported_bytes += body.len();
                    if self.reported.len() >= MAX_REPORTED || reported_bytes > MAX_WHOLE_MESSAGE {
                        return Err(ServerError::Protocol(format!(
                            "more than {MAX_REPORTED} parameters or {MAX_WHOLE_MESSAGE} bytes of ParameterStatus during login"
                        )));
                    }
                    let mut strs = CStrings(&body);
                    if let (Some(k), Some(v)) = (strs.next_str(), strs.next_str()) {
                        self.reported.push((
                            String::from_utf8_lossy(k).into_owned(),
                            String::from_utf8_lossy(v).into_owned(),
                        ));
                    }
                }
                backend::BACKEND_KEY_DATA => {
                    // Protocol 3.0 (what pgsluice asks for): a 4-byte process id and a
                    // 4-byte key, nothing else.
                    if body.len() != 8 {
                        return Err(ServerError::Protocol(format!(
                            "BackendKeyData of {} bytes under protocol 3.0",
                            body.len()
                        )));
                    }
                    self.key.pid = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                    self.key.secret = i32::from_be_bytes([body[4], body[5], body[6], body[7]]);
                }
                backend::ERROR_RESPONSE => {
                    return Err(ServerError::Rejected(ErrorFields::parse(&body)))
                }
                backend::READY_FOR_QUERY => return Ok(()),
                backend::NOTICE_RESPONSE | backend::NEGOTIATE_PROTOCOL_VERSION => {}
                other => {
                    return Err(ServerError::Protocol(format!(
                        "unexpected message {:?} during login",
                        other as char
                    )))
                }
            }
        }
    }

    /// Runs one simple query on an idle server and returns its rows as text.
    /// Only for the proxy's own small statements (parameter sync, reset, rollback).
    pub async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, ServerError> {
        debug_assert!(self.cursor.at_boundary() && self.buf.is_empty());
        let mut out = BytesMut::new();
        messages::query(&mut out, sql);
        self.stream.write_all(&out).await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let (tag, body) = read_whole(&mut self.stream, &mut self.buf).await?;
            match tag {
                backend::DATA_ROW => rows.push(parse_data_row(&body)?),
                backend::ERROR_RESPONSE => error = Some(ErrorFields::parse(&body)),
                backend::COPY_IN_RESPONSE | backend::COPY_BOTH_RESPONSE => {
                    return Err(ServerError::Protocol(
                        "the proxy's own query started COPY".into(),
                    ))
                }
                backend::READY_FOR_QUERY => {
                    if body.first().copied().and_then(TransactionStatus::from_byte)
                        != Some(TransactionStatus::Idle)
                    {
                        return Err(ServerError::Protocol(
                            "server is not idle after the proxy's query".into(),
                        ));
                    }
                    return match error {
                        Some(e) => Err(ServerError::Query(e)),
                        None => Ok(rows),
                    };
                }
                _ => {}
            }
        }
    }

    /// Reads one whole message (outside the relay only).
    pub async fn read_message(&mut self) -> Result<(u8, BytesMut), ServerError> {
        read_whole(&mut self.stream, &mut self.buf).await
    }

    /// Closes politely: Terminate if the socket takes it right away, then drop.
    pub fn close(mut self) {
        self.stream.try_write_all_now(&messages::TERMINATE);
    }

    /// True when an idle connection looks alive: nothing to read and no EOF.
    pub fn looks_alive(&self) -> bool {
        self.stream.looks_idle()
    }
}

/// Asks the server for TLS (SSLRequest) as `server_tls.mode` says, and starts it.
async fn negotiate_tls(
    stream: &mut Stream,
    settings: &PoolSettings,
    addr: &str,
) -> Result<(), ServerError> {
    let tls = &settings.tls;
    let Some(config) = tls.config.clone() else {
        return Ok(());
    };
    // No TLS over a Unix socket (PostgreSQL offers none there; libpq does not ask).
    // `Config::validate` refuses a mode that requires it for a socket directory.
    if stream.socket().is_unix() {
        return Ok(());
    }
    let failed = |reason: String| ServerError::Tls {
        addr: addr.to_owned(),
        reason,
    };
    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    stream.write_all(&request).await?;
    // One byte exactly: anything the server sent after it belongs to the TLS handshake.
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => {
            let name = tls.name_for(&settings.host).map_err(&failed)?;
            stream.connect_tls(config, name).await.map_err(|e| {
                failed(match tls.mode {
                    ServerTlsMode::VerifyCa | ServerTlsMode::VerifyFull => format!(
                        "handshake failed: {e} (check server_tls.ca_file{})",
                        if tls.mode == ServerTlsMode::VerifyFull {
                            " and that the certificate names the host or server_tls.server_name"
                        } else {
                            ""
                        }
                    ),
                    _ => format!("handshake failed: {e}"),
                })
            })
        }
        b'N' if tls.mode == ServerTlsMode::Prefer => Ok(()),
        b'N' => Err(failed(format!(
            "the server does not accept TLS, and server_tls.mode is {}",
            tls.mode.as_str()
        ))),
        other => Err(ServerError::Protocol(format!(
            "unexpected answer {:?} to SSLRequest",
            other as char
        ))),
    }
}

pub(crate) fn parse_data_row(body: &[u8]) -> Result<Vec<Option<String>>, ServerError> {
    let bad = || ServerError::Protocol("malformed DataRow".into());
    let n = i16::from_be_bytes(
        body.get(..2)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    );
    let mut rest = &body[2..];
    let mut row = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let len = i32::from_be_bytes(
            rest.get(..4)
                .ok_or_else(bad)?
                .try_into()
                .map_err(|_| bad())?,
        );
        rest = &rest[4..];
        if len < 0 {
            row.push(None);
        } else {
            let v = rest.get(..len as usize).ok_or_else(bad)?;
            row.push(Some(String::from_utf8_lossy(v).into_owned()));
            rest = &rest[len as usize..];
        }
    }
    Ok(row)
}

/// Asks PostgreSQL to cancel whatever the session `key` is running (a CancelRequest on a new
/// connection). Waits until the server has read it, so the cancel is in effect on return.
pub async fn send_cancel(key: ServerKey) -> Result<(), std::io::Error> {
    let stream = socket::connect_addr(key.addr).await?;
    cancel_over(stream, key.pid, key.secret).await
}

/// Sends a CancelRequest for (`pid`, `secret`) on `stream`, a new connection to a server
/// or to a peered pgsluice, and waits until the other end has read it and closed.
pub async fn cancel_over(mut stream: Socket, pid: i32, secret: i32) -> Result<(), std::io::Error> {
    let mut out = BytesMut::new();
    frontend::cancel_request(pid, secret, &mut out);
    stream.write_all(&out).await?;
    // The server closes the connection once it has handled the request. Not closed in
    // time: the request may still be acted on, later (the caller must know).
    let mut sink = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut sink)).await {
        Ok(_) => Ok(()),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the cancel request was not handled in 5 s",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::messages::Severity;

    /// Only a refusal of the startup parameters turns `options` off for an upstream, not a
    /// login error that happens to name a role or database "options".
    #[test]
    fn a_refusal_of_options_is_told_from_other_login_errors() {
        let e = |code: &str, msg: &str| ErrorFields::new(Severity::Fatal, code, msg);
        // PgBouncer before 1.20, and after.
        assert!(refuses_options(&e(
            "08P01",
            "unsupported startup parameter: options"
        )));
        assert!(refuses_options(&e(
            "08P01",
            "unsupported startup parameter in options: tcp_keepalives_idle"
        )));
        assert!(!refuses_options(&e(
            "28P01",
            "password authentication failed for user \"options_ro\""
        )));
        assert!(!refuses_options(&e(
            "3D000",
            "database \"options\" does not exist"
        )));
        assert!(!refuses_options(&e(
            "08P01",
            "invalid length of startup packet"
        )));
    }
}
