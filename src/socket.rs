//! The two kinds of socket a connection runs over: TCP, or a Unix-domain socket (a client in
//! the same task or pod connecting through a shared volume, or a PostgreSQL on the same
//! host). [`Socket`] offers the few non-blocking calls [`crate::stream::Stream`] needs, each
//! one `match` on the kind: the relay keeps one code path, without boxing or allocation.
//!
//! Unix sockets follow PostgreSQL's naming: a directory plus a port name the file
//! `DIR/.s.PGSQL.PORT`, so `psql -h DIR -p PORT` finds it.

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// A connected socket.
#[derive(Debug)]
pub enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// Either kind, served through this thread's io_uring ring (`io_uring = true`).
    #[cfg(feature = "io-uring")]
    Uring(crate::uring::Sock),
}

/// Runs `$body` with `$s` bound to the socket inside `$sock`, whichever kind it is.
macro_rules! on_socket {
    ($sock:expr, $s:ident => $body:expr) => {
        match $sock {
            Socket::Tcp($s) => $body,
            Socket::Unix($s) => $body,
            #[cfg(feature = "io-uring")]
            Socket::Uring($s) => $body,
        }
    };
}

impl From<TcpStream> for Socket {
    fn from(s: TcpStream) -> Self {
        Socket::Tcp(s)
    }
}

impl From<UnixStream> for Socket {
    fn from(s: UnixStream) -> Self {
        Socket::Unix(s)
    }
}

impl Socket {
    /// Moves a client's socket to this thread's io_uring ring when there is one (see
    /// [`crate::uring`]); otherwise returns it as it is.
    pub fn into_ring(self) -> io::Result<Socket> {
        #[cfg(feature = "io-uring")]
        return self.into_ring_reading(crate::uring::Reads::Small);
        #[cfg(not(feature = "io-uring"))]
        Ok(self)
    }

    /// [`Socket::into_ring`] for a server's socket, which reads into large buffers.
    pub fn into_ring_for_server(self) -> io::Result<Socket> {
        #[cfg(feature = "io-uring")]
        return self.into_ring_reading(crate::uring::Reads::Large);
        #[cfg(not(feature = "io-uring"))]
        Ok(self)
    }

    #[cfg(feature = "io-uring")]
    fn into_ring_reading(self, reads: crate::uring::Reads) -> io::Result<Socket> {
        if !crate::uring::active() {
            return Ok(self);
        }
        use crate::uring::Sock;
        Ok(match self {
            Socket::Tcp(s) => Socket::Uring(Sock::new(s.into_std()?.into(), false, reads)),
            Socket::Unix(s) => Socket::Uring(Sock::new(s.into_std()?.into(), true, reads)),
            uring => uring,
        })
    }

