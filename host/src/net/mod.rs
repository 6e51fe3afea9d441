//! The host's side of guest networking outside virtio: interface ioctls
//! shared by taps and bridges ([`netdev`]), a private network namespace
//! for `ferry demo` ([`private`]), and a UDP prober that measures how long
//! a guest was unreachable across a migration ([`probe`]); and a two-host
//! path of namespaces, veth, `htb` and a delay/loss relay for benchmarks
//! and tests off loopback ([`path`], [`relay`], [`impairment`]).

pub mod impairment;
pub mod netdev;
pub mod path;
pub mod private;
pub mod probe;
pub mod relay;
