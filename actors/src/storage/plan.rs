//! [`MovePlan`]: the decisions of one disk's move, without I/O.
//!
//! The disk actor asks [`MovePlan::next_step`] what to copy, reports each
//! copied chunk with [`MovePlan::copied`], and asks [`MovePlan::route_write`]
//! where each guest write goes. Once the plan says [`Step::Converged`], the
//! actor stops guest I/O, copies [`MovePlan::final_ranges`], and switches.
//!
//! Invariant (every method): when the plan has converged, the target
//! equals the source except for the ranges `final_ranges` returns — so
//! after copying them under the pause the two are identical.

use std::collections::VecDeque;
use std::ops::Range;
use std::time::{Duration, Instant};

use super::{Method, MoveOptions};

/// Granularity of the changed-block map and the overlay.
pub const BLOCK_BYTES: u64 = 64 << 10;

/// Where a guest write goes while a move runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// To the source only (ahead of the mirror's cursor; `cbt`).
    Source,
    /// To the source and the target, durable on both before the ack.
    Both,
    /// To the delta overlay (`snapshot`).
    Overlay,
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Copy this range from the source (the base, for `snapshot`).
    Copy(Range<u64>),
    /// The rate limit says wait until then.
    Wait(Instant),
    /// Ready to switch: pause guest I/O and copy [`MovePlan::final_ranges`].
    Converged,
}

/// A set of [`BLOCK_BYTES`] blocks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockSet {
    words: Vec<u64>,
    count: u64,
}

impl BlockSet {
    /// An empty set for a disk of `len` bytes.
    pub fn new(len: u64) -> Self {
        let blocks = len.div_ceil(BLOCK_BYTES);
        Self {
            words: vec![0; usize::try_from(blocks.div_ceil(64)).expect("fits memory")],
            count: 0,
        }
    }

    /// Adds every block `range` touches.
    pub fn insert_range(&mut self, range: &Range<u64>) {
        if range.is_empty() {
            return;
        }
        for b in range.start / BLOCK_BYTES..range.end.div_ceil(BLOCK_BYTES) {
            let (w, bit) = (usize::try_from(b / 64).expect("fits"), b % 64);
            if self.words[w] & (1 << bit) == 0 {
                self.words[w] |= 1 << bit;
                self.count += 1;
            }
        }
    }

    /// Whether block `block` is in the set.
    pub fn contains(&self, block: u64) -> bool {
        let w = usize::try_from(block / 64).expect("fits");
        self.words
            .get(w)
            .is_some_and(|word| word & (1 << (block % 64)) != 0)
    }

    /// Blocks in the set.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The set as ascending, merged byte ranges clipped to `len`.
    pub fn ranges(&self, len: u64) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        for (w, word) in self.words.iter().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let b = w as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let r = b * BLOCK_BYTES..((b + 1) * BLOCK_BYTES).min(len);
                match out.last_mut() {
                    Some(last) if last.end == r.start => last.end = r.end,
                    _ => out.push(r),
                }
            }
        }
        out
    }

    /// Empties the set and returns what it held as ranges.
    pub fn take_ranges(&mut self, len: u64) -> Vec<Range<u64>> {
        let r = self.ranges(len);
        self.words.iter_mut().for_each(|w| *w = 0);
        self.count = 0;
        r
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The ordered first pass over the allocated extents.
    FirstPass,
    /// `cbt` round `n` (from 1) of changed blocks.
    Round(u32),
    /// Ready to switch.
    Converged,
}

/// One disk's move.
#[derive(Debug, Clone)]
pub struct MovePlan {
    options: MoveOptions,
    len: u64,
    phase: Phase,
    /// The source's allocated extents at the start (the first pass).
    extents: Vec<Range<u64>>,
    todo: VecDeque<Range<u64>>,
    /// End of the first pass's last copied chunk.
    cursor: u64,
    changed: BlockSet,
    overlay: BlockSet,
    started: Instant,
    copied_bytes: u64,
    mirrored_writes: u64,
    resumes: u32,
    rounds: u32,
}

impl MovePlan {
    /// A move of a `len`-byte disk whose data lies in `allocated`
    /// (ascending; everything else is a hole and is not copied).
    pub fn new(now: Instant, options: MoveOptions, len: u64, allocated: Vec<Range<u64>>) -> Self {
        let extents: Vec<Range<u64>> = allocated
            .into_iter()
            .map(|r| r.start.min(len)..r.end.min(len))
            .filter(|r| !r.is_empty())
            .collect();
        Self {
            options,
            len,
            phase: Phase::FirstPass,
            todo: extents.iter().cloned().collect(),
            extents,
            cursor: 0,
            changed: BlockSet::new(len),
            overlay: BlockSet::new(len),
            started: now,
            copied_bytes: 0,
            mirrored_writes: 0,
            resumes: 0,
            rounds: 0,
        }
    }

