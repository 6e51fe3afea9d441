//! The run ledger: which host's guest of each VM has its vCPUs running,
//! kept by the guests themselves, so "a VM runs on at most one host" is
//! checked at the instant any guest starts running, not sampled.
//!
//! A sampled census asks the hosts one after another; a host busy for a
//! while answers late, so a census can see a VM on its old host before the
//! switchover and on its new one after it. The ledger has no such window:
//! every host's guests are wrapped ([`ObservingFactory`]) and report each
//! resume, pause and drop (a crash drops them) as it happens, on the one
//! simulation thread.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_actors::guest::{DirtyBitmap, GuestBackend, GuestError, GuestProgress};
use ferry_actors::migration::VmConfig;
use ferry_actors::node::factory::{GuestFactory, SyntheticFactory};
use ferry_actors::ram::GuestRam;

/// A protocol step a guest shows, where an aimed fault can strike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The destination boots the shadow (the offer was taken).
    ShadowBoot,
    /// The source pauses the VM (the switchover begins).
    SourcePause,
    /// The source saves the device state (the last thing before the
    /// release).
    SourceSave,
    /// The destination restores that state (the commit is next).
    DestRestore,
    /// The destination runs the VM (it adopted it).
    DestResume,
}

impl Step {
    /// Every step.
    pub const ALL: [Step; 5] = [
        Step::ShadowBoot,
        Step::SourcePause,
        Step::SourceSave,
        Step::DestRestore,
        Step::DestResume,
    ];

    /// Whether the step happens on the destination.
    pub fn on_destination(self) -> bool {
        matches!(
            self,
            Step::ShadowBoot | Step::DestRestore | Step::DestResume
        )
    }
}

/// Where an armed step's (VM, host) goes.
pub type StepSink = tokio::sync::mpsc::UnboundedSender<(String, String)>;

/// Who runs what, and every time two hosts did at once.
#[derive(Default)]
pub struct RunLedger {
    inner: Mutex<Inner>,
    /// An armed aimed fault: the next time a guest shows this step, (VM,
    /// host) goes down the channel.
    armed: Mutex<Option<(Step, StepSink)>>,
}

#[derive(Default)]
struct Inner {
    /// VM -> hosts whose guest of it runs now.
    running: BTreeMap<String, BTreeSet<String>>,
    /// "at T: VM runs on [A, B] at once", in the order they happened.
    violations: Vec<String>,
    /// Guests that started running (resumes seen).
    starts: u64,
    start: Option<tokio::time::Instant>,
}

