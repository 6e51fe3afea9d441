//! ferry-actors: the actors, the sans-IO migration state machines, and the
//! backend traits they consume.
//!
//! This crate may not touch quinn, kvm-ioctls or the file system directly:
//! guests, disks and clocks reach it through narrow traits, so the same code
//! runs a real KVM guest over QUIC in `ferry-host` and thousands of seeded
//! fault schedules in `ferry-sim`.
//!
//! Contents so far: [`guest`], the `GuestBackend` trait that guest
//! implementations (KVM in `ferry-host`, the synthetic guest here) satisfy.

pub mod guest;
