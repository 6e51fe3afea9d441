//! What a migration tells its caller: progress while it runs, a report at
//! the end.

// rkyv derives resolver twins of the enums whose fields carry no docs;
// every item written here is documented.
#![allow(missing_docs)]

use serde::Serialize;

pub use super::timeline::PhaseReport;

/// Milliseconds since the Unix epoch, `ago_ms` before now.
pub fn unix_ms_ago(ago_ms: f64) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let ago = ago_ms.max(0.0) as u64;
    u64::try_from(now.as_millis())
        .unwrap_or(u64::MAX)
        .saturating_sub(ago)
}

/// How people see a migration id: 16 hex digits (the source's boot in the
/// high half, a counter in the low half).
pub fn show_id(id: u64) -> String {
    format!("{id:016x}")
}

/// Reads back what [`show_id`] wrote (leading zeros optional).
pub fn parse_id(text: &str) -> Option<u64> {
    let t = text.trim();
    if t.is_empty() || t.len() > 16 {
        return None;
    }
    u64::from_str_radix(t, 16).ok()
}

/// One pre-copy round as the source saw it.
#[derive(Debug, Clone, PartialEq, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct RoundReport {
    /// Round number (0 copies all memory).
    pub round: u32,
    /// When it was sent, in milliseconds since the migration started.
    pub start_ms: f64,
    /// Pages sent.
    pub pages: u64,
    /// Wire bytes the destination received.
    pub bytes: u64,
    /// Send to acknowledgement, in milliseconds.
    pub duration_ms: f64,
    /// Pages dirtied while the round was in flight.
    pub dirty_after: u64,
    /// `dirty_after` per second of the round.
    pub dirty_rate_pages_per_s: f64,
    /// This round's throughput, in MB/s.
    pub bandwidth_mb_s: f64,
    /// Downtime predicted after this round, in milliseconds.
    pub predicted_downtime_ms: f64,
    /// Throttle while the round ran, in percent.
    pub throttle_percent: u8,
}

/// How a migration ended.
#[derive(
    Debug, Clone, PartialEq, Eq, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub enum Outcome {
    /// The VM runs on the destination (or sits there stopped, if cold).
    Completed,
    /// Called off before the source released the VM: it runs on the source.
    Aborted {
        /// Why.
        reason: String,
    },
    /// Failed after the source released the VM: the source keeps it paused
    /// and does not resume it on its own (the destination may own it).
    InDoubt {
        /// Why.
        reason: String,
    },
}

/// The end-of-migration report.
#[derive(Debug, Clone, PartialEq, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct MigrationReport {
    /// The migration's id on the source.
    pub migration_id: u64,
    /// When it started, in milliseconds since the Unix epoch (the pump's
    /// wall clock; 0 from a bare machine).
    pub started_unix_ms: u64,
    /// The VM.
    pub vm: String,
    /// Source host.
    pub from: String,
    /// Destination host.
    pub to: String,
    /// Cold migration (stopped VM).
    pub cold: bool,
    /// How it ended.
    pub outcome: Outcome,
    /// Offer to the end, in milliseconds.
    pub total_ms: f64,
    /// vCPUs paused on the source until running on the destination.
    pub downtime_ms: f64,
    /// What the source predicted for the downtime when it switched over.
    pub predicted_downtime_ms: f64,
    /// Wire bytes received by the destination.
    pub bytes_sent: u64,
    /// Pages sent, over all rounds.
    pub pages_sent: u64,
    /// Rounds, the final (paused) one included.
    pub rounds: u32,
    /// Per-round figures.
    pub round_log: Vec<RoundReport>,
    /// Mean throughput over the rounds, in MB/s.
    pub throughput_mb_s: f64,
    /// Highest throttle applied, in percent.
    pub throttle_max_percent: u8,
    /// Encoded vCPU and device state, in bytes.
    pub state_bytes: u64,
    /// Destination memory equalled source memory at the pause (`None`: not
    /// checked).
    pub memory_verified: Option<bool>,
    /// The disks' moves, when storage moved along.
    pub disks: Vec<crate::storage::DiskMoveReport>,
    /// The source's phases, in the order they began.
    pub phases: Vec<PhaseReport>,
    /// The destination's side, when it was asked for (`ferry migrate show`).
    pub destination: Option<DestReport>,
}

