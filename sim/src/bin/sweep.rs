//! `cargo run --release -p ferry-sim --bin sweep -- --seeds N [--base B]
//! [--scenario NAME]… [--threads T]`: runs N seeds of every scenario (or
//! the named ones) on every core, then prints a summary — runs, outcomes,
//! violations by kind, simulated against wall time — and the replay
//! command of every seed that broke a rule. Exits 1 if any did.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ferry_sim::catalog;
use ferry_sim::scenario::{self, Scenario};
use ferry_sim::violation::Kind;

struct Args {
    seeds: u64,
    base: u64,
    threads: usize,
    names: Vec<String>,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        seeds: 100,
        base: 1,
        threads: std::thread::available_parallelism().map_or(1, usize::from),
        names: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let number = |v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("{flag}: {v} is not a whole number"))
        };
        match flag.as_str() {
            "--seeds" => args.seeds = number(value()?)?,
            "--base" => args.base = number(value()?)?,
            "--threads" => {
                args.threads = usize::try_from(number(value()?)?.max(1)).unwrap_or(1);
            }
            "--scenario" => args.names.push(value()?),
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(args)
}

#[derive(Default)]
struct Tally {
    runs: u64,
    completed: usize,
    aborted: usize,
    rejected: usize,
    in_doubt: usize,
    simulated: Duration,
    wall: Duration,
    by_kind: BTreeMap<Kind, usize>,
    failed: Vec<(u64, String)>,
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("sweep: {e}");
            std::process::exit(2);
        }
    };
    let scenarios: Vec<Scenario> = if args.names.is_empty() {
        catalog::all()
    } else {
        let mut list = Vec::new();
        for n in &args.names {
            match catalog::named(n) {
                Some(s) => list.push(s),
                None => {
                    let known: Vec<&str> = catalog::all().iter().map(|s| s.name).collect();
                    eprintln!(
                        "sweep: no scenario {n} (known: {}, scale)",
                        known.join(", ")
                    );
                    std::process::exit(2);
                }
            }
        }
        list
    };
    let jobs: Vec<(usize, u64)> = (0..scenarios.len())
        .flat_map(|i| (args.base..args.base + args.seeds).map(move |seed| (i, seed)))
        .collect();
    println!(
        "sweep: {} scenarios x {} seeds from {} = {} runs on {} threads",
        scenarios.len(),
        args.seeds,
        args.base,
        jobs.len(),
        args.threads
    );
    let next = AtomicUsize::new(0);
    let tallies: Vec<Mutex<Tally>> = scenarios.iter().map(|_| Mutex::default()).collect();
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..args.threads {
            scope.spawn(|| {
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(i, seed)) = jobs.get(k) else {
                        return;
                    };
                    let r = scenario::run(&scenarios[i], seed);
                    let mut t = tallies[i].lock().expect("tally");
                    t.runs += 1;
                    t.completed += r.completed;
                    t.aborted += r.aborted;
                    t.rejected += r.rejected;
                    t.in_doubt += r.in_doubt;
                    t.simulated += r.simulated;
                    t.wall += r.wall;
                    for v in &r.violations {
                        *t.by_kind.entry(v.kind).or_default() += 1;
                    }
                    if let Some(v) = r.violations.first() {
                        t.failed.push((seed, v.to_string()));
                    }
                    if k % 500 == 499 {
                        eprintln!(
                            "  {} runs done, {:.0} s",
                            k + 1,
                            started.elapsed().as_secs_f64()
                        );
                    }
                }
            });
        }
    });
    let mut broken = 0;
    println!(
        "\n{:<16} {:>6} {:>9} {:>8} {:>8} {:>7} {:>11} {:>9}  violations",
        "scenario", "runs", "completed", "aborted", "rejected", "doubt", "simulated s", "wall s"
    );
    for (s, t) in scenarios.iter().zip(&tallies) {
        let t = t.lock().expect("tally");
        let kinds: Vec<String> = Kind::ALL
            .iter()
            .filter_map(|k| t.by_kind.get(k).map(|n| format!("{k:?} {n}")))
            .collect();
        println!(
            "{:<16} {:>6} {:>9} {:>8} {:>8} {:>7} {:>11.1} {:>9.1}  {}",
            s.name,
            t.runs,
            t.completed,
            t.aborted,
            t.rejected,
            t.in_doubt,
            t.simulated.as_secs_f64(),
            t.wall.as_secs_f64(),
            if kinds.is_empty() {
                "none".to_owned()
            } else {
                kinds.join(", ")
            }
        );
        for (seed, first) in &t.failed {
            broken += 1;
            println!(
                "  seed {seed}: {first}\n    replay: cargo run --release -p ferry-sim --bin sweep -- --scenario {} --base {seed} --seeds 1   (trace: SIM_SEED={seed} SIM_TRACE=1 cargo test --release -p ferry-sim --test sweep)",
                s.name
            );
        }
    }
    println!(
        "\n{} runs in {:.1} s wall; {broken} broke a rule",
        jobs.len(),
        started.elapsed().as_secs_f64()
    );
    if broken > 0 {
        std::process::exit(1);
    }
}
