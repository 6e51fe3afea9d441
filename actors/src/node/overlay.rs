//! The `snapshot` move's overlay. While the base disk is copied, guest
//! writes go to `<disk>.delta` and `<disk>.delta.map` says durably which
//! blocks live there: a block's bit is set (and synced) only after its
//! data in the delta is, and before the write is acknowledged. So a host
//! that crashes mid-move finds every acknowledged write again when it
//! reopens the disk ([`recover`] merges the delta back into the base); a
//! delta without a map holds nothing acknowledged and is deleted.

use crate::disk::{BlockBackend, DiskError, SECTOR_BYTES, SharedDisk, shared, to_usize};
use crate::storage::datastore::Datastores;
use crate::storage::plan::BLOCK_BYTES;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use super::disk::DiskPlace;

/// The overlay's data file for the disk at `base`.
pub fn delta_path(base: &str) -> String {
    format!("{base}.delta")
}

/// The overlay's block map for the disk at `base`.
pub fn map_path(base: &str) -> String {
    format!("{base}.delta.map")
}

/// Whether `path` is a disk image or an overlay file (not a VM's home
/// file to copy along).
pub fn is_disk_file(path: &str) -> bool {
    path.ends_with(".raw") || path.ends_with(".delta") || path.ends_with(".delta.map")
}

/// An open overlay: its data, its durable block map and where it is.
#[derive(Clone)]
pub struct Overlay {
    data: SharedDisk,
    map: SharedDisk,
    bits: Arc<Mutex<Vec<u8>>>,
    base: DiskPlace,
}

impl Overlay {
    /// Creates an empty overlay for the `len`-byte disk at `base`
    /// (replacing what a move that died left there).
    pub fn create(stores: &dyn Datastores, base: &DiskPlace, len: u64) -> Result<Self, DiskError> {
        let ds = &base.datastore;
        let (delta, map) = (delta_path(&base.path), map_path(&base.path));
        // The map goes first: a delta without one is never merged.
        stores.remove(ds, &map)?;
        stores.remove(ds, &delta)?;
        let data = stores.create_disk(ds, &delta, len)?;
        // One bit per block, in whole sectors.
        let map_bytes = len.div_ceil(BLOCK_BYTES).div_ceil(8 * SECTOR_BYTES) * SECTOR_BYTES;
        let mut map = stores.create_disk(ds, &map, map_bytes)?;
        map.flush()?;
        Ok(Self {
            data: shared(data),
            map: shared(map),
            bits: Arc::new(Mutex::new(vec![0; to_usize(map_bytes)])),
            base: base.clone(),
        })
    }

    /// The overlay's data (read where the plan says a block lives here).
    pub fn data(&self) -> &SharedDisk {
        &self.data
    }

    /// Writes `data` at `offset`. The `fresh` blocks (not in the overlay
    /// yet) are first copied up from `base`, so a partial write keeps
    /// the rest of its block. Durable, map included, when it returns.
    pub fn write(
        &self,
        base: &SharedDisk,
        fresh: &[u64],
        offset: u64,
        data: &[u8],
    ) -> Result<(), DiskError> {
        let mut o = self.data.lock().expect("overlay");
        let len = o.len_bytes();
        let mut block = vec![0u8; to_usize(BLOCK_BYTES)];
        for &b in fresh {
            let r = b * BLOCK_BYTES..((b + 1) * BLOCK_BYTES).min(len);
            let buf = &mut block[..to_usize(r.end - r.start)];
            base.lock().expect("disk").read_at(r.start, buf)?;
            o.write_at(r.start, buf)?;
        }
        o.write_at(offset, data)?;
        o.flush()?;
        drop(o);
        self.mark(fresh)
    }

    /// Sets the bits of `blocks` in the map, durably.
    fn mark(&self, blocks: &[u64]) -> Result<(), DiskError> {
        let (Some(first), Some(last)) = (blocks.iter().min(), blocks.iter().max()) else {
            return Ok(());
        };
        let mut bits = self.bits.lock().expect("overlay map");
        for &b in blocks {
            bits[to_usize(b / 8)] |= 1 << (b % 8);
        }
        // The whole sectors that hold the bits.
        let sector = |b: u64| b / 8 / SECTOR_BYTES * SECTOR_BYTES;
        let (start, end) = (sector(*first), sector(*last) + SECTOR_BYTES);
        self.map
            .lock()
            .expect("overlay map")
            .write_durable(start, &bits[to_usize(start)..to_usize(end)])
    }

    /// Copies `ranges` of the overlay into `base` and syncs it (a move
    /// that failed: the base is the disk again).
    pub fn merge_into(&self, base: &SharedDisk, ranges: &[Range<u64>]) -> Result<(), DiskError> {
        let o = self.data.lock().expect("overlay");
        let mut d = base.lock().expect("disk");
        copy_ranges(o.as_ref(), d.as_mut(), ranges)?;
        d.flush()
    }

    /// Closes and deletes the overlay, map first.
    pub fn remove(self, stores: &dyn Datastores) -> Result<(), DiskError> {
        let Self {
            data, map, base, ..
        } = self;
        drop((data, map));
        stores.remove(&base.datastore, &map_path(&base.path))?;
        stores.remove(&base.datastore, &delta_path(&base.path))
    }
}

fn copy_ranges(
    from: &dyn BlockBackend,
    to: &mut dyn BlockBackend,
    ranges: &[Range<u64>],
) -> Result<(), DiskError> {
    let mut buf = vec![0u8; to_usize(BLOCK_BYTES)];
    for r in ranges {
        let mut at = r.start;
        while at < r.end {
            let n = (r.end - at).min(BLOCK_BYTES);
            from.read_at(at, &mut buf[..to_usize(n)])?;
            to.write_at(at, &buf[..to_usize(n)])?;
            at += n;
        }
    }
    Ok(())
}

