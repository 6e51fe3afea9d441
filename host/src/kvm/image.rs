//! The built-in test guest, generated with iced-x86's code assembler.
//!
//! A flat binary loaded at guest-physical `0x7c00` and entered in 16-bit real
//! mode at `0000:7c00` — the boot-sector contract, which QEMU can satisfy
//! too. Ring-0 code on these machines is emulated instruction by instruction
//! (PLATFORM.md), so the guest spends as few ring-0 instructions as it can:
//! it switches to protected mode, builds identity page tables (2 MiB pages),
//! enters long mode, loads a GDT, TSS and IDT that sit ready-made in the
//! image, and drops to ring 3 (IOPL 3, interrupts off), where everything
//! else runs natively:
//!
//! 1. fill guest memory from `fill_start` to the end with non-zero
//!    xorshift data, then write 1 to `STATUS.fill_done` and `out` to
//!    [`PORT_FILLED`];
//! 2. forever: write one qword into every page of the working set (with an
//!    optional spin between pages, which sets the dirty rate), then, if the
//!    VMM attached a disk, write the next block of the disk workload (see
//!    below), then bump `STATUS.pass` and `out` the pass number to
//!    [`PORT_PASS`].
//!
//! The disk device: the guest fills the 4 KiB buffer at [`DISK_BUF_ADDR`]
//! with pattern write `seq` (block `(seq * stride) % blocks`, words as
//! `ferry_actors::storage::pattern::word`), puts the byte offset and `seq`
//! in the request block at [`DISK_REQ_ADDR`], and reads [`PORT_DISK`]: the
//! VMM performs the write, durable before it answers, and the `in` returns
//! 0 for success. Only then does the guest store `seq` in
//! `STATUS.disk_seq` — the last acknowledged write. The answer travels in a
//! register, not memory, so the VMM writes no guest memory here.
//!
//! Any CPU exception lands in a ring-0 stub that stores the vector + 1 in
//! `STATUS.exception`, reports it on [`PORT_EXCEPTION`] and halts.
//!
//! ## Memory map (guest-physical)
//! | address | what |
//! |---|---|
//! | `0x0800` | TSS (RSP0 written at boot) |
//! | `0x0900` | status block: pass, fill_done, exception, disk_seq (u64 each) |
//! | `0x0940` | disk parameters: blocks (0: no disk), stride |
//! | `0x0980` | disk request: byte offset, seq |
//! | `0x2000..0x3000` | disk buffer |
//! | `0x4000..0x6000` | ring-3 stack |
//! | `0x6000..0x7000` | ring-0 stack |
//! | `0x7c00` | this image; parameter block at `0x7c08` |
//! | `0x10000` | PML4, then PDPT at `0x11000`, PDs from `0x12000` |
//! | `fill_start` (1 MiB) .. end | random data; the working set inside it |

use iced_x86::IcedError;
use iced_x86::code_asm::*;

/// Where the image is loaded and entered.
pub const LOAD_ADDR: u64 = 0x7c00;
/// Guest-physical address of the parameter block.
pub const PARAMS_ADDR: u64 = 0x7c08;
/// Guest-physical address of the status block.
pub const STATUS_ADDR: u64 = 0x0900;
/// Offset of the pass counter in the status block.
pub const STATUS_PASS: u64 = 0;
/// Offset of the fill-done flag in the status block.
pub const STATUS_FILL_DONE: u64 = 8;
/// Offset of the exception record (vector + 1, 0 for none).
pub const STATUS_EXCEPTION: u64 = 16;
/// Port written once the fill is done.
pub const PORT_FILLED: u16 = 0xF1;
/// Port written with the pass number after every pass.
pub const PORT_PASS: u16 = 0xF0;
/// Port written with the vector of a CPU exception.
pub const PORT_EXCEPTION: u16 = 0xF2;
/// Offset of the last acknowledged disk workload write.
pub const STATUS_DISK_SEQ: u64 = 24;
/// Guest-physical address of the disk parameters (blocks, stride), which
/// the VMM writes when it attaches a disk.
pub const DISK_PARAMS_ADDR: u64 = 0x0940;
/// Guest-physical address of the disk request (byte offset, seq).
pub const DISK_REQ_ADDR: u64 = 0x0980;
/// Guest-physical address of the disk write buffer (4 KiB).
pub const DISK_BUF_ADDR: u64 = 0x2000;
/// Port the guest reads to have its disk request carried out (0: done).
pub const PORT_DISK: u16 = 0xF4;
const K_SEQ: u64 = 0x9E37_79B9_7F4A_7C15;
const K_BLOCK: u64 = 0xC2B2_AE3D_27D4_EB4F;

