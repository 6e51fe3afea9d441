//! Live migration of a VM's memory and vCPU state: the pre-copy protocol
//! as two sans-IO state machines, [`SourceMachine`] and [`DestMachine`].
//!
//! They read no clock, socket or file: every input is a `handle_*(now, …)`
//! call and every output is polled (`poll_action`, `poll_event`,
//! `poll_timeout`). The actors in [`crate::node`] pump them over QUIC with a
//! KVM or synthetic guest; the protocol tests here and the simulation in
//! `ferry-sim` pump them in memory under virtual time.
//!
//! # Message flow
//!
//! ```mermaid
//! sequenceDiagram
//!     participant S as MigrationSource
//!     participant D as MigrationDestination
//!     S->>D: Offer (config, memory, vCPUs, CPU features, MAC, lanes)
//!     Note over D: admission, paused shadow VM, populate memory
//!     D->>S: Accepted { lanes } / Refused(reason)
//!     loop pre-copy rounds (lanes carry page batches + LaneMark)
//!         S-->>D: pages of round n on every lane
//!         D->>S: RoundReceived { n, pages, bytes }
//!         Note over S: dirty set, predicted downtime, throttle
//!     end
//!     Note over S: pause vCPUs
//!     S-->>D: final dirty pages on the lanes
//!     S->>D: Switchover { final_round, vCPU + device state }
//!     D->>S: RoundReceived { final }, Ready { memory hash? }
//!     Note over S: release ownership (generation + 1)
//!     S->>D: Commit { generation }
//!     Note over D: adopt: disks opened, VM + migration durable in one transaction
//!     Note over D: resume vCPUs, announce MAC
//!     D->>S: Resumed
//!     Note over S: free the VM
//! ```
//!
//! Any failure before the release resumes the VM on the source and
//! discards the shadow ([`SourceMsg::Abort`], [`DestMsg::Aborted`]); with
//! `verify_memory` a hash mismatch is such a failure. After the release the
//! source never resumes on its own: it asks the destination how it ended
//! (a `Resolve` stream on a fresh connection) with back-off, for as long as
//! it takes, and the VM stays paused until the answer or an operator's
//! fence ([`SourceMachine::handle_fence`]). A destination that cannot adopt
//! (a disk will not open, its store will not write) drops the shadow before
//! it ever ran and answers [`DestMsg::Aborted`]; asked, it says it never
//! took the VM.
//!
//! # Versions
//!
//! These messages are protocol version 2 (`ferry_transport::PROTOCOL_VERSION`).
//! Version 1 nodes have no migration messages: a migration over a session
//! that negotiated version 1 is refused before the offer.

pub mod admission;
pub mod destination;
pub mod options;
pub mod report;
pub mod report_text;
pub mod source;
pub mod timeline;
pub mod wire;

#[cfg(test)]
mod tests;

pub use admission::{Capacity, Usage, admit};
pub use destination::{DestAction, DestMachine, DestOutcome};
pub use options::MigrationOptions;
pub use report::{DestReport, MigrationReport, Outcome, PhaseReport, Progress, RoundReport};
pub use source::{SourceAction, SourceEvent, SourceMachine};
pub use timeline::{Figure, Timeline};
pub use wire::{
    DestMsg, GuestKind, LaneMark, Mac, Offer, Refusal, SourceMsg, StreamIntro, VmConfig,
};
