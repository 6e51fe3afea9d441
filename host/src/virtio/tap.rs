//! A tap device on a Linux bridge: the host side of a guest's NIC.
//!
//! Written with a few ioctls (`TUNSETIFF`, `SIOCGIFINDEX`,
//! `SIOCGIFFLAGS`/`SIOCSIFFLAGS`, `SIOCBRADDIF`) rather than a crate: the
//! tap crates on crates.io open taps but none puts one on a bridge, and
//! these are four fixed calls. The tap is not persistent: it goes with
//! the VMM process that opened it, so a source host stops sending for a
//! guest that left the moment its VMM quits.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::net::NetIo;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_UP: libc::c_short = 0x0001;
const SIOCGIFINDEX: libc::c_ulong = 0x8933;
const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
const SIOCBRADDIF: libc::c_ulong = 0x89a2;
/// Bytes of an interface name, with its NUL.
const IFNAMSIZ: usize = 16;

/// `struct ifreq`: a name and a 24-byte union (flags or an index here).
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn named(name: &str) -> Result<Self, TapError> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= IFNAMSIZ || bytes.contains(&0) {
            return Err(TapError::Name(name.to_owned()));
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

    fn set_short(&mut self, v: libc::c_short) {
        self.data[..2].copy_from_slice(&v.to_ne_bytes());
    }

    fn int(&self) -> libc::c_int {
        libc::c_int::from_ne_bytes([self.data[0], self.data[1], self.data[2], self.data[3]])
    }

    fn set_int(&mut self, v: libc::c_int) {
        self.data[..4].copy_from_slice(&v.to_ne_bytes());
    }
}

/// Why a tap could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
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

fn os(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> TapError {
    let op = op.into();
    move |source| TapError::Os { op, source }
}

/// An open tap device.
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Creates tap `name`, brings it up and adds it to `bridge`.
    pub fn on_bridge(name: &str, bridge: &str) -> Result<Self, TapError> {
        let tap = Self::open(name)?;
        let sock = control_socket()?;
        let mut req = IfReq::named(name)?;
        ioctl(&sock, SIOCGIFINDEX, &mut req).map_err(os(format!("index of {name}")))?;
        let index = req.int();
        let mut flags = IfReq::named(name)?;
        ioctl(&sock, SIOCGIFFLAGS, &mut flags).map_err(os(format!("flags of {name}")))?;
        flags.set_short(flags.short() | IFF_UP);
        ioctl(&sock, SIOCSIFFLAGS, &mut flags).map_err(os(format!("bring {name} up")))?;
        let mut add = IfReq::named(bridge)?;
        add.set_int(index);
        ioctl(&sock, SIOCBRADDIF, &mut add)
            .map_err(os(format!("add {name} to bridge {bridge}")))?;
        Ok(tap)
    }

    /// Creates tap `name` (frames without packet information), non-blocking.
    fn open(name: &str) -> Result<Self, TapError> {
        let mut req = IfReq::named(name)?;
        // SAFETY: a NUL-terminated path and plain flags.
        let fd = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(os("open /dev/net/tun")(std::io::Error::last_os_error()));
        }
        // SAFETY: a descriptor just opened, owned by nothing else.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        req.set_short(IFF_TAP | IFF_NO_PI);
        ioctl(&file, TUNSETIFF, &mut req).map_err(os(format!("create tap {name}")))?;
        Ok(Self {
            file,
            name: name.to_owned(),
        })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A second descriptor of the tap, for a thread that waits for frames.
    pub fn watcher(&self) -> std::io::Result<File> {
        self.file.try_clone()
    }
}

fn control_socket() -> Result<File, TapError> {
    // SAFETY: plain arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(os("control socket")(std::io::Error::last_os_error()));
    }
    // SAFETY: a descriptor just opened, owned by nothing else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn ioctl(fd: &File, request: libc::c_ulong, req: &mut IfReq) -> std::io::Result<()> {
    // SAFETY: `req` is a live `struct ifreq` the kernel reads and writes.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request, std::ptr::from_mut(req)) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl NetIo for Tap {
    fn send(&mut self, frame: &[u8]) {
        // SAFETY: a readable buffer of `frame.len()` bytes.
        let _ = unsafe { libc::write(self.file.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
    }

    fn receive(&mut self, buf: &mut [u8]) -> Option<usize> {
        // SAFETY: a writable buffer of `buf.len()` bytes.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        usize::try_from(n).ok().filter(|&n| n > 0)
    }
}

/// Waits up to `timeout_ms` for `fd` to have a frame; true when it has.
pub fn wait_readable(fd: &File, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd.
    let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    r > 0 && p.revents & libc::POLLIN != 0
}
