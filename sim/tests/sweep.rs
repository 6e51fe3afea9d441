//! Seed sweeps over the scenarios, the determinism check and the scale run.
//!
//! Every failure names its seed; replay it with `SIM_SEED=n cargo test -p
//! ferry-sim`, sweep more with `SIM_SEEDS=n`.

use std::time::Duration;

use ferry_sim::catalog;
use ferry_sim::scenario::{self, Faults, RunResult, Scenario};

/// Runs `count` seeds of `s` from `first` (or as `SIM_SEED`, `SIM_SEEDS`
/// and `SIM_SEED_BASE` say), every one of them, then fails naming each
/// seed that broke a rule, with its replay command.
fn sweep(s: &Scenario, first: u64, count: u64) -> Vec<RunResult> {
    let mut results = Vec::new();
    let mut failed = Vec::new();
    for seed in ferry_sim::seeds(first, count) {
        let r = scenario::run(s, seed);
        println!(
            "{} seed {seed}: {} completed, {} aborted, {} rejected, {} in doubt; {:.1} s simulated in {:.2} s; trace {:016x}",
            s.name,
            r.completed,
            r.aborted,
            r.rejected,
            r.in_doubt,
            r.simulated.as_secs_f64(),
            r.wall.as_secs_f64(),
            r.trace_hash
        );
        if std::env::var("SIM_TRACE").is_ok() {
            println!("{}", r.trace.join("\n"));
        }
        if !r.violations.is_empty() {
            println!(
                "{} seed {seed} broke a rule (replay: SIM_SEED={seed} SIM_TRACE=1 cargo test --release -p ferry-sim --test sweep): {:#?}",
                s.name, r.violations
            );
            failed.push((seed, r.violations.clone()));
        }
        results.push(r);
    }
    assert!(
        failed.is_empty(),
        "{}: {} of {} seeds broke a rule: {failed:#?}",
        s.name,
        failed.len(),
        results.len()
    );
    results
}

#[test]
fn calm_network_every_migration_completes() {
    let results = sweep(&catalog::base("calm"), 1, 25);
    for r in &results {
        assert_eq!(
            r.aborted + r.in_doubt,
            0,
            "seed {}: no faults, no aborts",
            r.seed
        );
    }
}

#[test]
fn cut_and_clogged_links() {
    sweep(&catalog::cuts(), 1000, 25);
}

#[test]
fn partitions_heal() {
    sweep(&catalog::partitions(), 2000, 25);
}

#[test]
fn full_destinations_refuse() {
    sweep(&catalog::full(), 3000, 25);
}

#[test]
fn same_seed_same_trace() {
    let s = Scenario {
        faults: Faults {
            cuts_per_s: 3.0,
            partitions_per_s: 2.0,
            partition_max: Duration::from_millis(300),
            clogs_per_s: 3.0,
            ..Faults::NONE
        },
        ..catalog::base("determinism")
    };
    let a = scenario::run(&s, 77);
    let b = scenario::run(&s, 77);
    assert_eq!(
        a.trace_hash,
        b.trace_hash,
        "seed 77 ran differently twice:\n{}\n---\n{}",
        a.trace.join("\n"),
        b.trace.join("\n")
    );
    let c = scenario::run(&s, 78);
    assert_ne!(a.trace_hash, c.trace_hash, "another seed, another run");
    // Jitter and silences draw from generators of their own: still one
    // run per seed.
    for s in [catalog::lossy(), catalog::black_holes()] {
        let (a, b) = (scenario::run(&s, 79), scenario::run(&s, 79));
        assert_eq!(
            a.trace_hash, b.trace_hash,
            "{} seed 79 ran differently twice",
            s.name
        );
    }
}

#[test]
fn long_distance_links_with_cuts() {
    sweep(&catalog::long_distance(), 4000, 25);
}

#[test]
fn hundred_hosts_thousand_vms_under_faults() {
    let s = catalog::scale();
    let results = sweep(&s, 5000, 1);
    let r = &results[0];
    println!(
        "scale: {} hosts, {} VMs, {} migrations: {:.1} s simulated in {:.1} s wall",
        s.hosts,
        s.vms,
        s.migrations,
        r.simulated.as_secs_f64(),
        r.wall.as_secs_f64()
    );
    assert!(r.completed > s.migrations / 4, "{} completed", r.completed);
}

#[test]
fn hosts_crash_and_restart_clocks_jump() {
    sweep(&catalog::crashes(), 6000, 25);
}

#[test]
fn disks_move_with_their_vms_through_cuts_and_partitions() {
    let results = sweep(&catalog::storage(), 6000, 20);
    assert!(
        results.iter().map(|r| r.completed).sum::<usize>() > 0,
        "some storage migrations complete"
    );
}

#[test]
fn disks_survive_host_crashes() {
    sweep(&catalog::storage_crashes(), 7000, 10);
}

#[test]
fn crashed_hosts_bring_their_vms_back_from_their_database() {
    sweep(&catalog::durable_crashes(), 8000, 25);
}

#[test]
fn node_stores_that_fail_writes_lose_and_double_nothing() {
    let results = sweep(&catalog::failing_stores(), 9000, 15);
    let failures: usize = results
        .iter()
        .map(|r| {
            r.trace
                .iter()
                .filter(|l| l.contains("store fails writes"))
                .count()
        })
        .sum();
    assert!(failures > 0, "stores failed in these seeds");
}

#[test]
fn a_lossy_bursty_network_reorders_streams_and_loses_nothing() {
    let results = sweep(&catalog::lossy(), 9100, 15);
    assert!(
        results.iter().map(|r| r.completed).sum::<usize>() > 0,
        "migrations complete through jitter and delay spikes"
    );
}

#[test]
fn black_holes_and_one_way_partitions_time_out_safely() {
    let results = sweep(&catalog::black_holes(), 9200, 15);
    // Some silence outlasted the idle timeout, so connections died without
    // an error ever crossing the link.
    let idle = ferry_sim::net::idle_timeout();
    let long = results
        .iter()
        .flat_map(|r| r.trace.iter())
        .filter(|l| l.contains("black hole") || l.contains("one-way partition"))
        .filter_map(|l| l.rsplit_once(" for ").map(|(_, len)| len.to_owned()))
        .filter(|len| len.ends_with('s') && !len.ends_with("ms") && !len.ends_with("µs"))
        .filter_map(|len| len.trim_end_matches('s').parse::<f64>().ok())
        .filter(|secs| *secs > idle.as_secs_f64())
        .count();
    assert!(long > 0, "some silence lasted past the idle timeout");
}

#[test]
fn faults_aimed_at_every_protocol_step_break_no_rule() {
    let results = sweep(&catalog::aimed(), 9300, 20);
    let struck = |step: ferry_sim::ledger::Step| {
        let mark = format!("aimed at {step:?} ");
        results
            .iter()
            .flat_map(|r| r.trace.iter())
            .filter(|l| l.contains(&mark))
            .count()
    };
    for step in ferry_sim::ledger::Step::ALL {
        assert!(struck(step) > 0, "no fault struck at {step:?}");
    }
}

#[test]
fn faults_aimed_at_moves_with_disks_lose_no_acknowledged_write() {
    let results = sweep(&catalog::aimed_disks(), 9300, 10);
    let methods = ["mirror", "cbt", "snapshot"];
    for m in methods {
        assert!(
            results
                .iter()
                .flat_map(|r| r.trace.iter())
                .any(|l| l.contains(&format!("({m})"))),
            "no {m} move ran"
        );
    }
}