    /// The method.
    pub fn method(&self) -> Method {
        self.options.method
    }

    /// What to do next.
    pub fn next_step(&mut self, now: Instant) -> Step {
        loop {
            if self.phase == Phase::Converged {
                return Step::Converged;
            }
            if self.options.rate_bytes_per_sec > 0 {
                let allowed = self.started
                    + Duration::from_secs_f64(
                        self.copied_bytes as f64 / self.options.rate_bytes_per_sec as f64,
                    );
                if allowed > now {
                    return Step::Wait(allowed);
                }
            }
            if let Some(front) = self.todo.pop_front() {
                let end = front.end.min(front.start + self.options.chunk_bytes);
                if end < front.end {
                    self.todo.push_front(end..front.end);
                }
                return Step::Copy(front.start..end);
            }
            self.end_pass();
        }
    }

    fn end_pass(&mut self) {
        let round = match self.phase {
            Phase::FirstPass => {
                self.cursor = self.len;
                if self.options.method != Method::Cbt {
                    self.phase = Phase::Converged;
                    return;
                }
                0
            }
            Phase::Round(n) => n,
            Phase::Converged => return,
        };
        let changed_bytes = self.changed.count() * BLOCK_BYTES;
        if changed_bytes <= self.options.converge_bytes || round >= self.options.rounds_max {
            self.phase = Phase::Converged;
        } else {
            self.todo = self.changed.take_ranges(self.len).into();
            self.phase = Phase::Round(round + 1);
            self.rounds = round + 1;
        }
    }

    /// A chunk from [`Step::Copy`] reached the target (`bytes` of it were
    /// not zero and were sent).
    pub fn copied(&mut self, range: &Range<u64>, bytes: u64) {
        if self.phase == Phase::FirstPass {
            assert!(range.start >= self.cursor, "first pass copies in order");
            self.cursor = range.end;
        }
        self.copied_bytes += bytes;
    }

    /// Where a guest write of `range` goes. Call it for every write while
    /// the move runs, in the order the writes are carried out.
    pub fn route_write(&mut self, range: &Range<u64>) -> Route {
        match self.options.method {
            Method::Mirror => {
                if self.phase == Phase::FirstPass && range.start >= self.cursor {
                    self.schedule_ahead(range);
                    Route::Source
                } else {
                    self.mirrored_writes += 1;
                    Route::Both
                }
            }
            Method::Cbt => {
                // Ahead of the first pass's cursor the pass itself will
                // copy the new data.
                if self.phase != Phase::FirstPass || range.start < self.cursor {
                    self.changed.insert_range(range);
                } else {
                    self.schedule_ahead(range);
                }
                Route::Source
            }
            // The blocks count as overlaid once the write succeeded
            // ([`MovePlan::overlaid`]).
            Method::Snapshot => Route::Overlay,
        }
    }

    /// A write ahead of the first pass's cursor may land in a hole the
    /// pass was not going to visit: make sure the pass copies it.
    fn schedule_ahead(&mut self, range: &Range<u64>) {
        let start = (range.start / BLOCK_BYTES * BLOCK_BYTES).max(self.cursor);
        let end = (range.end.div_ceil(BLOCK_BYTES) * BLOCK_BYTES).min(self.len);
        if start >= end || self.todo.iter().any(|r| r.start <= start && end <= r.end) {
            return;
        }
        insert_merged(&mut self.extents, start..end);
        let mut todo: Vec<Range<u64>> = std::mem::take(&mut self.todo).into();
        insert_merged(&mut todo, start..end);
        self.todo = todo.into();
    }

    /// A write to `range` reached the overlay (durably, map included):
    /// its blocks live there from now on.
    pub fn overlaid(&mut self, range: &Range<u64>) {
        self.overlay.insert_range(range);
    }

    /// Whether `block` (of [`BLOCK_BYTES`]) lives in the overlay.
    pub fn in_overlay(&self, block: u64) -> bool {
        self.overlay.contains(block)
    }

    /// Whether the ordered first pass runs: its target ranges are still
    /// untouched, so zero extents need not be sent.
    pub fn in_first_pass(&self) -> bool {
        self.phase == Phase::FirstPass
    }

    /// Whether the plan has converged.
    pub fn converged(&self) -> bool {
        self.phase == Phase::Converged
    }

    /// What is left to copy under the pause: `cbt`'s changed blocks, or
    /// `snapshot`'s overlay (read from the overlay). Empties the sets.
    pub fn final_ranges(&mut self) -> Vec<Range<u64>> {
        assert!(self.converged(), "final ranges before convergence");
        match self.options.method {
            Method::Mirror => Vec::new(),
            Method::Cbt => self.changed.take_ranges(self.len),
            Method::Snapshot => self.overlay.ranges(self.len),
        }
    }

