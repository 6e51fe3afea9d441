//! `DiskActor`: one virtual disk on a datastore. The guest's I/O and the
//! steps of a storage migration pass through it one message at a time, so
//! a guest write never races the chunk being copied: a write behind the
//! mirror's cursor goes to both copies, a write ahead of it is copied when
//! the cursor gets there.
//!
//! Guest writes are durable before they are acknowledged (write-through):
//! an acknowledged write survives a crash and any move.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::overlay::Overlay;
use super::{now, offload};
use crate::disk::{BlockBackend, DiskError, SharedDisk};
use crate::storage::datastore::Datastores;
use crate::storage::pattern::{PATTERN_BLOCK_BYTES, WritePattern};
use crate::storage::plan::{BLOCK_BYTES, MovePlan, Route, Step};
use crate::storage::target::DiskTarget;
use crate::storage::{DiskMoveReport, MoveOptions};

/// Where a disk lives: datastore and path on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPlace {
    /// Datastore name.
    pub datastore: String,
    /// Path inside it.
    pub path: String,
}

impl std::fmt::Display for DiskPlace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.datastore, self.path)
    }
}

/// What a copy step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyProgress {
    /// Copied a chunk; the first pass stands at `cursor` of `len`.
    Copied {
        /// First-pass cursor.
        cursor: u64,
        /// Disk size.
        len: u64,
        /// Bytes sent so far.
        sent: u64,
    },
    /// Rate-limited until then.
    Wait(Instant),
    /// Ready for [`DiskMsg::Finish`].
    Converged,
}

/// A disk as `ferry vm list` and tests see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// Disk name.
    pub name: String,
    /// Where it is.
    pub place: DiskPlace,
    /// Size in bytes.
    pub len: u64,
    /// Guest writes acknowledged.
    pub writes: u64,
    /// Whether a move runs.
    pub moving: bool,
    /// The synthetic workload's last acknowledged write.
    pub workload_acked: u64,
    /// Median latency of the workload's writes since the last
    /// [`DiskMsg::Info`], in microseconds (0: none).
    pub write_latency_us_p50: u64,
    /// Why the guest's writes fail, while they do (a full datastore).
    pub failing: Option<String>,
}

/// A disk's guest writes, as [`DiskMsg::Writes`] reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskActivity {
    /// Guest writes acknowledged so far.
    pub writes: u64,
    /// Why the guest's writes fail, while they do: set by a failed write,
    /// cleared by the next one that succeeds.
    pub failing: Option<String>,
}

/// Messages to a [`DiskActor`].
pub enum DiskMsg {
    /// A guest read.
    Read {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u32,
        /// The data.
        reply: RpcReplyPort<Result<Vec<u8>, DiskError>>,
    },
    /// A guest write, acknowledged once durable (on both copies where the
    /// move mirrors it).
    Write {
        /// Byte offset.
        offset: u64,
        /// Data.
        data: Vec<u8>,
        /// The guest's disk workload write number, recorded as
        /// acknowledged when the write is.
        workload_seq: Option<u64>,
        /// Done.
        reply: RpcReplyPort<Result<(), DiskError>>,
    },
    /// Describe the disk.
    Info(RpcReplyPort<DiskInfo>),
    /// Guest writes so far and whether they fail (no side effect, unlike
    /// `Info`).
    Writes(RpcReplyPort<DiskActivity>),
    /// Start moving the disk to `target` (at `to`).
    StartMove {
        /// How.
        options: MoveOptions,
        /// The copy.
        target: Box<dyn DiskTarget>,
        /// Where the copy is, for the report and the switch.
        to: DiskPlace,
        /// Started.
        reply: RpcReplyPort<Result<(), DiskError>>,
    },
    /// Copy the next chunk.
    CopyStep(RpcReplyPort<Result<CopyProgress, DiskError>>),
    /// The target failed: reconnect it and resume the copy where the
    /// target's durable data ends.
    Resume(RpcReplyPort<Result<(), DiskError>>),
    /// Guest I/O stops for this step: copy what is left, make the target
    /// durable and switch to it (local) or hand it over (remote).
    Finish(RpcReplyPort<Result<DiskMoveReport, DiskError>>),
    /// The switchover committed: delete the source (and overlay). After a
    /// remote move the actor stops.
    Commit(RpcReplyPort<Result<(), DiskError>>),
    /// The move failed: the source (with the overlay merged back) stays the
    /// disk, and the target is deleted.
    Abort {
        /// Why.
        reason: String,
        /// Done.
        reply: RpcReplyPort<DiskMoveReport>,
    },
    /// Close the disk (releasing its lock) and stop.
    Release(RpcReplyPort<()>),
    /// Run the synthetic guest's disk workload (the [`WritePattern`], one
    /// write every `gap`), or stop it with `None`.
    Workload(Option<Duration>),
    /// Check that every write the synthetic workload had acknowledged is
    /// on the disk (through the read path, overlay included); returns the
    /// blocks checked.
    VerifyWorkload(RpcReplyPort<Result<u64, String>>),
    /// The workload's next write (sent by the actor to itself; ticks of
    /// an earlier run of the workload are ignored).
    WorkloadTick(u64),
}

