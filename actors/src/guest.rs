//! The guest backend: what migrations need from a running VM.
//!
//! Implemented by the KVM backend in `ferry-host` and by
//! [`SyntheticGuest`](crate::synthetic::SyntheticGuest) here; both pass the
//! suite in [`conformance`].
//!
//! The dirty set a backend reports is the hypervisor's dirty log ORed with
//! the VMM's own writes to guest memory ([`GuestBackend::write_page`]):
//! without the second half, pages the VMM wrote would silently be lost.

pub mod conformance;

use std::time::Duration;

use crate::ram::GuestRam;

/// Bytes per guest page: the wire's page size, as a guest-address quantity.
pub const PAGE_BYTES: u64 = ferry_transport::PAGE_BYTES as u64;

/// Why a guest operation failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum GuestError {
    /// The operation needs paused vCPUs.
    #[error("the guest must be paused for this")]
    NotPaused,
    /// A frame number outside guest memory.
    #[error("page {0} is outside guest memory")]
    OutOfRange(u64),
    /// Dirty logging is off.
    #[error("dirty logging is off")]
    NotLogging,
    /// Saved state does not fit this guest.
    #[error("bad guest state: {0}")]
    BadState(String),
    /// The backend cannot do this at all.
    #[error("{0}")]
    Unsupported(&'static str),
    /// The backend failed.
    #[error("{op}: {reason}")]
    Backend {
        /// What was attempted.
        op: &'static str,
        /// Why it failed.
        reason: String,
    },
}

/// One bit per guest page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    pages: u64,
}

impl DirtyBitmap {
    /// All clean.
    pub fn new(pages: u64) -> Self {
        let words = usize::try_from(pages.div_ceil(64)).expect("bitmap fits memory");
        Self {
            words: vec![0; words],
            pages,
        }
    }

    /// From KVM-style words (bit `p % 64` of word `p / 64` is page `p`);
    /// bits past `pages` are dropped.
    pub fn from_words(mut words: Vec<u64>, pages: u64) -> Self {
        let needed = usize::try_from(pages.div_ceil(64)).expect("bitmap fits memory");
        words.resize(needed, 0);
        if !pages.is_multiple_of(64)
            && let Some(last) = words.last_mut()
        {
            *last &= (1u64 << (pages % 64)) - 1;
        }
        Self { words, pages }
    }

    /// Every page dirty (round 0 of a pre-copy).
    pub fn all(pages: u64) -> Self {
        Self::from_words(
            vec![u64::MAX; usize::try_from(pages.div_ceil(64)).expect("fits")],
            pages,
        )
    }

    /// Pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    fn index(page: u64) -> (usize, u64) {
        (
            usize::try_from(page / 64).expect("index fits"),
            1 << (page % 64),
        )
    }

    /// Marks `page` dirty.
    ///
    /// # Panics
    /// If `page` is outside the bitmap.
    pub fn set(&mut self, page: u64) {
        assert!(
            page < self.pages,
            "page {page} outside a {}-page bitmap",
            self.pages
        );
        let (w, bit) = Self::index(page);
        self.words[w] |= bit;
    }

    /// Whether `page` is dirty (false outside the bitmap).
    pub fn is_set(&self, page: u64) -> bool {
        page < self.pages && {
            let (w, bit) = Self::index(page);
            self.words[w] & bit != 0
        }
    }

    /// Dirty pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether no page is dirty.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    /// Adds every page dirty in `other`.
    pub fn union_with(&mut self, other: &DirtyBitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    /// Dirty pages in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, w)| {
            let base = i as u64 * 64;
            let mut w = *w;
            std::iter::from_fn(move || {
                (w != 0).then(|| {
                    let bit = u64::from(w.trailing_zeros());
                    w &= w - 1;
                    base + bit
                })
            })
        })
    }
}

/// What the guest workload reports about itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestProgress {
    /// Completed passes over the working set.
    pub pass: u64,
    /// A CPU exception the guest reported (vector), if any.
    pub exception: Option<u64>,
}

/// How a guest moved to a new VMM process ([`GuestBackend::upgrade`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpgradeReport {
    /// From the pause in the old process to the resume in the new one.
    pub downtime: Duration,
    /// The process that ran the guest.
    pub old_pid: u32,
    /// The process that runs it now.
    pub new_pid: u32,
}

/// What a migration needs from a guest.
pub trait GuestBackend: Send {
    /// Bytes of guest memory.
    fn memory_bytes(&self) -> u64;

    /// Pages of guest memory.
    fn pages(&self) -> u64 {
        self.memory_bytes() / PAGE_BYTES
    }

    /// Copies page `gfn` into `dst` (`PAGE_BYTES` long).
    fn read_page(&self, gfn: u64, dst: &mut [u8]) -> Result<(), GuestError>;

