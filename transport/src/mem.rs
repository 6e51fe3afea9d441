//! An in-memory transport with the same behaviour as the QUIC one, for tests
//! and the simulation: named endpoints on a [`MemNetwork`], streams of
//! `Bytes` chunks with backpressure, certificate trust modelled by a flag.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use crate::identity::PeerIdentity;
use crate::stream::{RecvStream, SendStream, StreamError};
use crate::transport::{Connection, Transport, TransportError};

/// Chunks a stream buffers before the writer waits.
const STREAM_CHUNKS_MAX: usize = 64;

type Incoming = mpsc::UnboundedSender<Result<MemConnection, TransportError>>;

/// A set of in-memory endpoints that can reach each other by name.
#[derive(Debug, Clone, Default)]
pub struct MemNetwork {
    listeners: Arc<Mutex<HashMap<String, Incoming>>>,
}

impl MemNetwork {
    /// An empty network.
    pub fn new() -> Self {
        Self::default()
    }

    /// An endpoint named `identity.name` holding a valid cluster certificate.
    pub fn endpoint(&self, identity: PeerIdentity) -> MemTransport {
        self.make(identity, true)
    }

    /// An endpoint whose certificate the cluster does not trust: its dials
    /// are refused, and the endpoint it dials reports a rejected peer.
    pub fn outsider(&self, identity: PeerIdentity) -> MemTransport {
        self.make(identity, false)
    }

    fn make(&self, identity: PeerIdentity, trusted: bool) -> MemTransport {
        let (tx, rx) = mpsc::unbounded_channel();
        self.listeners
            .lock()
            .expect("network lock")
            .insert(identity.name.clone(), tx);
        MemTransport {
            network: self.clone(),
            identity: Arc::new(identity),
            trusted,
            incoming: Arc::new(tokio::sync::Mutex::new(rx)),
        }
    }
}

/// One endpoint on a [`MemNetwork`].
#[derive(Debug, Clone)]
pub struct MemTransport {
    network: MemNetwork,
    identity: Arc<PeerIdentity>,
    trusted: bool,
    incoming:
        Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Result<MemConnection, TransportError>>>>,
}

impl MemTransport {
    /// Removes this endpoint from the network: later dials to it fail.
    pub fn close(&self) {
        self.network
            .listeners
            .lock()
            .expect("network lock")
            .remove(&self.identity.name);
    }
}

impl Transport for MemTransport {
    type Addr = String;
    type Connection = MemConnection;

    async fn connect(&self, addr: &String) -> Result<MemConnection, TransportError> {
        let listener = self
            .network
            .listeners
            .lock()
            .expect("network lock")
            .get(addr)
            .cloned();
        let connect_err = |reason: &str| TransportError::Connect {
            addr: addr.clone(),
            reason: reason.to_owned(),
        };
        let listener = listener.ok_or_else(|| connect_err("no endpoint with that name"))?;
        if !self.trusted {
            let _ = listener.send(Err(TransportError::PeerRejected {
                remote: self.identity.name.clone(),
                reason: "invalid peer certificate: not signed by the cluster CA".into(),
            }));
            return Err(connect_err(
                "peer aborted the handshake: TLS alert BadCertificate (peer does not trust our certificate)",
            ));
        }
        let (ours, theirs) = MemConnection::pair(self.identity.clone(), addr);
        listener
            .send(Ok(theirs))
            .map_err(|_| connect_err("endpoint closed"))?;
        Ok(ours)
    }

    async fn accept(&self) -> Result<MemConnection, TransportError> {
        self.incoming
            .lock()
            .await
            .recv()
            .await
            .unwrap_or(Err(TransportError::EndpointClosed))
    }

    fn local_identity(&self) -> &PeerIdentity {
        &self.identity
    }
}

type StreamPair = (MemSend, MemRecv);

/// One side of an in-memory connection.
#[derive(Debug, Clone)]
pub struct MemConnection {
    peer: Arc<PeerIdentity>,
    to_peer: mpsc::UnboundedSender<StreamPair>,
    from_peer: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<StreamPair>>>,
    closed: watch::Sender<Option<String>>,
}

impl MemConnection {
    fn pair(dialer: Arc<PeerIdentity>, listener_name: &str) -> (Self, Self) {
        // The listener's identity is what its certificate would say: the
        // dialler only learns the name it dialled; a host role is assumed.
        let listener = Arc::new(PeerIdentity::new(listener_name, crate::Role::Host));
        let (a_tx, a_rx) = mpsc::unbounded_channel();
        let (b_tx, b_rx) = mpsc::unbounded_channel();
        let (closed, _) = watch::channel(None);
        let dialer_side = Self {
            peer: listener,
            to_peer: a_tx,
            from_peer: Arc::new(tokio::sync::Mutex::new(b_rx)),
            closed: closed.clone(),
        };
        let listener_side = Self {
            peer: dialer,
            to_peer: b_tx,
            from_peer: Arc::new(tokio::sync::Mutex::new(a_rx)),
            closed,
        };
        (dialer_side, listener_side)
    }

