//! The block backend: what a disk migration needs from a virtual disk.
//!
//! Implemented by file disks on a datastore in `ferry-host` and by
//! [`MemDisk`] here (the simulation's disk, with a durability model: what
//! was not flushed is lost in a crash). Both pass the suite in
//! [`conformance`].

pub mod conformance;

use std::ops::Range;

/// Bytes per sector, the unit guests address disks in.
pub const SECTOR_BYTES: u64 = 512;

/// Why a disk operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiskError {
    /// The range lies beyond the end of the disk.
    #[error("bytes {start}..{end} lie beyond the disk's {len} bytes")]
    OutOfRange {
        /// First byte asked for.
        start: u64,
        /// One past the last.
        end: u64,
        /// Disk size.
        len: u64,
    },
    /// Another owner holds the disk's lock.
    #[error("disk is locked by another owner: {0}")]
    Locked(String),
    /// The device failed the operation.
    #[error("{op}: {reason}")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// Why it failed.
        reason: String,
    },
    /// The datastore holding the disk has no space left (a thin disk
    /// grows as it is written).
    #[error(
        "{op}: datastore {datastore} is full (no space left on its device): free space there, or move the disk to another datastore"
    )]
    Full {
        /// What was attempted.
        op: &'static str,
        /// The datastore's name (or its folder, where no name is known).
        datastore: String,
    },
    /// A disk move lost a write on its target, so the copy can never be
    /// whole: the move must be given up (the source stays the disk).
    #[error("{op}: a mirrored write failed on the target ({why}); the copy cannot complete")]
    MoveBroken {
        /// What was attempted.
        op: &'static str,
        /// Why the mirrored write failed.
        why: String,
    },
    /// The disk's owner (the node serving a VMM's disk) cannot be reached
    /// now; it may come back (a restarted node connects again).
    #[error("{op}: the disk's node cannot be reached: {reason}")]
    Unreachable {
        /// What was attempted.
        op: &'static str,
        /// Why.
        reason: String,
    },
    /// The host a disk is copied to failed to store it (its reason, as it
    /// said it): not a broken link, so resuming would not help.
    #[error("{peer} could not store the disk copy: {reason}")]
    Peer {
        /// That host.
        peer: String,
        /// What it said.
        reason: String,
    },
}

impl DiskError {
    /// Whether a broken link may explain the error, so reconnecting and
    /// resuming the copy is worth a try.
    pub fn may_resume(&self) -> bool {
        matches!(self, Self::Io { .. } | Self::Unreachable { .. })
    }
}

/// What storage migration needs from a disk.
pub trait BlockBackend: Send {
    /// Size in bytes.
    fn len_bytes(&self) -> u64;

    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError>;

    /// Writes `data` at `offset`; durable only after [`Self::flush`].
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError>;

    /// Makes every write so far durable.
    fn flush(&mut self) -> Result<(), DiskError>;

    /// Writes `data` at `offset` and makes that write durable (not
    /// necessarily others): a guest's write-through write, which must not
    /// wait for unrelated dirty data (a copy in progress) to reach the
    /// device.
    fn write_durable(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError>;

    /// Ranges that may hold data, ascending; everything else reads as
    /// zero (holes of a sparse file), so a copy may skip it.
    fn allocated(&self) -> Result<Vec<Range<u64>>, DiskError>;

    /// Copies `range` of this disk into the same range of `dst` inside the
    /// kernel (`copy_file_range`, or a reflink where the file system has
    /// them), when both are files; `Ok(false)` when it cannot, and the
    /// caller copies through memory.
    fn copy_to(&self, range: Range<u64>, dst: &mut dyn BlockBackend) -> Result<bool, DiskError>;

    /// The file descriptor behind the disk, if it is a file (for
    /// [`Self::copy_to`]).
    fn raw_fd(&self) -> Option<i32>;
}

/// The guest's side of a virtual disk device: a vCPU thread that meets a
/// disk request in the guest calls it and waits (the disk actor makes the
/// write durable, on both copies while a mirror runs).
pub trait DiskPort: Send + Sync {
    /// Writes `data` at `offset`, durable before it returns; `workload_seq`
    /// is the guest's pattern write number, if it is one, recorded once
    /// acknowledged.
    fn write(&self, offset: u64, data: Vec<u8>, workload_seq: Option<u64>)
    -> Result<(), DiskError>;

