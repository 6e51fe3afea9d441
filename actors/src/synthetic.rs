//! A synthetic guest in plain memory: a seeded dirtying workload stepped by
//! the caller. It serves the simulation and the demo where `/dev/kvm` is
//! missing, and passes the same conformance suite as the KVM backend.
//!
//! Like the KVM test guest it fills memory above 1 MiB with non-zero
//! pseudo-random data, then rewrites one qword in each working-set page per
//! pass, counting passes in a status word at guest-physical `0x900`.

use std::time::Duration;

use crate::guest::{DirtyBitmap, GuestBackend, GuestError, GuestProgress, PAGE_BYTES};
use crate::ram::GuestRam;

/// First byte of the fill (below it: the status block, as in the KVM guest).
pub const FILL_START: u64 = 1 << 20;
const STATUS_PASS: u64 = 0x900;
const STATE_MAGIC: &[u8; 4] = b"SYN1";

/// Shape and workload of a synthetic guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyntheticParams {
    /// Guest memory in bytes (a multiple of the page size, at least 2 MiB).
    pub memory_bytes: u64,
    /// Working set in bytes, starting at 1 MiB.
    pub wss_bytes: u64,
    /// Seed of the fill and of the workload.
    pub seed: u64,
    /// Page writes per second of [`GuestBackend::run_for`] (about what the
    /// KVM test guest manages with dirty logging on).
    pub writes_per_sec: u64,
}

/// Page writes per second a synthetic guest does by default.
pub const WRITES_PER_SEC_DEFAULT: u64 = 150_000;

/// The synthetic guest.
#[derive(Debug)]
pub struct SyntheticGuest {
    params: SyntheticParams,
    memory: GuestRam,
    run_debt_us: u64,
    running: bool,
    logging: bool,
    dirty: DirtyBitmap,
    cursor: u64,
    throttle_percent: u8,
    throttle_debt: u64,
    /// Virtual CPU time: a running guest with a working set keeps one
    /// vCPU busy, less the throttle.
    cpu_time: Duration,
}

impl SyntheticGuest {
    /// Whether `params` describe a guest that can be made.
    pub fn check(params: &SyntheticParams) -> Result<(), &'static str> {
        if params.memory_bytes < 2 << 20 || !params.memory_bytes.is_multiple_of(PAGE_BYTES) {
            return Err("memory must be whole pages, at least 2 MiB");
        }
        if FILL_START + params.wss_bytes > params.memory_bytes {
            return Err("the working set must fit above 1 MiB");
        }
        Ok(())
    }

    /// A blank, paused guest of `params.memory_bytes` (all zero).
    ///
    /// # Panics
    /// If [`Self::check`] refuses `params`.
    pub fn blank(params: SyntheticParams) -> Self {
        if let Err(why) = Self::check(&params) {
            panic!("synthetic guest: {why}");
        }
        Self {
            params,
            memory: GuestRam::allocate(params.memory_bytes),
            run_debt_us: 0,
            running: false,
            logging: false,
            dirty: DirtyBitmap::new(params.memory_bytes / PAGE_BYTES),
            cursor: 0,
            throttle_percent: 0,
            throttle_debt: 0,
            cpu_time: Duration::ZERO,
        }
    }

    /// A running guest whose memory is already filled.
    pub fn booted(params: SyntheticParams) -> Self {
        let mut g = Self::blank(params);
        g.memory
            .fill_random(FILL_START, params.memory_bytes, params.seed);
        g.running = true;
        g
    }

    fn wss_pages(&self) -> u64 {
        self.params.wss_bytes / PAGE_BYTES
    }

    fn pass(&self) -> u64 {
        self.memory
            .read_u64(STATUS_PASS)
            .expect("status inside memory")
    }

    fn mark(&mut self, gfn: u64) {
        if self.logging {
            self.dirty.set(gfn);
        }
    }

    /// Lets the workload do `writes` page writes (fewer when throttled;
    /// none when paused). A workload without a working set completes one
    /// pass per call.
    pub fn step(&mut self, writes: u64) {
        if !self.running {
            return;
        }
        let allowed = writes * u64::from(100 - self.throttle_percent) + self.throttle_debt;
        self.throttle_debt = allowed % 100;
        let writes = allowed / 100;
        let wss = self.wss_pages();
        if wss == 0 {
            self.finish_pass();
            return;
        }
        for _ in 0..writes {
            let gfn = FILL_START / PAGE_BYTES + self.cursor;
            let offset = (self.pass() % 512) * 8;
            let value = self.pass() ^ self.params.seed;
            self.memory
                .write_u64(gfn * PAGE_BYTES + offset, value)
                .expect("working set inside memory");
            self.mark(gfn);
            self.cursor += 1;
            if self.cursor == wss {
                self.cursor = 0;
                self.finish_pass();
            }
        }
    }

    fn finish_pass(&mut self) {
        let next = self.pass() + 1;
        self.memory
            .write_u64(STATUS_PASS, next)
            .expect("status inside memory");
        self.mark(0);
    }

    /// Page writes per full pass.
    pub fn writes_per_pass(&self) -> u64 {
        self.wss_pages().max(1)
    }
}

impl GuestBackend for SyntheticGuest {
    fn memory_bytes(&self) -> u64 {
        self.params.memory_bytes
    }

