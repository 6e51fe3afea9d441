//! A disk's copy on another host: the bulk stream that carries it, the
//! source's [`RemoteTarget`] and the destination's [`receive_disk`].
//!
//! One stream per disk, introduced as `StreamIntro::Disk`, then:
//!
//! ```mermaid
//! sequenceDiagram
//!     participant S as source (RemoteTarget)
//!     participant D as destination host
//!     S->>D: DiskOpen (size, datastore, path, VM home files)
//!     D-->>S: Opened { durable } (0, or where a broken copy stopped)
//!     loop chunks and mirrored writes, in order
//!         S->>D: extent batch
//!         S->>D: Flush { id }
//!         D-->>S: Flushed { id } (fdatasync done)
//!     end
//!     S->>D: Done { workload_acked }
//!     D-->>S: Flushed { id: DONE }
//! ```
//!
//! Order is the stream's: a mirrored write sent after a chunk lands after
//! it. The destination keeps the disk (locked) for the migration; the VM's
//! arrival adopts it, an abort deletes it.

// rkyv derives resolver twins of the enums whose fields carry no docs;
// every item written here is documented.
#![allow(missing_docs)]

use std::ops::Range;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use ferry_transport::batch::{BatchBuilder, BatchKind, BatchSink};
use ferry_transport::{Connection, FrameKind, FrameReader, FrameWriter, RecvStream, SendStream};

use super::target::{BoxFuture, DiskTarget};
use crate::disk::{DiskError, SharedDisk};
use crate::node::disk::DiskPlace;
use crate::node::offload;

/// The flush id that answers [`DiskCmd::Done`].
pub const DONE_ID: u64 = u64::MAX;

/// A file of the VM's home, moved with its first disk.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct HomeFile {
    /// Path on the datastore.
    pub path: String,
    /// Contents.
    pub bytes: Vec<u8>,
}

/// The first message on a disk stream.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct DiskOpen {
    /// The migration this disk belongs to.
    pub migration_id: u64,
    /// Disk name.
    pub disk: String,
    /// Size in bytes.
    pub len: u64,
    /// Destination datastore.
    pub datastore: String,
    /// Path on it.
    pub path: String,
    /// VM home files to write first.
    pub home: Vec<HomeFile>,
}

/// Source → destination commands after the open.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum DiskCmd {
    /// Make everything so far durable and answer [`DiskReply::Flushed`].
    Flush { id: u64 },
    /// The copy is complete: flush, and remember where the guest's disk
    /// workload stands.
    Done { workload_acked: u64 },
    /// The move failed: delete the copy.
    Discard,
}

/// Destination → source.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum DiskReply {
    /// Ready; the first pass is durable below `durable`.
    Opened { durable: u64 },
    /// Flush `id` is durable.
    Flushed { id: u64 },
    /// It failed.
    Failed { reason: String },
}

fn link(op: &'static str) -> impl Fn(String) -> DiskError {
    move |reason| DiskError::Io { op, reason }
}

/// Opens a new stream for a fresh connection; the node layer supplies it
/// (it knows the peer and how to dial it again).
pub type OpenDiskStream<C> = Arc<
    dyn Fn() -> std::pin::Pin<
            Box<
                dyn std::future::Future<
                        Output = Result<
                            (
                                FrameWriter<<C as Connection>::Send>,
                                FrameReader<<C as Connection>::Recv>,
                            ),
                            String,
                        >,
                    > + Send,
            >,
        > + Send
        + Sync,
>;

struct Stream<C: Connection> {
    writer: FrameWriter<C::Send>,
    reader: FrameReader<C::Recv>,
}

/// The source's side of a disk copy on another host.
pub struct RemoteTarget<C: Connection> {
    open: DiskOpen,
    peer: String,
    dial: OpenDiskStream<C>,
    stream: tokio::sync::Mutex<Option<Stream<C>>>,
    next_id: u64,
    /// Where the guest's disk workload stands at the finish.
    pub workload_acked: Arc<AtomicU64>,
}

impl<C: Connection> RemoteTarget<C> {
    /// Opens the disk on the peer; returns the target and where the
    /// peer's durable copy ends (0 for a new one).
    pub async fn open(
        peer: &str,
        open: DiskOpen,
        dial: OpenDiskStream<C>,
        workload_acked: Arc<AtomicU64>,
    ) -> Result<(Self, u64), DiskError> {
        let mut t = Self {
            open,
            peer: peer.to_owned(),
            dial,
            stream: tokio::sync::Mutex::new(None),
            next_id: 1,
            workload_acked,
        };
        let durable = t.connect().await?;
        Ok((t, durable))
    }

