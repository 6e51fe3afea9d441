//! Guests for this host: KVM ones running the built-in test workload
//! where `/dev/kvm` works, synthetic ones otherwise (or on request).

use std::sync::Arc;

use ferry_actors::guest::{GuestBackend, GuestError};
use ferry_actors::migration::{GuestKind, VmConfig};
use ferry_actors::node::factory::{GuestFactory, SyntheticFactory};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::kvm::image::GuestParams;
use crate::kvm::linux::LinuxImage;
use crate::kvm::pool::MemoryPool;
use crate::kvm::{self, KvmVm};

/// Makes KVM guests (if KVM works here) and synthetic ones.
#[derive(Debug, Clone)]
pub struct HostFactory {
    kvm: bool,
    pool: MemoryPool,
    refill: bool,
}

impl HostFactory {
    /// Probes `/dev/kvm`.
    pub fn probe() -> Self {
        Self {
            kvm: kvm::available().is_ok(),
            pool: MemoryPool::new(),
            refill: false,
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

    /// Synthetic guests only.
    pub fn synthetic_only() -> Self {
        Self {
            kvm: false,
            pool: MemoryPool::new(),
            refill: false,
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
                    cmdline: cmdline.clone(),
                };
                let vm = KvmVm::with_linux(&image, config.memory_bytes, config.vcpus)
                    .map_err(kvm_err("boot Linux guest"))?;
                Ok(Box::new(vm))
            }
            GuestKind::Synthetic { .. } => SyntheticFactory.boot(config),
        }
    }

    fn shadow(&self, config: &VmConfig) -> Result<Box<dyn GuestBackend>, GuestError> {
        match config.kind {
            GuestKind::Kvm { .. } | GuestKind::Linux { .. } => {
                if let Some(region) = self.pool.take(config.memory_bytes) {
                    if self.refill {
                        self.pool.refill(config.memory_bytes);
                    }
                    let vm = KvmVm::create_with_region(region, config.vcpus)
                        .map_err(kvm_err("create shadow VM"))?;
                    return Ok(Box::new(vm));
                }
                let vm = KvmVm::create(config.memory_bytes, config.vcpus)
                    .map_err(kvm_err("create shadow VM"))?;
                prepare_in_background(&vm);
                Ok(Box::new(vm))
            }
            GuestKind::Synthetic { .. } => SyntheticFactory.shadow(config),
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
fn prepare_in_background(vm: &KvmVm) {
    let memory = Arc::new(vm.memory().clone());
    let bytes = vm.memory_bytes();
    std::thread::spawn(move || {
        let Ok(host) = memory.get_host_address(GuestAddress(0)) else {
            return;
        };
        let Ok(len) = usize::try_from(bytes) else {
            return;
        };
        let started = std::time::Instant::now();
        // SAFETY: the whole guest memory mapping, kept alive by `memory`.
        if let Err(e) = unsafe { crate::kvm::pool::populate(host, len) } {
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
