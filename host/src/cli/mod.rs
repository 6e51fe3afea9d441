//! The `ferry` command line: argument definitions and dispatch.

use clap::{Parser, Subcommand};

pub mod bench;
pub mod bench_kvm;
pub mod bench_migrate;
pub mod bench_storage;
pub mod client;
pub mod cluster;
pub mod demo;
pub mod node;
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
    /// Manage VMs on the cluster's nodes, or run a test guest locally.
    #[command(subcommand)]
    Vm(vm::VmCommand),
    /// Move a running (or, with --cold, stopped) VM to another host.
    Migrate(client::MigrateArgs),
    /// Run this host's node.
    Node(node::NodeArgs),
    /// Set up a cluster: CA, certificates, config files.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
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
        Command::Migrate(args) => client::migrate(&args),
        Command::Node(args) => node::run(&args),
        Command::Cluster(cmd) => cluster::run(cmd),
    }
}
