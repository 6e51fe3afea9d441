//! `ferry bench …`: benchmarks that print figures.

use anyhow::Context;
use clap::{Args, Subcommand};
use ferry_transport::bench::{BenchOptions, BenchReport};
use ferry_transport::quic::{Congestion, LOOPBACK_MTU_BYTES, QuicTuning};

use crate::net::path::{NetPath, PathSpec};

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Page batches over QUIC (mutual TLS) between two endpoints, on
    /// loopback or a veth path.
    Transport(TransportArgs),
    /// KVM building blocks: fill, dirty log, pause, state save/restore.
    Kvm(super::bench_kvm::KvmArgs),
    /// Live migrations between two nodes, on loopback or a veth path.
    Migrate(super::bench_migrate::MigrateArgs),
    /// Storage moves by each method against a plain copy of the same file.
    Storage(super::bench_storage::StorageArgs),
    /// A running guest moved to a new VMM process (`vm upgrade`): downtime.
    Upgrade(super::bench_upgrade::UpgradeArgs),
}

/// Where a benchmark's two sides talk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PathKind {
    /// 127.0.0.1 (64 KiB datagrams, no rate limit).
    Loopback,
    /// Two network namespaces joined by a veth pair (root only).
    Veth,
}

/// The path options shared by `bench transport` and `bench migrate`.
#[derive(Debug, Clone, Args)]
pub struct PathArgs {
    /// Where the two sides talk.
    #[arg(long, value_enum, default_value_t = PathKind::Loopback)]
    pub path: PathKind,
    /// The veth pair's MTU (1500: Ethernet; 9000: jumbo frames).
    #[arg(long, default_value_t = 1500)]
    pub link_mtu: u16,
    /// Rate limit each way in Mbit/s (`htb` on the veth).
    #[arg(long)]
    pub rate_mbit: Option<u32>,
    /// Delay added each way in milliseconds (a user-space relay).
    #[arg(long, default_value_t = 0)]
    pub delay_ms: u64,
    /// Datagrams lost each way, in percent (a user-space relay).
    #[arg(long, default_value_t = 0.0)]
    pub loss_percent: f64,
}

impl PathArgs {
    /// The veth path asked for, or `None` for loopback.
    pub fn spec(&self) -> anyhow::Result<Option<PathSpec>> {
        let shaped = self.rate_mbit.is_some() || self.delay_ms > 0 || self.loss_percent > 0.0;
        match self.path {
            PathKind::Loopback if shaped => anyhow::bail!(
                "--rate-mbit, --delay-ms and --loss-percent shape a veth path: add --path veth"
            ),
            PathKind::Loopback => Ok(None),
            PathKind::Veth => {
                let spec = PathSpec {
                    link_mtu: self.link_mtu,
                    rate_mbit: self.rate_mbit,
                    one_way_delay: std::time::Duration::from_millis(self.delay_ms),
                    loss: self.loss_percent / 100.0,
                };
                spec.validate()?;
                Ok(Some(spec))
            }
        }
    }

    /// Builds the path (`None`: loopback).
    pub fn build(&self) -> anyhow::Result<Option<std::sync::Arc<NetPath>>> {
        let Some(spec) = self.spec()? else {
            return Ok(None);
        };
        let path = NetPath::build(spec).context("building the veth path")?;
        Ok(Some(std::sync::Arc::new(path)))
    }
}

/// A congestion controller, as `--congestion` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CongestionArg {
    /// Loss-based CUBIC.
    Cubic,
    /// Model-based BBR.
    Bbr,
}

impl From<CongestionArg> for Congestion {
    fn from(c: CongestionArg) -> Self {
        match c {
            CongestionArg::Cubic => Self::Cubic,
            CongestionArg::Bbr => Self::Bbr,
        }
    }
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
    /// UDP payload size (fixed, no MTU discovery or segmentation
    /// offload); 0 discovers from 1200. Default: 16000 on loopback,
    /// discovered on a veth path.
    #[arg(long)]
    pub mtu: Option<u16>,
    /// Congestion controller (default: CUBIC on loopback, BBR on a veth
    /// path).
    #[arg(long, value_enum)]
    pub congestion: Option<CongestionArg>,
    /// Runs; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Runtime worker threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// The path between the endpoints.
    #[command(flatten)]
    pub path: PathArgs,
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
    let path = args.path.build()?;
    let mut tuning = match &path {
        Some(p) => p.tuning(),
        None => QuicTuning {
            mtu_bytes: Some(LOOPBACK_MTU_BYTES),
            ..QuicTuning::default()
        },
    };
    if let Some(mtu) = args.mtu {
        tuning.mtu_bytes = (mtu != 0).then_some(mtu);
    }
    if let Some(c) = args.congestion {
        tuning.congestion = c.into();
    }
    let opts = BenchOptions {
        total_bytes: args.gib << 30,
        streams: args.streams,
        connections: args.connections,
        batch_pages: args.batch_pages,
        tuning: tuning.clone(),
        network: path
            .clone()
            .map(|p| p as std::sync::Arc<dyn ferry_transport::bench::BenchNetwork>),
        ..BenchOptions::default()
    };
    println!(
        "page batches over QUIC + mutual TLS on {}: {} GiB per run, {} streams, {} connection(s), {} pages/batch, MTU {}, {:?}",
        path.as_ref()
            .map_or("loopback".to_string(), |p| p.spec().describe()),
        args.gib,
        args.streams,
        args.connections.min(args.streams),
        args.batch_pages,
        tuning
            .mtu_bytes
            .map_or("discovered".to_string(), |m| m.to_string()),
        tuning.congestion
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
