//! A shared view of guest memory for the bulk copy tasks.
//!
//! Migrations copy pages on several streams at once, each on its own task,
//! while the vCPUs keep running on the source. The [`GuestBackend`] is
//! owned by the VM actor, so the copy tasks cannot borrow it; they hold a
//! [`GuestRam`] instead: the address and length of the memory mapping plus
//! a reference that keeps the mapping alive.
//!
//! Reading a page while a vCPU writes it is what every VMM does: the copy
//! may be torn, and the dirty log records the write, so the page is sent
//! again. Writes (the destination side) go through [`PageLane`]s, which
//! split the pages by frame number so no two lanes touch the same page.
//!
//! [`GuestBackend`]: crate::guest::GuestBackend

use std::any::Any;
use std::sync::Arc;

use ferry_transport::batch::BatchSink;

use crate::guest::{GuestError, PAGE_BYTES};

#[allow(clippy::cast_possible_truncation)] // 4096 fits every usize
const PAGE_LEN: usize = PAGE_BYTES as usize;

/// Guest memory as one contiguous mapping.
#[derive(Clone)]
pub struct GuestRam {
    base: *mut u8,
    bytes: u64,
    _owner: Arc<dyn Any + Send + Sync>,
}

// SAFETY: the mapping is process memory kept alive by `_owner`; every
// access goes through raw-pointer copies whose concurrency rules are
// documented on the methods (racy reads are re-sent via the dirty log,
// writes are split into disjoint lanes).
unsafe impl Send for GuestRam {}
// SAFETY: as for `Send`.
unsafe impl Sync for GuestRam {}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam")
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl GuestRam {
    /// A view of `bytes` bytes at `base`, kept alive by `owner`.
    ///
    /// # Safety
    /// `base..base + bytes` must be a readable and writable mapping that
    /// stays mapped for as long as `owner` lives, and `bytes` must be a
    /// multiple of the page size.
    pub unsafe fn from_raw(base: *mut u8, bytes: u64, owner: Arc<dyn Any + Send + Sync>) -> Self {
        assert!(bytes.is_multiple_of(PAGE_BYTES), "memory is whole pages");
        Self {
            base,
            bytes,
            _owner: owner,
        }
    }

    /// Fresh zeroed memory owned by the view itself (synthetic guests).
    pub fn allocate(bytes: u64) -> Self {
        let block = Arc::new(OwnedBlock::zeroed(bytes));
        let base = block.ptr;
        // SAFETY: the block owns exactly `bytes` bytes at `base` and the view
        // keeps the block alive.
        unsafe { Self::from_raw(base, bytes, block) }
    }

    /// Bytes of memory.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Pages of memory.
    pub fn pages(&self) -> u64 {
        self.bytes / PAGE_BYTES
    }

    fn page_ptr(&self, gfn: u64) -> Result<*mut u8, GuestError> {
        if gfn >= self.pages() {
            return Err(GuestError::OutOfRange(gfn));
        }
        let offset = usize::try_from(gfn * PAGE_BYTES).map_err(|_| GuestError::OutOfRange(gfn))?;
        // SAFETY: `offset` is inside the mapping (checked above).
        Ok(unsafe { self.base.add(offset) })
    }

    /// Copies page `gfn` into `dst`. A vCPU writing the page meanwhile may
    /// leave the copy torn; the dirty log then has the page for the next round.
    pub fn read_page(&self, gfn: u64, dst: &mut [u8]) -> Result<(), GuestError> {
        assert_eq!(dst.len(), PAGE_LEN, "page buffer of {} bytes", dst.len());
        let src = self.page_ptr(gfn)?;
        // SAFETY: `src` points at a whole page inside the live mapping, and
        // `dst` is a distinct buffer of one page.
        unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), PAGE_LEN) };
        Ok(())
    }

    /// Reads eight bytes at byte address `addr` (status words).
    pub fn read_u64(&self, addr: u64) -> Result<u64, GuestError> {
        let page = self.page_ptr(addr / PAGE_BYTES)?;
        let within = usize::try_from(addr % PAGE_BYTES).expect("below a page");
        if within + 8 > PAGE_LEN {
            return Err(GuestError::OutOfRange(addr / PAGE_BYTES + 1));
        }
        let mut bytes = [0u8; 8];
        // SAFETY: the eight bytes lie inside one page of the live mapping.
        unsafe { std::ptr::copy_nonoverlapping(page.add(within), bytes.as_mut_ptr(), 8) };
        Ok(u64::from_le_bytes(bytes))
    }

    /// Writes `value` at byte address `addr` as a guest vCPU would (the
    /// synthetic guest's stores).
    pub fn write_u64(&self, addr: u64, value: u64) -> Result<(), GuestError> {
        let page = self.page_ptr(addr / PAGE_BYTES)?;
        let within = usize::try_from(addr % PAGE_BYTES).expect("below a page");
        if within + 8 > PAGE_LEN {
            return Err(GuestError::OutOfRange(addr / PAGE_BYTES + 1));
        }
        // SAFETY: the eight bytes lie inside one page of the live mapping.
        unsafe { std::ptr::copy_nonoverlapping(value.to_le_bytes().as_ptr(), page.add(within), 8) };
        Ok(())
    }

    /// Writes page `gfn` from `src`.
    pub fn write_page(&self, gfn: u64, src: &[u8]) -> Result<(), GuestError> {
        assert_eq!(src.len(), PAGE_LEN, "page of {} bytes", src.len());
        let dst = self.page_ptr(gfn)?;
        // SAFETY: `dst` is a whole page inside the live mapping; `src` is a
        // distinct buffer of one page.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, PAGE_LEN) };
        Ok(())
    }

    /// Fills bytes `from..to` with the output of a xorshift generator
    /// seeded with `seed` (the synthetic guest's boot fill).
    pub fn fill_random(&self, from: u64, to: u64, seed: u64) {
        assert!(from <= to && to <= self.bytes && from.is_multiple_of(8));
        let mut state = seed | 1;
        let mut addr = from;
        while addr + 8 <= to {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            self.write_u64(addr, state).expect("inside memory");
            addr += 8;
        }
    }

    /// The memory's page-fold hash ([`fold_page_hash`] over every page).
    /// Take it only while nothing writes the memory (paused vCPUs, no lanes
    /// writing), or it describes no instant of the guest.
    pub fn hash(&self) -> u64 {
        let len = usize::try_from(self.bytes).expect("mapped, so it fits");
        // SAFETY: the mapping is live for `self`'s lifetime; the caller keeps
        // writers away while it is read.
        let all = unsafe { std::slice::from_raw_parts(self.base.cast_const(), len) };
        // The parts sum in any order: every core takes a slice. A source
        // with `--verify` hashes while paused, so this is downtime.
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let pages = len / PAGE_LEN;
        let parts = if pages < PARALLEL_HASH_PAGES_MIN {
            1
        } else {
            cores
        };
        let per_part = pages.div_ceil(parts).max(1) * PAGE_LEN;
        std::thread::scope(|scope| {
            let hashers: Vec<_> = all
                .chunks(per_part)
                .zip((0u64..).step_by(per_part / PAGE_LEN))
                .map(|(slice, first_gfn)| scope.spawn(move || hash_pages(slice, first_gfn)))
                .collect();
            hashers
                .into_iter()
                .map(|h| h.join().expect("a hashing thread panicked"))
                .fold(0u64, u64::wrapping_add)
        })
    }

    /// The writer for pages whose frame number is `lane` modulo `lanes`;
    /// with `hashes`, it records the hash of every page it writes.
    ///
    /// # Safety
    /// No two live lanes of the same memory may share a `lane` index for the
    /// same `lanes`, and nothing else may write the memory while lanes
    /// live (the destination's shadow VM stays paused while pages arrive).
    pub unsafe fn lane(&self, lane: u32, lanes: u32, hashes: Option<Arc<PageHashes>>) -> PageLane {
        assert!(lane < lanes, "lane {lane} of {lanes}");
        if let Some(h) = &hashes {
            assert_eq!(h.pages(), self.pages(), "a hash per page");
        }
        PageLane {
            ram: self.clone(),
            lane,
            lanes,
            pages: 0,
            hashes,
            unhashed: None,
        }
    }
}

