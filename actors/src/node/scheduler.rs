//! `SchedulerActor`: one per node. Every migration leaving the node is a
//! job in its [`JobQueue`]: it waits for its start time and for a slot in
//! the concurrency budgets, most urgent first, then runs through the host
//! (the [`JobRunner`]). Jobs are written to the node store at every change,
//! so queued and scheduled jobs survive a restart.
//!
//! A job with a start time (any, even a past one) is answered at once with
//! [`ClientReply::JobQueued`]. A client that submitted a job without a
//! start time waits on it: it gets
//! a `queued` progress line while the job waits for a slot, then the
//! migration's progress and report. Jobs nobody waits on (scheduled ones,
//! evacuations) write their outcome to the audit log themselves.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::mpsc;

use super::client::ClientReply;
use crate::migration::{Outcome, Progress};
use crate::ops::audit::AuditEntry;
use crate::ops::jobs::{Budgets, Footprint, Job, JobQueue, JobState};
use crate::ops::store::NodeStore;
use crate::ops::unix_ms_now;

/// A boxed future, as the runner returns them.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What the scheduler needs of its host.
pub trait JobRunner: Send + Sync {
    /// Resolves the job's destination (`auto`: placement) and says what
    /// it will hold while it runs.
    fn prepare(&self, job: &Job) -> BoxFuture<Result<Footprint, String>>;
    /// Starts the job's migration to `job.to`; its replies (progress, then
    /// the report or an error) go to `replies`. Returns the migration id.
    fn run(
        &self,
        job: &Job,
        replies: mpsc::UnboundedSender<ClientReply>,
    ) -> BoxFuture<Result<u64, String>>;
    /// Cancels a running migration; the answer goes to `reply`.
    fn cancel(&self, migration_id: u64, who: String, reply: mpsc::UnboundedSender<ClientReply>);
}

/// Messages to a [`SchedulerActor`].
pub enum SchedulerMsg {
    /// Queue a job; `waiter` (if any) gets its progress and report.
    Submit {
        /// The job (its id is assigned here).
        job: Box<Job>,
        /// Who waits on it.
        waiter: Option<mpsc::UnboundedSender<ClientReply>>,
    },
    /// Queue jobs and answer [`ClientReply::Evacuated`] when all are over.
    Evacuate {
        /// The jobs.
        jobs: Vec<Job>,
        /// Who waits.
        reply: mpsc::UnboundedSender<ClientReply>,
    },
    /// Call off a job.
    Cancel {
        /// The job.
        id: u64,
        /// Who asks.
        who: String,
        /// Ok, or why not.
        reply: mpsc::UnboundedSender<ClientReply>,
    },
    /// Every job kept.
    List(RpcReplyPort<Vec<Job>>),
    /// Most jobs that ran at once, and jobs running now.
    Peak(RpcReplyPort<(usize, usize)>),
    /// Look for jobs to start.
    Tick,
    /// A job's destination and footprint are known.
    Prepared(u64, Result<Footprint, String>),
    /// A job's migration started (its id) or could not.
    Started(u64, Result<u64, String>),
    /// A job's migration ended with this final reply.
    Ended(u64, Box<ClientReply>),
}

/// What a scheduler is started with.
pub struct SchedulerArgs {
    /// The host's name (audit entries).
    pub host: String,
    /// Where jobs and audit entries go.
    pub store: Arc<dyn NodeStore>,
    /// The limits.
    pub budgets: Budgets,
    /// The host's side.
    pub runner: Arc<dyn JobRunner>,
    /// How often to look for due jobs.
    pub tick: Duration,
}

/// The scheduler actor.
pub struct SchedulerActor;

struct Evacuation {
    jobs: BTreeSet<u64>,
    reply: mpsc::UnboundedSender<ClientReply>,
}

/// The actor's state.
pub struct SchedulerState {
    host: String,
    store: Arc<dyn NodeStore>,
    runner: Arc<dyn JobRunner>,
    queue: JobQueue,
    preparing: BTreeSet<u64>,
    prepared: BTreeMap<u64, Footprint>,
    waiters: BTreeMap<u64, mpsc::UnboundedSender<ClientReply>>,
    /// What each waiting job was last told about its wait.
    told: BTreeMap<u64, String>,
    /// Jobs whose destination was busy, and the ticks they still wait.
    held: BTreeMap<u64, u32>,
    /// Offers each job made that a busy destination turned away.
    busy_offers: BTreeMap<u64, u32>,
    evacuations: Vec<Evacuation>,
}

