//! `HostActor`: one per node. Owns the VMs, admits incoming migrations,
//! starts outgoing ones and keeps the virtual network's MAC table.

mod arrival;
mod confirm;
mod disks;
mod doubt;
pub mod history;
mod inventory;
mod leftovers;
mod ops;

use std::collections::BTreeMap;
use std::sync::Arc;

use ferry_transport::{FrameKind, FrameReader, FrameWriter, Transport};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::{mpsc, oneshot};

use super::client::{ClientReply, ClientRequest, MigrateOptions, VmSpec};
use super::destination::{DestArgs, DestEnd, DestPump, MigrationDestination};
use super::factory::GuestFactory;
use super::source::{MigrationSource, SourceArgs, SourcePump};
use super::vm::{VmActor, VmArgs, VmInfo, VmMsg, VmPhase, with_guest};
use super::vm_disks::{MigratingDisks, VmDisk};
use super::{NodeCtx, NodeError, open_stream};
use crate::migration::wire::mac_string;
use crate::migration::{
    Capacity, DestMachine, DestMsg, GuestKind, Mac, Offer, SourceMachine, StreamIntro, Usage,
    VmConfig, admit,
};
use crate::storage::datastore::Datastores;
use crate::storage::remote::{DiskOpen, IncomingDisk};
use crate::synthetic::WRITES_PER_SEC_DEFAULT;

type Conn<T> = <T as Transport>::Connection;
type Recv<T> = <Conn<T> as ferry_transport::Connection>::Recv;
type Send_<T> = <Conn<T> as ferry_transport::Connection>::Send;

/// Messages to a [`HostActor`].
pub enum HostMsg<T: Transport> {
    /// A client request from `who` (certificate subject); replies go to
    /// the sender.
    Client(ClientRequest, String, mpsc::UnboundedSender<ClientReply>),
    /// Record a served request in the audit log.
    Audit(Box<crate::ops::audit::AuditEntry>),
    /// The scheduler asks for a VM's definition (to place and budget a job).
    JobFacts {
        /// The VM.
        vm: String,
        /// Its definition, or why not.
        reply: oneshot::Sender<Result<VmConfig, String>>,
    },
    /// The scheduler starts a job's migration.
    RunJob {
        /// The job, its destination resolved.
        job: Box<crate::ops::jobs::Job>,
        /// Where the migration's progress and report go.
        replies: mpsc::UnboundedSender<ClientReply>,
        /// The migration id, or why it could not start.
        started: oneshot::Sender<Result<u64, String>>,
    },
    /// The host's own health check found it degraded (`reason`; empty:
    /// healthy again): evacuate, as in maintenance mode.
    Degraded(String),
    /// Sample the guests' CPU time and disk writes (periodic).
    SampleLoad,
    /// A peer offers a VM.
    IncomingMigration {
        /// The peer host.
        peer: String,
        /// Its offer.
        offer: Offer,
        /// Control stream, sending half.
        writer: FrameWriter<Send_<T>>,
        /// Control stream, receiving half.
        reader: FrameReader<Recv<T>>,
    },
    /// A lane of an incoming migration.
    IncomingLane {
        /// The peer host.
        peer: String,
        /// Its migration id.
        migration_id: u64,
        /// The lane.
        lane: u32,
        /// The stream.
        reader: FrameReader<Recv<T>>,
    },
    /// An incoming migration's source released the VM: take it over
    /// durably (see [`arrival`]) and answer whether it worked.
    Adopt {
        /// The peer host and its migration id.
        key: (String, u64),
        /// The VM.
        vm: String,
        /// Its shadow.
        actor: ActorRef<VmMsg>,
        /// Its generation from now on.
        generation: u64,
        /// Whether its vCPUs will run.
        running: bool,
        /// Done, or why not.
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// An incoming migration ended.
    IncomingEnded {
        /// The peer host and its migration id.
        key: (String, u64),
        /// The VM.
        vm: String,
        /// How.
        end: DestEnd,
        /// What the destination saw.
        report: Box<crate::migration::DestReport>,
    },
    /// An outgoing migration ended.
    SourceEnded(Box<crate::migration::MigrationReport>),
    /// Call off an outgoing migration.
    Cancel {
        /// The migration.
        id: u64,
        /// Who asks (certificate name).
        who: String,
        /// Ok, or why not.
        reply: mpsc::UnboundedSender<ClientReply>,
    },
    /// The VM moved away: forget it.
    VmLeft(String),
    /// The destination of a VM in doubt answered how its migration ended.
    InDoubtAnswer {
        /// The VM.
        vm: String,
        /// The destination.
        to: String,
        /// The migration.
        migration_id: u64,
        /// Whether the destination took the VM.
        committed: bool,
    },
    /// `vm recover --force` fenced a running migration's destination:
    /// record it durably.
    RecordFence {
        /// The VM.
        vm: String,
        /// The destination.
        to: String,
        /// The migration.
        migration_id: u64,
    },
    /// A destination that restarted asks whether `vm`, which migration
    /// `migration_id` brought it, is its own.
    ArrivalQuestion {
        /// The destination host.
        peer: String,
        /// The VM.
        vm: String,
        /// The migration.
        migration_id: u64,
        /// The answer.
        reply: oneshot::Sender<crate::migration::wire::Ownership>,
    },
    /// The source of an arrival answered whether the VM is ours (or
    /// confirmed it let the VM go).
    ArrivalSettled {
        /// The VM.
        vm: String,
        /// The source host.
        peer: String,
        /// The migration.
        migration_id: u64,
        /// Its answer.
        ownership: crate::migration::wire::Ownership,
    },
    /// A source asks how its migration ended (it lost the link after
    /// releasing the VM).
    Resolve {
        /// The source host.
        peer: String,
        /// Its migration id.
        migration_id: u64,
        /// Whether this host took the VM.
        reply: oneshot::Sender<bool>,
    },
    /// Stop every actor of this host at once, VMs included, as a power
    /// cut would (the simulation's host crash).
    PowerOff,
    /// A disk stream of an incoming migration opened.
    IncomingDisk {
        /// The peer host.
        peer: String,
        /// What it opens.
        open: DiskOpen,
        /// The disk to fill.
        reply: oneshot::Sender<Result<Arc<IncomingDisk>, String>>,
    },
    /// A migration away failed after the disks' locks were handed over:
    /// open them again.
    ReopenDisks(String),
    /// A VM's disks moved to other datastores of this host.
    DisksMoved {
        /// The VM.
        vm: String,
        /// Their definitions now.
        disks: Vec<crate::migration::wire::DiskConfig>,
    },
    /// `mac` lives on `host` now.
    Announce {
        /// NIC address.
        mac: Mac,
        /// Host.
        host: String,
    },
}

/// What a host is started with.
pub struct HostArgs<T: Transport> {
    /// Name, transport, peers.
    pub ctx: Arc<NodeCtx<T>>,
    /// What VMs may use here.
    pub capacity: Capacity,
    /// Makes guests.
    pub factory: Arc<dyn GuestFactory>,
    /// The datastores this host mounts.
    pub stores: Arc<dyn Datastores>,
    /// Where the inventory, jobs, records and audit log are kept.
    pub store: Arc<dyn crate::ops::store::NodeStore>,
    /// The scheduler's concurrency limits.
    pub budgets: crate::ops::jobs::Budgets,
}

struct VmEntry {
    config: VmConfig,
    /// `None` while an incoming migration holds the reservation.
    actor: Option<ActorRef<VmMsg>>,
    /// Its disks here.
    disks: Vec<VmDisk>,
    /// A migration away is under way: (destination, migration id).
    leaving: Option<(String, u64)>,
    /// That migration's end is unknown (this host restarted and could not
    /// ask), or its arrival here is not confirmed and this host restarted:
    /// the VM stays paused here until it is known.
    in_doubt: Option<doubt::InDoubt>,
    /// It arrived by a migration whose source has not yet confirmed that
    /// it let the VM go: (source, migration id).
    arrived: Option<(String, u64)>,
}

/// Rates for DRS are taken over at least this long.
const RATE_WINDOW_MIN: std::time::Duration = std::time::Duration::from_secs(1);

/// How often the host samples its guests' CPU time and disk writes (so
/// that a first `drs plan` already sees rates).
const CPU_SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The host actor.
pub struct HostActor<T>(std::marker::PhantomData<fn() -> T>);

impl<T> Default for HostActor<T> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

/// The actor's state.
pub struct HostState<T: Transport> {
    ctx: Arc<NodeCtx<T>>,
    /// VMs whose crash the audit log has (until they boot again).
    crashes_audited: std::collections::BTreeSet<String>,
    /// Per VM, its disks whose guest writes fail and why, as last sampled
    /// (and audited when they start and stop failing).
    disks_failing: std::collections::BTreeMap<String, String>,
    /// Guest CPU time and disk writes, as rates for DRS.
    rates: std::sync::Mutex<crate::ops::rates::Rates>,
    capacity: Capacity,
    factory: Arc<dyn GuestFactory>,
    stores: Arc<dyn Datastores>,
    incoming_disks: disks::IncomingDisks,
    vms: BTreeMap<String, VmEntry>,
    incoming: BTreeMap<(String, u64), ActorRef<DestPump<Conn<T>>>>,
    macs: BTreeMap<Mac, String>,
    next_migration_id: u64,
    /// How recent incoming migrations ended: taken over or not.
    outcomes: BTreeMap<(String, u64), bool>,
    /// Questions waiting for an incoming migration to end.
    resolves: BTreeMap<(String, u64), Vec<oneshot::Sender<bool>>>,
    /// Outgoing migrations (stopped ones linger until the next power-off).
    outgoing: Vec<ractor::ActorCell>,
    /// Migrations this host took part in.
    history: history::History,
    /// Counters for `ferry node stats` and OpenTelemetry.
    metrics: Arc<super::metrics::NodeMetrics>,
    /// Outgoing migrations still running, by id (for cancel).
    running: BTreeMap<u64, ActorRef<super::source::SourcePump>>,
    /// What must survive a restart.
    store: Arc<dyn crate::ops::store::NodeStore>,
    /// The job queue (started once the inventory is back).
    scheduler: Option<ActorRef<super::scheduler::SchedulerMsg>>,
    budgets: crate::ops::jobs::Budgets,
    /// In maintenance mode: takes no VMs.
    maintenance: bool,
    /// Why the host reported itself degraded (empty: it did not).
    degraded: String,
    /// VMs read back from the store, brought back in `post_start`.
    restoring: Vec<crate::ops::store::StoredVm>,
    /// The last store write failed (why): the host takes no migrations
    /// until one works again.
    store_broken: Option<String>,
    /// Migrations away whose VM `vm recover --force` took back: their
    /// destinations must never run their copies.
    fences: std::collections::BTreeSet<(String, u64)>,
    /// Unconfirmed arrivals read back from the store, by VM.
    arrivals: BTreeMap<String, (String, u64)>,
    /// Migrations away that copy their VM's disks (`leftovers.rs`).
    copying: std::collections::BTreeSet<String>,
}

/// The first migration id a host gives out in one life: 24 bits of its
/// name's hash, 20 bits of its incarnation, then a counter. Ids of hosts
/// started in the same second differ by name; ids of one host's lives by
/// incarnation (production nodes take it from the boot second, so it
/// repeats after about twelve days, by when the old ids are long settled).
fn first_migration_id(host: &str, incarnation: u32) -> u64 {
    let name = xxhash_rust::xxh3::xxh3_64(host.as_bytes()) >> 40;
    (name << 40) | (u64::from(incarnation & 0xF_FFFF) << 20) | 1
}

/// Incoming outcomes remembered for sources that lost the link.
const OUTCOMES_KEPT: usize = 4096;

impl<T: Transport> Actor for HostActor<T> {
    type Msg = HostMsg<T>;
    type State = HostState<T>;
    type Arguments = HostArgs<T>;

