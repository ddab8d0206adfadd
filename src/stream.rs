//! A socket to a client or a server (TCP or Unix, see [`crate::socket`]), plain or with TLS
//! (rustls) over it.
//!
//! The relay drives sockets by readiness: wait for `readable`, then `read_some` until it would
//! block; `try_write` until it would block, then wait for `writable`. [`Stream`] offers those
//! calls for both kinds, so the relay has one path; on a plain socket they are the socket's own.
//! With TLS, records are read and written with the same non-blocking socket calls, and rustls
//! may hold output the socket did not take yet: [`Stream::wants_write`] says so, and the relay
//! does not call a transaction done, nor wait only for input, while it does.
//!
//! Everything outside the relay (login, the proxy's own queries, error messages) uses the
//! `AsyncRead`/`AsyncWrite` implementations.

use std::io::{self, Read, Write};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

use crate::socket::{Addr, Socket};

/// A TLS session over the stream's socket.
#[derive(Debug)]
struct Tls {
    conn: rustls::Connection,
    /// Decrypted bytes waiting in rustls.
    plain: usize,
    /// The peer closed (close_notify or end of the stream).
    eof: bool,
    /// Our close_notify is queued.
    closing: bool,
}

/// A connection's socket, with TLS when negotiated.
#[derive(Debug)]
pub struct Stream {
    sock: Socket,
    tls: Option<Box<Tls>>,
}

/// `io::Read` over a non-blocking tokio socket: `WouldBlock` clears its read readiness.
struct TryRead<'a>(&'a Socket);

impl Read for TryRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

/// `io::Write` over a non-blocking tokio socket: `WouldBlock` clears its write readiness.
struct TryWrite<'a>(&'a Socket);

impl Write for TryWrite<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl<S: Into<Socket>> From<S> for Stream {
    fn from(sock: S) -> Self {
        Stream {
            sock: sock.into(),
            tls: None,
        }
    }
}

impl Stream {
    /// The socket underneath.
    pub fn socket(&self) -> &Socket {
        &self.sock
    }

    /// The other end's address (see [`Socket::peer`]).
    pub fn peer(&self) -> Option<Addr> {
        self.sock.peer()
    }

