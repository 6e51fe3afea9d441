//! [`VmmGuest`]: a guest that runs in its own VMM process, seen by the
//! node through the [`GuestBackend`] trait.
//!
//! Guest memory is a memfd both processes map, so the node's migration
//! lanes read and write guest pages in place; everything else is a
//! request on the VMM's socket.

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_actors::disk::DiskPort;
use ferry_actors::guest::{
    DirtyBitmap, GuestBackend, GuestError, GuestProgress, PAGE_BYTES, UpgradeReport,
};
use ferry_actors::ram::GuestRam;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, MmapRegion};

use super::proto::{
    self, Boot, DeviceSpec, DiskReply, DiskRequest, Failure, Reply, Request, Status,
};
use crate::kvm::{self, Memory};

/// Where a node keeps its VMM processes' sockets and logs, and the binary
/// it starts them from.
#[derive(Debug, Clone)]
pub struct VmmHome {
    /// The `ferry` binary (`ferry vmm` runs a VMM).
    pub exe: PathBuf,
    /// The directory of sockets and logs.
    pub dir: PathBuf,
}

impl VmmHome {
    /// The control socket of VM `name`.
    pub fn socket(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.sock"))
    }

    /// The VMM's own log of VM `name`.
    pub fn log(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.vmm.log"))
    }

    /// The serial console log of VM `name`.
    pub fn console_log(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.console.log"))
    }
}

fn backend(op: &'static str) -> impl Fn(String) -> GuestError {
    move |reason| GuestError::Backend { op, reason }
}

fn from_failure(op: &'static str, f: Failure) -> GuestError {
    match f {
        Failure::NotPaused => GuestError::NotPaused,
        Failure::NotLogging => GuestError::NotLogging,
        Failure::OutOfRange(p) => GuestError::OutOfRange(p),
        Failure::BadState(s) => GuestError::BadState(s),
        other => GuestError::Backend {
            op,
            reason: other.to_string(),
        },
    }
}

/// The guest's disk device, kept to connect it again to a successor VMM.
struct Disk {
    port: Arc<dyn DiskPort>,
    blocks: u64,
    stride: u64,
}

/// A guest in a VMM process.
pub struct VmmGuest {
    name: String,
    home: VmmHome,
    control: Mutex<UnixStream>,
    memory: Memory,
    memory_bytes: u64,
    vcpus: u8,
    pid: u32,
    dirty_logging: bool,
    disk: Option<Disk>,
    /// The guest's virtio devices.
    devices: DeviceSpec,
    /// The ports their channels serve, kept to connect a successor VMM.
    block_ports: Vec<Arc<dyn DiskPort>>,
}

impl std::fmt::Debug for VmmGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmmGuest")
            .field("name", &self.name)
            .field("pid", &self.pid)
            .field("memory_bytes", &self.memory_bytes)
            .finish_non_exhaustive()
    }
}

/// Starts `ferry vmm` on `socket` and connects to it.
fn launch(home: &VmmHome, name: &str, socket: &Path) -> Result<(UnixStream, u32), GuestError> {
    let fail = backend("start the VMM process");
    std::fs::create_dir_all(&home.dir).map_err(|e| fail(format!("{}: {e}", home.dir.display())))?;
    if UnixStream::connect(socket).is_ok() {
        return Err(fail(format!(
            "a VMM already serves {} (a VM of that name still runs here)",
            socket.display()
        )));
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(home.log(name))
        .map_err(|e| fail(format!("{}: {e}", home.log(name).display())))?;
    let log2 = log.try_clone().map_err(|e| fail(e.to_string()))?;
    let mut child = std::process::Command::new(&home.exe)
        .arg("vmm")
        .arg("--socket")
        .arg(socket)
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2)
        // Its own process group: a Ctrl-C meant for the node does not
        // reach the guests.
        .process_group(0)
        .spawn()
        .map_err(|e| fail(format!("{}: {e}", home.exe.display())))?;
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    let stream = loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(fail(format!(
                "it exited at once ({status}); see {}",
                home.log(name).display()
            )));
        }
        if let Ok(s) = UnixStream::connect(socket) {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(fail("it did not listen within 10 s".into()));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let vm = name.to_owned();
    // Reaps the process (a node that outlives its VMM) and says so.
    std::thread::spawn(move || {
        if let Ok(status) = child.wait() {
            if status.success() {
                tracing::debug!(%vm, pid, "VMM process exited");
            } else {
                tracing::error!(%vm, pid, %status, "VMM process died: the VM is down");
            }
        }
    });
    Ok((stream, pid))
}

