//! `MigrationSource`: pumps a [`SourceMachine`] against the VM actor, the
//! control stream and the lanes.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ferry_transport::{Connection, FrameKind, FrameReader, FrameWriter};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use super::lanes::{self, LaneJob};
use super::trace::{self, PhaseSpans};
use super::vm::{VmMsg, with_guest};
use super::{now, open_stream};
use crate::migration::{
    DestMsg, MigrationReport, Outcome, Progress, SourceAction, SourceEvent, SourceMachine,
    StreamIntro,
};
use crate::ram::GuestRam;

/// How often the source checks its deadlines.
const TICK: Duration = Duration::from_millis(50);

/// Messages to a [`MigrationSource`].
pub enum SourcePump {
    /// A message from the destination.
    Peer(DestMsg),
    /// The control stream or a lane failed.
    Failed(String),
    /// Check deadlines.
    Tick,
    /// The paused memory's hash, computed off the pump.
    Hashed(u64),
    /// The destination said whether it took the VM.
    Resolved(bool),
    /// The question could not be asked.
    ResolveFailed(String),
    /// Every disk copy has converged.
    StorageConverged,
    /// An operator asks about a migration in doubt (`vm recover`): ask the
    /// destination again now, or with `force` fence its copy and take the
    /// VM back. The answer says whether the migration was in doubt.
    Recover {
        /// Fence instead of asking.
        force: bool,
        /// Who (certificate name).
        who: String,
        /// Ok, or why not.
        reply: ractor::RpcReplyPort<Result<(), String>>,
    },
    /// An operator calls the migration off; the answer says whether it
    /// was still possible.
    Cancel {
        /// Who (certificate name).
        who: String,
        /// Ok, or why not.
        reply: ractor::RpcReplyPort<Result<(), String>>,
    },
}

/// Dials the destination afresh (for asking how a migration ended, or for
/// more lanes).
pub type Redial<C> = std::sync::Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<C, String>> + Send>>
        + Send
        + Sync,
>;

/// What a [`MigrationSource`] is started with.
pub struct SourceArgs<C: Connection> {
    /// The protocol.
    pub machine: SourceMachine,
    /// The VM being moved.
    pub vm: ActorRef<VmMsg>,
    /// Its memory.
    pub ram: GuestRam,
    /// The link to the destination.
    pub conn: C,
    /// Progress goes here.
    pub progress: Option<mpsc::UnboundedSender<Progress>>,
    /// The report goes here.
    pub done: oneshot::Sender<MigrationReport>,
    /// Called with the VM's name once the destination runs it.
    pub on_vm_left: Box<dyn FnOnce(String) + Send>,
    /// A fresh connection to the destination.
    pub redial: Redial<C>,
    /// Another connection to the destination, beside `conn` (which stays
    /// up): for lanes.
    pub dial_more: Redial<C>,
    /// The VM's disks.
    pub disks: super::vm_disks::MigratingDisks<C>,
    /// The node's metrics (progress of running migrations).
    pub metrics: std::sync::Arc<super::metrics::NodeMetrics>,
    /// Called once with the report, when the migration ended.
    pub on_end: Box<dyn FnOnce(MigrationReport) + Send>,
    /// Its share of the link to the destination (lanes take turns).
    pub flow: super::share::Flow,
}

/// The source of one migration.
pub struct MigrationSource<C>(PhantomData<fn() -> C>);

impl<C> Default for MigrationSource<C> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

/// The actor's state.
pub struct SourceState<C: Connection> {
    machine: SourceMachine,
    vm: ActorRef<VmMsg>,
    ram: GuestRam,
    conn: C,
    writer: Option<FrameWriter<C::Send>>,
    lanes: Vec<mpsc::UnboundedSender<LaneJob>>,
    progress: Option<mpsc::UnboundedSender<Progress>>,
    done: Option<oneshot::Sender<MigrationReport>>,
    on_vm_left: Option<Box<dyn FnOnce(String) + Send>>,
    vm_name: String,
    migration_id: u64,
    redial: Redial<C>,
    dial_more: Redial<C>,
    /// Connections dialled for lanes, held for the migration's life (a
    /// connection whose every handle is gone may close under its streams).
    lane_links: Vec<C>,
    disks: super::vm_disks::MigratingDisks<C>,
    /// One span per phase, under the migration's root span.
    spans: Option<PhaseSpans>,
    metrics: std::sync::Arc<super::metrics::NodeMetrics>,
    on_end: Option<Box<dyn FnOnce(MigrationReport) + Send>>,
    /// Opened with the first clean-up action after the end.
    cleanup: Option<tracing::Span>,
    flow: super::share::Flow,
    /// Wire bytes the lanes have handed to their streams so far.
    sent: std::sync::Arc<AtomicU64>,
    /// The guest is paused for the switchover.
    paused: bool,
}