/// Port an idle guest writes to wait about a millisecond, as `hlt` with a
/// timer tick would (ring 3 cannot halt): an idle guest then leaves the
/// host's cores to the migration instead of spinning on one.
pub const PORT_IDLE: u16 = 0xF3;
/// How long the VMM lets an idle guest wait per [`PORT_IDLE`] write.
pub const IDLE_WAIT: std::time::Duration = std::time::Duration::from_millis(1);
/// Magic at the start of the parameter block.
pub const PARAMS_MAGIC: &[u8; 8] = b"FERRYGST";
/// First byte the guest fills: everything below holds code and tables.
pub const FILL_START: u64 = 1 << 20;
/// Largest guest memory the page tables cover.
pub const MEMORY_BYTES_MAX: u64 = 64 << 30;

const TSS_ADDR: u64 = 0x0800;
const USER_STACK_TOP: u64 = 0x6000;
const KERNEL_STACK_TOP: u64 = 0x7000;
const PML4_ADDR: u32 = 0x10000;
const PDPT_ADDR: u32 = 0x11000;
const PD_ADDR: u32 = 0x12000;

// Fixed places of the image's parts (guest-physical).
const REAL_MODE_CODE: u64 = 0x7c40;
const IDTR_ADDR: u64 = 0x7ca0;
const GDTR_ADDR: u64 = 0x7cb0;
const GDT_ADDR: u64 = 0x7cc0;
const PROTECTED_CODE: u64 = 0x7d00;
const LONG_MODE_CODE: u64 = 0x7e00;
const STUBS_ADDR: u64 = 0x7f00;
const STUB_BYTES: u64 = 16;
const EXCEPTIONS: u64 = 32;
const COMMON_HANDLER: u64 = STUBS_ADDR + EXCEPTIONS * STUB_BYTES;
const USER_CODE: u64 = 0x8200;
const IDT_ADDR: u64 = 0x8800;
const IMAGE_END: u64 = IDT_ADDR + EXCEPTIONS * 16;

const SEL_CODE32: u16 = 0x08;
const SEL_DATA: u16 = 0x10;
const SEL_CODE64: u16 = 0x18;
const SEL_USER_DATA: u64 = 0x20 | 3;
const SEL_USER_CODE: u64 = 0x28 | 3;
const SEL_TSS: u16 = 0x30;

/// The guest's parameters, written into the image's parameter block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestParams {
    /// Guest memory size in bytes (the fill runs to its end).
    pub memory_bytes: u64,
    /// First byte of the working set.
    pub wss_start: u64,
    /// Bytes of the working set (0: no dirtying; the guest only spins and
    /// counts passes).
    pub wss_bytes: u64,
    /// Spin iterations after each page write (0: full speed).
    pub delay_loops: u64,
    /// Seed of the fill data.
    pub seed: u64,
}

/// Why a parameter set cannot run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParamsError {
    /// Memory too small or too large.
    #[error("guest memory of {} KiB: must be a multiple of 2 MiB, from 2 MiB to 64 GiB", .0 / 1024)]
    Memory(u64),
    /// Working set outside the filled memory.
    #[error(
        "working set {start:#x}+{bytes:#x} lies outside the guest's filled memory (1 MiB..{memory:#x})"
    )]
    WorkingSet {
        /// Start.
        start: u64,
        /// Length.
        bytes: u64,
        /// Memory size.
        memory: u64,
    },
}

