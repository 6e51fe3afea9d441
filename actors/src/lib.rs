//! ferry-actors: the actors, the sans-IO migration state machines, and the
//! backend traits they consume.
//!
//! This crate may not touch quinn, kvm-ioctls or the file system directly:
//! guests, disks and clocks reach it through narrow traits, so the same code
//! runs a real KVM guest over QUIC in `ferry-host` and thousands of seeded
//! fault schedules in `ferry-sim`.
//!
//! Contents so far:
//! - [`guest`]: the `GuestBackend` trait guests satisfy (KVM in
//!   `ferry-host`, [`synthetic::SyntheticGuest`] here), the dirty bitmap, and
//!   the conformance suite both backends pass;
//! - [`synthetic`]: a guest in plain memory with a seeded dirtying workload.
//!
//! ```
//! use ferry_actors::guest::GuestBackend;
//! use ferry_actors::synthetic::{SyntheticGuest, SyntheticParams};
//!
//! let mut guest = SyntheticGuest::booted(SyntheticParams {
//!     memory_bytes: 4 << 20,
//!     wss_bytes: 1 << 20,
//!     seed: 7,
//!     writes_per_sec: 150_000,
//! });
//! guest.start_dirty_log().unwrap();
//! guest.step(100);
//! assert_eq!(guest.take_dirty().unwrap().count(), 100);
//! ```

pub mod api;
pub mod disk;
pub mod guest;
pub mod migration;
pub mod node;
pub mod ops;
pub mod ram;
pub mod storage;
pub mod synthetic;