    /// Reads `len` bytes at `offset`.
    fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, DiskError>;
}

/// A disk shared between the actor that owns it and the blocking pool
/// that does its I/O.
pub type SharedDisk = std::sync::Arc<std::sync::Mutex<Box<dyn BlockBackend>>>;

/// Wraps a backend as a [`SharedDisk`].
pub fn shared(disk: Box<dyn BlockBackend>) -> SharedDisk {
    std::sync::Arc::new(std::sync::Mutex::new(disk))
}

/// A byte count or offset inside memory as `usize` (buffers are in
/// memory, so it fits on every target ferry runs on).
pub fn to_usize(v: u64) -> usize {
    usize::try_from(v).expect("a buffer length fits the address space")
}

/// Checks that `offset..offset + len` fits a disk of `disk_len` bytes.
pub fn check_range(offset: u64, len: usize, disk_len: u64) -> Result<Range<u64>, DiskError> {
    let end = offset.checked_add(len as u64);
    match end {
        Some(end) if end <= disk_len => Ok(offset..end),
        _ => Err(DiskError::OutOfRange {
            start: offset,
            end: end.unwrap_or(u64::MAX),
            len: disk_len,
        }),
    }
}

/// An in-memory disk with a durability model: writes land in a volatile
/// image, [`BlockBackend::flush`] copies them to the durable one, and
/// [`MemDisk::crash`] throws the volatile image away. Faults can be set to
/// fail writes.
#[derive(Debug, Clone)]
pub struct MemDisk {
    volatile: Vec<u8>,
    durable: Vec<u8>,
    /// Byte ranges written since the last flush.
    unflushed: Vec<Range<u64>>,
    written: Vec<Range<u64>>,
    fail_writes: bool,
}

impl MemDisk {
    /// A zeroed disk of `len_bytes` (a whole number of sectors).
    ///
    /// # Panics
    /// If the size is not whole sectors or does not fit memory.
    pub fn new(len_bytes: u64) -> Self {
        assert!(len_bytes.is_multiple_of(SECTOR_BYTES), "whole sectors");
        let len = usize::try_from(len_bytes).expect("disk fits memory");
        Self {
            volatile: vec![0; len],
            durable: vec![0; len],
            unflushed: Vec::new(),
            written: Vec::new(),
            fail_writes: false,
        }
    }

    /// Loses every write not yet flushed, as a power cut would.
    pub fn crash(&mut self) {
        self.volatile.clone_from(&self.durable);
        self.unflushed.clear();
    }

    /// Makes later writes (and flushes) fail, or succeed again.
    pub fn set_fail_writes(&mut self, fail: bool) {
        self.fail_writes = fail;
    }

    fn span(r: &Range<u64>) -> Range<usize> {
        usize::try_from(r.start).expect("fits")..usize::try_from(r.end).expect("fits")
    }
}

impl BlockBackend for MemDisk {
    fn len_bytes(&self) -> u64 {
        self.volatile.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let r = check_range(offset, buf.len(), self.len_bytes())?;
        buf.copy_from_slice(&self.volatile[Self::span(&r)]);
        Ok(())
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        let r = check_range(offset, data.len(), self.len_bytes())?;
        if self.fail_writes {
            return Err(DiskError::Io {
                op: "write",
                reason: "injected write error".into(),
            });
        }
        self.volatile[Self::span(&r)].copy_from_slice(data);
        self.unflushed.push(r.clone());
        self.written.push(r);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        if self.fail_writes {
            return Err(DiskError::Io {
                op: "flush",
                reason: "injected write error".into(),
            });
        }
        for r in self.unflushed.drain(..) {
            let s = Self::span(&r);
            self.durable[s.clone()].copy_from_slice(&self.volatile[s]);
        }
        Ok(())
    }

    fn allocated(&self) -> Result<Vec<Range<u64>>, DiskError> {
        // Whole 64 KiB extents around everything ever written, merged.
        const EXTENT: u64 = 64 << 10;
        let mut extents: Vec<Range<u64>> = self
            .written
            .iter()
            .map(|r| {
                let start = r.start / EXTENT * EXTENT;
                let end = r.end.div_ceil(EXTENT) * EXTENT;
                start..end.min(self.len_bytes())
            })
            .collect();
        extents.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<u64>> = Vec::new();
        for r in extents {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        Ok(merged)
    }

    fn write_durable(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        // The model has no per-range durability: flushing everything is
        // the conservative reading.
        self.write_at(offset, data)?;
        self.flush()
    }

    fn copy_to(&self, _range: Range<u64>, _dst: &mut dyn BlockBackend) -> Result<bool, DiskError> {
        Ok(false)
    }

    fn raw_fd(&self) -> Option<i32> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conformance::DiskHarness;

    struct Mem;

    impl DiskHarness for Mem {
        type Disk = MemDisk;
        fn fresh(&mut self, len_bytes: u64) -> MemDisk {
            MemDisk::new(len_bytes)
        }
        fn reopen_after_crash(&mut self, mut disk: MemDisk) -> MemDisk {
            disk.crash();
            disk
        }
        fn loses_unflushed_writes(&self) -> bool {
            true
        }
    }

    #[test]
    fn mem_disk_passes_the_conformance_suite() {
        conformance::run_all(&mut Mem);
    }

    #[test]
    fn injected_write_errors_fail_writes_and_flushes() {
        let mut d = MemDisk::new(4096);
        d.set_fail_writes(true);
        assert!(d.write_at(0, &[1; 512]).is_err());
        assert!(d.flush().is_err());
        d.set_fail_writes(false);
        d.write_at(0, &[1; 512]).expect("write");
    }
}
