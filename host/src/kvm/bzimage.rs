//! Booting a bzImage through Linux's 64-bit boot protocol
//! (Documentation/arch/x86/boot.rst): the rust-vmm `linux-loader` crate
//! loads the protected-mode kernel and returns its setup header; ferry
//! fills the zero page (`boot_params`: the header, command line, initrd,
//! e820 map) and starts the boot vCPU at `startup_64` in long mode with
//! the low 4 GiB identity-mapped, `rsi` at the zero page.

use kvm_bindings::kvm_segment;
use kvm_ioctls::VcpuFd;
use linux_loader::loader::KernelLoader;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::bzimage::BzImage;
use vm_memory::{Bytes, GuestAddress};

use super::linux::{BootEntry, HIGH_MEMORY, LinuxImage, e820, image_err, place_initrd, write};
use super::{KvmError, Memory};

/// The zero page.
const ZERO_PAGE: u64 = 0x7000;
/// PML4, then one PDPT, then four page directories of 2 MiB pages.
const PML4: u64 = 0x9000;
const PDPT: u64 = 0xa000;
const PD: u64 = 0xb000;
/// The boot GDT: null, null, 64-bit code at 0x10 and data at 0x18, as the
/// protocol names `__BOOT_CS` and `__BOOT_DS`.
const GDT_ADDR: u64 = 0x500;
const CODE64: u16 = 0x10;
const DATA: u16 = 0x18;
/// `startup_64` lies this far into the protected-mode kernel.
const STARTUP_64: u64 = 0x200;
/// "HdrS": a setup header of boot protocol 2.00 or later.
const HDRS: u32 = 0x5372_6448;
/// The oldest protocol with a 64-bit entry.
const PROTOCOL_64: u16 = 0x020c;
/// `xloadflags`: the kernel has the 64-bit entry at +0x200.
const XLF_KERNEL_64: u16 = 1;

/// Loads the bzImage `kernel` and fills the zero page.
pub(super) fn load(
    memory: &Memory,
    memory_bytes: u64,
    image: &LinuxImage,
    kernel: &mut std::fs::File,
    cmdline_addr: u64,
) -> Result<BootEntry, KvmError> {
    let named =
        |e: &dyn std::fmt::Display| image_err(format!("kernel {}: {e}", image.kernel.display()));
    let loaded = BzImage::load(memory, None, kernel, Some(GuestAddress(HIGH_MEMORY)))
        .map_err(|e| named(&format!("neither an ELF vmlinux nor a bzImage ({e})")))?;
    let mut hdr = loaded
        .setup_header
        .ok_or_else(|| named(&"no setup header"))?;
    let (magic, version, xloadflags) = (hdr.header, hdr.version, hdr.xloadflags);
    if magic != HDRS || version < PROTOCOL_64 || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(named(&format!(
            "boot protocol {}.{:02} without the 64-bit entry (2.12 with XLF_KERNEL_64 needed)",
            version >> 8,
            version & 0xff
        )));
    }
    hdr.type_of_loader = 0xff;
    hdr.cmd_line_ptr = u32::try_from(cmdline_addr).expect("low memory");
    hdr.cmdline_size = u32::try_from(image.cmdline.len()).expect("checked length");
    if let Some(path) = &image.initrd {
        let limit = memory_bytes.min(u64::from(hdr.initrd_addr_max) + 1);
        let kernel_end = loaded.kernel_load.0 + loaded.kernel_end;
        let (at, len) = place_initrd(memory, path, limit, kernel_end)?;
        hdr.ramdisk_image = u32::try_from(at).expect("below initrd_addr_max");
        hdr.ramdisk_size = u32::try_from(len).map_err(|_| named(&"initrd over 4 GiB"))?;
    }
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    let map = e820(memory_bytes);
    for (slot, (addr, size, kind)) in params.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: kind,
        };
    }
    params.e820_entries = u8::try_from(map.len()).expect("3");
    memory
        .write_obj(params, GuestAddress(ZERO_PAGE))
        .map_err(|e| image_err(format!("zero page: {e}")))?;
    write(memory, &identity_map(), PML4)?;
    write(memory, &gdt(), GDT_ADDR)?;
    Ok(BootEntry::Long {
        rip: loaded.kernel_load.0 + STARTUP_64,
        boot_params: ZERO_PAGE,
    })
}

/// Page tables mapping the low 4 GiB 1:1 with 2 MiB pages, from `PML4`
/// on: PML4, PDPT, four page directories.
fn identity_map() -> Vec<u8> {
    const PRESENT_WRITABLE: u64 = 0x3;
    const HUGE: u64 = 0x80;
    let pml4 = std::iter::once(PDPT | PRESENT_WRITABLE).chain(std::iter::repeat_n(0, 511));
    let pdpt = (0..512u64).map(|gib| {
        if gib < 4 {
            (PD + gib * 0x1000) | PRESENT_WRITABLE
        } else {
            0
        }
    });
    let pds = (0..4 * 512u64).map(|i| (i << 21) | PRESENT_WRITABLE | HUGE);
    pml4.chain(pdpt)
        .chain(pds)
        .flat_map(u64::to_le_bytes)
        .collect()
}

fn gdt() -> Vec<u8> {
    [0u64, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff]
        .iter()
        .flat_map(|d| d.to_le_bytes())
        .collect()
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        ..Default::default()
    }
}

/// Puts the boot vCPU at `startup_64`: long mode, paging on over the
/// identity map, flat segments, `rsi` at the zero page.
pub(super) fn enter(vcpu: &VcpuFd, rip: u64, boot_params: u64) -> Result<(), KvmError> {
    const CR0_PE: u64 = 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| KvmError::Ioctl("KVM_GET_SREGS", e))?;
    sregs.cs = segment(CODE64, 0xb, true);
    let data = segment(DATA, 0x3, false);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = 4 * 8 - 1;
    sregs.cr3 = PML4;
    sregs.cr4 = CR4_PAE;
    sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs)
        .map_err(|e| KvmError::Ioctl("KVM_SET_SREGS", e))?;
    let mut regs = vcpu
        .get_regs()
        .map_err(|e| KvmError::Ioctl("KVM_GET_REGS", e))?;
    regs.rip = rip;
    regs.rsi = boot_params;
    regs.rflags = 2;
    vcpu.set_regs(&regs)
        .map_err(|e| KvmError::Ioctl("KVM_SET_REGS", e))?;
    super::linux::reset_fpu(vcpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identity_map_covers_the_low_4_gib() {
        let t: Vec<u64> = identity_map()
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8")))
            .collect();
        assert_eq!(t[0] & !0xfff, PDPT);
        assert_eq!(t[512 + 3] & !0xfff, PD + 3 * 0x1000);
        // The last 2 MiB page of the 4th GiB maps to itself.
        let last = t[1024 + 4 * 512 - 1];
        assert_eq!(last & !0x1f_ffff, (4 << 30) - (2 << 20));
        assert_ne!(last & 0x80, 0, "a 2 MiB page");
    }
}
