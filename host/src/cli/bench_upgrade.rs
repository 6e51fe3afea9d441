//! `ferry bench upgrade`: how long a running guest stops while it moves to
//! a new VMM process on the same host (`vm upgrade`), by memory size.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use ferry_actors::guest::GuestBackend;

use crate::kvm;
use crate::vmm::proto::Boot;
use crate::vmm::{VmmGuest, VmmHome};

/// Options of `ferry bench upgrade`.
#[derive(Debug, Args)]
pub struct UpgradeArgs {
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 4096)]
    pub memory: u64,
    /// MiB the test guest keeps rewriting.
    #[arg(long, default_value_t = 64)]
    pub wss: u64,
    /// Upgrades in a row; the median and the worst are printed.
    #[arg(long, default_value_t = 11)]
    pub reps: usize,
}

/// Runs the benchmark and prints its figures.
pub fn run(args: &UpgradeArgs) -> anyhow::Result<()> {
    kvm::available().context("ferry bench upgrade needs KVM")?;
    anyhow::ensure!(args.reps > 0, "--reps must be at least 1");
    let dir = tempfile::tempdir()?;
    let home = VmmHome {
        exe: std::env::current_exe().context("finding the ferry binary")?,
        dir: dir.path().to_owned(),
    };
    let memory = kvm::shared_memory(args.memory << 20)?;
    let boot = Boot::TestGuest { wss_mib: args.wss };
    let mut guest = VmmGuest::start(&home, "bench", boot, 1, memory)?;
    guest.resume()?;
    let wait_pass = |guest: &VmmGuest, pass: u64| -> anyhow::Result<()> {
        let start = Instant::now();
        while guest.progress()?.pass < pass {
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(120),
                "the guest stopped making progress"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    };
    wait_pass(&guest, 2)?;
    println!(
        "vm upgrade of a running {} MiB test guest (working set {} MiB), {} times:",
        args.memory, args.wss, args.reps
    );
    let mut downtimes = Vec::new();
    for _ in 0..args.reps {
        let started = Instant::now();
        let report = guest.upgrade()?;
        let total = started.elapsed();
        let pass = guest.progress()?.pass;
        wait_pass(&guest, pass + 1)?;
        println!(
            "  pid {} -> {}: downtime {:.3} ms (whole upgrade {:.1} ms)",
            report.old_pid,
            report.new_pid,
            report.downtime.as_secs_f64() * 1e3,
            total.as_secs_f64() * 1e3
        );
        downtimes.push(report.downtime);
    }
    downtimes.sort();
    println!(
        "downtime median {:.3} ms, worst {:.3} ms; no page copied (one memfd, handed over)",
        downtimes[downtimes.len() / 2].as_secs_f64() * 1e3,
        downtimes[downtimes.len() - 1].as_secs_f64() * 1e3
    );
    guest.discard();
    Ok(())
}
