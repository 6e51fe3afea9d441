//! A private network for `ferry demo`: the calling thread (and every
//! thread it starts afterwards) moves into a network namespace of its
//! own, with loopback up and one bridge that carries an address. Guests'
//! NICs join the bridge and the demo talks to them from that address;
//! nothing on the host's own network changes, and all of it goes when
//! the process exits. Needs `CAP_SYS_ADMIN` (root).

use std::net::Ipv4Addr;

use super::netdev::{self, NetDevError, os};

/// The network the calling thread now lives in.
#[derive(Debug, Clone)]
pub struct PrivateNet {
    /// The bridge guests' NICs join.
    pub bridge: String,
    /// The bridge's own address (the demo's side of the segment).
    pub address: Ipv4Addr,
    /// Bits of the segment's netmask.
    pub prefix: u8,
}

impl PrivateNet {
    /// Moves the calling thread into a new network namespace and sets up
    /// loopback and bridge `bridge` with `address`/`prefix`. Call it
    /// before starting the threads that should share the namespace.
    pub fn enter(bridge: &str, address: Ipv4Addr, prefix: u8) -> Result<Self, NetDevError> {
        // SAFETY: a flag-only system call on the calling thread.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(os("a network namespace of its own (unshare)")(
                std::io::Error::last_os_error(),
            ));
        }
        let sock = netdev::control_socket()?;
        netdev::bring_up(&sock, "lo")?;
        netdev::create_bridge(&sock, bridge)?;
        netdev::set_ipv4(&sock, bridge, address, prefix)?;
        netdev::bring_up(&sock, bridge)?;
        Ok(Self {
            bridge: bridge.to_owned(),
            address,
            prefix,
        })
    }

    /// True when `err` says the process may not make namespaces (not
    /// root): the caller goes on without a network.
    pub fn not_permitted(err: &NetDevError) -> bool {
        err.os_error()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied)
    }
}
