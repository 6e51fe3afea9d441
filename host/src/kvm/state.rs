//! Complete VM state, saved from a paused VM and restored into another.
//!
//! Per vCPU: regs, sregs, FPU, XSAVE (of the host's size), TSC frequency, XCRs, debug registers, LAPIC, the MSRs
//! KVM lists as supported, vCPU events, MP state and CPUID. Per VM: both
//! PICs, the IOAPIC, the PIT and kvmclock. Every KVM structure travels as
//! its raw bytes (kvm-bindings derives zerocopy's `IntoBytes`/`FromBytes`
//! for them, so the conversion is checked at compile time), inside an
//! explicit, versioned rkyv struct.
//!
//! Restore order follows what KVM needs: CPUID before MSRs and registers
//! (it decides which MSRs and features are valid), special registers before
//! general ones, LAPIC before vCPU events, MP state last.

use kvm_bindings::{
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, Msrs, kvm_clock_data,
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{VcpuFd, VmFd};
use zerocopy::{FromBytes, IntoBytes};

use super::KvmError;

/// The LAPIC timer's TSC-deadline MSR.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Version of the state layout below.
pub const STATE_VERSION: u32 = 4;

/// One vCPU's state.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct VcpuState {
    /// kvm_regs.
    pub regs: Vec<u8>,
    /// kvm_sregs.
    pub sregs: Vec<u8>,
    /// kvm_fpu.
    pub fpu: Vec<u8>,
    /// kvm_xsave (legacy 4 KiB area).
    pub xsave: Vec<u8>,
    /// The XSAVE area beyond the legacy 4 KiB (`KVM_GET_XSAVE2`), where
    /// the host's KVM keeps more (AMX, ...); empty where it does not.
    pub xsave_extra: Vec<u8>,
    /// The vCPU's TSC frequency in kHz (0: KVM did not say).
    pub tsc_khz: u32,
    /// kvm_xcrs.
    pub xcrs: Vec<u8>,
    /// kvm_debugregs.
    pub debugregs: Vec<u8>,
    /// kvm_lapic_state.
    pub lapic: Vec<u8>,
    /// (index, value) of every readable MSR.
    pub msrs: Vec<(u32, u64)>,
    /// kvm_vcpu_events.
    pub events: Vec<u8>,
    /// kvm_mp_state.
    pub mp_state: Vec<u8>,
    /// kvm_cpuid_entry2 entries, concatenated.
    pub cpuid: Vec<u8>,
}

/// A whole VM's device and vCPU state (memory travels separately).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct VmState {
    /// [`STATE_VERSION`] of the writer.
    pub version: u32,
    /// Guest memory size the state belongs to.
    pub memory_bytes: u64,
    /// vCPUs in id order.
    pub vcpus: Vec<VcpuState>,
    /// kvm_irqchip of the master PIC.
    pub pic_master: Vec<u8>,
    /// kvm_irqchip of the slave PIC.
    pub pic_slave: Vec<u8>,
    /// kvm_irqchip of the IOAPIC.
    pub ioapic: Vec<u8>,
    /// kvm_pit_state2.
    pub pit: Vec<u8>,
    /// kvm_clock_data.
    pub clock: Vec<u8>,
    /// The serial console's registers and input FIFO ([`console_bytes`];
    /// empty: the VM has no console).
    pub console: Vec<u8>,
    /// The newest console output ([`CONSOLE_CARRIED`] bytes at most), so
    /// the console's recent lines follow the VM.
    pub console_tail: Vec<u8>,
    /// Each virtio device's transport state, in bus order (the devices
    /// themselves are attached by whoever creates the VM, as the console).
    pub virtio: Vec<crate::virtio::mmio::TransportSnapshot>,
}

/// Console output carried with the VM's state.
pub const CONSOLE_CARRIED: usize = 4096;

/// A UART's state as bytes: its nine registers, then its input FIFO.
pub fn console_bytes(s: &vm_superio::SerialState) -> Vec<u8> {
    let mut out = vec![
        s.baud_divisor_low,
        s.baud_divisor_high,
        s.interrupt_enable,
        s.interrupt_identification,
        s.line_control,
        s.line_status,
        s.modem_control,
        s.modem_status,
        s.scratch,
    ];
    out.extend_from_slice(&s.in_buffer);
    out
}