    async fn pre_start(
        &self,
        _myself: ActorRef<HostMsg<T>>,
        args: HostArgs<T>,
    ) -> Result<HostState<T>, ActorProcessingErr> {
        let next_migration_id = first_migration_id(&args.ctx.name, args.ctx.incarnation);
        let metrics = Arc::new(super::metrics::NodeMetrics::new(&args.ctx.name));
        let (stores, host) = (args.stores.clone(), args.ctx.name.clone());
        super::offload(move || {
            crate::storage::datastore::remove_arrivals(stores.as_ref(), &host);
        })
        .await;
        let stored = args.store.load().unwrap_or_else(|e| {
            tracing::error!("reading the node store: {e}; starting empty");
            crate::ops::store::StoredState::default()
        });
        let mut history = history::History::default();
        history.restore(stored.migrations);
        let outcomes = stored
            .adoptions
            .iter()
            .map(|a| ((a.peer.clone(), a.migration_id), true))
            .collect();
        let setting = |k: &str| stored.settings.get(k).cloned().unwrap_or_default();
        Ok(HostState {
            crashes_audited: std::collections::BTreeSet::new(),
            disks_failing: std::collections::BTreeMap::new(),
            rates: std::sync::Mutex::new(crate::ops::rates::Rates::new(RATE_WINDOW_MIN)),
            ctx: args.ctx,
            capacity: args.capacity,
            factory: args.factory,
            stores: args.stores,
            incoming_disks: BTreeMap::new(),
            vms: BTreeMap::new(),
            incoming: BTreeMap::new(),
            macs: BTreeMap::new(),
            next_migration_id,
            outcomes,
            resolves: BTreeMap::new(),
            outgoing: Vec::new(),
            history,
            metrics,
            running: BTreeMap::new(),
            store: args.store,
            scheduler: None,
            budgets: args.budgets,
            maintenance: setting(crate::ops::store::SETTING_MAINTENANCE) == "1",
            degraded: setting(crate::ops::store::SETTING_DEGRADED),
            restoring: stored.vms,
            store_broken: None,
            fences: crate::ops::store::fences(&stored.settings),
            arrivals: stored.arrivals,
            copying: leftovers::load(&stored.settings),
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<HostMsg<T>>,
        s: &mut HostState<T>,
    ) -> Result<(), ActorProcessingErr> {
        let vms = std::mem::take(&mut s.restoring);
        inventory::restore(&myself, s, vms).await;
        let runner = ops::HostRunner {
            host: myself.clone(),
            ctx: s.ctx.clone(),
        };
        let (scheduler, _) = Actor::spawn_linked(
            None,
            super::scheduler::SchedulerActor,
            super::scheduler::SchedulerArgs {
                host: s.ctx.name.clone(),
                store: s.store.clone(),
                budgets: s.budgets,
                runner: Arc::new(runner),
                tick: std::time::Duration::from_millis(200),
            },
            myself.get_cell(),
        )
        .await?;
        s.scheduler = Some(scheduler);
        myself.send_interval(CPU_SAMPLE_EVERY, || HostMsg::SampleLoad);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<HostMsg<T>>,
        msg: HostMsg<T>,
        s: &mut HostState<T>,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            HostMsg::Client(request, who, reply) => {
                client_request(&myself, s, request, who, reply).await;
            }
            HostMsg::Audit(mut entry) => {
                entry.node.clone_from(&s.ctx.name);
                if entry.from.is_empty() {
                    entry.from.clone_from(&s.ctx.name);
                }
                if let Err(e) = s.write_store(|store| store.append_audit(&entry)) {
                    tracing::error!("writing the audit log: {e}");
                }
            }
            HostMsg::JobFacts { vm, reply } => {
                let _ = reply.send(
                    s.vms
                        .get(&vm)
                        .filter(|e| e.actor.is_some())
                        .map(|e| e.config.clone())
                        .ok_or_else(|| format!("no VM named {vm} on {}", s.ctx.name)),
                );
            }
            HostMsg::RunJob {
                job,
                replies,
                started,
            } => {
                let r = start_migration(&myself, s, &job.vm, &job.to, &job.options).await;
                let _ = started.send(match r {
                    Ok(task) => {
                        let id = task.id;
                        tokio::spawn(task.run(replies));
                        Ok(id)
                    }
                    Err(e) => Err(e.to_string()),
                });
            }
            HostMsg::SampleLoad => {
                let load = ops::load(s).await;
                audit_crashes(&myself, s, &load);
                audit_disk_failures(&myself, s, &load);
                if s.store_broken.is_some() {
                    // Probe: the host takes migrations again once its
                    // store writes again.
                    let _ = s.write_store(|store| {
                        store.set_setting(crate::ops::store::SETTING_STORE_PROBE, "")
                    });
                }
            }
            HostMsg::Degraded(reason) => {
                let (tx, mut rx) = mpsc::unbounded_channel();
                ops::set_service(s, None, Some(reason), "the host's health check", tx).await;
                tokio::spawn(async move {
                    if let Some(ClientReply::Error(e)) = rx.recv().await {
                        tracing::error!("evacuating a degraded host: {e}");
                    }
                });
            }
            HostMsg::PowerOff => {
                for cell in s.outgoing.drain(..) {
                    cell.stop(Some("power off".into()));
                }
                if let Some(scheduler) = s.scheduler.take() {
                    scheduler.stop(Some("power off".into()));
                }
                for dest in s.incoming.values() {
                    dest.stop(Some("power off".into()));
                }
                for entry in s.vms.values() {
                    if let Some(vm) = &entry.actor {
                        vm.stop(Some("power off".into()));
                    }
                    for d in &entry.disks {
                        d.actor.stop(Some("power off".into()));
                    }
                }
                myself.stop(Some("power off".into()));
            }
            HostMsg::IncomingMigration {
                peer,
                offer,
                writer,
                reader,
            } => incoming(&myself, s, peer, offer, writer, reader).await,
            HostMsg::IncomingLane {
                peer,
                migration_id,
                lane,
                reader,
            } => {
                if let Some(dest) = s.incoming.get(&(peer.clone(), migration_id)) {
                    let _ = dest.cast(DestPump::Lane(lane, reader));
                } else {
                    tracing::warn!(%peer, migration_id, lane, "lane for no migration");
                }
            }
            HostMsg::Cancel { id, who, reply } => {
                let Some(source) = s.running.get(&id).cloned() else {
                    let _ = reply.send(ClientReply::Error(format!(
                        "{} is not sending migration {}",
                        s.ctx.name,
                        crate::migration::report::show_id(id)
                    )));
                    return Ok(());
                };
                tokio::spawn(async move {
                    let answer = source
                        .call(
                            |port| SourcePump::Cancel { who, reply: port },
                            Some(std::time::Duration::from_secs(10)),
                        )
                        .await;
                    let _ = reply.send(match answer {
                        Ok(ractor::rpc::CallResult::Success(Ok(()))) => ClientReply::Ok,
                        Ok(ractor::rpc::CallResult::Success(Err(why))) => {
                            ClientReply::Error(format!(
                                "cannot cancel migration {}: {why}",
                                crate::migration::report::show_id(id)
                            ))
                        }
                        _ => ClientReply::Error("the migration ended meanwhile".into()),
                    });
                });
            }
            HostMsg::SourceEnded(report) => {
                s.running.remove(&report.migration_id);
                s.metrics.source_ended(&report);
                let record = s.history.source_ended(&report);
                if let Err(e) = s.store.put_migration(&record) {
                    tracing::error!("storing a migration record: {e}");
                }
                if let Some(entry) = s.vms.get_mut(&report.vm)
                    && entry
                        .leaving
                        .as_ref()
                        .is_some_and(|l| l.1 == report.migration_id)
                {
                    entry.leaving = None;
                    inventory::persist_or_log(s, &report.vm, None).await;
                }
                // The migration's own commit removed what it copied.
                leftovers::forget(s, &report.vm, report.migration_id);
            }
            HostMsg::Adopt {
                key,
                vm,
                actor,
                generation,
                running,
                reply,
            } => {
                let r = arrival::adopt_vm(s, &key, &vm, actor, generation, running).await;
                if let Err(e) = &r {
                    tracing::error!(%vm, "taking the arriving VM over: {e}");
                }
                let _ = reply.send(r);
            }
            HostMsg::IncomingEnded {
                key,
                vm,
                end,
                report,
            } => {
                s.incoming.remove(&key);
                s.metrics.destination_ended(&report);
                let record = s.history.destination_ended(&report);
                if let Err(e) = s.store.put_migration(&record) {
                    tracing::error!("storing a migration record: {e}");
                }
                let committed = matches!(end, DestEnd::Adopted(_));
                s.remember_outcome(key.clone(), committed);
                for reply in s.resolves.remove(&key).unwrap_or_default() {
                    let _ = reply.send(committed);
                }
                match end {
                    DestEnd::Adopted(actor) => {
                        // Taken over (durably) before the resume; its disks'
                        // workload runs now that the guest does.
                        let running = with_guest(&actor, |g| g.is_running())
                            .await
                            .unwrap_or(false);
                        if let Some(entry) = s.vms.get(&vm) {
                            disks::set_workload(&entry.disks, running);
                        }
                    }
                    DestEnd::Discarded => {
                        disks::discard_incoming(s, &key).await;
                        if s.vms.get(&vm).is_some_and(|e| e.actor.is_none()) {
                            s.vms.remove(&vm);
                        }
                    }
                }
            }
            HostMsg::VmLeft(name) => {
                let durable = inventory::forget(s, &name);
                if let Some(entry) = s.vms.remove(&name) {
                    if let (true, Some((to, id))) = (durable, entry.leaving) {
                        confirm::send_confirmation(&s.ctx, to, name, id);
                    }
                    if let Some(actor) = entry.actor {
                        crate::node::vm::discard(&actor);
                    }
                }
            }
            HostMsg::RecordFence {
                vm,
                to,
                migration_id,
            } => {
                if let Err(e) = doubt::record_fence(s, &vm, to, migration_id) {
                    tracing::error!(%vm, "recording the fence: {e}");
                }
            }
            HostMsg::ArrivalQuestion {
                peer,
                vm,
                migration_id,
                reply,
            } => {
                let answer = confirm::answer_question(&myself, s, &peer, &vm, migration_id).await;
                let _ = reply.send(answer);
            }
            HostMsg::ArrivalSettled {
                vm,
                peer,
                migration_id,
                ownership,
            } => confirm::settled(&myself, s, &vm, &peer, migration_id, ownership).await,
            HostMsg::InDoubtAnswer {
                vm,
                to,
                migration_id,
                committed,
            } => doubt::answered(&myself, s, &vm, &to, migration_id, committed).await,
            HostMsg::Resolve {
                peer,
                migration_id,
                reply,
            } => {
                let key = (peer, migration_id);
                if let Some(committed) = s.outcomes.get(&key) {
                    let _ = reply.send(*committed);
                } else if let Some(dest) = s.incoming.get(&key) {
                    // Still running: make it decide (before the commit it
                    // drops the shadow; after it, it finishes the resume),
                    // and answer when it has.
                    let _ = dest.cast(DestPump::Failed(
                        "the source lost the link and asks how it ended".into(),
                    ));
                    s.resolves.entry(key).or_default().push(reply);
                } else {
                    // Never heard of it (or forgotten): this host does not
                    // have the VM.
                    let _ = reply.send(false);
                }
            }
            HostMsg::IncomingDisk { peer, open, reply } => {
                let _ = reply.send(disks::incoming_disk(s, peer, open).await);
            }
            HostMsg::ReopenDisks(name) => {
                if let Some(config) = s.vms.get(&name).map(|e| e.config.clone()) {
                    let mut opened = Vec::new();
                    for c in config.disks {
                        match super::vm_disks::open_disk(c, s.stores.clone()).await {
                            Ok(d) => opened.push(d),
                            Err(e) => tracing::error!(vm = %name, "reopening a disk: {e}"),
                        }
                    }
                    if let Some(entry) = s.vms.get_mut(&name) {
                        if let Some(vm) = &entry.actor {
                            super::vm_disks::attach_to_guest(vm, &mut opened).await;
                            let running = with_guest(vm, |g| g.is_running()).await.unwrap_or(false);
                            disks::set_workload(&opened, running);
                        }
                        entry.disks = opened;
                    }
                }
            }
            HostMsg::DisksMoved { vm, disks: moved } => {
                if let Some(entry) = s.vms.get_mut(&vm) {
                    for c in moved {
                        if let Some(d) = entry.disks.iter_mut().find(|d| d.config.name == c.name) {
                            d.config = c.clone();
                        }
                        if let Some(d) = entry.config.disks.iter_mut().find(|d| d.name == c.name) {
                            *d = c;
                        }
                    }
                }
                inventory::persist_or_log(s, &vm, None).await;
            }
            HostMsg::Announce { mac, host } => {
                tracing::info!(mac = %mac_string(&mac), %host, "MAC announced");
                s.macs.insert(mac, host);
            }
        }
        Ok(())
    }
}

impl<T: Transport> HostState<T> {
    /// Writes through the node store, keeping track of whether it works:
    /// while writes fail the host takes no migrations.
    fn write_store(
        &mut self,
        write: impl FnOnce(
            &dyn crate::ops::store::NodeStore,
        ) -> Result<(), crate::ops::store::StoreError>,
    ) -> Result<(), crate::ops::store::StoreError> {
        let r = write(self.store.as_ref());
        match &r {
            Ok(()) => {
                if self.store_broken.take().is_some() {
                    tracing::info!("the node store writes again");
                }
            }
            Err(e) => {
                tracing::error!("the node store cannot write: {e}; no migrations until it can");
                self.store_broken = Some(e.to_string());
            }
        }
        r
    }

