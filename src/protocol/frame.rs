//! Framing: every regular message is a 1-byte tag, a 4-byte big-endian length that counts itself
//! but not the tag, then the body. The proxy relays bytes in bulk and reads only these 5-byte
//! headers; bodies pass through untouched (see [`crate::relay`] for the few it reads).

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
    #[error("message type {tag:?} is {len} bytes long where it is always {expected}")]
    WrongLength {
        tag: char,
        len: usize,
        expected: usize,
    },
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

#[cfg(test)]
mod tests {
    use super::*;

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

    proptest::proptest! {
        /// Any bytes give a header, "need more" or an error; never a panic.
        #[test]
        fn any_bytes(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..16)) {
            if let Ok(Some((_, total))) = header(&data, 1 << 20) {
                proptest::prop_assert!((5..=(1 << 20) + 1).contains(&total));
            }
        }
    }
}
