//! The virtio-mmio transport (virtio 1.x, "version 2" registers): the
//! register file a driver programs, the device's queues and its interrupt
//! status, as a state machine that vCPU threads drive with MMIO reads and
//! writes. Queues are `virtio-queue` split queues; what a queue carries is
//! the [`VirtioDevice`]'s business.
//!
//! Linux finds a device from the kernel command line:
//! `virtio_mmio.device=4K@0xd0000000:5` (size, base, interrupt).

use virtio_queue::{Queue, QueueT};

use crate::kvm::Memory;

/// "virt" in little endian.
const MAGIC: u32 = 0x7472_6976;
/// The modern (virtio 1.x) register layout.
const VERSION: u32 = 2;
/// ferry's vendor id ("FRRY").
const VENDOR: u32 = 0x5952_5246;
/// Feature bit: virtio 1.x (the only dialect this transport speaks).
pub const F_VERSION_1: u64 = 1 << 32;

/// Register offsets (virtio 1.2, 4.2.2).
mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits the transport looks at.
mod status {
    pub const FEATURES_OK: u32 = 8;
    pub const DRIVER_OK: u32 = 4;
    pub const FAILED: u32 = 128;
}

/// Interrupt status: the device used buffers.
pub const INT_VRING: u32 = 1;

/// A 64-bit value as its low and high 32-bit words.
fn split_words(value: u64) -> [u32; 2] {
    let b = value.to_le_bytes();
    [
        u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
    ]
}

/// What a virtio device does with its queues, behind the transport.
pub trait VirtioDevice: Send {
    /// The virtio device id (2: block, 1: network).
    fn device_type(&self) -> u32;
    /// The features offered (the transport adds [`F_VERSION_1`]).
    fn features(&self) -> u64;
    /// The most entries each queue may have; one per queue.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Reads the device's configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Serves what the driver made available on queue `index`; returns
    /// whether buffers were used (so the driver is to be interrupted).
    fn process(&mut self, index: usize, queue: &mut Queue, memory: &Memory) -> bool;
    /// Serves what arrived from outside (a NIC's received frames) on its
    /// `queues`; returns whether buffers were used.
    fn poll(&mut self, queues: &mut [Queue], memory: &Memory) -> bool {
        let _ = (queues, memory);
        false
    }
    /// Announces the device's new place after a migration (a NIC's
    /// RARP); returns whether it did.
    fn announce(&mut self) -> bool {
        false
    }
}

/// One queue's transport state, as saved and restored.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct QueueSnapshot {
    /// Entries the driver chose.
    pub size: u16,
    /// Whether the driver enabled it.
    pub ready: bool,
    /// Descriptor table (guest physical).
    pub desc_table: u64,
    /// Available ring.
    pub avail_ring: u64,
    /// Used ring.
    pub used_ring: u64,
    /// The device's next available entry.
    pub next_avail: u16,
    /// The device's next used entry.
    pub next_used: u16,
}

/// The transport's whole state: what a destination needs to carry on
/// where the source's device stopped (requests are served synchronously,
/// so none is in flight at a pause).
#[derive(
    Debug, Clone, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct TransportSnapshot {
    /// Device status (driver progress bits).
    pub status: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// Feature word selectors.
    pub device_features_sel: u32,
    /// As above, for the driver's features.
    pub driver_features_sel: u32,
    /// The queue the queue registers address.
    pub queue_sel: u32,
    /// Pending interrupt causes.
    pub interrupt_status: u32,
    /// Configuration generation.
    pub config_generation: u32,
    /// Each queue.
    pub queues: Vec<QueueSnapshot>,
}

/// A device behind the virtio-mmio registers.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    queues: Vec<Queue>,
    status: u32,
    driver_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
}

