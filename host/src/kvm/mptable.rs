//! The Intel MultiProcessor table (spec 1.4) a Linux guest without ACPI
//! reads to find its CPUs, its IOAPIC and how ISA interrupts reach it.
//! Written by hand: it is a few fixed-size records (rust-vmm has no crate
//! for it; Firecracker and Cloud Hypervisor each keep their own).

/// Where the floating pointer goes: the last KiB of base memory, one of
/// the places Linux searches.
pub const MPTABLE_ADDR: u64 = 0x9fc00;
/// The local APIC's address.
const LAPIC_ADDR: u32 = 0xfee0_0000;
/// The IOAPIC's address.
const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// IOAPIC pins KVM's in-kernel IOAPIC has.
const IOAPIC_PINS: u8 = 24;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_VECTORED: u8 = 0;
const INT_NMI: u8 = 1;
const INT_EXTINT: u8 = 3;

/// The floating pointer and the configuration table for `vcpus` CPUs (APIC
/// ids 0..vcpus; the IOAPIC takes the next id), to be written at
/// [`MPTABLE_ADDR`]. Fits the KiB below 640 KiB for up to 32 vCPUs.
pub fn build(vcpus: u8) -> Vec<u8> {
    let ioapic_id = vcpus;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        let flags = 1 | if id == 0 { 2 } else { 0 }; // enabled, bootstrap
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, 0x14, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, 0x11, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 2;
    for pin in 0..IOAPIC_PINS {
        let kind = if pin == 0 { INT_EXTINT } else { INT_VECTORED };
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, kind, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    // LINT0 takes the PIC's ExtINT, LINT1 NMIs, on every local APIC.
    for (kind, lint) in [(INT_EXTINT, 0), (INT_NMI, 1)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind, 0, 0, 0, 0, 0xff, lint]);
        count += 1;
    }

    let table_addr = u32::try_from(MPTABLE_ADDR + 16).expect("below 1 MiB");
    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    let length = u16::try_from(44 + entries.len()).expect("a small table");
    table.extend_from_slice(&length.to_le_bytes());
    table.extend_from_slice(&[4, 0]); // spec 1.4, checksum below
    table.extend_from_slice(b"FERRY   ");
    table.extend_from_slice(b"KVM GUEST   ");
    table.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&[0, 0, 0, 0]); // no extended table
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(16 + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&table_addr.to_le_bytes());
    out.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // 16 bytes, spec 1.4
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    out
}

/// The byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn both_parts_sum_to_zero_and_point_at_each_other() {
        let t = build(2);
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
        let at = u32::from_le_bytes(t[4..8].try_into().expect("4 bytes"));
        assert_eq!(u64::from(at), MPTABLE_ADDR + 16);
        let table = &t[16..];
        assert_eq!(&table[..4], b"PCMP");
        let len = usize::from(u16::from_le_bytes([table[4], table[5]]));
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0, "table checksum");
        let count = u16::from_le_bytes([table[34], table[35]]);
        // 2 CPUs, bus, IOAPIC, 24 pins, 2 local interrupts.
        assert_eq!(count, 2 + 2 + 24 + 2);
        assert!(t.len() <= 1024, "fits below 640 KiB");
        assert!(build(32).len() <= 1024);
    }

    #[test]
    fn the_first_cpu_is_the_bootstrap_one() {
        let t = build(2);
        let first = &t[16 + 44..16 + 44 + 20];
        let second = &t[16 + 44 + 20..16 + 44 + 40];
        assert_eq!((first[0], first[1], first[3]), (0, 0, 3));
        assert_eq!((second[0], second[1], second[3]), (0, 1, 1));
    }
}
