//! Guests for this host: KVM ones running the built-in test workload
//! where `/dev/kvm` works, synthetic ones otherwise (or on request).

use ferry_actors::guest::{GuestBackend, GuestError};
use ferry_actors::migration::{GuestKind, VmConfig};
use ferry_actors::node::factory::{GuestFactory, Reattach, SyntheticFactory};

use crate::kvm::image::GuestParams;
use crate::kvm::linux::LinuxImage;
use crate::kvm::pool::MemoryPool;
use crate::kvm::{self, KvmVm};
use crate::vmm::proto::{Boot, DeviceSpec, NicSpec};
use crate::vmm::{VmmGuest, VmmHome};

/// Makes KVM guests (if KVM works here) and synthetic ones.
#[derive(Debug, Clone)]
pub struct HostFactory {
    kvm: bool,
    pool: MemoryPool,
    refill: bool,
    vmms: Option<VmmHome>,
    /// The bridge guests' NICs join (the node file's `bridge`).
    bridge: Option<String>,
}

impl HostFactory {
    /// Probes `/dev/kvm`.
    pub fn probe() -> Self {
        Self {
            kvm: kvm::available().is_ok(),
            pool: MemoryPool::new(),
            refill: false,
            vmms: None,
            bridge: None,
        }
    }

    /// Keeps one region of each of `sizes_mib` faulted in for incoming
    /// guests of that size, refilled (at low priority) after each use.
    pub fn with_pool(mut self, sizes_mib: &[u64]) -> Self {
        for mib in sizes_mib {
            self.pool.prepare(mib << 20);
        }
        self.refill = !sizes_mib.is_empty();
        self
    }

    /// Runs each KVM guest in a VMM process of its own, with its socket
    /// and logs in `home` (without this, KVM guests run inside the
    /// calling process, as in-process tests and benchmarks want).
    pub fn with_vmms(mut self, home: VmmHome) -> Self {
        self.vmms = Some(home);
        self
    }

    /// Puts the NICs of Linux guests on `bridge` (without one they have
    /// no cable).
    pub fn with_bridge(mut self, bridge: Option<String>) -> Self {
        self.bridge = bridge;
        self
    }

    /// Synthetic guests only.
    pub fn synthetic_only() -> Self {
        Self {
            kvm: false,
            pool: MemoryPool::new(),
            refill: false,
            vmms: None,
            bridge: None,
        }
    }

    /// The pool shadows take their memory from when it has the size.
    pub fn pool(&self) -> &MemoryPool {
        &self.pool
    }
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm::KvmError) -> GuestError {
    move |e| GuestError::Backend {
        op,
        reason: e.to_string(),
    }
}

impl GuestFactory for HostFactory {
    fn boot(&self, config: &VmConfig) -> Result<Box<dyn GuestBackend>, GuestError> {
        if let (Some(home), Some(boot)) = (&self.vmms, vmm_boot(config)) {
            let memory =
                kvm::shared_memory(config.memory_bytes).map_err(kvm_err("guest memory"))?;
            let guest = VmmGuest::start_with_model(
                home,
                &config.name,
                boot,
                config.vcpus,
                cpu_model(config)?,
                virtio_devices(config, self.bridge.as_deref()),
                memory,
            )?;
            return Ok(Box::new(guest));
        }
        match config.kind {
            GuestKind::Kvm { wss_bytes } => {
                let params = GuestParams::new(config.memory_bytes >> 20, wss_bytes >> 20);
                let vm = KvmVm::with_test_guest(&params, config.vcpus)
                    .map_err(kvm_err("create KVM guest"))?;
                Ok(Box::new(vm))
            }
            GuestKind::Linux {
                ref kernel,
                ref initrd,
                ref cmdline,
            } => {
                let image = LinuxImage {
                    kernel: kernel.into(),
                    initrd: initrd.as_ref().map(Into::into),
                    cmdline: linux_cmdline(config, cmdline),
                };
                let memory = kvm::shared_memory(config.memory_bytes)
                    .and_then(kvm::memory_of)
                    .map_err(kvm_err("guest memory"))?;
                let vm = KvmVm::with_linux_on(
                    memory,
                    &image,
                    config.vcpus,
                    None,
                    local_devices(config, self.bridge.as_deref())?,
                )
                .map_err(kvm_err("boot Linux guest"))?;
                Ok(Box::new(vm))
            }
            GuestKind::Synthetic { .. } => SyntheticFactory.boot(config),
        }
    }

    fn shadow(&self, config: &VmConfig) -> Result<Box<dyn GuestBackend>, GuestError> {
        if matches!(config.kind, GuestKind::Synthetic { .. }) {
            return SyntheticFactory.shadow(config);
        }
        let pooled = self.pool.take(config.memory_bytes);
        if pooled.is_some() && self.refill {
            self.pool.refill(config.memory_bytes);
        }
        if let Some(home) = &self.vmms {
            let memory = match pooled {
                Some(region) => region,
                None => {
                    let region =
                        kvm::shared_memory(config.memory_bytes).map_err(kvm_err("guest memory"))?;
                    prepare_in_background(&region);
                    region
                }
            };
            let guest = VmmGuest::start_with_model(
                home,
                &config.name,
                Boot::Blank,
                config.vcpus,
                None,
                virtio_devices(config, self.bridge.as_deref()),
                memory,
            )?;
            return Ok(Box::new(guest));
        }
        let region = match pooled {
            Some(region) => region,
            None => {
                let region =
                    kvm::shared_memory(config.memory_bytes).map_err(kvm_err("guest memory"))?;
                prepare_in_background(&region);
                region
            }
        };
        let mut vm =
            KvmVm::create_with_region(region, config.vcpus).map_err(kvm_err("create shadow VM"))?;
        vm.attach_devices(local_devices(config, self.bridge.as_deref())?)
            .map_err(kvm_err("create shadow VM"))?;
        Ok(Box::new(vm))
    }

