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
//! (memory hashes); every migration reaches a final state; no running
//! VM's disk loses a write its workload was told is durable, seen from
//! outside the hosts ([`witness`]).
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

pub mod catalog;
pub mod faults;
pub mod ledger;
pub mod life;
pub mod net;
pub mod ops;
pub mod rng;
pub mod scenario;
pub mod violation;
pub mod witness;
pub mod world;

/// The seeds to run: `SIM_SEED` (one), else `SIM_SEEDS` of them (default
/// `default_count`) starting at `SIM_SEED_BASE` (default `first`).
pub fn seeds(first: u64, default_count: u64) -> Vec<u64> {
    let var = |name: &str| std::env::var(name).ok().and_then(|s| s.parse::<u64>().ok());
    if let Some(seed) = var("SIM_SEED") {
        return vec![seed];
    }
    let count = var("SIM_SEEDS").unwrap_or(default_count);
    let base = var("SIM_SEED_BASE").unwrap_or(first);
    (base..base.saturating_add(count)).collect()
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
    log_to_stderr_if_asked();
    count_panics();
    take_panics();
    tokio::task::LocalSet::new().block_on(&runtime, async {
        SIM_START.with(|s| s.set(Some(tokio::time::Instant::now())));
        work.await
    })
}

thread_local! {
    /// Panics on this thread since the last [`take_panics`].
    static PANICS: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Counts every panic on the thread it happens on (the default hook still
/// prints it), so a run can report the production actors' panics, which
/// ractor catches.
fn count_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let at = info
                .location()
                .map(|l| format!(" at {}:{}", l.file(), l.line()))
                .unwrap_or_default();
            let what = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            PANICS.with(|p| p.borrow_mut().push(format!("{what}{at}")));
            previous(info);
        }));
    });
}

/// The panics on this thread since the last call.
pub fn take_panics() -> Vec<String> {
    PANICS.with(|p| std::mem::take(&mut *p.borrow_mut()))
}

/// With `SIM_LOG` set (an `EnvFilter`, e.g. `ferry_actors=info`), the
/// production code's log lines go to stderr, stamped with simulated time:
/// the way to read what the actors did in one replayed seed.
fn log_to_stderr_if_asked() {
    let Ok(filter) = std::env::var("SIM_LOG") else {
        return;
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_timer(SimTime)
        .with_writer(std::io::stderr)
        .try_init();
}

struct SimTime;

thread_local! {
    /// When this thread's simulated run began (for log time stamps).
    static SIM_START: std::cell::Cell<Option<tokio::time::Instant>> =
        const { std::cell::Cell::new(None) };
}

impl tracing_subscriber::fmt::time::FormatTime for SimTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        if tokio::runtime::Handle::try_current().is_err() {
            return write!(w, "-");
        }
        let start = SIM_START.with(std::cell::Cell::get);
        match start {
            Some(start) => write!(
                w,
                "{:>12.6}",
                (tokio::time::Instant::now() - start).as_secs_f64() * 1e3
            ),
            None => write!(w, "-"),
        }
    }
}