/// Why a saved transport state cannot be taken on.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// It has another number of queues than the device.
    #[error("saved state has {saved} queues, the device {device}")]
    Queues {
        /// In the state.
        saved: usize,
        /// The device's.
        device: usize,
    },
    /// A queue's values are not valid for it.
    #[error("queue {index}: {reason}")]
    Queue {
        /// Which queue.
        index: usize,
        /// virtio-queue's reason.
        reason: String,
    },
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// `device`, reset (as at power-on).
    pub fn new(device: D) -> Self {
        let queues = device
            .queue_max_sizes()
            .into_iter()
            .map(|max| Queue::new(max).expect("a device offers a valid queue size"))
            .collect();
        Self {
            device,
            queues,
            status: 0,
            driver_features: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
        }
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    fn offered(&self) -> u64 {
        self.device.features() | F_VERSION_1
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Serves what arrived from outside; returns whether the driver is to
    /// be interrupted.
    pub fn poll(&mut self, memory: &Memory) -> bool {
        if !self.driver_ok() {
            return false;
        }
        let used = self.device.poll(&mut self.queues, memory);
        if used {
            self.interrupt_status |= INT_VRING;
        }
        used
    }

    /// Announces the device's new place, once the driver has set it up.
    pub fn announce(&mut self) -> bool {
        self.driver_ok() && self.device.announce()
    }

    /// Whether the driver finished setting the device up.
    pub fn driver_ok(&self) -> bool {
        self.status & status::DRIVER_OK != 0 && self.status & status::FAILED == 0
    }

    /// A driver's read of `data.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        let value = match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR,
            reg::DEVICE_FEATURES => {
                let [low, high] = split_words(self.offered());
                match self.device_features_sel {
                    0 => low,
                    1 => high,
                    _ => 0,
                }
            }
            reg::QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    /// A driver's write at `offset`; returns whether the driver is to be
    /// interrupted (a queue notification that used buffers).
    pub fn write(&mut self, offset: u64, data: &[u8], memory: &Memory) -> bool {
        if offset >= reg::CONFIG {
            return false;
        }
        let mut word = [0u8; 4];
        let n = data.len().min(4);
        word[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(word);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES => self.accept_features(value),
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => {
                if let Some(q) = self.selected() {
                    q.set_size(u16::try_from(value).unwrap_or(u16::MAX));
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.selected() {
                    q.set_ready(value == 1);
                }
            }
            reg::QUEUE_DESC_LOW => {
                self.address(|q, v| q.set_desc_table_address(Some(v), None), value)
            }
            reg::QUEUE_DESC_HIGH => {
                self.address(|q, v| q.set_desc_table_address(None, Some(v)), value)
            }
            reg::QUEUE_DRIVER_LOW => {
                self.address(|q, v| q.set_avail_ring_address(Some(v), None), value)
            }
            reg::QUEUE_DRIVER_HIGH => {
                self.address(|q, v| q.set_avail_ring_address(None, Some(v)), value)
            }
            reg::QUEUE_DEVICE_LOW => {
                self.address(|q, v| q.set_used_ring_address(Some(v), None), value)
            }
            reg::QUEUE_DEVICE_HIGH => {
                self.address(|q, v| q.set_used_ring_address(None, Some(v)), value)
            }
            reg::INTERRUPT_ACK => self.interrupt_status &= !value,
            reg::STATUS => self.set_status(value),
            reg::QUEUE_NOTIFY => return self.notify(value as usize, memory),
            _ => {}
        }
        false
    }

    fn accept_features(&mut self, value: u32) {
        let shift = match self.driver_features_sel {
            0 => 0,
            1 => 32,
            _ => return,
        };
        let mask = 0xffff_ffffu64 << shift;
        self.driver_features = (self.driver_features & !mask) | (u64::from(value) << shift);
        // A driver may accept only what was offered.
        self.driver_features &= self.offered();
    }

    fn address(&mut self, set: impl FnOnce(&mut Queue, u32), value: u32) {
        // Queue addresses are fixed once the queue is ready (virtio 4.2.2.2).
        if let Some(q) = self.selected().filter(|q| !q.ready()) {
            set(q, value);
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // FEATURES_OK holds only when virtio 1.x was accepted.
        let mut value = value;
        if value & status::FEATURES_OK != 0 && self.driver_features & F_VERSION_1 == 0 {
            value &= !status::FEATURES_OK;
        }
        self.status = value;
    }

    fn reset(&mut self) {
        let device_queues = self.device.queue_max_sizes();
        for (q, _) in self.queues.iter_mut().zip(device_queues) {
            q.reset();
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
    }

    fn notify(&mut self, index: usize, memory: &Memory) -> bool {
        if !self.driver_ok() {
            return false;
        }
        let Some(queue) = self.queues.get_mut(index).filter(|q| q.is_valid(memory)) else {
            return false;
        };
        let used = self.device.process(index, queue, memory);
        if used {
            self.interrupt_status |= INT_VRING;
        }
        used
    }

    /// The transport's state, for a migration or a successor VMM.
    pub fn snapshot(&self) -> TransportSnapshot {
        TransportSnapshot {
            status: self.status,
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self
                .queues
                .iter()
                .map(|q| QueueSnapshot {
                    size: q.size(),
                    ready: q.ready(),
                    desc_table: q.desc_table(),
                    avail_ring: q.avail_ring(),
                    used_ring: q.used_ring(),
                    next_avail: q.next_avail(),
                    next_used: q.next_used(),
                })
                .collect(),
        }
    }

    /// Takes on a state [`MmioTransport::snapshot`] saved (on a device of
    /// the same kind, set up the same way).
    pub fn restore(&mut self, s: &TransportSnapshot) -> Result<(), RestoreError> {
        if s.queues.len() != self.queues.len() {
            return Err(RestoreError::Queues {
                saved: s.queues.len(),
                device: self.queues.len(),
            });
        }
        let mut queues = Vec::with_capacity(s.queues.len());
        for (index, (saved, q)) in s.queues.iter().zip(&self.queues).enumerate() {
            let state = virtio_queue::QueueState {
                max_size: q.max_size(),
                next_avail: saved.next_avail,
                next_used: saved.next_used,
                event_idx_enabled: false,
                size: saved.size,
                ready: saved.ready,
                desc_table: saved.desc_table,
                avail_ring: saved.avail_ring,
                used_ring: saved.used_ring,
            };
            let queue = Queue::try_from(state).map_err(|e| RestoreError::Queue {
                index,
                reason: e.to_string(),
            })?;
            queues.push(queue);
        }
        self.queues = queues;
        self.status = s.status;
        self.driver_features = s.driver_features & self.offered();
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.queue_sel = s.queue_sel;
        self.interrupt_status = s.interrupt_status;
        self.config_generation = s.config_generation;
        Ok(())
    }
}