    /// The overlay's ranges (to merge back into the source on abort).
    pub fn overlay_ranges(&self) -> Vec<Range<u64>> {
        self.overlay.ranges(self.len)
    }

    /// The target kept only what lies below `durable` (a broken link lost
    /// the rest): copy from there again, not from zero. Only the first
    /// pass can resume; later phases restart the move.
    pub fn resume_from(&mut self, durable: u64) -> Result<(), String> {
        if self.options.method == Method::Mirror && self.mirrored_writes > 0 {
            return Err("mirrored writes may have been lost with the link".into());
        }
        if !matches!(self.phase, Phase::FirstPass) && self.options.method == Method::Cbt {
            return Err("changed-block rounds cannot resume".into());
        }
        self.resumes += 1;
        // Everything from the durable point on, again: the chunk that was
        // on its way when the link broke is no longer in `todo`.
        let durable = durable.min(self.cursor);
        self.todo = self
            .extents
            .iter()
            .map(|r| r.start.max(durable)..r.end)
            .filter(|r| !r.is_empty())
            .collect();
        self.cursor = durable;
        if self.phase == Phase::Converged {
            self.phase = Phase::FirstPass;
        }
        Ok(())
    }

    /// Where the first pass stands.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Changed-block rounds so far.
    pub fn rounds(&self) -> u32 {
        self.rounds
    }

    /// Bytes sent so far.
    pub fn copied_bytes(&self) -> u64 {
        self.copied_bytes
    }

    /// Bytes of the disk outside the allocated extents.
    pub fn hole_bytes(&self) -> u64 {
        self.len - self.extents.iter().map(|r| r.end - r.start).sum::<u64>()
    }

    /// Guest writes sent to both copies.
    pub fn mirrored_writes(&self) -> u64 {
        self.mirrored_writes
    }

    /// Blocks in the overlay.
    pub fn overlay_blocks(&self) -> u64 {
        self.overlay.count()
    }

    /// Times the copy resumed.
    pub fn resumes(&self) -> u32 {
        self.resumes
    }

