//! One behaviour suite every [`GuestBackend`] passes (the KVM backend in
//! `ferry-host/tests`, the synthetic guest in this crate's tests).
//!
//! A [`Harness`] tells the suite how to make guests of the backend and how
//! to let one run; the checks are the same for all.

use std::ops::Range;

use super::{GuestBackend, GuestError, PAGE_BYTES};

/// How the suite drives one kind of backend.
pub trait Harness {
    /// The backend under test.
    type Guest: GuestBackend;
    /// A guest running its dirtying workload, past its initial fill.
    fn running_guest(&mut self) -> Self::Guest;
    /// A paused guest of the same shape with nothing loaded, to restore into.
    fn blank_like(&mut self, guest: &Self::Guest) -> Self::Guest;
    /// Lets `guest` run until its workload has done `passes` more passes.
    fn advance(&mut self, guest: &mut Self::Guest, passes: u64);
    /// Pages the workload dirties on every pass.
    fn working_set(&self) -> Range<u64>;
    /// A page the workload never writes.
    fn quiet_page(&self) -> u64;
}

/// Runs every check.
pub fn run_all<H: Harness>(h: &mut H) {
    memory_is_bounded_and_writable(h);
    dirty_set_holds_workload_and_vmm_writes(h);
    pause_freezes_the_guest(h);
    state_moves_to_another_guest(h);
}

fn page(fill: u8) -> Vec<u8> {
    vec![fill; usize::try_from(PAGE_BYTES).expect("page fits")]
}

/// Reads stay inside guest memory; a VMM write reads back.
pub fn memory_is_bounded_and_writable<H: Harness>(h: &mut H) {
    let mut g = h.running_guest();
    let mut buf = page(0);
    assert_eq!(g.pages() * PAGE_BYTES, g.memory_bytes());
    assert_eq!(
        g.read_page(g.pages(), &mut buf),
        Err(GuestError::OutOfRange(g.pages()))
    );
    let quiet = h.quiet_page();
    g.write_page(quiet, &page(0x5A)).expect("write");
    g.read_page(quiet, &mut buf).expect("read");
    assert!(buf.iter().all(|b| *b == 0x5A));
    assert!(g.write_page(g.pages() + 3, &page(1)).is_err());
}

/// The dirty set holds every page the workload wrote and every VMM write,
/// and nothing else.
pub fn dirty_set_holds_workload_and_vmm_writes<H: Harness>(h: &mut H) {
    let mut g = h.running_guest();
    assert_eq!(g.take_dirty(), Err(GuestError::NotLogging));
    g.start_dirty_log().expect("start");
    let _ = g.take_dirty().expect("clear");
    h.advance(&mut g, 2);
    let quiet = h.quiet_page();
    g.write_page(quiet, &page(7)).expect("vmm write");
    let dirty = g.take_dirty().expect("dirty");
    for p in h.working_set() {
        assert!(
            dirty.is_set(p),
            "working-set page {p} missing from the dirty set"
        );
    }
    assert!(
        dirty.is_set(quiet),
        "the VMM's own write is in the dirty set"
    );
    let far = g.pages() - 1;
    if !h.working_set().contains(&far) {
        assert!(!dirty.is_set(far), "a page nobody wrote is clean");
    }
    g.stop_dirty_log().expect("stop");
}

/// A paused guest dirties nothing and makes no progress; resumed, it does.
pub fn pause_freezes_the_guest<H: Harness>(h: &mut H) {
    let mut g = h.running_guest();
    g.start_dirty_log().expect("start");
    g.pause().expect("pause");
    assert!(!g.is_running());
    let _ = g.take_dirty().expect("clear");
    let before = g.progress().expect("progress").pass;
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert!(
        g.take_dirty().expect("dirty").is_empty(),
        "paused guests dirty nothing"
    );
    assert_eq!(g.progress().expect("progress").pass, before);
    g.resume().expect("resume");
    assert!(g.is_running());
    h.advance(&mut g, 1);
    assert!(g.progress().expect("progress").pass > before);
    assert!(!g.take_dirty().expect("dirty").is_empty());
}

/// Memory plus saved state, moved into a blank guest, continue the
/// workload where it stopped.
pub fn state_moves_to_another_guest<H: Harness>(h: &mut H) {
    let mut g = h.running_guest();
    assert_eq!(g.save_state(), Err(GuestError::NotPaused));
    h.advance(&mut g, 1);
    g.pause().expect("pause");
    let state = g.save_state().expect("save");
    let pass = g.progress().expect("progress").pass;
    let mut copy = h.blank_like(&g);
    assert!(!copy.is_running());
    let mut buf = page(0);
    let mut buf2 = page(0);
    for p in 0..g.pages() {
        g.read_page(p, &mut buf).expect("read");
        copy.write_page(p, &buf).expect("write");
    }
    assert!(
        copy.restore_state(&[0xFF; 3]).is_err(),
        "garbage state is refused"
    );
    copy.restore_state(&state).expect("restore");
    for p in 0..g.pages() {
        g.read_page(p, &mut buf).expect("read");
        copy.read_page(p, &mut buf2).expect("read");
        assert!(buf == buf2, "page {p} differs after the copy");
    }
    assert_eq!(copy.progress().expect("progress").pass, pass);
    copy.resume().expect("resume");
    h.advance(&mut copy, 2);
    let after = copy.progress().expect("progress");
    assert!(after.pass >= pass + 2, "the copy continues counting");
    assert_eq!(after.exception, None);
    assert!(!g.is_running(), "the original stays paused");
}