impl GuestParams {
    /// A guest of `memory_mib` MiB dirtying `wss_mib` MiB from 1 MiB up.
    pub fn new(memory_mib: u64, wss_mib: u64) -> Self {
        Self {
            memory_bytes: memory_mib << 20,
            wss_start: FILL_START,
            wss_bytes: wss_mib << 20,
            delay_loops: 0,
            seed: 0x9e37_79b9_7f4a_7c15,
        }
    }

    /// Checks the parameters against the image's limits.
    pub fn check(&self) -> Result<(), ParamsError> {
        let m = self.memory_bytes;
        if !((2 << 20)..=MEMORY_BYTES_MAX).contains(&m) || !m.is_multiple_of(2 << 20) {
            return Err(ParamsError::Memory(m));
        }
        let end = self.wss_start.checked_add(self.wss_bytes);
        let page_aligned =
            self.wss_start.is_multiple_of(4096) && self.wss_bytes.is_multiple_of(4096);
        if self.wss_start < FILL_START || end.is_none_or(|e| e > m) || !page_aligned {
            return Err(ParamsError::WorkingSet {
                start: self.wss_start,
                bytes: self.wss_bytes,
                memory: m,
            });
        }
        Ok(())
    }

    /// The parameter block as it sits in guest memory.
    pub fn encode(&self) -> [u8; 56] {
        let mut out = [0u8; 56];
        out[..8].copy_from_slice(PARAMS_MAGIC);
        let fields = [
            self.memory_bytes,
            FILL_START,
            self.wss_start,
            self.wss_bytes,
            self.delay_loops,
            self.seed | 1,
        ];
        for (i, v) in fields.iter().enumerate() {
            out[8 + i * 8..16 + i * 8].copy_from_slice(&v.to_le_bytes());
        }
        out
    }
}

const P_MEMORY: u64 = PARAMS_ADDR + 8;
const P_FILL_START: u64 = PARAMS_ADDR + 16;
const P_WSS_START: u64 = PARAMS_ADDR + 24;
const P_WSS_BYTES: u64 = PARAMS_ADDR + 32;
const P_DELAY: u64 = PARAMS_ADDR + 40;
const P_SEED: u64 = PARAMS_ADDR + 48;

/// Builds the guest image with `params` in its parameter block.
pub fn build(params: &GuestParams) -> Result<Vec<u8>, IcedError> {
    let len = usize::try_from(IMAGE_END - LOAD_ADDR).expect("image fits");
    let mut image = vec![0u8; len];
    let mut place = |addr: u64, bytes: &[u8]| {
        let at = usize::try_from(addr - LOAD_ADDR).expect("inside image");
        assert!(
            at + bytes.len() <= image.len(),
            "part at {addr:#x} overflows the image"
        );
        image[at..at + bytes.len()].copy_from_slice(bytes);
    };
    // jmp short REAL_MODE_CODE, over the parameter block.
    let rel = u8::try_from(REAL_MODE_CODE - (LOAD_ADDR + 2)).expect("short jump");
    place(LOAD_ADDR, &[0xEB, rel]);
    place(PARAMS_ADDR, &params.encode());
    place(
        REAL_MODE_CODE,
        &fits(real_mode()?, IDTR_ADDR - REAL_MODE_CODE),
    );
    place(
        IDTR_ADDR,
        &descriptor_register(EXCEPTIONS * 16 - 1, IDT_ADDR),
    );
    place(
        GDTR_ADDR,
        &descriptor_register(GDT.len() as u64 * 8 - 1, GDT_ADDR),
    );
    let gdt: Vec<u8> = GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
    place(GDT_ADDR, &gdt);
    place(
        PROTECTED_CODE,
        &fits(protected_mode()?, LONG_MODE_CODE - PROTECTED_CODE),
    );
    place(
        LONG_MODE_CODE,
        &fits(long_mode()?, STUBS_ADDR - LONG_MODE_CODE),
    );
    for v in 0..EXCEPTIONS {
        place(STUBS_ADDR + v * STUB_BYTES, &fits(stub(v)?, STUB_BYTES));
    }
    place(
        COMMON_HANDLER,
        &fits(common_handler()?, USER_CODE - COMMON_HANDLER),
    );
    place(USER_CODE, &fits(user_code()?, IDT_ADDR - USER_CODE));
    let idt: Vec<u8> = (0..EXCEPTIONS)
        .flat_map(|v| interrupt_gate(STUBS_ADDR + v * STUB_BYTES))
        .collect();
    place(IDT_ADDR, &idt);
    Ok(image)
}

