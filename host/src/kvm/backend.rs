//! [`GuestBackend`] for KVM VMs: the trait `ferry-actors` migrates through.

use std::sync::Arc;
use std::time::Duration;

use ferry_actors::guest::{DirtyBitmap, GuestBackend, GuestError, GuestProgress, PAGE_BYTES};
use ferry_actors::ram::GuestRam;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::state::VmState;
use super::vcpu::VcpuStatus;
use super::{KvmError, KvmVm};

fn backend(op: &'static str) -> impl FnOnce(KvmError) -> GuestError {
    move |e| match e {
        KvmError::NotPaused => GuestError::NotPaused,
        KvmError::NotLogging => GuestError::NotLogging,
        KvmError::OutOfRange(addr) => GuestError::OutOfRange(addr / PAGE_BYTES),
        KvmError::BadState(reason) => GuestError::BadState(reason),
        other => GuestError::Backend {
            op,
            reason: other.to_string(),
        },
    }
}

impl KvmVm {
    fn page_addr(&self, gfn: u64) -> Result<GuestAddress, GuestError> {
        if gfn >= self.memory_bytes() / PAGE_BYTES {
            return Err(GuestError::OutOfRange(gfn));
        }
        Ok(GuestAddress(gfn * PAGE_BYTES))
    }
}

impl GuestBackend for KvmVm {
    fn memory_bytes(&self) -> u64 {
        KvmVm::memory_bytes(self)
    }

    fn read_page(&self, gfn: u64, dst: &mut [u8]) -> Result<(), GuestError> {
        let addr = self.page_addr(gfn)?;
        self.memory()
            .read_slice(dst, addr)
            .map_err(|_| GuestError::OutOfRange(gfn))
    }

    fn write_page(&mut self, gfn: u64, src: &[u8]) -> Result<(), GuestError> {
        let addr = self.page_addr(gfn)?;
        self.memory()
            .write_slice(src, addr)
            .map_err(|_| GuestError::OutOfRange(gfn))
    }

    fn start_dirty_log(&mut self) -> Result<(), GuestError> {
        KvmVm::start_dirty_log(self).map_err(backend("start dirty log"))
    }

    fn take_dirty(&mut self) -> Result<DirtyBitmap, GuestError> {
        let words = self
            .take_dirty_bitmap()
            .map_err(backend("read dirty log"))?;
        Ok(DirtyBitmap::from_words(words, self.pages()))
    }

    fn stop_dirty_log(&mut self) -> Result<(), GuestError> {
        KvmVm::stop_dirty_log(self).map_err(backend("stop dirty log"))
    }

    fn pause(&mut self) -> Result<(), GuestError> {
        KvmVm::pause(self).map(drop).map_err(backend("pause"))
    }

    fn resume(&mut self) -> Result<(), GuestError> {
        KvmVm::resume(self).map_err(backend("resume"))
    }

    fn is_running(&self) -> bool {
        self.vcpu_status().contains(&VcpuStatus::Running)
    }

    fn cpu_time(&self) -> std::time::Duration {
        self.vcpu_cpu_time()
    }

    fn save_state(&mut self) -> Result<Vec<u8>, GuestError> {
        Ok(KvmVm::save_state(self)
            .map_err(backend("save state"))?
            .to_bytes())
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), GuestError> {
        let state = VmState::from_bytes(state).map_err(backend("decode state"))?;
        KvmVm::restore_state(self, &state).map_err(backend("restore state"))
    }

    fn set_throttle(&mut self, percent: u8) -> Result<(), GuestError> {
        KvmVm::set_throttle(self, percent);
        Ok(())
    }

    fn attach_disk(
        &mut self,
        port: Arc<dyn ferry_actors::disk::DiskPort>,
        blocks: u64,
        stride: u64,
    ) -> Result<bool, GuestError> {
        let ram = GuestBackend::ram(self);
        *self.port_reports().disk.0.lock().expect("disk slot") =
            Some(super::vcpu::DiskDevice { port, ram });
        // Through vm-memory, so the write lands in the VMM's dirty bitmap.
        let params = super::image::DISK_PARAMS_ADDR;
        self.memory()
            .write_obj(blocks, GuestAddress(params))
            .and_then(|()| self.memory().write_obj(stride, GuestAddress(params + 8)))
            .map_err(|e| GuestError::Backend {
                op: "attach disk",
                reason: e.to_string(),
            })?;
        Ok(true)
    }

    fn connect_block_devices(
        &mut self,
        ports: Vec<Arc<dyn ferry_actors::disk::DiskPort>>,
    ) -> Result<usize, GuestError> {
        let devices = self.node_disks();
        if devices == 0 {
            return Ok(0);
        }
        if ports.len() != devices {
            return Err(GuestError::Backend {
                op: "connect disks",
                reason: format!("the guest has {devices} disks, given {}", ports.len()),
            });
        }
        for (i, port) in ports.into_iter().enumerate() {
            self.connect_disk(i, port)
                .map_err(|e| GuestError::Backend {
                    op: "connect disks",
                    reason: e.to_string(),
                })?;
        }
        Ok(devices)
    }

    fn ram(&self) -> GuestRam {
        let host = self
            .memory()
            .get_host_address(GuestAddress(0))
            .expect("guest memory starts at address 0");
        // SAFETY: the mapping covers `memory_bytes` from guest address 0 (one
        // region, made in `KvmVm::create`), and the clone of the memory
        // handed over as owner holds the mapping's `Arc`s, so it stays
        // mapped while the view lives, even past the VM.
        unsafe { GuestRam::from_raw(host, self.memory_bytes(), Arc::new(self.memory().clone())) }
    }

    fn console(&self) -> Option<Vec<u8>> {
        self.console()
            .map(|out| out.0.lock().expect("console output").tail())
    }

    fn console_input(&mut self, bytes: &[u8]) -> Result<usize, GuestError> {
        KvmVm::console_input(self, bytes).ok_or(GuestError::Unsupported(
            "this guest has no serial console (only Linux guests do)",
        ))
    }

    fn run_for(&mut self, _elapsed: Duration) {
        // The vCPU threads run the guest on their own.
    }

    fn progress(&self) -> Result<GuestProgress, GuestError> {
        if let Some(out) = self.console() {
            // A Linux guest: its dirtier prints its passes.
            return Ok(GuestProgress {
                pass: out.0.lock().expect("console output").dirtier_pass(),
                exception: None,
            });
        }
        Ok(GuestProgress {
            pass: self.guest_pass().map_err(backend("read status"))?,
            exception: self.guest_exception().map_err(backend("read status"))?,
        })
    }
}