    #[inline]
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        on_socket!(self, s => s.try_read(buf))
    }

    #[inline]
    pub fn try_read_buf<B: bytes::BufMut>(&self, buf: &mut B) -> io::Result<usize> {
        on_socket!(self, s => s.try_read_buf(buf))
    }

    #[inline]
    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        on_socket!(self, s => s.try_write(buf))
    }

    #[inline]
    pub fn try_write_vectored(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        on_socket!(self, s => s.try_write_vectored(bufs))
    }

    /// Runs `f` (a non-blocking socket call); `WouldBlock` from it clears the readiness.
    #[inline]
    pub fn try_io<R>(
        &self,
        interest: Interest,
        f: impl FnOnce() -> io::Result<R>,
    ) -> io::Result<R> {
        on_socket!(self, s => s.try_io(interest, f))
    }

    /// Waits until the socket is readable. Built on `poll_read_ready`, which keeps one
    /// waker per direction in the socket's registration, rather than on tokio's
    /// `readable()`, whose future joins a waiter list under a lock and leaves it again
    /// when dropped: a socket here is only ever waited on by the one task that owns it,
    /// and the relay creates this future at every wake-up.
    #[inline]
    pub async fn readable(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_read_ready(cx)).await
    }

    /// Waits until the socket is writable (see [`Socket::readable`]).
    #[inline]
    pub async fn writable(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_write_ready(cx)).await
    }

    /// Whether the runtime has seen the socket readable since a read last found it empty:
    /// one atomic load, no system call, and no waker left behind (unlike
    /// [`Socket::poll_read_ready`]). For a task that was woken and wants to know by what.
    #[inline]
    pub fn read_ready_now(&self) -> bool {
        match self {
            Socket::Tcp(s) => s.try_io(Interest::READABLE, || Ok(())).is_ok(),
            Socket::Unix(s) => s.try_io(Interest::READABLE, || Ok(())).is_ok(),
            #[cfg(feature = "io-uring")]
            Socket::Uring(s) => s.read_ready_now(),
        }
    }

    #[inline]
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_socket!(self, s => s.poll_read_ready(cx))
    }

    #[inline]
    pub fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_socket!(self, s => s.poll_write_ready(cx))
    }

    /// The socket as socket2 sees it (MSG_PEEK, socket options).
    pub fn sock_ref(&self) -> socket2::SockRef<'_> {
        on_socket!(self, s => socket2::SockRef::from(s))
    }

    /// The other end's address: for a Unix socket, the socket file. A client accepted on a
    /// Unix listener is given the listener's: its own name, if it bound one, is whatever
    /// it chose (any directory, a new one per connection), so it is not taken.
    pub fn peer(&self) -> Option<Addr> {
        match self {
            Socket::Tcp(s) => s.peer_addr().ok().map(Addr::Tcp),
            Socket::Unix(s) => {
                let named = |a: io::Result<tokio::net::unix::SocketAddr>| {
                    a.ok()
                        .and_then(|a| a.as_pathname().and_then(Addr::unix_file))
                };
                named(s.local_addr()).or_else(|| named(s.peer_addr()))
            }
            #[cfg(feature = "io-uring")]
            Socket::Uring(s) => {
                let sock = socket2::SockRef::from(s);
                if !s.is_unix() {
                    return sock.peer_addr().ok()?.as_socket().map(Addr::Tcp);
                }
                let named = |a: io::Result<socket2::SockAddr>| {
                    a.ok()
                        .and_then(|a| a.as_pathname().and_then(Addr::unix_file))
                };
                named(sock.local_addr()).or_else(|| named(sock.peer_addr()))
            }
        }
    }

    /// This end's address: for a Unix socket, the socket file when this end is the
    /// listener's side, else none.
    pub fn local(&self) -> Option<Addr> {
        match self {
            Socket::Tcp(s) => s.local_addr().ok().map(Addr::Tcp),
            Socket::Unix(s) => s
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().and_then(Addr::unix_file)),
            #[cfg(feature = "io-uring")]
            Socket::Uring(s) => {
                let local = socket2::SockRef::from(s).local_addr().ok()?;
                match s.is_unix() {
                    false => local.as_socket().map(Addr::Tcp),
                    true => local.as_pathname().and_then(Addr::unix_file),
                }
            }
        }
    }

    pub fn is_unix(&self) -> bool {
        #[cfg(feature = "io-uring")]
        if let Socket::Uring(s) = self {
            return s.is_unix();
        }
        matches!(self, Socket::Unix(_))
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_read(cx, buf),
            #[cfg(feature = "io-uring")]
            Socket::Uring(s) => s.poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_write(cx, data),
            Socket::Unix(s) => Pin::new(s).poll_write(cx, data),
            #[cfg(feature = "io-uring")]
            uring => Pin::new(uring).poll_write_vectored(cx, &[io::IoSlice::new(data)]),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Socket::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            #[cfg(feature = "io-uring")]
            Socket::Uring(s) => loop {
                match s.try_write_vectored(bufs) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::task::ready!(s.poll_write_ready(cx))?
                    }
                    r => return Poll::Ready(r),
                }
            },
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_flush(cx),
            Socket::Unix(s) => Pin::new(s).poll_flush(cx),
            #[cfg(feature = "io-uring")]
            Socket::Uring(s) => s.poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Unix(s) => Pin::new(s).poll_shutdown(cx),
            #[cfg(feature = "io-uring")]
            Socket::Uring(s) => s.poll_shutdown(cx),
        }
    }
}

/// Where a connection's end is: a TCP address, or a Unix socket named by its directory and
/// port (`DIR/.s.PGSQL.PORT`). `Copy`, so that a server's cancel key stays a plain value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Addr {
    Tcp(SocketAddr),
    Unix { dir: &'static Path, port: u16 },
}

impl Addr {
    /// The Unix socket of `dir` and `port`.
    pub fn unix(dir: &str, port: u16) -> Addr {
        Addr::Unix {
            dir: intern(Path::new(dir)),
            port,
        }
    }

    /// The address of a socket file named as PostgreSQL names them; none for another name.
    fn unix_file(path: &Path) -> Option<Addr> {
        let port = path
            .file_name()?
            .to_str()?
            .strip_prefix(SOCKET_PREFIX)?
            .parse()
            .ok()?;
        Some(Addr::Unix {
            dir: intern(path.parent()?),
            port,
        })
    }

    pub fn port(&self) -> u16 {
        match self {
            Addr::Tcp(a) => a.port(),
            Addr::Unix { port, .. } => *port,
        }
    }

    /// The host as the admin console shows it: the IP address, or `unix` (as PgBouncer).
    pub fn host_text(&self) -> String {
        match self {
            Addr::Tcp(a) => a.ip().to_string(),
            Addr::Unix { .. } => "unix".into(),
        }
    }

    /// The IP address, for TCP.
    pub fn ip(&self) -> Option<std::net::IpAddr> {
        match self {
            Addr::Tcp(a) => Some(a.ip()),
            Addr::Unix { .. } => None,
        }
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Tcp(a) => a.fmt(f),
            Addr::Unix { dir, port } => socket_path(dir, *port).display().fmt(f),
        }
    }
}