/// The UART state [`console_bytes`] wrote.
pub fn console_from_bytes(b: &[u8]) -> Result<vm_superio::SerialState, KvmError> {
    let [
        baud_divisor_low,
        baud_divisor_high,
        interrupt_enable,
        interrupt_identification,
        line_control,
        line_status,
        modem_control,
        modem_status,
        scratch,
    ] = *b
        .first_chunk::<9>()
        .ok_or_else(|| KvmError::BadState("console: short".into()))?;
    Ok(vm_superio::SerialState {
        baud_divisor_low,
        baud_divisor_high,
        interrupt_enable,
        interrupt_identification,
        line_control,
        line_status,
        modem_control,
        modem_status,
        scratch,
        in_buffer: b[9..].to_vec(),
    })
}

impl VmState {
    /// Encodes the state for the wire or a file.
    pub fn to_bytes(&self) -> Vec<u8> {
        rkyv::to_bytes::<rkyv::rancor::Error>(self)
            .expect("VM state always encodes")
            .to_vec()
    }

    /// Decodes and validates state bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KvmError> {
        let state = rkyv::from_bytes::<Self, rkyv::rancor::Error>(bytes)
            .map_err(|e| KvmError::BadState(format!("invalid archive: {e}")))?;
        if state.version != STATE_VERSION {
            return Err(KvmError::BadState(format!(
                "state version {} (this build reads {STATE_VERSION})",
                state.version
            )));
        }
        Ok(state)
    }
}

fn raw<T: IntoBytes + zerocopy::Immutable>(v: &T) -> Vec<u8> {
    v.as_bytes().to_vec()
}

fn parse<T: FromBytes>(what: &'static str, bytes: &[u8]) -> Result<T, KvmError> {
    T::read_from_bytes(bytes).map_err(|_| {
        KvmError::BadState(format!(
            "{what}: {} bytes, expected {}",
            bytes.len(),
            size_of::<T>()
        ))
    })
}

/// kvm_fpu is the one structure without zerocopy derives (it has
/// alignment padding in Rust's eyes), so it is written field by field.
fn fpu_bytes(f: &kvm_fpu) -> Vec<u8> {
    let mut out = Vec::with_capacity(FPU_BYTES);
    f.fpr.iter().for_each(|r| out.extend_from_slice(r));
    out.extend_from_slice(&f.fcw.to_le_bytes());
    out.extend_from_slice(&f.fsw.to_le_bytes());
    out.push(f.ftwx);
    out.extend_from_slice(&f.last_opcode.to_le_bytes());
    out.extend_from_slice(&f.last_ip.to_le_bytes());
    out.extend_from_slice(&f.last_dp.to_le_bytes());
    f.xmm.iter().for_each(|r| out.extend_from_slice(r));
    out.extend_from_slice(&f.mxcsr.to_le_bytes());
    out
}

const FPU_BYTES: usize = 8 * 16 + 2 + 2 + 1 + 2 + 8 + 8 + 16 * 16 + 4;

fn fpu_from_bytes(b: &[u8]) -> Result<kvm_fpu, KvmError> {
    if b.len() != FPU_BYTES {
        return Err(KvmError::BadState(format!(
            "fpu: {} bytes, expected {FPU_BYTES}",
            b.len()
        )));
    }
    let mut at = 0;
    let mut take = |n: usize| {
        let s = &b[at..at + n];
        at += n;
        s
    };
    let mut f = kvm_fpu::default();
    f.fpr.iter_mut().for_each(|r| r.copy_from_slice(take(16)));
    f.fcw = u16::from_le_bytes(take(2).try_into().expect("2 bytes"));
    f.fsw = u16::from_le_bytes(take(2).try_into().expect("2 bytes"));
    f.ftwx = take(1)[0];
    f.last_opcode = u16::from_le_bytes(take(2).try_into().expect("2 bytes"));
    f.last_ip = u64::from_le_bytes(take(8).try_into().expect("8 bytes"));
    f.last_dp = u64::from_le_bytes(take(8).try_into().expect("8 bytes"));
    f.xmm.iter_mut().for_each(|r| r.copy_from_slice(take(16)));
    f.mxcsr = u32::from_le_bytes(take(4).try_into().expect("4 bytes"));
    Ok(f)
}