    async fn connect(&mut self) -> Result<u64, DiskError> {
        let (mut writer, mut reader) = (self.dial)().await.map_err(link("open disk stream"))?;
        writer
            .send_message(FrameKind::Control, &self.open)
            .await
            .map_err(|e| link("open remote disk")(e.to_string()))?;
        let reply: DiskReply = reader
            .read_message(FrameKind::Control)
            .await
            .map_err(|e| link("open remote disk")(e.to_string()))?;
        match reply {
            DiskReply::Opened { durable } => {
                *self.stream.get_mut() = Some(Stream { writer, reader });
                Ok(durable)
            }
            DiskReply::Failed { reason } => Err(link("open remote disk")(reason)),
            other => Err(link("open remote disk")(format!("unexpected {other:?}"))),
        }
    }

    async fn command(&mut self, cmd: DiskCmd, id: u64) -> Result<(), DiskError> {
        let mut guard = self.stream.lock().await;
        let s = guard
            .as_mut()
            .ok_or_else(|| link("flush remote disk")("the stream is broken".into()))?;
        let peer = &self.peer;
        let r = async {
            let broken = |e: String| link("flush remote disk")(e);
            s.writer
                .send_message(FrameKind::Control, &cmd)
                .await
                .map_err(|e| broken(e.to_string()))?;
            loop {
                match s
                    .reader
                    .read_message::<DiskReply>(FrameKind::Control)
                    .await
                    .map_err(|e| broken(e.to_string()))?
                {
                    DiskReply::Flushed { id: got } if got == id => return Ok(()),
                    DiskReply::Flushed { .. } => {}
                    DiskReply::Failed { reason } => {
                        return Err(DiskError::Peer {
                            peer: peer.clone(),
                            reason,
                        });
                    }
                    other => return Err(broken(format!("unexpected {other:?}"))),
                }
            }
        }
        .await;
        if r.is_err() {
            *guard = None;
        }
        r
    }
}

impl<C: Connection> DiskTarget for RemoteTarget<C> {
    fn describe(&self) -> String {
        format!("{}:{}:{}", self.peer, self.open.datastore, self.open.path)
    }

    fn write(&mut self, offset: u64, data: Arc<Vec<u8>>) -> BoxFuture<'_, Result<(), DiskError>> {
        Box::pin(async move {
            let mut guard = self.stream.lock().await;
            let s = guard
                .as_mut()
                .ok_or_else(|| link("write remote disk")("the stream is broken".into()))?;
            let mut batch = BatchBuilder::new(BatchKind::Extents);
            for (i, piece) in data
                .chunks(ferry_transport::limits::EXTENT_BYTES_MAX)
                .enumerate()
            {
                batch.push_extent(
                    offset + (i * ferry_transport::limits::EXTENT_BYTES_MAX) as u64,
                    piece,
                );
            }
            let r = s.writer.send_batch(batch.finish()).await;
            if let Err(e) = r {
                *guard = None;
                return Err(link("write remote disk")(e.to_string()));
            }
            Ok(())
        })
    }

    fn write_durable(
        &mut self,
        offset: u64,
        data: Arc<Vec<u8>>,
    ) -> BoxFuture<'_, Result<(), DiskError>> {
        Box::pin(async move {
            self.write(offset, data).await?;
            self.flush().await
        })
    }

    fn copy_from(
        &mut self,
        _source: SharedDisk,
        _range: Range<u64>,
    ) -> BoxFuture<'_, Result<Option<u64>, DiskError>> {
        Box::pin(async { Ok(None) })
    }

    fn flush(&mut self) -> BoxFuture<'_, Result<(), DiskError>> {
        Box::pin(async move {
            let id = self.next_id;
            self.next_id += 1;
            self.command(DiskCmd::Flush { id }, id).await
        })
    }

    fn reconnect(&mut self) -> BoxFuture<'_, Result<u64, DiskError>> {
        Box::pin(async move {
            *self.stream.get_mut() = None;
            self.connect().await
        })
    }

    fn finish(mut self: Box<Self>) -> BoxFuture<'static, Result<Option<SharedDisk>, DiskError>> {
        Box::pin(async move {
            let workload_acked = self.workload_acked.load(Ordering::SeqCst);
            self.command(DiskCmd::Done { workload_acked }, DONE_ID)
                .await?;
            if let Some(mut s) = self.stream.get_mut().take() {
                let _ = s.writer.finish();
            }
            Ok(None)
        })
    }

    fn discard(mut self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            if let Some(mut s) = self.stream.get_mut().take() {
                let _ = s
                    .writer
                    .send_message(FrameKind::Control, &DiskCmd::Discard)
                    .await;
                let _ = s.writer.finish();
            }
        })
    }
}

/// A disk arriving on this host, kept by the host for its migration.
pub struct IncomingDisk {
    /// Disk name.
    pub name: String,
    /// The open, locked copy.
    pub disk: SharedDisk,
    /// Where it is.
    pub place: DiskPlace,
    /// End of the durable first pass.
    pub durable: AtomicU64,
    /// Set by [`DiskCmd::Done`]: complete, with the workload's position.
    pub done: Mutex<Option<u64>>,
    /// Set by [`DiskCmd::Discard`].
    pub discarded: std::sync::atomic::AtomicBool,
    /// The VM home files written with it, as (path while arriving, final
    /// path): deleted with it, or renamed when the VM arrives.
    pub home: Vec<(String, String)>,
    /// Where the disk goes once the VM arrives (until then it is
    /// `place.path`, a name a restarted host knows to clean up).
    pub final_path: String,
}

