//! The QUIC transport: quinn over UDP with mutual TLS.
//!
//! One [`QuicTransport`] per node is both client and server. Every peer must
//! present a certificate signed by the cluster CA; the TLS handshake fails,
//! and the connection is dropped before any application byte is read, if it
//! does not.
//!
//! Throughput on loopback is bounded by per-packet costs and AES-GCM, so
//! [`QuicTuning`] raises the flow-control windows and socket buffers, and can
//! pin a large MTU (no MTU discovery, no GSO: jumbo packets with GSO make the
//! kernel answer `EMSGSIZE`, which quinn takes for a failed probe and falls
//! back to 1200-byte packets).

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::CertificateDer;

use crate::identity::{PeerIdentity, identity_from_der};
use crate::pki::Credentials;
use crate::stream::{RecvStream, SendStream, StreamError};
use crate::transport::{Connection, Transport, TransportError};

/// Where to reach a node: its UDP address and the name in its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuicAddr {
    /// UDP socket address.
    pub socket: SocketAddr,
    /// Host name the node's certificate must carry.
    pub name: String,
}

/// Knobs that decide QUIC throughput.
#[derive(Debug, Clone)]
pub struct QuicTuning {
    /// A fixed UDP payload size for every path, with MTU discovery off.
    /// `None` starts at 1200 bytes and discovers upwards (the safe choice on
    /// an unknown network).
    pub mtu_bytes: Option<u16>,
    /// Socket send and receive buffer size.
    pub socket_buffer_bytes: usize,
    /// Flow-control window per stream.
    pub stream_window_bytes: u32,
    /// Flow-control window per connection.
    pub connection_window_bytes: u32,
    /// Bytes the sender may have in flight.
    pub send_window_bytes: u64,
    /// Connection dropped after this long without hearing from the peer.
    pub idle_timeout: Duration,
    /// Keep-alive interval (keeps idle control connections open).
    pub keep_alive: Duration,
    /// Streams each side may open at once.
    pub streams_max: u32,
    /// Largest UDP payload MTU discovery probes for (when `mtu_bytes` is
    /// `None`): the link's MTU less the IP and UDP headers.
    pub mtu_ceiling_bytes: u16,
    /// The congestion controller.
    pub congestion: Congestion,
}

/// Which congestion controller a connection uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Congestion {
    /// CUBIC (loss-based; quinn's default).
    Cubic,
    /// BBR (model-based: keeps sending at the measured bottleneck rate
    /// through random loss, which CUBIC takes for congestion).
    Bbr,
}

impl Default for QuicTuning {
    fn default() -> Self {
        Self {
            mtu_bytes: None,
            socket_buffer_bytes: 16 * 1024 * 1024,
            stream_window_bytes: 32 * 1024 * 1024,
            connection_window_bytes: 256 * 1024 * 1024,
            send_window_bytes: 256 * 1024 * 1024,
            idle_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(2),
            streams_max: 256,
            mtu_ceiling_bytes: ETHERNET_UDP_PAYLOAD_BYTES,
            congestion: Congestion::Cubic,
        }
    }
}

impl QuicTuning {
    /// Tuning for loopback and other jumbo-frame paths: a fixed 64 KB MTU.
    pub fn loopback() -> Self {
        Self {
            mtu_bytes: Some(LOOPBACK_MTU_BYTES),
            ..Self::default()
        }
    }

    /// Tuning for a network link whose MTU is `link_mtu` (1500 for plain
    /// Ethernet, 9000 for jumbo frames): MTU discovery up to what the link
    /// carries, segmentation offload on, BBR.
    pub fn for_link(link_mtu: u16) -> Self {
        Self {
            mtu_ceiling_bytes: link_mtu.saturating_sub(IPV4_UDP_HEADER_BYTES).max(1200),
            congestion: Congestion::Bbr,
            ..Self::default()
        }
    }

