//! `ferry demo`: two nodes on loopback, a guest with a dirty working set
//! (the Linux test guest where it is built), one live migration of its
//! memory and disk, a report with the guest's disk and network
//! continuity.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use ferry_actors::migration::MigrationReport;
use serde::Serialize;

use super::demo_guest::{self, Chosen, DemoGuest, DiskContinuity, NetWatch, NetworkReport};
use super::progress::ProgressBar;
use crate::node::factory::HostFactory;
use crate::node::local::{LocalCapacity, LocalCluster};

/// Options of `ferry demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Guest memory in MiB [default: 256 for the Linux guest, else 512].
    #[arg(long)]
    pub memory: Option<u64>,
    /// Working set the guest keeps rewriting, in MiB [default: 32 for the
    /// Linux guest, else 64].
    #[arg(long)]
    pub wss: Option<u64>,
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
    /// The guest: auto (the Linux test guest where `guest/linux/build.sh`
    /// built it, else the built-in test guest; synthetic without KVM),
    /// linux, test or synthetic.
    #[arg(long, value_enum, default_value = "auto")]
    pub guest: DemoGuest,
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
    /// `linux`, `kvm` (the built-in test guest) or `synthetic`.
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
    /// move, is on the destination's disk, and there was at least one
    /// (`None`: no disk; how many were checked is in `disk`).
    pub disk_verified: Option<bool>,
    /// The disk workload's acknowledged writes around the move (`None`:
    /// no disk).
    pub disk: Option<DiskContinuity>,
    /// The Linux guest's network across the migration, as a peer asking
    /// its UDP responder saw it (`None`: not measured).
    pub network: Option<NetworkReport>,
    /// The files written: report.txt, report.json, timeline.svg.
    pub files: Vec<std::path::PathBuf>,
}

