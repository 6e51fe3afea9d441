//! The `ferry` command line: argument definitions and dispatch.

use clap::{Parser, Subcommand};

pub mod bench;
pub mod bench_kvm;
pub mod bench_migrate;
pub mod demo;
pub mod progress;
pub mod vm;

/// ferry: live migration of KVM virtual machines and their disks.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Measure ferry's building blocks on this machine.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Run and inspect guests on this host's KVM.
    #[command(subcommand)]
    Vm(vm::VmCommand),
    /// Two nodes on loopback, a guest with a dirty working set, one live
    /// migration and its report.
    Demo(demo::DemoArgs),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Bench(cmd) => bench::run(cmd),
        Command::Vm(cmd) => vm::run(cmd),
        Command::Demo(args) => demo::run(&args),
    }
}
