//! `VmActor`: the lifecycle of one VM on this host, and its guest backend.

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::Serialize;

use super::NodeError;
use crate::guest::{GuestBackend, GuestError};
use crate::migration::VmConfig;

/// Where a VM stands on this host.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub enum VmPhase {
    /// Defined, memory allocated, vCPUs not running.
    Stopped,
    /// vCPUs running.
    Running,
    /// Being migrated away; lifecycle requests wait for the outcome.
    MigratingOut,
    /// Arriving: a paused shadow filled by a migration.
    Incoming,
    /// Handed to another host after a failure past the release: paused
    /// here, never resumed on this host's own initiative.
    Released,
}

/// A VM as `ferry vm list` shows it.
#[derive(
    Debug, Clone, PartialEq, Eq, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct VmInfo {
    /// Name.
    pub name: String,
    /// Host it lives on.
    pub host: String,
    /// Phase.
    pub phase: VmPhase,
    /// Guest memory in bytes.
    pub memory_bytes: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Ownership generation (bumped by every migration).
    pub generation: u64,
    /// The guest's own pass counter.
    pub guest_pass: u64,
    /// Whether its vCPUs run right now.
    pub running: bool,
    /// NIC address.
    pub mac: String,
    /// CPU time its vCPUs used in this host's guest, in ms.
    #[serde(default)]
    pub cpu_ms: u64,
    /// Why the VM is in doubt (a migration away whose end is not known
    /// yet; `vm recover` settles it); empty when it is not.
    #[serde(default)]
    pub in_doubt: String,
    /// Why the VM's guest died (its VMM process crashed); empty when it
    /// did not. `vm start` boots it again.
    #[serde(default)]
    pub crashed: String,
    /// Disks whose guest writes fail, and why (a full datastore), as the
    /// host last sampled them; empty when none do.
    #[serde(default)]
    pub disks_failing: String,
}

/// Work to run on the guest inside the VM actor.
pub type GuestJob = Box<dyn FnOnce(&mut dyn GuestBackend) + Send>;

/// Messages to a [`VmActor`].
pub enum VmMsg {
    /// Run the vCPUs.
    Start(RpcReplyPort<Result<(), NodeError>>),
    /// Stop the vCPUs (memory stays).
    Stop(RpcReplyPort<Result<(), NodeError>>),
    /// Describe the VM.
    Info(RpcReplyPort<VmInfo>),
    /// Run a job on the backend (migrations use it).
    Guest(GuestJob),
    /// A migration away starts: the config, generation and whether it runs.
    BeginMigration(RpcReplyPort<Result<(VmConfig, u64, bool), NodeError>>),
    /// The migration away ended without the release: back to normal.
    MigrationAborted,
    /// The migration away failed after the release.
    Released,
    /// An operator fenced the other copy: the VM is this host's again, at
    /// `generation`.
    Fenced {
        /// New generation.
        generation: u64,
    },
    /// An incoming VM is ours now with `generation`; `running` says
    /// whether its vCPUs run.
    Adopted {
        /// New generation.
        generation: u64,
        /// Whether it runs.
        running: bool,
    },
    /// The VM is gone from this host for good (deleted, or it runs on
    /// another host now): end its guest, then the actor.
    Discard,
    /// A freshly booted guest in place of one that crashed (stopped).
    Replace(Box<dyn GuestBackend>),
    /// Move the guest to a new VMM process on this host.
    Upgrade(RpcReplyPort<Result<crate::guest::UpgradeReport, NodeError>>),
}

/// What the actor is given at spawn.
pub struct VmArgs {
    /// Definition.
    pub config: VmConfig,
    /// Backend.
    pub guest: Box<dyn GuestBackend>,
    /// Host name, for [`VmInfo`].
    pub host: String,
    /// Generation.
    pub generation: u64,
    /// Initial phase.
    pub phase: VmPhase,
}

/// One VM.
pub struct VmActor;

/// The actor's mutable state.
pub struct VmState {
    config: VmConfig,
    guest: Box<dyn GuestBackend>,
    host: String,
    generation: u64,
    phase: VmPhase,
    last_tick: tokio::time::Instant,
    /// Why the guest died, once it has.
    crash: Option<String>,
}