impl Actor for SchedulerActor {
    type Msg = SchedulerMsg;
    type State = SchedulerState;
    type Arguments = SchedulerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SchedulerMsg>,
        args: SchedulerArgs,
    ) -> Result<SchedulerState, ActorProcessingErr> {
        let mut queue = JobQueue::new(args.budgets);
        let stored = args.store.load().map(|s| s.jobs).unwrap_or_else(|e| {
            tracing::error!("reading the jobs back: {e}");
            Vec::new()
        });
        let interrupted = queue.restore(
            stored,
            unix_ms_now(),
            "the node stopped while it ran; the VM's fate was settled with the destination on restart",
        );
        for job in &interrupted {
            put(&args.store, job);
        }
        myself.send_interval(args.tick, || SchedulerMsg::Tick);
        Ok(SchedulerState {
            host: args.host,
            store: args.store,
            runner: args.runner,
            queue,
            preparing: BTreeSet::new(),
            prepared: BTreeMap::new(),
            waiters: BTreeMap::new(),
            told: BTreeMap::new(),
            held: BTreeMap::new(),
            busy_offers: BTreeMap::new(),
            evacuations: Vec::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SchedulerMsg>,
        msg: SchedulerMsg,
        s: &mut SchedulerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SchedulerMsg::Submit { job, waiter } => {
                let job = s.queue.submit(*job);
                put(&s.store, &job);
                tracing::info!(job = job.id, vm = %job.vm, to = %job.to, priority = %job.priority, "job queued");
                if let Some(w) = waiter {
                    if job.not_before_unix_ms > 0 {
                        let _ = w.send(ClientReply::JobQueued(job));
                    } else {
                        s.waiters.insert(job.id, w);
                    }
                }
                dispatch(&myself, s);
            }
            SchedulerMsg::Evacuate { jobs, reply } => {
                let mut ids = BTreeSet::new();
                for job in jobs {
                    let job = s.queue.submit(job);
                    put(&s.store, &job);
                    ids.insert(job.id);
                }
                s.evacuations.push(Evacuation { jobs: ids, reply });
                settle_evacuations(s);
                dispatch(&myself, s);
            }
            SchedulerMsg::Cancel { id, who, reply } => cancel(s, id, who, reply),
            SchedulerMsg::List(reply) => {
                let _ = reply.send(s.queue.list());
            }
            SchedulerMsg::Peak(reply) => {
                let _ = reply.send((s.queue.peak_running(), s.queue.running()));
            }
            SchedulerMsg::Tick => {
                s.held.retain(|_, ticks| {
                    *ticks -= 1;
                    *ticks > 0
                });
                dispatch(&myself, s);
            }
            SchedulerMsg::Prepared(id, result) => {
                s.preparing.remove(&id);
                match result {
                    Ok(fp) => {
                        s.prepared.insert(id, fp);
                        dispatch(&myself, s);
                    }
                    Err(why) => end(
                        s,
                        id,
                        JobState::Failed,
                        why.clone(),
                        ClientReply::Error(why),
                    ),
                }
            }
            SchedulerMsg::Started(id, result) => match result {
                Ok(migration_id) => {
                    if let Some(job) = s.queue.set_migration(id, migration_id) {
                        put(&s.store, job);
                    }
                }
                Err(why) => end(
                    s,
                    id,
                    JobState::Failed,
                    why.clone(),
                    ClientReply::Error(why),
                ),
            },
            SchedulerMsg::Ended(id, reply) => {
                let offers = s.busy_offers.get(&id).copied().unwrap_or(0);
                match destination_busy(&reply) {
                    Some(why) if offers < BUSY_OFFERS_MAX => hold(s, id, why),
                    Some(why) => {
                        let why =
                            format!("the destination stayed busy through {offers} offers: {why}");
                        end(s, id, JobState::Failed, why, *reply);
                    }
                    None => {
                        let (state, result) = judge(&reply);
                        end(s, id, state, result, *reply);
                    }
                }
                dispatch(&myself, s);
            }
        }
        Ok(())
    }
}

