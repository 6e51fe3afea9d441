//! ferry-host: what runs on a KVM host — the `ferry` binary's commands, and
//! (as the issues land) the KVM guest backend, file datastores, node wiring
//! and telemetry.
//!
//! The binary (`src/main.rs`) only parses arguments and calls into this
//! library, so every command is usable from Rust too.

pub mod chart;
pub mod cli;
pub mod datastore;
pub mod decoders;
pub mod guest_images;
pub mod kvm;
pub mod net;
pub mod node;
pub mod store;
pub mod telemetry;
pub mod virtio;
pub mod vmm;
