//! Booting a Linux kernel: the ELF `vmlinux` through its PVH entry (the
//! rust-vmm `linux-loader` crate reads the ELF and finds the entry note;
//! a bzImage goes through the 64-bit boot protocol, [`super::bzimage`]),
//! an initramfs as the first PVH module, the command line, an e820 map in
//! the `hvm_start_info`, and an MP table ([`super::mptable`]) for the
//! CPUs and the IOAPIC (the test kernel has no ACPI).
//!
//! Guest physical layout:
//! - `0x500` boot GDT, `0x6000` start info, `0x6100` memory map,
//!   `0x6200` module list, `0x7000` zero page and `0x9000..0xf000` page
//!   tables (bzImage), `0x20000` command line;
//! - `0x9fc00..0x100000` reserved (MP table at its start);
//! - the kernel where its ELF headers say (16 MiB for the test kernel);
//! - the initramfs at the top of memory.

use std::path::PathBuf;

use kvm_bindings::{kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use linux_loader::loader::KernelLoader;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress};

use super::{KvmError, Memory, mptable};

/// The command line the project's test kernel boots with on this
/// platform (PLATFORM.md: the ring-0 emulator lacks XRSTOR, POPCNT, CLAC
/// and CMPXCHG16B; with erms/fsrm hidden the kernel copies 8 bytes at a
/// time; `reboot=k` makes a reboot a write to port 0x64).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 noxsave clearcpuid=popcnt,smap,cx16,erms,fsrm panic=-1 reboot=k quiet rodata=off";

const GDT_ADDR: u64 = 0x500;
const START_INFO_ADDR: u64 = 0x6000;
const MEMMAP_ADDR: u64 = 0x6100;
const MODLIST_ADDR: u64 = 0x6200;
const CMDLINE_ADDR: u64 = 0x20000;
/// Longest command line accepted.
pub const CMDLINE_MAX: usize = 4095;
pub(super) const HIGH_MEMORY: u64 = 0x10_0000;
/// Guest memory a Linux guest may have: it must stay below the TSS and
/// the 32-bit device hole.
pub const MEMORY_MAX: u64 = 3 << 30;
const PVH_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// A kernel to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxImage {
    /// The ELF `vmlinux` (with a PVH entry note).
    pub kernel: PathBuf,
    /// An initramfs (cpio), if any.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
}

/// Where the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// The PVH entry (32-bit protected mode, paging off), `rbx` at the
    /// `hvm_start_info`.
    Pvh {
        /// Entry point.
        rip: u64,
        /// The start info.
        start_info: u64,
    },
    /// A bzImage's 64-bit entry (long mode, identity-mapped), `rsi` at the
    /// zero page (`boot_params`).
    Long {
        /// Entry point (`startup_64`).
        rip: u64,
        /// The zero page.
        boot_params: u64,
    },
}

/// Guest memory as the e820 map gives it: (address, size, kind).
pub(super) fn e820(memory_bytes: u64) -> [(u64, u64, u32); 3] {
    [
        (0, mptable::MPTABLE_ADDR, E820_RAM),
        (
            mptable::MPTABLE_ADDR,
            HIGH_MEMORY - mptable::MPTABLE_ADDR,
            E820_RESERVED,
        ),
        (HIGH_MEMORY, memory_bytes - HIGH_MEMORY, E820_RAM),
    ]
}

/// Writes `bytes` at guest address `at`.
pub(super) fn write(memory: &Memory, bytes: &[u8], at: u64) -> Result<(), KvmError> {
    memory
        .write_slice(bytes, GuestAddress(at))
        .map_err(|e| image_err(format!("writing at {at:#x}: {e}")))
}

/// Puts the initrd at the top of memory, below `limit`, above
/// `kernel_end`; its (address, length).
pub(super) fn place_initrd(
    memory: &Memory,
    path: &std::path::Path,
    limit: u64,
    kernel_end: u64,
) -> Result<(u64, u64), KvmError> {
    let initrd =
        std::fs::read(path).map_err(|e| image_err(format!("initrd {}: {e}", path.display())))?;
    let len = initrd.len() as u64;
    let at = limit.saturating_sub(len) & !0xfff;
    if at < kernel_end {
        return Err(image_err(format!(
            "the initrd ({} MiB) and kernel do not fit {} MiB of memory",
            len >> 20,
            limit >> 20
        )));
    }
    write(memory, &initrd, at)?;
    Ok((at, len))
}

