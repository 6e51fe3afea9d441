//! virtio devices for KVM guests: the virtio-mmio transport
//! ([`mmio::MmioTransport`]) and the devices behind it ([`blk::Blk`]).
//!
//! The split-ring queues are rust-vmm's `virtio-queue`; the transport and
//! the devices are sans-IO state machines that a VMM's vCPU threads drive
//! with the MMIO accesses KVM hands them, so they are tested here with a
//! small driver writing rings into guest memory, as Linux's would.
//! Device writes into guest memory go through vm-memory, whose dirty
//! bitmap the migration's next round reads along with KVM's.

pub mod announce;
pub mod blk;
pub mod bus;
pub mod link;
pub mod mmio;
pub mod net;
pub mod tap;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod net_tests;
