//! Page-batch throughput over QUIC between two endpoints on loopback, as
//! `ferry bench transport` runs it.
//!
//! The source holds random (incompressible, non-zero) pages; each bulk
//! stream sends its share in batches; the destination applies every batch
//! straight into its own memory. The figures are end to end: batch building
//! (one copy), encryption, UDP, decryption and the copy into destination
//! memory; the destination is compared with the source at the end.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

use crate::FrameKind;
use crate::batch::{BatchBuilder, BatchKind, SliceSink};
use crate::identity::Role;
use crate::limits::PAGE_BYTES;
use crate::pki::ClusterCa;
use crate::pool::BufferPool;
use crate::quic::{QuicAddr, QuicTransport, QuicTuning};
use crate::stream::{FrameReader, FrameWriter};
use crate::transport::{Connection, Transport};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Bytes of page data to move.
    pub total_bytes: u64,
    /// Distinct source memory (pages are re-sent cyclically).
    pub memory_bytes: usize,
    /// Parallel bulk streams.
    pub streams: usize,
    /// Connections between the two endpoints (streams spread over them).
    pub connections: usize,
    /// Pages per batch.
    pub batch_pages: usize,
    /// QUIC settings.
    pub tuning: QuicTuning,
    /// Where the two endpoints talk (`None`: loopback).
    pub network: Option<std::sync::Arc<dyn BenchNetwork>>,
}

/// Where the benchmark's two endpoints live, when not on loopback: side 0
/// is the source, side 1 the destination.
pub trait BenchNetwork: std::fmt::Debug + Send + Sync {
    /// A bound UDP socket for `side` with `buffer_bytes` socket buffers.
    fn socket(&self, side: usize, buffer_bytes: usize) -> std::io::Result<std::net::UdpSocket>;
    /// Where `from` sends datagrams meant for `target`.
    fn reach(&self, from: usize, target: SocketAddr) -> std::io::Result<SocketAddr>;
}

fn endpoint(
    opts: &BenchOptions,
    side: usize,
    creds: &crate::pki::Credentials,
) -> Result<QuicTransport, crate::TransportError> {
    let socket = match &opts.network {
        Some(n) => n
            .socket(side, opts.tuning.socket_buffer_bytes)
            .map_err(|e| crate::TransportError::Setup(format!("bench socket: {e}")))?,
        None => crate::quic::udp_socket(
            SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            opts.tuning.socket_buffer_bytes,
        )?,
    };
    QuicTransport::with_socket(socket, creds, &opts.tuning)
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            total_bytes: 4 << 30,
            memory_bytes: 256 << 20,
            streams: 4,
            connections: 1,
            batch_pages: 256,
            tuning: QuicTuning::loopback(),
            network: None,
        }
    }
}

/// What was measured.
#[derive(Debug, Clone)]
pub struct BenchReport {
    /// Page bytes delivered into destination memory.
    pub page_bytes: u64,
    /// Frame bytes on the wire (headers and tables included).
    pub wire_bytes: u64,
    /// Wall time from first batch to last applied.
    pub seconds: f64,
    /// Process CPU time (both endpoints: they share the process).
    pub cpu_seconds: f64,
    /// Destination memory equals source memory at the end.
    pub verified: bool,
}

impl BenchReport {
    /// Page data throughput in GB/s (10^9 bytes).
    pub fn gb_per_s(&self) -> f64 {
        self.page_bytes as f64 / self.seconds / 1e9
    }

    /// CPU seconds (both sides) per GB of page data.
    pub fn cpu_s_per_gb(&self) -> f64 {
        self.cpu_seconds / (self.page_bytes as f64 / 1e9)
    }
}

/// Process CPU time (user + system) in seconds.
pub fn process_cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage writes a complete rusage into the pointer on success.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if rc != 0 {
        return 0.0;
    }
    // SAFETY: rc == 0, so the kernel filled the struct.
    let usage = unsafe { usage.assume_init() };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Fills `memory` with pseudo-random bytes (xorshift64*, no zero pages).
