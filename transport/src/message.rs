//! rkyv encoding of control messages, validated on receipt.
//!
//! Any type that derives rkyv's `Archive`, `Serialize` and `Deserialize` (with
//! bytecheck's `CheckBytes` on its archive, which `derive(Archive)` adds)
//! can travel in a [`FrameKind::Control`](crate::FrameKind::Control) frame.
//! Decoding validates the whole archive before anything is read from it, so
//! a truncated or forged archive is an error, never a panic.

use bytes::{BufMut, Bytes, BytesMut};
use rkyv::api::high::{HighDeserializer, HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor;
use rkyv::ser::allocator::ArenaHandle;
use rkyv::util::AlignedVec;

use crate::frame::{FRAME_HEADER_BYTES, FrameHeader, FrameKind};

/// A type that can be encoded into a control frame.
pub trait WireEncode:
    for<'a> rkyv::Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, rancor::Error>>
{
}
impl<T> WireEncode for T where
    T: for<'a> rkyv::Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, rancor::Error>>
{
}

/// A type that can be decoded (after validation) from a control frame.
pub trait WireDecode: rkyv::Archive + Sized
where
    Self::Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<Self, HighDeserializer<rancor::Error>>,
{
}
impl<T> WireDecode for T
where
    T: rkyv::Archive,
    T::Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<T, HighDeserializer<rancor::Error>>,
{
}

/// Why a message could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    /// rkyv could not serialize the value (a bug in the type, in practice).
    #[error("encode message")]
    Encode(#[source] rancor::Error),
    /// The bytes are not a valid archive of the expected type.
    #[error("invalid message archive")]
    Decode(#[source] rancor::Error),
    /// The encoded message is larger than its frame kind allows.
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLong {
        /// Encoded length.
        len: usize,
        /// Limit.
        max: usize,
    },
}

/// Encodes `value` as a complete frame (header and body) of `kind`.
pub fn encode_frame<T: WireEncode>(kind: FrameKind, value: &T) -> Result<Bytes, MessageError> {
    let body = rkyv::to_bytes::<rancor::Error>(value).map_err(MessageError::Encode)?;
    let max = kind.body_bytes_max();
    if body.len() > max {
        return Err(MessageError::TooLong {
            len: body.len(),
            max,
        });
    }
    let mut out = BytesMut::with_capacity(FRAME_HEADER_BYTES + body.len());
    out.put_slice(&FrameHeader::new(kind, body.len()).encode());
    out.put_slice(&body);
    Ok(out.freeze())
}

/// Validates `body` as an archive of `T` and deserializes it.
pub fn decode_body<T>(body: &[u8]) -> Result<T, MessageError>
where
    T: WireDecode,
    T::Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<T, HighDeserializer<rancor::Error>>,
{
    rkyv::from_bytes::<T, rancor::Error>(body).map_err(MessageError::Decode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
    struct Probe {
        name: String,
        values: Vec<u64>,
        flag: Option<bool>,
    }

    #[test]
    fn round_trip_and_truncation() {
        let probe = Probe {
            name: "web-1".into(),
            values: vec![1, 2, 3, u64::MAX],
            flag: Some(true),
        };
        let frame = encode_frame(FrameKind::Control, &probe).expect("encode");
        let body = &frame[FRAME_HEADER_BYTES..];
        assert_eq!(decode_body::<Probe>(body).expect("decode"), probe);
        for cut in 0..body.len() {
            assert!(decode_body::<Probe>(&body[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn corrupt_relative_pointer_is_refused() {
        let probe = Probe {
            name: "x".repeat(40),
            values: vec![7; 8],
            flag: None,
        };
        let frame = encode_frame(FrameKind::Control, &probe).expect("encode");
        let mut body = frame[FRAME_HEADER_BYTES..].to_vec();
        // The root object sits at the end: name (8 bytes), values (relative
        // offset, length), flag (2 bytes). Claim a vector far longer than
        // the buffer, then point it outside the buffer.
        let n = body.len();
        let mut long = body.clone();
        long[n - 6..n - 2].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_body::<Probe>(&long).is_err());
        body[n - 10..n - 6].copy_from_slice(&0x7fff_0000i32.to_le_bytes());
        assert!(decode_body::<Probe>(&body).is_err());
    }
}
