//! `ferry bench migrate`: live migrations between two nodes, on loopback or
//! over a veth path (MTU, rate, delay, loss), with medians.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use ferry_actors::migration::MigrationReport;

use super::thread_cpu::ThreadCpu;
use crate::net::path::NetPath;
use crate::node::factory::HostFactory;
use crate::node::local::{LocalCapacity, LocalCluster, LocalNetwork};

/// Options of `ferry bench migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Guest memory in MiB (random-filled by the guest).
    #[arg(long, default_value_t = 4096)]
    pub memory: u64,
    /// Working set the guest rewrites at full speed, in MiB (0: idle).
    #[arg(long, default_value_t = 0)]
    pub wss: u64,
    /// Runs; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Downtime budget in milliseconds.
    #[arg(long, default_value_t = 50)]
    pub downtime_ms: u64,
    /// Bulk streams.
    #[arg(long, default_value_t = 4)]
    pub lanes: u32,
    /// Use the synthetic guest even where KVM works.
    #[arg(long)]
    pub synthetic: bool,
    /// Compare memory hashes at the switchover (costs CPU while pages land).
    #[arg(long)]
    pub verify: bool,
    /// Do not keep destination memory faulted in ahead (first touch then
    /// happens while pages arrive).
    #[arg(long)]
    pub no_pool: bool,
    /// The path between the two nodes.
    #[command(flatten)]
    pub path: super::bench::PathArgs,
}

/// One run's figures.
struct Run {
    report: MigrationReport,
    /// The nodes' CPU seconds (both sides; guest vCPUs and relay left out).
    cpu_seconds: f64,
}

impl Run {
    fn cpu_s_per_gb(&self) -> f64 {
        self.cpu_seconds / (self.report.mb_sent() / 1e3).max(1e-9)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the benchmark.
pub fn run(args: &MigrateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let path = args.path.build()?;
    let runs = runtime.block_on(bench(args, path.clone()))?;
    let reports: Vec<&MigrationReport> = runs.iter().map(|r| &r.report).collect();
    println!(
        "median of {}: total {:.0} ms, downtime {:.2} ms, {:.0} MB/s, {:.2} CPU-s/GB, {} rounds, {:.0} MB sent",
        reports.len(),
        median(reports.iter().map(|r| r.total_ms).collect()),
        median(reports.iter().map(|r| r.downtime_ms).collect()),
        median(reports.iter().map(|r| r.throughput_mb_s).collect()),
        median(runs.iter().map(Run::cpu_s_per_gb).collect()),
        median(reports.iter().map(|r| f64::from(r.rounds)).collect()),
        median(reports.iter().map(|r| r.mb_sent()).collect()),
    );
    if let Some(p) = &path
        && p.spec().impaired()
    {
        println!("relay dropped {} datagrams in all", p.dropped());
    }
    Ok(())
}

async fn bench(args: &MigrateArgs, path: Option<Arc<NetPath>>) -> anyhow::Result<Vec<Run>> {
    let factory = if args.synthetic {
        HostFactory::synthetic_only()
    } else {
        HostFactory::probe()
    };
    let hosts = [
        ("host-a", LocalCapacity::default()),
        ("host-b", LocalCapacity::default()),
    ];
    let pool = factory.pool().clone();
    let memory_bytes = args.memory << 20;
    let network = path
        .clone()
        .map_or(LocalNetwork::Loopback, LocalNetwork::Path);
    let local = LocalCluster::start_on(&hosts, Arc::new(factory), &network).await?;
    println!(
        "{} guest, {} MiB, working set {} MiB, budget {} ms, {} lanes, on {}",
        if local.kvm { "KVM" } else { "synthetic" },
        args.memory,
        args.wss,
        args.downtime_ms,
        args.lanes,
        path.as_ref()
            .map_or("loopback".to_owned(), |p| p.spec().describe()),
    );
    let mut reports = Vec::new();
    for run in 0..args.runs {
        if !args.no_pool && local.kvm {
            // The destination keeps memory for the incoming guest faulted
            // in ahead (as QEMU's comparison figure preallocates it); it is
            // prepared while the source guest fills its memory.
            pool.prepare(memory_bytes);
        }
        let vm = format!("bench-{run}");
        local.start_vm("host-a", &vm, args.memory, args.wss).await?;
        if !args.no_pool && local.kvm {
            let pool = pool.clone();
            tokio::task::spawn_blocking(move || {
                pool.wait_ready(memory_bytes, Duration::from_secs(300))
            })
            .await?;
        }
        let cpu_before = ThreadCpu::sample();
        let r = local
            .client
            .vm(&vm)
            .migrate_to("host-b")
            .downtime_ms(args.downtime_ms)
            .lanes(args.lanes)
            .verify_memory(args.verify)
            .await?;
        let cpu_seconds = ThreadCpu::sample().migration_since(&cpu_before);
        let run_figures = Run {
            report: r.clone(),
            cpu_seconds,
        };
        println!(
            "run {run}: {:?}, total {:.0} ms, downtime {:.2} ms (predicted {:.2}), {:.0} MB/s, {:.2} CPU-s/GB, {} rounds, throttle max {}%",
            r.outcome,
            r.total_ms,
            r.downtime_ms,
            r.predicted_downtime_ms,
            r.throughput_mb_s,
            run_figures.cpu_s_per_gb(),
            r.rounds,
            r.throttle_max_percent
        );
        if let Some(floor) = r.phases.iter().find(|p| p.name == "budget_below_link") {
            println!(
                "  the budget is below this link's floor: {:?}",
                floor.figures
            );
        }
        let node = if r.completed() { "host-b" } else { "host-a" };
        local.client.vm(&vm).stop().await?;
        local
            .client
            .request(
                node,
                &ferry_actors::node::client::ClientRequest::DeleteVm(vm.clone()),
                None,
            )
            .await?;
        reports.push(run_figures);
    }
    Ok(reports)
}
