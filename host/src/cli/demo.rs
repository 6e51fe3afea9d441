//! `ferry demo`: two nodes on loopback, a guest with a dirty working set,
//! one live migration, a report.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use ferry_actors::migration::MigrationReport;
use serde::Serialize;

use super::progress::ProgressBar;
use crate::kvm;
use crate::node::factory::HostFactory;
use crate::node::local::{LocalCapacity, LocalCluster};

/// Options of `ferry demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    pub memory: u64,
    /// Working set the guest keeps rewriting, in MiB.
    #[arg(long, default_value_t = 64)]
    pub wss: u64,
    /// Downtime budget in milliseconds.
    #[arg(long, default_value_t = 50)]
    pub downtime_ms: u64,
    /// A disk of this many MiB that moves with the VM to host-b's
    /// datastore in the same switchover, under the disk workload (0: no
    /// disk, memory only).
    #[arg(long, default_value_t = 256)]
    pub disk_mib: u64,
    /// How the disk moves: mirror, cbt or snapshot.
    #[arg(long, default_value = "mirror")]
    pub method: ferry_actors::storage::Method,
    /// Use the synthetic guest even where KVM works.
    #[arg(long)]
    pub synthetic: bool,
    /// Print the report as JSON (and no progress).
    #[arg(long)]
    pub json: bool,
    /// Where the report (text and JSON) and the timeline chart go.
    #[arg(long, default_value = "ferry-demo")]
    pub out: std::path::PathBuf,
}

/// What `ferry demo --json` prints.
#[derive(Debug, Serialize)]
pub struct DemoReport {
    /// `kvm` or `synthetic`.
    pub guest: &'static str,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Working set in MiB.
    pub wss_mib: u64,
    /// The migration report (total_ms, downtime_ms, bytes_sent, rounds,
    /// memory_verified, …).
    #[serde(flatten)]
    pub migration: MigrationReport,
    /// The guest's pass counter advanced on the destination after resume.
    pub guest_progressed: bool,
    /// The source host's MAC table points at the destination.
    pub mac_moved: bool,
    /// Every write the disk workload acknowledged, before and after the
    /// move, is on the destination's disk (`None`: no disk).
    pub disk_verified: Option<bool>,
    /// The files written: report.txt, report.json, timeline.svg.
    pub files: Vec<std::path::PathBuf>,
}

/// Runs the demo.
pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut report = runtime.block_on(demo(args))?;
    report.files = write_files(&report.migration, &args.out)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", report.migration.to_text());
        println!(
            "  guest progressed on {}: {}, MAC {} now routed to {}",
            report.migration.to,
            if report.guest_progressed { "yes" } else { "NO" },
            if report.mac_moved { "is" } else { "is NOT" },
            report.migration.to
        );
        if let Some(ok) = report.disk_verified {
            println!(
                "  disk on {}: every acknowledged write {}",
                report.migration.to,
                if ok { "present" } else { "NOT present" }
            );
        }
        let names: Vec<String> = report
            .files
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        println!(
            "  report and timeline chart: {} (again with: ferry migrate show {:016x} --chart FILE, while the nodes run)",
            names.join(", "),
            report.migration.migration_id
        );
    }
    anyhow::ensure!(
        report.migration.completed(),
        "the migration did not complete"
    );
    anyhow::ensure!(
        report.disk_verified != Some(false),
        "an acknowledged disk write is missing"
    );
    Ok(())
}

async fn demo(args: &DemoArgs) -> anyhow::Result<DemoReport> {
    let say = |s: String| {
        if !args.json {
            eprintln!("{s}");
        }
    };
    let factory = if args.synthetic {
        HostFactory::synthetic_only()
    } else {
        match kvm::available() {
            Ok(()) => HostFactory::probe(),
            Err(e) => {
                eprintln!(
                    "WARNING: KVM is not usable here ({e}); the demo runs the synthetic guest instead"
                );
                HostFactory::synthetic_only()
            }
        }
    };
    let hosts = [
        ("host-a", LocalCapacity::default()),
        ("host-b", LocalCapacity::default()),
    ];
    let local = LocalCluster::start(&hosts, Arc::new(factory)).await?;
    let guest = if local.kvm { "kvm" } else { "synthetic" };
    say(format!(
        "two nodes on loopback (QUIC, mutual TLS): host-a, host-b; {guest} guest of {} MiB rewriting {} MiB",
        args.memory, args.wss
    ));
    if args.disk_mib > 0 {
        say(format!(
            "its {} MiB disk (on host-a's datastore, a write workload running) moves to host-b's datastore by {} in the same switchover",
            args.disk_mib, args.method
        ));
    }
    let vm = "demo-vm";
    say("guest filling its memory...".into());
    local
        .start_vm_with_disk("host-a", vm, args.memory, args.wss, args.disk_mib)
        .await?;
    let bar = ProgressBar::new(args.json);
    let progress = bar.clone();
    let migrate = local
        .client
        .vm(vm)
        .migrate_to("host-b")
        .downtime_ms(args.downtime_ms)
        .verify_memory(true);
    let migrate = if args.disk_mib > 0 {
        migrate.storage("local", args.method)
    } else {
        migrate
    };
    let migration = migrate.on_progress(move |p| progress.update(p)).await?;
    bar.finish();
    let mut guest_progressed = false;
    let mut mac_moved = false;
    if migration.completed() {
        let before = local.guest_pass("host-b", vm).await?;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if !guest_progressed {
                guest_progressed = local.guest_pass("host-b", vm).await? > before;
            }
            if !mac_moved {
                mac_moved = local
                    .client
                    .mac_table("host-a")
                    .await?
                    .iter()
                    .any(|(_, h)| h == "host-b");
            }
            if guest_progressed && mac_moved {
                break;
            }
        }
    }
    let disk_verified = if args.disk_mib > 0 && migration.completed() {
        let disks = local.client.vm(vm).disks(true).await?;
        Some(
            disks
                .iter()
                .all(|d| d.verify_error.is_none() && d.verified_blocks.is_some()),
        )
    } else {
        None
    };
    // The whole report, with the destination's side, as `ferry migrate
    // show` gives it.
    let migration = match local.client.migration(migration.migration_id).await {
        Ok(full) => full,
        Err(e) => {
            eprintln!("WARNING: the destination's side of the report is missing: {e}");
            migration
        }
    };
    Ok(DemoReport {
        files: Vec::new(),
        disk_verified,
        guest,
        memory_mib: args.memory,
        wss_mib: args.wss,
        migration,
        guest_progressed,
        mac_moved,
    })
}

/// Writes `report.txt`, `report.json` and `timeline.svg` into `dir`.
fn write_files(
    report: &MigrationReport,
    dir: &std::path::Path,
) -> anyhow::Result<Vec<std::path::PathBuf>> {
    use anyhow::Context;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let text = dir.join("report.txt");
    std::fs::write(&text, report.to_detail_text())
        .with_context(|| format!("writing {}", text.display()))?;
    let json = dir.join("report.json");
    std::fs::write(&json, serde_json::to_string_pretty(report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let chart = dir.join("timeline.svg");
    crate::chart::write_svg(report, &chart)?;
    Ok(vec![text, json, chart])
}
