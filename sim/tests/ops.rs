//! Operations under simulation: the link shared by priority, and a
//! maintenance evacuation under budgets while links fail.
//!
//! Replay a seed with `SIM_SEED=n cargo test -p ferry-sim --test ops`.

use ferry_actors::ops::jobs::Priority;
use ferry_sim::ops::{self, EVACUATED_VMS};

#[test]
fn a_high_priority_migration_gets_the_larger_share_of_a_busy_link() {
    // No random choices in this one: a seed only seeds tokio.
    for seed in ferry_sim::seeds(1, 1) {
        let [high, low] = ops::priority_share(seed).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let ratio = high.link.contended_bytes as f64 / low.link.contended_bytes.max(1) as f64;
        println!(
            "seed {seed}: high ended after {:.0} ms ({} MB, {} MB while both sent), low after {:.0} ms ({} MB, {} MB while both sent); share {ratio:.2} : 1",
            high.ended_after.as_secs_f64() * 1e3,
            high.link.bytes >> 20,
            high.link.contended_bytes >> 20,
            low.ended_after.as_secs_f64() * 1e3,
            low.link.bytes >> 20,
            low.link.contended_bytes >> 20,
        );
        assert_eq!(
            (high.priority, low.priority),
            (Priority::High, Priority::Low)
        );
        assert!(
            high.link.contended_bytes > 16 << 20,
            "seed {seed}: the two hardly overlapped: {high:?}"
        );
        // Weights 4 : 1; batches are whole, so allow some slack.
        assert!(
            (3.0..=5.0).contains(&ratio),
            "seed {seed}: high got {ratio:.2}x low's bytes while both sent"
        );
        assert!(
            high.ended_after < low.ended_after,
            "seed {seed}: high ended after low"
        );
    }
}

#[test]
fn an_evacuation_keeps_its_budgets_while_links_fail() {
    let mut hashes = Vec::new();
    for seed in ferry_sim::seeds(1, 8) {
        let r = ops::evacuation(seed);
        println!(
            "seed {seed}: {} of {EVACUATED_VMS} failed in the faulty pass; peak {} running, {} per link; trace {:016x}",
            r.failed_first_pass, r.peak_running, r.peak_per_link, r.trace_hash
        );
        if std::env::var("SIM_TRACE").is_ok() {
            println!("{}", r.trace.join("\n"));
        }
        assert!(
            r.violations.is_empty(),
            "seed {seed} (replay: SIM_SEED={seed}): {:#?}\ntrace:\n{}",
            r.violations,
            r.trace.join("\n")
        );
        assert!(
            r.peak_running >= 1,
            "seed {seed}: no job was ever seen running"
        );
        hashes.push((seed, r.trace_hash));
    }
    // Same seed, same run.
    let (seed, hash) = hashes[0];
    assert_eq!(
        ops::evacuation(seed).trace_hash,
        hash,
        "seed {seed} replays differently"
    );
}