/// Below this many pages one thread hashes the memory (threads cost more
/// than they save).
const PARALLEL_HASH_PAGES_MIN: usize = 4096;

/// The page-fold hash of whole pages `pages`, the first being `first_gfn`.
fn hash_pages(pages: &[u8], first_gfn: u64) -> u64 {
    pages
        .chunks_exact(PAGE_LEN)
        .zip(first_gfn..)
        .fold(0u64, |acc, (page, gfn)| {
            acc.wrapping_add(fold_page_hash(gfn, xxhash_rust::xxh3::xxh3_64(page)))
        })
}

/// One page's part of the memory hash: its content hash mixed with its
/// frame number, so that summing the parts (in any order) gives a hash of
/// the whole memory that moves pages cannot fool.
pub fn fold_page_hash(gfn: u64, page_hash: u64) -> u64 {
    let mut both = [0u8; 16];
    both[..8].copy_from_slice(&gfn.to_le_bytes());
    both[8..].copy_from_slice(&page_hash.to_le_bytes());
    xxhash_rust::xxh3::xxh3_64(&both)
}

/// The content hash of every page a destination has written, kept as pages
/// arrive so that verifying memory at the switchover costs a sum, not a
/// pass over gigabytes inside the downtime.
#[derive(Debug)]
pub struct PageHashes {
    /// xxh3 per page; 0 stands for a page never written (still zero).
    table: Vec<std::sync::atomic::AtomicU64>,
}

