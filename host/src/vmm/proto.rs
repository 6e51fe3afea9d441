//! The messages between a node and its VMM processes, and their framing
//! on the VMM's Unix socket.
//!
//! A frame is `[u32 header length][u32 payload length][header][payload]`,
//! little-endian lengths, the header JSON, the payload raw bytes (dirty
//! bitmaps, saved state, console output, disk data). A file descriptor
//! (the guest memory memfd) rides on the frame's first bytes as
//! `SCM_RIGHTS`. Every request gets exactly one reply, in order.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// The largest header a peer may send.
const MAX_HEADER: u32 = 1 << 20;
/// The largest payload a peer may send (a saved state or a dirty bitmap
/// of a 1 TiB guest fits many times).
const MAX_PAYLOAD: u32 = 256 << 20;

/// What the guest runs at boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Boot {
    /// The built-in test guest.
    TestGuest {
        /// Its working set in MiB.
        wss_mib: u64,
    },
    /// A Linux kernel through its PVH entry.
    Linux {
        /// The uncompressed kernel (vmlinux).
        kernel: PathBuf,
        /// The initramfs.
        initrd: Option<PathBuf>,
        /// The kernel command line.
        cmdline: String,
    },
    /// Nothing: memory as given, vCPUs at reset, waiting for a saved state
    /// (a migration's shadow, a VMM upgrade's successor).
    Blank,
}

/// A VM's virtio devices, in bus order: the disks, then the NIC.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSpec {
    /// A disk of each of these sizes in bytes, in the VM's disk order,
    /// served by the node over [`Request::Block`] channels.
    #[serde(default)]
    pub disks: Vec<u64>,
    /// The NIC.
    #[serde(default)]
    pub nic: Option<NicSpec>,
}

/// A VM's NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    /// Its MAC address.
    pub mac: [u8; 6],
    /// The bridge its tap joins (`None`: no cable).
    pub bridge: Option<String>,
}

/// A request from the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Make the VM over the memory memfd that comes with this frame.
    Create {
        /// What to boot.
        boot: Boot,
        /// vCPUs.
        vcpus: u8,
        /// Where the serial console's output is kept (a blank VM
        /// restored from a Linux guest's state gets its console from the
        /// state).
        console_log: Option<PathBuf>,
        /// The CPU model: the features the guest sees (`None`: all this
        /// host's KVM supports).
        cpu_model: Option<Vec<String>>,
        /// Its virtio devices (a Linux guest finds them on its command
        /// line; a blank VM needs them to take a saved state that has
        /// them).
        #[serde(default)]
        devices: DeviceSpec,
    },
    /// Describe the VM; the reply carries the memory memfd.
    Attach,
    /// Stop the vCPUs.
    Pause,
    /// Run the vCPUs.
    Resume,
    /// Start dirty logging.
    StartDirtyLog,
    /// The dirty pages since the last call (payload: bitmap words).
    TakeDirty,
    /// Stop dirty logging.
    StopDirtyLog,
    /// The paused VM's vCPU and device state (payload).
    SaveState,
    /// Restore the state in the payload into the paused VM.
    RestoreState,
    /// Keep the vCPUs off the CPU this share of the time.
    Throttle(u8),
    /// How the VM is doing.
    Status,
    /// The console's newest output (payload).
    Console,
    /// Type the payload into the console.
    ConsoleInput,
    /// Turn this connection into the guest disk device's channel: the VMM
    /// sends [`DiskRequest`]s on it and waits for each [`DiskReply`].
    Disk {
        /// Pattern blocks of the disk.
        blocks: u64,
        /// Write stride.
        stride: u64,
    },
    /// Turn this connection into virtio disk `index`'s channel: the VMM
    /// sends the guest's [`DiskRequest`]s on it and waits for each
    /// [`DiskReply`]. A newer channel for the same disk replaces this one.
    Block {
        /// The disk, in the VM's disk order.
        index: u32,
    },
    /// Rename the control socket to this path (an upgrade's successor
    /// takes the name of the VMM it replaces).
    MoveSocket(PathBuf),
    /// Power off and exit.
    Quit,
}

