//! `ferry bench …`: benchmarks that print figures.

use clap::{Args, Subcommand};
use ferry_transport::bench::{BenchOptions, BenchReport};
use ferry_transport::quic::{LOOPBACK_MTU_BYTES, QuicTuning};

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Page batches over QUIC (mutual TLS) between two endpoints on loopback.
    Transport(TransportArgs),
    /// KVM building blocks: fill, dirty log, pause, state save/restore.
    Kvm(super::bench_kvm::KvmArgs),
    /// Live migrations between two nodes on loopback.
    Migrate(super::bench_migrate::MigrateArgs),
    /// Storage moves by each method against a plain copy of the same file.
    Storage(super::bench_storage::StorageArgs),
    /// A running guest moved to a new VMM process (`vm upgrade`): downtime.
    Upgrade(super::bench_upgrade::UpgradeArgs),
}

/// Options of `ferry bench transport`.
#[derive(Debug, Args)]
pub struct TransportArgs {
    /// GiB of page data to move per run.
    #[arg(long, default_value_t = 4)]
    pub gib: u64,
    /// Parallel bulk streams.
    #[arg(long, default_value_t = 4)]
    pub streams: usize,
    /// Connections between the two endpoints.
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// Pages per batch.
    #[arg(long, default_value_t = 256)]
    pub batch_pages: usize,
    /// UDP payload size (fixed, no MTU discovery); 0 discovers from 1200.
    #[arg(long, default_value_t = LOOPBACK_MTU_BYTES)]
    pub mtu: u16,
    /// Runs; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Runtime worker threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// Runs a benchmark command.
pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Transport(args) => transport(&args),
        BenchCommand::Kvm(args) => super::bench_kvm::run(&args),
        BenchCommand::Migrate(args) => super::bench_migrate::run(&args),
        BenchCommand::Storage(args) => super::bench_storage::run(&args),
        BenchCommand::Upgrade(args) => super::bench_upgrade::run(&args),
    }
}

fn transport(args: &TransportArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    anyhow::ensure!(
        (1..=4096).contains(&args.batch_pages),
        "--batch-pages must be between 1 and 4096"
    );
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.threads {
        runtime.worker_threads(n.max(1));
    }
    let runtime = runtime.enable_all().build()?;
    let opts = BenchOptions {
        total_bytes: args.gib << 30,
        streams: args.streams,
        connections: args.connections,
        batch_pages: args.batch_pages,
        tuning: QuicTuning {
            mtu_bytes: (args.mtu != 0).then_some(args.mtu),
            ..QuicTuning::default()
        },
        ..BenchOptions::default()
    };
    println!(
        "page batches over QUIC + mutual TLS on loopback: {} GiB per run, {} streams, {} connection(s), {} pages/batch, MTU {}",
        args.gib,
        args.streams,
        args.connections.min(args.streams),
        args.batch_pages,
        if args.mtu == 0 {
            "discovered".to_string()
        } else {
            args.mtu.to_string()
        }
    );
    let mut reports: Vec<BenchReport> = Vec::new();
    for i in 0..args.runs {
        let report = runtime
            .block_on(ferry_transport::bench::run(&opts))
            .map_err(|e| anyhow::anyhow!(e))?;
        anyhow::ensure!(report.verified, "destination memory differs from source");
        println!(
            "run {}: {:.2} GB/s, {:.2} CPU-s/GB (both ends), {:.2} s, wire overhead {:.2}%",
            i + 1,
            report.gb_per_s(),
            report.cpu_s_per_gb(),
            report.seconds,
            (report.wire_bytes as f64 / report.page_bytes as f64 - 1.0) * 100.0
        );
        reports.push(report);
    }
    reports.sort_by(|a, b| a.gb_per_s().total_cmp(&b.gb_per_s()));
    let median = &reports[reports.len() / 2];
    println!(
        "median: {:.2} GB/s, {:.2} CPU-s/GB, destination verified",
        median.gb_per_s(),
        median.cpu_s_per_gb()
    );
    Ok(())
}
