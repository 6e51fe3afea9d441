//! The KVM guest backend: real VMs with dirty tracking, pause/resume and
//! complete state save/restore.
//!
//! - [`image`]: the built-in test guest (real mode → long mode → ring 3).
//! - [`vcpu`]: one thread per vCPU, paused by flag + signal kick.
//! - [`state`]: versioned save/restore of vCPU and VM device state.
//! - [`KvmVm`]: memory (vm-memory mmap with a dirty bitmap for the VMM's own
//!   writes), the in-kernel irqchip and PIT, vCPUs, and the dirty log.

mod backend;
pub mod bzimage;
pub mod console;
pub mod cpu;
pub mod image;
pub mod linux;
pub mod mptable;
pub mod pool;
pub mod state;
pub mod vcpu;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use image::GuestParams;
use state::{STATE_VERSION, VmState};
use vcpu::{GuestProgress, VcpuHandle, VcpuStatus};

/// Guest memory with a bitmap of the VMM's own writes.
pub type Memory = GuestMemoryMmap<AtomicBitmap>;

/// Page size of guest memory and of the dirty log.
pub use ferry_actors::guest::PAGE_BYTES;

/// Why a KVM operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// /dev/kvm cannot be opened.
    #[error("/dev/kvm is not usable: {0}")]
    Unavailable(String),
    /// An ioctl failed.
    #[error("{0} failed: {1}")]
    Ioctl(&'static str, #[source] kvm_ioctls::Error),
    /// Guest memory could not be mapped.
    #[error("map {bytes} bytes of guest memory: {reason}")]
    Memory {
        /// Size asked for.
        bytes: u64,
        /// Why.
        reason: String,
    },
    /// The guest image could not be built or loaded.
    #[error("guest image: {0}")]
    Image(String),
    /// A vCPU thread could not be started.
    #[error("start vCPU thread")]
    Thread(#[source] std::io::Error),
    /// The kick signal handler could not be installed.
    #[error("install vCPU kick signal handler: errno {0}")]
    Signal(i32),
    /// The vCPU thread is gone.
    #[error("vCPU {0} thread is gone")]
    VcpuGone(u64),
    /// A vCPU did not pause in time.
    #[error("vCPU {0} did not pause within 5 s")]
    PauseTimeout(u64),
    /// The operation needs paused vCPUs.
    #[error("the VM must be paused for this")]
    NotPaused,
    /// Saved state does not fit this VM or build.
    #[error("bad VM state: {0}")]
    BadState(String),
    /// The dirty log was read while logging is off.
    #[error("dirty logging is off")]
    NotLogging,
    /// A guest address outside guest memory.
    #[error("guest address {0:#x} is outside guest memory")]
    OutOfRange(u64),
}

/// `cpuid` for vCPU `id`: its APIC id in leaves 1 and 0xb.
fn with_apic_id(cpuid: &kvm_bindings::CpuId, id: u64) -> kvm_bindings::CpuId {
    let mut c = cpuid.clone();
    let apic = u32::try_from(id).expect("vCPU ids are small");
    for e in c.as_mut_slice() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (apic << 24),
            0xb => e.edx = apic,
            _ => {}
        }
    }
    c
}

