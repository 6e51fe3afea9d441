//! `ferry vmm`: the process that runs one VM.
//!
//! It listens on its Unix socket, makes the VM over the memfd the node
//! sends, and serves the node's requests, one thread per connection. It
//! does not depend on the node: when the node stops, crashes or is
//! upgraded, the guest runs on, and the node that starts again connects
//! to the same socket. It exits on [`Request::Quit`], or when its socket
//! file is gone (nobody can reach it any more: a removed state
//! directory).

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_actors::disk::{DiskError, DiskPort};
use ferry_actors::guest::{GuestBackend, GuestError};

use super::proto::{
    self, Boot, DeviceSpec, DiskReply, DiskRequest, Failure, Identity, Reply, Request, Status,
};
use crate::kvm::image::GuestParams;
use crate::kvm::linux::LinuxImage;
use crate::kvm::{self, KvmVm};

/// The VM and the file its memory lives in.
struct Running {
    vm: KvmVm,
    memfd: File,
    console_log: Option<PathBuf>,
    /// Its virtio devices, as created.
    devices: DeviceSpec,
}

impl Running {
    /// Keeps the console in its log, once the VM has a console (a blank
    /// VM gets one from the state it is restored from).
    fn log_console(&self) {
        if let Some(path) = &self.console_log
            && let Err(e) = self.vm.log_console_to(path)
        {
            eprintln!("vmm: console log {}: {e}", path.display());
        }
    }
}

/// What every connection thread shares.
struct Shared {
    vm: Mutex<Option<Running>>,
    socket: Mutex<PathBuf>,
}

/// Runs the VMM on `socket` until it is told to quit or its socket goes.
pub fn run(socket: &Path) -> anyhow::Result<()> {
    let listener = bind(socket)?;
    let shared = Arc::new(Shared {
        vm: Mutex::new(None),
        socket: Mutex::new(socket.to_owned()),
    });
    let inode = std::fs::metadata(socket)?.ino();
    let watched = shared.clone();
    std::thread::Builder::new()
        .name("socket-watch".into())
        .spawn(move || watch_socket(&watched, inode))?;
    eprintln!(
        "vmm {}: listening on {}",
        std::process::id(),
        socket.display()
    );
    for conn in listener.incoming() {
        let conn = conn?;
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("vmm-conn".into())
            .spawn(move || serve(&shared, &conn))?;
    }
    Ok(())
}

/// Binds `socket`, replacing a stale file no process listens on.
fn bind(socket: &Path) -> anyhow::Result<UnixListener> {
    if socket.exists() {
        if UnixStream::connect(socket).is_ok() {
            anyhow::bail!("a VMM already listens on {}", socket.display());
        }
        std::fs::remove_file(socket)?;
    }
    Ok(UnixListener::bind(socket)?)
}

/// Exits the process once the socket file is removed or replaced.
fn watch_socket(shared: &Shared, inode: u64) {
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let path = shared.socket.lock().expect("socket path").clone();
        match std::fs::metadata(&path) {
            Ok(m) if m.ino() == inode => {}
            _ => {
                eprintln!(
                    "vmm {}: socket {} is gone; nobody can reach this VM: exiting",
                    std::process::id(),
                    path.display()
                );
                std::process::exit(3);
            }
        }
    }
}

/// Serves one connection until it closes.
fn serve(shared: &Shared, conn: &UnixStream) {
    loop {
        let Ok((request, payload, fd)) = proto::receive::<Request>(conn) else {
            return;
        };
        if let Request::Disk { blocks, stride } = request {
            // The connection now belongs to the disk device.
            let reply = attach_disk(shared, conn, blocks, stride);
            let _ = proto::send(conn, &reply, &[], None);
            return;
        }
        if let Request::Block { index } = request {
            // The connection now belongs to virtio disk `index`.
            let reply = connect_block(shared, conn, index);
            let _ = proto::send(conn, &reply, &[], None);
            return;
        }
        let quit = request == Request::Quit;
        let (reply, body, memfd) = handle(shared, request, &payload, fd);
        let sent = proto::send(conn, &reply, &body, memfd.as_ref());
        if quit {
            eprintln!("vmm {}: told to quit", std::process::id());
            std::process::exit(0);
        }
        if sent.is_err() {
            return;
        }
    }
}

type Answer = (Reply, Vec<u8>, Option<File>);

fn failed(f: Failure) -> Answer {
    (Reply::Failed(f), Vec::new(), None)
}

fn done(body: Vec<u8>) -> Answer {
    (Reply::Done, body, None)
}

fn failure(e: GuestError) -> Failure {
    match e {
        GuestError::NotPaused => Failure::NotPaused,
        GuestError::NotLogging => Failure::NotLogging,
        GuestError::OutOfRange(p) => Failure::OutOfRange(p),
        GuestError::BadState(s) => Failure::BadState(s),
        GuestError::Backend { op, reason } => Failure::Backend {
            op: op.to_owned(),
            reason,
        },
        GuestError::Unsupported(what) => Failure::Backend {
            op: "unsupported".into(),
            reason: what.to_owned(),
        },
    }
}