/// Runs the demo.
pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    // Before the runtime's threads start: they share the guest's private
    // network namespace, if one is made.
    let say = |s: String| eprintln!("{s}");
    let chosen = demo_guest::choose(args.guest, args.wss.unwrap_or(32), &say)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut report = runtime.block_on(demo(args, chosen))?;
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
        if let Some(n) = &report.network {
            print_network(n, &report.migration.to);
        }
        if let (Some(ok), Some(d)) = (report.disk_verified, &report.disk) {
            println!(
                "  disk on {}: {} acknowledged writes before the move, {} by the end; every one {} ({} blocks checked)",
                report.migration.to,
                d.acked_before,
                d.acked_after,
                if ok { "present" } else { "NOT present" },
                d.verified_blocks
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

fn print_network(n: &NetworkReport, to: &str) {
    let first = match (n.first_answer_after_resume_ms, n.first_answer_wait_ms) {
        (Some(after), Some(wait)) => format!(
            "first answer {after:.0} ms after the resume on {to} \
             ({wait:.0} ms after a request was there to answer)"
        ),
        _ => format!("no answer came from {to} after its resume"),
    };
    println!(
        "  network: asked every {:.0} ms: {} of {} requests unanswered during the migration, \
         longest silence {:.0} ms, {first}",
        n.every_ms, n.unanswered, n.sent, n.longest_silence_ms
    );
}

async fn demo(args: &DemoArgs, chosen: Chosen) -> anyhow::Result<DemoReport> {
    let say = |s: String| {
        if !args.json {
            eprintln!("{s}");
        }
    };
    let linux = matches!(chosen, Chosen::Linux { .. });
    let memory = args.memory.unwrap_or(if linux { 256 } else { 512 });
    let wss = args.wss.unwrap_or(if linux { 32 } else { 64 });
    let net = match &chosen {
        Chosen::Linux { net, .. } => net.clone(),
        Chosen::Test | Chosen::Synthetic => None,
    };
    let factory = match chosen {
        Chosen::Synthetic => HostFactory::synthetic_only(),
        Chosen::Test | Chosen::Linux { .. } => {
            HostFactory::probe().with_bridge(net.as_ref().map(|n| n.bridge.clone()))
        }
    };
    let hosts = [
        ("host-a", LocalCapacity::default()),
        ("host-b", LocalCapacity::default()),
    ];
    let local = LocalCluster::start(&hosts, Arc::new(factory)).await?;
    let guest = chosen.name();
    say(format!(
        "two nodes on loopback (QUIC, mutual TLS): host-a, host-b; {guest} guest of {memory} MiB rewriting {wss} MiB"
    ));
    if args.disk_mib > 0 {
        say(format!(
            "its {} MiB disk (on host-a's datastore, a write workload running) moves to host-b's datastore by {} in the same switchover",
            args.disk_mib, args.method
        ));
    }
    let vm = "demo-vm";
    if let Chosen::Linux { image, .. } = &chosen {
        say("the Linux guest boots (under a minute here: its kernel code is emulated)...".into());
        local
            .start_linux_vm(
                "host-a",
                vm,
                memory,
                linux_spec(image, net.as_ref()),
                args.disk_mib,
            )
            .await?;
    } else {
        say("guest filling its memory...".into());
        local
            .start_vm_with_disk("host-a", vm, memory, wss, args.disk_mib)
            .await?;
    }
    let watch = match &net {
        Some(n) => {
            let w = NetWatch::start(n, Duration::from_secs(60)).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            Some(w)
        }
        None => None,
    };
    let acked_before = if args.disk_mib > 0 {
        say("waiting (up to 60 s) for the guest's first acknowledged disk write...".into());
        let acked = demo_guest::first_disk_writes(&local, vm, Duration::from_secs(60)).await?;
        if acked == 0 {
            let console = local.client.vm(vm).console().await.unwrap_or_default();
            anyhow::bail!(
                "the guest acknowledged no disk write within 60 s, so the demo cannot show \
                 that its disk moves whole (try --disk-mib 0 to leave the disk out); \
                 the guest's console ends:\n{}",
                demo_guest::console_tail(&console, 20)
            );
        }
        acked
    } else {
        0
    };
    let migration_started = crate::net::probe::unix_ms_now();
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
    let mut acked_after = acked_before;
    if migration.completed() {
        let before = local.guest_pass("host-b", vm).await?;
        for _ in 0..500 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if !guest_progressed {
                guest_progressed = local.guest_pass("host-b", vm).await? > before;
            }
            if args.disk_mib > 0 && acked_after <= acked_before {
                acked_after = demo_guest::disk_writes(&local, vm).await?;
            }
            if !mac_moved {
                mac_moved = local
                    .client
                    .mac_table("host-a")
                    .await?
                    .iter()
                    .any(|(_, h)| h == "host-b");
            }
            if guest_progressed && mac_moved && (args.disk_mib == 0 || acked_after > acked_before) {
                break;
            }
        }
    }
    let disk = if args.disk_mib > 0 && migration.completed() {
        let disks = local.client.vm(vm).disks(true).await?;
        Some(DiskContinuity::of(&disks, acked_before, acked_after))
    } else {
        None
    };
    let disk_verified = disk.as_ref().map(|d| d.verified);
    // The whole report, with the destination's side, as `ferry migrate
    // show` gives it.
    let migration = match local.client.migration(migration.migration_id).await {
        Ok(full) => full,
        Err(e) => {
            eprintln!("WARNING: the destination's side of the report is missing: {e}");
            migration
        }
    };
    let network = match watch {
        Some(w) => {
            // A second more, so the window shows the answers coming back.
            tokio::time::sleep(Duration::from_secs(1)).await;
            Some(w.finish(migration_started, &migration))
        }
        None => None,
    };
    Ok(DemoReport {
        files: Vec::new(),
        disk_verified,
        disk,
        guest,
        memory_mib: memory,
        wss_mib: wss,
        migration,
        guest_progressed,
        mac_moved,
        network,
    })
}

/// The Linux guest as the node boots it: the test guest's command line,
/// with its address when it has a network.
fn linux_spec(
    image: &crate::kvm::linux::LinuxImage,
    net: Option<&crate::net::private::PrivateNet>,
) -> ferry_actors::node::client::LinuxSpec {
    let mut cmdline = image.cmdline.clone();
    if let Some(n) = net {
        cmdline = format!("{cmdline} {}", demo_guest::guest_network_args(n));
    }
    // The disk writer rests between writes: each costs the guest's
    // emulated kernel a share of its one vCPU, which its network needs too.
    cmdline.push_str(" ferry_disk_gap=200");
    ferry_actors::node::client::LinuxSpec {
        kernel: image.kernel.display().to_string(),
        initrd: image.initrd.as_ref().map(|p| p.display().to_string()),
        cmdline,
    }
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