impl<C: Connection> Actor for MigrationSource<C> {
    type Msg = SourcePump;
    type State = SourceState<C>;
    type Arguments = SourceArgs<C>;

    async fn pre_start(
        &self,
        _myself: ActorRef<SourcePump>,
        args: SourceArgs<C>,
    ) -> Result<SourceState<C>, ActorProcessingErr> {
        let mut machine = args.machine;
        let vm_name = machine.offer().vm.name.clone();
        let migration_id = machine.offer().migration_id;
        let root = tracing::info_span!(
            parent: None,
            "migration",
            migration.id = %crate::migration::report::show_id(migration_id),
            vm = %vm_name,
            from = machine.hosts().0,
            to = machine.hosts().1,
            cold = machine.offer().cold,
        );
        machine.set_trace_parent(trace::traceparent(&root));
        Ok(SourceState {
            machine,
            vm: args.vm,
            ram: args.ram,
            conn: args.conn,
            writer: None,
            lanes: Vec::new(),
            progress: args.progress,
            done: Some(args.done),
            on_vm_left: Some(args.on_vm_left),
            vm_name,
            migration_id,
            redial: args.redial,
            dial_more: args.dial_more,
            lane_links: Vec::new(),
            disks: args.disks,
            spans: Some(PhaseSpans::new(root)),
            metrics: args.metrics,
            on_end: Some(args.on_end),
            cleanup: None,
            flow: args.flow,
            sent: std::sync::Arc::new(AtomicU64::new(0)),
            paused: false,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<SourcePump>,
        s: &mut SourceState<C>,
    ) -> Result<(), ActorProcessingErr> {
        myself.send_interval(TICK, || SourcePump::Tick);
        match open_stream(&s.conn, &StreamIntro::Migration).await {
            Ok((writer, reader)) => {
                s.writer = Some(writer);
                tokio::spawn(read_control(reader, myself.clone()));
                s.machine.start(now());
            }
            Err(e) => {
                s.machine.start(now());
                s.machine
                    .handle_failure(now(), format!("opening the control stream: {e}"));
            }
        }
        pump(&myself, s).await;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<SourcePump>,
        msg: SourcePump,
        s: &mut SourceState<C>,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SourcePump::Peer(m) => s.machine.handle_message(now(), m),
            SourcePump::Failed(why) => s.machine.handle_failure(now(), why),
            SourcePump::Tick => {
                let sent = s.sent.load(Ordering::Relaxed);
                s.machine.handle_data_sent(sent);
                s.machine.handle_rtt(now(), s.conn.rtt());
                s.machine.handle_loss(s.conn.loss_rate());
                s.machine.handle_timeout(now());
            }
            SourcePump::Hashed(hash) => s.machine.handle_memory_hash(now(), hash),
            SourcePump::Resolved(committed) => s.machine.handle_resolution(now(), committed),
            SourcePump::ResolveFailed(why) => s.machine.handle_resolution_failed(now(), why),
            SourcePump::StorageConverged => s.machine.handle_storage_converged(now()),
            SourcePump::Recover { force, who, reply } => {
                let answer = if force {
                    s.machine.handle_fence(now(), &who)
                } else if s.machine.handle_ask_now(now()) {
                    Ok(())
                } else {
                    Err("the migration is not in doubt".into())
                };
                tracing::info!(migration = s.migration_id, %who, force, ?answer, "recover");
                let _ = reply.send(answer);
            }
            SourcePump::Cancel { who, reply } => {
                let answer = s.machine.handle_cancel(now(), &who);
                tracing::info!(migration = s.migration_id, %who, ?answer, "cancel");
                let _ = reply.send(answer);
            }
        }
        pump(&myself, s).await;
        Ok(())
    }
}

async fn read_control<R: ferry_transport::RecvStream>(
    mut reader: FrameReader<R>,
    myself: ActorRef<SourcePump>,
) {
    loop {
        match reader.read_message::<DestMsg>(FrameKind::Control).await {
            Ok(m) => {
                if myself.cast(SourcePump::Peer(m)).is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = myself.cast(SourcePump::Failed(format!("control stream: {e}")));
                return;
            }
        }
    }
}

/// Carries out the machine's actions until it has none, then reports.
async fn pump<C: Connection>(myself: &ActorRef<SourcePump>, s: &mut SourceState<C>) {
    sync_spans(s);
    while let Some(action) = s.machine.poll_action() {
        let name = action_name(&action);
        let started = now();
        if s.machine.is_done() && s.cleanup.is_none() {
            let root = s.spans.as_ref().map(|t| t.root().clone());
            s.cleanup = root.map(|root| {
                tracing::info_span!(parent: &root, "migration.phase", otel.name = "cleanup", phase = "cleanup")
            });
        }
        let span = s
            .spans
            .as_ref()
            .map_or_else(tracing::Span::none, |t| t.root().clone());
        let result = perform(myself, s, action).instrument(span).await;
        tracing::debug!(
            migration = s.migration_id,
            action = name,
            ms = (now() - started).as_secs_f64() * 1e3,
            "source action"
        );
        if let Err(why) = result {
            s.machine.handle_failure(now(), why);
        }
        sync_spans(s);
    }
    while let Some(event) = s.machine.poll_event() {
        match event {
            SourceEvent::Progress(p) => {
                let to = s.machine.hosts().1;
                s.metrics
                    .progress(s.migration_id, &s.vm_name, to, p.clone());
                if let Some(tx) = &s.progress {
                    let _ = tx.send(p);
                }
            }
            SourceEvent::Finished(mut report) => {
                s.flow.set_urgent(false);
                for link in s.lane_links.drain(..) {
                    link.close("migration ended");
                }
                report.started_unix_ms = crate::migration::report::unix_ms_ago(report.total_ms);
                s.cleanup.take();
                if let Some(spans) = s.spans.take() {
                    trace::set_attributes(spans.root(), report_attributes(&report));
                    let root = spans.root().clone();
                    let _entered = root.enter();
                    spans.finish(s.machine.timeline());
                }
                tracing::info!(
                    migration = s.migration_id,
                    vm = %s.vm_name,
                    outcome = ?report.outcome,
                    total_ms = report.total_ms,
                    downtime_ms = report.downtime_ms,
                    "migration ended"
                );
                match report.outcome {
                    Outcome::Aborted { .. } => {
                        let _ = s.vm.cast(VmMsg::MigrationAborted);
                    }
                    Outcome::InDoubt { .. } => {
                        let _ = s.vm.cast(VmMsg::Released);
                    }
                    Outcome::Completed => {}
                }
                if let Some(on_end) = s.on_end.take() {
                    on_end((*report).clone());
                }
                if let Some(done) = s.done.take() {
                    let _ = done.send(*report);
                }
                myself.stop(None);
            }
        }
    }
}

fn sync_spans<C: Connection>(s: &mut SourceState<C>) {
    if let Some(spans) = s.spans.as_mut() {
        spans.sync(s.machine.timeline());
    }
}

/// The report's headline figures, as attributes of the root span.
fn report_attributes(report: &MigrationReport) -> Vec<opentelemetry::KeyValue> {
    use opentelemetry::KeyValue;
    let outcome = match &report.outcome {
        Outcome::Completed => "completed".to_owned(),
        Outcome::Aborted { reason } => format!("aborted: {reason}"),
        Outcome::InDoubt { reason } => format!("in doubt: {reason}"),
    };
    let bytes = i64::try_from(report.bytes_sent).unwrap_or(i64::MAX);
    vec![
        KeyValue::new("outcome", outcome),
        KeyValue::new("total_ms", report.total_ms),
        KeyValue::new("downtime_ms", report.downtime_ms),
        KeyValue::new("predicted_downtime_ms", report.predicted_downtime_ms),
        KeyValue::new("bytes_sent", bytes),
        KeyValue::new("rounds", i64::from(report.rounds)),
        KeyValue::new(
            "throttle_max_percent",
            i64::from(report.throttle_max_percent),
        ),
    ]
}

fn action_name(action: &SourceAction) -> &'static str {
    match action {
        SourceAction::Send(_) => "send",
        SourceAction::StartDirtyLog => "start dirty log",
        SourceAction::SendRound { .. } => "send round",
        SourceAction::CollectDirty => "collect dirty",
        SourceAction::SetThrottle(_) => "throttle",
        SourceAction::Pause => "pause",
        SourceAction::SaveState => "save state",
        SourceAction::HashMemory => "hash memory",
        SourceAction::StopDirtyLog => "stop dirty log",
        SourceAction::ReleaseOwnership { .. } => "release",
        SourceAction::ResumeLocal => "resume here",
        SourceAction::Fence { .. } => "fence",
        SourceAction::FreeVm => "free",
        SourceAction::AskOutcome => "ask outcome",
        SourceAction::Close => "close",
        SourceAction::StartStorage => "start disk copies",
        SourceAction::FinishStorage => "finish disk copies",
        SourceAction::AbortStorage => "abort disk copies",
    }
}

