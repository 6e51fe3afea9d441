//! ferry-sim: the deterministic simulation of migrations (issue 5).
//!
//! Many hosts, VMs and faults in one thread, on a paused clock with a seeded
//! RNG, running the production actors and state machines of `ferry-actors`
//! over the in-memory transport of `ferry-transport`. This crate is only
//! used by tests; it holds no code yet beyond this description, because the
//! migration protocol it simulates has not landed.