impl PageHashes {
    /// Hashes for `pages` pages, all zero so far.
    pub fn new(pages: u64) -> Self {
        let n = usize::try_from(pages).expect("page count fits memory");
        Self {
            table: (0..n)
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
        }
    }

    /// Pages covered.
    pub fn pages(&self) -> u64 {
        self.table.len() as u64
    }

    fn record(&self, gfn: u64, hash: u64) {
        let i = usize::try_from(gfn).expect("checked by the lane");
        // A real hash of 0 would read as "never written"; the zero page's
        // hash then stands in, which only changes which value is summed.
        self.table[i].store(hash, std::sync::atomic::Ordering::Relaxed);
    }

    /// The memory hash, equal to [`GuestRam::hash`] of the same contents.
    pub fn fold(&self) -> u64 {
        let zero = xxhash_rust::xxh3::xxh3_64(&[0u8; PAGE_LEN]);
        self.table.iter().zip(0u64..).fold(0u64, |acc, (h, gfn)| {
            let h = match h.load(std::sync::atomic::Ordering::Relaxed) {
                0 => zero,
                h => h,
            };
            acc.wrapping_add(fold_page_hash(gfn, h))
        })
    }
}

/// One of several disjoint page writers into guest memory: it takes only
/// pages whose frame number is `lane` modulo `lanes`.
#[derive(Debug)]
pub struct PageLane {
    ram: GuestRam,
    lane: u32,
    lanes: u32,
    /// Pages written (data or zero).
    pub pages: u64,
    hashes: Option<Arc<PageHashes>>,
    /// The page handed out by the last `slot`, filled since but not hashed.
    unhashed: Option<u64>,
}

impl PageLane {
    /// Hashes the page the last `slot` handed out (its bytes are in place
    /// once the caller comes back). Call at the end of every round.
    pub fn flush(&mut self) {
        if let (Some(gfn), Some(hashes)) = (self.unhashed.take(), &self.hashes) {
            let ptr = self.ram.page_ptr(gfn).expect("checked when handed out");
            // SAFETY: the page is inside the live mapping and belongs to this
            // lane alone; nothing writes it while this lane is here.
            let page = unsafe { std::slice::from_raw_parts(ptr.cast_const(), PAGE_LEN) };
            hashes.record(gfn, xxhash_rust::xxh3::xxh3_64(page));
        }
    }

    fn page(&mut self, gfn: u64, len: usize) -> Result<*mut u8, String> {
        self.flush();
        if len != PAGE_LEN {
            return Err(format!("entry of {len} bytes, pages are {PAGE_LEN}"));
        }
        if gfn % u64::from(self.lanes) != u64::from(self.lane) {
            return Err(format!(
                "page {gfn} does not belong to stream {} of {}",
                self.lane, self.lanes
            ));
        }
        let ptr = self.ram.page_ptr(gfn).map_err(|e| e.to_string())?;
        self.pages += 1;
        Ok(ptr)
    }
}

impl BatchSink for PageLane {
    fn slot(&mut self, addr: u64, len: usize) -> Result<&mut [u8], String> {
        let ptr = self.page(addr, len)?;
        self.unhashed = Some(addr);
        // SAFETY: the page is inside the live mapping and belongs to this
        // lane alone (the contract of `GuestRam::lane`); the slice lives
        // only until the next call on `self`.
        Ok(unsafe { std::slice::from_raw_parts_mut(ptr, PAGE_LEN) })
    }

    fn zero(&mut self, addr: u64, len: usize) -> Result<(), String> {
        let ptr = self.page(addr, len)?;
        // SAFETY: as in `slot`.
        unsafe { std::ptr::write_bytes(ptr, 0, PAGE_LEN) };
        if let Some(h) = &self.hashes {
            h.record(addr, 0);
        }
        Ok(())
    }
}