/// What a disk actor starts with.
pub struct DiskArgs {
    /// Disk name (e.g. `disk0`).
    pub name: String,
    /// The open, locked disk.
    pub disk: SharedDisk,
    /// Where it is.
    pub place: DiskPlace,
    /// This host's datastores.
    pub stores: Arc<dyn Datastores>,
    /// The synthetic workload's last acknowledged write (shared with the
    /// host, which carries it along when the disk moves to another host).
    pub workload_acked: Arc<AtomicU64>,
}

/// One disk.
#[derive(Debug, Default)]
pub struct DiskActor;

struct Moving {
    plan: MovePlan,
    target: Option<Box<dyn DiskTarget>>,
    to: DiskPlace,
    overlay: Option<Overlay>,
    started: Instant,
    converged_at: Option<Instant>,
    report: DiskMoveReport,
    finished: bool,
    /// Bytes sent to the target since its last flush.
    unflushed: u64,
    /// A mirrored write reached the source but not the target: the target
    /// misses an acknowledged write, so this copy may never complete.
    broken: Option<String>,
}

impl Moving {
    /// Refuses `op` once a mirrored write failed on the target.
    fn check_whole(&self, op: &'static str) -> Result<(), DiskError> {
        match &self.broken {
            Some(why) => Err(DiskError::MoveBroken {
                op,
                why: why.clone(),
            }),
            None => Ok(()),
        }
    }
}

/// The target is flushed after this much copied data, so the flush under
/// the pause has little left to write (and a resumed copy little to redo).
const FLUSH_EVERY_BYTES: u64 = 256 << 20;

/// The actor's state.
pub struct DiskState {
    name: String,
    disk: SharedDisk,
    place: DiskPlace,
    stores: Arc<dyn Datastores>,
    moving: Option<Moving>,
    /// After a remote finish: the disk lives on elsewhere; I/O is refused.
    handed_over: bool,
    writes: u64,
    workload_gap: Option<Duration>,
    workload_run: u64,
    workload_acked: Arc<AtomicU64>,
    latencies: Vec<Duration>,
    /// Why the last guest write failed, until one succeeds.
    failing: Option<String>,
}

/// How long the synthetic workload waits after a failed write before it
/// tries again (as a guest retrying an I/O error would).
const WORKLOAD_RETRY: Duration = Duration::from_millis(100);

/// One pattern write, as a read length.
const PATTERN_WRITE_BYTES: u32 = 4096;

/// Workload latencies kept between two [`DiskMsg::Info`] calls.
const LATENCIES_KEPT: usize = 1 << 16;

impl DiskState {
    /// Counts a guest write, and keeps why writes fail while they do
    /// (logged once per episode).
    fn note_guest_write(&mut self, r: &Result<(), DiskError>) {
        match r {
            Ok(()) => {
                self.writes += 1;
                if self.failing.take().is_some() {
                    tracing::info!(disk = %self.name, "guest writes succeed again");
                }
            }
            Err(_) if self.handed_over => {}
            Err(e) => {
                if self.failing.is_none() {
                    tracing::warn!(disk = %self.name, "guest writes fail: {e}");
                }
                self.failing = Some(e.to_string());
            }
        }
    }
}

fn refused(op: &'static str, reason: &str) -> DiskError {
    DiskError::Io {
        op,
        reason: reason.to_owned(),
    }
}

