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
use crate::socket::{self, Addr, Socket};

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

/// The options of a client's TCP socket, as the configuration says.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Wanted {
    /// TCP keepalive (`None`: off): a client host that vanished without closing is found
    /// after `tcp_keepidle + tcp_keepintvl × tcp_keepcnt` and its connection closed.
    keepalive: Option<(Duration, Duration, u32)>,
    /// `tcp_user_timeout` (zero: the kernel's default).
    user_timeout: Duration,
}

fn options_wanted(shared: &Shared) -> Wanted {
    let c = shared.pools.config();
    Wanted {
        keepalive: (c.tcp_keepalive == 1).then_some((
            c.tcp_keepidle,
            c.tcp_keepintvl,
            c.tcp_keepcnt,
        )),
        user_timeout: c.tcp_user_timeout,
    }
}

/// Sets TCP_NODELAY, keepalive and TCP_USER_TIMEOUT on a socket (a listener, or one
/// client's).
fn set_options(sock: socket2::SockRef<'_>, want: Wanted) -> io::Result<()> {
    sock.set_tcp_nodelay(true)?;
    match want.keepalive {
        Some((idle, interval, count)) => sock.set_tcp_keepalive(
            &socket2::TcpKeepalive::new()
                .with_time(idle)
                .with_interval(interval)
                .with_retries(count),
        )?,
        None => sock.set_keepalive(false)?,
    }
    // Last: a kernel that refuses it still gets the others.
    crate::socket::set_user_timeout(&sock, want.user_timeout)
}

/// The socket options of accepted TCP clients. Linux copies TCP_NODELAY and the keepalive
/// settings of a listener into every socket it accepts, so they are set once on the
/// listener instead of on each client (five system calls a login, a tenth of a short
/// connection's). The first client accepted is checked; where a kernel does not copy them,
/// every client gets them set as before. A reload's keepalive settings reach the listener
/// at the next accept: they apply to connections accepted after it.
struct ClientOptions {
    /// What the listener has (`None`: not set yet).
    listener: Option<Wanted>,
    /// Checked on an accepted client that the kernel copied the listener's options.
    checked: bool,
    /// Set on each client instead.
    per_client: bool,
}

impl ClientOptions {
    /// Sets the options on the listener, before it accepts anyone.
    fn new(listener: &TcpListener, want: Wanted) -> ClientOptions {
        let mut options = ClientOptions {
            listener: None,
            checked: false,
            per_client: false,
        };
        options.set_listener(listener, want);
        options
    }

    fn set_listener(&mut self, listener: &TcpListener, want: Wanted) {
        match set_options(socket2::SockRef::from(listener), want) {
            Ok(()) => self.listener = Some(want),
            Err(e) => {
                tracing::debug!(error = %e, "cannot set socket options on the listener: setting them on each client");
                self.per_client = true;
            }
        }
    }

    /// Gives `client` the options `want` (the configuration's now).
    fn apply(&mut self, listener: &TcpListener, client: &tokio::net::TcpStream, want: Wanted) {
        if !self.per_client && self.listener != Some(want) {
            // A reload changed them. This client was accepted with the listener's old ones.
            self.set_listener(listener, want);
            self.set_on(client, want);
            return;
        }
        if !self.per_client && !self.checked {
            self.checked = true;
            if !inherited(client, want) {
                tracing::debug!("accepted sockets do not take the listener's options: setting them on each client");
                self.per_client = true;
            }
        }
        if self.per_client {
            self.set_on(client, want);
        }
    }

    fn set_on(&self, client: &tokio::net::TcpStream, want: Wanted) {
        if let Err(e) = set_options(socket2::SockRef::from(client), want) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY, keepalive and TCP_USER_TIMEOUT on a client socket");
        }
    }
}

/// Whether `client` has TCP_NODELAY and the keepalive and user-timeout settings `want`.
fn inherited(client: &tokio::net::TcpStream, want: Wanted) -> bool {
    let s = socket2::SockRef::from(client);
    let keepalive_ok = match want.keepalive {
        None => s.keepalive().ok() == Some(false),
        Some((idle, ..)) => {
            s.keepalive().ok() == Some(true) && s.tcp_keepalive_time().ok() == Some(idle)
        }
    };
    s.tcp_nodelay().unwrap_or(false)
        && keepalive_ok
        && crate::socket::has_user_timeout(&s, want.user_timeout)
}

/// The sockets clients connect to.
#[derive(Debug)]
pub struct Listeners {
    pub tcp: TcpListener,
    pub unix: Option<UnixSocket>,
    /// `metrics.listen`, when the caller bound it (so that a failure stops the start);
    /// otherwise the HTTP endpoint binds it itself.
    pub metrics: Option<TcpListener>,
}