/// A low address or selector as a 32-bit immediate.
fn imm32(v: u64) -> u32 {
    u32::try_from(v).expect("low constant fits 32 bits")
}

/// A low address or selector as a sign-extended 32-bit immediate.
fn imm_i32(v: u64) -> i32 {
    i32::try_from(v).expect("low constant fits 31 bits")
}

fn fits(code: Vec<u8>, room: u64) -> Vec<u8> {
    assert!(
        code.len() as u64 <= room,
        "code of {} bytes exceeds its {room}",
        code.len()
    );
    code
}

const GDT: [u64; 8] = [
    0,
    0x00CF_9A00_0000_FFFF, // 0x08: 32-bit code, ring 0
    0x00CF_9200_0000_FFFF, // 0x10: data, ring 0
    0x00AF_9A00_0000_FFFF, // 0x18: 64-bit code, ring 0
    0x00CF_F200_0000_FFFF, // 0x20: data, ring 3
    0x00AF_FA00_0000_FFFF, // 0x28: 64-bit code, ring 3
    // 0x30: 64-bit available TSS at TSS_ADDR, limit 0x67 (two entries).
    0x67 | (TSS_ADDR & 0xFF_FFFF) << 16 | 0x89 << 40,
    0,
];

fn descriptor_register(limit: u64, base: u64) -> [u8; 10] {
    let mut out = [0u8; 10];
    out[..2].copy_from_slice(&u16::try_from(limit).expect("limit").to_le_bytes());
    out[2..].copy_from_slice(&base.to_le_bytes());
    out
}

fn interrupt_gate(handler: u64) -> [u8; 16] {
    let low = (handler & 0xFFFF)
        | u64::from(SEL_CODE64) << 16
        | 0x8E << 40 // present, DPL 0, 64-bit interrupt gate
        | ((handler >> 16) & 0xFFFF) << 48;
    let high = handler >> 32;
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&low.to_le_bytes());
    out[8..].copy_from_slice(&high.to_le_bytes());
    out
}

fn far_jump(bits16: bool, target: u64, selector: u16) -> Vec<u8> {
    let mut out = Vec::new();
    if bits16 {
        out.push(0x66);
    }
    out.push(0xEA);
    out.extend_from_slice(&u32::try_from(target).expect("low target").to_le_bytes());
    out.extend_from_slice(&selector.to_le_bytes());
    out
}

/// 16-bit: load the GDT, enable protection, jump to 32-bit code.
fn real_mode() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(16)?;
    a.cli()?;
    a.xor(ax, ax)?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(ss, ax)?;
    a.mov(sp, 0x7000u32)?;
    a.lgdt(ptr(GDTR_ADDR))?;
    a.mov(eax, cr0)?;
    a.or(eax, 1)?;
    a.mov(cr0, eax)?;
    let mut code = a.assemble(REAL_MODE_CODE)?;
    code.extend(far_jump(true, PROTECTED_CODE, SEL_CODE32));
    Ok(code)
}

