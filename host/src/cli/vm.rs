//! `ferry vm …`: VMs on the cluster's nodes (client commands), and the
//! built-in test guest on this host's KVM (`run`, `image`).

use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::kvm::image::{self, GuestParams};
use crate::kvm::{self, KvmVm};

/// VM commands.
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Define a VM on a node (memory allocated, workload loaded, stopped).
    Create(super::client::CreateArgs),
    /// Run a VM's vCPUs.
    Start(super::client::NameArgs),
    /// Stop a VM's vCPUs (its memory stays).
    Stop(super::client::NameArgs),
    /// Remove a stopped VM (refused while it is in doubt).
    Delete(super::client::NameArgs),
    /// Settle a VM in doubt (a migration away whose end is unknown): ask
    /// its destination again, or with --force fence the other copy.
    Recover(super::client::RecoverArgs),
    /// The VMs on every node.
    List(super::client::ClientArgs),
    /// Move a VM's disks to another datastore of its host while it runs
    /// (Storage vMotion).
    MoveStorage(super::client::MoveStorageArgs),
    /// A VM's disks (with --verify: check every acknowledged write of the
    /// synthetic disk workload).
    Disks(super::client::DisksArgs),
    /// A VM's serial console output (Linux guests), from whichever host
    /// runs it; with --follow, new output as it comes, across migrations.
    Console(super::client::ConsoleArgs),
    /// Move a running VM to a new VMM process on its host (after the
    /// ferry binary was upgraded): memory is shared, not copied; prints
    /// the downtime.
    Upgrade(super::client::UpgradeArgs),
    /// Run the built-in test guest and show its progress.
    Run(RunArgs),
    /// Write the built-in test guest as a flat boot image (load at 0x7c00,
    /// enter in real mode at 0000:7c00; QEMU can run it too).
    Image(ImageArgs),
}