    fn reattach(&self, config: &VmConfig) -> Reattach {
        let (Some(home), Some(_)) = (&self.vmms, vmm_boot(config)) else {
            return Reattach::NotKept;
        };
        match VmmGuest::attach(home, &config.name) {
            Ok(Some(guest)) => Reattach::Running(Box::new(guest)),
            Ok(None) => Reattach::Lost(format!(
                "no VMM process serves {} (it exited or was killed while the node was down; its log: {})",
                home.socket(&config.name).display(),
                home.log(&config.name).display()
            )),
            Err(e) => Reattach::Lost(format!("its VMM process does not answer properly: {e}")),
        }
    }

    fn kvm(&self) -> bool {
        self.kvm
    }
}

/// Faults the shadow's memory in on a thread of its own while the first
/// round arrives: first touch of cold memory is slow on these machines
/// and must not sit on the receive path. Pages the lanes write first are
/// simply already present when the populate reaches them.
fn prepare_in_background(region: &vm_memory::MmapRegion<vm_memory::bitmap::AtomicBitmap>) {
    let Some(file) = region.file_offset().and_then(|f| f.file().try_clone().ok()) else {
        return;
    };
    std::thread::spawn(move || {
        // A mapping of its own of the same memfd: faulting it in fills the
        // file's pages, which every mapping of it then finds present.
        let Ok(mapping) = kvm::map_shared(file) else {
            return;
        };
        let bytes = mapping.size();
        let started = std::time::Instant::now();
        // SAFETY: the whole mapping, owned by `mapping` until the end.
        if let Err(e) = unsafe { crate::kvm::pool::populate(mapping.as_ptr(), bytes) } {
            tracing::warn!("populating shadow memory: {e}");
            return;
        }
        tracing::debug!(
            mib = bytes >> 20,
            ms = started.elapsed().as_secs_f64() * 1e3,
            "shadow memory populated"
        );
    });
}

/// The CPU model of `config` (`None` when it names no feature:
/// everything KVM supports); a feature no model can hold is refused by
/// name.
fn cpu_model(config: &VmConfig) -> Result<Option<Vec<String>>, GuestError> {
    if let Some(unknown) = config.cpu_features.iter().find(|f| !kvm::cpu::is_known(f)) {
        return Err(GuestError::BadState(format!(
            "unknown CPU feature {unknown:?}; a CPU model holds these: {}",
            kvm::cpu::known().collect::<Vec<_>>().join(",")
        )));
    }
    Ok((!config.cpu_features.is_empty()).then(|| config.cpu_features.clone()))
}

/// The virtio devices a guest of `config` has: a Linux guest one disk per
/// disk of the VM, in its order (the node serves their blocks), and a NIC
/// with the VM's MAC, on `bridge` (without one, the NIC has no cable:
/// every host gives the VM the same devices, so its state fits
/// anywhere); the built-in test guest and synthetic guests none.
fn virtio_devices(config: &VmConfig, bridge: Option<&str>) -> DeviceSpec {
    match config.kind {
        GuestKind::Linux { .. } => DeviceSpec {
            disks: config.disks.iter().map(|d| d.len_bytes).collect(),
            nic: Some(NicSpec {
                mac: config.mac,
                bridge: bridge.map(str::to_owned),
            }),
        },
        GuestKind::Kvm { .. } | GuestKind::Synthetic { .. } => DeviceSpec::default(),
    }
}

/// [`virtio_devices`] made here (in-process guests): the NIC's tap is
/// named after the VM's MAC and a count of this process's taps (two
/// in-process hosts hold the same VM's source and shadow at once).
fn local_devices(config: &VmConfig, bridge: Option<&str>) -> Result<kvm::Devices, GuestError> {
    let spec = virtio_devices(config, bridge);
    let nic = match spec.nic {
        Some(n) => {
            let m = n.mac;
            static TAPS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let count = TAPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 10_000_000;
            let tap = format!("fy{:02x}{:02x}{:02x}{count}", m[3], m[4], m[5]);
            Some(kvm::Nic::on(n.mac, n.bridge.as_deref(), &tap).map_err(kvm_err("NIC"))?)
        }
        None => None,
    };
    Ok(kvm::Devices {
        disks: spec.disks,
        nic,
    })
}

/// The command line a Linux guest of `config` boots with: its own, plus
/// `ferry_disk=vda` when its first disk runs the verifiable write
/// workload (the test guest's disk writer then writes it).
fn linux_cmdline(config: &VmConfig, cmdline: &str) -> String {
    match config.disks.first() {
        Some(d) if d.workload && !cmdline.contains("ferry_disk=") => {
            format!("{cmdline} ferry_disk=vda")
        }
        _ => cmdline.to_owned(),
    }
}

/// What a VMM boots for a guest of `config`; `None` for synthetic guests,
/// which live in the node.
fn vmm_boot(config: &VmConfig) -> Option<Boot> {
    match &config.kind {
        GuestKind::Kvm { wss_bytes } => Some(Boot::TestGuest {
            wss_mib: wss_bytes >> 20,
        }),
        GuestKind::Linux {
            kernel,
            initrd,
            cmdline,
        } => Some(Boot::Linux {
            kernel: kernel.into(),
            initrd: initrd.as_ref().map(Into::into),
            cmdline: linux_cmdline(config, cmdline),
        }),
        GuestKind::Synthetic { .. } => None,
    }
}