/// Leaf 1 ECX: the LAPIC has a TSC-deadline timer.
const CPUID_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 ECX: running under a hypervisor (a Linux guest then looks for
/// KVM's leaves, and its kvmclock).
const CPUID_HYPERVISOR: u32 = 1 << 31;

/// `cpuid` as a Linux guest needs it: KVM does not report the TSC-deadline
/// timer it emulates in-kernel, nor the hypervisor bit (as QEMU does, set
/// both), so the guest neither calibrates the LAPIC timer nor misses
/// kvmclock.
fn for_linux(mut cpuid: kvm_bindings::CpuId) -> kvm_bindings::CpuId {
    for e in cpuid.as_mut_slice() {
        if e.function == 1 {
            e.ecx |= CPUID_TSC_DEADLINE | CPUID_HYPERVISOR;
        }
        if e.function == KVM_CPUID_FEATURES {
            e.eax &= !(KVM_FEATURE_PV_SEND_IPI | KVM_FEATURE_PV_SCHED_YIELD);
        }
    }
    cpuid
}

/// KVM's paravirtual feature leaf.
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// IPIs by hypercall: on PVM a guest sending one spins in
/// `__send_ipi_mask` for good (an SMP guest never finishes bringing up
/// its second CPU), so guests send IPIs through the LAPIC.
const KVM_FEATURE_PV_SEND_IPI: u32 = 1 << 11;
/// Yielding to a preempted vCPU by hypercall, which goes with it.
const KVM_FEATURE_PV_SCHED_YIELD: u32 = 1 << 13;

/// Checks that /dev/kvm can be opened; the error says why not.
pub fn available() -> Result<(), KvmError> {
    Kvm::new()
        .map(drop)
        .map_err(|e| KvmError::Unavailable(e.to_string()))
}

/// Bytes of guest memory `memory` holds.
pub fn memory_len(memory: &Memory) -> u64 {
    memory.iter().map(vm_memory::GuestMemoryRegion::len).sum()
}

/// Guest memory over one mapped region starting at guest address 0.
pub fn memory_of(region: vm_memory::MmapRegion<AtomicBitmap>) -> Result<Memory, KvmError> {
    let bytes = region.size() as u64;
    let region =
        vm_memory::GuestRegionMmap::new(region, GuestAddress(0)).ok_or(KvmError::Memory {
            bytes,
            reason: "region does not fit at guest address 0".into(),
        })?;
    Memory::from_regions(vec![region]).map_err(|e| KvmError::Memory {
        bytes,
        reason: e.to_string(),
    })
}

/// `bytes` of zeroed guest memory in a new memfd, mapped shared: another
/// process (a VMM, the node) maps the same pages from the file, so guest
/// memory can be handed over by passing the descriptor.
pub fn shared_memory(bytes: u64) -> Result<vm_memory::MmapRegion<AtomicBitmap>, KvmError> {
    let fail = |reason: String| KvmError::Memory { bytes, reason };
    usize::try_from(bytes).map_err(|_| fail("too large for this host".into()))?;
    // SAFETY: a plain syscall with a NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"ferry-guest".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(fail(format!(
            "memfd_create: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(bytes)
        .map_err(|e| fail(format!("size the memfd: {e}")))?;
    map_shared(file)
}

/// Maps all of the guest memory file `file` (a memfd) shared.
pub fn map_shared(file: std::fs::File) -> Result<vm_memory::MmapRegion<AtomicBitmap>, KvmError> {
    let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
    let fail = |reason: String| KvmError::Memory { bytes, reason };
    if bytes == 0 || !bytes.is_multiple_of(PAGE_BYTES) {
        return Err(fail("the memory file is empty or not whole pages".into()));
    }
    let len = usize::try_from(bytes).map_err(|_| fail("too large for this host".into()))?;
    vm_memory::MmapRegion::from_file(vm_memory::FileOffset::new(file, 0), len)
        .map_err(|e| fail(e.to_string()))
}

/// The virtio devices a VM gets when it is made, in bus order: a disk of
/// each of `disks` bytes (served by the node), then the NIC.
#[derive(Default)]
pub struct Devices {
    /// Disk sizes in bytes, in the VM's disk order.
    pub disks: Vec<u64>,
    /// The NIC.
    pub nic: Option<Nic>,
}

impl Devices {
    /// How many devices.
    pub fn count(&self) -> usize {
        self.disks.len() + usize::from(self.nic.is_some())
    }
}

/// A virtio NIC to make.
pub struct Nic {
    /// Its address.
    pub mac: [u8; 6],
    /// Where its frames go.
    pub io: Box<dyn crate::virtio::net::NetIo>,
    /// The descriptor that becomes readable when frames arrive (a tap's).
    pub watch: Option<std::fs::File>,
}

impl Nic {
    /// A NIC with address `mac` on `bridge` through a new tap `tap`, or
    /// unplugged without a bridge.
    pub fn on(mac: [u8; 6], bridge: Option<&str>, tap: &str) -> Result<Self, KvmError> {
        let Some(bridge) = bridge else {
            return Ok(Self {
                mac,
                io: Box::new(crate::virtio::net::Unplugged),
                watch: None,
            });
        };
        let tap = crate::virtio::tap::Tap::on_bridge(tap, bridge)
            .map_err(|e| KvmError::Image(format!("NIC: {e}")))?;
        let watch = tap
            .watcher()
            .map_err(|e| KvmError::Image(format!("NIC: {e}")))?;
        Ok(Self {
            mac,
            io: Box::new(tap),
            watch: Some(watch),
        })
    }
}

/// A KVM virtual machine.
pub struct KvmVm {
    // Fields drop in order: vCPU threads stop and close their fds first,
    // then the VM fd, and only then is guest memory unmapped.
    vcpus: Arc<Vec<VcpuHandle>>,
    vm: VmFd,
    memory: Memory,
    memory_bytes: u64,
    progress: Arc<GuestProgress>,
    dirty_logging: bool,
    ticker: Option<std::thread::JoinHandle<()>>,
    /// The CPU features this host's KVM gives guests.
    supported: Arc<BTreeSet<String>>,
    /// Where the node plugs in the virtio disks' ports, in disk order.
    disk_links: Vec<Arc<crate::virtio::link::DiskLink>>,
    /// Those disks' sizes.
    disk_lens: Vec<u64>,
}

impl std::fmt::Debug for KvmVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmVm")
            .field("memory_bytes", &self.memory_bytes)
            .field("vcpus", &self.vcpus.len())
            .finish_non_exhaustive()
    }
}

