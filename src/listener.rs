//! The client accept loop: enforces `max_client_conn` and spawns one task per client, from
//! the TCP listener and, with `listen_unix`, a Unix socket as well (same path after accept).

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;

use crate::app::Shared;
use crate::client;
use crate::config::Config;
use crate::protocol::messages::{ErrorFields, Severity};
use crate::socket::{self, Socket};

/// Length of the queue of connections the kernel completes before pgsluice accepts them
/// (capped by `net.core.somaxconn`). Larger than tokio's 1024: a burst of thousands of
/// clients (every task of a deploy starting at once) would otherwise lose SYNs and wait
/// for their retransmission, 1 s and more.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds the client listener (the first address `addr` resolves to that binds); with
/// `reuse_port` (`so_reuseport`), other processes that set it too may bind the same port.
pub async fn bind(addr: &str, reuse_port: bool) -> std::io::Result<TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        if reuse_port {
            socket.set_reuseport(true)?;
        }
        match socket.bind(a).and_then(|()| socket.listen(LISTEN_BACKLOG)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to listen on")
    }))
}

/// Connections beyond `max_client_conn` that may still log in to the admin console, so
/// that an operator can look at a proxy that is full.
pub const ADMIN_RESERVE: usize = 5;

/// TCP keepalive on a client socket as the configuration says now (a reload applies to
/// connections accepted after it): a client host that vanished without closing is found
/// after `tcp_keepidle + tcp_keepintvl × tcp_keepcnt` and its connection closed.
fn set_keepalive(stream: &tokio::net::TcpStream, shared: &Shared) {
    let c = shared.pools.config();
    if c.tcp_keepalive == 1 {
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(c.tcp_keepidle)
            .with_interval(c.tcp_keepintvl)
            .with_retries(c.tcp_keepcnt);
        if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
            tracing::debug!(error = %e, "could not set TCP keepalive on a client socket");
        }
    }
}

/// The sockets clients connect to.
#[derive(Debug)]
pub struct Listeners {
    pub tcp: TcpListener,
    pub unix: Option<UnixSocket>,
}

impl From<TcpListener> for Listeners {
    fn from(tcp: TcpListener) -> Self {
        Listeners { tcp, unix: None }
    }
}

/// The `listen_unix` socket. Dropping it (the proxy stops accepting) removes its file.
#[derive(Debug)]
pub struct UnixSocket {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the file bound, so that a file another process put there since
    /// is left alone.
    file: (u64, u64),
}

impl UnixSocket {
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for UnixSocket {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.file {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Binds `DIR/.s.PGSQL.PORT` for `listen_unix = DIR` and the TCP listener's port; `None`
/// when `listen_unix` is empty.
pub async fn bind_unix_for(config: &Config, tcp: &TcpListener) -> io::Result<Option<UnixSocket>> {
    if config.listen_unix.is_empty() {
        return Ok(None);
    }
    let port = tcp.local_addr()?.port();
    bind_unix(
        &socket::socket_path(&config.listen_unix, port),
        config.unix_socket_mode,
    )
    .await
    .map(Some)
}

/// Binds a Unix socket at `path` with permissions `mode`. A file left there by a process
/// that ended without removing it is replaced; a socket something still answers on is not
/// (an error: another pgsluice or PostgreSQL runs there).
pub async fn bind_unix(path: &std::path::Path, mode: u32) -> io::Result<UnixSocket> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    let shown = path.display();
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{shown} exists and is not a socket"),
            ));
        }
        match tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::UnixStream::connect(path),
        )
        .await
        {
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(path = %shown, "removing a stale Unix socket (nothing listens on it)");
                std::fs::remove_file(path)?;
            }
            Ok(Err(e)) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("{shown} exists and cannot be checked: {e}"),
                ))
            }
            Ok(Ok(_)) | Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{shown} is in use: another process listens on it"),
                ))
            }
        }
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot bind {shown}: {e}")))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    let m = std::fs::symlink_metadata(path)?;
    Ok(UnixSocket {
        listener,
        path: path.to_owned(),
        file: (m.dev(), m.ino()),
    })
}

/// The next client from either listener.
async fn accept(listeners: &Listeners) -> io::Result<Socket> {
    let unix = async {
        match &listeners.unix {
            Some(u) => u.listener.accept().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = listeners.tcp.accept() => r.map(|(s, _)| Socket::Tcp(s)),
        r = unix => r.map(|(s, _)| Socket::Unix(s)),
    }
}

/// Accepts clients forever.
pub async fn run(listeners: Listeners, shared: Arc<Shared>) {
    let max = shared.pools.config().max_client_conn as usize;
    let slots = Arc::new(Semaphore::new(max));
    let reserve = Arc::new(Semaphore::new(ADMIN_RESERVE));
    loop {
        let stream = match accept(&listeners).await {
            Ok(stream) => stream,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                shared
                    .metrics
                    .error(crate::metrics::ErrorKind::AcceptFailed);
                tracing::error!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // TCP only: a Unix socket has no Nagle and no keepalive.
        if let Socket::Tcp(tcp) = &stream {
            let _ = tcp.set_nodelay(true);
            set_keepalive(tcp, &shared);
        }
        let stream = match stream.into_ring() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot move a client's socket to io_uring");
                continue;
            }
        };
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                let tracker = &shared.stop.clients;
                tracker.spawn(client::task(stream, shared.clone(), None, permit));
            }
            Err(_) => match reserve.clone().try_acquire_owned() {
                // It may be an operator: read its startup packet before refusing it.
                Ok(permit) => {
                    let tracker = &shared.stop.clients;
                    tracker.spawn(client::task(stream, shared.clone(), Some(max), permit));
                }
                Err(_) => {
                    shared
                        .metrics
                        .error(crate::metrics::ErrorKind::TooManyClients);
                    tokio::spawn(refuse(stream, max));
                }
            },
        }
    }
}

/// Tells a client over `max_client_conn` why it is turned away.
async fn refuse(mut stream: Socket, max: usize) {
    use tokio::io::AsyncWriteExt;
    tracing::warn!(max_client_conn = max, "client refused: too many clients");
    let mut buf = bytes::BytesMut::new();
    ErrorFields::new(
        Severity::Fatal,
        "53300",
        format!("no more connections allowed (max_client_conn = {max})"),
    )
    .encode(&mut buf);
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&buf)).await;
}
