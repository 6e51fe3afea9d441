//! Client commands: `ferry vm create/start/stop/delete/list` and
//! `ferry migrate`, spoken to the nodes over QUIC with a client certificate.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use ferry_actors::api::Cluster;
use ferry_actors::node::client::VmSpec;
use ferry_transport::quic::{QuicTransport, QuicTuning};

use super::progress::ProgressBar;
use crate::node::config::ClientConfig;

/// Which client file to use.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Client file (certificate and nodes), as `ferry cluster init` writes it.
    #[arg(long, env = "FERRY_CLIENT", default_value = "client.toml")]
    pub client: PathBuf,
    /// How long to wait for each node to take the connection, ms (all
    /// nodes are asked at once: a node that is down costs this once).
    #[arg(long, env = "FERRY_CONNECT_TIMEOUT_MS", default_value_t = 3000)]
    pub connect_timeout_ms: u64,
}

/// A VM name from the command line, refused before any node is asked.
fn vm_name(value: &str) -> Result<String, String> {
    ferry_actors::node::values::check_name("VM name", value)
        .map(|()| value.to_owned())
        .map_err(|e| e.to_string())
}

/// Options of `ferry vm create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// VM name: 1 to 64 letters, digits, '-', '_' or '.'.
    #[arg(value_parser = vm_name)]
    pub name: String,
    /// Node to create it on (default: the first in the client file).
    #[arg(long)]
    pub node: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    pub memory: u64,
    /// Working set the test workload rewrites, in MiB.
    #[arg(long, default_value_t = 64)]
    pub wss: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// CPU features the guest uses (comma-separated; default: the node's).
    #[arg(long, value_delimiter = ',', conflicts_with = "cpu_model")]
    pub cpu_features: Vec<String>,
    /// CPU model: `host` (every feature the node's KVM supports, the
    /// default) or `baseline` (the features every node of the cluster
    /// supports, as `ferry cluster cpu-baseline` prints: the VM can move
    /// to any of them).
    #[arg(long, value_parser = ["host", "baseline"])]
    pub cpu_model: Option<String>,
    /// Use the synthetic guest even where KVM works.
    #[arg(long)]
    pub synthetic: bool,
    /// A disk of this many MiB (repeat for more disks).
    #[arg(long = "disk-mib")]
    pub disk_mib: Vec<u64>,
    /// Datastore for the disks and the VM's home.
    #[arg(long, default_value = "local")]
    pub datastore: String,
    /// Run the synthetic disk workload (a verifiable write pattern) on the
    /// disks while the VM runs.
    #[arg(long)]
    pub disk_workload: bool,
    /// Boot this Linux kernel (an ELF vmlinux with a PVH entry; a path on
    /// the node's host) instead of the built-in test guest.
    #[arg(long)]
    pub kernel: Option<std::path::PathBuf>,
    /// The initramfs for --kernel.
    #[arg(long, requires = "kernel")]
    pub initrd: Option<std::path::PathBuf>,
    /// The kernel command line for --kernel (default: the one the
    /// project's test kernel needs on these machines).
    #[arg(long, requires = "kernel")]
    pub cmdline: Option<String>,
    /// The client file.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Options of commands that name one VM.
