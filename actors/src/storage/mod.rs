//! Storage migration: a running VM's disk moves to another datastore (on
//! this host or another) while the guest keeps writing.
//!
//! The pieces, each in its own file:
//! - [`plan::MovePlan`]: the sans-IO decisions of one disk's move — which
//!   chunk to copy next, where a guest write goes, when the copy has
//!   converged — for the three [`Method`]s;
//! - [`crate::node::disk::DiskActor`]: owns the disk; the guest's I/O and
//!   the copy steps pass through it one at a time, so a guest write can
//!   never race the chunk being copied;
//! - [`target::DiskTarget`]: where the copy goes: a disk on a local
//!   datastore ([`target::LocalTarget`]) or a peer's, over a bulk stream
//!   ([`remote`]);
//! - [`datastore::Datastores`]: the datastores a host mounts (files in
//!   `ferry-host`, memory in tests and the simulation);
//! - [`pattern::WritePattern`]: the verifiable write workload (block number
//!   + sequence in every block) that proves every acknowledged write landed.
//!
//! ```mermaid
//! sequenceDiagram
//!     participant G as guest I/O
//!     participant D as DiskActor (source)
//!     participant T as target (local or peer)
//!     Note over D: StartMove(method)
//!     loop copy steps (interleaved with guest I/O)
//!         D->>T: extents of the next chunk (holes skipped)
//!         G->>D: write (mirror: behind cursor → both, durable on both before ack;<br/>cbt: source + changed map; snapshot: delta overlay)
//!     end
//!     Note over D: converged (mirror: cursor at end; cbt: changed ≤ limit; snapshot: base copied)
//!     Note over G,D: pause (guest I/O waits)
//!     D->>T: last changed blocks / the delta, flush
//!     T-->>D: durable
//!     Note over D: switch: the target is the disk now; source deleted after commit
//! ```
//!
//! ## Versions
//! The disk stream ([`remote`]) is part of protocol version 1.

pub mod datastore;
pub mod pattern;
pub mod plan;
pub mod remote;

pub mod target;

use std::time::Duration;

use serde::Serialize;

/// How a disk moves.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub enum Method {
    /// One ordered pass; writes behind the copy cursor go to both copies
    /// synchronously (Storage vMotion since 5.0). No re-copy rounds.
    Mirror,
    /// Full copy, then rounds of changed blocks until they converge, then
    /// a short pause for the last ones.
    Cbt,
    /// Writes go to a delta overlay while the read-only base is copied
    /// (throttled, resumable); then pause, copy the delta, merge, resume
    /// (Quick Storage Migration).
    Snapshot,
}

impl Method {
    /// All methods, for benches and tests.
    pub const ALL: [Method; 3] = [Method::Mirror, Method::Cbt, Method::Snapshot];

    /// The name the CLI uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Mirror => "mirror",
            Self::Cbt => "cbt",
            Self::Snapshot => "snapshot",
        }
    }
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("unknown method {s:?}: mirror, cbt or snapshot"))
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How a move runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoveOptions {
    /// The method.
    pub method: Method,
    /// Bytes copied per step (guest I/O waits at most one step).
    pub chunk_bytes: u64,
    /// Copy rate limit in bytes per second (0: none). The snapshot
    /// method's background copy is meant to be throttled.
    pub rate_bytes_per_sec: u64,
    /// `cbt`: converged once a round leaves at most this many changed bytes.
    pub converge_bytes: u64,
    /// `cbt`: rounds after the full copy before giving up on convergence
    /// and pausing anyway.
    pub rounds_max: u32,
    /// How long the whole move may take.
    pub time_max: Duration,
}

impl MoveOptions {
    /// Defaults for `method`.
    pub fn new(method: Method) -> Self {
        Self {
            method,
            chunk_bytes: 2 << 20,
            rate_bytes_per_sec: 0,
            converge_bytes: 4 << 20,
            rounds_max: 30,
            time_max: Duration::from_secs(1800),
        }
    }

    /// Checks limits.
    pub fn check(&self) -> Result<(), String> {
        if !(64 << 10..=(4 << 20)).contains(&self.chunk_bytes)
            || !self.chunk_bytes.is_multiple_of(plan::BLOCK_BYTES)
        {
            return Err(format!(
                "chunk of {} bytes: must be 64 KiB to 4 MiB, whole 64 KiB blocks",
                self.chunk_bytes
            ));
        }
        if self.rounds_max == 0 {
            return Err("rounds_max must be at least 1".into());
        }
        Ok(())
    }
}

/// What a finished (or failed) disk move reports.
#[derive(
    Debug, Clone, Default, PartialEq, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct DiskMoveReport {
    /// Disk name.
    pub disk: String,
    /// Method name.
    pub method: String,
    /// Datastore it left.
    pub from: String,
    /// Datastore it reached.
    pub to: String,
    /// Disk size.
    pub disk_bytes: u64,
    /// Bytes copied (base pass + rounds + final).
    pub copied_bytes: u64,
    /// Bytes skipped as holes or zero.
    pub skipped_bytes: u64,
    /// Changed-block rounds after the first pass (`cbt`).
    pub rounds: u32,
    /// Guest writes mirrored to both copies (`mirror`).
    pub mirrored_writes: u64,
    /// Blocks in the delta overlay at the pause (`snapshot`).
    pub overlay_blocks: u64,
    /// Time from start to switch, in milliseconds.
    pub total_ms: f64,
    /// Guest I/O stopped for the final step, in milliseconds.
    pub pause_ms: f64,
    /// The copy's rate in MB/s (copied bytes over the time to converge).
    pub copy_mb_per_s: f64,
    /// Times the copy resumed after a broken link, where it stopped.
    pub resumes: u32,
    /// Why it failed, if it did.
    pub error: Option<String>,
}