    /// This end's address (see [`Socket::local`]).
    pub fn local(&self) -> Option<Addr> {
        self.sock.local()
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// `TLSv1_3/TLS13_AES_256_GCM_SHA384`-style description; empty for a plain socket.
    pub fn tls_description(&self) -> String {
        let Some(tls) = &self.tls else {
            return String::new();
        };
        let version = tls
            .conn
            .protocol_version()
            .map(|v| format!("{v:?}"))
            .unwrap_or_default();
        let suite = tls
            .conn
            .negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite()))
            .unwrap_or_default();
        format!("{version}/{suite}")
    }

    /// The ALPN protocol the TLS peer agreed to, if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.tls.as_ref().and_then(|t| t.conn.alpn_protocol())
    }

    /// Starts TLS as the server side (towards a client). `early` holds bytes of the
    /// ClientHello already read from the socket (direct TLS).
    pub async fn accept_tls(
        &mut self,
        config: std::sync::Arc<rustls::ServerConfig>,
        early: &[u8],
    ) -> io::Result<()> {
        let mut conn = rustls::ServerConnection::new(config).map_err(tls_error)?;
        let mut early = early;
        while !early.is_empty() {
            conn.read_tls(&mut early)?;
        }
        self.start_tls(conn.into()).await
    }

    /// Starts TLS as the client side (towards a server).
    pub async fn connect_tls(
        &mut self,
        config: std::sync::Arc<rustls::ClientConfig>,
        name: rustls::pki_types::ServerName<'static>,
    ) -> io::Result<()> {
        let conn = rustls::ClientConnection::new(config, name).map_err(tls_error)?;
        self.start_tls(conn.into()).await
    }

    async fn start_tls(&mut self, mut conn: rustls::Connection) -> io::Result<()> {
        // Records fed before (the early bytes of a direct TLS handshake, maybe a whole
        // ClientHello) are processed before anything is awaited.
        if let Err(e) = conn.process_new_packets() {
            let _ = conn.write_tls(&mut TryWrite(&self.sock));
            return Err(tls_error(e));
        }
        self.tls = Some(Box::new(Tls {
            conn,
            plain: 0,
            eof: false,
            closing: false,
        }));
        loop {
            let tls = self.tls.as_mut().expect("set above");
            if tls.conn.wants_write() {
                std::future::poll_fn(|cx| self.poll_flush_tls(cx)).await?;
                continue;
            }
            if !tls.conn.is_handshaking() {
                return Ok(());
            }
            self.sock.readable().await?;
            match self.pull_records() {
                Ok(true) => {}
                Ok(false) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads TLS records the socket holds and decrypts them. `Ok(false)` at end of stream.
    fn pull_records(&mut self) -> io::Result<bool> {
        let tls = self.tls.as_mut().expect("TLS stream");
        let got = tls.conn.read_tls(&mut TryRead(&self.sock))?;
        let state = match tls.conn.process_new_packets() {
            Ok(state) => state,
            Err(e) => {
                // Tell the peer why (an alert), as far as the socket takes it at once.
                let _ = tls.conn.write_tls(&mut TryWrite(&self.sock));
                return Err(tls_error(e));
            }
        };
        tls.plain = state.plaintext_bytes_to_read();
        if got == 0 || state.peer_has_closed() {
            tls.eof = true;
        }
        Ok(got > 0)
    }

    /// Decrypted bytes into `dst`: what rustls holds, else what the socket holds.
    /// `WouldBlock` when there is nothing yet; `Ok(0)` at end of stream.
    fn tls_read(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        debug_assert!(!dst.is_empty());
        if self.tls_held()? == 0 {
            return Ok(0);
        }
        let tls = self.tls.as_mut().expect("TLS stream");
        let n = tls.conn.reader().read(dst)?;
        tls.plain -= n.min(tls.plain);
        Ok(n)
    }

    /// How many decrypted bytes rustls holds, reading and decrypting what the socket has
    /// when it holds none (a record or a few: about 16 KiB at most). `WouldBlock` when there
    /// is nothing yet; `Ok(0)` at end of stream.
    fn tls_held(&mut self) -> io::Result<usize> {
        loop {
            let tls = self.tls.as_mut().expect("TLS stream");
            if tls.plain > 0 {
                return Ok(tls.plain);
            }
            if tls.eof {
                return Ok(0);
            }
            self.pull_records()?;
            // A key update or an alert may need an answer. If it cannot be sent, what was
            // decrypted is still handed out first (a server's last error before it closed).
            if self.wants_write() {
                match self.flush_tls() {
                    Err(e) if !would_block(&e) => {
                        let tls = self.tls.as_ref().expect("TLS stream");
                        if tls.plain == 0 && !tls.eof {
                            return Err(e);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Reads what is available into `buf`'s spare room, `max` bytes at most; `Ok(0)` at end
    /// of stream. (A buffer that grew for one big message has room for much more than a
    /// read should take: the reader bounds what it holds.)
    ///
    /// Plain socket: a read that leaves room unfilled has drained the socket, so it also clears
    /// the socket's readiness (as tokio's own `poll_read` does): the next wait then goes to
    /// epoll instead of to a `recv` that fails with EAGAIN, and an idle server's liveness
    /// check costs no system call.
    pub fn read_some(&mut self, buf: &mut BytesMut, max: usize) -> io::Result<usize> {
        // Callers reserve room first.
        let spare = buf.capacity() - buf.len();
        let room = spare.min(max);
        if room == 0 {
            // Ok(0) would read as the end of the stream.
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "read_some without room",
            ));
        }
        if self.tls.is_some() {
            // rustls copies out into initialized bytes: zero only what it holds, not all the
            // room (which can be a long query's, or a big result's 256 KiB) for every record.
            let room = room.min(self.tls_held()?);
            if room == 0 {
                return Ok(0);
            }
            let start = buf.len();
            buf.resize(start + room, 0);
            let r = self.tls_read(&mut buf[start..start + room]);
            buf.truncate(start + *r.as_ref().unwrap_or(&0));
            return r;
        }
        let sock = &self.sock;
        let mut got = 0;
        let r = sock.try_io(Interest::READABLE, || {
            got = if room == spare {
                sock.try_read_buf(buf)?
            } else {
                sock.try_read_buf(&mut bytes::BufMut::limit(&mut *buf, room))?
            };
            if got > 0 && got < room {
                // Not an error: tells try_io to clear the readiness it saw.
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(got)
            }
        });
        // Bytes read mean the error is the WouldBlock above (a failed read assigns nothing):
        // no need to look at its kind.
        match r {
            Err(_) if got > 0 => Ok(got),
            r => r,
        }
    }

    /// Waits until [`Stream::read_some`] may have something (or an error or end of stream).
    ///
    /// Polled again after a wake-up, it first looks at the readiness the runtime saw
    /// ([`Stream::read_ready_now`]): usually what woke the task, found without taking the
    /// registration's lock to store the waker once more. The first poll registers as usual
    /// (and counts against the task's cooperative budget), so a task never sleeps without
    /// its waker stored, nor spins on a socket that stays readable.
    pub async fn readable(&self) -> io::Result<()> {
        let mut again = false;
        std::future::poll_fn(|cx| {
            if std::mem::replace(&mut again, true) && self.read_ready_now() {
                return Poll::Ready(Ok(()));
            }
            self.poll_read_ready(cx)
        })
        .await
    }

    /// [`Stream::readable`] as a poll: ready at once when rustls holds plaintext.
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(tls) = &self.tls {
            if tls.plain > 0 || tls.eof {
                return Poll::Ready(Ok(()));
            }
        }
        self.sock.poll_read_ready(cx)
    }

    /// Whether [`Stream::read_some`] may find something now, going by what is already known
    /// (plaintext rustls holds, the readiness the runtime saw): no system call, no waker.
    #[inline]
    pub fn read_ready_now(&self) -> bool {
        if let Some(tls) = &self.tls {
            if tls.plain > 0 || tls.eof {
                return true;
            }
        }
        self.sock.read_ready_now()
    }

    /// [`Stream::writable`] as a poll.
    pub fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.sock.poll_write_ready(cx)
    }

    /// Waits until the socket may take more bytes.
    pub async fn writable(&self) -> io::Result<()> {
        self.sock.writable().await
    }

    /// Writes what the socket takes now. With TLS, bytes taken may still wait in rustls
    /// (see [`Stream::wants_write`]); `WouldBlock` while earlier output is still waiting.
    pub fn try_write(&mut self, data: &[u8]) -> io::Result<usize> {
        let Some(tls) = self.tls.as_mut() else {
            return self.sock.try_write(data);
        };
        if tls.conn.wants_write() {
            self.flush_tls()?;
        }
        let tls = self.tls.as_mut().expect("TLS stream");
        let n = tls.conn.writer().write(data)?;
        match self.flush_tls() {
            Err(e) if !would_block(&e) => Err(e),
            _ if n == 0 && !data.is_empty() => Err(io::ErrorKind::WouldBlock.into()),
            _ => Ok(n),
        }
    }

    /// Writes all of `data` and, with TLS, waits until rustls has passed it to the socket.
    pub async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.write_all(data).await?;
        if self.tls.is_some() {
            self.flush().await?;
        }
        Ok(())
    }

    /// True when TLS output waits for the socket.
    #[inline]
    pub fn wants_write(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.conn.wants_write())
    }

    /// Writes waiting TLS output; `WouldBlock` if the socket does not take all of it.
    pub fn flush_tls(&mut self) -> io::Result<()> {
        if let Some(tls) = self.tls.as_mut() {
            while tls.conn.wants_write() {
                tls.conn.write_tls(&mut TryWrite(&self.sock))?;
            }
        }
        Ok(())
    }

    fn poll_flush_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.flush_tls() {
                Err(e) if would_block(&e) => ready!(self.sock.poll_write_ready(cx))?,
                r => return Poll::Ready(r),
            }
        }
    }

    /// Writes `data` now if the socket takes it whole; best effort (closing messages).
    pub fn try_write_all_now(&mut self, data: &[u8]) {
        if let Some(tls) = self.tls.as_mut() {
            if tls.conn.writer().write_all(data).is_ok() && !tls.closing {
                tls.closing = true;
                tls.conn.send_close_notify();
            }
            let _ = self.flush_tls();
        } else {
            let _ = self.sock.try_write(data);
        }
    }

    /// True when the socket holds input right now (one `recv` with MSG_PEEK).
    pub fn has_input_now(&self) -> bool {
        #[cfg(feature = "io-uring")]
        if let Socket::Uring(s) = &self.sock {
            return s.has_input() || self.tls.as_ref().is_some_and(|t| t.plain > 0);
        }
        if self.tls.as_ref().is_some_and(|t| t.plain > 0) {
            return true;
        }
        let mut probe = [std::mem::MaybeUninit::<u8>::uninit()];
        matches!(self.sock.sock_ref().peek(&mut probe), Ok(n) if n > 0)
    }

    /// True when nothing arrived and the peer has not closed: what an idle server's socket
    /// should look like. No system call unless the socket was flagged readable.
    pub fn looks_idle(&self) -> bool {
        #[cfg(feature = "io-uring")]
        if let Socket::Uring(s) = &self.sock {
            return s.looks_idle() && self.tls.as_ref().is_none_or(|t| t.plain == 0 && !t.eof);
        }
        let mut probe = [std::mem::MaybeUninit::<u8>::uninit()];
        let r = match &self.tls {
            None => self
                .sock
                .try_io(Interest::READABLE, || self.sock.sock_ref().peek(&mut probe)),
            Some(tls) if tls.plain > 0 || tls.eof => return false,
            Some(_) => self
                .sock
                .try_io(Interest::READABLE, || self.sock.sock_ref().peek(&mut probe)),
        };
        matches!(r, Err(e) if would_block(&e))
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.tls.is_none() {
            return Pin::new(&mut this.sock).poll_read(cx, buf);
        }
        // Output rustls still holds (the last message of a write_all) must leave before we
        // wait for the answer to it: flushed until it is gone or the socket's writability
        // is awaited (a socket found writable again is flushed again, not taken as waited
        // for: no waker would be stored for it).
        while this.wants_write() {
            match this.flush_tls() {
                Err(e) if would_block(&e) => match this.sock.poll_write_ready(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => break,
                },
                Err(e) => return Poll::Ready(Err(e)),
                Ok(()) => break,
            }
        }
        loop {
            // Only the room for what rustls holds is zeroed, not all of the caller's.
            match this.tls_held() {
                Ok(held) => {
                    let n = held.min(buf.remaining());
                    if n > 0 {
                        let got = this.tls_read(buf.initialize_unfilled_to(n))?;
                        buf.advance(got);
                    }
                    return Poll::Ready(Ok(()));
                }
                Err(e) if would_block(&e) => ready!(this.sock.poll_read_ready(cx))?,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.tls.is_none() {
            return Pin::new(&mut this.sock).poll_write(cx, data);
        }
        loop {
            match this.try_write(data) {
                Err(e) if would_block(&e) => ready!(this.sock.poll_write_ready(cx))?,
                r => return Poll::Ready(r),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.tls.is_none() {
            return Pin::new(&mut this.sock).poll_flush(cx);
        }
        this.poll_flush_tls(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(tls) = this.tls.as_mut() {
            if !tls.closing {
                tls.closing = true;
                tls.conn.send_close_notify();
            }
            ready!(this.poll_flush_tls(cx))?;
        }
        Pin::new(&mut this.sock).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    /// `read_ready_now` answers from what the runtime saw, and a wait polled again after a
    /// wake-up still ends when bytes come, then waits (and is woken) again once they are read.
    #[tokio::test(flavor = "current_thread")]
    async fn readiness_is_seen_without_registering_again() {
        let (a, mut peer) = tokio::net::UnixStream::pair().unwrap();
        let mut s = Stream::from(Socket::from(a));
        let mut buf = BytesMut::with_capacity(64);
        // Nothing seen yet: a read would block, and the check says so without a syscall.
        assert!(!s.read_ready_now());
        assert_eq!(
            s.read_some(&mut buf, 64).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert!(!s.read_ready_now());
        // A wait that sleeps first, then is woken by the peer's bytes.
        let writer = tokio::spawn(async move {
            tokio::task::yield_now().await;
            peer.write_all(b"hello").await.unwrap();
            peer
        });
        tokio::time::timeout(Duration::from_secs(5), s.readable())
            .await
            .expect("the wait ends when bytes come")
            .unwrap();
        let mut peer = writer.await.unwrap();
        assert!(s.read_ready_now());
        assert_eq!(s.read_some(&mut buf, 64).unwrap(), 5);
        assert_eq!(&buf[..], b"hello");
        // Read short: the readiness is cleared, the next wait sleeps until more comes.
        assert!(!s.read_ready_now());
        let wait = tokio::time::timeout(Duration::from_millis(50), s.readable()).await;
        assert!(wait.is_err(), "nothing to read: the wait must not end");
        peer.write_all(b"!").await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), s.readable())
            .await
            .expect("woken again")
            .unwrap();
        // The end of the stream counts as readable too.
        drop(peer);
        buf.clear();
        assert_eq!(s.read_some(&mut buf, 64).unwrap(), 1);
        tokio::time::timeout(Duration::from_secs(5), s.readable())
            .await
            .expect("the end is seen")
            .unwrap();
        assert!(s.read_ready_now());
        assert_eq!(s.read_some(&mut buf, 64).unwrap(), 0);
    }
}