/// One migration as its destination saw it.
#[derive(Debug, Clone, PartialEq, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct DestReport {
    /// The migration's id on the source.
    pub migration_id: u64,
    /// When the offer arrived, in milliseconds since the Unix epoch.
    pub started_unix_ms: u64,
    /// The VM.
    pub vm: String,
    /// Source host.
    pub from: String,
    /// This host.
    pub to: String,
    /// How it ended here: `adopted`, or why not.
    pub outcome: String,
    /// Offer received to the end, in milliseconds.
    pub total_ms: f64,
    /// From the switchover message to the vCPUs running here, in
    /// milliseconds: the part of the downtime this host sees.
    pub downtime_ms: f64,
    /// Rounds received.
    pub rounds: u32,
    /// Pages received, over all rounds.
    pub pages_received: u64,
    /// Wire bytes received.
    pub bytes_received: u64,
    /// The destination's phases, in the order they began.
    pub phases: Vec<PhaseReport>,
}

impl MigrationReport {
    /// Whether the VM now runs (or sits, if cold) on the destination.
    pub fn completed(&self) -> bool {
        self.outcome == Outcome::Completed
    }

    /// Megabytes sent.
    #[allow(clippy::cast_precision_loss)] // for display
    pub fn mb_sent(&self) -> f64 {
        self.bytes_sent as f64 / 1e6
    }

    /// One disk's move, in a line.
    pub fn disk_line(&self, d: &crate::storage::DiskMoveReport) -> String {
        let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
        format!(
            "disk {} {} -> {}:{} by {}: {:.1} MiB copied, {:.1} MiB holes skipped, {:.0} MB/s, final step {:.2} ms",
            d.disk,
            d.from,
            self.to,
            d.to,
            d.method,
            mib(d.copied_bytes),
            mib(d.skipped_bytes),
            d.copy_mb_per_s,
            d.pause_ms
        )
    }

    /// A few lines for people.
    pub fn to_text(&self) -> String {
        let outcome = match &self.outcome {
            Outcome::Completed => "completed".to_owned(),
            Outcome::Aborted { reason } => format!("aborted, VM still on {}: {reason}", self.from),
            Outcome::InDoubt { reason } => format!("in doubt: {reason}"),
        };
        let verified = match self.memory_verified {
            Some(true) => "memory verified",
            Some(false) => "MEMORY MISMATCH",
            None => "memory not verified",
        };
        let mut disks = String::new();
        for d in &self.disks {
            disks.push_str("\n  ");
            disks.push_str(&self.disk_line(d));
        }
        format!(
            "{vm}: {from} -> {to} {outcome}\n  total {total:.1} ms, downtime {down:.2} ms (predicted {pred:.2} ms)\n  {rounds} rounds, {pages} pages, {mb:.1} MB at {rate:.0} MB/s, throttle max {thr}%, {verified}",
            vm = self.vm,
            from = self.from,
            to = self.to,
            total = self.total_ms,
            down = self.downtime_ms,
            pred = self.predicted_downtime_ms,
            rounds = self.rounds,
            pages = self.pages_sent,
            mb = self.mb_sent(),
            rate = self.throughput_mb_s,
            thr = self.throttle_max_percent,
        ) + &disks
    }
}

/// Where a migration stands, for progress bars.
#[derive(Debug, Clone, PartialEq, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Progress {
    /// Phase name (`offer`, `precopy`, `switchover`, `resume`).
    pub phase: String,
    /// Current round.
    pub round: u32,
    /// Pages still to send (the dirty set).
    pub pages_left: u64,
    /// Pages of guest memory.
    pub pages_total: u64,
    /// Measured bandwidth, bytes per second.
    pub rate_bytes_per_s: f64,
    /// Predicted downtime if switching over now, in milliseconds.
    pub predicted_downtime_ms: f64,
    /// Current throttle, in percent.
    pub throttle_percent: u8,
}

impl Progress {
    /// A phase with nothing measured yet (queued, offered).
    pub fn phase(phase: impl Into<String>) -> Self {
        Self {
            phase: phase.into(),
            round: 0,
            pages_left: 0,
            pages_total: 0,
            rate_bytes_per_s: 0.0,
            predicted_downtime_ms: 0.0,
            throttle_percent: 0,
        }
    }
}