    fn transport_config(&self) -> quinn::TransportConfig {
        let mut t = quinn::TransportConfig::default();
        t.stream_receive_window(self.stream_window_bytes.into())
            .receive_window(self.connection_window_bytes.into())
            .send_window(self.send_window_bytes)
            .max_concurrent_bidi_streams(self.streams_max.into())
            .max_concurrent_uni_streams(0u32.into())
            .keep_alive_interval(Some(self.keep_alive))
            .max_idle_timeout(Some(
                quinn::IdleTimeout::try_from(self.idle_timeout)
                    .unwrap_or(quinn::VarInt::MAX.into()),
            ));
        // The initial window is 32 packets: Cubic's default (14720 bytes)
        // is smaller than one jumbo packet, which would stall the
        // connection at once.
        let initial_window = u64::from(self.mtu_bytes.unwrap_or(self.mtu_ceiling_bytes)) * 32;
        match self.congestion {
            Congestion::Cubic => {
                let mut cubic = quinn::congestion::CubicConfig::default();
                cubic.initial_window(initial_window);
                t.congestion_controller_factory(Arc::new(cubic));
            }
            Congestion::Bbr => {
                let mut bbr = quinn::congestion::BbrConfig::default();
                bbr.initial_window(initial_window);
                t.congestion_controller_factory(Arc::new(bbr));
            }
        }
        if let Some(mtu) = self.mtu_bytes {
            t.initial_mtu(mtu)
                .min_mtu(mtu)
                .mtu_discovery_config(None)
                .enable_segmentation_offload(false);
        } else {
            let mut discovery = quinn::MtuDiscoveryConfig::default();
            discovery.upper_bound(self.mtu_ceiling_bytes);
            t.mtu_discovery_config(Some(discovery));
            // quinn hands the kernel up to 10 packets per GSO send; with
            // jumbo packets that is more than one UDP datagram may carry,
            // the kernel answers EMSGSIZE and quinn falls back to small
            // packets. Jumbo packets need no GSO to be cheap anyway.
            let gso_fits =
                usize::from(self.mtu_ceiling_bytes) * QUINN_GSO_SEGMENTS <= MAX_UDP_PAYLOAD_BYTES;
            t.enable_segmentation_offload(gso_fits);
        }
        t
    }
}

/// UDP payload size for loopback. quinn encodes a long-header packet's
/// length in two bytes (under 16 KiB), so handshake packets cannot be larger
/// even though loopback carries 64 KiB datagrams.
pub const LOOPBACK_MTU_BYTES: u16 = 16_000;

/// Packets quinn 0.11 puts in one segmentation-offload send.
const QUINN_GSO_SEGMENTS: usize = 10;

/// The most a UDP datagram (so a GSO send) may carry over IPv4.
const MAX_UDP_PAYLOAD_BYTES: usize = 65_507;

/// IPv4 and UDP headers: a link's MTU less this is the largest UDP payload.
pub const IPV4_UDP_HEADER_BYTES: u16 = 28;

/// The largest UDP payload a plain 1500-byte Ethernet link carries over
/// IPv6 (so over IPv4 too): quinn's own default ceiling.
pub const ETHERNET_UDP_PAYLOAD_BYTES: u16 = 1452;

/// A quinn endpoint with the node's credentials.
#[derive(Debug, Clone)]
pub struct QuicTransport {
    endpoint: quinn::Endpoint,
    /// Replaced whole by [`QuicTransport::reload`].
    client: Arc<std::sync::RwLock<quinn::ClientConfig>>,
    transport: Arc<quinn::TransportConfig>,
    identity: PeerIdentity,
}

fn setup(what: &str) -> impl Fn(&dyn std::fmt::Display) -> TransportError + '_ {
    move |e| TransportError::Setup(format!("{what}: {e}"))
}

impl QuicTransport {
    /// Binds a UDP socket at `listen` and serves and dials with `creds`.
    pub fn bind(
        listen: SocketAddr,
        creds: &Credentials,
        tuning: &QuicTuning,
    ) -> Result<Self, TransportError> {
        let socket = udp_socket(listen, tuning.socket_buffer_bytes)?;
        Self::with_socket(socket, creds, tuning)
    }