pub(super) fn image_err(what: impl std::fmt::Display) -> KvmError {
    KvmError::Image(what.to_string())
}

/// Loads `image` into `memory` (`memory_bytes` long) for `vcpus` CPUs:
/// an ELF `vmlinux` through its PVH entry, a bzImage through the 64-bit
/// boot protocol.
pub fn load(
    memory: &Memory,
    memory_bytes: u64,
    image: &LinuxImage,
    vcpus: u8,
) -> Result<BootEntry, KvmError> {
    if memory_bytes > MEMORY_MAX {
        return Err(image_err(format!(
            "a Linux guest may have at most {} MiB of memory",
            MEMORY_MAX >> 20
        )));
    }
    if image.cmdline.len() > CMDLINE_MAX || image.cmdline.contains('\0') {
        return Err(image_err(format!(
            "the kernel command line must be at most {CMDLINE_MAX} bytes, without NUL"
        )));
    }
    let mut kernel = std::fs::File::open(&image.kernel)
        .map_err(|e| image_err(format!("kernel {}: {e}", image.kernel.display())))?;
    let mut magic = [0u8; 4];
    let _ = std::io::Read::read(&mut kernel, &mut magic);
    let mut cmdline = image.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    write(memory, &cmdline, CMDLINE_ADDR)?;
    write(memory, &mptable::build(vcpus.max(1)), mptable::MPTABLE_ADDR)?;
    if magic == *b"\x7fELF" {
        load_pvh(memory, memory_bytes, image, &mut kernel)
    } else {
        super::bzimage::load(memory, memory_bytes, image, &mut kernel, CMDLINE_ADDR)
    }
}

fn load_pvh(
    memory: &Memory,
    memory_bytes: u64,
    image: &LinuxImage,
    kernel: &mut std::fs::File,
) -> Result<BootEntry, KvmError> {
    let loaded = Elf::load(memory, None, kernel, Some(GuestAddress(HIGH_MEMORY)))
        .map_err(|e| image_err(format!("kernel {}: {e}", image.kernel.display())))?;
    let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
        return Err(image_err(format!(
            "kernel {} has no PVH entry (build it with CONFIG_PVH)",
            image.kernel.display()
        )));
    };
    write(memory, &boot_gdt(), GDT_ADDR)?;
    let mut modules = 0;
    if let Some(path) = &image.initrd {
        let (at, len) = place_initrd(memory, path, memory_bytes, loaded.kernel_end)?;
        let mut entry = Vec::with_capacity(32);
        entry.extend_from_slice(&at.to_le_bytes());
        entry.extend_from_slice(&len.to_le_bytes());
        entry.extend_from_slice(&[0; 16]); // no module command line
        write(memory, &entry, MODLIST_ADDR)?;
        modules = 1;
    }
    let map = e820(memory_bytes);
    let mut memmap = Vec::new();
    for (addr, size, kind) in map {
        memmap.extend_from_slice(&addr.to_le_bytes());
        memmap.extend_from_slice(&size.to_le_bytes());
        memmap.extend_from_slice(&kind.to_le_bytes());
        memmap.extend_from_slice(&0u32.to_le_bytes());
    }
    write(memory, &memmap, MEMMAP_ADDR)?;
    let mut info = Vec::with_capacity(56);
    info.extend_from_slice(&PVH_MAGIC.to_le_bytes());
    info.extend_from_slice(&1u32.to_le_bytes()); // version 1: memory map
    info.extend_from_slice(&0u32.to_le_bytes()); // flags
    info.extend_from_slice(&u32::try_from(modules).expect("0 or 1").to_le_bytes());
    info.extend_from_slice(&MODLIST_ADDR.to_le_bytes());
    info.extend_from_slice(&CMDLINE_ADDR.to_le_bytes());
    info.extend_from_slice(&0u64.to_le_bytes()); // no ACPI RSDP
    info.extend_from_slice(&MEMMAP_ADDR.to_le_bytes());
    info.extend_from_slice(&u32::try_from(map.len()).expect("3").to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes());
    write(memory, &info, START_INFO_ADDR)?;
    Ok(BootEntry::Pvh {
        rip: entry.0,
        start_info: START_INFO_ADDR,
    })
}

