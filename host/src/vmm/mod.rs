//! One VMM process per VM.
//!
//! The node manages; each VM runs in its own `ferry vmm` process, which
//! owns the KVM VM, its vCPU threads and devices (the shape QEMU under
//! libvirt, Cloud Hypervisor and Firecracker share). Guest memory is a
//! memfd the VMM and the node both map, passed over the VMM's Unix socket
//! with `SCM_RIGHTS`, so migrations read and write guest pages in place.
//!
//! - [`proto`]: the typed requests and replies, and their framing.
//! - [`server`]: the VMM process (`ferry vmm --socket PATH`).
//! - [`client`]: [`client::VmmGuest`], the node's `GuestBackend` for it.
//! - [`upgrade`]: a running guest moved to a new VMM process, no page
//!   copied.
//!
//! VMs outlive the node: a node that stops or crashes leaves its VMM
//! processes running, and the node that starts again attaches to them by
//! their sockets.

pub mod client;
pub mod proto;
pub mod server;
pub mod upgrade;

pub use client::{VmmGuest, VmmHome};