/// One request and its reply on `conn`.
fn exchange(
    conn: &UnixStream,
    op: &'static str,
    request: &Request,
    payload: &[u8],
    fd: Option<&File>,
) -> Result<(Reply, Vec<u8>, Option<File>), GuestError> {
    let gone = |e: proto::FrameError| GuestError::Backend {
        op,
        reason: format!("the VMM process does not answer: {e}"),
    };
    proto::send(conn, request, payload, fd).map_err(gone)?;
    let (reply, body, file) = proto::receive::<Reply>(conn).map_err(gone)?;
    match reply {
        Reply::Failed(f) => Err(from_failure(op, f)),
        ok => Ok((ok, body, file)),
    }
}

impl VmmGuest {
    /// Starts a VMM process for VM `name` that boots `boot` with `vcpus`
    /// in `memory` (a memfd region, zeroed; a blank VM keeps what is in it).
    pub fn start(
        home: &VmmHome,
        name: &str,
        boot: Boot,
        vcpus: u8,
        memory: MmapRegion<AtomicBitmap>,
    ) -> Result<Self, GuestError> {
        Self::start_with_model(home, name, boot, vcpus, None, DeviceSpec::default(), memory)
    }

    /// As [`Self::start`], the guest seeing only the CPU features of
    /// `cpu_model` (`None`: all this host's KVM supports), with the
    /// virtio `devices` (its disks connected to the node's by
    /// [`GuestBackend::connect_block_devices`]).
    pub fn start_with_model(
        home: &VmmHome,
        name: &str,
        boot: Boot,
        vcpus: u8,
        cpu_model: Option<Vec<String>>,
        devices: DeviceSpec,
        memory: MmapRegion<AtomicBitmap>,
    ) -> Result<Self, GuestError> {
        let socket = home.socket(name);
        let memfd = memfd_of(&memory)?;
        let (conn, pid) = launch(home, name, &socket)?;
        let create = Request::Create {
            boot,
            vcpus,
            console_log: Some(home.console_log(name)),
            cpu_model,
            devices: devices.clone(),
        };
        if let Err(e) = exchange(&conn, "create the VM", &create, &[], Some(&memfd)) {
            let _ = exchange(&conn, "quit", &Request::Quit, &[], None);
            return Err(e);
        }
        let memory =
            kvm::memory_of(memory).map_err(|e| backend("map guest memory")(e.to_string()))?;
        Ok(Self {
            name: name.to_owned(),
            home: home.clone(),
            control: Mutex::new(conn),
            memory_bytes: kvm::memory_len(&memory),
            memory,
            vcpus,
            pid,
            dirty_logging: false,
            disk: None,
            devices,
            block_ports: Vec::new(),
        })
    }

