//! What a client sends before it is logged in (the untagged startup packets, then the
//! PasswordMessage family), read through one small buffer: one `recv` takes whatever has
//! arrived, instead of exact reads of a header and then a body (two `recv`s per message, and
//! a third that fails with EAGAIN once the message is read).
//!
//! Reading ahead means bytes past the current message may be buffered. Who reads here keeps
//! that in mind: nothing buffered before a TLS handshake may be used after it (the caller
//! refuses an SSLRequest that came with more bytes, CVE-2021-23214), and whatever a client
//! sent after its last login message (a pipelined first Query) is handed on to the session
//! with [`LoginInput::into_leftover`].

use std::io;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Room a read asks the socket for at least: a whole startup packet or SCRAM message in one
/// `recv`, with room for what a client pipelines after it.
const READ_AHEAD: usize = 1024;

/// Bytes a client sent during login, not used yet.
#[derive(Debug, Default)]
pub struct LoginInput {
    buf: BytesMut,
}

impl LoginInput {
    pub fn new() -> LoginInput {
        LoginInput::default()
    }

    /// Reads until at least `n` bytes are buffered; `UnexpectedEof` if the client closes
    /// first. Reads at most `max(n, READ_AHEAD)` bytes past what is buffered, whatever the
    /// client sends: callers check a message's length before they ask for its body.
    pub async fn fill<S: AsyncRead + Unpin>(&mut self, stream: &mut S, n: usize) -> io::Result<()> {
        while self.buf.len() < n {
            let want = (n - self.buf.len()).max(READ_AHEAD);
            if self.buf.capacity() - self.buf.len() < want {
                self.buf.reserve(want);
            }
            // A read that leaves room unfilled drained the socket and clears its readiness
            // (tokio's `poll_read`), so the next wait goes to epoll, not to an EAGAIN.
            if stream.read_buf(&mut self.buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    }

    /// What is buffered.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Drops the first `n` buffered bytes (a message that was handled).
    pub fn consume(&mut self, n: usize) {
        self.buf.advance(n);
    }

    /// Takes everything buffered (the first bytes of a TLS handshake). The buffer itself,
    /// not a `split` of it: a split buffer is shared, and a shared `BytesMut` hides the size
    /// of its allocation from the checks that free a buffer a long message grew.
    pub fn take_all(&mut self) -> BytesMut {
        std::mem::take(&mut self.buf)
    }

    /// What the client sent after its login, for the session to read first.
    pub fn into_leftover(self) -> BytesMut {
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fills_across_reads_and_keeps_what_follows() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let mut input = LoginInput::new();
        tokio::io::AsyncWriteExt::write_all(&mut b, b"abc")
            .await
            .unwrap();
        let writer = tokio::spawn(async move {
            tokio::task::yield_now().await;
            tokio::io::AsyncWriteExt::write_all(&mut b, b"defgh")
                .await
                .unwrap();
            b
        });
        input.fill(&mut a, 5).await.unwrap();
        assert!(input.buffered().len() >= 5);
        assert_eq!(&input.buffered()[..5], b"abcde");
        input.consume(2);
        let b = writer.await.unwrap();
        drop(b);
        input.fill(&mut a, 6).await.unwrap();
        assert_eq!(input.buffered(), b"cdefgh");
        assert_eq!(
            input.fill(&mut a, 7).await.unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        assert_eq!(&input.into_leftover()[..], b"cdefgh");
    }
}