async fn perform<C: Connection>(
    myself: &ActorRef<SourcePump>,
    s: &mut SourceState<C>,
    action: SourceAction,
) -> Result<(), String> {
    let guest_err = |e: super::NodeError| e.to_string();
    match action {
        SourceAction::Send(msg) => {
            let abort = matches!(msg, crate::migration::SourceMsg::Abort { .. });
            let Some(writer) = s.writer.as_mut() else {
                return if abort {
                    Ok(())
                } else {
                    Err("no control stream".into())
                };
            };
            let sent = writer.send_message(FrameKind::Control, &msg).await;
            if abort {
                // Best effort: the link may be what failed.
                return Ok(());
            }
            sent.map_err(|e| format!("control stream: {e}"))?;
        }
        SourceAction::StartDirtyLog => {
            with_guest(&s.vm, |g| g.start_dirty_log())
                .await
                .map_err(guest_err)?
                .map_err(|e| format!("start dirty log: {e}"))?;
        }
        SourceAction::StopDirtyLog => {
            let _ = with_guest(&s.vm, |g| g.stop_dirty_log()).await;
        }
        SourceAction::SendRound {
            round,
            pages,
            skip_zero,
        } => {
            if s.lanes.is_empty() {
                open_lanes(myself, s).await?;
            }
            let stream_priority = if s.paused {
                super::share::Flow::SWITCHOVER_STREAM_PRIORITY
            } else {
                s.flow.stream_priority()
            };
            for lane in &s.lanes {
                lane.send(LaneJob {
                    round,
                    pages: pages.clone(),
                    skip_zero,
                    stream_priority,
                })
                .map_err(|_| "a lane stopped".to_owned())?;
            }
        }
        SourceAction::CollectDirty => {
            let dirty = with_guest(&s.vm, |g| g.take_dirty())
                .await
                .map_err(guest_err)?
                .map_err(|e| format!("read dirty log: {e}"))?;
            s.machine.handle_dirty(now(), dirty);
        }
        SourceAction::SetThrottle(percent) => {
            with_guest(&s.vm, move |g| g.set_throttle(percent))
                .await
                .map_err(guest_err)?
                .map_err(|e| format!("throttle: {e}"))?;
        }
        SourceAction::Pause => {
            with_guest(&s.vm, |g| g.pause())
                .await
                .map_err(guest_err)?
                .map_err(|e| format!("pause: {e}"))?;
            // Its last pages are downtime: the link is this migration's
            // until the switchover is through.
            s.flow.set_urgent(true);
            s.paused = true;
            s.machine.handle_paused(now());
        }
        SourceAction::SaveState => {
            let state = with_guest(&s.vm, |g| g.save_state())
                .await
                .map_err(guest_err)?
                .map_err(|e| format!("save state: {e}"))?;
            s.machine.handle_state_saved(now(), state);
        }
        SourceAction::HashMemory => {
            // Off the pump: the switchover goes on while the paused memory
            // is hashed; the report waits for it.
            let ram = s.ram.clone();
            let me = myself.clone();
            tokio::spawn(async move {
                let hash = super::offload(move || ram.hash()).await;
                let _ = me.cast(SourcePump::Hashed(hash));
            });
        }
        SourceAction::StartStorage => {
            let to = s.machine.offer().vm.name.clone();
            let peer = s.conn.peer().name.clone();
            tracing::info!(vm = %to, %peer, "disk copies start");
            let ids = (s.migration_id, s.flow.stream_priority());
            s.disks.start(&peer, ids, myself.clone()).await?;
        }
        SourceAction::FinishStorage => {
            let reports = s.disks.finish().await?;
            s.machine.handle_storage_finished(now(), reports);
        }
        SourceAction::AbortStorage => {
            s.disks.abort("the migration failed").await;
        }
        SourceAction::ReleaseOwnership { .. } => {
            // Every page is across: the others may send again.
            s.flow.set_urgent(false);
            s.disks.release().await;
            s.vm.cast(VmMsg::Released)
                .map_err(|_| "the VM actor is gone".to_owned())?;
            s.machine.handle_released(now());
        }
        SourceAction::ResumeLocal => {
            s.flow.set_urgent(false);
            s.paused = false;
            with_guest(&s.vm, |g| g.resume())
                .await
                .map_err(guest_err)?
                .map_err(|e| format!("resume on the source: {e}"))?;
        }
        SourceAction::Fence { generation } => {
            s.vm.cast(VmMsg::Fenced { generation })
                .map_err(|_| "the VM actor is gone".to_owned())?;
        }
        SourceAction::FreeVm => {
            s.disks.commit().await;
            if let Some(left) = s.on_vm_left.take() {
                left(s.vm_name.clone());
            }
        }
        SourceAction::AskOutcome => {
            let redial = s.redial.clone();
            let id = s.migration_id;
            let me = myself.clone();
            tokio::spawn(async move {
                let answer = ask_outcome(redial, id).await;
                let _ = me.cast(match answer {
                    Ok(committed) => SourcePump::Resolved(committed),
                    Err(e) => SourcePump::ResolveFailed(format!("asking how it ended: {e}")),
                });
            });
        }
        SourceAction::Close => {
            s.lanes.clear();
            if let Some(w) = s.writer.as_mut() {
                let _ = w.finish();
            }
        }
    }
    Ok(())
}

