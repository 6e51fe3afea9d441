//! Guest memory faulted in ahead of need, for migration destinations.
//!
//! First touch of cold memory runs at 0.25-0.7 GiB/s on these machines
//! (PLATFORM.md): a destination that faults its memory in while pages
//! arrive moves at that speed, whatever the network does. The pool keeps
//! zeroed, populated regions of the sizes it was asked for; a shadow VM
//! takes one, and the pool prepares the next in the background. Regions
//! live in memfds, so a VMM process can map the same pages.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vm_memory::MmapRegion;
use vm_memory::bitmap::AtomicBitmap;

type Region = MmapRegion<AtomicBitmap>;

#[derive(Default)]
struct Shelves {
    ready: HashMap<u64, Vec<Region>>,
    preparing: HashMap<u64, usize>,
}

/// Zeroed, populated guest memory regions by size.
#[derive(Clone, Default)]
pub struct MemoryPool {
    shelves: Arc<(Mutex<Shelves>, Condvar)>,
}

impl std::fmt::Debug for MemoryPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (lock, _) = &*self.shelves;
        let s = lock.lock().expect("pool lock");
        let ready: Vec<(u64, usize)> = s.ready.iter().map(|(k, v)| (*k >> 20, v.len())).collect();
        f.debug_struct("MemoryPool")
            .field("ready_mib", &ready)
            .finish()
    }
}

impl MemoryPool {
    /// An empty pool.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts preparing one region of `bytes` on a thread of its own.
    pub fn prepare(&self, bytes: u64) {
        self.spawn_prepare(bytes, false);
    }

    /// As [`Self::prepare`], on a thread at the lowest CPU priority (nice
    /// 19): a refill while a migration runs must not slow it down.
    pub fn refill(&self, bytes: u64) {
        self.spawn_prepare(bytes, true);
    }

    fn spawn_prepare(&self, bytes: u64, low_priority: bool) {
        let (lock, _) = &*self.shelves;
        *lock
            .lock()
            .expect("pool lock")
            .preparing
            .entry(bytes)
            .or_default() += 1;
        let pool = self.clone();
        std::thread::spawn(move || {
            if low_priority {
                // SAFETY: plain syscalls on this thread (who = 0 with
                // PRIO_PROCESS names the calling thread on Linux).
                unsafe {
                    libc::setpriority(libc::PRIO_PROCESS, 0, 19);
                }
            }
            let region = populated(bytes);
            let (lock, ready) = &*pool.shelves;
            let mut s = lock.lock().expect("pool lock");
            if let Some(n) = s.preparing.get_mut(&bytes) {
                *n -= 1;
            }
            match region {
                Ok(r) => s.ready.entry(bytes).or_default().push(r),
                Err(e) => tracing::warn!(mib = bytes >> 20, "preparing pool memory: {e}"),
            }
            ready.notify_all();
        });
    }

    /// A ready region of exactly `bytes`, if there is one. No replacement
    /// is started here: preparing one now would compete with the migration
    /// that takes this one for CPU (call [`Self::prepare`] once it is over).
    pub fn take(&self, bytes: u64) -> Option<Region> {
        let (lock, _) = &*self.shelves;
        lock.lock()
            .expect("pool lock")
            .ready
            .get_mut(&bytes)
            .and_then(Vec::pop)
    }

    /// Waits up to `limit` until a region of `bytes` is ready; whether one is.
    pub fn wait_ready(&self, bytes: u64, limit: Duration) -> bool {
        let (lock, cond) = &*self.shelves;
        let deadline = Instant::now() + limit;
        let mut s = lock.lock().expect("pool lock");
        loop {
            if s.ready.get(&bytes).is_some_and(|v| !v.is_empty()) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || s.preparing.get(&bytes).copied().unwrap_or(0) == 0 {
                return false;
            }
            s = cond.wait_timeout(s, left).expect("pool lock").0;
        }
    }
}

/// Faults in `len` bytes from `base` (`MADV_POPULATE_WRITE`), in 64 MiB
/// steps from the top down. One call over gigabytes would hold the
/// process's mmap lock for seconds, and KVM needs that lock to set up other
/// VMs meanwhile; top-down, a destination's populate meets the lanes (which
/// write upwards) in the middle instead of contending with them.
///
/// # Safety
/// `base..base + len` must be a live, writable mapping; populating
/// faults pages in and changes no contents.
pub unsafe fn populate(base: *mut u8, len: usize) -> Result<(), String> {
    const STEP: usize = 64 << 20;
    let mut end = len;
    while end > 0 {
        let start = end.saturating_sub(STEP);
        // SAFETY: inside the mapping the caller vouches for.
        let rc = unsafe {
            libc::madvise(
                base.add(start).cast(),
                end - start,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if rc != 0 {
            return Err(format!(
                "MADV_POPULATE_WRITE: {}",
                std::io::Error::last_os_error()
            ));
        }
        end = start;
    }
    Ok(())
}

fn populated(bytes: u64) -> Result<Region, String> {
    let len = usize::try_from(bytes).map_err(|_| "too large".to_owned())?;
    // In a memfd, so a VMM process can be handed the same pages.
    let region = super::shared_memory(bytes).map_err(|e| e.to_string())?;
    let started = Instant::now();
    // SAFETY: exactly the fresh mapping `region` owns.
    unsafe { populate(region.as_ptr(), len) }?;
    tracing::debug!(
        mib = bytes >> 20,
        ms = started.elapsed().as_secs_f64() * 1e3,
        "pool region populated"
    );
    Ok(region)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepared_regions_are_taken_and_replaced() {
        let pool = MemoryPool::new();
        assert!(pool.take(4 << 20).is_none());
        pool.prepare(4 << 20);
        assert!(pool.wait_ready(4 << 20, Duration::from_secs(10)));
        let r = pool.take(4 << 20).expect("ready");
        assert_eq!(r.size(), 4 << 20);
        // SAFETY: reading the first byte of the live mapping.
        assert_eq!(unsafe { *r.as_ptr() }, 0);
        assert!(!pool.wait_ready(8 << 20, Duration::from_millis(1)));
        pool.refill(4 << 20);
        assert!(
            pool.wait_ready(4 << 20, Duration::from_secs(10)),
            "refilled"
        );
    }
}
