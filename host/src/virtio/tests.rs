//! The transport and virtio-blk driven as a Linux driver would: probe,
//! feature negotiation, queue setup, requests on a split ring, interrupt
//! acknowledgement; device state saved and restored mid-stream.

use vm_memory::{Address, Bytes, GuestAddress};

use super::blk::{Blk, BlockIo, SECTOR};
use super::mmio::{INT_VRING, MmioTransport, TransportSnapshot};
use crate::kvm::Memory;

/// A disk in memory that counts what it was asked.
#[derive(Debug, Clone, Default)]
struct MemDisk {
    bytes: Vec<u8>,
    flushes: u32,
    fail_writes: bool,
}

impl BlockIo for MemDisk {
    fn len_bytes(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let at = usize::try_from(offset).map_err(|e| e.to_string())?;
        buf.copy_from_slice(&self.bytes[at..at + buf.len()]);
        Ok(())
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        if self.fail_writes {
            return Err("no space left on device".into());
        }
        let at = usize::try_from(offset).map_err(|e| e.to_string())?;
        self.bytes[at..at + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), String> {
        self.flushes += 1;
        Ok(())
    }
}

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const HEADER: u64 = 0x4000;
const DATA: u64 = 0x10000;
const STATUS: u64 = 0x5000;
const SIZE: u16 = 16;

/// A driver's side of one split ring.
struct Driver {
    memory: Memory,
    next_desc: u16,
    avail_idx: u16,
}

impl Driver {
    fn new() -> Self {
        let region = crate::kvm::shared_memory(1 << 20).expect("memory");
        Self {
            memory: crate::kvm::memory_of(region).expect("memory"),
            next_desc: 0,
            avail_idx: 0,
        }
    }

    fn reg_write(&self, t: &mut MmioTransport<Blk<MemDisk>>, offset: u64, value: u32) -> bool {
        t.write(offset, &value.to_le_bytes(), &self.memory)
    }