impl From<TcpListener> for Listeners {
    fn from(tcp: TcpListener) -> Self {
        Listeners {
            tcp,
            unix: None,
            metrics: None,
        }
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

/// The next client from either listener, with its address when the accept gave one (TCP).
async fn accept(listeners: &Listeners) -> io::Result<(Socket, Option<Addr>)> {
    let unix = async {
        match &listeners.unix {
            Some(u) => u.listener.accept().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = listeners.tcp.accept() => r.map(|(s, a)| (Socket::Tcp(s), Some(Addr::Tcp(a)))),
        r = unix => r.map(|(s, _)| (Socket::Unix(s), None)),
    }
}

/// Accepts clients forever.
pub async fn run(listeners: Listeners, shared: Arc<Shared>) {
    let max = shared.pools.config().max_client_conn as usize;
    let slots = Arc::new(Semaphore::new(max));
    let reserve = Arc::new(Semaphore::new(ADMIN_RESERVE));
    let mut options = ClientOptions::new(&listeners.tcp, options_wanted(&shared));
    // A listener bound to one address is every TCP client's local address (no getsockname
    // per client); one bound to all addresses is asked per client.
    let tcp_local = listeners
        .tcp
        .local_addr()
        .ok()
        .filter(|a| !a.ip().is_unspecified())
        .map(Addr::Tcp);
    loop {
        let (stream, peer) = match accept(&listeners).await {
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
            options.apply(&listeners.tcp, tcp, options_wanted(&shared));
        }
        let addrs = client::Addrs {
            peer,
            local: if peer.is_some() { tcp_local } else { None },
        };
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
                tracker.spawn(client::task(stream, addrs, shared.clone(), None, permit));
            }
            Err(_) => match reserve.clone().try_acquire_owned() {
                // It may be an operator: read its startup packet before refusing it.
                Ok(permit) => {
                    let tracker = &shared.stop.clients;
                    tracker.spawn(client::task(
                        stream,
                        addrs,
                        shared.clone(),
                        Some(max),
                        permit,
                    ));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn options_of(s: &tokio::net::TcpStream) -> (bool, bool, Option<Duration>, Duration) {
        let s = socket2::SockRef::from(s);
        let on = s.keepalive().unwrap();
        let idle = on.then(|| s.tcp_keepalive_time().unwrap());
        let user_timeout = crate::socket::user_timeout(&s).unwrap();
        (s.tcp_nodelay().unwrap(), on, idle, user_timeout)
    }

    fn keepalive(idle: u64, interval: u64, count: u32, user_timeout: Duration) -> Wanted {
        Wanted {
            keepalive: Some((
                Duration::from_secs(idle),
                Duration::from_secs(interval),
                count,
            )),
            user_timeout,
        }
    }

    /// Connects a client and accepts it as the accept loop does.
    async fn accept_with(
        listener: &TcpListener,
        options: &mut ClientOptions,
        want: Wanted,
    ) -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let c = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (s, _) = listener.accept().await.unwrap();
        options.apply(listener, &s, want);
        (c, s)
    }

    /// Clients take TCP_NODELAY, keepalive and TCP_USER_TIMEOUT from the listener without a
    /// call of their own, and a reload's new settings reach the client accepted next and
    /// those after it.
    #[tokio::test]
    async fn accepted_clients_get_nodelay_and_keepalive() {
        let listener = bind("127.0.0.1:0", false).await.unwrap();
        // Not whole milliseconds: the kernel keeps 7,500 ms, which still counts as copied.
        let user_timeout = Duration::from_micros(7_500_400);
        let first = keepalive(61, 7, 4, user_timeout);
        let mut options = ClientOptions::new(&listener, first);
        let mut held = Vec::new();
        for _ in 0..3 {
            let (c, s) = accept_with(&listener, &mut options, first).await;
            let secs = Some(Duration::from_secs(61));
            let kept = Duration::from_millis(7_500);
            assert_eq!(options_of(&s), (true, true, secs, kept));
            held.push((c, s));
        }
        assert!(
            options.checked && !options.per_client,
            "the kernel copies the listener's options"
        );
        // A reload: a new idle time and the kernel's user timeout, then keepalive off.
        let second = keepalive(33, 5, 2, Duration::ZERO);
        for _ in 0..2 {
            let (c, s) = accept_with(&listener, &mut options, second).await;
            let secs = Some(Duration::from_secs(33));
            assert_eq!(options_of(&s), (true, true, secs, Duration::ZERO));
            held.push((c, s));
        }
        let off = Wanted {
            keepalive: None,
            user_timeout: Duration::from_secs(20),
        };
        for _ in 0..2 {
            let (c, s) = accept_with(&listener, &mut options, off).await;
            assert_eq!(options_of(&s), (true, false, None, Duration::from_secs(20)));
            held.push((c, s));
        }
        assert!(!options.per_client);
        // Those accepted earlier keep what they had.
        let (.., idle, timeout) = options_of(&held[0].1);
        assert_eq!(
            (idle, timeout),
            (Some(Duration::from_secs(61)), Duration::from_millis(7_500))
        );
    }
}
