//! Framing: every regular message is a 1-byte tag, a 4-byte big-endian length that counts itself
//! but not the tag, then the body. The proxy relays bytes in bulk and reads only these 5-byte
//! headers (plus the status byte of ReadyForQuery); bodies pass through untouched.

use thiserror::Error;

/// Size of a message header: tag + length.
pub const HEADER_LEN: usize = 5;

/// A message header that does not make sense.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("invalid message length {len} for message type {tag:?} (must be at least 4)")]
    TooShort { tag: char, len: i64 },
    #[error("message type {tag:?} is {len} bytes long, over the limit of {limit} bytes")]
    TooLong { tag: char, len: usize, limit: usize },
}

/// Reads a header at the start of `buf`: returns the tag and the total size of the message
/// on the wire (header included). `None` when fewer than 5 bytes are present.
#[inline]
pub fn header(buf: &[u8], limit: usize) -> Result<Option<(u8, usize)>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let tag = buf[0];
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(FrameError::TooShort {
            tag: tag as char,
            len: len as i64,
        });
    }
    let len = len as usize;
    if len > limit {
        return Err(FrameError::TooLong {
            tag: tag as char,
            len,
            limit,
        });
    }
    Ok(Some((tag, len + 1)))
}

/// A streaming scanner over one direction of a connection.
///
/// It is fed whatever a read returned (any chunking: split headers, many messages per read,
/// one message over many reads) and reports each message when its last byte has passed,
/// with the tag and the first body byte (enough for ReadyForQuery's status). It never
/// buffers more than a header, so a 1 GB DataRow costs nothing extra.
#[derive(Debug, Default, Clone)]
pub struct Scanner {
    hdr: [u8; HEADER_LEN],
    hdr_len: u8,
    tag: u8,
    /// Bytes of the current body not yet seen.
    left: usize,
    /// First byte of the current body, once seen.
    first: Option<u8>,
}

impl Scanner {
    /// True when the scanner stands exactly between two messages.
    pub fn at_boundary(&self) -> bool {
        self.hdr_len == 0 && self.left == 0
    }

    /// Feeds bytes; calls `on_message(tag, first_body_byte)` for each message completed.
    /// `limit` caps a message length; a bad header stops the scan with an error.
    #[inline]
    pub fn feed(
        &mut self,
        mut data: &[u8],
        limit: usize,
        mut on_message: impl FnMut(u8, Option<u8>),
    ) -> Result<(), FrameError> {
        while !data.is_empty() {
            if self.left > 0 {
                if self.first.is_none() {
                    self.first = Some(data[0]);
                }
                let n = self.left.min(data.len());
                self.left -= n;
                data = &data[n..];
                if self.left == 0 {
                    on_message(self.tag, self.first);
                }
                continue;
            }
            // Fast path: a whole header in `data`.
            if self.hdr_len == 0 && data.len() >= HEADER_LEN {
                let (tag, total) = header(data, limit)?.expect("5 bytes present");
                self.start(tag, total - HEADER_LEN, &mut on_message);
                data = &data[HEADER_LEN..];
                continue;
            }
            let take = (HEADER_LEN - self.hdr_len as usize).min(data.len());
            self.hdr[self.hdr_len as usize..self.hdr_len as usize + take]
                .copy_from_slice(&data[..take]);
            self.hdr_len += take as u8;
            data = &data[take..];
            if self.hdr_len as usize == HEADER_LEN {
                let hdr = self.hdr;
                let (tag, total) = header(&hdr, limit)?.expect("5 bytes present");
                self.hdr_len = 0;
                self.start(tag, total - HEADER_LEN, &mut on_message);
            }
        }
        Ok(())
    }

    #[inline]
    fn start(&mut self, tag: u8, body: usize, on_message: &mut impl FnMut(u8, Option<u8>)) {
        self.tag = tag;
        self.first = None;
        self.left = body;
        if body == 0 {
            on_message(tag, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn header_rejects_bad_lengths() {
        assert_eq!(header(&[b'Q', 0, 0, 0], 100), Ok(None));
        assert!(matches!(
            header(&[b'Q', 0, 0, 0, 3], 100),
            Err(FrameError::TooShort { .. })
        ));
        assert!(matches!(
            header(&[b'Q', 0xff, 0xff, 0xff, 0xff], 100),
            Err(FrameError::TooShort { .. })
        ));
        assert!(matches!(
            header(&[b'Q', 0x40, 0, 0, 0], 100),
            Err(FrameError::TooLong { .. })
        ));
        assert_eq!(header(&[b'S', 0, 0, 0, 4], 100), Ok(Some((b'S', 5))));
    }

    #[test]
    fn several_messages_in_one_read() {
        let mut wire = msg(b'C', b"SELECT 1\0");
        wire.extend(msg(b'Z', b"I"));
        wire.extend(msg(b'S', b""));
        let mut seen = vec![];
        Scanner::default()
            .feed(&wire, 1 << 20, |t, f| seen.push((t, f)))
            .unwrap();
        assert_eq!(
            seen,
            vec![(b'C', Some(b'S')), (b'Z', Some(b'I')), (b'S', None)]
        );
    }

    fn arb_messages() -> impl Strategy<Value = Vec<(u8, Vec<u8>)>> {
        proptest::collection::vec(
            (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..300)),
            0..20,
        )
    }

    proptest! {
        /// Any chunking of a valid stream yields the same messages, in order.
        #[test]
        fn chunking_does_not_matter(msgs in arb_messages(), cuts in proptest::collection::vec(1usize..64, 1..50)) {
            let wire: Vec<u8> = msgs.iter().flat_map(|(t, b)| msg(*t, b)).collect();
            let expected: Vec<(u8, Option<u8>)> = msgs.iter().map(|(t, b)| (*t, b.first().copied())).collect();
            let mut scanner = Scanner::default();
            let mut seen = vec![];
            let mut rest = &wire[..];
            let mut i = 0;
            while !rest.is_empty() {
                let n = cuts[i % cuts.len()].min(rest.len());
                scanner.feed(&rest[..n], 1 << 20, |t, f| seen.push((t, f))).unwrap();
                rest = &rest[n..];
                i += 1;
            }
            prop_assert_eq!(seen, expected);
            prop_assert!(scanner.at_boundary());
        }

        /// Arbitrary bytes never panic the scanner; they are either messages or an error.
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = Scanner::default().feed(&data, 1 << 16, |_, _| {});
        }
    }
}