    /// Connects to the VMM process that already runs VM `name` (a node
    /// that restarted). `Ok(None)`: no VMM serves its socket.
    pub fn attach(home: &VmmHome, name: &str) -> Result<Option<Self>, GuestError> {
        let Ok(conn) = UnixStream::connect(home.socket(name)) else {
            return Ok(None);
        };
        let (reply, _, memfd) = exchange(&conn, "attach to the VMM", &Request::Attach, &[], None)?;
        let (Reply::Attached(id), Some(memfd)) = (reply, memfd) else {
            return Err(backend("attach to the VMM")(
                "it answered without its identity and memory".into(),
            ));
        };
        let region =
            kvm::map_shared(memfd).map_err(|e| backend("map guest memory")(e.to_string()))?;
        let memory =
            kvm::memory_of(region).map_err(|e| backend("map guest memory")(e.to_string()))?;
        Ok(Some(Self {
            name: name.to_owned(),
            home: home.clone(),
            control: Mutex::new(conn),
            memory,
            memory_bytes: id.memory_bytes,
            vcpus: id.vcpus,
            pid: id.pid,
            dirty_logging: false,
            disk: None,
            devices: id.devices,
            block_ports: Vec::new(),
        }))
    }

    /// The VMM's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn call(
        &self,
        op: &'static str,
        request: &Request,
        payload: &[u8],
    ) -> Result<(Reply, Vec<u8>), GuestError> {
        let conn = self.control.lock().expect("VMM control connection");
        exchange(&conn, op, request, payload, None).map(|(r, b, _)| (r, b))
    }

    fn status(&self) -> Result<Status, GuestError> {
        match self.call("read status", &Request::Status, &[])?.0 {
            Reply::Status(s) => Ok(s),
            other => Err(backend("read status")(format!(
                "unexpected answer {other:?}"
            ))),
        }
    }

    fn bitmap(&self) -> &AtomicBitmap {
        let region: &MmapRegion<AtomicBitmap> = self
            .memory
            .iter()
            .next()
            .expect("guest memory has one region");
        region.bitmap()
    }

    fn page_addr(&self, gfn: u64) -> Result<GuestAddress, GuestError> {
        if gfn >= self.memory_bytes / PAGE_BYTES {
            return Err(GuestError::OutOfRange(gfn));
        }
        Ok(GuestAddress(gfn * PAGE_BYTES))
    }

    /// Opens a disk channel to the VMM at `socket` for `disk`.
    fn connect_disk(socket: &Path, disk: &Disk) -> Result<(), GuestError> {
        let fail = backend("attach disk");
        let conn = UnixStream::connect(socket).map_err(|e| fail(e.to_string()))?;
        let request = Request::Disk {
            blocks: disk.blocks,
            stride: disk.stride,
        };
        exchange(&conn, "attach disk", &request, &[], None)?;
        let port = disk.port.clone();
        std::thread::Builder::new()
            .name("vmm-disk".into())
            .spawn(move || serve_disk(&conn, port.as_ref()))
            .map_err(|e| fail(e.to_string()))?;
        Ok(())
    }
}

/// Opens virtio disk `index`'s channel to the VMM at `socket`, served by
/// `port`.
fn connect_block(socket: &Path, index: usize, port: Arc<dyn DiskPort>) -> Result<(), GuestError> {
    let fail = backend("connect disk");
    let conn = UnixStream::connect(socket).map_err(|e| fail(e.to_string()))?;
    let index = u32::try_from(index).map_err(|e| fail(e.to_string()))?;
    exchange(&conn, "connect disk", &Request::Block { index }, &[], None)?;
    std::thread::Builder::new()
        .name("vmm-block".into())
        .spawn(move || serve_disk(&conn, port.as_ref()))
        .map_err(|e| fail(e.to_string()))?;
    Ok(())
}

/// Carries out the guest's disk requests the VMM sends, until it goes.
fn serve_disk(conn: &UnixStream, port: &dyn DiskPort) {
    while let Ok((request, data, _)) = proto::receive::<DiskRequest>(conn) {
        let answer = match request {
            DiskRequest::Write { offset, seq } => {
                port.write(offset, data, seq).map(|()| Vec::new())
            }
            DiskRequest::Read { offset, len } => port.read(offset, len),
        };
        let (reply, payload) = match answer {
            Ok(payload) => (DiskReply::Done, payload),
            Err(e) => (DiskReply::Failed(e.to_string()), Vec::new()),
        };
        if proto::send(conn, &reply, &payload, None).is_err() {
            return;
        }
    }
}