/// Ticks a job waits after its destination said it was busy.
const BUSY_HOLD_TICKS: u32 = 5;

/// Offers a job makes to a busy destination before it fails (about ten
/// minutes at the default tick).
const BUSY_OFFERS_MAX: u32 = 600;

/// Why the destination refused for now (at its budget), if it did.
fn destination_busy(reply: &ClientReply) -> Option<String> {
    match reply {
        ClientReply::Report(r) => match &r.outcome {
            Outcome::Aborted { reason } if reason.contains(crate::migration::Refusal::BUSY) => {
                Some(reason.clone())
            }
            _ => None,
        },
        _ => None,
    }
}

/// Queues job `id` again, held for [`BUSY_HOLD_TICKS`]: its destination
/// runs all the migrations its budgets allow.
fn hold(s: &mut SchedulerState, id: u64, why: String) {
    s.told.remove(&id);
    if let Some(job) = s.queue.retry(id, format!("waiting: {why}")) {
        put(&s.store, &job.clone());
        tracing::info!(job = id, %why, "destination busy: the job waits");
    }
    s.held.insert(id, BUSY_HOLD_TICKS);
    *s.busy_offers.entry(id).or_default() += 1;
    tell_waiting(s, id, &format!("destination busy: {why}"));
}

fn put(store: &Arc<dyn NodeStore>, job: &Job) {
    if let Err(e) = store.put_job(job) {
        tracing::error!(job = job.id, "storing a job: {e}");
    }
}

/// The job's final state and a line about it, from its final reply.
fn judge(reply: &ClientReply) -> (JobState, String) {
    match reply {
        ClientReply::Report(r) => match &r.outcome {
            Outcome::Completed => (
                JobState::Done,
                format!(
                    "moved to {} in {:.0} ms, {:.1} ms downtime",
                    r.to, r.total_ms, r.downtime_ms
                ),
            ),
            Outcome::Aborted { reason } if reason.contains("cancelled") => {
                (JobState::Cancelled, reason.clone())
            }
            Outcome::Aborted { reason } => (JobState::Failed, format!("aborted: {reason}")),
            Outcome::InDoubt { reason } => (JobState::Failed, format!("in doubt: {reason}")),
        },
        ClientReply::Error(e) => (JobState::Failed, e.clone()),
        other => (JobState::Failed, format!("unexpected reply {other:?}")),
    }
}

fn cancel(s: &mut SchedulerState, id: u64, who: String, reply: mpsc::UnboundedSender<ClientReply>) {
    match s.queue.get(id).map(|j| (j.state.clone(), j.migration_id)) {
        Some((JobState::Running, 0)) => {
            let _ = reply.send(ClientReply::Error(format!(
                "job {id} is starting its migration; try again in a moment"
            )));
        }
        Some((JobState::Running, migration_id)) => s.runner.cancel(migration_id, who, reply),
        _ => match s.queue.cancel(id, unix_ms_now(), &who) {
            Ok(job) => {
                let job = job.clone();
                put(&s.store, &job);
                s.prepared.remove(&id);
                if let Some(w) = s.waiters.remove(&id) {
                    let _ = w.send(ClientReply::Error(job.result.clone()));
                }
                settle_evacuations(s);
                let _ = reply.send(ClientReply::Ok);
            }
            Err(why) => {
                let _ = reply.send(ClientReply::Error(why));
            }
        },
    }
}

/// Starts every due job that fits, most urgent first.
fn dispatch(myself: &ActorRef<SchedulerMsg>, s: &mut SchedulerState) {
    let budgets = s.queue.budgets();
    for id in s.queue.due(unix_ms_now()) {
        if s.preparing.contains(&id) || s.held.contains_key(&id) {
            continue;
        }
        let Some(job) = s.queue.get(id).cloned() else {
            continue;
        };
        if let Some(fp) = s.prepared.get(&id).cloned() {
            match s.queue.fits(&fp) {
                Ok(()) => start(myself, s, id, fp),
                Err(why) => tell_waiting(s, id, &why),
            }
            continue;
        }
        // Resolve the destination only for jobs a host slot is free for,
        // so that placement sees the migrations started before.
        if s.queue.running() + s.preparing.len() >= budgets.host_live as usize {
            tell_waiting(s, id, "host budget: every slot is taken");
            continue;
        }
        s.preparing.insert(id);
        let prepare = s.runner.prepare(&job);
        let me = myself.clone();
        tokio::spawn(async move {
            let _ = me.cast(SchedulerMsg::Prepared(id, prepare.await));
        });
    }
}