const SLOT: u32 = 0;

impl KvmVm {
    /// A VM with `memory_bytes` of zeroed memory and `vcpus` paused vCPUs
    /// with the host's supported CPUID. Nothing runs until [`KvmVm::resume`].
    pub fn create(memory_bytes: u64, vcpus: u8) -> Result<Self, KvmError> {
        Self::create_on(Self::zeroed(memory_bytes)?, vcpus, None)
    }

    /// As [`KvmVm::create`], over `memory` as it is (its contents become
    /// the guest's memory), with the CPU `model`'s features only (`None`:
    /// all KVM supports).
    pub fn create_on(
        memory: Memory,
        vcpus: u8,
        model: Option<&BTreeSet<String>>,
    ) -> Result<Self, KvmError> {
        Self::create_in(memory, vcpus, None, model)
    }

    /// A VM booting the Linux kernel `image` with `memory_bytes` of memory
    /// and a serial console (paused until [`KvmVm::resume`]).
    pub fn with_linux(
        image: &linux::LinuxImage,
        memory_bytes: u64,
        vcpus: u8,
    ) -> Result<Self, KvmError> {
        Self::with_linux_on(
            Self::zeroed(memory_bytes)?,
            image,
            vcpus,
            None,
            Devices::default(),
        )
    }

    /// As [`KvmVm::with_linux`], in `memory` (zeroed), with the CPU
    /// `model`'s features only and the virtio `devices` (named on the
    /// kernel command line; the node connects the disks with
    /// [`KvmVm::connect_disk`]).
    pub fn with_linux_on(
        memory: Memory,
        image: &linux::LinuxImage,
        vcpus: u8,
        model: Option<&BTreeSet<String>>,
        devices: Devices,
    ) -> Result<Self, KvmError> {
        let memory_bytes = memory_len(&memory);
        let mut image = image.clone();
        for i in 0..devices.count() {
            image.cmdline.push(' ');
            image.cmdline += &crate::virtio::bus::cmdline_word(i);
        }
        let entry = linux::load(&memory, memory_bytes, &image, vcpus)?;
        let mut vm = Self::create_in(memory, vcpus, Some(entry), model)?;
        vm.attach_console(None)?;
        vm.attach_devices(devices)?;
        Ok(vm)
    }

    /// Gives the VM its virtio `devices`, in bus order: the disks, then
    /// the NIC.
    pub fn attach_devices(&mut self, devices: Devices) -> Result<(), KvmError> {
        self.attach_node_disks(&devices.disks)?;
        if let Some(nic) = devices.nic {
            self.attach_net(nic.io, nic.mac, nic.watch)?;
        }
        Ok(())
    }

    /// Gives the VM a virtio disk of each of `lens` bytes whose blocks the
    /// node serves (requests wait until [`KvmVm::connect_disk`]): a Linux
    /// guest's disks at boot, or a shadow's, before its state arrives.
    pub fn attach_node_disks(&mut self, lens: &[u64]) -> Result<(), KvmError> {
        for (i, &len) in lens.iter().enumerate() {
            let link = crate::virtio::link::DiskLink::new();
            let backend = crate::virtio::link::LinkedBlock::new(
                len,
                link.clone(),
                crate::virtio::link::WAIT_FOR_NODE,
            );
            self.attach_block(backend, &format!("ferry-disk{i}"))?;
            self.disk_links.push(link);
            self.disk_lens.push(len);
        }
        Ok(())
    }

    /// Gives the VM a virtio NIC with address `mac` over `io` (after its
    /// disks, see [`crate::virtio::bus::cmdline_word`]); frames arriving
    /// on `watch` (the tap) are delivered by a receive thread while the
    /// vCPUs run. Returns the kernel command-line word.
    pub fn attach_net(
        &self,
        io: impl crate::virtio::net::NetIo + 'static,
        mac: [u8; 6],
        watch: Option<std::fs::File>,
    ) -> Result<String, KvmError> {
        let device = crate::virtio::mmio::MmioTransport::new(crate::virtio::net::Net::new(io, mac));
        let index = self.attach_virtio(Box::new(device))?;
        if let Some(fd) = watch {
            crate::virtio::announce::receive_thread(Arc::downgrade(&self.progress), index, fd)
                .map_err(|e| KvmError::Image(format!("NIC receive thread: {e}")))?;
        }
        Ok(crate::virtio::bus::cmdline_word(index))
    }

