//! The guest's MMIO bus: which device answers an address, and the irqfd
//! that raises its interrupt. vCPU threads call [`MmioBus::read`] and
//! [`MmioBus::write`] on MMIO exits; a write that made a device use
//! buffers fires the device's interrupt.

use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

use super::mmio::{MmioTransport, TransportSnapshot, VirtioDevice};
use crate::kvm::Memory;

/// Bytes of MMIO space each device takes.
pub const DEVICE_BYTES: u64 = 0x1000;
/// Where the first device's registers are (below the IOAPIC's 0xfec00000).
pub const FIRST_BASE: u64 = 0xd000_0000;
/// The first device's interrupt (an ISA pin of the IOAPIC, edge).
pub const FIRST_IRQ: u32 = 5;

/// A device the bus can drive, whatever it carries.
pub trait BusDevice: Send {
    /// A read at `offset` in the device's window.
    fn read(&self, offset: u64, data: &mut [u8]);
    /// A write; returns whether the driver is to be interrupted.
    fn write(&mut self, offset: u64, data: &[u8], memory: &Memory) -> bool;
    /// The device's transport state.
    fn snapshot(&self) -> TransportSnapshot;
    /// Takes a saved transport state on.
    fn restore(&mut self, state: &TransportSnapshot) -> Result<(), String>;
    /// Serves what arrived from outside; returns whether to interrupt.
    fn poll(&mut self, memory: &Memory) -> bool;
    /// Announces the device's new place; returns whether it did.
    fn announce(&mut self) -> bool;
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8], memory: &Memory) -> bool {
        MmioTransport::write(self, offset, data, memory)
    }

    fn snapshot(&self) -> TransportSnapshot {
        MmioTransport::snapshot(self)
    }

    fn restore(&mut self, state: &TransportSnapshot) -> Result<(), String> {
        MmioTransport::restore(self, state).map_err(|e| e.to_string())
    }

    fn poll(&mut self, memory: &Memory) -> bool {
        MmioTransport::poll(self, memory)
    }

    fn announce(&mut self) -> bool {
        MmioTransport::announce(self)
    }
}

struct Slot {
    base: u64,
    irq: EventFd,
    device: Box<dyn BusDevice>,
}

/// The devices on the bus and the guest memory they serve.
#[derive(Default)]
pub struct MmioBus {
    inner: Mutex<Option<Bus>>,
}

struct Bus {
    memory: Memory,
    slots: Vec<Slot>,
    /// Whether the vCPUs run: devices driven from outside (a NIC's
    /// receive) touch guest memory only then, so a paused VM's memory and
    /// device state stay as saved.
    running: bool,
}

impl std::fmt::Debug for MmioBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioBus").finish_non_exhaustive()
    }
}

/// Where the `index`th device sits and which interrupt it raises.
pub fn placement(index: usize) -> (u64, u32) {
    let i = u32::try_from(index).expect("a handful of devices");
    (FIRST_BASE + u64::from(i) * DEVICE_BYTES, FIRST_IRQ + i)
}

/// The kernel command-line word that makes Linux probe the `index`th
/// device.
pub fn cmdline_word(index: usize) -> String {
    let (base, irq) = placement(index);
    format!("virtio_mmio.device=4K@{base:#x}:{irq}")
}

impl MmioBus {
    /// Adds `device` at the next place, raising `irq` (registered by the
    /// caller on the matching GSI); returns its index.
    pub fn attach(&self, memory: &Memory, irq: EventFd, device: Box<dyn BusDevice>) -> usize {
        let mut inner = self.inner.lock().expect("mmio bus");
        let bus = inner.get_or_insert_with(|| Bus {
            memory: memory.clone(),
            slots: Vec::new(),
            running: false,
        });
        let index = bus.slots.len();
        bus.slots.push(Slot {
            base: placement(index).0,
            irq,
            device,
        });
        index
    }

    /// How many devices are on the bus.
    pub fn len(&self) -> usize {
        let inner = self.inner.lock().expect("mmio bus");
        inner.as_ref().map_or(0, |b| b.slots.len())
    }

    /// Whether no device is on the bus.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A read at guest physical `addr`; false when no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let inner = self.inner.lock().expect("mmio bus");
        let Some(bus) = inner.as_ref() else {
            return false;
        };
        match bus
            .slots
            .iter()
            .find(|s| (s.base..s.base + DEVICE_BYTES).contains(&addr))
        {
            Some(s) => {
                s.device.read(addr - s.base, data);
                true
            }
            None => false,
        }
    }

    /// A write at guest physical `addr`; false when no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        let mut inner = self.inner.lock().expect("mmio bus");
        let Some(bus) = inner.as_mut() else {
            return false;
        };
        let memory = &bus.memory;
        let Some(s) = bus
            .slots
            .iter_mut()
            .find(|s| (s.base..s.base + DEVICE_BYTES).contains(&addr))
        else {
            return false;
        };
        if s.device.write(addr - s.base, data, memory)
            && let Err(e) = s.irq.write(1)
        {
            tracing::warn!("virtio interrupt: {e}");
        }
        true
    }

    /// The vCPUs run (or stop): devices driven from outside may (or may
    /// no longer) serve the guest. Returns once no device does.
    pub fn set_running(&self, running: bool) {
        let mut inner = self.inner.lock().expect("mmio bus");
        if let Some(bus) = inner.as_mut() {
            bus.running = running;
        }
    }

    /// Serves what arrived from outside for the device at `index`
    /// (while the vCPUs run), raising its interrupt if it used buffers.
    /// Returns whether it used buffers.
    pub fn poll(&self, index: usize) -> bool {
        let mut inner = self.inner.lock().expect("mmio bus");
        let Some(bus) = inner.as_mut().filter(|b| b.running) else {
            return false;
        };
        let memory = &bus.memory;
        let Some(s) = bus.slots.get_mut(index) else {
            return false;
        };
        let used = s.device.poll(memory);
        if used && let Err(e) = s.irq.write(1) {
            tracing::warn!("virtio interrupt: {e}");
        }
        used
    }

    /// Has every device announce its new place; returns how many did.
    pub fn announce(&self) -> usize {
        let mut inner = self.inner.lock().expect("mmio bus");
        inner.as_mut().map_or(0, |b| {
            b.slots
                .iter_mut()
                .map(|s| s.device.announce())
                .filter(|&did| did)
                .count()
        })
    }

    /// Every device's transport state, in bus order.
    pub fn snapshot(&self) -> Vec<TransportSnapshot> {
        let inner = self.inner.lock().expect("mmio bus");
        inner
            .as_ref()
            .map(|b| b.slots.iter().map(|s| s.device.snapshot()).collect())
            .unwrap_or_default()
    }

    /// Takes saved states on, one per device in bus order.
    pub fn restore(&self, states: &[TransportSnapshot]) -> Result<(), String> {
        let mut inner = self.inner.lock().expect("mmio bus");
        let slots = inner.as_mut().map_or(&mut [][..], |b| &mut b.slots[..]);
        if slots.len() != states.len() {
            return Err(format!(
                "saved state has {} virtio devices, this VM {}",
                states.len(),
                slots.len()
            ));
        }
        for (slot, state) in slots.iter_mut().zip(states) {
            slot.device.restore(state)?;
        }
        Ok(())
    }
}