fn tell_waiting(s: &mut SchedulerState, id: u64, why: &str) {
    if s.told.get(&id).is_some_and(|t| t == why) {
        return;
    }
    s.told.insert(id, why.to_owned());
    if let Some(w) = s.waiters.get(&id) {
        let _ = w.send(ClientReply::Progress(Progress::phase(format!(
            "queued ({why})"
        ))));
    }
}

fn start(myself: &ActorRef<SchedulerMsg>, s: &mut SchedulerState, id: u64, fp: Footprint) {
    s.prepared.remove(&id);
    s.told.remove(&id);
    let Some(job) = s.queue.start(id, fp, unix_ms_now()).cloned() else {
        return;
    };
    put(&s.store, &job);
    tracing::info!(job = id, vm = %job.vm, to = %job.to, "job starts");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let run = s.runner.run(&job, tx);
    let waiter = s.waiters.get(&id).cloned();
    let me = myself.clone();
    tokio::spawn(async move {
        let started = run.await;
        let failed = started.is_err();
        let _ = me.cast(SchedulerMsg::Started(id, started));
        if failed {
            return;
        }
        while let Some(reply) = rx.recv().await {
            if matches!(reply, ClientReply::Progress(_)) {
                if let Some(w) = &waiter {
                    let _ = w.send(reply);
                }
            } else {
                let _ = me.cast(SchedulerMsg::Ended(id, Box::new(reply)));
                return;
            }
        }
        let _ = me.cast(SchedulerMsg::Ended(
            id,
            Box::new(ClientReply::Error(
                "the migration ended without a report".into(),
            )),
        ));
    });
}

fn end(s: &mut SchedulerState, id: u64, state: JobState, result: String, reply: ClientReply) {
    s.prepared.remove(&id);
    s.told.remove(&id);
    s.busy_offers.remove(&id);
    let Some(job) = s.queue.finish(id, state, result, unix_ms_now()).cloned() else {
        return;
    };
    put(&s.store, &job);
    tracing::info!(job = id, vm = %job.vm, state = ?job.state, result = %job.result, "job over");
    // A job nobody hears the end of (its client left) is audited here.
    let unheard = match s.waiters.remove(&id) {
        Some(w) => w.send(reply).err().map(|e| e.0),
        None => Some(reply),
    };
    if let Some(reply) = unheard {
        audit_unattended(s, &job, &reply);
    }
    settle_evacuations(s);
}

/// Records a job nobody waited on (the request that queued it was
/// audited when it was made).
fn audit_unattended(s: &SchedulerState, job: &Job, reply: &ClientReply) {
    let downtime_ms = match reply {
        ClientReply::Report(r) if r.completed() => Some(r.downtime_ms),
        _ => None,
    };
    let entry = AuditEntry {
        at_unix_ms: job.started_unix_ms.max(job.submitted_unix_ms),
        node: s.host.clone(),
        who: format!("scheduler (job {} for {})", job.id, job.submitted_by),
        action: "migrate".into(),
        vm: job.vm.clone(),
        from: s.host.clone(),
        to: job.to.clone(),
        duration_ms: job
            .ended_unix_ms
            .saturating_sub(job.started_unix_ms.max(job.submitted_unix_ms)),
        downtime_ms,
        outcome: match job.state {
            JobState::Done => "ok".into(),
            JobState::Cancelled => "cancelled".into(),
            _ => "failed".into(),
        },
        detail: job.result.clone(),
        read: false,
    };
    if let Err(e) = s.store.append_audit(&entry) {
        tracing::error!("writing the audit log: {e}");
    }
}

fn settle_evacuations(s: &mut SchedulerState) {
    let queue = &s.queue;
    s.evacuations.retain(|e| {
        let jobs: Vec<Job> = e
            .jobs
            .iter()
            .filter_map(|id| queue.get(*id).cloned())
            .collect();
        if jobs.iter().all(|j| j.state.is_final()) {
            let _ = e.reply.send(ClientReply::Evacuated(jobs));
            false
        } else {
            true
        }
    });
}
