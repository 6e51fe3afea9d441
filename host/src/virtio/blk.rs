//! virtio-blk: one request queue; each request is a header (type, sector),
//! data buffers and a status byte (virtio 1.2, 5.2). Reads, writes,
//! flushes and the device id are served by a [`BlockIo`]; a request's
//! status is written, and the request used, only once the backend has
//! answered (a write only once it is durable).

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use super::mmio::VirtioDevice;
use crate::kvm::Memory;

/// The virtio device id of a block device.
pub const DEVICE_ID: u32 = 2;
/// Entries of the request queue.
pub const QUEUE_SIZE: u16 = 128;
/// Bytes per sector, the unit requests address.
pub const SECTOR: u64 = 512;

/// Feature: the device takes flush requests.
const F_FLUSH: u64 = 1 << 9;
/// Feature: `seg_max` in the configuration space says how many data
/// buffers a request may have (without it Linux sends one per request).
const F_SEG_MAX: u64 = 1 << 2;
/// Feature: `writeback` in the configuration space says whether the
/// device has a volatile cache. Ours is 0: every write is durable when
/// it completes (write-through), so the guest need not send flushes
/// after its writes, and FUA is what every write already is.
const F_CONFIG_WCE: u64 = 1 << 11;
/// Data buffers a request may have: the ring, less header and status.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Bytes of the configuration space ferry fills (up to `writeback`).
const CONFIG_BYTES: usize = 33;

/// Request types.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

/// Status values.
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// Bytes of the id string a GET_ID request returns.
const ID_BYTES: usize = 20;

/// Where a virtio-blk device's blocks live (the node's disk path, a file
/// in tests).
pub trait BlockIo: Send {
    /// The disk's size in bytes.
    fn len_bytes(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String>;
    /// Writes `data` at `offset`; returns once it is durable.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), String>;
    /// Makes every acknowledged write durable.
    fn flush(&mut self) -> Result<(), String>;
}

/// What the device has served (for `vm disks` and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlkCounters {
    /// Read requests.
    pub reads: u64,
    /// Write requests.
    pub writes: u64,
    /// Flush requests.
    pub flushes: u64,
    /// Requests answered with an error status.
    pub errors: u64,
}

/// A virtio-blk device over a [`BlockIo`].
pub struct Blk<B: BlockIo> {
    backend: B,
    id: String,
    counters: BlkCounters,
}

/// One descriptor: where, how long, device-writable or not.
#[derive(Debug, Clone, Copy)]
struct Buffer {
    addr: GuestAddress,
    len: u32,
    writable: bool,
}

impl<B: BlockIo> Blk<B> {
    /// A device serving `backend`, answering GET_ID with `id` (cut to 20
    /// bytes).
    pub fn new(backend: B, id: &str) -> Self {
        Self {
            backend,
            id: id.to_owned(),
            counters: BlkCounters::default(),
        }
    }