/// 32-bit: identity page tables with 2 MiB pages (user-accessible), PAE,
/// EFER.LME, paging, jump to 64-bit code.
fn protected_mode() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(32)?;
    a.mov(ax, u32::from(SEL_DATA))?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(ss, ax)?;
    a.mov(esp, imm32(KERNEL_STACK_TOP))?;
    // PML4[0] -> PDPT.
    a.mov(dword_ptr(u64::from(PML4_ADDR)), PDPT_ADDR | 7)?;
    // ecx = number of GiB = ceil(memory / 1 GiB); PDPT[i] -> PD i.
    a.mov(eax, dword_ptr(P_MEMORY))?;
    a.mov(edx, dword_ptr(P_MEMORY + 4))?;
    a.add(eax, 0x3FFF_FFFF)?;
    a.adc(edx, 0)?;
    a.shrd(eax, edx, 30)?;
    a.mov(ecx, eax)?;
    a.xor(ebx, ebx)?;
    let mut pdpt_loop = a.create_label();
    a.set_label(&mut pdpt_loop)?;
    a.mov(eax, ebx)?;
    a.shl(eax, 12)?;
    a.add(eax, PD_ADDR | 7)?;
    a.mov(dword_ptr(ebx * 8 + PDPT_ADDR), eax)?;
    a.inc(ebx)?;
    a.cmp(ebx, ecx)?;
    a.jb(pdpt_loop)?;
    // PD entries: 512 per GiB; entry j maps j * 2 MiB (PS, U, RW, P).
    a.shl(ecx, 9)?;
    a.xor(ebx, ebx)?;
    let mut pd_loop = a.create_label();
    a.set_label(&mut pd_loop)?;
    a.mov(eax, ebx)?;
    a.shl(eax, 21)?;
    a.or(eax, 0x87)?;
    a.mov(dword_ptr(ebx * 8 + PD_ADDR), eax)?;
    a.mov(eax, ebx)?;
    a.shr(eax, 11)?;
    a.mov(dword_ptr(ebx * 8 + (PD_ADDR + 4)), eax)?;
    a.inc(ebx)?;
    a.cmp(ebx, ecx)?;
    a.jb(pd_loop)?;
    // CR4: PAE, OSFXSR, OSXMMEXCPT.
    a.mov(eax, cr4)?;
    a.or(eax, 0x20 | 0x200 | 0x400)?;
    a.mov(cr4, eax)?;
    a.mov(eax, PML4_ADDR)?;
    a.mov(cr3, eax)?;
    a.mov(ecx, 0xC000_0080u32)?;
    a.rdmsr()?;
    a.or(eax, 0x100)?;
    a.wrmsr()?;
    a.mov(eax, cr0)?;
    a.or(eax, 0x8000_0000u32)?;
    a.mov(cr0, eax)?;
    let mut code = a.assemble(PROTECTED_CODE)?;
    code.extend(far_jump(false, LONG_MODE_CODE, SEL_CODE64));
    Ok(code)
}

/// 64-bit ring 0: segments, TSS, IDT, then iretq to ring 3 with IOPL 3.
fn long_mode() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    a.mov(ax, u32::from(SEL_DATA))?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(ss, ax)?;
    a.mov(rsp, KERNEL_STACK_TOP)?;
    a.mov(dword_ptr(TSS_ADDR + 4), imm32(KERNEL_STACK_TOP))?;
    a.mov(ax, u32::from(SEL_TSS))?;
    a.ltr(ax)?;
    a.lidt(ptr(IDTR_ADDR))?;
    a.push(imm_i32(SEL_USER_DATA))?;
    a.push(imm_i32(USER_STACK_TOP))?;
    a.push(0x3002)?; // IOPL 3, reserved bit 1, interrupts off
    a.push(imm_i32(SEL_USER_CODE))?;
    a.push(imm_i32(USER_CODE))?;
    a.iretq()?;
    a.assemble(LONG_MODE_CODE)
}