    fn read_page(&self, gfn: u64, dst: &mut [u8]) -> Result<(), GuestError> {
        self.memory.read_page(gfn, dst)
    }

    fn write_page(&mut self, gfn: u64, src: &[u8]) -> Result<(), GuestError> {
        self.memory.write_page(gfn, src)?;
        self.mark(gfn);
        Ok(())
    }

    fn start_dirty_log(&mut self) -> Result<(), GuestError> {
        if !self.logging {
            self.logging = true;
            self.dirty = DirtyBitmap::new(self.pages());
        }
        Ok(())
    }

    fn take_dirty(&mut self) -> Result<DirtyBitmap, GuestError> {
        if !self.logging {
            return Err(GuestError::NotLogging);
        }
        let pages = self.pages();
        Ok(std::mem::replace(&mut self.dirty, DirtyBitmap::new(pages)))
    }

    fn stop_dirty_log(&mut self) -> Result<(), GuestError> {
        self.logging = false;
        Ok(())
    }

    fn pause(&mut self) -> Result<(), GuestError> {
        self.running = false;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), GuestError> {
        self.running = true;
        Ok(())
    }

    fn is_running(&self) -> bool {
        self.running
    }

    fn save_state(&mut self) -> Result<Vec<u8>, GuestError> {
        if self.running {
            return Err(GuestError::NotPaused);
        }
        let mut out = STATE_MAGIC.to_vec();
        out.extend_from_slice(&self.params.memory_bytes.to_le_bytes());
        out.extend_from_slice(&self.cursor.to_le_bytes());
        Ok(out)
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), GuestError> {
        if self.running {
            return Err(GuestError::NotPaused);
        }
        let bad = |why: &str| GuestError::BadState(why.to_owned());
        if state.len() != 20 || &state[..4] != STATE_MAGIC {
            return Err(bad("not a synthetic guest state"));
        }
        let word = |at: usize| u64::from_le_bytes(state[at..at + 8].try_into().expect("8 bytes"));
        if word(4) != self.params.memory_bytes {
            return Err(bad("memory size differs"));
        }
        let cursor = word(12);
        if cursor >= self.wss_pages().max(1) {
            return Err(bad("cursor outside the working set"));
        }
        self.cursor = cursor;
        Ok(())
    }

    fn set_throttle(&mut self, percent: u8) -> Result<(), GuestError> {
        self.throttle_percent = percent.min(99);
        Ok(())
    }

    fn ram(&self) -> GuestRam {
        self.memory.clone()
    }

    fn run_for(&mut self, elapsed: Duration) {
        if self.running && self.params.writes_per_sec > 0 && self.wss_pages() > 0 {
            self.cpu_time += elapsed * u32::from(100 - self.throttle_percent) / 100;
        }
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let work = micros
            .saturating_mul(self.params.writes_per_sec)
            .saturating_add(self.run_debt_us);
        self.run_debt_us = work % 1_000_000;
        // Beyond a few passes more writes change no page's dirtiness, only
        // the values written: a long stretch is cut short, so catching up
        // on idle simulated time stays cheap.
        let writes = (work / 1_000_000).min(4 * self.writes_per_pass());
        if writes > 0 {
            self.step(writes);
        }
    }

    fn cpu_time(&self) -> Duration {
        self.cpu_time
    }

    fn attach_disk(
        &mut self,
        _port: std::sync::Arc<dyn crate::disk::DiskPort>,
        _blocks: u64,
        _stride: u64,
    ) -> Result<bool, GuestError> {
        // The synthetic guest has no device model: its disk actor runs
        // the disk workload in its place.
        Ok(false)
    }

    fn progress(&self) -> Result<GuestProgress, GuestError> {
        Ok(GuestProgress {
            pass: self.pass(),
            exception: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::conformance::{self, Harness};

    struct Synthetic;

    const PARAMS: SyntheticParams = SyntheticParams {
        memory_bytes: 4 << 20,
        wss_bytes: 64 * PAGE_BYTES,
        seed: 42,
        writes_per_sec: WRITES_PER_SEC_DEFAULT,
    };

    impl Harness for Synthetic {
        type Guest = SyntheticGuest;
        fn running_guest(&mut self) -> SyntheticGuest {
            SyntheticGuest::booted(PARAMS)
        }
        fn blank_like(&mut self, g: &SyntheticGuest) -> SyntheticGuest {
            SyntheticGuest::blank(g.params)
        }
        fn advance(&mut self, g: &mut SyntheticGuest, passes: u64) {
            g.step(passes * g.writes_per_pass());
        }
        fn working_set(&self) -> std::ops::Range<u64> {
            let first = FILL_START / PAGE_BYTES;
            first..first + PARAMS.wss_bytes / PAGE_BYTES
        }
        fn quiet_page(&self) -> u64 {
            PARAMS.memory_bytes / PAGE_BYTES - 8
        }
    }

    #[test]
    fn synthetic_guest_passes_the_conformance_suite() {
        conformance::run_all(&mut Synthetic);
    }

    #[test]
    fn throttle_slows_the_workload() {
        let mut g = SyntheticGuest::booted(PARAMS);
        g.set_throttle(75).expect("throttle");
        g.step(4 * g.writes_per_pass());
        assert_eq!(g.progress().expect("progress").pass, 1);
    }
}