impl Actor for VmActor {
    type Msg = VmMsg;
    type State = VmState;
    type Arguments = VmArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<VmMsg>,
        args: VmArgs,
    ) -> Result<VmState, ActorProcessingErr> {
        Ok(VmState {
            config: args.config,
            guest: args.guest,
            host: args.host,
            generation: args.generation,
            phase: args.phase,
            last_tick: tokio::time::Instant::now(),
            crash: None,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<VmMsg>,
        msg: VmMsg,
        s: &mut VmState,
    ) -> Result<(), ActorProcessingErr> {
        // A guest without vCPU threads (the synthetic one) catches up on the
        // time since it was last looked at before anyone sees it: its
        // writes land before any dirty log is read or state is taken, and
        // an idle stretch of simulated time costs nothing.
        let now = tokio::time::Instant::now();
        s.guest.run_for(now - s.last_tick);
        s.last_tick = now;
        notice_crash(s);
        match msg {
            VmMsg::Start(reply) => {
                let r = match s.phase {
                    VmPhase::Stopped => s.guest.resume().map_err(guest_error).map(|()| {
                        s.phase = VmPhase::Running;
                    }),
                    VmPhase::Running => Ok(()),
                    other => Err(NodeError::Busy(format!("{} is {other:?}", s.config.name))),
                };
                let _ = reply.send(r);
            }
            VmMsg::Stop(reply) => {
                let r = match s.phase {
                    VmPhase::Running => s.guest.pause().map_err(guest_error).map(|()| {
                        s.phase = VmPhase::Stopped;
                    }),
                    VmPhase::Stopped => Ok(()),
                    other => Err(NodeError::Busy(format!("{} is {other:?}", s.config.name))),
                };
                let _ = reply.send(r);
            }
            VmMsg::Info(reply) => {
                let _ = reply.send(VmInfo {
                    name: s.config.name.clone(),
                    host: s.host.clone(),
                    phase: s.phase,
                    memory_bytes: s.config.memory_bytes,
                    vcpus: s.config.vcpus,
                    generation: s.generation,
                    guest_pass: s.guest.progress().map(|p| p.pass).unwrap_or(0),
                    running: s.guest.is_running(),
                    mac: crate::migration::wire::mac_string(&s.config.mac),
                    cpu_ms: u64::try_from(s.guest.cpu_time().as_millis()).unwrap_or(u64::MAX),
                    in_doubt: String::new(),
                    crashed: s.crash.clone().unwrap_or_default(),
                    disks_failing: String::new(),
                });
            }
            VmMsg::Guest(job) => job(s.guest.as_mut()),
            VmMsg::BeginMigration(reply) => {
                let r = match s.phase {
                    VmPhase::Running | VmPhase::Stopped => {
                        let running = s.phase == VmPhase::Running;
                        s.phase = VmPhase::MigratingOut;
                        Ok((s.config.clone(), s.generation, running))
                    }
                    other => Err(NodeError::Busy(format!("{} is {other:?}", s.config.name))),
                };
                let _ = reply.send(r);
            }
            VmMsg::MigrationAborted => {
                s.phase = if s.guest.is_running() {
                    VmPhase::Running
                } else {
                    VmPhase::Stopped
                };
            }
            VmMsg::Released => s.phase = VmPhase::Released,
            VmMsg::Fenced { generation } => s.generation = generation,
            VmMsg::Discard => {
                s.guest.discard();
                myself.stop(None);
            }
            VmMsg::Replace(guest) => {
                s.guest = guest;
                s.crash = None;
                s.phase = VmPhase::Stopped;
            }
            VmMsg::Upgrade(reply) => {
                let r = match s.phase {
                    VmPhase::Running | VmPhase::Stopped => s.guest.upgrade().map_err(guest_error),
                    other => Err(NodeError::Busy(format!("{} is {other:?}", s.config.name))),
                };
                let _ = reply.send(r);
            }
            VmMsg::Adopted {
                generation,
                running,
            } => {
                s.generation = generation;
                s.phase = if running {
                    VmPhase::Running
                } else {
                    VmPhase::Stopped
                };
            }
        }
        Ok(())
    }
}

/// Takes note, once, that the guest died under its VMM: the VM is
/// stopped from then on (a migration of it fails on its own).
fn notice_crash(s: &mut VmState) {
    if s.crash.is_some() || !matches!(s.phase, VmPhase::Running | VmPhase::Stopped) {
        return;
    }
    if let Some(why) = s.guest.crashed() {
        tracing::error!(vm = %s.config.name, "the VM crashed: {why}");
        s.crash = Some(why);
        s.phase = VmPhase::Stopped;
    }
}

fn guest_error(e: GuestError) -> NodeError {
    NodeError::Guest(e.to_string())
}

/// Ends VM `vm` on this host for good, its guest first (a VMM process
/// stops with it; merely stopping the actor would leave it running).
pub fn discard(vm: &ActorRef<VmMsg>) {
    if vm.cast(VmMsg::Discard).is_err() {
        vm.stop(None);
    }
}

/// Runs `job` on the guest of `vm` and returns its result.
pub async fn with_guest<T: Send + 'static>(
    vm: &ActorRef<VmMsg>,
    job: impl FnOnce(&mut dyn GuestBackend) -> T + Send + 'static,
) -> Result<T, NodeError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    vm.cast(VmMsg::Guest(Box::new(move |g| {
        let _ = tx.send(job(g));
    })))
    .map_err(|_| NodeError::Gone("VM actor".into()))?;
    rx.await.map_err(|_| NodeError::Gone("VM actor".into()))
}