#[derive(Debug, Args)]
pub struct NameArgs {
    /// VM name.
    pub name: String,
    /// The client file.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Options of `ferry vm recover`.
#[derive(Debug, Args)]
pub struct RecoverArgs {
    /// VM name.
    pub name: String,
    /// Fence without an answer from the destination: its copy can never
    /// be taken for the newest, and the VM runs here again. Only when the
    /// destination host is gone for good (admin role).
    #[arg(long)]
    pub force: bool,
    /// The client file.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `ferry vm recover`: settles a VM in doubt.
pub fn recover(args: &RecoverArgs) -> anyhow::Result<()> {
    block_on(async {
        let cluster = connect(&args.client)?;
        let node = cluster.locate(&args.name).await?;
        eprintln!(
            "{}: {} on {node} …",
            args.name,
            if args.force {
                "fencing the other copy"
            } else {
                "asking the other host how the migration ended"
            }
        );
        cluster
            .request(
                &node,
                &ferry_actors::node::client::ClientRequest::RecoverVm {
                    vm: args.name.clone(),
                    force: args.force,
                },
                None,
            )
            .await?;
        println!(
            "{}: {}",
            args.name,
            if args.force {
                "it runs here; the other copy is fenced"
            } else {
                "settled (`ferry vm list` shows where it runs)"
            }
        );
        Ok(())
    })
}

/// Options of `ferry migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// VM name.
    #[arg(required_unless_present = "batch", conflicts_with = "batch")]
    pub vm: Option<String>,
    /// Destination host, or `auto` (placement picks the best; see `ferry
    /// recommend`).
    #[arg(long, required_unless_present = "batch", conflicts_with = "batch")]
    pub to: Option<String>,
    /// Queue priority: high, normal or low (a higher one takes a free slot
    /// first).
    #[arg(long, default_value = "normal")]
    pub priority: ferry_actors::ops::jobs::Priority,
    /// Run at this time instead of now, as a job of the VM's node (RFC
    /// 3339, e.g. 2026-12-01T02:00:00Z, or +DURATION such as +30m); the
    /// command returns at once. `ferry jobs list` follows it.
    #[arg(long, value_parser = super::ops::parse_time)]
    pub at: Option<u64>,
    /// Migrate every `VM HOST` line of FILE (HOST may be auto), continuing
    /// past failures, with a summary at the end.
    #[arg(long)]
    pub batch: Option<PathBuf>,
    /// With --batch: migrations at once (the nodes' budgets still apply).
    #[arg(long, default_value_t = 1, requires = "batch")]
    pub parallel: usize,
    /// Downtime budget in milliseconds.
    #[arg(long, default_value_t = 50)]
    pub downtime_ms: u64,
    /// Give up after this many seconds of pre-copy (the VM keeps running).
    #[arg(long, default_value_t = 120)]
    pub time_limit_s: u64,
    /// Never throttle the guest.
    #[arg(long)]
    pub no_auto_converge: bool,
    /// Cold migration of a stopped VM.
    #[arg(long)]
    pub cold: bool,
    /// Compare memory hashes before the destination resumes.
    #[arg(long)]
    pub verify: bool,
    /// Bulk streams.
    #[arg(long, default_value_t = 4)]
    pub lanes: u32,
    /// Move the disks too, to this datastore on the destination
    /// (shared-nothing migration, one switchover for memory and disks).
    /// Without it, the disks must be on a datastore both hosts share.
    #[arg(long)]
    pub datastore: Option<String>,
    /// How the disks are copied.
    #[command(flatten)]
    pub copy: CopyArgs,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// The client file.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// How disks are copied (`vm move-storage`, `migrate --datastore`).
#[derive(Debug, Args)]
pub struct CopyArgs {
    /// How the disks move: mirror, cbt or snapshot.
    #[arg(long, default_value = "mirror")]
    pub method: ferry_actors::storage::Method,
    /// Limit the disk copy to this many MB/s (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub rate_mb: u64,
    /// Send one disk elsewhere than --datastore: DISK=DATASTORE (repeat).
    #[arg(long = "disk-datastore", value_parser = disk_target)]
    pub disk_datastores: Vec<(String, String)>,
}

/// Options of `ferry vm move-storage`.
#[derive(Debug, Args)]
pub struct MoveStorageArgs {
    /// VM name.
    pub vm: String,
    /// Destination datastore (on the VM's host).
    #[arg(long)]
    pub datastore: String,
    /// How the disks are copied.
    #[command(flatten)]
    pub copy: CopyArgs,
    /// Print the reports as JSON.
    #[arg(long)]
    pub json: bool,
    /// The client file.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Options of `ferry vm disks`.
#[derive(Debug, Args)]
pub struct DisksArgs {
    /// VM name.
    pub vm: String,
    /// Check every acknowledged write of the synthetic disk workload.
    #[arg(long)]
    pub verify: bool,
    /// Print as JSON.
    #[arg(long)]
    pub json: bool,
    /// The client file.
    #[command(flatten)]
    pub client: ClientArgs,
}

fn disk_target(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((d, ds)) if !d.is_empty() && !ds.is_empty() => Ok((d.to_owned(), ds.to_owned())),
        _ => Err(format!(
            "{s:?}: expected DISK=DATASTORE, e.g. disk1=archive"
        )),
    }
}

/// `ferry vm move-storage`.
pub fn move_storage(args: &MoveStorageArgs) -> anyhow::Result<()> {
    let reports = block_on(async {
        let cluster = connect(&args.client)?;
        let quiet = args.json || !std::io::IsTerminal::is_terminal(&std::io::stderr());
        let mut shown = (String::new(), u64::MAX);
        let progress: Box<dyn FnMut(&ferry_actors::migration::Progress) + Send> =
            Box::new(move |p| {
                let done = 100 - p.pages_left * 100 / p.pages_total.max(1);
                if !quiet && (p.phase != shown.0 || done != shown.1) {
                    shown = (p.phase.clone(), done);
                    eprint!("\r{}: {done:>3}% copied   ", p.phase);
                }
            });
        let r = cluster
            .vm(&args.vm)
            .move_storage(
                &args.datastore,
                args.copy.method,
                args.copy.rate_mb,
                &args.copy.disk_datastores,
                Some(progress),
            )
            .await?;
        if !quiet {
            eprintln!();
        }
        Ok(r)
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        for r in &reports {
            println!("{}", disk_report_text(r));
        }
    }
    Ok(())
}

/// One disk move as a line.
pub fn disk_report_text(r: &ferry_actors::storage::DiskMoveReport) -> String {
    format!(
        "{} {} -> {} by {}: {:.1} MiB copied ({:.1} MiB of holes/zeros skipped) at {:.0} MB/s, {} rounds, {} mirrored writes, {} overlay blocks, pause {:.1} ms, total {:.0} ms",
        r.disk,
        r.from,
        r.to,
        r.method,
        r.copied_bytes as f64 / (1 << 20) as f64,
        r.skipped_bytes as f64 / (1 << 20) as f64,
        r.copy_mb_per_s,
        r.rounds,
        r.mirrored_writes,
        r.overlay_blocks,
        r.pause_ms,
        r.total_ms
    )
}

/// `ferry vm disks`.
pub fn disks(args: &DisksArgs) -> anyhow::Result<()> {
    let disks = block_on(async {
        let cluster = connect(&args.client)?;
        Ok(cluster.vm(&args.vm).disks(args.verify).await?)
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&disks)?);
        return Ok(());
    }
    println!(
        "{:<8} {:<10} {:<24} {:>8} {:>10} {:>12}  verified",
        "disk", "datastore", "path", "MiB", "writes", "workload"
    );
    let mut bad = false;
    for d in &disks {
        let verified = match (&d.verified_blocks, &d.verify_error) {
            (Some(n), _) => format!("{n} blocks ok"),
            (None, Some(e)) => {
                bad = true;
                format!("FAILED: {e}")
            }
            _ => "-".into(),
        };
        println!(
            "{:<8} {:<10} {:<24} {:>8} {:>10} {:>12}  {verified}",
            d.name,
            d.datastore,
            d.path,
            d.len_bytes >> 20,
            d.writes,
            d.workload_acked
        );
        if let Some(why) = &d.failing {
            println!("{:<8} WRITES FAILING: {why}", "");
        }
    }
    anyhow::ensure!(!bad, "an acknowledged write is missing");
    Ok(())
}

pub(crate) fn connect(args: &ClientArgs) -> anyhow::Result<Cluster<QuicTransport>> {
    let (config, creds) = ClientConfig::load(&args.client)?;
    let any = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
    let local = if config.nodes.iter().all(|n| n.addr.ip().is_loopback()) {
        std::net::SocketAddr::from(([127, 0, 0, 1], 0))
    } else {
        any
    };
    let transport = QuicTransport::bind(local, &creds, &QuicTuning::default())?;
    Ok(Cluster::new(
        Arc::new(transport),
        config
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.quic()))
            .collect(),
    )
    .with_connect_timeout(std::time::Duration::from_millis(
        args.connect_timeout_ms.max(1),
    )))
}

