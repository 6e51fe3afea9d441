//! Network interfaces by ioctl: `struct ifreq`, the control socket, and
//! the few calls ferry makes (index, flags, up, bridge port, address).
//!
//! Written by hand rather than with a netlink crate: these are a handful
//! of fixed calls, and the tap crates on crates.io open taps but none
//! puts one on a bridge.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const SIOCGIFINDEX: libc::c_ulong = 0x8933;
const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
const SIOCSIFADDR: libc::c_ulong = 0x8916;
const SIOCSIFNETMASK: libc::c_ulong = 0x891c;
const SIOCBRADDBR: libc::c_ulong = 0x89a0;
const SIOCBRADDIF: libc::c_ulong = 0x89a2;
const IFF_UP: libc::c_short = 0x0001;
/// Bytes of an interface name, with its NUL.
pub const IFNAMSIZ: usize = 16;

/// Why an interface could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetDevError {
    /// Not a valid interface name.
    #[error("{0:?} is not a valid interface name (1 to 15 bytes)")]
    Name(String),
    /// A system call failed.
    #[error("{op}: {source}")]
    Os {
        /// What was attempted.
        op: String,
        /// Why.
        source: std::io::Error,
    },
}

impl NetDevError {
    /// The operating system's refusal, if that is what it was.
    pub fn os_error(&self) -> Option<&std::io::Error> {
        match self {
            Self::Os { source, .. } => Some(source),
            Self::Name(_) => None,
        }
    }
}

/// Maps an `io::Error` of `op` to [`NetDevError::Os`].
pub fn os(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetDevError {
    let op = op.into();
    move |source| NetDevError::Os { op, source }
}

/// `struct ifreq`: a name and a 24-byte union (flags, an index or an
/// address here).
#[repr(C)]
pub struct IfReq {
    name: [u8; IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    /// A request about interface `name`.
    pub fn named(name: &str) -> Result<Self, NetDevError> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= IFNAMSIZ || bytes.contains(&0) {
            return Err(NetDevError::Name(name.to_owned()));
        }
        let mut r = Self {
            name: [0; IFNAMSIZ],
            data: [0; 24],
        };
        r.name[..bytes.len()].copy_from_slice(bytes);
        Ok(r)
    }

    fn short(&self) -> libc::c_short {
        libc::c_short::from_ne_bytes([self.data[0], self.data[1]])
    }

    /// Sets the union's first `short` (flags).
    pub fn set_short(&mut self, v: libc::c_short) {
        self.data[..2].copy_from_slice(&v.to_ne_bytes());
    }

    fn int(&self) -> libc::c_int {
        libc::c_int::from_ne_bytes([self.data[0], self.data[1], self.data[2], self.data[3]])
    }

    fn set_int(&mut self, v: libc::c_int) {
        self.data[..4].copy_from_slice(&v.to_ne_bytes());
    }

    /// Sets the union to a `struct sockaddr_in` of `addr`.
    fn set_ipv4(&mut self, addr: Ipv4Addr) {
        self.data = [0; 24];
        let family = u16::try_from(libc::AF_INET).unwrap_or(2);
        self.data[..2].copy_from_slice(&family.to_ne_bytes());
        self.data[4..8].copy_from_slice(&addr.octets());
    }
}

/// A socket for interface ioctls.
pub fn control_socket() -> Result<File, NetDevError> {
    // SAFETY: plain arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(os("control socket")(std::io::Error::last_os_error()));
    }
    // SAFETY: a descriptor just opened, owned by nothing else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// One interface ioctl with `req`.
pub fn ioctl(fd: &File, request: libc::c_ulong, req: &mut IfReq) -> std::io::Result<()> {
    // SAFETY: `req` is a live `struct ifreq` the kernel reads and writes.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request, std::ptr::from_mut(req)) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Interface `name`'s index.
pub fn index_of(sock: &File, name: &str) -> Result<libc::c_int, NetDevError> {
    let mut req = IfReq::named(name)?;
    ioctl(sock, SIOCGIFINDEX, &mut req).map_err(os(format!("index of {name}")))?;
    Ok(req.int())
}

/// Brings interface `name` up.
pub fn bring_up(sock: &File, name: &str) -> Result<(), NetDevError> {
    let mut flags = IfReq::named(name)?;
    ioctl(sock, SIOCGIFFLAGS, &mut flags).map_err(os(format!("flags of {name}")))?;
    flags.set_short(flags.short() | IFF_UP);
    ioctl(sock, SIOCSIFFLAGS, &mut flags).map_err(os(format!("bring {name} up")))
}

/// Adds interface `port` (by index) to `bridge`.
pub fn add_to_bridge(
    sock: &File,
    bridge: &str,
    port: libc::c_int,
    port_name: &str,
) -> Result<(), NetDevError> {
    let mut add = IfReq::named(bridge)?;
    add.set_int(port);
    ioctl(sock, SIOCBRADDIF, &mut add).map_err(os(format!("add {port_name} to bridge {bridge}")))
}

/// Creates bridge `name` (spanning tree off: ports forward at once).
pub fn create_bridge(sock: &File, name: &str) -> Result<(), NetDevError> {
    let req = IfReq::named(name)?;
    // SAFETY: SIOCBRADDBR reads a NUL-terminated name; `req.name` is one.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCBRADDBR, req.name.as_ptr()) };
    if r < 0 {
        return Err(os(format!("create bridge {name}"))(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Gives interface `name` address `addr` with a netmask of `prefix` bits.
pub fn set_ipv4(sock: &File, name: &str, addr: Ipv4Addr, prefix: u8) -> Result<(), NetDevError> {
    let mut req = IfReq::named(name)?;
    req.set_ipv4(addr);
    ioctl(sock, SIOCSIFADDR, &mut req).map_err(os(format!("address {addr} on {name}")))?;
    let mask = u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0);
    let mut req = IfReq::named(name)?;
    req.set_ipv4(Ipv4Addr::from(mask));
    ioctl(sock, SIOCSIFNETMASK, &mut req).map_err(os(format!("netmask /{prefix} on {name}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_any_call() {
        assert!(matches!(IfReq::named(""), Err(NetDevError::Name(_))));
        assert!(matches!(
            IfReq::named("sixteen-bytes-xx"),
            Err(NetDevError::Name(_))
        ));
        assert!(matches!(IfReq::named("a\0b"), Err(NetDevError::Name(_))));
        assert!(IfReq::named("fifteen-bytes-x").is_ok());
    }

    #[test]
    fn an_address_is_laid_out_as_sockaddr_in() {
        let mut req = IfReq::named("br0").expect("name");
        req.set_ipv4(Ipv4Addr::new(10, 77, 0, 1));
        assert_eq!(u16::from_ne_bytes([req.data[0], req.data[1]]), 2);
        assert_eq!(&req.data[2..4], &[0, 0], "port 0");
        assert_eq!(&req.data[4..8], &[10, 77, 0, 1]);
        assert!(req.data[8..].iter().all(|&b| b == 0));
    }
}
