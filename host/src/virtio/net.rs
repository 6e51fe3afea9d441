//! virtio-net: a receive queue and a transmit queue (virtio 1.2, 5.1),
//! no offloads. Frames go to and come from a [`NetIo`]: a tap device on
//! the host's bridge, or nothing (a NIC whose cable is out, on a host
//! without a bridge, so every VM has the same devices wherever it runs).
//!
//! Transmit is served on the vCPU thread that notified. Receive is
//! driven from outside: the VMM's receive thread calls
//! [`MmioBus::poll`](super::bus::MmioBus::poll) when the tap has frames,
//! and the guest's notification that it added receive buffers also
//! delivers what waits. Frames that find no buffer wait in the tap's own
//! queue. After a migration the device sends RARP frames from the
//! guest's MAC ([`Net::announce`]), as QEMU's announce does, so the
//! bridges learn the guest's new port.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::mmio::VirtioDevice;
use crate::kvm::Memory;

/// The virtio device id of a network device.
pub const DEVICE_ID: u32 = 1;
/// Entries of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Feature: the configuration space holds the device's MAC.
const F_MAC: u64 = 1 << 5;
/// The header before every frame (`virtio_net_hdr_v1`).
const HEADER: usize = 12;
/// The largest frame ferry carries (no offloads: the MTU plus the
/// Ethernet header and a VLAN tag).
pub const MAX_FRAME: usize = 1518;
const RX: usize = 0;
const TX: usize = 1;

/// Where a NIC's frames go.
pub trait NetIo: Send {
    /// Sends one frame (dropped when it cannot go now, as on a wire).
    fn send(&mut self, frame: &[u8]);
    /// Takes one waiting frame into `buf`, if there is one.
    fn receive(&mut self, buf: &mut [u8]) -> Option<usize>;
}

impl NetIo for Box<dyn NetIo> {
    fn send(&mut self, frame: &[u8]) {
        self.as_mut().send(frame);
    }

    fn receive(&mut self, buf: &mut [u8]) -> Option<usize> {
        self.as_mut().receive(buf)
    }
}

/// A NIC with no cable: frames go nowhere, none arrive.
pub struct Unplugged;

impl NetIo for Unplugged {
    fn send(&mut self, _frame: &[u8]) {}

    fn receive(&mut self, _buf: &mut [u8]) -> Option<usize> {
        None
    }
}

/// What the NIC has moved (for tests and `vm` views).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames the guest sent.
    pub sent: u64,
    /// Frames given to the guest.
    pub received: u64,
    /// RARP announcements sent.
    pub announced: u64,
}

/// A virtio-net device over a [`NetIo`].
pub struct Net<N: NetIo> {
    io: N,
    mac: [u8; 6],
    /// A frame taken from the backend that found no receive buffer yet.
    waiting: Option<Vec<u8>>,
    counters: NetCounters,
}

impl<N: NetIo> Net<N> {
    /// A NIC with address `mac` over `io`.
    pub fn new(io: N, mac: [u8; 6]) -> Self {
        Self {
            io,
            mac,
            waiting: None,
            counters: NetCounters::default(),
        }
    }

    /// What it moved so far.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// The backend.
    pub fn io(&self) -> &N {
        &self.io
    }

    /// Sends one RARP announcement from the guest's MAC.
    pub fn announce(&mut self) {
        self.io.send(&rarp(self.mac));
        self.counters.announced += 1;
    }

    /// Sends what the guest queued for transmission.
    fn transmit(&mut self, queue: &mut Queue, memory: &Memory) -> bool {
        let mut used = false;
        let mut frame = Vec::with_capacity(HEADER + MAX_FRAME);
        while let Some(chain) = queue.pop_descriptor_chain(memory) {
            let head = chain.head_index();
            frame.clear();
            for d in chain.filter(|d| !d.is_write_only()) {
                let start = frame.len();
                let room = (HEADER + MAX_FRAME).saturating_sub(start);
                let len = (d.len() as usize).min(room);
                frame.resize(start + len, 0);
                if memory.read_slice(&mut frame[start..], d.addr()).is_err() {
                    frame.truncate(start);
                }
            }
            if frame.len() > HEADER {
                self.io.send(&frame[HEADER..]);
                self.counters.sent += 1;
            }
            if queue.add_used(memory, head, 0).is_err() {
                break;
            }
            used = true;
        }
        used
    }

    /// Gives waiting frames to the guest while it has buffers for them.
    fn deliver(&mut self, queue: &mut Queue, memory: &Memory) -> bool {
        let mut used = false;
        loop {
            let frame = match self.waiting.take() {
                Some(f) => f,
                None => {
                    let mut buf = vec![0u8; MAX_FRAME];
                    match self.io.receive(&mut buf) {
                        Some(n) => {
                            buf.truncate(n);
                            buf
                        }
                        None => return used,
                    }
                }
            };
            let Some(chain) = queue.pop_descriptor_chain(memory) else {
                self.waiting = Some(frame);
                return used;
            };
            let head = chain.head_index();
            let buffers: Vec<(GuestAddress, usize)> = chain
                .filter(|d| d.is_write_only())
                .map(|d| (d.addr(), d.len() as usize))
                .collect();
            let written = write_frame(&buffers, &frame, memory);
            if queue
                .add_used(memory, head, u32::try_from(written).unwrap_or(0))
                .is_err()
            {
                return used;
            }
            self.counters.received += 1;
            used = true;
        }
    }
}

/// Writes the header (no offloads, one buffer) and `frame` over
/// `buffers`; returns the bytes written (a frame longer than the buffers
/// is cut, as a NIC would drop its tail).
fn write_frame(buffers: &[(GuestAddress, usize)], frame: &[u8], memory: &Memory) -> usize {
    let mut header = [0u8; HEADER];
    header[10..12].copy_from_slice(&1u16.to_le_bytes());
    let bytes: Vec<u8> = header.iter().chain(frame).copied().collect();
    let mut at = 0;
    for &(addr, len) in buffers {
        if at == bytes.len() {
            break;
        }
        let n = len.min(bytes.len() - at);
        // Through vm-memory, so the pages are dirty for the next round.
        if memory.write_slice(&bytes[at..at + n], addr).is_err() {
            break;
        }
        at += n;
    }
    at
}

/// A RARP "reverse request" from `mac` (what QEMU's announce sends): the
/// bridges on its way learn where `mac` is now.
pub fn rarp(mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&0x8035u16.to_be_bytes());
    f.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&3u16.to_be_bytes()); // reverse request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.resize(60, 0);
    f
}

impl<N: NetIo> VirtioDevice for Net<N> {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn features(&self) -> u64 {
        F_MAC
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).map_or(usize::MAX, |o| o.saturating_add(i));
            *byte = self.mac.get(at).copied().unwrap_or(0);
        }
    }

    fn process(&mut self, index: usize, queue: &mut Queue, memory: &Memory) -> bool {
        match index {
            TX => self.transmit(queue, memory),
            RX => self.deliver(queue, memory),
            _ => false,
        }
    }

    fn poll(&mut self, queues: &mut [Queue], memory: &Memory) -> bool {
        match queues.get_mut(RX).filter(|q| q.is_valid(memory)) {
            Some(q) => self.deliver(q, memory),
            None => false,
        }
    }

    fn announce(&mut self) -> bool {
        Net::announce(self);
        true
    }
}
