//! The simulated network: the in-memory transport plus per-link bandwidth
//! and latency, cuts, partitions and clogging, all on tokio's (paused)
//! clock.
//!
//! Each link (an unordered host pair) is one pipe: every chunk written on
//! any stream between the two hosts queues behind the chunks before it, so
//! parallel lanes share the link's bandwidth as they would share a wire.
//!
//! Besides clean cuts and partitions (refused at once), a direction can be
//! *silenced* (a one-way partition, or both ways: a black hole): writes
//! succeed, chunks wait unseen, and they arrive when it heals — as QUIC
//! retransmits — unless it lasts past the transport's idle timeout, when
//! the connections close as QUIC's would; new connections wait the same.
//! With jitter, every chunk is late by a random amount of its own (a
//! retransmitted loss), so streams overtake each other; one stream stays
//! in order.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ferry_transport::mem::{MemConnection, MemNetwork, MemRecv, MemSend, MemTransport};
use ferry_transport::{
    Connection, PeerIdentity, Role, SendStream, StreamError, Transport, TransportError,
};
use tokio::time::Instant;

use crate::rng::SimRng;

/// How long a connection that hears nothing lives: ferry's QUIC idle
/// timeout.
pub fn idle_timeout() -> Duration {
    ferry_transport::quic::QuicTuning::default().idle_timeout
}

/// How often a stream stalled by a silence looks whether it ended or its
/// connection closed.
const SILENCE_POLL: Duration = Duration::from_millis(20);

/// A silenced direction, to end with [`SimNetwork::unsilence`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Silence {
    from: String,
    to: String,
    id: u64,
}

/// Speed and delay of a link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkParams {
    /// Bytes per second.
    pub bandwidth_bytes_per_s: f64,
    /// One-way delay added to every chunk.
    pub latency: Duration,
}

impl Default for LinkParams {
    fn default() -> Self {
        Self {
            bandwidth_bytes_per_s: 1e9,
            latency: Duration::from_micros(100),
        }
    }
}

type Link = (String, String);

fn link(a: &str, b: &str) -> Link {
    if a <= b {
        (a.to_owned(), b.to_owned())
    } else {
        (b.to_owned(), a.to_owned())
    }
}

#[derive(Default)]
struct NetState {
    params: BTreeMap<Link, LinkParams>,
    default: LinkParams,
    busy_until: BTreeMap<Link, Instant>,
    partitioned: BTreeSet<Link>,
    conns: BTreeMap<Link, Vec<MemConnection>>,
    /// Directed (from, to) -> silence id: packets that way vanish.
    silenced: BTreeMap<(String, String), u64>,
    silences: u64,
    /// Largest extra delay per chunk, and its generator.
    jitter: Option<(Duration, SimRng)>,
}

/// The network all simulated hosts share.
#[derive(Clone)]
pub struct SimNetwork {
    mem: MemNetwork,
    state: Arc<Mutex<NetState>>,
    /// Told whenever a silence ends.
    unsilenced: Arc<tokio::sync::Notify>,
}

impl Default for SimNetwork {
    fn default() -> Self {
        Self::new(LinkParams::default())
    }
}

