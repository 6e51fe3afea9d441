//! ferry-sim: the deterministic simulation of migrations.
//!
//! Many hosts, VMs and faults in one thread, on a paused tokio clock, with
//! every choice drawn from one seed. It runs the production host, VM and
//! migration actors and state machines of `ferry-actors` with synthetic
//! guests, over a simulated network ([`net`]) built on the in-memory
//! transport: per-link bandwidth and latency, connection cuts, partitions
//! and clogged links.
//!
//! Rules checked ([`world`]): no VM runs on two hosts at any check; once
//! the network is healed and migrations are over, every VM runs on exactly
//! one host with nothing left half-way (no shadow, no VM marked leaving, no
//! second copy); destination memory equals source memory at the switchover
//! (memory hashes); every migration reaches a final state.
//!
//! Seeds: every test prints its seeds; `SIM_SEED=n` replays one,
//! `SIM_SEEDS=n` sweeps n of them ([`seeds`]). The same seed gives the
//! same trace hash.
//!
//! ```no_run
//! use ferry_sim::scenario::{self, Scenario};
//! # fn demo(s: &Scenario) {
//! let r = scenario::run(s, 42);
//! assert!(r.violations.is_empty(), "seed 42: {:?}", r.violations);
//! # }
//! ```

pub mod net;
pub mod ops;
pub mod rng;
pub mod scenario;
pub mod world;

/// The seeds to run: `SIM_SEED` (one), else `SIM_SEEDS` (that many from
/// `first`), else `default_count` from `first`.
pub fn seeds(first: u64, default_count: u64) -> Vec<u64> {
    if let Some(seed) = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        return vec![seed];
    }
    let count = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_count);
    (first..first + count).collect()
}

/// Runs `work` to its end on a fresh single-threaded runtime with a
/// paused clock, tokio's own choices seeded by `seed`, and blocking work
/// done inline.
pub fn on_sim_runtime<F: std::future::Future>(seed: u64, work: F) -> F::Output {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .rng_seed(tokio::runtime::RngSeed::from_bytes(&seed.to_le_bytes()))
        .build()
        .expect("runtime");
    ferry_actors::node::run_blocking_work_inline_on_this_thread();
    tokio::task::LocalSet::new().block_on(&runtime, work)
}