pub(crate) fn block_on<T>(
    f: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

/// The Linux kernel `args` name, as absolute paths (the node resolves
/// them on its host; a client on the same host means its own files).
fn linux_spec(args: &CreateArgs) -> anyhow::Result<Option<ferry_actors::node::client::LinuxSpec>> {
    let Some(kernel) = &args.kernel else {
        return Ok(None);
    };
    let absolute = |p: &std::path::Path| {
        std::path::absolute(p)
            .map(|p| p.display().to_string())
            .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
    };
    Ok(Some(ferry_actors::node::client::LinuxSpec {
        kernel: absolute(kernel)?,
        initrd: args.initrd.as_deref().map(absolute).transpose()?,
        cmdline: args
            .cmdline
            .clone()
            .unwrap_or_else(|| crate::kvm::linux::DEFAULT_CMDLINE.to_owned()),
    }))
}

/// Options of `ferry vm console`.
#[derive(Debug, Args)]
pub struct ConsoleArgs {
    /// VM name.
    pub name: String,
    /// Keep printing new output until interrupted; lines typed on stdin
    /// go to the guest.
    #[arg(long, short)]
    pub follow: bool,
    /// Type this line (a newline is added) into the console first.
    #[arg(long)]
    pub send: Option<String>,
    /// The client file.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// What `now` holds beyond `before`: the console tail slides, so find
/// where the end of the old output (its last 256 bytes) sits in the new.
fn new_output<'a>(before: &[u8], now: &'a [u8]) -> &'a [u8] {
    let probe = &before[before.len().saturating_sub(256)..];
    if probe.is_empty() {
        return now;
    }
    match now.windows(probe.len()).rposition(|w| w == probe) {
        Some(at) => &now[at + probe.len()..],
        None => now,
    }
}