fn handle(shared: &Shared, request: Request, payload: &[u8], fd: Option<File>) -> Answer {
    let mut slot = shared.vm.lock().expect("vm lock");
    if let Request::Create {
        boot,
        vcpus,
        console_log,
        cpu_model,
        devices,
    } = request
    {
        if slot.is_some() {
            return failed(Failure::NoVm("this VMM already runs a VM".into()));
        }
        let Some(memfd) = fd else {
            return failed(Failure::NoVm("create needs the guest memory memfd".into()));
        };
        let model = cpu_model.map(|m| m.into_iter().collect());
        let made = create(
            boot,
            vcpus,
            console_log.as_deref(),
            model.as_ref(),
            &devices,
            memfd,
        );
        return match made {
            Ok(running) => {
                *slot = Some(running);
                done(Vec::new())
            }
            Err(e) => failed(Failure::Backend {
                op: "create the VM".into(),
                reason: e.to_string(),
            }),
        };
    }
    if let Request::MoveSocket(to) = request {
        let mut path = shared.socket.lock().expect("socket path");
        return match std::fs::rename(&*path, &to) {
            Ok(()) => {
                *path = to;
                done(Vec::new())
            }
            Err(e) => failed(Failure::Backend {
                op: "move the socket".into(),
                reason: e.to_string(),
            }),
        };
    }
    let Some(running) = slot.as_mut() else {
        return failed(Failure::NoVm("this VMM has no VM yet".into()));
    };
    if request == Request::RestoreState {
        let r = GuestBackend::restore_state(&mut running.vm, payload);
        running.log_console();
        return r.map_or_else(|e| failed(failure(e)), |()| done(Vec::new()));
    }
    let vm = &mut running.vm;
    let r: Result<Answer, GuestError> = match request {
        Request::Attach => running.memfd.try_clone().map_or_else(
            |e| {
                Ok(failed(Failure::Backend {
                    op: "share the memfd".into(),
                    reason: e.to_string(),
                }))
            },
            |memfd| {
                let id = Identity {
                    pid: std::process::id(),
                    memory_bytes: vm.memory_bytes(),
                    vcpus: u8::try_from(vm.vcpu_status().len()).unwrap_or(u8::MAX),
                    devices: running.devices.clone(),
                };
                Ok((Reply::Attached(id), Vec::new(), Some(memfd)))
            },
        ),
        Request::Pause => KvmVm::pause(vm)
            .map(|took| (Reply::Paused(micros(took)), Vec::new(), None))
            .map_err(kvm_failure("pause")),
        Request::Resume => GuestBackend::resume(vm).map(|()| done(Vec::new())),
        Request::StartDirtyLog => GuestBackend::start_dirty_log(vm).map(|()| done(Vec::new())),
        Request::StopDirtyLog => GuestBackend::stop_dirty_log(vm).map(|()| done(Vec::new())),
        Request::TakeDirty => vm
            .take_dirty_bitmap()
            .map(|words| done(words.iter().flat_map(|w| w.to_le_bytes()).collect()))
            .map_err(kvm_failure("read dirty log")),
        Request::SaveState => GuestBackend::save_state(vm).map(done),
        Request::Throttle(p) => GuestBackend::set_throttle(vm, p).map(|()| done(Vec::new())),
        Request::Status => GuestBackend::progress(vm).map(|p| {
            let status = Status {
                running: GuestBackend::is_running(vm),
                cpu_nanos: u64::try_from(vm.vcpu_cpu_time().as_nanos()).unwrap_or(u64::MAX),
                pass: p.pass,
                exception: p.exception,
            };
            (Reply::Status(status), Vec::new(), None)
        }),
        Request::Console => Ok(done(GuestBackend::console(vm).unwrap_or_default())),
        Request::ConsoleInput => GuestBackend::console_input(vm, payload)
            .map(|n| (Reply::Taken(n as u64), Vec::new(), None)),
        Request::Create { .. }
        | Request::MoveSocket(_)
        | Request::Disk { .. }
        | Request::Block { .. }
        | Request::RestoreState => {
            unreachable!("handled above")
        }
        Request::Quit => {
            let _ = KvmVm::pause(vm);
            Ok(done(Vec::new()))
        }
    };
    r.unwrap_or_else(|e| failed(failure(e)))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn kvm_failure(op: &'static str) -> impl FnOnce(kvm::KvmError) -> GuestError {
    move |e| match e {
        kvm::KvmError::NotPaused => GuestError::NotPaused,
        kvm::KvmError::NotLogging => GuestError::NotLogging,
        other => GuestError::Backend {
            op,
            reason: other.to_string(),
        },
    }
}

/// Makes the VM over `memfd`, with its virtio `devices` (a NIC's tap is
/// named after this process: `fy<pid>`).
fn create(
    boot: Boot,
    vcpus: u8,
    console_log: Option<&Path>,
    model: Option<&std::collections::BTreeSet<String>>,
    spec: &DeviceSpec,
    memfd: File,
) -> Result<Running, kvm::KvmError> {
    let devices = || -> Result<kvm::Devices, kvm::KvmError> {
        let nic = match &spec.nic {
            Some(n) => Some(kvm::Nic::on(
                n.mac,
                n.bridge.as_deref(),
                &format!("fy{}", std::process::id()),
            )?),
            None => None,
        };
        Ok(kvm::Devices {
            disks: spec.disks.clone(),
            nic,
        })
    };
    let region = kvm::map_shared(memfd.try_clone().map_err(|e| kvm::KvmError::Memory {
        bytes: 0,
        reason: e.to_string(),
    })?)?;
    let memory = kvm::memory_of(region)?;
    let bytes = kvm::memory_len(&memory);
    let vm = match boot {
        Boot::TestGuest { .. } if *spec != DeviceSpec::default() => {
            return Err(kvm::KvmError::Image(
                "the built-in test guest has no virtio devices".into(),
            ));
        }
        Boot::TestGuest { wss_mib } => {
            let params = GuestParams::new(bytes >> 20, wss_mib);
            KvmVm::with_test_guest_on(memory, &params, vcpus, model)?
        }
        Boot::Linux {
            kernel,
            initrd,
            cmdline,
        } => {
            let image = LinuxImage {
                kernel,
                initrd,
                cmdline,
            };
            KvmVm::with_linux_on(memory, &image, vcpus, model, devices()?)?
        }
        Boot::Blank => {
            let mut vm = KvmVm::create_on(memory, vcpus, model)?;
            vm.attach_devices(devices()?)?;
            vm
        }
    };
    let running = Running {
        vm,
        memfd,
        console_log: console_log.map(Path::to_owned),
        devices: spec.clone(),
    };
    running.log_console();
    Ok(running)
}

/// Gives the guest's disk device a port that sends its writes to the node
/// over `conn`.
fn attach_disk(shared: &Shared, conn: &UnixStream, blocks: u64, stride: u64) -> Reply {
    let port = match conn.try_clone() {
        Ok(s) => RemotePort(Mutex::new(s)),
        Err(e) => {
            return Reply::Failed(Failure::Backend {
                op: "disk channel".into(),
                reason: e.to_string(),
            });
        }
    };
    let mut slot = shared.vm.lock().expect("vm lock");
    let Some(running) = slot.as_mut() else {
        return Reply::Failed(Failure::NoVm("this VMM has no VM yet".into()));
    };
    match GuestBackend::attach_disk(&mut running.vm, Arc::new(port), blocks, stride) {
        Ok(_) => Reply::Done,
        Err(e) => Reply::Failed(failure(e)),
    }
}

/// Plugs a port over `conn` into virtio disk `index`.
fn connect_block(shared: &Shared, conn: &UnixStream, index: u32) -> Reply {
    let port = match conn.try_clone() {
        Ok(s) => RemotePort(Mutex::new(s)),
        Err(e) => {
            return Reply::Failed(Failure::Backend {
                op: "disk channel".into(),
                reason: e.to_string(),
            });
        }
    };
    let slot = shared.vm.lock().expect("vm lock");
    let Some(running) = slot.as_ref() else {
        return Reply::Failed(Failure::NoVm("this VMM has no VM yet".into()));
    };
    match running.vm.connect_disk(index as usize, Arc::new(port)) {
        Ok(()) => Reply::Done,
        Err(e) => Reply::Failed(Failure::Backend {
            op: "connect disk".into(),
            reason: e.to_string(),
        }),
    }
}

/// A disk reached through the node: a broken channel is
/// [`DiskError::Unreachable`] (the node may connect again).
struct RemotePort(Mutex<UnixStream>);

impl RemotePort {
    fn exchange(
        &self,
        op: &'static str,
        request: DiskRequest,
        data: &[u8],
    ) -> Result<Vec<u8>, DiskError> {
        let gone = |reason: String| DiskError::Unreachable { op, reason };
        let conn = self.0.lock().map_err(|_| gone("channel poisoned".into()))?;
        proto::send(&conn, &request, data, None).map_err(|e| gone(e.to_string()))?;
        let (reply, payload, _) =
            proto::receive::<DiskReply>(&conn).map_err(|e| gone(e.to_string()))?;
        match reply {
            DiskReply::Done => Ok(payload),
            DiskReply::Failed(reason) => Err(DiskError::Io { op, reason }),
        }
    }
}

impl DiskPort for RemotePort {
    fn write(
        &self,
        offset: u64,
        data: Vec<u8>,
        workload_seq: Option<u64>,
    ) -> Result<(), DiskError> {
        let request = DiskRequest::Write {
            offset,
            seq: workload_seq,
        };
        self.exchange("disk write through the node", request, &data)
            .map(drop)
    }

    fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, DiskError> {
        let request = DiskRequest::Read { offset, len };
        self.exchange("disk read through the node", request, &[])
    }
}
