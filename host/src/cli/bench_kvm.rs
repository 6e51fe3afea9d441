//! `ferry bench kvm`: what the KVM backend costs on this machine.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;

use super::vm::GuestArgs;
use crate::kvm::{self, KvmVm};

/// Options of `ferry bench kvm`.
#[derive(Debug, Args)]
pub struct KvmArgs {
    /// Guest shape and workload.
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Repetitions of each timed operation; medians are printed.
    #[arg(long, default_value_t = 21)]
    pub reps: usize,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, Duration)> {
    let t = Instant::now();
    let out = f()?;
    Ok((out, t.elapsed()))
}

/// Runs the benchmark and prints its figures.
pub fn run(args: &KvmArgs) -> anyhow::Result<()> {
    kvm::available().context("ferry bench kvm needs KVM")?;
    anyhow::ensure!(args.reps > 0, "--reps must be at least 1");
    let params = args.guest.params()?;
    let gib = args.guest.memory as f64 / 1024.0;
    println!(
        "KVM backend, {} MiB guest, {} MiB working set, medians of {} runs",
        args.guest.memory, args.guest.wss, args.reps
    );

    let (mut vm, boot) = time(|| {
        let vm = KvmVm::with_test_guest(&params, 1)?;
        vm.resume()?;
        while !vm.port_reports().filled.load(Ordering::Relaxed) {
            anyhow::ensure!(vm.guest_exception()?.is_none(), "guest exception");
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(vm)
    })?;
    println!(
        "boot + fill:         {:>9.1} ms ({:.2} GiB/s, first touch of cold memory included)",
        boot.as_secs_f64() * 1e3,
        gib / boot.as_secs_f64()
    );

    let (_, populate) = time(|| {
        let fresh = KvmVm::create(params.memory_bytes, 1)?;
        fresh.populate()?;
        Ok(())
    })?;
    println!(
        "populate (dest prep): {:>8.1} ms ({:.2} GiB/s, MADV_POPULATE_WRITE)",
        populate.as_secs_f64() * 1e3,
        gib / populate.as_secs_f64()
    );

    let mut pauses = Vec::new();
    for _ in 0..args.reps {
        std::thread::sleep(Duration::from_millis(5));
        pauses.push(vm.pause()?);
        vm.resume()?;
    }
    println!(
        "pause latency:       {:>9.1} µs",
        median(pauses).as_secs_f64() * 1e6
    );

    vm.start_dirty_log()?;
    let _ = vm.take_dirty_bitmap()?;
    let pass0 = vm.guest_pass()?;
    let t0 = Instant::now();
    let mut takes = Vec::new();
    let mut dirty_pages = 0u64;
    for _ in 0..args.reps {
        std::thread::sleep(Duration::from_millis(20));
        let (bitmap, took) = time(|| Ok(vm.take_dirty_bitmap()?))?;
        dirty_pages += bitmap
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum::<u64>();
        takes.push(took);
    }
    let logged_secs = t0.elapsed().as_secs_f64();
    let passes_logged = vm.guest_pass()? - pass0;
    let take = median(takes);
    println!(
        "dirty log read:      {:>9.1} µs per call, {:.1} µs per GiB (KVM log | VMM bitmap, cleared)",
        take.as_secs_f64() * 1e6,
        take.as_secs_f64() * 1e6 / gib
    );
    println!(
        "dirty rate, logged:  {:>9.0} pages/s distinct per 20 ms round; guest passes {:.1}/s",
        dirty_pages as f64 / logged_secs,
        passes_logged as f64 / logged_secs
    );
    vm.stop_dirty_log()?;

    vm.pause()?;
    let mut saves = Vec::new();
    let mut state = None;
    for _ in 0..args.reps {
        let (s, took) = time(|| Ok(vm.save_state()?))?;
        saves.push(took);
        state = Some(s);
    }
    let state = state.context("no state saved")?;
    let bytes = state.to_bytes();
    let target = KvmVm::create(params.memory_bytes, 1)?;
    let mut restores = Vec::new();
    for _ in 0..args.reps {
        let (_, took) = time(|| Ok(target.restore_state(&state)?))?;
        restores.push(took);
    }
    let (hash, hashed) = time(|| Ok(vm.memory_hash()?))?;
    println!(
        "state save:          {:>9.1} µs ({} bytes encoded)",
        median(saves).as_secs_f64() * 1e6,
        bytes.len()
    );
    println!(
        "state restore:       {:>9.1} µs",
        median(restores).as_secs_f64() * 1e6
    );
    println!(
        "memory hash (xxh3):  {:>9.1} ms ({:.1} GiB/s) = {hash:016x}",
        hashed.as_secs_f64() * 1e3,
        gib / hashed.as_secs_f64()
    );
    Ok(())
}
