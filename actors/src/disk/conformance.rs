//! The behaviour every [`BlockBackend`] shares, as one suite run against
//! each backend through a [`DiskHarness`].

use super::{BlockBackend, DiskError, SECTOR_BYTES};

/// How the suite gets disks from a backend.
pub trait DiskHarness {
    /// The backend under test.
    type Disk: BlockBackend;
    /// A new zeroed disk of `len_bytes`.
    fn fresh(&mut self, len_bytes: u64) -> Self::Disk;
    /// The same disk after a crash (or, where crashes cannot be staged, a
    /// close and reopen).
    fn reopen_after_crash(&mut self, disk: Self::Disk) -> Self::Disk;
    /// Whether [`Self::reopen_after_crash`] really loses unflushed writes.
    fn loses_unflushed_writes(&self) -> bool;
}

const LEN: u64 = 4 << 20;

/// Eight sectors of bytes counting up from `seed`.
fn pattern(seed: u8) -> Vec<u8> {
    (0..SECTOR_BYTES * 8)
        .map(|i| seed.wrapping_add(i.to_le_bytes()[0]))
        .collect()
}

/// Runs every check.
pub fn run_all<H: DiskHarness>(h: &mut H) {
    writes_read_back(h);
    ranges_are_checked(h);
    flushed_writes_survive_a_crash(h);
    allocated_covers_every_write(h);
}

fn writes_read_back<H: DiskHarness>(h: &mut H) {
    let mut d = h.fresh(LEN);
    assert_eq!(d.len_bytes(), LEN);
    let mut buf = vec![0xAAu8; 4096];
    d.read_at(8192, &mut buf).expect("read");
    assert!(buf.iter().all(|b| *b == 0), "a fresh disk reads zero");
    let p = pattern(3);
    d.write_at(8192, &p).expect("write");
    let mut back = vec![0u8; p.len()];
    d.read_at(8192, &mut back).expect("read");
    assert_eq!(back, p);
}

fn ranges_are_checked<H: DiskHarness>(h: &mut H) {
    let mut d = h.fresh(LEN);
    let mut buf = vec![0u8; 1024];
    assert!(matches!(
        d.read_at(LEN - 512, &mut buf),
        Err(DiskError::OutOfRange { .. })
    ));
    assert!(matches!(
        d.write_at(u64::MAX - 10, &buf),
        Err(DiskError::OutOfRange { .. })
    ));
}

fn flushed_writes_survive_a_crash<H: DiskHarness>(h: &mut H) {
    let mut d = h.fresh(LEN);
    let kept = pattern(7);
    d.write_at(0, &kept).expect("write");
    d.flush().expect("flush");
    let maybe_lost = pattern(9);
    d.write_at(1 << 20, &maybe_lost).expect("write");
    let d = h.reopen_after_crash(d);
    let mut back = vec![0u8; kept.len()];
    d.read_at(0, &mut back).expect("read");
    assert_eq!(back, kept, "a flushed write survives");
    if h.loses_unflushed_writes() {
        d.read_at(1 << 20, &mut back).expect("read");
        assert!(back.iter().all(|b| *b == 0), "an unflushed write is lost");
    }
}

fn allocated_covers_every_write<H: DiskHarness>(h: &mut H) {
    let mut d = h.fresh(LEN);
    for at in [0u64, 1 << 20, LEN - 4096] {
        d.write_at(at, &pattern(1)[..4096]).expect("write");
    }
    d.flush().expect("flush");
    let extents = d.allocated().expect("extents");
    for at in [0u64, 1 << 20, LEN - 4096] {
        assert!(
            extents.iter().any(|r| r.start <= at && at + 4096 <= r.end),
            "write at {at} outside {extents:?}"
        );
    }
    assert!(
        extents.windows(2).all(|w| w[0].end <= w[1].start),
        "ascending, disjoint: {extents:?}"
    );
    let covered: u64 = extents.iter().map(|r| r.end - r.start).sum();
    assert!(covered < LEN, "a sparse disk does not report every byte");
}