    fn reg_read(t: &MmioTransport<Blk<MemDisk>>, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Probe and set up as Linux's virtio_mmio and virtio_blk do.
    fn set_up(&self, t: &mut MmioTransport<Blk<MemDisk>>) {
        assert_eq!(Self::reg_read(t, 0x000), 0x7472_6976, "magic");
        assert_eq!(Self::reg_read(t, 0x004), 2, "version");
        assert_eq!(Self::reg_read(t, 0x008), 2, "a block device");
        self.reg_write(t, 0x070, 1 | 2); // ACKNOWLEDGE | DRIVER
        self.reg_write(t, 0x014, 1);
        let high = Self::reg_read(t, 0x010);
        assert_eq!(high & 1, 1, "virtio 1.x offered");
        self.reg_write(t, 0x014, 0);
        let low = Self::reg_read(t, 0x010);
        assert_ne!(low & (1 << 9), 0, "flush offered");
        self.reg_write(t, 0x024, 1);
        self.reg_write(t, 0x020, 1);
        self.reg_write(t, 0x024, 0);
        self.reg_write(t, 0x020, 1 << 9);
        self.reg_write(t, 0x070, 1 | 2 | 8); // FEATURES_OK
        assert_ne!(Self::reg_read(t, 0x070) & 8, 0, "features accepted");
        self.reg_write(t, 0x030, 0);
        assert!(Self::reg_read(t, 0x034) >= u32::from(SIZE));
        self.reg_write(t, 0x038, u32::from(SIZE));
        for (low, addr) in [(0x080, DESC), (0x090, AVAIL), (0x0a0, USED)] {
            self.reg_write(t, low, u32::try_from(addr).expect("below 4 GiB"));
            self.reg_write(t, low + 4, 0);
        }
        self.reg_write(t, 0x044, 1);
        self.reg_write(t, 0x070, 1 | 2 | 8 | 4); // DRIVER_OK
    }

    fn desc(&mut self, addr: u64, len: u32, writable: bool, last: bool) -> u16 {
        let i = self.next_desc % SIZE;
        self.next_desc += 1;
        let at = GuestAddress(DESC + u64::from(i) * 16);
        let flags: u16 = u16::from(!last) | if writable { 2 } else { 0 };
        let next = (i + 1) % SIZE;
        self.memory.write_obj(addr, at).expect("desc");
        self.memory
            .write_obj(len, at.unchecked_add(8))
            .expect("desc");
        self.memory
            .write_obj(flags, at.unchecked_add(12))
            .expect("desc");
        self.memory
            .write_obj(next, at.unchecked_add(14))
            .expect("desc");
        i
    }

    /// Queues a request (header, data buffers, status) and notifies.
    fn request(
        &mut self,
        t: &mut MmioTransport<Blk<MemDisk>>,
        kind: u32,
        sector: u64,
        data: &[(u64, u32, bool)],
    ) -> bool {
        self.memory
            .write_obj(kind, GuestAddress(HEADER))
            .expect("header");
        self.memory
            .write_obj(0u32, GuestAddress(HEADER + 4))
            .expect("header");
        self.memory
            .write_obj(sector, GuestAddress(HEADER + 8))
            .expect("header");
        self.memory
            .write_obj(0xffu8, GuestAddress(STATUS))
            .expect("status");
        let head = self.desc(HEADER, 16, false, false);
        for (addr, len, writable) in data {
            self.desc(*addr, *len, *writable, false);
        }
        self.desc(STATUS, 1, true, true);
        let slot = AVAIL + 4 + u64::from(self.avail_idx % SIZE) * 2;
        self.memory
            .write_obj(head, GuestAddress(slot))
            .expect("avail");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.memory
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .expect("avail idx");
        self.reg_write(t, 0x050, 0)
    }

    fn status(&self) -> u8 {
        self.memory.read_obj(GuestAddress(STATUS)).expect("status")
    }

    fn used_idx(&self) -> u16 {
        self.memory
            .read_obj(GuestAddress(USED + 2))
            .expect("used idx")
    }
}

fn device(sectors: u64) -> MmioTransport<Blk<MemDisk>> {
    let disk = MemDisk {
        bytes: vec![0; usize::try_from(sectors * SECTOR).expect("small")],
        ..MemDisk::default()
    };
    MmioTransport::new(Blk::new(disk, "ferry-disk0"))
}

#[test]
fn a_driver_writes_reads_flushes_and_gets_the_id() {
    let mut t = device(64);
    let mut d = Driver::new();
    d.set_up(&mut t);
    assert!(t.driver_ok());
    // The capacity in sectors, from the configuration space.
    let mut cap = [0u8; 8];
    t.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 64);

    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7).to_le_bytes()[0]).collect();
    d.memory
        .write_slice(&pattern, GuestAddress(DATA))
        .expect("data");
    assert!(d.request(
        &mut t,
        1,
        3,
        &[(DATA, 512, false), (DATA + 512, 512, false)]
    ));
    assert_eq!(d.status(), 0, "write OK");
    assert_eq!(
        &t.device().backend().bytes[3 * 512..5 * 512],
        &pattern[..],
        "on the disk where the guest put it"
    );
    assert_eq!(Driver::reg_read(&t, 0x060) & INT_VRING, INT_VRING);
    d.reg_write(&mut t, 0x064, INT_VRING);
    assert_eq!(Driver::reg_read(&t, 0x060), 0, "acknowledged");

    let back = DATA + 0x1000;
    assert!(d.request(&mut t, 0, 3, &[(back, 1024, true)]));
    assert_eq!(d.status(), 0, "read OK");
    let mut got = vec![0u8; 1024];
    d.memory
        .read_slice(&mut got, GuestAddress(back))
        .expect("read");
    assert_eq!(got, pattern);

    assert!(d.request(&mut t, 4, 0, &[]));
    assert_eq!(d.status(), 0);
    assert_eq!(t.device().backend().flushes, 1);

    assert!(d.request(&mut t, 8, 0, &[(back, 20, true)]));
    let mut id = [0u8; 11];
    d.memory
        .read_slice(&mut id, GuestAddress(back))
        .expect("id");
    assert_eq!(&id, b"ferry-disk0");
    assert_eq!(d.used_idx(), 4, "each request used once");
    let c = t.device().counters();
    assert_eq!((c.writes, c.reads, c.flushes, c.errors), (1, 1, 1, 0));
}