/// One exception stub: vector in eax, then the common handler.
fn stub(vector: u64) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    a.mov(eax, u32::try_from(vector).expect("vector"))?;
    a.jmp(COMMON_HANDLER)?;
    a.assemble(STUBS_ADDR + vector * STUB_BYTES)
}

/// Records the vector, reports it, halts for good.
fn common_handler() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    a.lea(ecx, eax + 1)?;
    a.mov(dword_ptr(STATUS_ADDR + STATUS_EXCEPTION), ecx)?;
    a.mov(dx, u32::from(PORT_EXCEPTION))?;
    a.out(dx, eax)?;
    let mut halt = a.create_label();
    a.set_label(&mut halt)?;
    a.cli()?;
    a.hlt()?;
    a.jmp(halt)?;
    a.assemble(COMMON_HANDLER)
}

/// Ring 3: fill, then dirty the working set forever.
fn user_code() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    // Fill [fill_start, memory) with xorshift64 values (never zero).
    a.mov(rdi, qword_ptr(P_FILL_START))?;
    a.mov(rcx, qword_ptr(P_MEMORY))?;
    a.sub(rcx, rdi)?;
    a.shr(rcx, 3)?;
    a.mov(rax, qword_ptr(P_SEED))?;
    let mut fill = a.create_label();
    a.set_label(&mut fill)?;
    a.mov(rdx, rax)?;
    a.shl(rdx, 13)?;
    a.xor(rax, rdx)?;
    a.mov(rdx, rax)?;
    a.shr(rdx, 7)?;
    a.xor(rax, rdx)?;
    a.mov(rdx, rax)?;
    a.shl(rdx, 17)?;
    a.xor(rax, rdx)?;
    a.mov(qword_ptr(rdi), rax)?;
    a.add(rdi, 8)?;
    a.dec(rcx)?;
    a.jnz(fill)?;
    a.mov(qword_ptr(STATUS_ADDR + STATUS_FILL_DONE), 1)?;
    a.mov(dx, u32::from(PORT_FILLED))?;
    a.out(dx, eax)?;

    // r8 = pass counter (carried over from the status block, so a restored
    // guest continues counting), r10 = delay, r11 = spin when idle.
    a.mov(r8, qword_ptr(STATUS_ADDR + STATUS_PASS))?;
    a.mov(r10, qword_ptr(P_DELAY))?;
    let mut pass = a.create_label();
    a.set_label(&mut pass)?;
    a.mov(rsi, qword_ptr(P_WSS_START))?;
    a.mov(rcx, qword_ptr(P_WSS_BYTES))?;
    a.shr(rcx, 12)?;
    // Offset inside each page varies with the pass: (pass & 511) * 8.
    a.mov(r9, r8)?;
    a.and(r9, 511)?;
    a.shl(r9, 3)?;
    let mut idle = a.create_label();
    let mut pass_done = a.create_label();
    a.test(rcx, rcx)?;
    a.jz(idle)?;
    let mut page = a.create_label();
    a.set_label(&mut page)?;
    a.mov(qword_ptr(rsi + r9), r8)?;
    a.mov(rdx, r10)?;
    let mut spin = a.create_label();
    let mut spun = a.create_label();
    a.set_label(&mut spin)?;
    a.test(rdx, rdx)?;
    a.jz(spun)?;
    a.dec(rdx)?;
    a.jmp(spin)?;
    a.set_label(&mut spun)?;
    a.add(rsi, 4096)?;
    a.dec(rcx)?;
    a.jnz(page)?;
    a.jmp(pass_done)?;
    // No working set: wait on the idle port (the VMM sleeps about a
    // millisecond), so an idle guest is idle and passes stay countable.
    a.set_label(&mut idle)?;
    a.mov(dx, u32::from(PORT_IDLE))?;
    a.out(dx, eax)?;
    a.set_label(&mut pass_done)?;
    disk_write(&mut a)?;
    a.inc(r8)?;
    a.mov(qword_ptr(STATUS_ADDR + STATUS_PASS), r8)?;
    a.mov(eax, r8d)?;
    a.mov(dx, u32::from(PORT_PASS))?;
    a.out(dx, eax)?;
    a.jmp(pass)?;
    a.assemble(USER_CODE)
}

