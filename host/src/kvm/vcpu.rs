//! vCPU threads: each vCPU runs `KVM_RUN` on its own thread and is paused
//! by a flag plus a signal kick.
//!
//! Pausing: the controller sets `pause_requested` and sends the kick signal
//! until the thread reports `Paused`. The thread checks the flag before each
//! `KVM_RUN`; a kick that lands just before it enters is lost, so the
//! controller repeats it every [`KICK_INTERVAL`]. Before reporting `Paused`
//! the thread re-enters `KVM_RUN` once with `immediate_exit` set, which
//! completes a pending port I/O instruction, so the state read afterwards is
//! consistent. While paused the thread serves commands (save, restore,
//! resume, stop) on a channel: the `VcpuFd` never leaves its thread.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};

use super::KvmError;
use super::image::{IDLE_WAIT, PORT_DISK, PORT_EXCEPTION, PORT_FILLED, PORT_IDLE, PORT_PASS};
use super::state::{self, VcpuState};

/// The i8042's command port: `reboot=k` Linux writes [`KEYBOARD_RESET`].
const PORT_KEYBOARD_CONTROLLER: u16 = 0x64;
/// Pulse the reset line.
const KEYBOARD_RESET: u8 = 0xfe;

/// How often a pause request re-sends its kick.
pub const KICK_INTERVAL: Duration = Duration::from_micros(200);
/// Throttling works in slices of this length.
const THROTTLE_PERIOD: Duration = Duration::from_millis(10);

/// What the guest reported through its ports.
#[derive(Debug, Default)]
pub struct GuestProgress {
    /// Last pass number reported on `PORT_PASS`.
    pub pass: AtomicU64,
    /// The fill finished.
    pub filled: AtomicBool,
    /// CPU exception vector + 1 (0: none).
    pub exception: AtomicU64,
    /// Port I/O exits handled.
    pub io_exits: AtomicU64,
    /// The disk device, once attached.
    pub disk: DiskSlot,
    /// Guest disk writes that failed (the guest retries them).
    pub disk_failures: AtomicU64,
    /// The serial console, once attached (Linux guests).
    pub console: super::console::ConsoleSlot,
    /// The virtio devices on the MMIO bus.
    pub mmio: crate::virtio::bus::MmioBus,
    /// The VM was restored from a saved state (it arrived by migration or
    /// a VMM upgrade): its NIC announces its new place when it resumes.
    pub announce_on_resume: AtomicBool,
    /// RARP announcements sent.
    pub announced: AtomicU64,
}

/// The guest's disk device: where its requests go, and its memory (to
/// read the request and the data from).
pub struct DiskDevice {
    /// The disk.
    pub port: Arc<dyn ferry_actors::disk::DiskPort>,
    /// Guest memory.
    pub ram: ferry_actors::ram::GuestRam,
}

/// An attachable [`DiskDevice`].
#[derive(Default)]
pub struct DiskSlot(pub Mutex<Option<DiskDevice>>);

impl std::fmt::Debug for DiskSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let attached = self.0.lock().map(|d| d.is_some()).unwrap_or(false);
        f.debug_struct("DiskSlot")
            .field("attached", &attached)
            .finish()
    }
}

impl DiskSlot {
    /// Carries out the request in guest memory: 0 for done, 1 for failed
    /// (or no disk).
    fn serve(&self, failures: &AtomicU64) -> u32 {
        let Ok(slot) = self.0.lock() else {
            return 1;
        };
        let Some(dev) = slot.as_ref() else {
            return 1;
        };
        let mut page = vec![0u8; 4096];
        let request = dev.ram.read_u64(super::image::DISK_REQ_ADDR).and_then(|o| {
            let seq = dev.ram.read_u64(super::image::DISK_REQ_ADDR + 8)?;
            dev.ram
                .read_page(super::image::DISK_BUF_ADDR / 4096, &mut page)?;
            Ok((o, seq))
        });
        let Ok((offset, seq)) = request else {
            return 1;
        };
        match dev.port.write(offset, page, Some(seq)) {
            Ok(()) => 0,
            Err(e) => {
                // The guest retries at once: say so on the first failure
                // and every thousandth, not on each.
                let n = failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n.is_multiple_of(1000) {
                    tracing::warn!(
                        "guest disk write at {offset}: {e} ({} failures so far)",
                        n + 1
                    );
                }
                1
            }
        }
    }
}