/// `ferry vm console`.
pub fn console(args: &ConsoleArgs) -> anyhow::Result<()> {
    block_on(async {
        let cluster = connect(&args.client)?;
        let vm = cluster.vm(&args.name);
        if let Some(line) = &args.send {
            type_into(&vm, format!("{line}\n").as_bytes()).await?;
            // Give the guest a moment to answer before the output is read.
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
        let mut seen = vm.console().await?;
        let mut out = std::io::stdout();
        std::io::Write::write_all(&mut out, &seen)?;
        std::io::Write::flush(&mut out)?;
        if !args.follow {
            return Ok(());
        }
        let mut typed = stdin_lines();
        loop {
            while let Ok(line) = typed.try_recv() {
                type_into(&vm, &line).await?;
            }
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let now = match vm.console().await {
                Ok(now) => now,
                // Between hosts during a switchover: ask again.
                Err(_) => continue,
            };
            std::io::Write::write_all(&mut out, new_output(&seen, &now))?;
            std::io::Write::flush(&mut out)?;
            seen = now;
        }
    })
}

/// Types `bytes` into the VM's console, a FIFO-full at a time.
async fn type_into(
    vm: &ferry_actors::api::VmHandle<'_, QuicTransport>,
    mut bytes: &[u8],
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !bytes.is_empty() {
        let took = vm.console_input(bytes).await?;
        bytes = &bytes[took.min(bytes.len())..];
        if took == 0 {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the guest's console took no input for 10 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// Lines typed on stdin, read on a thread of their own.
fn stdin_lines() -> tokio::sync::mpsc::UnboundedReceiver<Vec<u8>> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(mut line) = line else { return };
            line.push('\n');
            if tx.send(line.into_bytes()).is_err() {
                return;
            }
        }
    });
    rx
}