    /// RARP announcements the VM's NIC sent since it arrived.
    pub fn announced(&self) -> u64 {
        self.progress
            .announced
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Plugs `port` into virtio disk `index` (its node-side disk).
    pub fn connect_disk(
        &self,
        index: usize,
        port: Arc<dyn ferry_actors::disk::DiskPort>,
    ) -> Result<(), KvmError> {
        let link = self.disk_links.get(index).ok_or_else(|| {
            KvmError::Image(format!(
                "the VM has {} virtio disks, not a disk {index}",
                self.disk_links.len()
            ))
        })?;
        link.connect(port);
        Ok(())
    }

    /// How many virtio disks the node serves.
    pub fn node_disks(&self) -> usize {
        self.disk_links.len()
    }

    /// The sizes of the virtio disks the node serves.
    pub fn node_disk_lens(&self) -> &[u64] {
        &self.disk_lens
    }

    /// Gives the VM its serial console (COM1), restored from `state` when
    /// given.
    pub fn attach_console(&self, state: Option<&vm_superio::SerialState>) -> Result<(), KvmError> {
        let io = |e: std::io::Error| KvmError::Image(format!("serial console: {e}"));
        let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).map_err(io)?;
        self.vm
            .register_irqfd(&irq, console::IRQ)
            .map_err(|e| KvmError::Ioctl("KVM_IRQFD", e))?;
        let uart = console::Console::new(irq, console::Sink::default(), state).map_err(io)?;
        *self.progress.console.0.lock().expect("console") = Some(uart);
        Ok(())
    }

    /// Gives the VM a virtio-blk disk over `backend` on its MMIO bus;
    /// returns the kernel command-line word that makes Linux find it.
    pub fn attach_block(
        &self,
        backend: impl crate::virtio::blk::BlockIo + 'static,
        id: &str,
    ) -> Result<String, KvmError> {
        let device =
            crate::virtio::mmio::MmioTransport::new(crate::virtio::blk::Blk::new(backend, id));
        let index = self.attach_virtio(Box::new(device))?;
        Ok(crate::virtio::bus::cmdline_word(index))
    }