/// Run when the disk at `path` on `ds` (open as `base`) is opened: merges
/// the overlay a move left behind (its host crashed mid-move) into the
/// base and deletes it. Returns the blocks merged.
pub fn recover(
    stores: &dyn Datastores,
    ds: &str,
    path: &str,
    base: &mut dyn BlockBackend,
) -> Result<u64, DiskError> {
    let (delta, map) = (delta_path(path), map_path(path));
    let mut merged = 0;
    if stores.exists(ds, &map)? && stores.exists(ds, &delta)? {
        let bits = {
            let m = stores.open_disk(ds, &map)?;
            let mut bits = vec![0u8; to_usize(m.len_bytes())];
            m.read_at(0, &mut bits)?;
            bits
        };
        let len = base.len_bytes();
        let ranges: Vec<Range<u64>> = (0..bits.len() as u64 * 8)
            .filter(|b| bits[to_usize(b / 8)] & (1 << (b % 8)) != 0)
            .map(|b| b * BLOCK_BYTES..((b + 1) * BLOCK_BYTES).min(len))
            .filter(|r| r.start < r.end)
            .collect();
        merged = ranges.len() as u64;
        let data = stores.open_disk(ds, &delta)?;
        copy_ranges(data.as_ref(), base, &ranges)?;
        base.flush()?;
        tracing::warn!(disk = %format!("{ds}:{path}"), blocks = merged, "a move's overlay was left behind (its host stopped mid-move): merged back");
    }
    stores.remove(ds, &map)?;
    stores.remove(ds, &delta)?;
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::datastore::{MemDatastores, MemStorage};

    const LEN: u64 = 8 * BLOCK_BYTES;

    fn setup() -> (MemStorage, MemDatastores, DiskPlace, SharedDisk) {
        let storage = MemStorage::new();
        let stores = MemDatastores::standard(storage.clone(), "h0");
        let mut base = stores
            .create_disk("local", "vm/disk0.raw", LEN)
            .expect("in a test");
        base.write_durable(0, &vec![7u8; to_usize(LEN)])
            .expect("in a test");
        let place = DiskPlace {
            datastore: "local".into(),
            path: "vm/disk0.raw".into(),
        };
        (storage, stores, place, shared(base))
    }

    #[test]
    fn a_crash_mid_move_keeps_every_acknowledged_overlay_write() {
        let (storage, stores, place, base) = setup();
        let overlay = Overlay::create(&stores, &place, LEN).expect("in a test");
        let at = 3 * BLOCK_BYTES + 512;
        overlay
            .write(&base, &[3], at, &[9u8; 512])
            .expect("in a test");
        // The host loses power: its locks go, unflushed data too.
        stores.power_off();
        storage.crash_location("h0");
        drop((overlay, base));

        let again = MemDatastores::standard(storage, "h0");
        let mut base = again.open_disk("local", "vm/disk0.raw").expect("in a test");
        let merged = recover(&again, "local", "vm/disk0.raw", base.as_mut()).expect("in a test");
        assert_eq!(merged, 1);
        let mut block = vec![0u8; to_usize(BLOCK_BYTES)];
        base.read_at(3 * BLOCK_BYTES, &mut block)
            .expect("in a test");
        assert!(
            block[..512].iter().all(|b| *b == 7),
            "copied up from the base"
        );
        assert!(block[512..1024].iter().all(|b| *b == 9), "the write");
        assert!(
            block[1024..].iter().all(|b| *b == 7),
            "the rest of the block"
        );
        for p in [delta_path(&place.path), map_path(&place.path)] {
            assert!(
                !again.exists("local", &p).expect("in a test"),
                "{p} removed"
            );
        }
    }

    #[test]
    fn a_delta_without_a_map_holds_nothing_acknowledged_and_is_removed() {
        let (_storage, stores, place, base) = setup();
        let mut delta = stores
            .create_disk("local", &delta_path(&place.path), LEN)
            .expect("in a test");
        delta.write_durable(0, &[1u8; 512]).expect("in a test");
        drop(delta);
        let mut b = base.lock().expect("in a test");
        assert_eq!(
            recover(&stores, "local", &place.path, b.as_mut()).expect("in a test"),
            0
        );
        let mut first = [0u8; 512];
        b.read_at(0, &mut first).expect("in a test");
        assert!(first.iter().all(|x| *x == 7), "the base is untouched");
        assert!(
            !stores
                .exists("local", &delta_path(&place.path))
                .expect("in a test")
        );
    }

    #[test]
    fn an_abort_merges_the_overlay_back_and_removes_it() {
        let (_storage, stores, place, base) = setup();
        let overlay = Overlay::create(&stores, &place, LEN).expect("in a test");
        overlay
            .write(&base, &[0, 1], 0, &vec![5u8; to_usize(BLOCK_BYTES) + 512])
            .expect("in a test");
        overlay
            .merge_into(&base, std::slice::from_ref(&(0..2 * BLOCK_BYTES)))
            .expect("in a test");
        overlay.remove(&stores).expect("in a test");
        let mut buf = vec![0u8; to_usize(BLOCK_BYTES) + 1024];
        base.lock()
            .expect("in a test")
            .read_at(0, &mut buf)
            .expect("in a test");
        assert!(buf[..to_usize(BLOCK_BYTES) + 512].iter().all(|b| *b == 5));
        assert!(buf[to_usize(BLOCK_BYTES) + 512..].iter().all(|b| *b == 7));
        assert!(
            !stores
                .exists("local", &map_path(&place.path))
                .expect("in a test")
        );
    }
}