/// The VM's condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Whether any vCPU runs.
    pub running: bool,
    /// CPU time of the vCPU threads, ns.
    pub cpu_nanos: u64,
    /// The workload's pass counter.
    pub pass: u64,
    /// A CPU exception the test guest reported.
    pub exception: Option<u64>,
}

/// Who the VMM is, as [`Request::Attach`] answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Its process id.
    pub pid: u32,
    /// Guest memory bytes.
    pub memory_bytes: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Its virtio devices.
    #[serde(default)]
    pub devices: DeviceSpec,
}

/// Why a request failed, by kind (mapped onto `GuestError`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Failure {
    /// The VM must be paused for this.
    #[error("the guest must be paused for this")]
    NotPaused,
    /// Dirty logging is off.
    #[error("dirty logging is off")]
    NotLogging,
    /// A page outside guest memory.
    #[error("page {0} is outside guest memory")]
    OutOfRange(u64),
    /// A state that does not fit.
    #[error("bad guest state: {0}")]
    BadState(String),
    /// There is no VM yet (or already one, for `Create`).
    #[error("{0}")]
    NoVm(String),
    /// The backend failed.
    #[error("{op}: {reason}")]
    Backend {
        /// What was attempted.
        op: String,
        /// Why.
        reason: String,
    },
}

/// A reply to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Done; any result is in the payload.
    Done,
    /// The vCPUs stopped after this many microseconds.
    Paused(u64),
    /// The VM's condition.
    Status(Status),
    /// The VMM's identity (the memfd rides along).
    Attached(Identity),
    /// How many bytes were taken.
    Taken(u64),
    /// It failed.
    Failed(Failure),
}

/// A guest disk request, sent by the VMM on a disk channel (payload: a
/// write's data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskRequest {
    /// Read `len` bytes at `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u32,
    },
    /// Write the payload at `offset`, durable before the answer.
    Write {
        /// Byte offset.
        offset: u64,
        /// The guest's pattern write number, if it is one.
        seq: Option<u64>,
    },
}

/// The node's answer to a [`DiskRequest`] (payload: a read's data).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskReply {
    /// Done (a write: durable).
    Done,
    /// Failed, and why.
    Failed(String),
}

/// Why a frame could not be exchanged.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The socket failed or closed.
    #[error("VMM socket: {0}")]
    Io(#[from] std::io::Error),
    /// The peer sent something that is not a frame of this protocol.
    #[error("VMM socket: bad frame: {0}")]
    Bad(String),
}

/// Sends one frame, with `fd` attached if given.
pub fn send<T: Serialize>(
    stream: &UnixStream,
    header: &T,
    payload: &[u8],
    fd: Option<&File>,
) -> Result<(), FrameError> {
    let header = serde_json::to_vec(header).map_err(|e| FrameError::Bad(e.to_string()))?;
    let lengths =
        |n: usize| u32::try_from(n).map_err(|_| FrameError::Bad("frame too large".into()));
    let mut head = Vec::with_capacity(8 + header.len());
    head.extend_from_slice(&lengths(header.len())?.to_le_bytes());
    head.extend_from_slice(&lengths(payload.len())?.to_le_bytes());
    head.extend_from_slice(&header);
    let mut w = stream;
    match fd {
        Some(f) => {
            let sent = stream
                .send_with_fd(&head[..8], f.as_raw_fd())
                .map_err(|e| FrameError::Io(std::io::Error::from_raw_os_error(e.errno())))?;
            w.write_all(&head[sent..])?;
        }
        None => w.write_all(&head)?,
    }
    w.write_all(payload)?;
    Ok(())
}