fn memfd_of(region: &MmapRegion<AtomicBitmap>) -> Result<File, GuestError> {
    region
        .file_offset()
        .ok_or_else(|| backend("share guest memory")("the memory is not in a memfd".into()))?
        .file()
        .try_clone()
        .map_err(|e| backend("share guest memory")(e.to_string()))
}

impl GuestBackend for VmmGuest {
    fn memory_bytes(&self) -> u64 {
        self.memory_bytes
    }

    fn read_page(&self, gfn: u64, dst: &mut [u8]) -> Result<(), GuestError> {
        let addr = self.page_addr(gfn)?;
        self.memory
            .read_slice(dst, addr)
            .map_err(|_| GuestError::OutOfRange(gfn))
    }

    fn write_page(&mut self, gfn: u64, src: &[u8]) -> Result<(), GuestError> {
        let addr = self.page_addr(gfn)?;
        self.memory
            .write_slice(src, addr)
            .map_err(|_| GuestError::OutOfRange(gfn))
    }

    fn start_dirty_log(&mut self) -> Result<(), GuestError> {
        self.call("start dirty log", &Request::StartDirtyLog, &[])?;
        self.bitmap().reset();
        self.dirty_logging = true;
        Ok(())
    }

    fn take_dirty(&mut self) -> Result<DirtyBitmap, GuestError> {
        let (_, bytes) = self.call("read dirty log", &Request::TakeDirty, &[])?;
        let mut words: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
            .collect();
        for (word, ours) in words.iter_mut().zip(self.bitmap().get_and_reset()) {
            *word |= ours;
        }
        Ok(DirtyBitmap::from_words(words, self.pages()))
    }

    fn stop_dirty_log(&mut self) -> Result<(), GuestError> {
        self.call("stop dirty log", &Request::StopDirtyLog, &[])?;
        self.dirty_logging = false;
        Ok(())
    }

    fn pause(&mut self) -> Result<(), GuestError> {
        self.call("pause", &Request::Pause, &[]).map(drop)
    }

    fn resume(&mut self) -> Result<(), GuestError> {
        self.call("resume", &Request::Resume, &[]).map(drop)
    }

    fn is_running(&self) -> bool {
        self.status().is_ok_and(|s| s.running)
    }

    fn save_state(&mut self) -> Result<Vec<u8>, GuestError> {
        self.call("save state", &Request::SaveState, &[])
            .map(|(_, b)| b)
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), GuestError> {
        self.call("restore state", &Request::RestoreState, state)
            .map(drop)
    }

    fn set_throttle(&mut self, percent: u8) -> Result<(), GuestError> {
        self.call("throttle", &Request::Throttle(percent), &[])
            .map(drop)
    }

    fn progress(&self) -> Result<GuestProgress, GuestError> {
        let s = self.status()?;
        Ok(GuestProgress {
            pass: s.pass,
            exception: s.exception,
        })
    }

    fn console(&self) -> Option<Vec<u8>> {
        self.call("read console", &Request::Console, &[])
            .ok()
            .map(|(_, b)| b)
            .filter(|b| !b.is_empty())
    }

    fn console_input(&mut self, bytes: &[u8]) -> Result<usize, GuestError> {
        match self.call("console input", &Request::ConsoleInput, bytes)?.0 {
            Reply::Taken(n) => Ok(usize::try_from(n).unwrap_or(0)),
            other => Err(backend("console input")(format!(
                "unexpected answer {other:?}"
            ))),
        }
    }

    fn cpu_time(&self) -> Duration {
        self.status()
            .map_or(Duration::ZERO, |s| Duration::from_nanos(s.cpu_nanos))
    }