fn op(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |e| KvmError::Ioctl(what, e)
}

/// Reads every MSR in `indices` that KVM lets us read.
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, KvmError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|i| kvm_msr_entry {
                index: *i,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|e| KvmError::BadState(e.to_string()))?;
        let read = vcpu.get_msrs(&mut msrs).map_err(op("KVM_GET_MSRS"))?;
        out.extend(msrs.as_slice()[..read].iter().map(|e| (e.index, e.data)));
        // KVM stops at the first MSR it cannot read: skip that one.
        rest = &rest[(read + 1).min(rest.len())..];
    }
    Ok(out)
}

/// Bytes of the XSAVE area this host's KVM keeps per vCPU
/// (`KVM_CAP_XSAVE2`), at least the legacy 4 KiB.
fn xsave_bytes() -> usize {
    static BYTES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BYTES.get_or_init(|| {
        let reported = kvm_ioctls::Kvm::new()
            .map(|k| k.check_extension_int(kvm_ioctls::Cap::Xsave2))
            .unwrap_or(0);
        usize::try_from(reported)
            .unwrap_or(0)
            .max(size_of::<kvm_xsave>())
    })
}

/// An `Xsave` of this host's size, `extra` (bytes beyond the legacy
/// area) copied in and the rest zero.
fn xsave2_buffer(legacy: kvm_xsave, extra: &[u8]) -> Result<kvm_bindings::Xsave, KvmError> {
    let words = (xsave_bytes() - size_of::<kvm_xsave>()).div_ceil(4);
    let mut x =
        kvm_bindings::Xsave::new(words).map_err(|e| KvmError::BadState(format!("xsave: {e:?}")))?;
    // SAFETY: only the fixed header part is replaced; the length stays.
    unsafe { x.as_mut_fam_struct() }.xsave = legacy;
    for (dst, src) in x.as_mut_slice().iter_mut().zip(extra.chunks_exact(4)) {
        *dst = u32::from_le_bytes(src.try_into().expect("4 bytes"));
    }
    Ok(x)
}

/// The vCPU's XSAVE area: the legacy 4 KiB and what lies beyond.
fn save_xsave(vcpu: &VcpuFd) -> Result<(Vec<u8>, Vec<u8>), KvmError> {
    if xsave_bytes() == size_of::<kvm_xsave>() {
        return Ok((
            raw(&vcpu.get_xsave().map_err(op("KVM_GET_XSAVE"))?),
            Vec::new(),
        ));
    }
    let mut x = xsave2_buffer(kvm_xsave::default(), &[])?;
    // SAFETY: `x` is allocated with the size KVM_CAP_XSAVE2 reported.
    unsafe { vcpu.get_xsave2(&mut x) }.map_err(op("KVM_GET_XSAVE2"))?;
    let extra = x.as_slice().iter().flat_map(|w| w.to_le_bytes()).collect();
    Ok((raw(&x.as_fam_struct_ref().xsave), extra))
}

/// Writes a saved XSAVE area back.
fn restore_xsave(vcpu: &VcpuFd, s: &VcpuState) -> Result<(), KvmError> {
    let legacy = parse::<kvm_xsave>("xsave", &s.xsave)?;
    let need = size_of::<kvm_xsave>() + s.xsave_extra.len();
    if need > xsave_bytes() || !s.xsave_extra.len().is_multiple_of(4) {
        return Err(KvmError::BadState(format!(
            "the guest's XSAVE area is {need} bytes; this host's KVM keeps {}",
            xsave_bytes()
        )));
    }
    if xsave_bytes() == size_of::<kvm_xsave>() {
        // SAFETY: a complete legacy kvm_xsave, what this ioctl expects.
        return unsafe { vcpu.set_xsave(&legacy) }.map_err(op("KVM_SET_XSAVE"));
    }
    let x = xsave2_buffer(legacy, &s.xsave_extra)?;
    // SAFETY: `x` has the size KVM_CAP_XSAVE2 reported, so KVM reads
    // nothing past it.
    unsafe { vcpu.set_xsave2(&x) }.map_err(op("KVM_SET_XSAVE2"))
}