pub fn fill_random(memory: &mut [u8], seed: u64) {
    let mut state = seed | 1;
    for word in memory.chunks_exact_mut(8) {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        word.copy_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
}

/// Runs the benchmark on the current tokio runtime.
pub async fn run(opts: &BenchOptions) -> anyhow_free::Result<BenchReport> {
    let streams = opts.streams.max(1);
    let connections = opts.connections.clamp(1, streams);
    let region_pages = opts.memory_bytes / PAGE_BYTES / streams;
    if region_pages == 0 {
        return Err("memory too small for that many streams".into());
    }
    let ca = ClusterCa::generate("bench")?;
    let dest = endpoint(opts, 1, &ca.credentials("dest", Role::Host)?)?;
    let source = endpoint(opts, 0, &ca.credentials("source", Role::Host)?)?;
    let dest_socket = match &opts.network {
        Some(n) => n.reach(0, dest.local_addr()?)?,
        None => dest.local_addr()?,
    };
    let addr = QuicAddr {
        socket: dest_socket,
        name: "dest".into(),
    };

    let accept = tokio::spawn(async move {
        let mut conns = Vec::new();
        for _ in 0..connections {
            conns.push(dest.accept().await?);
        }
        Ok::<_, crate::TransportError>((dest, conns))
    });
    let mut source_conns = Vec::new();
    for _ in 0..connections {
        source_conns.push(source.connect(&addr).await?);
    }
    let (_dest, dest_conns) = accept.await.map_err(|e| e.to_string())??;

    let region_bytes = region_pages * PAGE_BYTES;
    let per_stream_pages = (opts.total_bytes / PAGE_BYTES as u64 / streams as u64).max(1);
    let mut sources = Vec::with_capacity(streams);
    for i in 0..streams {
        let mut region = vec![0u8; region_bytes];
        fill_random(&mut region, 0x5eed + i as u64);
        sources.push(std::sync::Arc::new(region));
    }

    // A migration destination prepares its memory before the pages arrive
    // (first touch is slow here); so does the benchmark.
    let mut dest_regions: Vec<Vec<u8>> = (0..streams).map(|_| prepared(region_bytes)).collect();

    let cpu_start = process_cpu_seconds();
    let start = Instant::now();
    let mut receivers = Vec::new();
    for (i, conn) in dest_conns.iter().enumerate() {
        let conn = conn.clone();
        let streams_here = (i..streams).step_by(connections).count();
        let mut regions: Vec<Vec<u8>> = dest_regions.drain(..streams_here).collect();
        receivers.push(tokio::spawn(async move {
            let mut tasks = Vec::new();
            for _ in 0..streams_here {
                let (_send, recv) = conn.accept_stream().await?;
                let region = regions.pop().expect("one region per stream");
                tasks.push(tokio::spawn(receive_region(recv, region)));
            }
            Ok::<_, crate::TransportError>(tasks)
        }));
    }
    let mut senders = Vec::new();
    for (i, region) in sources.iter().enumerate() {
        let conn = source_conns[i % connections].clone();
        let region = region.clone();
        let batch_pages = opts.batch_pages;
        senders.push(tokio::spawn(async move {
            let (send, _recv) = conn.open_stream().await?;
            send_region(send, &region, per_stream_pages, batch_pages).await
        }));
    }
    let mut wire_bytes = 0u64;
    for s in senders {
        wire_bytes += s.await.map_err(|e| e.to_string())??;
    }
    let mut received = Vec::new();
    for r in receivers {
        for task in r.await.map_err(|e| e.to_string())?? {
            received.push(task.await.map_err(|e| e.to_string())??);
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let cpu_seconds = process_cpu_seconds() - cpu_start;
    // Streams are accepted in arrival order, so match regions by content.
    let verified = received.len() == sources.len()
        && received
            .iter()
            .all(|(memory, _)| sources.iter().any(|s| s.as_slice() == memory.as_slice()));
    let page_bytes = received.iter().map(|(_, n)| *n).sum();
    for c in &source_conns {
        c.close("bench done");
    }
    source.close();
    Ok(BenchReport {
        page_bytes,
        wire_bytes,
        seconds,
        cpu_seconds,
        verified,
    })
}

async fn send_region<S: crate::SendStream>(
    send: S,
    region: &[u8],
    pages: u64,
    batch_pages: usize,
) -> anyhow_free::Result<u64> {
    let mut writer = FrameWriter::new(send);
    let region_pages = (region.len() / PAGE_BYTES) as u64;
    let pool = BufferPool::new(batch_pages * PAGE_BYTES, 64);
    let mut builder = BatchBuilder::with_pool(BatchKind::Pages, pool);
    let mut wire = 0u64;
    for i in 0..pages {
        let gfn = i % region_pages;
        let at = usize::try_from(gfn).map_err(|e| e.to_string())? * PAGE_BYTES;
        builder.push_page(gfn, &region[at..at + PAGE_BYTES]);
        if builder.len() == batch_pages || i + 1 == pages {
            let batch = builder.finish();
            wire += batch.wire_len() as u64;
            writer.send_batch(batch).await?;
        }
    }
    writer.send_end().await?;
    writer.finish()?;
    Ok(wire)
}

/// Memory with every page already touched.
fn prepared(bytes: usize) -> Vec<u8> {
    let mut memory = vec![0u8; bytes];
    for page in memory.chunks_mut(PAGE_BYTES) {
        page[0] = 1;
    }
    memory
}

async fn receive_region<R: crate::RecvStream>(
    recv: R,
    mut memory: Vec<u8>,
) -> anyhow_free::Result<(Vec<u8>, u64)> {
    let mut reader = FrameReader::new(recv);
    let mut bytes = 0u64;
    loop {
        let header = reader
            .next_header()
            .await?
            .ok_or("stream ended without End")?;
        if header.kind == FrameKind::End {
            break;
        }
        let mut sink = SliceSink::pages(&mut memory);
        let stats = reader.read_batch_into(header, &mut sink).await?;
        bytes += (stats.data_entries * PAGE_BYTES) as u64;
    }
    Ok((memory, bytes))
}

/// A boxed error for the benchmark driver, without pulling anyhow into the
/// library.
mod anyhow_free {
    /// Result with a boxed error.
    pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;
}
