//! virtio-net driven as Linux's driver would: MAC from the configuration
//! space, frames sent on the transmit queue, frames received into the
//! buffers the driver posted, state saved and restored between frames,
//! the RARP announcement.

use std::sync::{Arc, Mutex};

use vm_memory::{Address, Bytes, GuestAddress};

use super::mmio::{INT_VRING, MmioTransport, TransportSnapshot};
use super::net::{Net, NetIo, rarp};
use crate::kvm::Memory;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const SIZE: u16 = 8;

/// Frames both ways, shared with the test.
#[derive(Clone, Default)]
struct Wire {
    sent: Arc<Mutex<Vec<Vec<u8>>>>,
    arriving: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl NetIo for Wire {
    fn send(&mut self, frame: &[u8]) {
        self.sent.lock().expect("wire").push(frame.to_vec());
    }

    fn receive(&mut self, buf: &mut [u8]) -> Option<usize> {
        let mut q = self.arriving.lock().expect("wire");
        if q.is_empty() {
            return None;
        }
        let f = q.remove(0);
        buf[..f.len()].copy_from_slice(&f);
        Some(f.len())
    }
}

/// One split ring in guest memory at `base` (descriptors, avail, used).
struct Ring {
    base: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl Ring {
    fn desc_table(&self) -> u64 {
        self.base
    }
    fn avail(&self) -> u64 {
        self.base + 0x1000
    }
    fn used(&self) -> u64 {
        self.base + 0x2000
    }

    /// Posts one buffer as a one-descriptor chain.
    fn post(&mut self, m: &Memory, addr: u64, len: u32, writable: bool) {
        let i = self.next_desc % SIZE;
        self.next_desc += 1;
        let at = GuestAddress(self.desc_table() + u64::from(i) * 16);
        m.write_obj(addr, at).expect("desc");
        m.write_obj(len, at.unchecked_add(8)).expect("desc");
        m.write_obj(if writable { 2u16 } else { 0 }, at.unchecked_add(12))
            .expect("desc");
        let slot = self.avail() + 4 + u64::from(self.avail_idx % SIZE) * 2;
        m.write_obj(i, GuestAddress(slot)).expect("avail");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        m.write_obj(self.avail_idx, GuestAddress(self.avail() + 2))
            .expect("avail idx");
    }

    fn used_idx(&self, m: &Memory) -> u16 {
        m.read_obj(GuestAddress(self.used() + 2)).expect("used")
    }

    /// The length of used entry `n`.
    fn used_len(&self, m: &Memory, n: u16) -> u32 {
        let at = self.used() + 4 + u64::from(n % SIZE) * 8 + 4;
        m.read_obj(GuestAddress(at)).expect("used len")
    }
}

fn write(t: &mut MmioTransport<Net<Wire>>, m: &Memory, offset: u64, value: u32) -> bool {
    t.write(offset, &value.to_le_bytes(), m)
}

fn read(t: &MmioTransport<Net<Wire>>, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// Probes and sets the NIC up with its receive and transmit rings.
fn set_up(t: &mut MmioTransport<Net<Wire>>, m: &Memory, rx: &Ring, tx: &Ring) {
    assert_eq!(read(t, 0x008), 1, "a network device");
    write(t, m, 0x070, 1 | 2);
    write(t, m, 0x014, 0);
    assert_ne!(read(t, 0x010) & (1 << 5), 0, "MAC offered");
    write(t, m, 0x024, 1);
    write(t, m, 0x020, 1);
    write(t, m, 0x024, 0);
    write(t, m, 0x020, 1 << 5);
    write(t, m, 0x070, 1 | 2 | 8);
    for (index, ring) in [(0u32, rx), (1, tx)] {
        write(t, m, 0x030, index);
        write(t, m, 0x038, u32::from(SIZE));
        for (low, addr) in [
            (0x080, ring.desc_table()),
            (0x090, ring.avail()),
            (0x0a0, ring.used()),
        ] {
            write(t, m, low, u32::try_from(addr).expect("low"));
            write(t, m, low + 4, 0);
        }
        write(t, m, 0x044, 1);
    }
    write(t, m, 0x070, 1 | 2 | 8 | 4);
}

fn memory() -> Memory {
    crate::kvm::memory_of(crate::kvm::shared_memory(1 << 20).expect("memory")).expect("memory")
}

#[test]
fn frames_go_out_and_come_in_and_the_state_moves_between_them() {
    let m = memory();
    let wire = Wire::default();
    let mut t = MmioTransport::new(Net::new(wire.clone(), MAC));
    let (mut rx, mut tx) = (
        Ring {
            base: 0x10000,
            next_desc: 0,
            avail_idx: 0,
        },
        Ring {
            base: 0x20000,
            next_desc: 0,
            avail_idx: 0,
        },
    );
    assert!(!t.announce(), "no announcement before the driver is up");
    set_up(&mut t, &m, &rx, &tx);
    let mut mac = [0u8; 6];
    t.read(0x100, &mut mac);
    assert_eq!(mac, MAC);

    // Transmit: a 12-byte header then the frame.
    let frame: Vec<u8> = (0..60u8).collect();
    m.write_slice(&[0; 12], GuestAddress(0x40000)).expect("hdr");
    m.write_slice(&frame, GuestAddress(0x4000c)).expect("frame");
    tx.post(&m, 0x40000, 72, false);
    assert!(write(&mut t, &m, 0x050, 1), "used: interrupt");
    assert_eq!(*wire.sent.lock().expect("wire"), vec![frame.clone()]);

    // Receive: nothing until a frame arrives; then header + frame land in
    // the posted buffer and the used length says how much.
    rx.post(&m, 0x50000, 1530, true);
    rx.post(&m, 0x51000, 1530, true);
    assert!(!write(&mut t, &m, 0x050, 0), "no frame yet");
    assert!(!t.poll(&m));
    wire.arriving.lock().expect("wire").push(vec![0xee; 100]);
    assert!(t.poll(&m), "delivered");
    assert_eq!(read(&t, 0x060) & INT_VRING, INT_VRING);
    assert_eq!(rx.used_idx(&m), 1);
    assert_eq!(rx.used_len(&m, 0), 112);
    let mut got = [0u8; 112];
    m.read_slice(&mut got, GuestAddress(0x50000)).expect("rx");
    assert_eq!(&got[10..12], &1u16.to_le_bytes(), "one buffer");
    assert!(got[12..].iter().all(|b| *b == 0xee));

    // Saved between frames and restored on a new NIC (the destination):
    // the next frame goes into the second buffer, not the first again.
    let saved = t.snapshot();
    let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&saved).expect("encode");
    let back = rkyv::from_bytes::<TransportSnapshot, rkyv::rancor::Error>(&bytes).expect("decode");
    let there = Wire::default();
    let mut moved = MmioTransport::new(Net::new(there.clone(), MAC));
    moved.restore(&back).expect("restore");
    there.arriving.lock().expect("wire").push(vec![0x77; 64]);
    assert!(moved.poll(&m));
    assert_eq!(rx.used_idx(&m), 2);
    m.read_slice(&mut got[..76], GuestAddress(0x51000))
        .expect("rx");
    assert!(got[12..76].iter().all(|b| *b == 0x77));

    // A frame that finds no buffer waits for the next one posted.
    there.arriving.lock().expect("wire").push(vec![0x55; 64]);
    assert!(!moved.poll(&m), "no buffer left");
    rx.post(&m, 0x52000, 1530, true);
    assert!(write(&mut moved, &m, 0x050, 0), "delivered on the notify");
    assert_eq!(rx.used_idx(&m), 3);

    // The destination announces the guest's MAC.
    assert!(moved.announce());
    let sent = there.sent.lock().expect("wire");
    assert_eq!(sent.as_slice(), &[rarp(MAC)]);
    assert_eq!(&sent[0][6..12], &MAC, "from the guest's MAC");
    assert_eq!(&sent[0][12..14], &[0x80, 0x35], "RARP");
    assert_eq!(moved.device().counters().announced, 1);
}