impl SimNetwork {
    /// A network whose links default to `default`.
    pub fn new(default: LinkParams) -> Self {
        Self {
            mem: MemNetwork::new(),
            state: Arc::new(Mutex::new(NetState {
                default,
                ..NetState::default()
            })),
            unsilenced: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Every chunk is late by up to `max`, drawn from a generator seeded
    /// with `seed`.
    pub fn set_jitter(&self, max: Duration, seed: u64) {
        self.lock().jitter = Some((max, SimRng::new(seed)));
    }

    fn jitter(&self) -> Duration {
        match &mut self.lock().jitter {
            #[allow(clippy::cast_possible_truncation)] // jitter is milliseconds
            Some((max, rng)) => Duration::from_nanos(rng.below(max.as_nanos().max(1) as u64)),
            None => Duration::ZERO,
        }
    }

    /// Packets from `from` to `to` vanish from now on, without an error;
    /// past the idle timeout the connections between the two close.
    pub fn silence(&self, from: &str, to: &str) -> Silence {
        let hole = {
            let mut s = self.lock();
            s.silences += 1;
            let id = s.silences;
            s.silenced.insert((from.to_owned(), to.to_owned()), id);
            Silence {
                from: from.to_owned(),
                to: to.to_owned(),
                id,
            }
        };
        let (net, watched) = (self.clone(), hole.clone());
        tokio::spawn(async move {
            tokio::time::sleep(idle_timeout()).await;
            if net
                .lock()
                .silenced
                .get(&(watched.from.clone(), watched.to.clone()))
                == Some(&watched.id)
            {
                net.cut(
                    &watched.from,
                    &watched.to,
                    "timed out: nothing heard (idle timeout)",
                );
            }
        });
        hole
    }

    /// Ends a silence (a later one of the same direction stays).
    pub fn unsilence(&self, hole: Silence) {
        let key = (hole.from, hole.to);
        let mut s = self.lock();
        if s.silenced.get(&key) == Some(&hole.id) {
            s.silenced.remove(&key);
        }
        drop(s);
        self.unsilenced.notify_waiters();
    }

    fn is_silenced(&self, from: &str, to: &str) -> bool {
        self.lock()
            .silenced
            .contains_key(&(from.to_owned(), to.to_owned()))
    }

    /// Waits until packets from `from` reach `to`, or `conn` closes (then
    /// false).
    async fn until_heard_on(&self, from: &str, to: &str, conn: &MemConnection) -> bool {
        while self.is_silenced(from, to) {
            if conn.is_closed() {
                return false;
            }
            tokio::time::sleep(SILENCE_POLL).await;
        }
        !conn.is_closed()
    }

    /// Waits until packets from `from` reach `to`.
    async fn until_heard(&self, from: &str, to: &str) {
        loop {
            let changed = self.unsilenced.notified();
            if !self.is_silenced(from, to) {
                return;
            }
            changed.await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, NetState> {
        self.state.lock().expect("network lock")
    }

    /// An endpoint for host (or client) `name` with `role`.
    pub fn endpoint(&self, name: &str, role: Role) -> SimTransport {
        SimTransport {
            inner: self.mem.endpoint(PeerIdentity::new(name, role)),
            name: name.to_owned(),
            net: self.clone(),
        }
    }

    /// Sets the link between `a` and `b`.
    pub fn set_link(&self, a: &str, b: &str, params: LinkParams) {
        self.lock().params.insert(link(a, b), params);
    }

    /// Breaks every connection between `a` and `b` (they may reconnect).
    pub fn cut(&self, a: &str, b: &str, why: &str) {
        let conns = self.lock().conns.remove(&link(a, b)).unwrap_or_default();
        for c in conns {
            c.close(why);
        }
    }

    /// Cuts `a`–`b` and refuses new connections until [`Self::heal`].
    pub fn partition(&self, a: &str, b: &str) {
        self.lock().partitioned.insert(link(a, b));
        self.cut(a, b, "network partition");
    }

    /// Ends a partition.
    pub fn heal(&self, a: &str, b: &str) {
        self.lock().partitioned.remove(&link(a, b));
    }

    /// Ends every partition and silence.
    pub fn heal_all(&self) {
        let mut s = self.lock();
        s.partitioned.clear();
        s.silenced.clear();
        drop(s);
        self.unsilenced.notify_waiters();
    }

    /// Removes a host from the network: its listener goes and its
    /// connections break.
    pub fn unplug(&self, transport: &SimTransport) {
        transport.inner.close();
        let links: Vec<Link> = self
            .lock()
            .conns
            .keys()
            .filter(|(a, b)| *a == transport.name || *b == transport.name)
            .cloned()
            .collect();
        for (a, b) in links {
            self.cut(&a, &b, "host went down");
        }
    }

    fn is_partitioned(&self, a: &str, b: &str) -> bool {
        self.lock().partitioned.contains(&link(a, b))
    }

    /// When a chunk of `len` bytes written now on `a`–`b` arrives.
    fn schedule(&self, a: &str, b: &str, len: usize) -> Instant {
        let key = link(a, b);
        let mut s = self.lock();
        let params = s.params.get(&key).copied().unwrap_or(s.default);
        let now = Instant::now();
        let start = s.busy_until.get(&key).copied().unwrap_or(now).max(now);
        #[allow(clippy::cast_precision_loss)] // chunk sizes
        let transfer = Duration::from_secs_f64(len as f64 / params.bandwidth_bytes_per_s);
        let done = start + transfer;
        s.busy_until.insert(key, done);
        done + params.latency
    }

    fn latency(&self, a: &str, b: &str) -> Duration {
        let s = self.lock();
        s.params
            .get(&link(a, b))
            .copied()
            .unwrap_or(s.default)
            .latency
    }

    fn register(&self, a: &str, b: &str, conn: &MemConnection) {
        self.lock()
            .conns
            .entry(link(a, b))
            .or_default()
            .push(conn.clone());
    }
}

/// A host's endpoint on the simulated network.
pub struct SimTransport {
    inner: MemTransport,
    name: String,
    net: SimNetwork,
}

impl Transport for SimTransport {
    type Addr = String;
    type Connection = SimConnection;

    async fn connect(&self, addr: &String) -> Result<SimConnection, TransportError> {
        if self.net.is_partitioned(&self.name, addr) {
            return Err(TransportError::Connect {
                addr: addr.clone(),
                reason: "unreachable (partition)".into(),
            });
        }
        // A handshake into silence waits for it to end, up to the idle
        // timeout.
        let both_ways = async {
            self.net.until_heard(&self.name, addr).await;
            self.net.until_heard(addr, &self.name).await;
        };
        if tokio::time::timeout(idle_timeout(), both_ways)
            .await
            .is_err()
        {
            return Err(TransportError::Connect {
                addr: addr.clone(),
                reason: "timed out: no answer (idle timeout)".into(),
            });
        }
        let conn = self.inner.connect(addr).await?;
        self.net.register(&self.name, addr, &conn);
        Ok(SimConnection {
            inner: conn,
            local: self.name.clone(),
            remote: addr.clone(),
            net: self.net.clone(),
        })
    }

    async fn accept(&self) -> Result<SimConnection, TransportError> {
        let conn = self.inner.accept().await?;
        let remote = conn.peer().name.clone();
        self.net.register(&self.name, &remote, &conn);
        Ok(SimConnection {
            inner: conn,
            local: self.name.clone(),
            remote,
            net: self.net.clone(),
        })
    }

    fn local_identity(&self) -> &PeerIdentity {
        self.inner.local_identity()
    }
}

/// A connection whose streams pay the link's bandwidth and latency.
#[derive(Clone)]
pub struct SimConnection {
    inner: MemConnection,
    local: String,
    remote: String,
    net: SimNetwork,
}

impl std::fmt::Debug for SimConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SimConnection({} -> {})", self.local, self.remote)
    }
}

impl SimConnection {
    fn wrap(&self, (send, recv): (MemSend, MemRecv)) -> (SimSend, MemRecv) {
        let way = Way {
            local: self.local.clone(),
            remote: self.remote.clone(),
            net: self.net.clone(),
            conn: self.inner.clone(),
        };
        (SimSend::new(send, way), recv)
    }
}

impl Connection for SimConnection {
    type Send = SimSend;
    type Recv = MemRecv;

    async fn open_stream(&self) -> Result<(SimSend, MemRecv), TransportError> {
        Ok(self.wrap(self.inner.open_stream().await?))
    }

    async fn accept_stream(&self) -> Result<(SimSend, MemRecv), TransportError> {
        Ok(self.wrap(self.inner.accept_stream().await?))
    }

    fn peer(&self) -> &PeerIdentity {
        self.inner.peer()
    }

    fn close(&self, reason: &str) {
        self.inner.close(reason);
    }

    fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }

    fn rtt(&self) -> Duration {
        self.net.latency(&self.local, &self.remote) * 2
    }
}

enum Delivery {
    Chunk(Instant, Bytes),
    Finish,
}

/// One direction of one connection.
#[derive(Clone)]
struct Way {
    local: String,
    remote: String,
    net: SimNetwork,
    conn: MemConnection,
}

impl Way {
    /// Waits out a silence this way; false if the connection closed.
    async fn heard(&self) -> bool {
        self.net
            .until_heard_on(&self.local, &self.remote, &self.conn)
            .await
    }
}

/// The sending half of a simulated stream. A write waits only for its
/// turn on the link (bandwidth); a delivery task hands chunks over after
/// the link's latency, in order, so latency pipelines as on a real wire.
/// While its direction is silenced a write waits (no acknowledgements
/// open QUIC's window) and so does the delivery.
pub struct SimSend {
    deliveries: Option<tokio::sync::mpsc::UnboundedSender<Delivery>>,
    failed: Arc<Mutex<Option<StreamError>>>,
    way: Way,
}

impl std::fmt::Debug for SimSend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SimSend({} -> {})", self.way.local, self.way.remote)
    }
}