/// Writes extents straight into a buffer, then to the disk.
struct StagedExtents {
    buf: Vec<u8>,
    extents: Vec<(u64, Range<usize>)>,
}

impl BatchSink for StagedExtents {
    fn slot(&mut self, addr: u64, len: usize) -> Result<&mut [u8], String> {
        let at = self.buf.len();
        self.buf.resize(at + len, 0);
        self.extents.push((addr, at..at + len));
        Ok(&mut self.buf[at..at + len])
    }

    fn zero(&mut self, addr: u64, len: usize) -> Result<(), String> {
        // A zero extent overwrites what was there (a later round's copy of
        // a block the guest zeroed).
        self.slot(addr, len).map(|_| ())
    }
}

/// Serves one disk stream on the destination: writes extents into
/// `incoming`, answers flushes once durable, until the source says done,
/// discards, or the stream breaks (the disk stays for a resume).
pub async fn receive_disk<S: SendStream, R: RecvStream>(
    mut writer: FrameWriter<S>,
    mut reader: FrameReader<R>,
    incoming: Arc<IncomingDisk>,
) -> Result<(), String> {
    let durable = incoming.durable.load(Ordering::SeqCst);
    writer
        .send_message(FrameKind::Control, &DiskReply::Opened { durable })
        .await
        .map_err(|e| e.to_string())?;
    let mut written_end = durable;
    // Once a write fails, the source is told why (it reads answers at its
    // next flush) and the rest of the stream is drained unwritten.
    let mut failed: Option<String> = None;
    loop {
        let Some(header) = reader.next_header().await.map_err(|e| e.to_string())? else {
            return Err(failed.unwrap_or_else(|| "the source closed the disk stream early".into()));
        };
        match header.kind {
            FrameKind::ExtentBatch => {
                let mut staged = StagedExtents {
                    buf: Vec::new(),
                    extents: Vec::new(),
                };
                reader
                    .read_batch_into(header, &mut staged)
                    .await
                    .map_err(|e| e.to_string())?;
                if failed.is_some() {
                    continue;
                }
                let disk = incoming.disk.clone();
                let end = offload(move || {
                    let mut d = disk.lock().expect("disk");
                    let mut end = 0;
                    for (offset, r) in &staged.extents {
                        d.write_at(*offset, &staged.buf[r.clone()])?;
                        end = end.max(offset + (r.end - r.start) as u64);
                    }
                    Ok::<u64, DiskError>(end)
                })
                .await;
                match end {
                    Ok(end) => written_end = written_end.max(end),
                    Err(e) => {
                        let reason = e.to_string();
                        tracing::warn!(disk = %incoming.name, "arriving disk copy failed: {reason}");
                        writer
                            .send_message(
                                FrameKind::Control,
                                &DiskReply::Failed {
                                    reason: reason.clone(),
                                },
                            )
                            .await
                            .map_err(|e| e.to_string())?;
                        failed = Some(reason);
                    }
                }
            }
            FrameKind::Control => {
                let body = reader
                    .read_body(header.body_len)
                    .await
                    .map_err(|e| e.to_string())?;
                let cmd: DiskCmd =
                    ferry_transport::message::decode_body(&body).map_err(|e| e.to_string())?;
                if let Some(reason) = failed {
                    let _ = writer
                        .send_message(
                            FrameKind::Control,
                            &DiskReply::Failed {
                                reason: reason.clone(),
                            },
                        )
                        .await;
                    let _ = writer.finish();
                    return Err(reason);
                }
                let (id, last) = match cmd {
                    DiskCmd::Flush { id } => (id, None),
                    DiskCmd::Done { workload_acked } => (DONE_ID, Some(workload_acked)),
                    DiskCmd::Discard => {
                        incoming
                            .discarded
                            .store(true, std::sync::atomic::Ordering::SeqCst);
                        return Ok(());
                    }
                };
                let disk = incoming.disk.clone();
                let reply = match offload(move || disk.lock().expect("disk").flush()).await {
                    Ok(()) => {
                        incoming.durable.store(written_end, Ordering::SeqCst);
                        if let Some(acked) = last {
                            *incoming.done.lock().expect("done") = Some(acked);
                        }
                        DiskReply::Flushed { id }
                    }
                    Err(e) => DiskReply::Failed {
                        reason: e.to_string(),
                    },
                };
                writer
                    .send_message(FrameKind::Control, &reply)
                    .await
                    .map_err(|e| e.to_string())?;
                if last.is_some() {
                    let _ = writer.finish();
                    return Ok(());
                }
            }
            other => return Err(format!("unexpected {other:?} frame on a disk stream")),
        }
    }
}