    /// Puts `device` at the bus's next place with an irqfd on its GSI;
    /// returns its index.
    fn attach_virtio(
        &self,
        device: Box<dyn crate::virtio::bus::BusDevice>,
    ) -> Result<usize, KvmError> {
        let (_, gsi) = crate::virtio::bus::placement(self.progress.mmio.len());
        let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| KvmError::Image(format!("virtio interrupt: {e}")))?;
        self.vm
            .register_irqfd(&irq, gsi)
            .map_err(|e| KvmError::Ioctl("KVM_IRQFD", e))?;
        Ok(self.progress.mmio.attach(&self.memory, irq, device))
    }

    /// Types `bytes` into the console (as far as its receive FIFO takes
    /// them); `None` when the VM has no console.
    pub fn console_input(&self, bytes: &[u8]) -> Option<usize> {
        let mut slot = self.progress.console.0.lock().expect("console");
        slot.as_mut().map(|c| c.input(bytes))
    }

    /// What the guest printed on its console, if it has one.
    pub fn console(&self) -> Option<console::Sink> {
        let slot = self.progress.console.0.lock().expect("console");
        slot.as_ref().map(|c| c.output().clone())
    }

    /// Also keeps the console's output in `path` (appended, size-capped);
    /// false when the VM has no console (yet). Once is enough: a log
    /// already kept stays.
    pub fn log_console_to(&self, path: &std::path::Path) -> std::io::Result<bool> {
        let slot = self.progress.console.0.lock().expect("console");
        let Some(c) = slot.as_ref() else {
            return Ok(false);
        };
        if !c.output().0.lock().expect("console output").is_logged() {
            c.log_to(path.to_owned())?;
        }
        Ok(true)
    }

    /// The console's UART state and newest output (empty: no console).
    fn console_state(&self) -> (Vec<u8>, Vec<u8>) {
        let slot = self.progress.console.0.lock().expect("console");
        let Some(c) = slot.as_ref() else {
            return (Vec::new(), Vec::new());
        };
        let tail = c
            .output()
            .0
            .lock()
            .expect("console output")
            .newest(state::CONSOLE_CARRIED);
        (state::console_bytes(&c.state()), tail)
    }

    fn zeroed(memory_bytes: u64) -> Result<Memory, KvmError> {
        let size = usize::try_from(memory_bytes).map_err(|_| KvmError::Memory {
            bytes: memory_bytes,
            reason: "too large for this host".into(),
        })?;
        Memory::from_ranges(&[(GuestAddress(0), size)]).map_err(|e| KvmError::Memory {
            bytes: memory_bytes,
            reason: e.to_string(),
        })
    }

    /// As [`KvmVm::create`], with guest memory taken from `region` (for
    /// example one faulted in ahead by a [`pool::MemoryPool`]). Its
    /// contents become the guest's memory as they are.
    pub fn create_with_region(
        region: vm_memory::MmapRegion<AtomicBitmap>,
        vcpus: u8,
    ) -> Result<Self, KvmError> {
        Self::create_on(memory_of(region)?, vcpus, None)
    }

    /// The VM around `memory`, its irqchip and paused vCPUs: vCPU 0 at the
    /// PVH `boot` entry, or in real mode at the test guest's load address.
    fn create_in(
        memory: Memory,
        vcpus: u8,
        boot: Option<linux::BootEntry>,
        model: Option<&BTreeSet<String>>,
    ) -> Result<Self, KvmError> {
        let memory_bytes = memory_len(&memory);
        let kvm = Kvm::new().map_err(|e| KvmError::Unavailable(e.to_string()))?;
        let vm = kvm
            .create_vm()
            .map_err(|e| KvmError::Ioctl("KVM_CREATE_VM", e))?;
        let this_vm = Self {
            vm,
            memory,
            memory_bytes,
            vcpus: Arc::new(Vec::new()),
            progress: Arc::new(GuestProgress::default()),
            dirty_logging: false,
            ticker: None,
            supported: Arc::new(BTreeSet::new()),
            disk_links: Vec::new(),
            disk_lens: Vec::new(),
        };
        this_vm.set_memory_region(0)?;
        this_vm
            .vm
            .set_tss_address(0xfffb_d000)
            .map_err(|e| KvmError::Ioctl("KVM_SET_TSS_ADDR", e))?;
        this_vm
            .vm
            .create_irq_chip()
            .map_err(|e| KvmError::Ioctl("KVM_CREATE_IRQCHIP", e))?;
        this_vm
            .vm
            .create_pit2(kvm_pit_config::default())
            .map_err(|e| KvmError::Ioctl("KVM_CREATE_PIT2", e))?;
        let mut cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| KvmError::Ioctl("KVM_GET_SUPPORTED_CPUID", e))?;
        // Every VM gets the bits a Linux guest needs: a blank VM (a shadow,
        // an upgrade's successor) may be restored from a Linux guest, and
        // the test guest does not look.
        cpuid = for_linux(cpuid);
        let supported = Arc::new(cpu::features_of(cpuid.as_slice()));
        if let Some(model) = model {
            let lacking = cpu::missing(model, &supported);
            if !lacking.is_empty() {
                return Err(KvmError::BadState(format!(
                    "this host's KVM lacks CPU features of the VM's model: {}",
                    lacking.join(", ")
                )));
            }
            cpu::restrict(&mut cpuid, model);
        }
        let msr_indices = Arc::new(
            kvm.get_msr_index_list()
                .map_err(|e| KvmError::Ioctl("KVM_GET_MSR_INDEX_LIST", e))?
                .as_slice()
                .to_vec(),
        );
        let mut this_vm = this_vm;
        this_vm.supported = supported;
        let mut handles = Vec::new();
        for id in 0..u64::from(vcpus.max(1)) {
            let fd = this_vm
                .vm
                .create_vcpu(id)
                .map_err(|e| KvmError::Ioctl("KVM_CREATE_VCPU", e))?;
            fd.set_cpuid2(&with_apic_id(&cpuid, id))
                .map_err(|e| KvmError::Ioctl("KVM_SET_CPUID2", e))?;
            if id == 0 {
                // What a vCPU reports back may hold more than KVM lists
                // as supported (PVM reports the host's bits): a state
                // saved elsewhere on such a host carries those too.
                let given = fd
                    .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                    .map_err(|e| KvmError::Ioctl("KVM_GET_CPUID2", e))?;
                let mut all = (*this_vm.supported).clone();
                all.extend(cpu::features_of(given.as_slice()));
                this_vm.supported = Arc::new(all);
            }
            if let Some(entry) = &boot {
                linux::wire_lapic(&fd)?;
                if id == 0 {
                    linux::enter(&fd, entry)?;
                }
            } else if id == 0 {
                // Real mode at 0000:7c00, as a BIOS hands over to a boot sector.
                let mut sregs = fd
                    .get_sregs()
                    .map_err(|e| KvmError::Ioctl("KVM_GET_SREGS", e))?;
                sregs.cs.base = 0;
                sregs.cs.selector = 0;
                fd.set_sregs(&sregs)
                    .map_err(|e| KvmError::Ioctl("KVM_SET_SREGS", e))?;
                let mut regs = fd
                    .get_regs()
                    .map_err(|e| KvmError::Ioctl("KVM_GET_REGS", e))?;
                regs.rip = image::LOAD_ADDR;
                regs.rflags = 2;
                regs.rsp = 0x7000;
                fd.set_regs(&regs)
                    .map_err(|e| KvmError::Ioctl("KVM_SET_REGS", e))?;
            }
            handles.push(VcpuHandle::spawn(
                id,
                fd,
                msr_indices.clone(),
                this_vm.progress.clone(),
            )?);
        }
        this_vm.vcpus = Arc::new(handles);
        Ok(this_vm)
    }

    /// A VM running the built-in test guest with `params` (paused until
    /// [`KvmVm::resume`]).
    pub fn with_test_guest(params: &GuestParams, vcpus: u8) -> Result<Self, KvmError> {
        Self::with_test_guest_on(Self::zeroed(params.memory_bytes)?, params, vcpus, None)
    }

    /// As [`KvmVm::with_test_guest`], in `memory` (zeroed, of the size
    /// `params` give), with the CPU `model`'s features only.
    pub fn with_test_guest_on(
        memory: Memory,
        params: &GuestParams,
        vcpus: u8,
        model: Option<&BTreeSet<String>>,
    ) -> Result<Self, KvmError> {
        params.check().map_err(|e| KvmError::Image(e.to_string()))?;
        let image = image::build(params).map_err(|e| KvmError::Image(e.to_string()))?;
        let vm = Self::create_on(memory, vcpus, model)?;
        if vm.memory_bytes != params.memory_bytes {
            return Err(KvmError::Image(format!(
                "the test guest wants {} bytes of memory, it was given {}",
                params.memory_bytes, vm.memory_bytes
            )));
        }
        vm.load(image::LOAD_ADDR, &image)?;
        Ok(vm)
    }

    /// Loads a flat binary (any boot-sector style image) at `addr`.
    pub fn load(&self, addr: u64, image: &[u8]) -> Result<(), KvmError> {
        self.memory
            .write_slice(image, GuestAddress(addr))
            .map_err(|e| KvmError::Image(format!("load at {addr:#x}: {e}")))
    }

    fn set_memory_region(&self, flags: u32) -> Result<(), KvmError> {
        let host = self
            .memory
            .get_host_address(GuestAddress(0))
            .map_err(|_| KvmError::OutOfRange(0))?;
        let region = kvm_userspace_memory_region {
            slot: SLOT,
            flags,
            guest_phys_addr: 0,
            memory_size: self.memory_bytes,
            userspace_addr: host as u64,
        };
        // SAFETY: the region covers exactly the mapping `self.memory` owns,
        // which outlives the VM: both are fields of `self`, and the vCPUs
        // and VM fd are declared (so dropped) before the memory.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(|e| KvmError::Ioctl("KVM_SET_USER_MEMORY_REGION", e))
    }

    /// Faults in every page of guest memory now (`MADV_POPULATE_WRITE`), so
    /// a migration destination does not pay for first touch while pages
    /// arrive (first touch of cold memory is slow on these machines).
    pub fn populate(&self) -> Result<(), KvmError> {
        let host = self
            .memory
            .get_host_address(GuestAddress(0))
            .map_err(|_| KvmError::OutOfRange(0))?;
        let len = usize::try_from(self.memory_bytes).expect("checked at create");
        // SAFETY: the range is exactly the guest memory mapping `self` owns.
        unsafe { pool::populate(host, len) }.map_err(|reason| KvmError::Memory {
            bytes: self.memory_bytes,
            reason,
        })
    }

    /// The CPU features this host's KVM gives this VM's vCPUs (a restored
    /// state may use no other).
    pub fn cpu_features(&self) -> &BTreeSet<String> {
        &self.supported
    }

    /// Guest memory size.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_bytes
    }

    /// Guest memory (reads and writes through it are bounds-checked; writes
    /// are recorded in the VMM dirty bitmap).
    pub fn memory(&self) -> &Memory {
        &self.memory
    }

    /// What the guest has reported on its ports.
    pub fn port_reports(&self) -> &GuestProgress {
        &self.progress
    }

    /// Reads a u64 from guest memory.
    pub fn read_u64(&self, addr: u64) -> Result<u64, KvmError> {
        self.memory
            .read_obj::<u64>(GuestAddress(addr))
            .map_err(|_| KvmError::OutOfRange(addr))
    }

    /// The test guest's pass counter, from its status block.
    pub fn guest_pass(&self) -> Result<u64, KvmError> {
        self.read_u64(image::STATUS_ADDR + image::STATUS_PASS)
    }

    /// The CPU exception the test guest reported, if any.
    pub fn guest_exception(&self) -> Result<Option<u64>, KvmError> {
        let v = self.read_u64(image::STATUS_ADDR + image::STATUS_EXCEPTION)?;
        Ok(v.checked_sub(1))
    }

    /// Status of each vCPU thread.
    pub fn vcpu_status(&self) -> Vec<VcpuStatus> {
        self.vcpus.iter().map(VcpuHandle::status).collect()
    }

    /// CPU time all vCPU threads have used.
    pub fn vcpu_cpu_time(&self) -> std::time::Duration {
        self.vcpus.iter().map(VcpuHandle::cpu_time).sum()
    }

    /// Lets every vCPU run.
    pub fn resume(&self) -> Result<(), KvmError> {
        self.vcpus.iter().try_for_each(VcpuHandle::resume)?;
        self.progress.mmio.set_running(true);
        if self
            .progress
            .announce_on_resume
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            crate::virtio::announce::start(Arc::downgrade(&self.progress));
        }
        Ok(())
    }

    /// Pauses every vCPU (and the devices driven from outside); returns
    /// how long that took.
    pub fn pause(&self) -> Result<Duration, KvmError> {
        let start = Instant::now();
        self.progress.mmio.set_running(false);
        self.vcpus.iter().try_for_each(VcpuHandle::pause)?;
        Ok(start.elapsed())
    }

    /// Throttles every vCPU to `100 - percent` % of its time. A ticker
    /// thread kicks the vCPUs out of `KVM_RUN` every few milliseconds so the
    /// throttle bites even when the guest makes no exits of its own.
    pub fn set_throttle(&mut self, percent: u8) {
        for v in self.vcpus.iter() {
            v.set_throttle(percent);
        }
        if percent > 0 && self.ticker.as_ref().is_none_or(|t| t.is_finished()) {
            let vcpus = Arc::downgrade(&self.vcpus);
            self.ticker = std::thread::Builder::new()
                .name("throttle".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_millis(2));
                        let Some(vcpus) = vcpus.upgrade() else { return };
                        if vcpus.iter().all(|v| v.throttle() == 0) {
                            return;
                        }
                        vcpus
                            .iter()
                            .filter(|v| v.status() == VcpuStatus::Running)
                            .for_each(VcpuHandle::kick);
                    }
                })
                .ok();
        }
    }

    /// The current throttle of vCPU 0.
    pub fn throttle(&self) -> u8 {
        self.vcpus.first().map_or(0, VcpuHandle::throttle)
    }

    /// Starts KVM dirty logging; pages written from now on are reported.
    pub fn start_dirty_log(&mut self) -> Result<(), KvmError> {
        if !self.dirty_logging {
            self.set_memory_region(KVM_MEM_LOG_DIRTY_PAGES)?;
            self.dirty_logging = true;
            self.vmm_bitmap().reset();
        }
        Ok(())
    }

    /// Stops dirty logging.
    pub fn stop_dirty_log(&mut self) -> Result<(), KvmError> {
        if self.dirty_logging {
            self.set_memory_region(0)?;
            self.dirty_logging = false;
        }
        Ok(())
    }

    fn vmm_bitmap(&self) -> &AtomicBitmap {
        let region: &vm_memory::MmapRegion<AtomicBitmap> = self
            .memory
            .iter()
            .next()
            .expect("guest memory has one region");
        region.bitmap()
    }

    /// Pages dirtied since the last call (or since logging started): the
    /// KVM dirty log ORed with the VMM's own writes. One bit per page,
    /// 64 pages per word. Clears both.
    pub fn take_dirty_bitmap(&mut self) -> Result<Vec<u64>, KvmError> {
        if !self.dirty_logging {
            return Err(KvmError::NotLogging);
        }
        let size = usize::try_from(self.memory_bytes).expect("checked at create");
        let mut bitmap = self
            .vm
            .get_dirty_log(SLOT, size)
            .map_err(|e| KvmError::Ioctl("KVM_GET_DIRTY_LOG", e))?;
        let vmm = self.vmm_bitmap().get_and_reset();
        for (word, extra) in bitmap.iter_mut().zip(vmm) {
            *word |= extra;
        }
        Ok(bitmap)
    }

    fn require_paused(&self) -> Result<(), KvmError> {
        if self.vcpus.iter().any(|v| v.status() == VcpuStatus::Running) {
            return Err(KvmError::NotPaused);
        }
        Ok(())
    }

    /// Calls `f` with all of guest memory as one slice; the VM must be
    /// paused, so nothing writes it meanwhile.
    pub fn with_memory_slice<T>(&self, f: impl FnOnce(&[u8]) -> T) -> Result<T, KvmError> {
        self.require_paused()?;
        let host = self
            .memory
            .get_host_address(GuestAddress(0))
            .map_err(|_| KvmError::OutOfRange(0))?;
        let len = usize::try_from(self.memory_bytes).expect("checked at create");
        // SAFETY: the mapping is `len` bytes long and lives as long as
        // `self`; every vCPU is paused and `&self` excludes VMM writers
        // through this type, so the bytes do not change while borrowed.
        let bytes = unsafe { std::slice::from_raw_parts(host.cast_const(), len) };
        Ok(f(bytes))
    }

    /// A 64-bit xxh3 hash of all guest memory (the VM must be paused).
    pub fn memory_hash(&self) -> Result<u64, KvmError> {
        self.with_memory_slice(xxhash_rust::xxh3::xxh3_64)
    }

    /// Copies all guest memory from `other` (both must be paused and the
    /// same size). Used to seed a restored VM in tests and tools.
    pub fn copy_memory_from(&self, other: &KvmVm) -> Result<(), KvmError> {
        if other.memory_bytes != self.memory_bytes {
            return Err(KvmError::BadState("memory sizes differ".into()));
        }
        self.require_paused()?;
        other.with_memory_slice(|src| {
            self.memory
                .write_slice(src, GuestAddress(0))
                .map_err(|_| KvmError::OutOfRange(0))
        })?
    }

    /// Saves the complete state; the VM must be paused.
    pub fn save_state(&self) -> Result<VmState, KvmError> {
        self.require_paused()?;
        let vcpus = self
            .vcpus
            .iter()
            .map(VcpuHandle::save)
            .collect::<Result<Vec<_>, _>>()?;
        let devices = state::save_devices(&self.vm)?;
        let (console, console_tail) = self.console_state();
        Ok(VmState {
            version: STATE_VERSION,
            memory_bytes: self.memory_bytes,
            vcpus,
            pic_master: devices.pic_master,
            pic_slave: devices.pic_slave,
            ioapic: devices.ioapic,
            pit: devices.pit,
            clock: devices.clock,
            console,
            console_tail,
            virtio: self.progress.mmio.snapshot(),
        })
    }

    /// Restores a complete state into this (paused) VM.
    pub fn restore_state(&self, state: &VmState) -> Result<(), KvmError> {
        self.require_paused()?;
        if state.memory_bytes != self.memory_bytes || state.vcpus.len() != self.vcpus.len() {
            return Err(KvmError::BadState(format!(
                "state of a {}-byte, {}-vCPU VM does not fit this {}-byte, {}-vCPU VM",
                state.memory_bytes,
                state.vcpus.len(),
                self.memory_bytes,
                self.vcpus.len()
            )));
        }
        for v in &state.vcpus {
            let wanted = cpu::features_of(&state::cpuid_entries(v)?);
            let lacking = cpu::missing(&wanted, &self.supported);
            if !lacking.is_empty() {
                return Err(KvmError::BadState(format!(
                    "the saved CPUID has CPU features this host's KVM lacks: {}",
                    lacking.join(", ")
                )));
            }
        }
        state::restore_devices(&self.vm, state)?;
        self.progress
            .mmio
            .restore(&state.virtio)
            .map_err(KvmError::BadState)?;
        if !state.console.is_empty() {
            let uart = state::console_from_bytes(&state.console)?;
            let has = self.progress.console.0.lock().expect("console").is_some();
            if has {
                // Keep the output sink (and its log); take the registers.
                let mut slot = self.progress.console.0.lock().expect("console");
                let old = slot.take().expect("checked");
                let irq = old
                    .irq()
                    .map_err(|e| KvmError::BadState(format!("console: {e}")))?;
                *slot = Some(
                    console::Console::new(irq, old.output().clone(), Some(&uart))
                        .map_err(|e| KvmError::BadState(format!("console: {e}")))?,
                );
            } else {
                self.attach_console(Some(&uart))?;
            }
            if let Some(out) = self.console() {
                out.0
                    .lock()
                    .expect("console output")
                    .seed(&state.console_tail);
            }
        }
        for (v, s) in self.vcpus.iter().zip(&state.vcpus) {
            v.restore(s.clone())?;
        }
        let pass = self.guest_pass()?;
        self.progress.pass.store(pass, Ordering::Relaxed);
        self.progress
            .announce_on_resume
            .store(true, Ordering::SeqCst);
        Ok(())
    }
}
