//! Booting a Linux kernel: the ELF `vmlinux` through its PVH entry (the
//! rust-vmm `linux-loader` crate reads the ELF and finds the entry note),
//! an initramfs as the first PVH module, the command line, an e820 map in
//! the `hvm_start_info`, and an MP table ([`super::mptable`]) for the
//! CPUs and the IOAPIC (the test kernel has no ACPI).
//!
//! Guest physical layout:
//! - `0x500` boot GDT, `0x6000` start info, `0x6100` memory map,
//!   `0x6200` module list, `0x20000` command line;
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
const HIGH_MEMORY: u64 = 0x10_0000;
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
pub struct BootEntry {
    /// The PVH entry point (32-bit protected mode, paging off).
    pub rip: u64,
    /// The `hvm_start_info` (in `rbx`).
    pub start_info: u64,
}

fn image_err(what: impl std::fmt::Display) -> KvmError {
    KvmError::Image(what.to_string())
}

/// Loads `image` into `memory` (`memory_bytes` long) for `vcpus` CPUs.
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
    let loaded = Elf::load(memory, None, &mut kernel, Some(GuestAddress(HIGH_MEMORY)))
        .map_err(|e| image_err(format!("kernel {}: {e}", image.kernel.display())))?;
    let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
        return Err(image_err(format!(
            "kernel {} has no PVH entry (build it with CONFIG_PVH)",
            image.kernel.display()
        )));
    };
    let write = |bytes: &[u8], at: u64| {
        memory
            .write_slice(bytes, GuestAddress(at))
            .map_err(|e| image_err(format!("writing at {at:#x}: {e}")))
    };
    let mut cmdline = image.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    write(&cmdline, CMDLINE_ADDR)?;
    write(&mptable::build(vcpus.max(1)), mptable::MPTABLE_ADDR)?;
    write(&boot_gdt(), GDT_ADDR)?;

    let mut modules = 0;
    if let Some(path) = &image.initrd {
        let initrd = std::fs::read(path)
            .map_err(|e| image_err(format!("initrd {}: {e}", path.display())))?;
        let len = initrd.len() as u64;
        let at = memory_bytes.saturating_sub(len) & !0xfff;
        if at < loaded.kernel_end {
            return Err(image_err(format!(
                "the initrd ({} MiB) and kernel do not fit {} MiB of memory",
                len >> 20,
                memory_bytes >> 20
            )));
        }
        write(&initrd, at)?;
        let mut entry = Vec::with_capacity(32);
        entry.extend_from_slice(&at.to_le_bytes());
        entry.extend_from_slice(&len.to_le_bytes());
        entry.extend_from_slice(&[0; 16]); // no module command line
        write(&entry, MODLIST_ADDR)?;
        modules = 1;
    }
    let map = [
        (0, mptable::MPTABLE_ADDR, E820_RAM),
        (
            mptable::MPTABLE_ADDR,
            HIGH_MEMORY - mptable::MPTABLE_ADDR,
            E820_RESERVED,
        ),
        (HIGH_MEMORY, memory_bytes - HIGH_MEMORY, E820_RAM),
    ];
    let mut memmap = Vec::new();
    for (addr, size, kind) in map {
        memmap.extend_from_slice(&addr.to_le_bytes());
        memmap.extend_from_slice(&size.to_le_bytes());
        memmap.extend_from_slice(&kind.to_le_bytes());
        memmap.extend_from_slice(&0u32.to_le_bytes());
    }
    write(&memmap, MEMMAP_ADDR)?;
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
    write(&info, START_INFO_ADDR)?;
    Ok(BootEntry {
        rip: entry.0,
        start_info: START_INFO_ADDR,
    })
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
pub fn enter_pvh(vcpu: &VcpuFd, entry: &BootEntry) -> Result<(), KvmError> {
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
    regs.rip = entry.rip;
    regs.rbx = entry.start_info;
    regs.rflags = 2;
    vcpu.set_regs(&regs)
        .map_err(|e| KvmError::Ioctl("KVM_SET_REGS", e))?;
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