    /// Serves and dials on `socket`, made with [`udp_socket`] (possibly in
    /// another network namespace: a socket stays in the one it was made in).
    pub fn with_socket(
        socket: std::net::UdpSocket,
        creds: &Credentials,
        tuning: &QuicTuning,
    ) -> Result<Self, TransportError> {
        let transport = Arc::new(tuning.transport_config());
        let (server, client) = configs(creds, &transport)?;

        let mut endpoint_config = quinn::EndpointConfig::default();
        let largest = tuning
            .mtu_bytes
            .unwrap_or(tuning.mtu_ceiling_bytes)
            .max(1500);
        endpoint_config
            .max_udp_payload_size(largest)
            .map_err(|e| setup("endpoint")(&e))?;
        let endpoint = quinn::Endpoint::new(
            endpoint_config,
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|e| setup("endpoint")(&e))?;
        Ok(Self {
            endpoint,
            client: Arc::new(std::sync::RwLock::new(client)),
            transport,
            identity: creds.identity().clone(),
        })
    }

    /// Serves and dials with `creds` from now on (a renewed certificate, a
    /// new revocation list); connections already up are kept. Refuses
    /// credentials for another name.
    pub fn reload(&self, creds: &Credentials) -> Result<(), TransportError> {
        if creds.identity().name != self.identity.name {
            return Err(TransportError::Setup(format!(
                "new credentials are for {}, this endpoint is {}",
                creds.identity().name,
                self.identity.name
            )));
        }
        let (server, client) = configs(creds, &self.transport)?;
        self.endpoint.set_server_config(Some(server));
        *self
            .client
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = client;
        Ok(())
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.endpoint
            .local_addr()
            .map_err(|e| setup("local address")(&e))
    }

    /// Dials with an explicit client TLS configuration (tests use it to act
    /// as a peer without a valid certificate).
    pub async fn connect_with(
        &self,
        addr: &QuicAddr,
        tls: rustls::ClientConfig,
    ) -> Result<QuicConnection, TransportError> {
        let client = client_config(tls, self.transport.clone())?;
        self.dial(addr, client).await
    }

    async fn dial(
        &self,
        addr: &QuicAddr,
        client: quinn::ClientConfig,
    ) -> Result<QuicConnection, TransportError> {
        let connect_err = |reason: String| TransportError::Connect {
            addr: format!("{} ({})", addr.name, addr.socket),
            reason,
        };
        let connecting = self
            .endpoint
            .connect_with(client, addr.socket, &addr.name)
            .map_err(|e| connect_err(e.to_string()))?;
        let conn = connecting
            .await
            .map_err(|e| connect_err(describe_connection_error(&e)))?;
        let peer = peer_identity(&conn).map_err(connect_err)?;
        Ok(QuicConnection {
            conn,
            peer: Arc::new(peer),
        })
    }

    /// Closes the endpoint and every connection on it.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"endpoint closed");
    }
}

fn configs(
    creds: &Credentials,
    transport: &Arc<quinn::TransportConfig>,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), TransportError> {
    let server_tls = creds.server_config().map_err(|e| setup("server tls")(&e))?;
    let server_quic = QuicServerConfig::try_from(server_tls).map_err(|e| setup("quic")(&e))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_quic));
    server.transport_config(transport.clone());
    let client_tls = creds.client_config().map_err(|e| setup("client tls")(&e))?;
    Ok((server, client_config(client_tls, transport.clone())?))
}

fn client_config(
    tls: rustls::ClientConfig,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ClientConfig, TransportError> {
    let quic = QuicClientConfig::try_from(tls).map_err(|e| setup("client quic")(&e))?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    client.transport_config(transport);
    Ok(client)
}

/// A UDP socket with large buffers. As root the kernel's `rmem_max` cap is
/// bypassed with `SO_*BUFFORCE`; otherwise the capped size is used.
pub fn udp_socket(
    listen: SocketAddr,
    buffer_bytes: usize,
) -> Result<std::net::UdpSocket, TransportError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(listen),
        Type::DGRAM,
        Some(Protocol::UDP),
    )
    .map_err(|e| setup("udp socket")(&e))?;
    if !force_buffer(&socket, libc::SO_RCVBUFFORCE, buffer_bytes) {
        let _ = socket.set_recv_buffer_size(buffer_bytes);
    }
    if !force_buffer(&socket, libc::SO_SNDBUFFORCE, buffer_bytes) {
        let _ = socket.set_send_buffer_size(buffer_bytes);
    }
    socket
        .bind(&listen.into())
        .map_err(|e| setup(&format!("bind {listen}"))(&e))?;
    Ok(socket.into())
}