/// Puts the boot vCPU at `entry`.
pub fn enter(vcpu: &VcpuFd, entry: &BootEntry) -> Result<(), KvmError> {
    match *entry {
        BootEntry::Pvh { rip, start_info } => enter_pvh(vcpu, rip, start_info),
        BootEntry::Long { rip, boot_params } => super::bzimage::enter(vcpu, rip, boot_params),
    }
}

/// Null, 32-bit code (0x08), data (0x10), TSS (0x18).
fn boot_gdt() -> Vec<u8> {
    [
        0u64,
        0x00cf_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x0000_8b00_0000_0067,
    ]
    .iter()
    .flat_map(|d| d.to_le_bytes())
    .collect()
}

fn flat(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        ..Default::default()
    }
}

/// Puts the boot vCPU at the PVH entry: 32-bit protected mode, paging
/// off, flat segments, `rbx` at the start info.
fn enter_pvh(vcpu: &VcpuFd, rip: u64, start_info: u64) -> Result<(), KvmError> {
    let mut sregs: kvm_sregs = vcpu
        .get_sregs()
        .map_err(|e| KvmError::Ioctl("KVM_GET_SREGS", e))?;
    sregs.cs = flat(0x08, 0xb);
    let data = flat(0x10, 0x3);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = kvm_segment {
        base: 0,
        limit: 0x67,
        selector: 0x18,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = 4 * 8 - 1;
    sregs.cr0 = 0x11; // PE, ET
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs)
        .map_err(|e| KvmError::Ioctl("KVM_SET_SREGS", e))?;
    let mut regs = vcpu
        .get_regs()
        .map_err(|e| KvmError::Ioctl("KVM_GET_REGS", e))?;
    regs.rip = rip;
    regs.rbx = start_info;
    regs.rflags = 2;
    vcpu.set_regs(&regs)
        .map_err(|e| KvmError::Ioctl("KVM_SET_REGS", e))?;
    reset_fpu(vcpu)
}

/// The FPU as after `fninit`, SSE exceptions masked.
pub(super) fn reset_fpu(vcpu: &VcpuFd) -> Result<(), KvmError> {
    let mut fpu = vcpu
        .get_fpu()
        .map_err(|e| KvmError::Ioctl("KVM_GET_FPU", e))?;
    fpu.fcw = 0x37f;
    fpu.mxcsr = 0x1f80;
    vcpu.set_fpu(&fpu)
        .map_err(|e| KvmError::Ioctl("KVM_SET_FPU", e))
}

/// Wires the local APIC as a PC's: LINT0 takes the PIC's ExtINT, LINT1
/// NMIs.
pub fn wire_lapic(vcpu: &VcpuFd) -> Result<(), KvmError> {
    const LVT_LINT0: usize = 0x350;
    const LVT_LINT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7 << 8;
    const MODE_NMI: u32 = 0x4 << 8;
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| KvmError::Ioctl("KVM_GET_LAPIC", e))?;
    for (at, mode) in [(LVT_LINT0, MODE_EXTINT), (LVT_LINT1, MODE_NMI)] {
        let mut raw = [0u8; 4];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = lapic.regs[at + i].to_ne_bytes()[0];
        }
        let v = (u32::from_le_bytes(raw) & !0x700) | mode;
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[at + i] = i8::from_ne_bytes([*b]) as _;
        }
    }
    vcpu.set_lapic(&lapic)
        .map_err(|e| KvmError::Ioctl("KVM_SET_LAPIC", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_without_a_pvh_note_or_too_much_memory_is_refused_with_why() {
        let memory = Memory::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
        let dir = tempfile::tempdir().expect("tempdir");
        let not_elf = dir.path().join("vmlinux");
        std::fs::write(&not_elf, b"not an ELF file at all").expect("write");
        let image = LinuxImage {
            kernel: not_elf,
            initrd: None,
            cmdline: DEFAULT_CMDLINE.into(),
        };
        let e = load(&memory, 4 << 20, &image, 1).expect_err("not a kernel");
        assert!(e.to_string().contains("vmlinux"), "{e}");
        let e = load(&memory, MEMORY_MAX + (2 << 20), &image, 1).expect_err("too big");
        assert!(e.to_string().contains("at most"), "{e}");
        let long = LinuxImage {
            cmdline: "x".repeat(CMDLINE_MAX + 1),
            ..image
        };
        let e = load(&memory, 4 << 20, &long, 1).expect_err("too long");
        assert!(e.to_string().contains("command line"), "{e}");
    }
}