    fn ram(&self) -> GuestRam {
        let host = self
            .memory
            .get_host_address(GuestAddress(0))
            .expect("guest memory starts at address 0");
        // SAFETY: the mapping covers `memory_bytes` from guest address 0 (one
        // region), and the clone of the memory handed over as owner keeps
        // it mapped while the view lives, even past this guest.
        unsafe { GuestRam::from_raw(host, self.memory_bytes, Arc::new(self.memory.clone())) }
    }

    fn run_for(&mut self, _elapsed: Duration) {
        // The VMM's vCPU threads run the guest on their own.
    }

    fn attach_disk(
        &mut self,
        port: Arc<dyn DiskPort>,
        blocks: u64,
        stride: u64,
    ) -> Result<bool, GuestError> {
        let disk = Disk {
            port,
            blocks,
            stride,
        };
        Self::connect_disk(&self.home.socket(&self.name), &disk)?;
        self.disk = Some(disk);
        Ok(true)
    }

    fn connect_block_devices(
        &mut self,
        ports: Vec<Arc<dyn DiskPort>>,
    ) -> Result<usize, GuestError> {
        let devices = self.devices.disks.len();
        if devices == 0 {
            return Ok(0);
        }
        if ports.len() != devices {
            return Err(backend("connect disks")(format!(
                "the guest has {devices} disks, given {}",
                ports.len()
            )));
        }
        let socket = self.home.socket(&self.name);
        for (i, port) in ports.iter().enumerate() {
            connect_block(&socket, i, port.clone())?;
        }
        self.block_ports = ports;
        Ok(devices)
    }

    fn crashed(&self) -> Option<String> {
        self.status()
            .err()
            .map(|e| format!("its VMM process {} is gone ({e})", self.pid))
    }

    fn discard(&mut self) {
        if let Err(e) = self.call("quit", &Request::Quit, &[]) {
            tracing::warn!(vm = %self.name, pid = self.pid, "stopping the VMM: {e}");
        }
        let _ = std::fs::remove_file(self.home.socket(&self.name));
    }

    fn upgrade(&mut self) -> Result<UpgradeReport, GuestError> {
        super::upgrade::replace(self)
    }
}

/// What [`super::upgrade`] needs to see and change.
impl VmmGuest {
    pub(super) fn parts(&self) -> (&str, &VmmHome, u8, bool) {
        (&self.name, &self.home, self.vcpus, self.dirty_logging)
    }

    /// The guest's virtio devices.
    pub(super) fn devices(&self) -> &DeviceSpec {
        &self.devices
    }

    pub(super) fn memfd(&self) -> Result<File, GuestError> {
        let region: &MmapRegion<AtomicBitmap> = self
            .memory
            .iter()
            .next()
            .expect("guest memory has one region");
        memfd_of(region)
    }

    pub(super) fn launch_successor(&self, socket: &Path) -> Result<(UnixStream, u32), GuestError> {
        launch(&self.home, &self.name, socket)
    }

    /// Connects the guest's disks to the VMM at `socket` (a successor).
    pub(super) fn reconnect_disk(&self, socket: &Path) -> Result<(), GuestError> {
        for (i, port) in self.block_ports.iter().enumerate() {
            connect_block(socket, i, port.clone())?;
        }
        match &self.disk {
            Some(d) => Self::connect_disk(socket, d),
            None => Ok(()),
        }
    }

    pub(super) fn control(&self) -> std::sync::MutexGuard<'_, UnixStream> {
        self.control.lock().expect("VMM control connection")
    }

    pub(super) fn take_over(&mut self, conn: UnixStream, pid: u32) {
        self.control = Mutex::new(conn);
        self.pid = pid;
    }
}

/// Sends `request` on `conn` and checks the answer.
pub(super) fn ask(
    conn: &UnixStream,
    op: &'static str,
    request: &Request,
    payload: &[u8],
    fd: Option<&File>,
) -> Result<(Reply, Vec<u8>), GuestError> {
    exchange(conn, op, request, payload, fd).map(|(r, b, _)| (r, b))
}
