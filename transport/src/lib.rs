//! ferry-transport: everything that crosses the wire between two ferry nodes.
//!
//! - [`frame`]: an 8-byte header (magic, kind, length) before every body; the
//!   length is checked against a hard per-kind limit ([`limits`]) before a
//!   byte of the body is buffered.
//! - [`version`]: the first exchange on a connection; the current and the
//!   previous protocol versions are accepted.
//! - [`message`]: control messages in rkyv 0.8, validated with bytecheck on
//!   receipt.
//! - [`batch`]: page and extent batches. A validated rkyv table (addresses,
//!   lengths, zero flags) precedes the raw data, which the receiver copies
//!   once, straight into its destination.
//! - [`transport`]: the [`Transport`]/[`Connection`] traits, implemented over
//!   QUIC with mutual TLS ([`quic`]) and in memory ([`mem`]).
//! - [`pki`]: the cluster CA, certificates with a name and a role, and the
//!   rustls configurations (one crypto provider: *ring*).
//!
//! Invariants: nothing here panics on input from a peer; every length from a
//! peer is bounded before it is used; page data is copied at most once on
//! each side.
//!
//! ```
//! use ferry_transport::batch::{BatchBuilder, BatchKind, SliceSink, apply, parse_body};
//! use ferry_transport::{FRAME_HEADER_BYTES, PAGE_BYTES};
//!
//! let mut builder = BatchBuilder::new(BatchKind::Pages);
//! builder.push_page(1, &[7u8; PAGE_BYTES]);
//! builder.push_page(2, &[0u8; PAGE_BYTES]); // sent as a flag, no data
//! let frame = builder.finish().to_contiguous();
//!
//! let mut guest = vec![0u8; 4 * PAGE_BYTES];
//! let (table, data) = parse_body(BatchKind::Pages, &frame[FRAME_HEADER_BYTES..]).unwrap();
//! apply(&table, data, &mut SliceSink::pages(&mut guest)).unwrap();
//! assert_eq!(guest[PAGE_BYTES], 7);
//! ```

pub mod batch;
pub mod bench;
pub mod frame;
pub mod identity;
pub mod limits;
pub mod mem;
pub mod message;
pub mod pki;
pub mod pool;
pub mod quic;
pub mod revocation;
pub mod session;
pub mod stream;
pub mod transport;
pub mod version;

pub use frame::{FRAME_HEADER_BYTES, FrameError, FrameHeader, FrameKind};
pub use identity::{PeerIdentity, Role};
pub use limits::PAGE_BYTES;
pub use stream::{
    FrameReader, FrameWriter, ReadError, RecvStream, SendStream, StreamError, WriteError,
};
pub use transport::{Connection, Transport, TransportError};