    /// How incoming migration `key` ended (`committed`: the VM is here),
    /// for sources that ask.
    fn remember_outcome(&mut self, key: (String, u64), committed: bool) {
        if self.outcomes.len() >= OUTCOMES_KEPT && !self.outcomes.contains_key(&key) {
            self.outcomes.pop_first();
        }
        // An adoption is never overwritten by a later "not taken".
        let e = self.outcomes.entry(key).or_insert(committed);
        *e |= committed;
    }

    /// Why the host takes no VMs now, if it does not.
    /// Why one more migration from `peer` would break this host's
    /// budgets (migrations arriving and leaving count alike, as in
    /// vSphere; `link` caps those from one peer).
    fn over_budget(&self, peer: &str) -> Option<String> {
        let arriving = self.incoming.len();
        let leaving = self.running.len();
        if arriving + leaving >= self.budgets.host_live as usize {
            return Some(format!(
                "{arriving} arriving and {leaving} leaving, {} at once at most",
                self.budgets.host_live
            ));
        }
        let from_peer = self.incoming.keys().filter(|(p, _)| p == peer).count();
        if from_peer >= self.budgets.link as usize {
            return Some(format!(
                "{from_peer} arriving from {peer}, {} per link at most",
                self.budgets.link
            ));
        }
        None
    }