#[test]
fn bad_requests_are_answered_with_an_error_status() {
    let mut t = device(8);
    let mut d = Driver::new();
    // Before DRIVER_OK a notification does nothing.
    assert!(!d.reg_write(&mut t, 0x050, 0));
    d.set_up(&mut t);
    // Past the end of the disk.
    d.request(&mut t, 0, 8, &[(DATA, 512, true)]);
    assert_eq!(d.status(), 1, "IOERR");
    // A read into a buffer the device may not write.
    d.request(&mut t, 0, 0, &[(DATA, 512, false)]);
    assert_eq!(d.status(), 1, "IOERR");
    // An unknown request type.
    d.request(&mut t, 99, 0, &[]);
    assert_eq!(d.status(), 2, "UNSUPP");
    // A backend that fails the write (a full datastore).
    let mut t = MmioTransport::new(Blk::new(
        MemDisk {
            bytes: vec![0; 4096],
            fail_writes: true,
            ..MemDisk::default()
        },
        "x",
    ));
    let mut d = Driver::new();
    d.set_up(&mut t);
    d.request(&mut t, 1, 0, &[(DATA, 512, false)]);
    assert_eq!(d.status(), 1, "IOERR, not acknowledged as written");
    assert_eq!(t.device().counters().errors, 1);
}

#[test]
fn a_driver_without_virtio_1_is_refused_features_ok() {
    let mut t = device(8);
    let d = Driver::new();
    d.reg_write(&mut t, 0x070, 1 | 2);
    d.reg_write(&mut t, 0x024, 0);
    d.reg_write(&mut t, 0x020, 1 << 9);
    d.reg_write(&mut t, 0x070, 1 | 2 | 8);
    assert_eq!(Driver::reg_read(&t, 0x070) & 8, 0);
}

#[test]
fn device_state_round_trips_and_the_ring_goes_on_where_it_stopped() {
    let mut t = device(64);
    let mut d = Driver::new();
    d.set_up(&mut t);
    d.memory
        .write_slice(&[0xab; 512], GuestAddress(DATA))
        .expect("data");
    d.request(&mut t, 1, 1, &[(DATA, 512, false)]);
    d.request(&mut t, 1, 2, &[(DATA, 512, false)]);
    d.reg_write(&mut t, 0x064, INT_VRING);

    // Saved as a migration carries it, restored on a fresh device over a
    // copy of the disk (what the destination has after the switchover).
    let saved = t.snapshot();
    let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&saved).expect("encode");
    let back: TransportSnapshot =
        rkyv::from_bytes::<TransportSnapshot, rkyv::rancor::Error>(&bytes).expect("decode");
    assert_eq!(back, saved);
    let disk = t.device().backend().clone();
    let mut moved = MmioTransport::new(Blk::new(disk, "ferry-disk0"));
    moved.restore(&back).expect("restore");
    assert_eq!(moved.snapshot(), saved);
    assert!(moved.driver_ok());

    // The next request is served once, on the new device; the two before
    // are not served again.
    d.memory
        .write_slice(&[0xcd; 512], GuestAddress(DATA))
        .expect("data");
    assert!(d.request(&mut moved, 1, 3, &[(DATA, 512, false)]));
    assert_eq!(d.used_idx(), 3);
    let c = moved.device().counters();
    assert_eq!(c.writes, 1, "only the new request ran on the destination");
    let disk = &moved.device().backend().bytes;
    assert!(disk[512..1536].iter().all(|b| *b == 0xab));
    assert!(disk[1536..2048].iter().all(|b| *b == 0xcd));

    // A state for another device shape is refused.
    let mut wrong = saved.clone();
    wrong.queues.push(Default::default());
    assert!(moved.restore(&wrong).is_err());
}