impl SimSend {
    fn new(mut inner: MemSend, way: Way) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let failed = Arc::new(Mutex::new(None));
        let failure = failed.clone();
        let carrier = way.clone();
        tokio::spawn(async move {
            while let Some(d) = rx.recv().await {
                if let Delivery::Chunk(at, _) = &d {
                    tokio::time::sleep_until(*at).await;
                }
                let r = if carrier.heard().await {
                    match d {
                        Delivery::Chunk(_, chunk) => inner.write_chunk(chunk).await,
                        Delivery::Finish => inner.finish(),
                    }
                } else {
                    Err(StreamError::ConnectionLost("connection closed".into()))
                };
                if let Err(e) = r {
                    *failure.lock().expect("stream lock") = Some(e);
                    return;
                }
            }
        });
        Self {
            deliveries: Some(tx),
            failed,
            way,
        }
    }

    fn check(&self) -> Result<(), StreamError> {
        if self
            .way
            .net
            .is_partitioned(&self.way.local, &self.way.remote)
        {
            return Err(StreamError::ConnectionLost("network partition".into()));
        }
        match &*self.failed.lock().expect("stream lock") {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }
}

impl SendStream for SimSend {
    async fn write_chunk(&mut self, chunk: Bytes) -> Result<(), StreamError> {
        self.check()?;
        if !self.way.heard().await {
            return Err(StreamError::ConnectionLost("connection closed".into()));
        }
        let (net, local, remote) = (&self.way.net, &self.way.local, &self.way.remote);
        let arrives = net.schedule(local, remote, chunk.len());
        let latency = net.latency(local, remote);
        // The link is busy with this chunk until it has left; then the
        // writer may go on while the chunk travels.
        tokio::time::sleep_until(arrives - latency).await;
        self.check()?;
        let late = net.jitter();
        self.deliveries
            .as_ref()
            .ok_or(StreamError::Finished)?
            .send(Delivery::Chunk(arrives + late, chunk))
            .map_err(|_| StreamError::ConnectionLost("stream closed".into()))
    }

    fn finish(&mut self) -> Result<(), StreamError> {
        self.check()?;
        let tx = self.deliveries.take().ok_or(StreamError::Finished)?;
        let _ = tx.send(Delivery::Finish);
        Ok(())
    }
}