/// The guest's shape and workload.
#[derive(Debug, Args)]
pub struct GuestArgs {
    /// Guest memory in MiB (a multiple of 2, at most 65536).
    #[arg(long, default_value_t = 1024)]
    pub memory: u64,
    /// Working set the guest keeps dirtying, in MiB (0: idle after the fill).
    #[arg(long, default_value_t = 64)]
    pub wss: u64,
    /// Spin iterations after each page write (0: full speed).
    #[arg(long, default_value_t = 0)]
    pub delay: u64,
    /// Seed of the fill data.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

impl GuestArgs {
    /// The guest parameters, checked.
    pub fn params(&self) -> anyhow::Result<GuestParams> {
        let mut p = GuestParams::new(self.memory, self.wss);
        p.delay_loops = self.delay;
        p.seed = self.seed;
        p.check()?;
        Ok(p)
    }
}

/// Options of `ferry vm run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Guest shape and workload.
    #[command(flatten)]
    pub guest: GuestArgs,
    /// vCPUs (the test guest runs on vCPU 0; others wait for a SIPI).
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Stop after this many seconds (default: run until interrupted).
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Run this flat binary instead of the built-in guest (loaded at 0x7c00,
    /// entered in real mode at 0000:7c00; `--memory` sets the VM's memory,
    /// and progress is read from the built-in guest's status block).
    #[arg(long)]
    pub image: Option<std::path::PathBuf>,
}

/// Options of `ferry vm image`.
#[derive(Debug, Args)]
pub struct ImageArgs {
    /// Guest shape and workload written into the image's parameter block.
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Output file.
    #[arg(long)]
    pub out: std::path::PathBuf,
}

/// Runs a VM command.
pub fn run(cmd: VmCommand) -> anyhow::Result<()> {
    match cmd {
        VmCommand::Create(args) => super::client::create(&args),
        VmCommand::Start(args) => super::client::lifecycle(&args, "start"),
        VmCommand::Stop(args) => super::client::lifecycle(&args, "stop"),
        VmCommand::Delete(args) => super::client::lifecycle(&args, "delete"),
        VmCommand::List(args) => super::client::list(&args),
        VmCommand::Recover(args) => super::client::recover(&args),
        VmCommand::MoveStorage(args) => super::client::move_storage(&args),
        VmCommand::Disks(args) => super::client::disks(&args),
        VmCommand::Console(args) => super::client::console(&args),
        VmCommand::Upgrade(args) => super::client::upgrade(&args),
        VmCommand::Run(args) => run_guest(&args),
        VmCommand::Image(args) => {
            let image = image::build(&args.guest.params()?)
                .map_err(|e| anyhow::anyhow!("assemble the guest: {e}"))?;
            std::fs::write(&args.out, &image)
                .with_context(|| format!("write {}", args.out.display()))?;
            println!(
                "wrote {} ({} bytes): load at {:#x}, enter in real mode at 0000:{:04x}",
                args.out.display(),
                image.len(),
                image::LOAD_ADDR,
                image::LOAD_ADDR
            );
            Ok(())
        }
    }
}

fn run_guest(args: &RunArgs) -> anyhow::Result<()> {
    kvm::available().context("ferry vm run needs KVM")?;
    let params = args.guest.params()?;
    let started = Instant::now();
    let vm = match &args.image {
        None => KvmVm::with_test_guest(&params, args.vcpus)?,
        Some(path) => {
            let image = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
            let room = params.memory_bytes - image::LOAD_ADDR;
            anyhow::ensure!(
                !image.is_empty() && (image.len() as u64) <= room,
                "{}: {} bytes does not fit between 0x7c00 and the end of guest memory",
                path.display(),
                image.len()
            );
            let vm = KvmVm::create(params.memory_bytes, args.vcpus)?;
            vm.load(image::LOAD_ADDR, &image)?;
            vm
        }
    };
    vm.resume()?;
    println!(
        "guest: {} MiB memory, {} MiB working set, {} vCPU(s); filling memory...",
        args.guest.memory, args.guest.wss, args.vcpus
    );
    while !vm.port_reports().filled.load(Ordering::Relaxed) {
        check_guest(&vm)?;
        std::thread::sleep(Duration::from_millis(10));
    }
    let fill = started.elapsed();
    println!(
        "filled {} MiB in {:.2} s ({:.2} GiB/s, first touch included)",
        args.guest.memory,
        fill.as_secs_f64(),
        (args.guest.memory as f64 / 1024.0) / fill.as_secs_f64()
    );
    let until = args
        .seconds
        .map(|s| Instant::now() + Duration::from_secs(s));
    let wss_pages = (args.guest.wss << 20) / kvm::PAGE_BYTES;
    let mut last = (Instant::now(), vm.guest_pass()?);
    let mut stdout = std::io::stdout();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        check_guest(&vm)?;
        let now = (Instant::now(), vm.guest_pass()?);
        let passes = (now.1 - last.1) as f64 / (now.0 - last.0).as_secs_f64();
        write!(
            stdout,
            "\rpass {:>10}  {:>10.1} passes/s  {:>8.2} M page-writes/s  up {:>5} s",
            now.1,
            passes,
            passes * wss_pages as f64 / 1e6,
            started.elapsed().as_secs()
        )?;
        stdout.flush()?;
        last = now;
        if until.is_some_and(|u| Instant::now() >= u) {
            println!();
            break;
        }
    }
    let pause = vm.pause()?;
    println!(
        "paused in {:?} at pass {}; memory hash {:016x}",
        pause,
        vm.guest_pass()?,
        vm.memory_hash()?
    );
    Ok(())
}

fn check_guest(vm: &KvmVm) -> anyhow::Result<()> {
    if let Some(vector) = vm.guest_exception()? {
        anyhow::bail!("the guest took CPU exception {vector} and halted");
    }
    for status in vm.vcpu_status() {
        if let kvm::vcpu::VcpuStatus::Stopped(why) = status {
            anyhow::bail!("a vCPU stopped: {why}");
        }
    }
    Ok(())
}
