//! Operations around the migrations: what an operator of a fleet needs
//! beyond moving one VM.
//!
//! - [`jobs`]: the job queue (sans-IO): priorities, start times and the
//!   per-host, per-datastore and per-link concurrency budgets;
//! - [`store`]: the [`NodeStore`](store::NodeStore) trait a node keeps its
//!   inventory, jobs, migration records and audit log in (SQLite in
//!   `ferry-host`, [`MemStore`](store::MemStore) here);
//! - [`audit`]: audit entries and their query;
//! - [`placement`]: ranking destination hosts for a VM, with reasons;
//! - [`drs`]: a balancer proposing migrations that even out host load;
//! - [`share`]: a link's bandwidth shared between migrations by priority;
//! - [`rates`]: counters (CPU time, disk writes) turned into rates;
//! - [`sdrs`]: Storage DRS, moving disks between a host's datastores by
//!   fill and write load.
//!
//! Everything here is plain data and pure functions; the actors that use
//! it are [`crate::node::scheduler`] and [`crate::node::host`].

pub mod audit;
pub mod drs;
pub mod jobs;
pub mod placement;
pub mod rates;
pub mod sdrs;
pub mod share;
pub mod store;

/// Milliseconds since the Unix epoch, now (wall clock: audit and job
/// times are shown to people and survive restarts).
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