/// Receives one frame: its header, payload and any attached file.
pub fn receive<T: for<'de> Deserialize<'de>>(
    stream: &UnixStream,
) -> Result<(T, Vec<u8>, Option<File>), FrameError> {
    let mut lengths = [0u8; 8];
    let mut fds = [-1; 1];
    let mut iov = [libc::iovec {
        iov_base: lengths.as_mut_ptr().cast(),
        iov_len: lengths.len(),
    }];
    // SAFETY: the iovec points at `lengths`, alive and writable here.
    let (got, nfds) = unsafe { stream.recv_with_fds(&mut iov, &mut fds) }
        .map_err(|e| FrameError::Io(std::io::Error::from_raw_os_error(e.errno())))?;
    // SAFETY: a descriptor the kernel just gave this process, owned by no one else.
    let file = (nfds > 0).then(|| unsafe { File::from_raw_fd(fds[0]) });
    if got == 0 {
        return Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    let mut r = stream;
    r.read_exact(&mut lengths[got..])?;
    let (header_len, payload_len) = frame_lengths(&lengths)?;
    let mut header = vec![0; header_len];
    r.read_exact(&mut header)?;
    let mut payload = vec![0; payload_len];
    r.read_exact(&mut payload)?;
    Ok((parse_header(&header)?, payload, file))
}

/// Checks a frame's two lengths against the limits.
fn frame_lengths(lengths: &[u8; 8]) -> Result<(usize, usize), FrameError> {
    let header_len = u32::from_le_bytes(lengths[..4].try_into().expect("4 bytes"));
    let payload_len = u32::from_le_bytes(lengths[4..].try_into().expect("4 bytes"));
    if header_len > MAX_HEADER || payload_len > MAX_PAYLOAD {
        return Err(FrameError::Bad(format!(
            "a {header_len}-byte header or {payload_len}-byte payload is over the limit"
        )));
    }
    Ok((header_len as usize, payload_len as usize))
}

fn parse_header<T: for<'de> Deserialize<'de>>(header: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(header).map_err(|e| FrameError::Bad(e.to_string()))
}

/// Decodes one whole frame held in `bytes` (what [`receive`] reads from a
/// socket), returning its header and payload; bytes left over are refused.
pub fn decode_frame<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<(T, &[u8]), FrameError> {
    let short = || FrameError::Bad(format!("a frame cut short at {} bytes", bytes.len()));
    let (lengths, rest) = bytes.split_first_chunk::<8>().ok_or_else(short)?;
    let (header_len, payload_len) = frame_lengths(lengths)?;
    if rest.len() != header_len + payload_len {
        return Err(FrameError::Bad(format!(
            "a frame of {} bytes announces {header_len} + {payload_len}",
            bytes.len()
        )));
    }
    let (header, payload) = rest.split_at(header_len);
    Ok((parse_header(header)?, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_header_payload_and_a_descriptor() {
        let (a, b) = UnixStream::pair().expect("pair");
        let memfd = tempfile::tempfile().expect("file");
        memfd.set_len(8192).expect("size");
        send(&a, &Request::RestoreState, &[7; 5000], Some(&memfd)).expect("send");
        send(&a, &Request::Throttle(40), &[], None).expect("send");
        let (r, payload, fd): (Request, _, _) = receive(&b).expect("receive");
        assert_eq!(r, Request::RestoreState);
        assert_eq!(payload, vec![7; 5000]);
        let fd = fd.expect("the descriptor arrived");
        assert_eq!(fd.metadata().expect("stat").len(), 8192);
        let (r, payload, fd): (Request, _, _) = receive(&b).expect("receive");
        assert_eq!(
            (r, payload.len(), fd.is_none()),
            (Request::Throttle(40), 0, true)
        );
    }

    #[test]
    fn oversized_or_garbled_frames_are_refused() {
        let (a, b) = UnixStream::pair().expect("pair");
        let mut w = &a;
        w.write_all(&u32::MAX.to_le_bytes()).expect("write");
        w.write_all(&0u32.to_le_bytes()).expect("write");
        assert!(matches!(receive::<Request>(&b), Err(FrameError::Bad(_))));
        let (a, b) = UnixStream::pair().expect("pair");
        let mut w = &a;
        w.write_all(&3u32.to_le_bytes()).expect("write");
        w.write_all(&0u32.to_le_bytes()).expect("write");
        w.write_all(b"{{{").expect("write");
        assert!(matches!(receive::<Request>(&b), Err(FrameError::Bad(_))));
        drop(a);
        assert!(matches!(receive::<Request>(&b), Err(FrameError::Io(_))));
    }
}