fn force_buffer(socket: &socket2::Socket, option: libc::c_int, bytes: usize) -> bool {
    let Ok(value) = libc::c_int::try_from(bytes) else {
        return false;
    };
    let len = libc::socklen_t::try_from(size_of::<libc::c_int>()).expect("c_int size fits");
    // SAFETY: the descriptor is a live socket owned by `socket`, and the
    // option value points at a c_int that outlives the call, with its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&raw const value).cast(),
            len,
        )
    };
    rc == 0
}

fn peer_identity(conn: &quinn::Connection) -> Result<PeerIdentity, String> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or("peer presented no certificate")?;
    let leaf = certs
        .first()
        .ok_or("peer presented an empty certificate chain")?;
    identity_from_der(leaf)
}

/// Words for a quinn connection error, naming the TLS alert when the
/// handshake failed (the usual reason: a missing or untrusted certificate).
pub fn describe_connection_error(e: &quinn::ConnectionError) -> String {
    // Hints explain the peer's alerts; our own come with rustls's reason.
    fn alert(code: u64, from_peer: bool) -> Option<String> {
        let alert = u8::try_from(code.checked_sub(0x100)?).ok()?;
        let name = format!("{:?}", rustls::AlertDescription::from(alert));
        let hint = match alert {
            _ if !from_peer => "",
            116 => " (peer requires a client certificate signed by the cluster CA)",
            42 | 48 => " (peer does not trust our certificate: signed by another CA?)",
            44 => " (our certificate is revoked: ask an admin for a new one)",
            _ => "",
        };
        Some(format!("TLS alert {name}{hint}"))
    }
    match e {
        quinn::ConnectionError::ConnectionClosed(close) => {
            let reason = String::from_utf8_lossy(&close.reason);
            match alert(u64::from(close.error_code), true) {
                Some(a) if reason.is_empty() => format!("peer aborted the handshake: {a}"),
                Some(a) => format!("peer aborted the handshake: {a}: {reason}"),
                None => format!("peer aborted the connection: {close}"),
            }
        }
        quinn::ConnectionError::TransportError(t) => match alert(u64::from(t.code), false) {
            Some(a) => format!("TLS handshake failed: {a}: {}", t.reason),
            None => t.to_string(),
        },
        quinn::ConnectionError::ApplicationClosed(close) => {
            format!("closed by peer: {}", String::from_utf8_lossy(&close.reason))
        }
        other => other.to_string(),
    }
}

impl Transport for QuicTransport {
    type Addr = QuicAddr;
    type Connection = QuicConnection;

    async fn connect(&self, addr: &QuicAddr) -> Result<QuicConnection, TransportError> {
        let client = self
            .client
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        self.dial(addr, client).await
    }

    async fn accept(&self) -> Result<QuicConnection, TransportError> {
        let incoming = self
            .endpoint
            .accept()
            .await
            .ok_or(TransportError::EndpointClosed)?;
        let remote = incoming.remote_address().to_string();
        let rejected = |reason: String| TransportError::PeerRejected {
            remote: remote.clone(),
            reason,
        };
        let conn = incoming
            .await
            .map_err(|e| rejected(describe_connection_error(&e)))?;
        match peer_identity(&conn) {
            Ok(peer) => Ok(QuicConnection {
                conn,
                peer: Arc::new(peer),
            }),
            Err(reason) => {
                conn.close(1u32.into(), reason.as_bytes());
                Err(rejected(reason))
            }
        }
    }