/// Where a vCPU thread is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStatus {
    /// In or around `KVM_RUN`.
    Running,
    /// Stopped between instructions, serving commands.
    Paused,
    /// The guest halted (after reporting an exception) or failed.
    Stopped(String),
}

pub(crate) enum Command {
    Resume,
    Save(mpsc::Sender<Result<VcpuState, KvmError>>),
    Restore(Box<VcpuState>, mpsc::Sender<Result<(), KvmError>>),
    Exit,
}

pub(crate) struct Shared {
    pause_requested: AtomicBool,
    throttle_percent: AtomicU8,
    status: Mutex<VcpuStatus>,
    changed: Condvar,
}

impl Shared {
    fn set(&self, status: VcpuStatus) {
        *self.status.lock().expect("vcpu status lock") = status;
        self.changed.notify_all();
    }
}

/// The controller's handle on one vCPU thread.
pub struct VcpuHandle {
    id: u64,
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
    thread: Option<JoinHandle<()>>,
}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 1
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: the signal only interrupts KVM_RUN with EINTR.
}

fn install_kick_handler() -> Result<(), KvmError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
                .map_err(|e| e.errno())
        })
        .map_err(KvmError::Signal)
}

impl VcpuHandle {
    /// Starts the thread for `vcpu`, paused.
    pub(crate) fn spawn(
        id: u64,
        vcpu: VcpuFd,
        msr_indices: Arc<Vec<u32>>,
        progress: Arc<GuestProgress>,
    ) -> Result<Self, KvmError> {
        install_kick_handler()?;
        let shared = Arc::new(Shared {
            pause_requested: AtomicBool::new(true),
            throttle_percent: AtomicU8::new(0),
            status: Mutex::new(VcpuStatus::Paused),
            changed: Condvar::new(),
        });
        let (commands, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn({
                let shared = shared.clone();
                move || {
                    let mut runner = Runner {
                        vcpu,
                        shared,
                        commands: rx,
                        msr_indices,
                        progress,
                    };
                    runner.serve_commands();
                }
            })
            .map_err(KvmError::Thread)?;
        Ok(Self {
            id,
            shared,
            commands,
            thread: Some(thread),
        })
    }

    /// Current status.
    pub fn status(&self) -> VcpuStatus {
        self.shared.status.lock().expect("vcpu status lock").clone()
    }

    /// Asks the vCPU to pause and waits until it has.
    pub fn pause(&self) -> Result<(), KvmError> {
        self.shared.pause_requested.store(true, Ordering::SeqCst);
        let thread = self.thread.as_ref().ok_or(KvmError::VcpuGone(self.id))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut status = self.shared.status.lock().expect("vcpu status lock");
        while *status == VcpuStatus::Running {
            if Instant::now() > deadline {
                return Err(KvmError::PauseTimeout(self.id));
            }
            {
                use std::os::unix::thread::JoinHandleExt;
                // SAFETY: the thread is alive (we hold its JoinHandle and it
                // only exits on Command::Exit); the signal has a handler.
                unsafe { libc::pthread_kill(thread.as_pthread_t(), kick_signal()) };
            }
            status = self
                .shared
                .changed
                .wait_timeout(status, KICK_INTERVAL)
                .expect("vcpu status lock")
                .0;
        }
        Ok(())
    }

    /// Lets a paused vCPU run.
    pub fn resume(&self) -> Result<(), KvmError> {
        if self.status() != VcpuStatus::Paused {
            return Ok(());
        }
        self.send(Command::Resume)?;
        let mut status = self.shared.status.lock().expect("vcpu status lock");
        while *status == VcpuStatus::Paused {
            status = self.shared.changed.wait(status).expect("vcpu status lock");
        }
        Ok(())
    }

    /// Reads the vCPU's state (it must be paused).
    pub fn save(&self) -> Result<VcpuState, KvmError> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Save(tx))?;
        rx.recv().map_err(|_| KvmError::VcpuGone(self.id))?
    }

    /// Writes the vCPU's state (it must be paused).
    pub fn restore(&self, state: VcpuState) -> Result<(), KvmError> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Restore(Box::new(state), tx))?;
        rx.recv().map_err(|_| KvmError::VcpuGone(self.id))?
    }

    /// Sets the share of time the vCPU is kept off the CPU (0-99).
    pub fn set_throttle(&self, percent: u8) {
        self.shared
            .throttle_percent
            .store(percent.min(99), Ordering::Relaxed);
    }

    /// Current throttle.
    pub fn throttle(&self) -> u8 {
        self.shared.throttle_percent.load(Ordering::Relaxed)
    }

    /// Kicks a running vCPU out of `KVM_RUN` without pausing it (the
    /// throttle ticker uses this to take back the CPU).
    pub fn kick(&self) {
        if let Some(thread) = &self.thread {
            use std::os::unix::thread::JoinHandleExt;
            // SAFETY: as in `pause`.
            unsafe { libc::pthread_kill(thread.as_pthread_t(), kick_signal()) };
        }
    }

    fn send(&self, cmd: Command) -> Result<(), KvmError> {
        if !self.paused_or_stopped() {
            return Err(KvmError::NotPaused);
        }
        self.commands
            .send(cmd)
            .map_err(|_| KvmError::VcpuGone(self.id))
    }

    fn paused_or_stopped(&self) -> bool {
        self.status() != VcpuStatus::Running
    }
}

