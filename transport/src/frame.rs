//! Framing: every message on a stream is an 8-byte header then a body.
//!
//! ```text
//! 0      1      2             4                     8
//! +------+------+-------------+---------------------+----------------
//! | 0xFE | kind |  reserved=0 |  body length (LE)   | body ...
//! +------+------+-------------+---------------------+----------------
//! ```
//!
//! The header is checked in full (magic, known kind, reserved zero, length
//! within the kind's limit) before any byte of the body is read.

use crate::limits::{CONTROL_BODY_BYTES_MAX, FRAME_BODY_BYTES_MAX};

/// First byte of every frame: catches streams that are not ferry streams
/// (or are out of sync) at the first byte.
pub const FRAME_MAGIC: u8 = 0xFE;

/// Bytes in a frame header.
pub const FRAME_HEADER_BYTES: usize = 8;

/// What a frame body holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// Version handshake: the first frame on a connection's control stream.
    Hello = 1,
    /// The answer to a [`FrameKind::Hello`].
    HelloReply = 2,
    /// An rkyv control message (request, response, event).
    Control = 3,
    /// A batch of guest pages.
    PageBatch = 4,
    /// A batch of disk extents.
    ExtentBatch = 5,
    /// Sender has nothing more on this stream.
    End = 6,
}

impl FrameKind {
    /// The kind for a header byte, if it names one.
    pub fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            1 => Self::Hello,
            2 => Self::HelloReply,
            3 => Self::Control,
            4 => Self::PageBatch,
            5 => Self::ExtentBatch,
            6 => Self::End,
            _ => return None,
        })
    }

    /// Largest body this kind may carry.
    pub fn body_bytes_max(self) -> usize {
        match self {
            Self::Hello | Self::HelloReply => 4096,
            Self::Control => CONTROL_BODY_BYTES_MAX,
            Self::PageBatch | Self::ExtentBatch => FRAME_BODY_BYTES_MAX,
            Self::End => 0,
        }
    }
}

/// A decoded and checked frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// What the body holds.
    pub kind: FrameKind,
    /// Body length in bytes, already checked against `kind.body_bytes_max()`.
    pub body_len: usize,
}

/// Why a frame header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The first byte is not [`FRAME_MAGIC`].
    #[error("bad frame magic {0:#04x}: not a ferry stream or out of sync")]
    BadMagic(u8),
    /// The kind byte names no kind this version knows.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// The reserved bytes are not zero.
    #[error("reserved frame header bytes are not zero")]
    ReservedNotZero,
    /// The body is larger than the kind allows.
    #[error("{kind:?} frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLong {
        /// Frame kind.
        kind: FrameKind,
        /// Announced length.
        len: u64,
        /// Limit for this kind.
        max: usize,
    },
}

impl FrameHeader {
    /// A header for `kind` with a body of `body_len` bytes.
    ///
    /// # Panics
    /// If `body_len` exceeds the kind's limit: building an oversized frame is
    /// a bug in this node, not an operating error.
    pub fn new(kind: FrameKind, body_len: usize) -> Self {
        assert!(
            body_len <= kind.body_bytes_max(),
            "{kind:?} body of {body_len} bytes over limit"
        );
        Self { kind, body_len }
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; FRAME_HEADER_BYTES] {
        let len = u32::try_from(self.body_len).expect("body length checked against limit");
        let len = len.to_le_bytes();
        [
            FRAME_MAGIC,
            self.kind as u8,
            0,
            0,
            len[0],
            len[1],
            len[2],
            len[3],
        ]
    }

    /// Decodes and checks a header.
    pub fn decode(bytes: &[u8; FRAME_HEADER_BYTES]) -> Result<Self, FrameError> {
        if bytes[0] != FRAME_MAGIC {
            return Err(FrameError::BadMagic(bytes[0]));
        }
        let kind = FrameKind::from_byte(bytes[1]).ok_or(FrameError::UnknownKind(bytes[1]))?;
        if bytes[2] != 0 || bytes[3] != 0 {
            return Err(FrameError::ReservedNotZero);
        }
        let len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        let max = kind.body_bytes_max();
        let len_usize = usize::try_from(len).unwrap_or(usize::MAX);
        if len_usize > max {
            return Err(FrameError::TooLong {
                kind,
                len: u64::from(len),
                max,
            });
        }
        Ok(Self {
            kind,
            body_len: len_usize,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        for kind in [
            FrameKind::Hello,
            FrameKind::Control,
            FrameKind::PageBatch,
            FrameKind::End,
        ] {
            let h = FrameHeader::new(kind, 0);
            assert_eq!(FrameHeader::decode(&h.encode()), Ok(h));
        }
        let h = FrameHeader::new(FrameKind::PageBatch, 1 << 20);
        assert_eq!(FrameHeader::decode(&h.encode()), Ok(h));
    }

    #[test]
    fn oversized_length_is_refused_from_header_alone() {
        let mut bytes = FrameHeader::new(FrameKind::Control, 0).encode();
        bytes[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            FrameHeader::decode(&bytes),
            Err(FrameError::TooLong { len, .. }) if len == u64::from(u32::MAX)
        ));
    }

    #[test]
    fn garbage_headers_are_refused() {
        assert_eq!(
            FrameHeader::decode(&[0, 1, 0, 0, 0, 0, 0, 0]),
            Err(FrameError::BadMagic(0))
        );
        assert_eq!(
            FrameHeader::decode(&[FRAME_MAGIC, 99, 0, 0, 0, 0, 0, 0]),
            Err(FrameError::UnknownKind(99))
        );
        assert_eq!(
            FrameHeader::decode(&[FRAME_MAGIC, 3, 1, 0, 0, 0, 0, 0]),
            Err(FrameError::ReservedNotZero)
        );
    }
}