    fn local_identity(&self) -> &PeerIdentity {
        &self.identity
    }
}

/// An authenticated QUIC connection.
#[derive(Debug, Clone)]
pub struct QuicConnection {
    conn: quinn::Connection,
    peer: Arc<PeerIdentity>,
}

impl QuicConnection {
    /// quinn's statistics for this connection (RTT, packets, congestion).
    pub fn stats(&self) -> quinn::ConnectionStats {
        self.conn.stats()
    }

    /// The peer's UDP address.
    pub fn remote_address(&self) -> SocketAddr {
        self.conn.remote_address()
    }
}

fn lost(e: &quinn::ConnectionError) -> TransportError {
    TransportError::ConnectionLost(describe_connection_error(e))
}

impl Connection for QuicConnection {
    type Send = QuicSend;
    type Recv = QuicRecv;

    async fn open_stream(&self) -> Result<(QuicSend, QuicRecv), TransportError> {
        let (s, r) = self.conn.open_bi().await.map_err(|e| lost(&e))?;
        Ok((QuicSend(s), QuicRecv(r)))
    }

    async fn accept_stream(&self) -> Result<(QuicSend, QuicRecv), TransportError> {
        let (s, r) = self.conn.accept_bi().await.map_err(|e| lost(&e))?;
        Ok((QuicSend(s), QuicRecv(r)))
    }

    fn peer(&self) -> &PeerIdentity {
        &self.peer
    }

    fn close(&self, reason: &str) {
        self.conn.close(0u32.into(), reason.as_bytes());
    }

    fn is_closed(&self) -> bool {
        self.conn.close_reason().is_some()
    }

    fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    fn loss_rate(&self) -> f64 {
        let path = self.conn.stats().path;
        #[allow(clippy::cast_precision_loss)] // a rate
        let rate = path.lost_packets as f64 / path.sent_packets.max(1) as f64;
        rate
    }
}

/// Sending half of a QUIC stream.
#[derive(Debug)]
pub struct QuicSend(quinn::SendStream);

/// Receiving half of a QUIC stream.
#[derive(Debug)]
pub struct QuicRecv(quinn::RecvStream);

fn write_error(e: quinn::WriteError) -> StreamError {
    match e {
        quinn::WriteError::Stopped(code) => StreamError::Stopped(code.into_inner()),
        quinn::WriteError::ConnectionLost(e) => {
            StreamError::ConnectionLost(describe_connection_error(&e))
        }
        quinn::WriteError::ClosedStream => StreamError::Finished,
        quinn::WriteError::ZeroRttRejected => StreamError::ConnectionLost("0-RTT rejected".into()),
    }
}

impl SendStream for QuicSend {
    async fn write_chunk(&mut self, chunk: Bytes) -> Result<(), StreamError> {
        self.0.write_chunk(chunk).await.map_err(write_error)
    }

    async fn write_chunks(&mut self, mut chunks: Vec<Bytes>) -> Result<(), StreamError> {
        let mut rest = &mut chunks[..];
        while !rest.is_empty() {
            let written = self.0.write_chunks(rest).await.map_err(write_error)?;
            rest = &mut rest[written.chunks..];
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), StreamError> {
        self.0.finish().map_err(|_| StreamError::Finished)
    }

    fn set_priority(&mut self, priority: i32) {
        // A closed stream has nothing left to send.
        let _ = self.0.set_priority(priority);
    }
}

impl RecvStream for QuicRecv {
    async fn read_chunk(&mut self, max: usize) -> Result<Option<Bytes>, StreamError> {
        match self.0.read_chunk(max, true).await {
            Ok(chunk) => Ok(chunk.map(|c| c.bytes)),
            Err(quinn::ReadError::Reset(code)) => Err(StreamError::Reset(code.into_inner())),
            Err(quinn::ReadError::ConnectionLost(e)) => {
                Err(StreamError::ConnectionLost(describe_connection_error(&e)))
            }
            Err(other) => Err(StreamError::ConnectionLost(other.to_string())),
        }
    }
}