impl VcpuHandle {
    /// CPU time the vCPU's thread has used (zero once it is gone).
    pub fn cpu_time(&self) -> Duration {
        use std::os::unix::thread::JoinHandleExt;
        let Some(thread) = &self.thread else {
            return Duration::ZERO;
        };
        let mut clock: libc::clockid_t = 0;
        // SAFETY: the thread is not joined (we hold its JoinHandle), so its
        // pthread_t is valid; `clock` is a valid out pointer.
        if unsafe { libc::pthread_getcpuclockid(thread.as_pthread_t(), &raw mut clock) } != 0 {
            return Duration::ZERO;
        }
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `clock` names the thread's CPU clock; `ts` is valid.
        if unsafe { libc::clock_gettime(clock, &raw mut ts) } != 0 {
            return Duration::ZERO;
        }
        Duration::new(
            u64::try_from(ts.tv_sec).unwrap_or(0),
            u32::try_from(ts.tv_nsec).unwrap_or(0),
        )
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        if self.pause().is_ok() {
            let _ = self.commands.send(Command::Exit);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }
}

struct Runner {
    vcpu: VcpuFd,
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Command>,
    msr_indices: Arc<Vec<u32>>,
    progress: Arc<GuestProgress>,
}

impl Runner {
    /// Serves commands until resumed (then runs) or told to exit.
    fn serve_commands(&mut self) {
        while let Ok(cmd) = self.commands.recv() {
            match cmd {
                Command::Resume => {
                    self.shared.pause_requested.store(false, Ordering::SeqCst);
                    self.shared.set(VcpuStatus::Running);
                    if let Some(reason) = self.run() {
                        self.shared.set(reason);
                    }
                }
                Command::Save(reply) => {
                    let _ = reply.send(state::save_vcpu(&self.vcpu, &self.msr_indices));
                }
                Command::Restore(s, reply) => {
                    let _ = reply.send(state::restore_vcpu(&self.vcpu, &s));
                }
                Command::Exit => return,
            }
        }
    }