    /// Writes page `gfn` from `src` as the VMM; recorded in the dirty set.
    fn write_page(&mut self, gfn: u64, src: &[u8]) -> Result<(), GuestError>;

    /// Starts dirty tracking: later writes appear in [`Self::take_dirty`].
    fn start_dirty_log(&mut self) -> Result<(), GuestError>;

    /// Pages dirtied since the last call or since logging started; clears them.
    fn take_dirty(&mut self) -> Result<DirtyBitmap, GuestError>;

    /// Stops dirty tracking.
    fn stop_dirty_log(&mut self) -> Result<(), GuestError>;

    /// Stops the vCPUs between instructions.
    fn pause(&mut self) -> Result<(), GuestError>;

    /// Lets the vCPUs run.
    fn resume(&mut self) -> Result<(), GuestError>;

    /// Whether the vCPUs are running.
    fn is_running(&self) -> bool;

    /// vCPU and device state of a paused guest, encoded by the backend
    /// (versioned; memory is not included).
    fn save_state(&mut self) -> Result<Vec<u8>, GuestError>;

    /// Restores state saved by the same kind of backend into this paused guest.
    fn restore_state(&mut self, state: &[u8]) -> Result<(), GuestError>;

    /// Keeps the vCPUs off the CPU `percent` % of the time (auto-converge).
    fn set_throttle(&mut self, percent: u8) -> Result<(), GuestError>;

    /// The workload's own progress report.
    fn progress(&self) -> Result<GuestProgress, GuestError>;

    /// The newest output of the guest's serial console, if it has one.
    fn console(&self) -> Option<Vec<u8>> {
        None
    }

    /// Types `bytes` into the guest's serial console; how many it took
    /// (its receive FIFO may be full: send the rest later).
    fn console_input(&mut self, bytes: &[u8]) -> Result<usize, GuestError> {
        let _ = bytes;
        Err(GuestError::Unsupported(
            "this guest has no serial console (only Linux guests do)",
        ))
    }

    /// CPU time the guest's vCPUs have used since it was built (DRS
    /// weighs hosts by it).
    fn cpu_time(&self) -> Duration;

    /// A shared view of guest memory for the bulk copy tasks.
    fn ram(&self) -> GuestRam;

    /// Lets a guest that has no vCPU threads of its own (the synthetic one)
    /// do `elapsed` worth of work if it is running. Guests whose vCPUs run
    /// by themselves do nothing here.
    fn run_for(&mut self, elapsed: Duration);

    /// Why the guest died under its VMM (its process crashed or was
    /// killed), if it did. Guests inside the node never do on their own.
    fn crashed(&self) -> Option<String> {
        None
    }

    /// Ends the guest for good (the VM was deleted, or runs on another host
    /// now): a guest in a process of its own stops it. Dropping a guest
    /// without this only lets go of it (a node that stops leaves its VMs
    /// running).
    fn discard(&mut self) {}

    /// Moves the running guest to a new VMM process on this host, memory
    /// shared, not copied. Guests without a VMM process refuse.
    fn upgrade(&mut self) -> Result<UpgradeReport, GuestError> {
        Err(GuestError::Unsupported(
            "this guest has no VMM process of its own to upgrade",
        ))
    }

    /// Connects the guest's disk device to `port`, for a disk of `blocks`
    /// pattern blocks written with `stride` (see
    /// [`crate::storage::pattern::WritePattern`]). Returns whether this
    /// guest drives its disk workload itself (the KVM test guest does;
    /// the synthetic guest does not, its disk actor runs the workload).
    fn attach_disk(
        &mut self,
        port: std::sync::Arc<dyn crate::disk::DiskPort>,
        blocks: u64,
        stride: u64,
    ) -> Result<bool, GuestError>;

    /// Connects the guest's virtio block devices, in order, to `ports`
    /// (one per disk of the VM, in its definition's order; a device that
    /// was connected before is reconnected). Returns how many devices the
    /// guest has: 0 for guests without virtio disks.
    fn connect_block_devices(
        &mut self,
        ports: Vec<std::sync::Arc<dyn crate::disk::DiskPort>>,
    ) -> Result<usize, GuestError> {
        let _ = ports;
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_sets_counts_and_iterates() {
        let mut b = DirtyBitmap::new(130);
        for p in [0, 63, 64, 129] {
            b.set(p);
        }
        assert_eq!(b.count(), 4);
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![0, 63, 64, 129]);
        assert!(!b.is_set(130));
        let mut other = DirtyBitmap::new(130);
        other.set(5);
        b.union_with(&other);
        assert!(b.is_set(5));
        assert_eq!(DirtyBitmap::all(130).count(), 130);
        assert_eq!(DirtyBitmap::from_words(vec![u64::MAX; 3], 70).count(), 70);
        assert!(DirtyBitmap::new(10).is_empty());
    }
}