impl RunLedger {
    /// An empty ledger whose times count from now.
    pub fn new() -> Arc<Self> {
        let ledger = Self::default();
        ledger.lock().start = Some(tokio::time::Instant::now());
        Arc::new(ledger)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn started(&self, vm: &str, host: &str) {
        let mut inner = self.lock();
        inner.starts += 1;
        let at = inner
            .start
            .map_or(Duration::ZERO, |s| tokio::time::Instant::now() - s);
        let hosts = inner.running.entry(vm.to_owned()).or_default();
        hosts.insert(host.to_owned());
        if hosts.len() > 1 {
            let list: Vec<String> = hosts.iter().cloned().collect();
            inner
                .violations
                .push(format!("at {at:?}: {vm} runs on {list:?} at once"));
        }
    }

    fn stopped(&self, vm: &str, host: &str) {
        let mut inner = self.lock();
        if let Some(hosts) = inner.running.get_mut(vm) {
            hosts.remove(host);
        }
    }

    /// Every instant a VM ran on two hosts.
    pub fn violations(&self) -> Vec<String> {
        self.lock().violations.clone()
    }

    /// The next time any guest shows `step`, its (VM, host) is sent on
    /// `to` (once).
    pub fn arm(&self, step: Step, to: StepSink) {
        *self
            .armed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((step, to));
    }

    /// No aimed fault waits any more.
    pub fn disarm(&self) {
        *self
            .armed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    fn stepped(&self, step: Step, vm: &str, host: &str) {
        let mut armed = self
            .armed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if armed.as_ref().is_some_and(|(s, _)| *s == step)
            && let Some((_, to)) = armed.take()
        {
            let _ = to.send((vm.to_owned(), host.to_owned()));
        }
    }

    /// Whether `host`'s guest of `vm` runs now.
    pub fn runs_on(&self, vm: &str, host: &str) -> bool {
        self.lock()
            .running
            .get(vm)
            .is_some_and(|h| h.contains(host))
    }

    /// How many times a guest started running (the checks made).
    pub fn starts(&self) -> u64 {
        self.lock().starts
    }
}

/// The simulation's guest factory for one host: synthetic guests that
/// report to the ledger.
pub struct ObservingFactory {
    /// The host the guests live on.
    pub host: String,
    /// Where they report.
    pub ledger: Arc<RunLedger>,
    /// The host's life: a crashed one boots and runs nothing.
    pub life: crate::life::Life,
}

impl ObservingFactory {
    fn wrap(
        &self,
        config: &VmConfig,
        inner: Box<dyn GuestBackend>,
        shadow: bool,
    ) -> Box<dyn GuestBackend> {
        let guest = ObservedGuest {
            inner,
            vm: config.name.clone(),
            host: self.host.clone(),
            ledger: self.ledger.clone(),
            running: false,
            shadow,
            life: self.life.clone(),
        };
        if shadow {
            guest.step(Step::ShadowBoot);
        }
        Box::new(guest.synced())
    }
}

impl GuestFactory for ObservingFactory {
    fn boot(&self, config: &VmConfig) -> Result<Box<dyn GuestBackend>, GuestError> {
        if !self.life.alive() {
            return Err(GuestError::Backend {
                op: "boot",
                reason: "the host crashed".into(),
            });
        }
        Ok(self.wrap(config, SyntheticFactory.boot(config)?, false))
    }

    fn shadow(&self, config: &VmConfig) -> Result<Box<dyn GuestBackend>, GuestError> {
        Ok(self.wrap(config, SyntheticFactory.shadow(config)?, true))
    }

    fn kvm(&self) -> bool {
        false
    }
}

/// A guest that tells the ledger when its vCPUs start and stop.
struct ObservedGuest {
    inner: Box<dyn GuestBackend>,
    vm: String,
    host: String,
    ledger: Arc<RunLedger>,
    /// What the ledger was last told.
    running: bool,
    /// Booted as a migration's shadow (its steps are the destination's).
    shadow: bool,
    life: crate::life::Life,
}

impl ObservedGuest {
    fn step(&self, step: Step) {
        self.ledger.stepped(step, &self.vm, &self.host);
    }

    /// Tells the ledger if running changed.
    fn synced(mut self) -> Self {
        self.sync();
        self
    }

    fn sync(&mut self) {
        let now = self.inner.is_running();
        if now == self.running {
            return;
        }
        self.running = now;
        if now {
            self.ledger.started(&self.vm, &self.host);
        } else {
            self.ledger.stopped(&self.vm, &self.host);
        }
    }
}

impl Drop for ObservedGuest {
    fn drop(&mut self) {
        if self.running {
            self.ledger.stopped(&self.vm, &self.host);
        }
    }
}

impl GuestBackend for ObservedGuest {
    fn memory_bytes(&self) -> u64 {
        self.inner.memory_bytes()
    }

    fn read_page(&self, gfn: u64, dst: &mut [u8]) -> Result<(), GuestError> {
        self.inner.read_page(gfn, dst)
    }

    fn write_page(&mut self, gfn: u64, src: &[u8]) -> Result<(), GuestError> {
        self.inner.write_page(gfn, src)
    }

    fn start_dirty_log(&mut self) -> Result<(), GuestError> {
        self.inner.start_dirty_log()
    }

    fn take_dirty(&mut self) -> Result<DirtyBitmap, GuestError> {
        self.inner.take_dirty()
    }

    fn stop_dirty_log(&mut self) -> Result<(), GuestError> {
        self.inner.stop_dirty_log()
    }

    fn pause(&mut self) -> Result<(), GuestError> {
        let was_running = self.running;
        let r = self.inner.pause();
        self.sync();
        if was_running && !self.shadow {
            self.step(Step::SourcePause);
        }
        r
    }

    fn resume(&mut self) -> Result<(), GuestError> {
        if !self.life.alive() {
            return Err(GuestError::Backend {
                op: "resume",
                reason: "the host crashed".into(),
            });
        }
        let r = self.inner.resume();
        self.sync();
        if self.shadow && self.running {
            self.step(Step::DestResume);
            // From here on it is the VM, and may leave again as a source.
            self.shadow = false;
        }
        r
    }

    fn is_running(&self) -> bool {
        self.inner.is_running()
    }

    fn save_state(&mut self) -> Result<Vec<u8>, GuestError> {
        let r = self.inner.save_state();
        if !self.shadow {
            self.step(Step::SourceSave);
        }
        r
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), GuestError> {
        let r = self.inner.restore_state(state);
        self.sync();
        if self.shadow {
            self.step(Step::DestRestore);
        }
        r
    }

    fn set_throttle(&mut self, percent: u8) -> Result<(), GuestError> {
        self.inner.set_throttle(percent)
    }

    fn progress(&self) -> Result<GuestProgress, GuestError> {
        self.inner.progress()
    }

    fn cpu_time(&self) -> Duration {
        self.inner.cpu_time()
    }

    fn ram(&self) -> GuestRam {
        self.inner.ram()
    }

    fn run_for(&mut self, elapsed: Duration) {
        self.inner.run_for(elapsed);
    }

    fn attach_disk(
        &mut self,
        port: Arc<dyn ferry_actors::disk::DiskPort>,
        blocks: u64,
        stride: u64,
    ) -> Result<bool, GuestError> {
        self.inner.attach_disk(port, blocks, stride)
    }
}
