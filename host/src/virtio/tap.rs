//! A tap device on a Linux bridge: the host side of a guest's NIC.
//!
//! Written with a few ioctls (`TUNSETIFF`, then [`crate::net::netdev`]'s
//! index, up and bridge-port calls) rather than a crate: the tap crates on
//! crates.io open taps but none puts one on a bridge. The tap is not persistent: it goes with
//! the VMM process that opened it, so a source host stops sending for a
//! guest that left the moment its VMM quits.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::net::NetIo;
use crate::net::netdev::{self, IfReq, NetDevError, os};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// Why a tap could not be set up.
pub type TapError = NetDevError;

/// An open tap device.
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Creates tap `name`, brings it up and adds it to `bridge`.
    pub fn on_bridge(name: &str, bridge: &str) -> Result<Self, TapError> {
        let tap = Self::open(name)?;
        let sock = netdev::control_socket()?;
        let index = netdev::index_of(&sock, name)?;
        netdev::bring_up(&sock, name)?;
        netdev::add_to_bridge(&sock, bridge, index, name)?;
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
        netdev::ioctl(&file, TUNSETIFF, &mut req).map_err(os(format!("create tap {name}")))?;
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