    fn out_of_service(&self) -> Option<String> {
        if let Some(why) = &self.store_broken {
            Some(format!("its node store cannot write ({why})"))
        } else if self.maintenance {
            Some("it is in maintenance mode".into())
        } else if !self.degraded.is_empty() {
            Some(format!("it is degraded ({})", self.degraded))
        } else {
            None
        }
    }

    fn usage(&self) -> Usage {
        self.vms.values().fold(Usage::default(), |u, e| Usage {
            memory_bytes: u.memory_bytes + e.config.memory_bytes,
            vcpus: u.vcpus + u32::from(e.config.vcpus),
        })
    }

    fn vm(&self, name: &str) -> Result<ActorRef<VmMsg>, NodeError> {
        self.vms
            .get(name)
            .and_then(|e| e.actor.clone())
            .ok_or_else(|| NodeError::NoSuchVm(name.to_owned()))
    }
}

/// Tells every peer (and this host) that `mac` lives here.
fn announce<T: Transport>(myself: &ActorRef<HostMsg<T>>, ctx: &Arc<NodeCtx<T>>, mac: Mac) {
    let _ = myself.cast(HostMsg::Announce {
        mac,
        host: ctx.name.clone(),
    });
    let ctx = ctx.clone();
    tokio::spawn(async move {
        for peer in ctx.peers.keys() {
            let intro = StreamIntro::Announce {
                mac,
                host: ctx.name.clone(),
            };
            let sent = match ctx.link(peer).await {
                Ok(conn) => open_stream(&conn, &intro).await.map(|(mut w, _)| {
                    let _ = w.finish();
                }),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = sent {
                tracing::warn!(%peer, "announcing {}: {e}", mac_string(&mac));
            }
        }
    });
}

async fn client_request<T: Transport>(
    myself: &ActorRef<HostMsg<T>>,
    s: &mut HostState<T>,
    request: ClientRequest,
    who: String,
    reply: mpsc::UnboundedSender<ClientReply>,
) {
    let answer = |r: Result<ClientReply, NodeError>| {
        let _ = reply.send(r.unwrap_or_else(|e| ClientReply::Error(e.to_string())));
    };
    match request {
        ClientRequest::CreateVm(spec) => answer(create_vm(myself, s, spec).await),
        ClientRequest::StartVm(name) => {
            let booted = match s.vm(&name) {
                Ok(vm) => reboot_if_crashed(myself, s, &name, &vm).await,
                Err(e) => Err(e),
            };
            let r = match booted.and_then(|()| s.vm(&name)) {
                Ok(vm) => call(&vm, VmMsg::Start).await.map(|()| {
                    disks::set_workload(&s.vms[&name].disks, true);
                    ClientReply::Ok
                }),
                Err(e) => Err(e),
            };
            let r = match r {
                Ok(reply) => inventory::persist(s, &name, Some(true))
                    .await
                    .map(|()| reply),
                Err(e) => Err(e),
            };
            answer(r);
        }
        ClientRequest::StopVm(name) => {
            let r = match s.vm(&name) {
                Ok(vm) => call(&vm, VmMsg::Stop).await.map(|()| {
                    disks::set_workload(&s.vms[&name].disks, false);
                    ClientReply::Ok
                }),
                Err(e) => Err(e),
            };
            let r = match r {
                Ok(reply) => inventory::persist(s, &name, Some(false))
                    .await
                    .map(|()| reply),
                Err(e) => Err(e),
            };
            answer(r);
        }
        ClientRequest::UpgradeVm { vm } => answer(match s.vm(&vm) {
            Ok(actor) => match actor.call(VmMsg::Upgrade, None).await {
                Ok(ractor::rpc::CallResult::Success(r)) => r.map(|u| ClientReply::Upgraded {
                    downtime_us: u64::try_from(u.downtime.as_micros()).unwrap_or(u64::MAX),
                    old_pid: u.old_pid,
                    new_pid: u.new_pid,
                }),
                _ => Err(NodeError::Gone("VM actor".into())),
            },
            Err(e) => Err(e),
        }),
        ClientRequest::ConsoleInput { vm, bytes } => answer(match s.vm(&vm) {
            Ok(actor) => {
                match super::vm::with_guest(&actor, move |g| g.console_input(&bytes)).await {
                    Ok(Ok(n)) => Ok(ClientReply::Taken(n as u64)),
                    Ok(Err(e)) => Err(NodeError::BadRequest(format!("{vm}: {e}"))),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }),
        ClientRequest::Console { vm } => answer(match s.vm(&vm) {
            Ok(actor) => match super::vm::with_guest(&actor, |g| g.console()).await {
                Ok(Some(out)) => Ok(ClientReply::Console(out)),
                Ok(None) => Err(NodeError::BadRequest(format!(
                    "{vm} has no serial console (only Linux guests do)"
                ))),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        }),
        ClientRequest::Disks { vm, verify } => answer(match s.vm(&vm) {
            Ok(_) => Ok(ClientReply::Disks(
                disks::views(&s.vms[&vm].disks, verify).await,
            )),
            Err(e) => Err(e),
        }),
        ClientRequest::MoveStorage {
            vm,
            datastore,
            method,
            rate_mb_per_s,
            disk_datastores,
        } => match s.vm(&vm) {
            Ok(actor) => {
                let entry = &s.vms[&vm];
                let (config, vm_disks) = (entry.config.clone(), entry.disks.clone());
                let stores = s.stores.clone();
                let me = myself.clone();
                let metrics = s.metrics.clone();
                let span = tracing::info_span!(
                    parent: None,
                    "storage.move",
                    vm = %vm,
                    datastore = %datastore,
                    method = %method,
                );
                tokio::spawn(async move {
                    use tracing::Instrument;
                    let r = disks::move_storage(
                        stores,
                        config,
                        vm_disks,
                        actor,
                        crate::migration::wire::StorageMove {
                            datastore,
                            method,
                            rate_mb_per_s,
                            disk_datastores,
                        },
                        crate::storage::MoveOptions {
                            rate_bytes_per_sec: rate_mb_per_s * 1_000_000,
                            ..crate::storage::MoveOptions::new(method)
                        },
                        reply.clone(),
                    )
                    .instrument(span)
                    .await;
                    let _ = reply.send(match r {
                        Ok((configs, reports)) => {
                            metrics.disk_copied(reports.iter().map(|r| r.copied_bytes).sum());
                            let _ = me.cast(HostMsg::DisksMoved { vm, disks: configs });
                            ClientReply::StorageMoved(reports)
                        }
                        Err(e) => ClientReply::Error(e.to_string()),
                    });
                });
            }
            Err(e) => answer(Err(e)),
        },
        ClientRequest::DeleteVm(name) => answer(delete_vm(s, &name).await),
        ClientRequest::ListVms => {
            let mut list = Vec::new();
            for entry in s.vms.values() {
                if let Some(actor) = &entry.actor
                    && let Ok(info) = actor.call(VmMsg::Info, None).await
                    && let ractor::rpc::CallResult::Success(mut info) = info
                {
                    info.in_doubt = doubt::describe(entry, info.phase);
                    info.disks_failing =
                        s.disks_failing.get(&info.name).cloned().unwrap_or_default();
                    list.push(info);
                }
            }
            answer(Ok(ClientReply::Vms(list)));
        }
        ClientRequest::Migrations { id, last } => answer(Ok(ClientReply::Migrations(
            s.history.find(id, last as usize),
        ))),
        ClientRequest::Stats => answer(Ok(ClientReply::Stats(s.metrics.snapshot()))),
        // The accept loop sends cancels as `HostMsg::Cancel`, with the
        // caller's name; one arriving here has none.
        ClientRequest::CancelMigration { id } => {
            let _ = myself.cast(HostMsg::Cancel {
                id,
                who: "an unnamed client".into(),
                reply,
            });
        }
        ClientRequest::MacTable => answer(Ok(ClientReply::Macs(
            s.macs
                .iter()
                .map(|(m, h)| (mac_string(m), h.clone()))
                .collect(),
        ))),
        ClientRequest::Migrate { vm, to, options } => {
            answer_job(s, vm, to, options, who, reply);
        }
        ClientRequest::Jobs => match &s.scheduler {
            Some(scheduler) => {
                let scheduler = scheduler.clone();
                tokio::spawn(async move {
                    let _ = reply.send(
                        match scheduler
                            .call(super::scheduler::SchedulerMsg::List, None)
                            .await
                        {
                            Ok(ractor::rpc::CallResult::Success(jobs)) => ClientReply::Jobs(jobs),
                            _ => ClientReply::Error("the scheduler is gone".into()),
                        },
                    );
                });
            }
            None => answer(Err(NodeError::Gone("scheduler".into()))),
        },
        ClientRequest::CancelJob { id } => match &s.scheduler {
            Some(scheduler) => {
                let _ = scheduler.cast(super::scheduler::SchedulerMsg::Cancel { id, who, reply });
            }
            None => answer(Err(NodeError::Gone("scheduler".into()))),
        },
        ClientRequest::Audit(query) => answer(
            s.store
                .audit(&query)
                .map(ClientReply::Audit)
                .map_err(|e| NodeError::Gone(e.to_string())),
        ),
        ClientRequest::HostLoad => answer(Ok(ClientReply::Load(ops::load(s).await))),
        ClientRequest::Recommend { vm, datastore } => {
            match s.vms.get(&vm).filter(|e| e.actor.is_some()) {
                Some(entry) => {
                    let (ctx, config) = (s.ctx.clone(), entry.config.clone());
                    tokio::spawn(async move {
                        let ranked = ops::recommend(&ctx, &config, &datastore).await;
                        let _ = reply.send(ClientReply::Ranking(ranked));
                    });
                }
                None => answer(Err(NodeError::NoSuchVm(vm))),
            }
        }
        ClientRequest::Maintenance { enter } => {
            ops::set_service(s, Some(enter), None, &who, reply).await;
        }
        ClientRequest::Degraded { reason } => {
            ops::set_service(s, None, Some(reason), &who, reply).await;
        }
        ClientRequest::RecoverVm { vm, force } => {
            doubt::recover(myself, s, &vm, force, who, reply).await;
        }
    }
}

/// Queues a migration as a job; the client waits on it unless it has a
/// start time.
fn answer_job<T: Transport>(
    s: &HostState<T>,
    vm: String,
    to: String,
    options: MigrateOptions,
    who: String,
    reply: mpsc::UnboundedSender<ClientReply>,
) {
    let refuse = |e: NodeError| {
        let _ = reply.send(ClientReply::Error(e.to_string()));
    };
    if let Err(e) = s.vm(&vm) {
        return refuse(e);
    }
    if to == s.ctx.name {
        return refuse(NodeError::BadRequest(format!("{vm} already lives on {to}")));
    }
    if to != "auto" && !s.ctx.peers.contains_key(&to) {
        let known: Vec<&str> = s.ctx.peers.keys().map(String::as_str).collect();
        return refuse(NodeError::NoSuchHost(to, known.join(", ")));
    }
    if let Err(e) = options.to_options().check() {
        return refuse(NodeError::BadRequest(e));
    }
    let Some(scheduler) = &s.scheduler else {
        return refuse(NodeError::Gone("scheduler".into()));
    };
    let job = crate::ops::jobs::Job {
        id: 0,
        vm,
        to,
        priority: options.priority,
        not_before_unix_ms: options.at_unix_ms,
        options,
        submitted_unix_ms: crate::ops::unix_ms_now(),
        submitted_by: who,
        state: crate::ops::jobs::JobState::Queued,
        started_unix_ms: 0,
        ended_unix_ms: 0,
        migration_id: 0,
        result: String::new(),
    };
    let _ = scheduler.cast(super::scheduler::SchedulerMsg::Submit {
        job: Box::new(job),
        waiter: Some(reply),
    });
}

async fn call<T: Send + 'static>(
    vm: &ActorRef<VmMsg>,
    msg: impl FnOnce(ractor::RpcReplyPort<Result<T, NodeError>>) -> VmMsg,
) -> Result<T, NodeError> {
    match vm.call(msg, None).await {
        Ok(ractor::rpc::CallResult::Success(r)) => r,
        _ => Err(NodeError::Gone("VM actor".into())),
    }
}

fn mac_for(name: &str) -> Mac {
    let h = xxhash_rust::xxh3::xxh3_64(name.as_bytes()).to_le_bytes();
    [0x52, 0x54, 0x00, h[0], h[1], h[2]]
}

async fn create_vm<T: Transport>(
    myself: &ActorRef<HostMsg<T>>,
    s: &mut HostState<T>,
    spec: VmSpec,
) -> Result<ClientReply, NodeError> {
    let bad = |e: crate::node::values::ValueError| NodeError::BadRequest(e.to_string());
    crate::node::values::check_name("VM name", &spec.name).map_err(bad)?;
    let memory_bytes = crate::node::values::memory_bytes(spec.memory_mib).map_err(bad)?;
    let vcpus = crate::node::values::check_vcpus(spec.vcpus).map_err(bad)?;
    crate::node::values::check_cpu_features(
        &spec.cpu_features,
        &s.capacity.cpu_features,
        &s.ctx.name,
    )
    .map_err(bad)?;
    if s.vms.contains_key(&spec.name) {
        return Err(NodeError::Exists(spec.name));
    }
    if let Some(why) = s.out_of_service() {
        return Err(NodeError::Busy(format!(
            "{} takes no new VMs: {why}",
            s.ctx.name
        )));
    }
    if spec.wss_mib >= spec.memory_mib {
        return Err(NodeError::BadRequest(format!(
            "{} MiB of memory cannot hold a {} MiB working set above 1 MiB",
            spec.memory_mib, spec.wss_mib
        )));
    }
    let used = s.usage();
    if used.memory_bytes.saturating_add(memory_bytes) > s.capacity.memory_bytes {
        return Err(NodeError::NoCapacity(format!(
            "{} MiB wanted, {} MiB free",
            spec.memory_mib,
            (s.capacity.memory_bytes - used.memory_bytes.min(s.capacity.memory_bytes)) >> 20
        )));
    }
    if used.vcpus + u32::from(spec.vcpus) > s.capacity.vcpus {
        return Err(NodeError::NoCapacity(format!(
            "{} vCPUs wanted, {} free",
            spec.vcpus,
            s.capacity.vcpus.saturating_sub(used.vcpus)
        )));
    }
    let kind = if let Some(linux) = spec.linux.clone() {
        if !s.factory.kvm() {
            return Err(NodeError::BadRequest(
                "a Linux guest needs KVM, and this node has no /dev/kvm".into(),
            ));
        }
        GuestKind::Linux {
            kernel: linux.kernel,
            initrd: linux.initrd,
            cmdline: linux.cmdline,
        }
    } else if s.factory.kvm() && !spec.synthetic {
        GuestKind::Kvm {
            wss_bytes: spec.wss_mib << 20,
        }
    } else {
        GuestKind::Synthetic {
            wss_bytes: spec.wss_mib << 20,
            seed: xxhash_rust::xxh3::xxh3_64(spec.name.as_bytes()),
            writes_per_sec: WRITES_PER_SEC_DEFAULT,
        }
    };
    let cpu_features = if spec.cpu_features.is_empty() {
        s.capacity.cpu_features.iter().cloned().collect()
    } else {
        spec.cpu_features
    };
    let disk_configs =
        disks::create_disks(&s.stores, &spec.name, &spec.disks, spec.disk_workload).await?;
    let config = VmConfig {
        name: spec.name.clone(),
        memory_bytes,
        vcpus,
        cpu_features,
        mac: mac_for(&spec.name),
        kind,
        disks: disk_configs,
    };
    let factory = s.factory.clone();
    let boot_config = config.clone();
    let guest = super::offload(move || factory.boot(&boot_config))
        .await
        .map_err(|e| NodeError::Guest(e.to_string()))?;
    let vm_disks = disks::materialize(&s.stores, &config).await?;
    let (actor, _) = Actor::spawn(
        None,
        VmActor,
        VmArgs {
            config: config.clone(),
            guest,
            host: s.ctx.name.clone(),
            generation: 1,
            phase: VmPhase::Stopped,
        },
    )
    .await
    .map_err(|e| NodeError::Gone(format!("VM actor ({e})")))?;
    let mut vm_disks = vm_disks;
    super::vm_disks::attach_to_guest(&actor, &mut vm_disks).await;
    announce(myself, &s.ctx, config.mac);
    s.vms.insert(
        spec.name.clone(),
        VmEntry {
            config,
            actor: Some(actor),
            disks: vm_disks,
            leaving: None,
            in_doubt: None,
            arrived: None,
        },
    );
    if let Err(e) = inventory::persist(s, &spec.name, Some(false)).await {
        // Not durable, so not created: a restart would not know it.
        if let Some(entry) = s.vms.remove(&spec.name) {
            disks::remove_all(&s.stores, &entry.config, &entry.disks).await;
            if let Some(actor) = entry.actor {
                crate::node::vm::discard(&actor);
            }
        }
        return Err(e);
    }
    Ok(ClientReply::Ok)
}

/// Audits each VM whose guest was found dead, once per crash.
fn audit_crashes<T: Transport>(
    myself: &ActorRef<HostMsg<T>>,
    s: &mut HostState<T>,
    load: &crate::ops::placement::HostLoad,
) {
    for vm in &load.vms {
        if vm.crashed.is_empty() || !s.crashes_audited.insert(vm.name.clone()) {
            continue;
        }
        let _ = myself.cast(HostMsg::Audit(Box::new(crate::ops::audit::AuditEntry {
            at_unix_ms: crate::ops::unix_ms_now(),
            who: "node".into(),
            action: "vm crashed".into(),
            vm: vm.name.clone(),
            outcome: "failed".into(),
            detail: format!(
                "{}; it stays stopped (`ferry vm start` boots it again)",
                vm.crashed
            ),
            ..Default::default()
        })));
    }
}

/// Keeps, per VM, which disks' guest writes fail (from the load sample)
/// and audits each VM's failures when they start and when they stop.
fn audit_disk_failures<T: Transport>(
    myself: &ActorRef<HostMsg<T>>,
    s: &mut HostState<T>,
    load: &crate::ops::placement::HostLoad,
) {
    let mut now = std::collections::BTreeMap::new();
    for vm in &load.vms {
        let failing: Vec<String> = vm
            .disks
            .iter()
            .filter(|d| !d.failing.is_empty())
            .map(|d| format!("disk {}: {}", d.name, d.failing))
            .collect();
        if !failing.is_empty() {
            now.insert(vm.name.clone(), failing.join("; "));
        }
    }
    let audit = |vm: &str, action: &str, outcome: &str, detail: String| {
        let _ = myself.cast(HostMsg::Audit(Box::new(crate::ops::audit::AuditEntry {
            at_unix_ms: crate::ops::unix_ms_now(),
            who: "node".into(),
            action: action.into(),
            vm: vm.to_owned(),
            outcome: outcome.into(),
            detail,
            ..Default::default()
        })));
    };
    for (vm, why) in &now {
        if !s.disks_failing.contains_key(vm) {
            audit(vm, "disk writes failing", "failed", why.clone());
        }
    }
    for vm in s.disks_failing.keys() {
        if !now.contains_key(vm) && load.vms.iter().any(|v| &v.name == vm) {
            audit(vm, "disk writes recovered", "ok", String::new());
        }
    }
    s.disks_failing = now;
}

/// Boots a new guest for VM `name` if its guest crashed (its VMM process
/// died), so `vm start` starts it again; audited.
async fn reboot_if_crashed<T: Transport>(
    myself: &ActorRef<HostMsg<T>>,
    s: &mut HostState<T>,
    name: &str,
    vm: &ActorRef<VmMsg>,
) -> Result<(), NodeError> {
    let info: VmInfo = match vm.call(VmMsg::Info, None).await {
        Ok(ractor::rpc::CallResult::Success(i)) => i,
        _ => return Err(NodeError::Gone("VM actor".into())),
    };
    if info.crashed.is_empty() {
        return Ok(());
    }
    let factory = s.factory.clone();
    let config = s.vms[name].config.clone();
    let guest = super::offload(move || factory.boot(&config))
        .await
        .map_err(|e| NodeError::Guest(e.to_string()))?;
    vm.cast(VmMsg::Replace(guest))
        .map_err(|_| NodeError::Gone("VM actor".into()))?;
    s.crashes_audited.remove(name);
    if let Some(entry) = s.vms.get_mut(name) {
        super::vm_disks::attach_to_guest(vm, &mut entry.disks).await;
    }
    let _ = myself.cast(HostMsg::Audit(Box::new(crate::ops::audit::AuditEntry {
        at_unix_ms: crate::ops::unix_ms_now(),
        who: "node".into(),
        action: "vm boot after crash".into(),
        vm: name.to_owned(),
        outcome: "ok".into(),
        detail: info.crashed,
        ..Default::default()
    })));
    Ok(())
}

async fn delete_vm<T: Transport>(
    s: &mut HostState<T>,
    name: &str,
) -> Result<ClientReply, NodeError> {
    let vm = s.vm(name)?;
    let info: VmInfo = match vm.call(VmMsg::Info, None).await {
        Ok(ractor::rpc::CallResult::Success(i)) => i,
        _ => return Err(NodeError::Gone("VM actor".into())),
    };
    if info.phase == VmPhase::Released || s.vms.get(name).is_some_and(|e| e.leaving.is_some()) {
        return Err(NodeError::Busy(format!(
            "{name} is in doubt (a migration away may have handed it over): settle it with `vm recover` first; deleting it could destroy the only copy"
        )));
    }
    if info.phase != VmPhase::Stopped {
        return Err(NodeError::Busy(format!(
            "{name} is {:?}; stop it first",
            info.phase
        )));
    }
    if let Some(entry) = s.vms.remove(name) {
        disks::remove_all(&s.stores, &entry.config, &entry.disks).await;
    }
    inventory::forget(s, name);
    crate::node::vm::discard(&vm);
    Ok(ClientReply::Ok)
}

async fn incoming<T: Transport>(
    myself: &ActorRef<HostMsg<T>>,
    s: &mut HostState<T>,
    peer: String,
    offer: Offer,
    mut writer: FrameWriter<Send_<T>>,
    reader: FrameReader<Recv<T>>,
) {
    let exists = s.vms.contains_key(&offer.vm.name);
    let admitted = match (s.out_of_service(), s.over_budget(&peer)) {
        (Some(why), _) => Err(crate::migration::Refusal::OutOfService(why)),
        (None, Some(why)) => Err(crate::migration::Refusal::Busy(why)),
        (None, None) => admit(&offer, &s.capacity, s.usage(), exists),
    }
    .and_then(|()| disks::admit_disks(s.stores.as_ref(), &offer));
    if let Err(refusal) = admitted {
        tracing::info!(%peer, vm = %offer.vm.name, %refusal, "migration refused");
        tokio::spawn(async move {
            let _ = writer
                .send_message(FrameKind::Control, &DestMsg::Refused(refusal))
                .await;
            let _ = writer.finish();
            // Keep the stream until the source has read the refusal.
            let mut reader = reader;
            let _ = reader.next_header().await;
        });
        return;
    }
    let key = (peer.clone(), offer.migration_id);
    let name = offer.vm.name.clone();
    let lanes = offer.lanes.clamp(1, 16);
    s.vms.insert(
        name.clone(),
        VmEntry {
            config: offer.vm.clone(),
            actor: None,
            disks: Vec::new(),
            leaving: None,
            in_doubt: None,
            arrived: None,
        },
    );
    let me = myself.clone();
    let me2 = myself.clone();
    let me3 = myself.clone();
    let (adopt_key, adopt_name) = (key.clone(), name.clone());
    let ctx = s.ctx.clone();
    let end_key = key.clone();
    let end_name = name.clone();
    let args = DestArgs {
        machine: DestMachine::new(super::now(), offer, lanes),
        writer,
        reader,
        factory: s.factory.clone(),
        host: s.ctx.name.clone(),
        peer: peer.clone(),
        announce: Box::new(move |mac| announce(&me2, &ctx, mac)),
        adopt: Box::new(move |actor, generation, running| {
            let (reply, answer) = oneshot::channel();
            let _ = me3.cast(HostMsg::Adopt {
                key: adopt_key.clone(),
                vm: adopt_name.clone(),
                actor,
                generation,
                running,
                reply,
            });
            answer
        }),
        on_end: Box::new(move |end, report| {
            let _ = me.cast(HostMsg::IncomingEnded {
                key: end_key,
                vm: end_name,
                end,
                report: Box::new(report),
            });
        }),
    };
    match Actor::spawn(None, MigrationDestination::default(), args).await {
        Ok((dest, _)) => {
            s.incoming.insert(key, dest);
        }
        Err(e) => {
            tracing::error!("spawning a migration destination: {e}");
            s.vms.remove(&name);
        }
    }
}

/// An outgoing migration, started and waiting for its report.
struct MigrationTask {
    id: u64,
    report: oneshot::Receiver<crate::migration::MigrationReport>,
    progress: mpsc::UnboundedReceiver<crate::migration::Progress>,
}

impl MigrationTask {
    async fn run(mut self, reply: mpsc::UnboundedSender<ClientReply>) {
        loop {
            tokio::select! {
                p = self.progress.recv() => match p {
                    Some(p) => { let _ = reply.send(ClientReply::Progress(p)); }
                    None => break,
                },
                r = &mut self.report => {
                    let _ = reply.send(match r {
                        Ok(report) => ClientReply::Report(report),
                        Err(_) => ClientReply::Error("the migration actor died".into()),
                    });
                    return;
                }
            }
        }
        let _ = reply.send(match self.report.await {
            Ok(report) => ClientReply::Report(report),
            Err(_) => ClientReply::Error("the migration actor died".into()),
        });
    }
}

async fn start_migration<T: Transport>(
    myself: &ActorRef<HostMsg<T>>,
    s: &mut HostState<T>,
    name: &str,
    to: &str,
    options: &MigrateOptions,
) -> Result<MigrationTask, NodeError> {
    let weight = crate::ops::share::weight(options.priority);
    let options = options.to_options();
    options.check().map_err(NodeError::BadRequest)?;
    let options_storage = options.storage.clone();
    if let Some(m) = &options_storage
        && s.vms.get(name).is_some_and(|e| e.disks.is_empty())
    {
        return Err(NodeError::BadRequest(format!(
            "{name} has no disks to move to {}",
            m.datastore
        )));
    }
    if to == s.ctx.name {
        return Err(NodeError::BadRequest(format!(
            "{name} already lives on {to}"
        )));
    }
    let vm = s.vm(name)?;
    let conn = s.ctx.link(to).await?;
    let (mut config, generation, running) = call(&vm, VmMsg::BeginMigration).await?;
    // The host knows where the disks are now (a storage move or an
    // earlier migration may have moved them); the VM actor's copy of the
    // definition does not follow them.
    if let Some(entry) = s.vms.get(name) {
        config.disks = entry.config.disks.clone();
    }
    if running == options.cold {
        let _ = vm.cast(VmMsg::MigrationAborted);
        return Err(NodeError::BadRequest(if options.cold {
            format!("{name} is running; stop it for a cold migration")
        } else {
            format!("{name} is stopped; use a cold migration")
        }));
    }
    let ram = with_guest(&vm, |g| g.ram()).await?;
    let id = s.next_migration_id;
    s.next_migration_id += 1;
    let machine = SourceMachine::new(
        id,
        config,
        generation,
        s.ctx.name.clone(),
        to.to_owned(),
        options,
    );
    let (done_tx, done_rx) = oneshot::channel();
    let (progress_tx, progress_rx) = mpsc::unbounded_channel();
    s.metrics
        .started(id, name, to, crate::migration::Progress::phase("offer"));
    let me_end = myself.clone();
    let me = myself.clone();
    let ctx = s.ctx.clone();
    let dest = to.to_owned();
    let (ctx2, dest2) = (ctx.clone(), dest.clone());
    let redial: super::source::Redial<Conn<T>> = Arc::new(move || {
        let ctx = ctx.clone();
        let dest = dest.clone();
        Box::pin(async move {
            ctx.drop_link(&dest).await;
            ctx.link(&dest).await.map_err(|e| e.to_string())
        })
    });
    let dial_more: super::source::Redial<Conn<T>> = Arc::new(move || {
        let ctx = ctx2.clone();
        let dest = dest2.clone();
        Box::pin(async move { ctx.dial(&dest).await.map_err(|e| e.to_string()) })
    });
    let entry = &s.vms[name];
    let copies_disks = options_storage.is_some() && !entry.config.disks.is_empty();
    let home_ds = entry.config.disks.first().map(|d| d.datastore.clone());
    let stores = s.stores.clone();
    let vm_name = name.to_owned();
    let home = match home_ds {
        Some(ds) => {
            super::offload(move || {
                let mut files = Vec::new();
                for p in stores.list(&ds, &vm_name).unwrap_or_default() {
                    if crate::node::overlay::is_disk_file(&p) {
                        continue;
                    }
                    if let Ok(bytes) = stores.read_file(&ds, &p) {
                        files.push(crate::storage::remote::HomeFile { path: p, bytes });
                    }
                }
                files
            })
            .await
        }
        None => Vec::new(),
    };
    let me_reopen = myself.clone();
    let reopen_name = name.to_owned();
    let vm_disks = MigratingDisks::new(
        s.vms[name].disks.clone(),
        options_storage,
        home,
        s.stores.clone(),
        conn.clone(),
        redial.clone(),
        Box::new(move || {
            let _ = me_reopen.cast(HostMsg::ReopenDisks(reopen_name.clone()));
        }),
    );
    let flow = s.ctx.shares.join(to, id, weight);
    let args = SourceArgs {
        flow,
        machine,
        vm: vm.clone(),
        ram,
        conn,
        progress: Some(progress_tx),
        done: done_tx,
        on_vm_left: Box::new(move |name| {
            let _ = me.cast(HostMsg::VmLeft(name));
        }),
        redial,
        dial_more,
        disks: vm_disks,
        metrics: s.metrics.clone(),
        on_end: Box::new(move |report| {
            let _ = me_end.cast(HostMsg::SourceEnded(Box::new(report)));
        }),
    };
    // Durable before the offer goes out: a restart must know the VM may
    // be handed over, and ask before it runs it again (and whether its
    // files here go if it did).
    if copies_disks && let Err(e) = leftovers::record(s, name, id) {
        let _ = vm.cast(VmMsg::MigrationAborted);
        return Err(e);
    }
    if let Some(entry) = s.vms.get_mut(name) {
        entry.leaving = Some((to.to_owned(), id));
    }
    if let Err(e) = inventory::persist(s, name, Some(running)).await {
        if let Some(entry) = s.vms.get_mut(name) {
            entry.leaving = None;
        }
        let _ = vm.cast(VmMsg::MigrationAborted);
        return Err(e);
    }
    match Actor::spawn(None, MigrationSource::default(), args).await {
        Ok((source, _)) => {
            s.running.insert(id, source.clone());
            s.outgoing
                .retain(|c| c.get_status() != ractor::ActorStatus::Stopped);
            s.outgoing.push(source.get_cell());
        }
        Err(e) => {
            if let Some(entry) = s.vms.get_mut(name) {
                entry.leaving = None;
            }
            inventory::persist_or_log(s, name, Some(running)).await;
            let _ = vm.cast(VmMsg::MigrationAborted);
            return Err(NodeError::Gone(format!("migration actor ({e})")));
        }
    }
    Ok(MigrationTask {
        id,
        report: done_rx,
        progress: progress_rx,
    })
}

/// Starts a host with a store in memory and the default budgets: its
/// actor, and the accept loop serving `ctx`'s transport.
pub async fn start_host<T: Transport>(
    ctx: Arc<NodeCtx<T>>,
    capacity: Capacity,
    factory: Arc<dyn GuestFactory>,
    stores: Arc<dyn Datastores>,
) -> Result<ActorRef<HostMsg<T>>, NodeError> {
    start_host_with(
        ctx,
        capacity,
        factory,
        stores,
        Arc::new(crate::ops::store::MemStore::new()),
        crate::ops::jobs::Budgets::default(),
    )
    .await
}

/// Starts a host that keeps its state in `store` (and reads back what
/// is there) and schedules within `budgets`.
pub async fn start_host_with<T: Transport>(
    ctx: Arc<NodeCtx<T>>,
    capacity: Capacity,
    factory: Arc<dyn GuestFactory>,
    stores: Arc<dyn Datastores>,
    store: Arc<dyn crate::ops::store::NodeStore>,
    budgets: crate::ops::jobs::Budgets,
) -> Result<ActorRef<HostMsg<T>>, NodeError> {
    budgets.check().map_err(NodeError::BadRequest)?;
    let (host, _) = Actor::spawn(
        None,
        HostActor::default(),
        HostArgs {
            ctx: ctx.clone(),
            capacity,
            factory,
            stores,
            store,
            budgets,
        },
    )
    .await
    .map_err(|e| NodeError::Gone(format!("host actor ({e})")))?;
    tokio::spawn(super::net::serve(ctx, host.clone()));
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::first_migration_id;

    #[test]
    fn migration_ids_differ_between_hosts_started_together_and_between_lives() {
        let a = first_migration_id("host-a", 1_764_633_600);
        let b = first_migration_id("host-b", 1_764_633_600);
        let a_again = first_migration_id("host-a", 1_764_633_601);
        assert_ne!(a, b);
        assert_ne!(a, a_again);
        // A life's ids run up from its first without reaching another life's.
        assert!(a_again - a >= 1 << 20 || a - a_again >= 1 << 20);
    }
}