    /// Disk size.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the disk is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Adds `r` to ascending, disjoint `list`, merging what overlaps or
/// touches it.
fn insert_merged(list: &mut Vec<Range<u64>>, r: Range<u64>) {
    list.push(r);
    list.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(list.len());
    for r in list.drain(..) {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    *list = merged;
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Options with 1 MiB chunks, which the tests count in.
    fn options(method: Method) -> MoveOptions {
        let mut o = MoveOptions::new(method);
        o.chunk_bytes = MIB;
        o
    }

    fn plan(method: Method, len: u64, allocated: Vec<Range<u64>>) -> (MovePlan, Instant) {
        let now = Instant::now();
        (MovePlan::new(now, options(method), len, allocated), now)
    }

    fn copy_all(p: &mut MovePlan, now: Instant) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        while let Step::Copy(r) = p.next_step(now) {
            p.copied(&r, r.end - r.start);
            out.push(r);
        }
        out
    }

    #[test]
    fn first_pass_copies_allocated_extents_in_chunks_and_skips_holes() {
        let (mut p, now) = plan(Method::Mirror, 16 * MIB, vec![0..3 * MIB, 8 * MIB..9 * MIB]);
        let copied = copy_all(&mut p, now);
        assert_eq!(copied.len(), 4);
        assert_eq!(copied[3], 8 * MIB..9 * MIB);
        assert_eq!(p.hole_bytes(), 12 * MIB);
        assert_eq!(p.next_step(now), Step::Converged);
        assert!(p.final_ranges().is_empty(), "a mirror has nothing left");
    }

    #[test]
    fn a_write_ahead_into_a_hole_is_copied_by_the_pass() {
        for method in [Method::Mirror, Method::Cbt] {
            let (mut p, now) = plan(method, 16 * MIB, vec![0..MIB]);
            assert_eq!(p.route_write(&(9 * MIB..9 * MIB + 4096)), Route::Source);
            let copied = copy_all(&mut p, now);
            assert_eq!(
                copied,
                vec![0..MIB, 9 * MIB..9 * MIB + BLOCK_BYTES],
                "{method}"
            );
            assert!(p.converged());
        }
    }

    #[test]
    fn mirror_routes_writes_by_the_cursor() {
        let (mut p, now) = plan(Method::Mirror, 8 * MIB, vec![0..8 * MIB]);
        let Step::Copy(first) = p.next_step(now) else {
            panic!("copy")
        };
        p.copied(&first, MIB);
        assert_eq!(p.route_write(&(4096..8192)), Route::Both, "behind");
        assert_eq!(p.route_write(&(5 * MIB..5 * MIB + 4096)), Route::Source);
        copy_all(&mut p, now);
        assert_eq!(p.route_write(&(5 * MIB..5 * MIB + 4096)), Route::Both);
        assert_eq!(p.mirrored_writes(), 2);
    }

    #[test]
    fn cbt_rounds_until_the_changed_set_is_small() {
        let (mut p, now) = plan(Method::Cbt, 64 * MIB, vec![0..64 * MIB]);
        copy_all(&mut p, now);
        // Nothing written: converged straight after the first pass.
        assert!(p.converged());

        let (mut p, now) = plan(Method::Cbt, 64 * MIB, vec![0..64 * MIB]);
        let Step::Copy(r) = p.next_step(now) else {
            panic!()
        };
        p.copied(&r, MIB);
        // Writes behind the cursor are tracked, ahead of it they are not.
        p.route_write(&(0..4096));
        p.route_write(&(32 * MIB..32 * MIB + 4096));
        // 8 MiB changed behind the cursor half-way: one more round.
        for _ in 0..31 {
            let Step::Copy(r) = p.next_step(now) else {
                panic!()
            };
            p.copied(&r, MIB);
        }
        for b in 0..128 {
            p.route_write(&(b * BLOCK_BYTES..b * BLOCK_BYTES + 512));
        }
        let rest = copy_all(&mut p, now);
        assert_eq!(rest.len(), 32 + 8, "the pass's other half, then the round");
        assert_eq!(p.rounds(), 1);
        p.route_write(&(0..512));
        assert_eq!(p.next_step(now), Step::Converged);
        assert_eq!(p.final_ranges(), vec![0..BLOCK_BYTES]);
    }

    #[test]
    fn cbt_pauses_anyway_after_rounds_max() {
        let now = Instant::now();
        let mut o = options(Method::Cbt);
        o.rounds_max = 2;
        o.converge_bytes = 0;
        let mut p = MovePlan::new(now, o, 4 * MIB, vec![0..4 * MIB]);
        // A guest that rewrites block 0 after every chunk never converges.
        while let Step::Copy(r) = p.next_step(now) {
            p.copied(&r, r.end - r.start);
            p.route_write(&(0..4096));
        }
        assert!(p.converged());
        assert_eq!(p.rounds(), 2);
    }

    #[test]
    fn snapshot_overlays_every_write_and_leaves_it_for_the_pause() {
        let (mut p, now) = plan(Method::Snapshot, 4 * MIB, vec![0..4 * MIB]);
        let write = 100 * 512..101 * 512;
        assert_eq!(p.route_write(&write), Route::Overlay);
        assert!(!p.in_overlay(0), "not before the write succeeded");
        p.overlaid(&write);
        copy_all(&mut p, now);
        assert!(p.in_overlay(0) && !p.in_overlay(1));
        assert_eq!(p.final_ranges(), vec![0..BLOCK_BYTES]);
    }

    #[test]
    fn snapshot_resumes_where_the_target_stopped() {
        let (mut p, now) = plan(
            Method::Snapshot,
            8 * MIB,
            vec![0..2 * MIB, 4 * MIB..8 * MIB],
        );
        for _ in 0..4 {
            let Step::Copy(r) = p.next_step(now) else {
                panic!()
            };
            p.copied(&r, r.end - r.start);
        }
        assert_eq!(p.cursor(), 6 * MIB);
        // The next chunk was taken but never arrived: the link broke.
        assert_eq!(p.next_step(now), Step::Copy(6 * MIB..7 * MIB));
        p.resume_from(MIB).expect("resumable");
        let again = copy_all(&mut p, now);
        assert_eq!(again[0], MIB..2 * MIB, "from the durable point");
        assert_eq!(again[1], 4 * MIB..5 * MIB, "holes still skipped");
        assert_eq!(again.last(), Some(&(7 * MIB..8 * MIB)));
        assert_eq!(p.resumes(), 1);
    }

    #[test]
    fn the_rate_limit_spaces_chunks_out() {
        let now = Instant::now();
        let mut o = options(Method::Snapshot);
        o.rate_bytes_per_sec = 10 * MIB;
        let mut p = MovePlan::new(now, o, 4 * MIB, vec![0..4 * MIB]);
        let Step::Copy(r) = p.next_step(now) else {
            panic!()
        };
        p.copied(&r, MIB);
        let Step::Wait(until) = p.next_step(now) else {
            panic!("must wait")
        };
        assert_eq!(until - now, Duration::from_millis(100));
        assert!(matches!(p.next_step(until), Step::Copy(_)));
    }
}
