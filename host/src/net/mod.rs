//! The host's side of guest networking outside virtio: interface ioctls
//! shared by taps and bridges ([`netdev`]), a private network namespace
//! for `ferry demo` ([`private`]), and a UDP prober that measures how long
//! a guest was unreachable across a migration ([`probe`]).

pub mod netdev;
pub mod private;
pub mod probe;