    /// What it served so far.
    pub fn counters(&self) -> BlkCounters {
        self.counters
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Serves one request; returns the bytes written into the guest's
    /// buffers (for the used ring).
    fn serve(&mut self, buffers: &[Buffer], memory: &Memory) -> u32 {
        let Some((status_buf, rest)) = buffers
            .split_last()
            .filter(|(s, _)| s.writable && s.len >= 1)
        else {
            // No status byte to answer in: a broken driver; use it empty.
            self.counters.errors += 1;
            return 0;
        };
        let (status, written) = match rest.split_first() {
            Some((header, data)) if !header.writable && header.len >= 16 => {
                self.request(*header, data, memory)
            }
            _ => (S_IOERR, 0),
        };
        if status != S_OK {
            self.counters.errors += 1;
        }
        let _ = memory.write_obj(status, status_buf.addr);
        written + 1
    }

    fn request(&mut self, header: Buffer, data: &[Buffer], memory: &Memory) -> (u8, u32) {
        let (Ok(kind), Ok(sector)) = (
            memory.read_obj::<u32>(header.addr),
            memory.read_obj::<u64>(header.addr.unchecked_add(8)),
        ) else {
            return (S_IOERR, 0);
        };
        let kind = u32::from_le(kind);
        let Some(offset) = u64::from_le(sector).checked_mul(SECTOR) else {
            return (S_IOERR, 0);
        };
        match kind {
            T_IN | T_OUT => {
                // Reads fill device-writable buffers, writes take
                // driver-written ones; the request is one backend call.
                if data.iter().any(|b| b.writable != (kind == T_IN)) {
                    return (S_IOERR, 0);
                }
                let len: u64 = data.iter().map(|b| u64::from(b.len)).sum();
                if self.in_range(offset, len).is_err() {
                    return (S_IOERR, 0);
                }
                let served = if kind == T_IN {
                    self.read_into(data, offset, len, memory)
                } else {
                    self.write_from(data, offset, len, memory)
                };
                if served.is_err() {
                    return (S_IOERR, 0);
                }
                if kind == T_IN {
                    self.counters.reads += 1;
                    (S_OK, u32::try_from(len).unwrap_or(u32::MAX))
                } else {
                    self.counters.writes += 1;
                    (S_OK, 0)
                }
            }
            T_FLUSH => {
                self.counters.flushes += 1;
                match self.backend.flush() {
                    Ok(()) => (S_OK, 0),
                    Err(_) => (S_IOERR, 0),
                }
            }
            T_GET_ID => {
                let mut id = [0u8; ID_BYTES];
                let n = self.id.len().min(ID_BYTES);
                id[..n].copy_from_slice(&self.id.as_bytes()[..n]);
                match data.first().filter(|b| b.writable) {
                    Some(b) => {
                        let n = (b.len as usize).min(ID_BYTES);
                        match memory.write_slice(&id[..n], b.addr) {
                            Ok(()) => (S_OK, u32::try_from(n).unwrap_or(0)),
                            Err(_) => (S_IOERR, 0),
                        }
                    }
                    None => (S_IOERR, 0),
                }
            }
            _ => (S_UNSUPP, 0),
        }
    }

    fn in_range(&self, offset: u64, len: u64) -> Result<(), ()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.backend.len_bytes() => Ok(()),
            _ => Err(()),
        }
    }

    /// Reads `len` bytes at `offset` and scatters them over `buffers`.
    fn read_into(
        &mut self,
        buffers: &[Buffer],
        offset: u64,
        len: u64,
        memory: &Memory,
    ) -> Result<(), ()> {
        let mut data = vec![0u8; usize::try_from(len).map_err(|_| ())?];
        self.backend.read_at(offset, &mut data).map_err(|_| ())?;
        let mut at = 0;
        for b in buffers {
            let n = b.len as usize;
            // Through vm-memory, so the pages written are marked dirty for
            // a migration's next round.
            memory
                .write_slice(&data[at..at + n], b.addr)
                .map_err(|_| ())?;
            at += n;
        }
        Ok(())
    }

    /// Gathers `len` bytes from `buffers` and writes them at `offset`.
    fn write_from(
        &mut self,
        buffers: &[Buffer],
        offset: u64,
        len: u64,
        memory: &Memory,
    ) -> Result<(), ()> {
        let mut data = vec![0u8; usize::try_from(len).map_err(|_| ())?];
        let mut at = 0;
        for b in buffers {
            let n = b.len as usize;
            memory
                .read_slice(&mut data[at..at + n], b.addr)
                .map_err(|_| ())?;
            at += n;
        }
        self.backend.write_at(offset, &data).map_err(|_| ())
    }

    /// The configuration space: capacity in sectors, `seg_max`, and
    /// `writeback` 0 (virtio 1.2, 5.2.4).
    fn config_space(&self) -> [u8; CONFIG_BYTES] {
        let mut c = [0u8; CONFIG_BYTES];
        c[..8].copy_from_slice(&(self.backend.len_bytes() / SECTOR).to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c
    }
}

impl<B: BlockIo> VirtioDevice for Blk<B> {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn features(&self) -> u64 {
        F_FLUSH | F_SEG_MAX | F_CONFIG_WCE
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_space();
        for (i, byte) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).map_or(usize::MAX, |o| o.saturating_add(i));
            *byte = config.get(at).copied().unwrap_or(0);
        }
    }

    fn process(&mut self, _index: usize, queue: &mut Queue, memory: &Memory) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(memory) {
            let head = chain.head_index();
            let buffers: Vec<Buffer> = chain
                .map(|d| Buffer {
                    addr: d.addr(),
                    len: d.len(),
                    writable: d.is_write_only(),
                })
                .collect();
            let len = self.serve(&buffers, memory);
            if queue.add_used(memory, head, len).is_err() {
                break;
            }
            used = true;
        }
        used
    }
}

/// A [`BlockIo`] over a disk backend (a file on a datastore): each write
/// durable before it returns (`write_durable`), as the guest is told.
pub struct BackendBlock(pub Box<dyn ferry_actors::disk::BlockBackend>);

impl BlockIo for BackendBlock {
    fn len_bytes(&self) -> u64 {
        self.0.len_bytes()
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        self.0.read_at(offset, buf).map_err(|e| e.to_string())
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        self.0
            .write_durable(offset, data)
            .map_err(|e| e.to_string())
    }

    fn flush(&mut self) -> Result<(), String> {
        self.0.flush().map_err(|e| e.to_string())
    }
}