/// `ferry vm upgrade`.
#[derive(Debug, clap::Args)]
pub struct UpgradeArgs {
    /// VM name.
    pub name: String,
    /// The client file.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `ferry vm upgrade`.
pub fn upgrade(args: &UpgradeArgs) -> anyhow::Result<()> {
    block_on(async {
        let cluster = connect(&args.client)?;
        let report = cluster.vm(&args.name).upgrade().await?;
        println!(
            "{} runs in VMM process {} now (was {}); downtime {:.3} ms, no page copied",
            args.name,
            report.new_pid,
            report.old_pid,
            report.downtime.as_secs_f64() * 1e3
        );
        Ok(())
    })
}

/// The CPU features every answering node supports, and the nodes that
/// did not answer.
pub(crate) async fn cpu_baseline(
    cluster: &Cluster<QuicTransport>,
) -> (std::collections::BTreeSet<String>, Vec<String>) {
    let mut hosts = Vec::new();
    let mut silent = Vec::new();
    for node in cluster.node_names() {
        match cluster.host_load(&node).await {
            Ok(load) => hosts.push(load.cpu_features.into_iter().collect()),
            Err(e) => {
                eprintln!("{node}: no answer: {e}");
                silent.push(node);
            }
        }
    }
    (crate::kvm::cpu::baseline(&hosts), silent)
}

/// `ferry cluster cpu-baseline`.
pub fn print_cpu_baseline(args: &ClientArgs) -> anyhow::Result<()> {
    block_on(async {
        let cluster = connect(args)?;
        let (baseline, silent) = cpu_baseline(&cluster).await;
        anyhow::ensure!(
            silent.len() < cluster.node_names().len(),
            "no node answered"
        );
        println!("{}", baseline.into_iter().collect::<Vec<_>>().join(","));
        anyhow::ensure!(
            silent.is_empty(),
            "partial baseline: {} did not answer",
            silent.join(", ")
        );
        Ok(())
    })
}

/// `ferry vm create`.
pub fn create(args: &CreateArgs) -> anyhow::Result<()> {
    block_on(async {
        let cluster = connect(&args.client)?;
        let node = match &args.node {
            Some(n) => n.clone(),
            None => cluster.node_names().first().cloned().unwrap_or_default(),
        };
        let cpu_features = if args.cpu_model.as_deref() == Some("baseline") {
            let (baseline, silent) = cpu_baseline(&cluster).await;
            anyhow::ensure!(
                silent.is_empty(),
                "the baseline needs every node, and {} did not answer",
                silent.join(", ")
            );
            baseline.into_iter().collect()
        } else {
            args.cpu_features.clone()
        };
        cluster
            .create_vm(
                &node,
                VmSpec {
                    name: args.name.clone(),
                    memory_mib: args.memory,
                    vcpus: args.vcpus,
                    wss_mib: args.wss,
                    synthetic: args.synthetic,
                    cpu_features,
                    disks: args
                        .disk_mib
                        .iter()
                        .map(|&size_mib| ferry_actors::node::client::DiskSpec {
                            size_mib,
                            datastore: args.datastore.clone(),
                        })
                        .collect(),
                    disk_workload: args.disk_workload,
                    linux: linux_spec(args)?,
                },
            )
            .await?;
        println!("{} created on {node} (stopped)", args.name);
        Ok(())
    })
}

/// `ferry vm start` / `stop` / `delete`.
pub fn lifecycle(args: &NameArgs, what: &str) -> anyhow::Result<()> {
    block_on(async {
        let cluster = connect(&args.client)?;
        let vm = cluster.vm(&args.name);
        match what {
            "start" => vm.start().await?,
            "stop" => vm.stop().await?,
            _ => {
                let node = cluster.locate(&args.name).await?;
                cluster
                    .request(
                        &node,
                        &ferry_actors::node::client::ClientRequest::DeleteVm(args.name.clone()),
                        None,
                    )
                    .await?;
            }
        }
        println!("{}: {what} done", args.name);
        Ok(())
    })
}

/// `ferry vm list`.
pub fn list(args: &ClientArgs) -> anyhow::Result<()> {
    block_on(async {
        let cluster = connect(args)?;
        println!(
            "{:<16} {:<10} {:<13} {:>8} {:>5} {:>4} {:>10}  mac",
            "name", "host", "phase", "MiB", "vCPU", "gen", "passes"
        );
        // Every node at once: a node that does not answer costs its
        // timeout once, not once per node before it.
        let nodes = cluster.node_names();
        let answers =
            futures::future::join_all(nodes.iter().map(|node| cluster.list_vms(node))).await;
        let mut silent = Vec::new();
        for (node, answer) in nodes.iter().zip(answers) {
            match answer {
                Ok(vms) => {
                    for v in vms {
                        println!(
                            "{:<16} {:<10} {:<13} {:>8} {:>5} {:>4} {:>10}  {}",
                            v.name,
                            v.host,
                            format!("{:?}", v.phase),
                            v.memory_bytes >> 20,
                            v.vcpus,
                            v.generation,
                            v.guest_pass,
                            v.mac
                        );
                        if !v.in_doubt.is_empty() {
                            println!("{:<16} in doubt: {}", "", v.in_doubt);
                        }
                        if !v.crashed.is_empty() {
                            println!("{:<16} crashed: {}", "", v.crashed);
                        }
                        if !v.disks_failing.is_empty() {
                            println!("{:<16} disk writes failing: {}", "", v.disks_failing);
                        }
                    }
                }
                Err(e) => {
                    eprintln!("{node}: unreachable: {e}");
                    silent.push(node.as_str());
                }
            }
        }
        anyhow::ensure!(
            silent.len() < nodes.len(),
            "no node answered ({})",
            silent.join(", ")
        );
        if !silent.is_empty() {
            eprintln!(
                "partial list: {} of {} nodes did not answer ({})",
                silent.len(),
                nodes.len(),
                silent.join(", ")
            );
        }
        Ok(())
    })
}

/// `ferry migrate`.
pub fn migrate(args: &MigrateArgs) -> anyhow::Result<()> {
    if let Some(file) = &args.batch {
        return super::ops::batch(args, file);
    }
    let (Some(vm), Some(to)) = (&args.vm, &args.to) else {
        anyhow::bail!("ferry migrate: name the VM and --to HOST");
    };
    if let Some(at) = args.at {
        return super::ops::schedule(args, vm, to, at);
    }
    let report = block_on(async {
        let cluster = connect(&args.client)?;
        let bar = ProgressBar::new(args.json);
        let progress = bar.clone();
        let report = cluster
            .vm(vm)
            .migrate_to(to)
            .options(migrate_options(args))
            .on_progress(move |p| progress.update(p))
            .await?;
        bar.finish();
        // The whole report, with the destination's side (its phases and
        // the moment it resumed), as `ferry migrate show` gives it.
        Ok(cluster
            .migration(report.migration_id)
            .await
            .unwrap_or(report))
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", report.to_text());
    }
    anyhow::ensure!(report.completed(), "the migration did not complete");
    Ok(())
}

/// The options `args` ask for.
pub(crate) fn migrate_options(args: &MigrateArgs) -> ferry_actors::node::client::MigrateOptions {
    let storage = args.datastore.is_some();
    ferry_actors::node::client::MigrateOptions {
        downtime_ms: args.downtime_ms,
        time_limit_s: args.time_limit_s,
        auto_converge: !args.no_auto_converge,
        lanes: args.lanes,
        verify_memory: args.verify,
        cold: args.cold,
        datastore: args.datastore.clone().unwrap_or_default(),
        method: args.copy.method,
        disk_rate_mb_per_s: if storage { args.copy.rate_mb } else { 0 },
        disk_datastores: if storage {
            args.copy.disk_datastores.clone()
        } else {
            Vec::new()
        },
        priority: args.priority,
        at_unix_ms: args.at.unwrap_or(0),
    }
}

#[cfg(test)]
mod console_tests {
    use super::new_output;

    #[test]
    fn only_what_came_after_the_last_look_is_new() {
        assert_eq!(new_output(b"", b"abc"), b"abc");
        assert_eq!(new_output(b"pass 1\n", b"pass 1\npass 2\n"), b"pass 2\n");
        // The tail slid: its start is gone.
        let before: Vec<u8> = (0..1000u32)
            .flat_map(|i| format!("{i}\n").into_bytes())
            .collect();
        let mut now = before[100..].to_vec();
        now.extend_from_slice(b"new\n");
        assert_eq!(new_output(&before, &now), b"new\n");
        assert_eq!(new_output(b"pass 1\n", b"pass 1\n"), b"");
    }
}