/// Zeroed heap memory owned by a [`GuestRam`].
struct OwnedBlock {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

// SAFETY: the block is plain heap memory; access rules are `GuestRam`'s.
unsafe impl Send for OwnedBlock {}
// SAFETY: as for `Send`.
unsafe impl Sync for OwnedBlock {}

impl OwnedBlock {
    fn zeroed(bytes: u64) -> Self {
        let len = usize::try_from(bytes).expect("memory fits the address space");
        // Word alignment, not page alignment: the allocator then hands a big
        // zeroed block out as fresh mmap'd pages, zeroed lazily by the
        // kernel, instead of aligning it and writing every byte (first
        // touch of gigabytes is slow on these machines).
        let layout =
            std::alloc::Layout::from_size_align(len.max(PAGE_LEN), 8).expect("word-aligned layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Self { ptr, layout }
    }
}

impl Drop for OwnedBlock {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_round_trip_and_lanes_refuse_foreign_pages() {
        let ram = GuestRam::allocate(8 * PAGE_BYTES);
        ram.write_page(3, &[7u8; PAGE_LEN]).expect("write");
        let mut page = vec![0u8; PAGE_LEN];
        ram.read_page(3, &mut page).expect("read");
        assert!(page.iter().all(|b| *b == 7));
        assert!(ram.read_page(8, &mut page).is_err());

        // SAFETY: the only lane of this memory.
        let mut lane = unsafe { ram.lane(1, 2, None) };
        assert!(lane.slot(2, PAGE_LEN).is_err(), "page 2 is lane 0's");
        lane.zero(3, PAGE_LEN).expect("page 3 is lane 1's");
        assert_eq!(ram.read_u64(3 * PAGE_BYTES).expect("read"), 0);
        assert!(lane.slot(1, 100).is_err(), "partial pages are refused");
        assert_eq!(lane.pages, 1);
    }

    #[test]
    fn hashes_kept_by_lanes_equal_a_full_pass() {
        let src = GuestRam::allocate(16 * PAGE_BYTES);
        src.fill_random(2 * PAGE_BYTES, 16 * PAGE_BYTES, 5);
        let dst = GuestRam::allocate(16 * PAGE_BYTES);
        let hashes = Arc::new(PageHashes::new(16));
        let mut page = vec![0u8; PAGE_LEN];
        for lane in 0..2 {
            // SAFETY: one lane per index, nothing else writes `dst`.
            let mut l = unsafe { dst.lane(lane, 2, Some(hashes.clone())) };
            // Write a page twice: the hash must follow the last copy.
            for gfn in (u64::from(lane)..16)
                .step_by(2)
                .chain([u64::from(lane) + 4])
            {
                src.read_page(gfn, &mut page).expect("read");
                if page.iter().all(|b| *b == 0) {
                    l.zero(gfn, PAGE_LEN).expect("zero");
                } else {
                    l.slot(gfn, PAGE_LEN).expect("slot").copy_from_slice(&page);
                }
            }
            l.flush();
        }
        assert_eq!(hashes.fold(), src.hash());
        assert_eq!(dst.hash(), src.hash());
        // Moving a page elsewhere changes the hash.
        dst.write_page(15, &vec![0u8; PAGE_LEN]).expect("write");
        assert_ne!(dst.hash(), src.hash());
    }

    #[test]
    fn the_hash_split_over_cores_equals_one_pass() {
        let pages = PARALLEL_HASH_PAGES_MIN as u64 + 7;
        let ram = GuestRam::allocate(pages * PAGE_BYTES);
        ram.fill_random(0, pages * PAGE_BYTES, 9);
        // SAFETY: nothing writes `ram` while it is read.
        let all = unsafe {
            std::slice::from_raw_parts(
                ram.base.cast_const(),
                usize::try_from(pages * PAGE_BYTES).expect("fits"),
            )
        };
        assert_eq!(ram.hash(), hash_pages(all, 0));
        let before = ram.hash();
        ram.write_u64(pages * PAGE_BYTES - 8, 1).expect("write");
        assert_ne!(ram.hash(), before, "the last page counts");
    }

    #[test]
    fn hash_sees_every_byte() {
        let ram = GuestRam::allocate(4 * PAGE_BYTES);
        let before = ram.hash();
        ram.write_u64(4 * PAGE_BYTES - 8, 1).expect("write");
        assert_ne!(ram.hash(), before);
    }
}