/// The file name's prefix before the port, as PostgreSQL and libpq name it.
const SOCKET_PREFIX: &str = ".s.PGSQL.";

/// `DIR/.s.PGSQL.PORT`.
pub fn socket_path(dir: impl AsRef<Path>, port: u16) -> PathBuf {
    dir.as_ref().join(format!("{SOCKET_PREFIX}{port}"))
}

/// True when a configured `host` names a Unix socket directory (libpq's rule: it starts
/// with a slash).
pub fn is_unix_host(host: &str) -> bool {
    host.starts_with('/')
}

/// Opens a connection to `host:port`, or to the Unix socket in directory `host`.
pub async fn connect(host: &str, port: u16) -> io::Result<Socket> {
    if is_unix_host(host) {
        Ok(Socket::Unix(
            UnixStream::connect(socket_path(host, port)).await?,
        ))
    } else {
        // Resolves the host name on every call (pgsluice keeps no DNS cache): after a
        // failover's DNS flip, the next new server reaches the new address.
        Ok(Socket::Tcp(TcpStream::connect((host, port)).await?))
    }
}

/// Opens a connection to `addr`.
pub async fn connect_addr(addr: Addr) -> io::Result<Socket> {
    match addr {
        Addr::Tcp(a) => Ok(Socket::Tcp(TcpStream::connect(a).await?)),
        Addr::Unix { dir, port } => Ok(Socket::Unix(
            UnixStream::connect(socket_path(dir, port)).await?,
        )),
    }
}

/// Sets TCP_USER_TIMEOUT (`tcp_user_timeout`, in the whole milliseconds the kernel keeps;
/// zero: the kernel's default). Zero is written only over another value (a listener after
/// a reload), so that a kernel without the option fails nothing that does not use it. Linux
/// only; elsewhere the kernel's default stays.
pub fn set_user_timeout(
    sock: &socket2::SockRef<'_>,
    timeout: std::time::Duration,
) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        if timeout.is_zero() && user_timeout(sock).is_none_or(|t| t.is_zero()) {
            return Ok(());
        }
        sock.set_tcp_user_timeout((!timeout.is_zero()).then_some(timeout))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (sock, timeout);
        Ok(())
    }
}

/// Whether `sock` has TCP_USER_TIMEOUT `want` (in the whole milliseconds the kernel keeps).
/// Where it cannot be read: true off Linux (where pgsluice does not set it), and on Linux
/// for the default only.
pub fn has_user_timeout(sock: &socket2::SockRef<'_>, want: std::time::Duration) -> bool {
    let want = std::time::Duration::from_millis(want.as_millis() as u64);
    match user_timeout(sock) {
        Some(t) => t == want,
        None => want.is_zero() || cfg!(not(target_os = "linux")),
    }
}

/// The socket's TCP_USER_TIMEOUT (zero: the kernel's default); `None` where it cannot be
/// read.
pub fn user_timeout(sock: &socket2::SockRef<'_>) -> Option<std::time::Duration> {
    #[cfg(target_os = "linux")]
    {
        sock.tcp_user_timeout().ok().map(Option::unwrap_or_default)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = sock;
        None
    }
}

/// A directory as a `&'static Path`, so that [`Addr`] stays `Copy`. Each distinct
/// directory is kept once for the life of the process: they come from the configuration,
/// so there are few.
fn intern(dir: &Path) -> &'static Path {
    static DIRS: Mutex<Option<HashSet<&'static Path>>> = Mutex::new(None);
    let mut dirs = DIRS.lock().unwrap_or_else(|p| p.into_inner());
    let dirs = dirs.get_or_insert_with(HashSet::new);
    if let Some(d) = dirs.get(dir) {
        return d;
    }
    let d: &'static Path = Box::leak(dir.to_path_buf().into_boxed_path());
    dirs.insert(d);
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_addresses_are_named_as_postgresql_names_them() {
        let a = Addr::unix("/var/run/postgresql", 5432);
        assert_eq!(a.to_string(), "/var/run/postgresql/.s.PGSQL.5432");
        assert_eq!(a.host_text(), "unix");
        assert_eq!(a.port(), 5432);
        assert_eq!(
            Addr::unix_file(Path::new("/var/run/postgresql/.s.PGSQL.5432")),
            Some(a)
        );
        assert_eq!(Addr::unix_file(Path::new("/tmp/other.sock")), None);
        // Interned once: the same directory is the same pointer.
        let (Addr::Unix { dir: d1, .. }, Addr::Unix { dir: d2, .. }) =
            (a, Addr::unix("/var/run/postgresql", 6432))
        else {
            unreachable!()
        };
        assert!(std::ptr::eq(d1, d2));
        assert!(is_unix_host("/tmp") && !is_unix_host("db.internal"));
    }
}
