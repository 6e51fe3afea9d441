//! The `Transport` trait: what the layers above need from a network.
//!
//! Two implementations pass one conformance suite (`tests/conformance.rs`):
//! [`QuicTransport`](crate::quic::QuicTransport) over quinn with mutual TLS,
//! and [`MemTransport`](crate::mem::MemTransport) in memory for tests and the
//! simulation.
//!
//! A peer learns about a stream opened with [`Connection::open_stream`] when
//! the opener first writes to it (QUIC's rule), so the opener speaks first.

use std::fmt::Debug;
use std::future::Future;

use crate::identity::PeerIdentity;
use crate::stream::{RecvStream, SendStream};

/// Why a transport operation failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TransportError {
    /// Could not reach or authenticate the peer at `addr`.
    #[error("connect to {addr}: {reason}")]
    Connect {
        /// The address dialled.
        addr: String,
        /// Why, in words.
        reason: String,
    },
    /// An incoming peer was dropped during the handshake (for example for a
    /// missing or untrusted certificate). The endpoint keeps accepting.
    #[error("peer {remote} rejected: {reason}")]
    PeerRejected {
        /// The peer's address.
        remote: String,
        /// Why, in words.
        reason: String,
    },
    /// The connection is gone.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// This endpoint was closed.
    #[error("endpoint closed")]
    EndpointClosed,
    /// The transport could not be set up.
    #[error("transport setup: {0}")]
    Setup(String),
}

impl TransportError {
    /// Whether an accept loop should carry on after this error.
    pub fn is_per_peer(&self) -> bool {
        matches!(self, Self::PeerRejected { .. })
    }
}

/// An endpoint that dials and accepts authenticated connections.
pub trait Transport: Send + Sync + 'static {
    /// How a peer is addressed.
    type Addr: Clone + Debug + Send + Sync + 'static;
    /// An established connection.
    type Connection: Connection;

    /// Dials `addr` and authenticates the peer.
    fn connect(
        &self,
        addr: &Self::Addr,
    ) -> impl Future<Output = Result<Self::Connection, TransportError>> + Send;

    /// The next authenticated incoming connection. A
    /// [`TransportError::PeerRejected`] concerns one peer only: call again.
    fn accept(&self) -> impl Future<Output = Result<Self::Connection, TransportError>> + Send;

    /// This endpoint's own identity.
    fn local_identity(&self) -> &PeerIdentity;
}

/// An authenticated connection to one peer, carrying many streams.
pub trait Connection: Clone + Debug + Send + Sync + 'static {
    /// Sending half of a stream.
    type Send: SendStream;
    /// Receiving half of a stream.
    type Recv: RecvStream;

    /// Opens a bidirectional stream.
    fn open_stream(
        &self,
    ) -> impl Future<Output = Result<(Self::Send, Self::Recv), TransportError>> + Send;

    /// Accepts the next bidirectional stream the peer opened.
    fn accept_stream(
        &self,
    ) -> impl Future<Output = Result<(Self::Send, Self::Recv), TransportError>> + Send;

    /// Who is at the other end, from its certificate.
    fn peer(&self) -> &PeerIdentity;

    /// Closes the connection, telling the peer `reason`.
    fn close(&self, reason: &str);

    /// Whether the connection is gone (closed by either side or lost), so
    /// a cached one must be dialled again.
    fn is_closed(&self) -> bool;

    /// The round-trip time as the connection measures it now (zero where
    /// there is no wire).
    fn rtt(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }

    /// The share (0 to 1) of packets sent so far that the connection
    /// declared lost (zero where there is no wire).
    fn loss_rate(&self) -> f64 {
        0.0
    }
}
