//! The `ferry` command line: argument definitions and dispatch.

use clap::{Parser, Subcommand};

pub mod bench;
pub mod bench_kvm;
pub mod bench_migrate;
pub mod bench_storage;
pub mod bench_upgrade;
pub mod certs;
pub mod client;
pub mod cluster;
pub mod demo;
pub mod demo_guest;
pub mod drs;
pub mod history;
pub mod node;
pub mod ops;
pub mod progress;
pub mod thread_cpu;
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
    /// Move a running (or, with --cold, stopped) VM to another host; `show`
    /// and `list` tell what migrations did.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Migrate(MigrateCommand),
    /// Run this host's node; `stats` shows the nodes' migration metrics.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Node(NodeCommand),
    /// Set up a cluster: CA, certificates, config files.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// The nodes' migration jobs: list, cancel.
    #[command(subcommand)]
    Jobs(ops::JobsCommand),
    /// The nodes' audit logs: who did what, when, and how it ended.
    Audit(ops::AuditArgs),
    /// Rank the hosts a VM could move to, with the reasons.
    Recommend(ops::RecommendArgs),
    /// Balance the hosts' load: plan, or apply through the scheduler.
    #[command(subcommand)]
    Drs(drs::DrsCommand),
    /// Take a host out of service (maintenance, degraded) and back.
    #[command(subcommand)]
    Host(ops::HostCommand),
    /// Two nodes on loopback, a guest with a dirty working set, one live
    /// migration and its report.
    Demo(demo::DemoArgs),
    /// The process that runs one VM; a node starts it, not a user.
    #[command(hide = true)]
    Vmm(VmmArgs),
}

/// `ferry vmm`.
#[derive(Debug, clap::Args)]
pub struct VmmArgs {
    /// The control socket to listen on.
    #[arg(long)]
    pub socket: std::path::PathBuf,
}

/// `ferry migrate`: a migration, or one of its subcommands.
#[derive(Debug, clap::Args)]
pub struct MigrateCommand {
    /// `show` or `list`.
    #[command(subcommand)]
    pub action: Option<history::MigrateAction>,
    /// The migration to run.
    #[command(flatten)]
    pub run: client::MigrateArgs,
}

/// `ferry node`: run a node, or ask the nodes for their figures.
#[derive(Debug, clap::Args)]
pub struct NodeCommand {
    /// `stats`.
    #[command(subcommand)]
    pub action: Option<NodeAction>,
    /// The node to run.
    #[command(flatten)]
    pub run: node::NodeArgs,
}

/// `ferry node` subcommands.
#[derive(Debug, Subcommand)]
pub enum NodeAction {
    /// Migration metrics of the nodes: counts, bytes, downtime histogram,
    /// pages per round, what runs now.
    Stats(history::StatsArgs),
}

/// Runs a parsed command line (logging and telemetry included: `ferry
/// node` sets them up from its node file, every other command from the
/// environment).
pub fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Node(NodeCommand { action: None, run }) = &cli.command {
        return node::run(run);
    }
    if let Command::Vmm(args) = &cli.command {
        // Its log is its stderr (a file the node gave it).
        return crate::vmm::server::run(&args.socket);
    }
    let who = match cli.command {
        Command::Demo(_) => "demo",
        _ => "ferry-client",
    };
    let _telemetry = crate::telemetry::init(who, crate::telemetry::endpoint(None))?;
    dispatch(cli)
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Bench(cmd) => bench::run(cmd),
        Command::Vm(cmd) => vm::run(cmd),
        Command::Demo(args) => demo::run(&args),
        Command::Migrate(cmd) => match &cmd.action {
            Some(action) => history::run(action),
            None => client::migrate(&cmd.run),
        },
        Command::Node(cmd) => match &cmd.action {
            Some(NodeAction::Stats(args)) => history::stats(args),
            None => node::run(&cmd.run),
        },
        Command::Cluster(cmd) => cluster::run(cmd),
        Command::Jobs(cmd) => ops::jobs(&cmd),
        Command::Audit(args) => ops::audit(&args),
        Command::Recommend(args) => ops::recommend(&args),
        Command::Drs(cmd) => drs::drs(&cmd),
        Command::Host(cmd) => ops::host(&cmd),
        Command::Vmm(args) => crate::vmm::server::run(&args.socket),
    }
}