impl Actor for DiskActor {
    type Msg = DiskMsg;
    type State = DiskState;
    type Arguments = DiskArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<DiskMsg>,
        a: DiskArgs,
    ) -> Result<DiskState, ActorProcessingErr> {
        Ok(DiskState {
            name: a.name,
            disk: a.disk,
            place: a.place,
            stores: a.stores,
            moving: None,
            handed_over: false,
            writes: 0,
            workload_gap: None,
            workload_run: 0,
            workload_acked: a.workload_acked,
            latencies: Vec::new(),
            failing: None,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<DiskMsg>,
        msg: DiskMsg,
        s: &mut DiskState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            DiskMsg::Read { offset, len, reply } => {
                let _ = reply.send(s.read(offset, len).await);
            }
            DiskMsg::Write {
                offset,
                data,
                workload_seq,
                reply,
            } => {
                let r = s.write(offset, data).await;
                s.note_guest_write(&r);
                if let (Ok(()), Some(seq)) = (&r, workload_seq) {
                    s.workload_acked.fetch_max(seq, Ordering::SeqCst);
                }
                let _ = reply.send(r);
            }
            DiskMsg::Writes(reply) => {
                let _ = reply.send(DiskActivity {
                    writes: s.writes,
                    failing: s.failing.clone(),
                });
            }
            DiskMsg::Info(reply) => {
                let len = s.disk.lock().expect("disk").len_bytes();
                let mut l = std::mem::take(&mut s.latencies);
                l.sort_unstable();
                let _ = reply.send(DiskInfo {
                    name: s.name.clone(),
                    place: s.place.clone(),
                    len,
                    writes: s.writes,
                    moving: s.moving.is_some(),
                    workload_acked: s.workload_acked.load(Ordering::SeqCst),
                    write_latency_us_p50: l
                        .get(l.len() / 2)
                        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
                    failing: s.failing.clone(),
                });
            }
            DiskMsg::VerifyWorkload(reply) => {
                let _ = reply.send(s.verify_workload().await);
            }
            DiskMsg::Workload(gap) => {
                let was = s.workload_gap.is_some();
                s.workload_gap = gap;
                if gap.is_some() && !was {
                    s.workload_run += 1;
                    let _ = myself.cast(DiskMsg::WorkloadTick(s.workload_run));
                }
            }
            DiskMsg::WorkloadTick(run) => {
                let Some(gap) = s.workload_gap.filter(|_| run == s.workload_run) else {
                    return Ok(());
                };
                if s.handed_over {
                    s.workload_gap = None;
                    return Ok(());
                }
                let len = s.disk.lock().expect("disk").len_bytes();
                let pattern = WritePattern::new(len);
                let seq = s.workload_acked.load(Ordering::SeqCst) + 1;
                let mut data = vec![0u8; crate::disk::to_usize(PATTERN_BLOCK_BYTES)];
                pattern.fill(seq, &mut data);
                let t = now();
                let r = s.write(pattern.offset_of(seq), data).await;
                s.note_guest_write(&r);
                let next = match r {
                    Ok(()) => {
                        s.workload_acked.store(seq, Ordering::SeqCst);
                        if s.latencies.len() < LATENCIES_KEPT {
                            s.latencies.push(now() - t);
                        }
                        gap
                    }
                    // The same write again, a little later.
                    Err(_) => WORKLOAD_RETRY,
                };
                myself.send_after(next, move || DiskMsg::WorkloadTick(run));
            }
            DiskMsg::StartMove {
                options,
                target,
                to,
                reply,
            } => {
                let _ = reply.send(s.start_move(options, target, to).await);
            }
            DiskMsg::CopyStep(reply) => {
                let _ = reply.send(s.copy_step().await);
            }
            DiskMsg::Resume(reply) => {
                let _ = reply.send(s.resume().await);
            }
            DiskMsg::Finish(reply) => {
                let _ = reply.send(s.finish().await);
            }
            DiskMsg::Commit(reply) => {
                let r = s.commit().await;
                let stop = s.handed_over;
                let _ = reply.send(r);
                if stop {
                    myself.stop(None);
                }
            }
            DiskMsg::Abort { reason, reply } => {
                let _ = reply.send(s.abort(reason).await);
            }
            DiskMsg::Release(reply) => {
                if let Some(m) = s.moving.take()
                    && let Some(t) = m.target
                {
                    t.discard().await;
                }
                s.close();
                let _ = reply.send(());
                myself.stop(None);
            }
        }
        Ok(())
    }
}