    /// Runs until paused (returns `Some(Paused)`) or the guest stops.
    fn run(&mut self) -> Option<VcpuStatus> {
        let mut slice_start = Instant::now();
        loop {
            if self.shared.pause_requested.load(Ordering::SeqCst) {
                // Complete a pending port I/O before anyone reads state.
                self.vcpu.set_kvm_immediate_exit(1);
                let _ = self.vcpu.run();
                self.vcpu.set_kvm_immediate_exit(0);
                return Some(VcpuStatus::Paused);
            }
            let exit = match self.vcpu.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.throttle(&mut slice_start);
                    continue;
                }
                Err(e) => return Some(VcpuStatus::Stopped(format!("KVM_RUN failed: {e}"))),
            };
            match exit {
                VcpuExit::IoOut(port, data) => {
                    self.progress.io_exits.fetch_add(1, Ordering::Relaxed);
                    let value = data
                        .iter()
                        .rev()
                        .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
                    match port {
                        p if super::console::PORTS.contains(&p) => {
                            self.progress.console.write(p, data[0]);
                        }
                        PORT_KEYBOARD_CONTROLLER if data[0] == KEYBOARD_RESET => {
                            return Some(VcpuStatus::Stopped("the guest rebooted".into()));
                        }
                        PORT_PASS => self.progress.pass.store(value, Ordering::Relaxed),
                        PORT_FILLED => self.progress.filled.store(true, Ordering::Relaxed),
                        PORT_EXCEPTION => {
                            self.progress.exception.store(value + 1, Ordering::Relaxed)
                        }
                        PORT_IDLE => idle_wait(),
                        _ => {}
                    }
                }
                VcpuExit::IoIn(port, data) => {
                    self.progress.io_exits.fetch_add(1, Ordering::Relaxed);
                    if port == PORT_DISK {
                        let status = self
                            .progress
                            .disk
                            .serve(&self.progress.disk_failures)
                            .to_le_bytes();
                        let n = data.len().min(4);
                        data[..n].copy_from_slice(&status[..n]);
                    } else if let Some(v) = super::console::PORTS
                        .contains(&port)
                        .then(|| self.progress.console.read(port))
                        .flatten()
                    {
                        data.fill(v);
                    } else {
                        data.fill(0xFF);
                    }
                }
                VcpuExit::MmioRead(addr, data) => {
                    if !self.progress.mmio.read(addr, data) {
                        data.fill(0xFF);
                    }
                }
                VcpuExit::MmioWrite(addr, data) => {
                    self.progress.mmio.write(addr, data);
                }
                VcpuExit::Hlt => {
                    return Some(VcpuStatus::Stopped("guest halted".into()));
                }
                VcpuExit::Shutdown => {
                    return Some(VcpuStatus::Stopped("guest shut down (triple fault)".into()));
                }
                other => {
                    return Some(VcpuStatus::Stopped(format!("unexpected exit: {other:?}")));
                }
            }
        }
    }

    /// Sleeps off the throttled share of the current time slice.
    fn throttle(&self, slice_start: &mut Instant) {
        let percent = self.shared.throttle_percent.load(Ordering::Relaxed);
        if percent == 0 {
            return;
        }
        let ran = slice_start.elapsed();
        let run_share = THROTTLE_PERIOD.mul_f64(f64::from(100 - percent) / 100.0);
        if ran >= run_share {
            std::thread::sleep(THROTTLE_PERIOD.mul_f64(f64::from(percent) / 100.0));
            *slice_start = Instant::now();
        }
    }
}

/// Sleeps [`IDLE_WAIT`] unless a signal (the pause kick) cuts it short:
/// one `nanosleep`, never restarted, so a pause is not delayed by it.
fn idle_wait() {
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: libc::c_long::try_from(IDLE_WAIT.as_nanos()).unwrap_or(1_000_000),
    };
    // SAFETY: `ts` is a valid timespec; a null remainder pointer is allowed.
    unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
}