    fn check_open(&self) -> Result<(), TransportError> {
        match &*self.closed.borrow() {
            Some(reason) => Err(TransportError::ConnectionLost(reason.clone())),
            None => Ok(()),
        }
    }
}

impl Connection for MemConnection {
    type Send = MemSend;
    type Recv = MemRecv;

    async fn open_stream(&self) -> Result<StreamPair, TransportError> {
        self.check_open()?;
        let (ours_tx, theirs_rx) = stream_channel(&self.closed);
        let (theirs_tx, ours_rx) = stream_channel(&self.closed);
        self.to_peer
            .send((theirs_tx, theirs_rx))
            .map_err(|_| TransportError::ConnectionLost("peer is gone".into()))?;
        Ok((ours_tx, ours_rx))
    }

    async fn accept_stream(&self) -> Result<StreamPair, TransportError> {
        self.check_open()?;
        let mut closed = self.closed.subscribe();
        let mut incoming = self.from_peer.lock().await;
        tokio::select! {
            pair = incoming.recv() => pair.ok_or_else(|| TransportError::ConnectionLost("peer is gone".into())),
            _ = closed.wait_for(Option::is_some) => Err(self.check_open().err().unwrap_or(TransportError::ConnectionLost("closed".into()))),
        }
    }

    fn peer(&self) -> &PeerIdentity {
        &self.peer
    }

    fn close(&self, reason: &str) {
        self.closed.send_replace(Some(format!("closed: {reason}")));
    }

    fn is_closed(&self) -> bool {
        self.closed.borrow().is_some()
    }
}

enum Chunk {
    Data(Bytes),
    Fin,
}

fn stream_channel(closed: &watch::Sender<Option<String>>) -> (MemSend, MemRecv) {
    let (tx, rx) = mpsc::channel(STREAM_CHUNKS_MAX);
    (
        MemSend {
            tx: Some(tx),
            closed: closed.subscribe(),
        },
        MemRecv {
            rx,
            pending: Bytes::new(),
            finished: false,
            closed: closed.subscribe(),
        },
    )
}

fn lost(closed: &watch::Receiver<Option<String>>) -> Option<StreamError> {
    closed
        .borrow()
        .as_ref()
        .map(|r| StreamError::ConnectionLost(r.clone()))
}

/// Sending half of an in-memory stream.
pub struct MemSend {
    tx: Option<mpsc::Sender<Chunk>>,
    closed: watch::Receiver<Option<String>>,
}

impl std::fmt::Debug for MemSend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemSend").finish_non_exhaustive()
    }
}

impl SendStream for MemSend {
    async fn write_chunk(&mut self, chunk: Bytes) -> Result<(), StreamError> {
        if let Some(e) = lost(&self.closed) {
            return Err(e);
        }
        let tx = self.tx.as_ref().ok_or(StreamError::Finished)?;
        if chunk.is_empty() {
            return Ok(());
        }
        tx.send(Chunk::Data(chunk))
            .await
            .map_err(|_| StreamError::Stopped(0))
    }

    fn finish(&mut self) -> Result<(), StreamError> {
        // A closed connection delivers nothing more, not even a clean end
        // (which the reader would take for an orderly goodbye).
        if let Some(e) = lost(&self.closed) {
            return Err(e);
        }
        let tx = self.tx.take().ok_or(StreamError::Finished)?;
        // The reader may be gone already; finishing is still fine then.
        if let Err(mpsc::error::TrySendError::Full(fin)) = tx.try_send(Chunk::Fin) {
            tokio::spawn(async move { tx.send(fin).await });
        }
        Ok(())
    }
}

/// Receiving half of an in-memory stream.
pub struct MemRecv {
    rx: mpsc::Receiver<Chunk>,
    pending: Bytes,
    finished: bool,
    closed: watch::Receiver<Option<String>>,
}

impl std::fmt::Debug for MemRecv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemRecv").finish_non_exhaustive()
    }
}

impl RecvStream for MemRecv {
    async fn read_chunk(&mut self, max: usize) -> Result<Option<Bytes>, StreamError> {
        if self.pending.is_empty() && !self.finished {
            if let Some(e) = lost(&self.closed) {
                return Err(e);
            }
            let mut closed = self.closed.clone();
            let next = tokio::select! {
                next = self.rx.recv() => next,
                _ = closed.wait_for(Option::is_some) => return Err(lost(&self.closed).unwrap_or(StreamError::Reset(0))),
            };
            match next {
                Some(Chunk::Data(b)) => self.pending = b,
                Some(Chunk::Fin) => self.finished = true,
                // The writer went away: because the connection closed (say
                // so), or because it was dropped unfinished (a reset).
                None => return Err(lost(&self.closed).unwrap_or(StreamError::Reset(0))),
            }
        }
        if self.pending.is_empty() {
            return Ok(None);
        }
        let n = max.min(self.pending.len());
        Ok(Some(self.pending.split_to(n)))
    }
}