async fn ask_outcome<C: Connection>(redial: Redial<C>, migration_id: u64) -> Result<bool, String> {
    ask_destination(&redial().await?, migration_id).await
}

/// Asks the destination on `conn` whether it took migration
/// `migration_id` (the `Resolve` question).
pub(crate) async fn ask_destination<C: Connection>(
    conn: &C,
    migration_id: u64,
) -> Result<bool, String> {
    let (mut writer, mut reader) =
        open_stream(conn, &StreamIntro::Resolve { migration_id }).await?;
    let answer = reader
        .read_message::<crate::migration::wire::Resolution>(FrameKind::Control)
        .await
        .map_err(|e| e.to_string())?;
    let _ = writer.finish();
    Ok(answer.committed)
}

/// Connections the lanes are spread over. One QUIC connection's packets
/// are sealed and sent by one task, so on one connection the lanes share
/// one core's worth of encryption; a second connection (a fresh dial, as
/// QEMU's multifd opens a socket per channel) lets a second core work.
/// Measured with `ferry bench transport --path veth`: 2 connections carry
/// 27% more than 1 at MTU 1500 and 5% more at MTU 9000.
const LANE_CONNECTIONS: u32 = 2;

async fn open_lanes<C: Connection>(
    myself: &ActorRef<SourcePump>,
    s: &mut SourceState<C>,
) -> Result<(), String> {
    let lanes = s.machine.lanes();
    for _ in 1..LANE_CONNECTIONS.min(lanes) {
        // Dialled on a task of its own, outside the migration's span:
        // quinn's connection task keeps the span current at the dial,
        // which would hold the root span open (and unexported) for as
        // long as the connection lives.
        let more = tokio::spawn((s.dial_more)())
            .await
            .map_err(|e| format!("a second connection for the lanes: {e}"))?
            .map_err(|e| format!("a second connection for the lanes: {e}"))?;
        s.lane_links.push(more);
    }
    let conns: Vec<C> = std::iter::once(s.conn.clone())
        .chain(s.lane_links.iter().cloned())
        .collect();
    for lane in 0..lanes {
        let intro = StreamIntro::Lane {
            migration_id: s.migration_id,
            lane,
        };
        let conn = &conns[lane as usize % conns.len()];
        let (mut writer, _reader) = open_stream(conn, &intro)
            .await
            .map_err(|e| format!("opening lane {lane}: {e}"))?;
        writer.set_priority(s.flow.stream_priority());
        let (tx, rx) = mpsc::unbounded_channel();
        let ram = s.ram.clone();
        let me = myself.clone();
        let flow = (s.flow.clone(), s.sent.clone());
        tokio::spawn(async move {
            if let Err(e) = lanes::send_lane(writer, ram, (lane, lanes), flow, rx).await {
                let _ = me.cast(SourcePump::Failed(format!("lane {lane}: {e}")));
            }
        });
        s.lanes.push(tx);
    }
    Ok(())
}