/// One write of the disk workload, if a disk is attached.
fn disk_write(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut skip = a.create_label();
    a.mov(rcx, qword_ptr(DISK_PARAMS_ADDR))?;
    a.test(rcx, rcx)?;
    a.jz(skip)?;
    // r11 = seq, r12 = block = (seq * stride) % blocks.
    a.mov(r11, qword_ptr(STATUS_ADDR + STATUS_DISK_SEQ))?;
    a.inc(r11)?;
    a.mov(rax, r11)?;
    a.mul(qword_ptr(DISK_PARAMS_ADDR + 8))?;
    a.div(rcx)?;
    a.mov(r12, rdx)?;
    // Words: block, seq, then seq*K_SEQ ^ block*K_BLOCK ^ index.
    a.mov(rax, r11)?;
    a.mov(rbx, K_SEQ)?;
    a.imul_2(rax, rbx)?;
    a.mov(rdx, r12)?;
    a.mov(rbx, K_BLOCK)?;
    a.imul_2(rdx, rbx)?;
    a.xor(rax, rdx)?;
    a.mov(edi, imm32(DISK_BUF_ADDR))?;
    a.mov(qword_ptr(rdi), r12)?;
    a.mov(qword_ptr(rdi + 8), r11)?;
    a.mov(ecx, 2u32)?;
    let mut word = a.create_label();
    a.set_label(&mut word)?;
    a.mov(rdx, rax)?;
    a.xor(rdx, rcx)?;
    a.mov(qword_ptr(rdi + rcx * 8), rdx)?;
    a.inc(rcx)?;
    a.cmp(rcx, 512)?;
    a.jne(word)?;
    a.mov(rax, r12)?;
    a.shl(rax, 12)?;
    a.mov(qword_ptr(DISK_REQ_ADDR), rax)?;
    a.mov(qword_ptr(DISK_REQ_ADDR + 8), r11)?;
    a.mov(dx, u32::from(PORT_DISK))?;
    a.in_(eax, dx)?;
    a.test(eax, eax)?;
    a.jnz(skip)?;
    a.mov(qword_ptr(STATUS_ADDR + STATUS_DISK_SEQ), r11)?;
    a.set_label(&mut skip)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_has_its_parts_in_place() {
        let params = GuestParams::new(64, 8);
        let image = build(&params).expect("assemble");
        assert_eq!(image[0], 0xEB, "starts with a short jump");
        let p = usize::try_from(PARAMS_ADDR - LOAD_ADDR).expect("small");
        assert_eq!(&image[p..p + 8], PARAMS_MAGIC);
        assert_eq!(&image[p..p + 56], &params.encode());
        assert_eq!(
            u64::try_from(image.len()).expect("small"),
            IMAGE_END - LOAD_ADDR
        );
        let gdt = usize::try_from(GDT_ADDR - LOAD_ADDR).expect("small");
        assert_eq!(&image[gdt + 8..gdt + 16], &GDT[1].to_le_bytes());
    }

    #[test]
    fn params_are_checked() {
        assert!(GuestParams::new(64, 8).check().is_ok());
        assert!(matches!(
            GuestParams::new(1, 0).check(),
            Err(ParamsError::Memory(_))
        ));
        assert!(matches!(
            GuestParams::new(64, 64).check(),
            Err(ParamsError::WorkingSet { .. })
        ));
        let mut p = GuestParams::new(64, 8);
        p.memory_bytes += 4096;
        assert!(p.check().is_err());
    }
}