impl DiskState {
    /// Closes the disk now (releasing its lock), not when the actor's
    /// state is dropped some time after it stopped.
    fn close(&mut self) {
        *self.disk.lock().expect("disk") = Box::new(crate::disk::MemDisk::new(0));
        self.handed_over = true;
    }

    fn check_open(&self, op: &'static str) -> Result<(), DiskError> {
        if self.handed_over {
            return Err(refused(op, "the disk has moved to another host"));
        }
        Ok(())
    }

    async fn verify_workload(&self) -> Result<u64, String> {
        let len = self.disk.lock().expect("disk").len_bytes();
        let pattern = WritePattern::new(len);
        let acked = self.workload_acked.load(Ordering::SeqCst);
        let first = acked.saturating_sub(pattern.blocks() - 1).max(1);
        let mut checked = 0;
        for expected in first..=acked {
            let block = pattern.block_of(expected);
            let buf = self
                .read(block * PATTERN_BLOCK_BYTES, PATTERN_WRITE_BYTES)
                .await
                .map_err(|e| format!("reading block {block}: {e}"))?;
            let found = pattern.decode(block, &buf);
            if found < expected || found > acked {
                return Err(format!(
                    "block {block}: acknowledged write {expected} is missing (found {found})"
                ));
            }
            checked += 1;
        }
        Ok(checked)
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, DiskError> {
        self.check_open("read")?;
        let disk = self.disk.clone();
        let overlay = self.moving.as_ref().and_then(|m| {
            let o = m.overlay.as_ref()?.data();
            let blocks: Vec<bool> = (offset / BLOCK_BYTES
                ..(offset + u64::from(len)).div_ceil(BLOCK_BYTES))
                .map(|b| m.plan.in_overlay(b))
                .collect();
            blocks.iter().any(|b| *b).then(|| (o.clone(), blocks))
        });
        offload(move || {
            let mut buf = vec![0u8; crate::disk::to_usize(u64::from(len))];
            let Some((overlay, blocks)) = overlay else {
                disk.lock().expect("disk").read_at(offset, &mut buf)?;
                return Ok(buf);
            };
            // Block by block: overlay blocks from the overlay, the rest
            // from the base.
            let first = offset / BLOCK_BYTES;
            let mut at = offset;
            let end = offset + u64::from(len);
            while at < end {
                let b = at / BLOCK_BYTES;
                let stop = ((b + 1) * BLOCK_BYTES).min(end);
                let dst = &mut buf
                    [crate::disk::to_usize(at - offset)..crate::disk::to_usize(stop - offset)];
                if blocks[crate::disk::to_usize(b - first)] {
                    overlay.lock().expect("overlay").read_at(at, dst)?;
                } else {
                    disk.lock().expect("disk").read_at(at, dst)?;
                }
                at = stop;
            }
            Ok(buf)
        })
        .await
    }

    async fn write(&mut self, offset: u64, data: Vec<u8>) -> Result<(), DiskError> {
        self.check_open("write")?;
        let len = self.disk.lock().expect("disk").len_bytes();
        let range = crate::disk::check_range(offset, data.len(), len)?;
        let Some(m) = self.moving.as_mut().filter(|m| !m.finished) else {
            let disk = self.disk.clone();
            return offload(move || write_through(&disk, offset, &data)).await;
        };
        // Blocks the overlay does not have yet are copied into it first
        // (copy on write), so a partial write keeps the rest of the block.
        let fresh: Vec<u64> = (range.start / BLOCK_BYTES..range.end.div_ceil(BLOCK_BYTES))
            .filter(|b| !m.plan.in_overlay(*b))
            .collect();
        match m.plan.route_write(&range) {
            Route::Source => {
                let disk = self.disk.clone();
                offload(move || write_through(&disk, offset, &data)).await
            }
            Route::Both => {
                let data = Arc::new(data);
                let disk = self.disk.clone();
                let local = data.clone();
                let Some(target) = m.target.as_mut() else {
                    // Its finish failed and took the target along (the move
                    // is broken for good): the source alone.
                    return offload(move || write_through(&disk, offset, &local)).await;
                };
                let (on_source, on_target) = tokio::join!(
                    offload(move || write_through(&disk, offset, &local)),
                    target.write_durable(offset, data)
                );
                on_source?;
                // The source stays authoritative: a write durable there is
                // acknowledged even if the target failed it, and the target,
                // now missing it, can never become the disk.
                if let Err(e) = on_target {
                    tracing::warn!(disk = %self.name, "mirrored write failed on the target: {e}");
                    m.broken.get_or_insert_with(|| e.to_string());
                }
                Ok(())
            }
            Route::Overlay => {
                let overlay = m.overlay.clone().expect("overlay for a snapshot move");
                let base = self.disk.clone();
                offload(move || overlay.write(&base, &fresh, offset, &data)).await?;
                m.plan.overlaid(&range);
                Ok(())
            }
        }
    }

    async fn start_move(
        &mut self,
        options: MoveOptions,
        target: Box<dyn DiskTarget>,
        to: DiskPlace,
    ) -> Result<(), DiskError> {
        self.check_open("move")?;
        if self.moving.is_some() {
            target.discard().await;
            return Err(refused("move", "a move of this disk is already running"));
        }
        options.check().map_err(|e| refused("move", &e))?;
        let disk = self.disk.clone();
        let (len, allocated) = offload(move || {
            let d = disk.lock().expect("disk");
            d.allocated().map(|a| (d.len_bytes(), a))
        })
        .await?;
        let overlay = if options.method == crate::storage::Method::Snapshot {
            let (stores, base) = (self.stores.clone(), self.place.clone());
            match offload(move || Overlay::create(stores.as_ref(), &base, len)).await {
                Ok(o) => Some(o),
                Err(e) => {
                    target.discard().await;
                    return Err(e);
                }
            }
        } else {
            None
        };
        let t = now();
        let plan = MovePlan::new(t, options, len, allocated);
        tracing::info!(disk = %self.name, from = %self.place, to = %to, method = %options.method, "disk move starts");
        self.moving = Some(Moving {
            report: DiskMoveReport {
                disk: self.name.clone(),
                method: options.method.to_string(),
                from: self.place.datastore.clone(),
                to: to.datastore.clone(),
                disk_bytes: len,
                ..DiskMoveReport::default()
            },
            plan,
            target: Some(target),
            to,
            overlay,
            started: t,
            converged_at: None,
            finished: false,
            unflushed: 0,
            broken: None,
        });
        Ok(())
    }

    async fn copy_step(&mut self) -> Result<CopyProgress, DiskError> {
        let m = self
            .moving
            .as_mut()
            .filter(|m| !m.finished)
            .ok_or_else(|| refused("copy", "no move is running"))?;
        m.check_whole("copy")?;
        let t = now();
        match m.plan.next_step(t) {
            Step::Wait(until) => Ok(CopyProgress::Wait(until)),
            Step::Converged => {
                if m.converged_at.is_none() {
                    // Durable before it counts as copied.
                    let target = m.target.as_mut().expect("target while moving");
                    target.flush().await?;
                    m.unflushed = 0;
                    m.converged_at = Some(now());
                }
                Ok(CopyProgress::Converged)
            }
            Step::Copy(range) => {
                let fresh = m.plan.in_first_pass();
                let target = m.target.as_mut().expect("target while moving");
                let sent = copy_range(&self.disk, target.as_mut(), range.clone(), fresh).await?;
                m.report.skipped_bytes += (range.end - range.start) - sent;
                m.plan.copied(&range, sent);
                m.unflushed += sent;
                // At least eight flushes per pass, so a broken link loses
                // little of a small disk's copy either.
                let every = FLUSH_EVERY_BYTES.min((m.plan.len() / 8).max(1));
                if m.unflushed >= every {
                    m.target
                        .as_mut()
                        .expect("target while moving")
                        .flush()
                        .await?;
                    m.unflushed = 0;
                }
                Ok(CopyProgress::Copied {
                    cursor: m.plan.cursor(),
                    len: m.plan.len(),
                    sent: m.plan.copied_bytes(),
                })
            }
        }
    }

    async fn resume(&mut self) -> Result<(), DiskError> {
        // A finished copy has nothing to resume (its target went with the
        // finish): the caller fails instead.
        let m = self
            .moving
            .as_mut()
            .filter(|m| !m.finished)
            .ok_or_else(|| refused("resume", "no move is running"))?;
        m.check_whole("resume")?;
        let target = m.target.as_mut().expect("target while moving");
        let durable = target.reconnect().await?;
        m.plan
            .resume_from(durable)
            .map_err(|e| refused("resume", &e))?;
        tracing::info!(disk = %self.name, durable, "disk copy resumes after a broken link");
        Ok(())
    }

    async fn finish(&mut self) -> Result<DiskMoveReport, DiskError> {
        let m = self
            .moving
            .as_mut()
            .filter(|m| !m.finished)
            .ok_or_else(|| refused("finish", "no move is running"))?;
        m.check_whole("finish")?;
        if !m.plan.converged() {
            return Err(refused("finish", "the copy has not converged"));
        }
        let paused_at = now();
        let ranges = m.plan.final_ranges();
        let source = match &m.overlay {
            Some(overlay) => overlay.data().clone(),
            None => self.disk.clone(),
        };
        let target = m.target.as_mut().expect("target while moving");
        let mut sent = 0;
        for r in ranges {
            sent += copy_range(&source, target.as_mut(), r, false).await?;
        }
        target.flush().await?;
        m.plan.copied(&(0..0), sent);
        let done = now();
        let mut report = m.report.clone();
        report.copied_bytes = m.plan.copied_bytes();
        report.skipped_bytes += m.plan.hole_bytes();
        report.rounds = m.plan.rounds();
        report.mirrored_writes = m.plan.mirrored_writes();
        report.overlay_blocks = m.plan.overlay_blocks();
        report.resumes = m.plan.resumes();
        report.total_ms = (done - m.started).as_secs_f64() * 1e3;
        report.pause_ms = (done - paused_at).as_secs_f64() * 1e3;
        let converge = m.converged_at.unwrap_or(done) - m.started;
        report.copy_mb_per_s = report.copied_bytes as f64 / converge.as_secs_f64().max(1e-9) / 1e6;
        let target = m.target.take().expect("target while moving");
        let finished = match target.finish().await {
            Ok(finished) => finished,
            Err(e) => {
                // The target is gone with its finish: the copy can never
                // complete, and writes go to the source alone.
                m.broken
                    .get_or_insert_with(|| format!("finishing the copy: {e}"));
                return Err(e);
            }
        };
        match finished {
            Some(local) => {
                // The copy is the disk now; the old files go at commit.
                self.disk = local;
                std::mem::swap(&mut self.place, &mut m.to);
            }
            None => self.handed_over = true,
        }
        m.finished = true;
        tracing::info!(disk = %self.name, pause_ms = report.pause_ms, copied = report.copied_bytes, "disk move finished");
        Ok(report)
    }

    async fn commit(&mut self) -> Result<(), DiskError> {
        let Some(m) = self.moving.take() else {
            return Ok(());
        };
        if !m.finished {
            self.moving = Some(m);
            return Err(refused("commit", "the move has not finished"));
        }
        // After a local switch `m.to` names the old place; after a remote
        // one the source is still `self.place`.
        let old = if self.handed_over {
            self.place.clone()
        } else {
            m.to.clone()
        };
        if self.handed_over {
            // Close the source before deleting it.
            self.close();
        }
        let (stores, overlay) = (self.stores.clone(), m.overlay);
        offload(move || {
            if let Some(o) = overlay {
                o.remove(stores.as_ref())?;
            }
            stores.remove(&old.datastore, &old.path)
        })
        .await
    }

    async fn abort(&mut self, reason: String) -> DiskMoveReport {
        let Some(mut m) = self.moving.take() else {
            return DiskMoveReport {
                error: Some(reason),
                ..DiskMoveReport::default()
            };
        };
        if m.finished && !self.handed_over {
            // A local switch already happened: nothing to undo.
            self.moving = None;
            return m.report;
        }
        if m.finished {
            // The source was handed over but the VM stays: it is ours again.
            self.handed_over = false;
        }
        if let Some(t) = m.target.take() {
            t.discard().await;
        }
        if let Some(overlay) = m.overlay.take() {
            let ranges = m.plan.overlay_ranges();
            let (disk, stores) = (self.disk.clone(), self.stores.clone());
            let merged = offload(move || {
                overlay.merge_into(&disk, &ranges)?;
                overlay.remove(stores.as_ref())
            })
            .await;
            if let Err(e) = merged {
                tracing::error!(disk = %self.name, "merging the overlay back: {e}");
            }
        }
        tracing::warn!(disk = %self.name, %reason, "disk move aborted; the source stays");
        let mut report = m.report;
        report.error = Some(reason);
        report
    }
}

fn write_through(disk: &SharedDisk, offset: u64, data: &[u8]) -> Result<(), DiskError> {
    disk.lock().expect("disk").write_durable(offset, data)
}

/// Copies `range` of `source` to `target`: in the kernel where both are
/// files, else through one buffer. Where the target range is `fresh`
/// (never written), all-zero extents are left out and the copy stays
/// sparse; elsewhere zeros must overwrite what the target holds. Returns
/// the bytes sent.
async fn copy_range(
    source: &SharedDisk,
    target: &mut dyn DiskTarget,
    range: Range<u64>,
    fresh: bool,
) -> Result<u64, DiskError> {
    if let Some(n) = target.copy_from(source.clone(), range.clone()).await? {
        return Ok(n);
    }
    const EXTENT: u64 = 64 << 10;
    let src = source.clone();
    let r = range.clone();
    let buf = offload(move || {
        let mut buf = vec![0u8; crate::disk::to_usize(r.end - r.start)];
        src.lock()
            .expect("disk")
            .read_at(r.start, &mut buf)
            .map(|()| buf)
    })
    .await?;
    if !fresh {
        let n = buf.len() as u64;
        target.write(range.start, Arc::new(buf)).await?;
        return Ok(n);
    }
    if ferry_transport::batch::is_zero(&buf) {
        return Ok(0);
    }
    // Send only the non-zero extents of the chunk.
    let mut sent = 0;
    let mut at = 0usize;
    while at < buf.len() {
        let n = (buf.len() - at).min(crate::disk::to_usize(EXTENT));
        let mut end = at + n;
        if ferry_transport::batch::is_zero(&buf[at..end]) {
            at = end;
            continue;
        }
        while end < buf.len() {
            let next = (end + crate::disk::to_usize(EXTENT)).min(buf.len());
            if ferry_transport::batch::is_zero(&buf[end..next]) {
                break;
            }
            end = next;
        }
        target
            .write(range.start + at as u64, Arc::new(buf[at..end].to_vec()))
            .await?;
        sent += (end - at) as u64;
        at = end;
    }
    Ok(sent)
}

/// Drives a move started with [`DiskMsg::StartMove`] until it converges
/// (or fails): copy steps, rate waits, and resumes after a broken link
/// (up to `resumes_max`). `on_progress` sees each step.
pub async fn copy_until_converged(
    disk: &ActorRef<DiskMsg>,
    resumes_max: u32,
    mut on_progress: impl FnMut(&CopyProgress),
) -> Result<(), DiskError> {
    let mut resumes = 0;
    loop {
        match call(disk, DiskMsg::CopyStep).await? {
            Ok(CopyProgress::Wait(until)) => {
                tokio::time::sleep_until(tokio::time::Instant::from_std(until)).await;
            }
            Ok(CopyProgress::Converged) => {
                on_progress(&CopyProgress::Converged);
                return Ok(());
            }
            Ok(p) => on_progress(&p),
            Err(e) if resumes < resumes_max && e.may_resume() => {
                resumes += 1;
                tracing::warn!("disk copy step failed ({e}); resuming");
                tokio::time::sleep(Duration::from_millis(200)).await;
                match call(disk, DiskMsg::Resume).await? {
                    Ok(()) => {}
                    Err(r) => return Err(refused("resume", &format!("{e}; then {r}"))),
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Starts moving `disk` to `target` (at `to`).
pub async fn start_move(
    disk: &ActorRef<DiskMsg>,
    options: MoveOptions,
    target: Box<dyn DiskTarget>,
    to: DiskPlace,
) -> Result<(), DiskError> {
    call(disk, |reply| DiskMsg::StartMove {
        options,
        target,
        to,
        reply,
    })
    .await?
}

/// Calls `disk` with a request that replies.
pub async fn call<T: Send + 'static>(
    disk: &ActorRef<DiskMsg>,
    msg: impl FnOnce(RpcReplyPort<T>) -> DiskMsg,
) -> Result<T, DiskError> {
    match disk.call(msg, None).await {
        Ok(ractor::rpc::CallResult::Success(r)) => Ok(r),
        _ => Err(refused("disk", "the disk actor is gone")),
    }
}

/// A [`DiskPort`](crate::disk::DiskPort) onto a disk actor, for vCPU
/// threads (which may block).
pub struct ActorDiskPort(pub ActorRef<DiskMsg>);

impl crate::disk::DiskPort for ActorDiskPort {
    fn write(
        &self,
        offset: u64,
        data: Vec<u8>,
        workload_seq: Option<u64>,
    ) -> Result<(), DiskError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.0
            .cast(DiskMsg::Write {
                offset,
                data,
                workload_seq,
                reply: tx.into(),
            })
            .map_err(|_| gone("write"))?;
        rx.blocking_recv().map_err(|_| gone("write"))?
    }

    fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, DiskError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.0
            .cast(DiskMsg::Read {
                offset,
                len,
                reply: tx.into(),
            })
            .map_err(|_| gone("read"))?;
        rx.blocking_recv().map_err(|_| gone("read"))?
    }
}

/// The disk actor stopped (its disk moved away or the VM is gone).
fn gone(op: &'static str) -> DiskError {
    DiskError::Unreachable {
        op,
        reason: "the disk actor is gone".into(),
    }
}

/// A guest's port onto its workload disk that recognises the verifiable
/// pattern in the guest's own writes (the Linux test guest's disk writer
/// writes it through its virtio disk), so the disk actor records them as
/// the workload's acknowledged writes and `--verify` checks them.
pub struct PatternPort {
    /// The disk.
    pub inner: ActorDiskPort,
    /// The disk's pattern.
    pub pattern: WritePattern,
}

impl crate::disk::DiskPort for PatternPort {
    fn write(
        &self,
        offset: u64,
        data: Vec<u8>,
        workload_seq: Option<u64>,
    ) -> Result<(), DiskError> {
        let seq = workload_seq.or_else(|| {
            let whole = data.len() as u64 == PATTERN_BLOCK_BYTES;
            let block = offset / PATTERN_BLOCK_BYTES;
            let aligned = offset.is_multiple_of(PATTERN_BLOCK_BYTES);
            let seq = if whole && aligned {
                self.pattern.decode(block, &data)
            } else {
                0
            };
            (seq != 0).then_some(seq)
        });
        self.inner.write(offset, data, seq)
    }

    fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, DiskError> {
        self.inner.read(offset, len)
    }
}

/// What a pattern writer did.
#[derive(Debug, Clone, Default)]
pub struct WriterStats {
    /// Writes acknowledged.
    pub acked: u64,
    /// Latency of each acknowledged write.
    pub latencies: Vec<Duration>,
    /// Why it stopped, if a write failed.
    pub error: Option<String>,
}

/// The synthetic guest's disk workload: writes the [`WritePattern`] through
/// `disk`, one write at a time (each waits for its acknowledgement), from
/// sequence `acked + 1`, storing each acknowledged sequence number in
/// `acked`, until `stop` turns true or a write fails. `gap` spaces the
/// writes out (zero: back to back).
pub async fn run_pattern_writer(
    disk: ActorRef<DiskMsg>,
    pattern: WritePattern,
    acked: Arc<AtomicU64>,
    gap: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> WriterStats {
    let mut stats = WriterStats::default();
    let mut buf = vec![0u8; crate::disk::to_usize(PATTERN_BLOCK_BYTES)];
    loop {
        if *stop.borrow() {
            return stats;
        }
        let seq = acked.load(Ordering::SeqCst) + 1;
        pattern.fill(seq, &mut buf);
        let offset = pattern.offset_of(seq);
        let data = buf.clone();
        let t = tokio::time::Instant::now();
        match call(&disk, |reply| DiskMsg::Write {
            offset,
            data,
            workload_seq: None,
            reply,
        })
        .await
        .and_then(|r| r)
        {
            Ok(()) => {
                acked.store(seq, Ordering::SeqCst);
                stats.acked += 1;
                stats.latencies.push(t.elapsed());
            }
            Err(e) => {
                stats.error = Some(e.to_string());
                return stats;
            }
        }
        if gap.is_zero() {
            tokio::task::yield_now().await;
        } else {
            tokio::select! {
                () = tokio::time::sleep(gap) => {}
                _ = stop.changed() => {}
            }
        }
    }
}

/// Checks that `disk` holds every write of `pattern` up to `acked`.
pub fn verify_pattern(
    disk: &dyn BlockBackend,
    pattern: &WritePattern,
    acked: u64,
) -> Result<u64, crate::storage::pattern::PatternError> {
    pattern.verify(acked, 0, |offset, buf| disk.read_at(offset, buf))
}
