//! The verifiable write workload: write `seq` (1, 2, …) fills block
//! `(seq * stride) % blocks` with words derived from the block number and
//! `seq`. Any `blocks` consecutive writes touch every block exactly once,
//! so after `acked` acknowledged writes each block's newest acknowledged
//! write is known without a log, and a check can prove that every one of
//! them is on the disk.
//!
//! The KVM test guest runs the same arithmetic in its own code
//! (`ferry-host`'s guest image); the synthetic workload in
//! [`crate::node::disk::run_pattern_writer`] uses this type.

use super::super::disk::DiskError;

/// Bytes per pattern write (and per checked block).
pub const PATTERN_BLOCK_BYTES: u64 = 4096;
const WORDS: usize = 512;
const K_SEQ: u64 = 0x9E37_79B9_7F4A_7C15;
const K_BLOCK: u64 = 0xC2B2_AE3D_27D4_EB4F;

/// The pattern for one disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WritePattern {
    blocks: u64,
    stride: u64,
}

/// A block that does not hold what the acknowledged writes put there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// The disk could not be read.
    #[error("reading block {block}: {source}")]
    Read {
        /// Block number.
        block: u64,
        /// Why.
        #[source]
        source: DiskError,
    },
    /// An acknowledged write is missing: the block is older, or garbage.
    #[error("block {block}: expected write {expected} or newer, found {found}")]
    Lost {
        /// Block number.
        block: u64,
        /// The newest acknowledged write to it.
        expected: u64,
        /// What the block says (0: zero or not a pattern block).
        found: u64,
    },
}

/// The word at `index` of the block write `seq` puts at `block`.
pub fn word(block: u64, seq: u64, index: u64) -> u64 {
    match index {
        0 => block,
        1 => seq,
        i => seq.wrapping_mul(K_SEQ) ^ block.wrapping_mul(K_BLOCK) ^ i,
    }
}

impl WritePattern {
    /// The pattern over the first `disk_bytes` of a disk (whole blocks).
    ///
    /// # Panics
    /// If the disk holds no whole block.
    pub fn new(disk_bytes: u64) -> Self {
        let blocks = disk_bytes / PATTERN_BLOCK_BYTES;
        assert!(blocks > 0, "a pattern needs at least one block");
        // A stride near the golden ratio (5/8) spreads consecutive writes over
        // the disk; it must be coprime with the block count to visit all.
        let mut stride = (blocks / 8 * 5).max(1) | 1;
        while gcd(stride, blocks) != 1 {
            stride += 2;
        }
        Self { blocks, stride }
    }

    /// Blocks the pattern covers.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// The stride between consecutive writes' blocks.
    pub fn stride(&self) -> u64 {
        self.stride
    }

    /// The block write `seq` (from 1) goes to.
    pub fn block_of(&self, seq: u64) -> u64 {
        let block = (u128::from(seq) * u128::from(self.stride)) % u128::from(self.blocks);
        u64::try_from(block).expect("below the block count")
    }

    /// The byte offset write `seq` goes to.
    pub fn offset_of(&self, seq: u64) -> u64 {
        self.block_of(seq) * PATTERN_BLOCK_BYTES
    }

    /// Fills `buf` (one block) with write `seq`.
    pub fn fill(&self, seq: u64, buf: &mut [u8]) {
        assert_eq!(buf.len() as u64, PATTERN_BLOCK_BYTES);
        let block = self.block_of(seq);
        for (i, w) in buf.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&word(block, seq, i as u64).to_le_bytes());
        }
    }

    /// The write a block holds: its sequence number if every word matches
    /// a pattern write aimed at `block`, else 0.
    pub fn decode(&self, block: u64, buf: &[u8]) -> u64 {
        let w = |i: usize| u64::from_le_bytes(buf[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let seq = w(1);
        if seq == 0 || w(0) != block || self.block_of(seq) != block {
            return 0;
        }
        let whole = (0..WORDS).all(|i| w(i) == word(block, seq, i as u64));
        if whole { seq } else { 0 }
    }

    /// Checks that each block holds its newest acknowledged write (or a
    /// newer one, up to `in_flight` writes past `acked` that may have
    /// landed unacknowledged), reading blocks with `read`. Returns how
    /// many blocks were checked.
    pub fn verify(
        &self,
        acked: u64,
        in_flight: u64,
        mut read: impl FnMut(u64, &mut [u8]) -> Result<(), DiskError>,
    ) -> Result<u64, PatternError> {
        let mut buf = vec![0u8; crate::disk::to_usize(PATTERN_BLOCK_BYTES)];
        let first = acked.saturating_sub(self.blocks - 1).max(1);
        let mut checked = 0;
        for expected in first..=acked {
            let block = self.block_of(expected);
            read(block * PATTERN_BLOCK_BYTES, &mut buf)
                .map_err(|source| PatternError::Read { block, source })?;
            let found = self.decode(block, &buf);
            if found < expected || found > acked + in_flight {
                return Err(PatternError::Lost {
                    block,
                    expected,
                    found,
                });
            }
            checked += 1;
        }
        Ok(checked)
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{BlockBackend, MemDisk};

    #[test]
    fn consecutive_writes_visit_every_block_once() {
        for blocks in [1u64, 2, 7, 64, 1000] {
            let p = WritePattern::new(blocks * PATTERN_BLOCK_BYTES);
            let mut seen: Vec<u64> = (5..5 + blocks).map(|s| p.block_of(s)).collect();
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen.len() as u64, blocks, "blocks {blocks}");
        }
    }

    #[test]
    fn verify_finds_a_lost_write_and_accepts_a_complete_disk() {
        let len = 64 * PATTERN_BLOCK_BYTES;
        let p = WritePattern::new(len);
        let mut disk = MemDisk::new(len);
        let mut buf = vec![0u8; crate::disk::to_usize(PATTERN_BLOCK_BYTES)];
        let mut old = Vec::new();
        for seq in 1..=150 {
            p.fill(seq, &mut buf);
            if seq == 140 {
                disk.read_at(p.offset_of(seq), &mut old).ok();
                old = vec![0u8; buf.len()];
                disk.read_at(p.offset_of(seq), &mut old).expect("read");
            }
            disk.write_at(p.offset_of(seq), &buf).expect("write");
        }
        let read = |d: &MemDisk| {
            let d = d.clone();
            move |o, b: &mut [u8]| d.read_at(o, b)
        };
        assert_eq!(p.verify(150, 0, read(&disk)).expect("complete"), 64);
        // An unacknowledged write past 150 that landed is fine...
        p.fill(151, &mut buf);
        disk.write_at(p.offset_of(151), &buf).expect("write");
        assert!(p.verify(150, 1, read(&disk)).is_ok());
        assert!(p.verify(150, 0, read(&disk)).is_err());
        // ...an acknowledged one that went missing is not.
        disk.write_at(p.offset_of(140), &old).expect("write");
        let err = p.verify(151, 0, read(&disk)).expect_err("lost");
        assert!(
            matches!(
                err,
                PatternError::Lost {
                    expected: 140,
                    found: 76,
                    ..
                }
            ),
            "{err}"
        );
    }
}