/// Runs the vCPU's TSC at the saved frequency (a guest calibrated its
/// clocks against it at boot).
fn restore_tsc_khz(vcpu: &VcpuFd, s: &VcpuState) -> Result<(), KvmError> {
    let here = vcpu.get_tsc_khz().unwrap_or(0);
    if s.tsc_khz == 0 || here == s.tsc_khz {
        return Ok(());
    }
    vcpu.set_tsc_khz(s.tsc_khz).map_err(|e| {
        KvmError::BadState(format!(
            "the guest's TSC runs at {} kHz; this host runs at {here} kHz and cannot scale it ({e})",
            s.tsc_khz
        ))
    })
}

/// Saves a paused vCPU.
pub(crate) fn save_vcpu(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, KvmError> {
    let cpuid = vcpu
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(op("KVM_GET_CPUID2"))?;
    let cpuid_bytes = cpuid.as_slice().iter().flat_map(raw).collect();
    let (xsave, xsave_extra) = save_xsave(vcpu)?;
    Ok(VcpuState {
        regs: raw(&vcpu.get_regs().map_err(op("KVM_GET_REGS"))?),
        sregs: raw(&vcpu.get_sregs().map_err(op("KVM_GET_SREGS"))?),
        fpu: fpu_bytes(&vcpu.get_fpu().map_err(op("KVM_GET_FPU"))?),
        xsave,
        xsave_extra,
        tsc_khz: vcpu.get_tsc_khz().unwrap_or(0),
        xcrs: raw(&vcpu.get_xcrs().map_err(op("KVM_GET_XCRS"))?),
        debugregs: raw(&vcpu.get_debug_regs().map_err(op("KVM_GET_DEBUGREGS"))?),
        lapic: raw(&vcpu.get_lapic().map_err(op("KVM_GET_LAPIC"))?),
        msrs: read_msrs(vcpu, msr_indices)?,
        events: raw(&vcpu.get_vcpu_events().map_err(op("KVM_GET_VCPU_EVENTS"))?),
        mp_state: raw(&vcpu.get_mp_state().map_err(op("KVM_GET_MP_STATE"))?),
        cpuid: cpuid_bytes,
    })
}

/// The CPUID entries a saved vCPU ran with.
pub fn cpuid_entries(s: &VcpuState) -> Result<Vec<kvm_cpuid_entry2>, KvmError> {
    let entry_bytes = size_of::<kvm_cpuid_entry2>();
    if !s.cpuid.len().is_multiple_of(entry_bytes) {
        return Err(KvmError::BadState("cpuid: partial entry".into()));
    }
    s.cpuid
        .chunks(entry_bytes)
        .map(|c| parse::<kvm_cpuid_entry2>("cpuid entry", c))
        .collect()
}

/// Replaces the CPUID entries of a saved vCPU.
pub fn set_cpuid_entries(s: &mut VcpuState, entries: &[kvm_cpuid_entry2]) {
    s.cpuid = entries.iter().flat_map(raw).collect();
}

/// Restores a vCPU that has not run since it was created (or is paused).
pub(crate) fn restore_vcpu(vcpu: &VcpuFd, s: &VcpuState) -> Result<(), KvmError> {
    let entries = cpuid_entries(s)?;
    let cpuid = CpuId::from_entries(&entries).map_err(|e| KvmError::BadState(e.to_string()))?;
    vcpu.set_cpuid2(&cpuid).map_err(op("KVM_SET_CPUID2"))?;
    restore_tsc_khz(vcpu, s)?;
    let msr_entries: Vec<kvm_msr_entry> = s
        .msrs
        .iter()
        .map(|(index, data)| kvm_msr_entry {
            index: *index,
            data: *data,
            ..Default::default()
        })
        .collect();
    for chunk in msr_entries.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
        let msrs = Msrs::from_entries(chunk).map_err(|e| KvmError::BadState(e.to_string()))?;
        let written = vcpu.set_msrs(&msrs).map_err(op("KVM_SET_MSRS"))?;
        if written != chunk.len() {
            let failed = chunk[written].index;
            return Err(KvmError::BadState(format!(
                "MSR {failed:#x} refused on restore"
            )));
        }
    }
    vcpu.set_sregs(&parse::<kvm_sregs>("sregs", &s.sregs)?)
        .map_err(op("KVM_SET_SREGS"))?;
    vcpu.set_regs(&parse::<kvm_regs>("regs", &s.regs)?)
        .map_err(op("KVM_SET_REGS"))?;
    vcpu.set_fpu(&fpu_from_bytes(&s.fpu)?)
        .map_err(op("KVM_SET_FPU"))?;
    restore_xsave(vcpu, s)?;
    vcpu.set_xcrs(&parse::<kvm_xcrs>("xcrs", &s.xcrs)?)
        .map_err(op("KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&parse::<kvm_debugregs>("debugregs", &s.debugregs)?)
        .map_err(op("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&parse::<kvm_lapic_state>("lapic", &s.lapic)?)
        .map_err(op("KVM_SET_LAPIC"))?;
    // Setting the LAPIC resets its timer: arm the TSC deadline again (a
    // Linux guest's next tick), or the guest sleeps forever.
    if let Some((_, deadline)) = s.msrs.iter().find(|(i, _)| *i == MSR_IA32_TSC_DEADLINE) {
        let entry = kvm_msr_entry {
            index: MSR_IA32_TSC_DEADLINE,
            data: *deadline,
            ..Default::default()
        };
        let msrs = Msrs::from_entries(&[entry]).map_err(|e| KvmError::BadState(e.to_string()))?;
        vcpu.set_msrs(&msrs).map_err(op("KVM_SET_MSRS"))?;
    }
    vcpu.set_vcpu_events(&parse::<kvm_vcpu_events>("events", &s.events)?)
        .map_err(op("KVM_SET_VCPU_EVENTS"))?;
    vcpu.set_mp_state(parse::<kvm_mp_state>("mp_state", &s.mp_state)?)
        .map_err(op("KVM_SET_MP_STATE"))?;
    Ok(())
}

fn irqchip(vm: &VmFd, id: u32) -> Result<Vec<u8>, KvmError> {
    let mut chip = kvm_irqchip {
        chip_id: id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(op("KVM_GET_IRQCHIP"))?;
    Ok(raw(&chip))
}

/// The VM-wide part of the state.
pub(crate) struct VmDevices {
    pub pic_master: Vec<u8>,
    pub pic_slave: Vec<u8>,
    pub ioapic: Vec<u8>,
    pub pit: Vec<u8>,
    pub clock: Vec<u8>,
}

/// Saves PICs, IOAPIC, PIT and kvmclock.
pub(crate) fn save_devices(vm: &VmFd) -> Result<VmDevices, KvmError> {
    Ok(VmDevices {
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: raw(&vm.get_pit2().map_err(op("KVM_GET_PIT2"))?),
        clock: raw(&vm.get_clock().map_err(op("KVM_GET_CLOCK"))?),
    })
}

/// Restores PICs, IOAPIC, PIT and kvmclock.
pub(crate) fn restore_devices(vm: &VmFd, s: &VmState) -> Result<(), KvmError> {
    for (what, bytes) in [
        ("pic master", &s.pic_master),
        ("pic slave", &s.pic_slave),
        ("ioapic", &s.ioapic),
    ] {
        vm.set_irqchip(&parse::<kvm_irqchip>(what, bytes)?)
            .map_err(op("KVM_SET_IRQCHIP"))?;
    }
    vm.set_pit2(&parse::<kvm_pit_state2>("pit", &s.pit)?)
        .map_err(op("KVM_SET_PIT2"))?;
    let mut clock = parse::<kvm_clock_data>("clock", &s.clock)?;
    // Only the clock value is restored; the flags describe the source host.
    clock.flags = 0;
    vm.set_clock(&clock).map_err(op("KVM_SET_CLOCK"))?;
    Ok(())
}
