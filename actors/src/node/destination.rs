//! `MigrationDestination`: pumps a [`DestMachine`]: makes the shadow VM,
//! writes arriving lanes straight into its memory, restores and resumes it.

use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ferry_transport::{Connection, FrameKind, FrameReader, FrameWriter};
use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::factory::GuestFactory;
use super::lanes::{self, LaneRound};
use super::now;
use super::trace::PhaseSpans;
use super::vm::{VmActor, VmArgs, VmMsg, VmPhase, with_guest};
use crate::migration::{DestAction, DestMachine, DestOutcome, Mac, SourceMsg};
use crate::ram::{GuestRam, PageHashes};

const TICK: Duration = Duration::from_millis(100);

/// Messages to a [`MigrationDestination`].
pub enum DestPump<C: Connection> {
    /// A message from the source.
    Control(SourceMsg),
    /// A lane stream arrived.
    Lane(u32, FrameReader<C::Recv>),
    /// A lane finished a round.
    LaneRound(LaneRound),
    /// The control stream or a lane failed.
    Failed(String),
    /// Check the idle deadline.
    Tick,
}

/// How the destination's part ended, for the host.
pub enum DestEnd {
    /// The VM lives here now.
    Adopted(ActorRef<VmMsg>),
    /// The shadow is gone.
    Discarded,
}

/// What a [`MigrationDestination`] is started with.
pub struct DestArgs<C: Connection> {
    /// The protocol, built from the admitted offer.
    pub machine: DestMachine,
    /// Control stream, sending half.
    pub writer: FrameWriter<C::Send>,
    /// Control stream, receiving half.
    pub reader: FrameReader<C::Recv>,
    /// Makes the shadow.
    pub factory: Arc<dyn GuestFactory>,
    /// This host's name.
    pub host: String,
    /// The source's host.
    pub peer: String,
    /// Tells the virtual network where a MAC lives now.
    pub announce: Box<dyn Fn(Mac) + Send>,
    /// Asks the host to take the VM over durably (shadow, generation,
    /// whether it will run); the answer comes on the channel.
    pub adopt: AdoptFn,
    /// Called once at the end, with this side's report.
    pub on_end: Box<dyn FnOnce(DestEnd, crate::migration::DestReport) + Send>,
}

/// How the pump asks its host to take a VM over.
pub type AdoptFn = Box<
    dyn Fn(ActorRef<VmMsg>, u64, bool) -> tokio::sync::oneshot::Receiver<Result<(), String>> + Send,
>;

/// The destination of one migration.
pub struct MigrationDestination<C>(PhantomData<fn() -> C>);

impl<C> Default for MigrationDestination<C> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

/// The actor's state.
pub struct DestState<C: Connection> {
    machine: DestMachine,
    writer: FrameWriter<C::Send>,
    factory: Arc<dyn GuestFactory>,
    host: String,
    vm: Option<ActorRef<VmMsg>>,
    ram: Option<GuestRam>,
    hashes: Option<Arc<PageHashes>>,
    waiting_lanes: Vec<(u32, FrameReader<C::Recv>)>,
    lanes_seen: Vec<bool>,
    /// Wire bytes every lane has taken in so far.
    arrived: Arc<AtomicU64>,
    generation: u64,
    announce: Box<dyn Fn(Mac) + Send>,
    adopt: AdoptFn,
    on_end: Option<Box<dyn FnOnce(DestEnd, crate::migration::DestReport) + Send>>,
    /// The source's host.
    peer: String,
    /// One span per phase, under this side's root span.
    spans: Option<PhaseSpans>,
}

impl<C: Connection> Actor for MigrationDestination<C> {
    type Msg = DestPump<C>;
    type State = DestState<C>;
    type Arguments = DestArgs<C>;

    async fn pre_start(
        &self,
        myself: ActorRef<DestPump<C>>,
        args: DestArgs<C>,
    ) -> Result<DestState<C>, ActorProcessingErr> {
        myself.send_interval(TICK, || DestPump::Tick);
        tokio::spawn(read_control(args.reader, myself.clone()));
        let lanes = args.machine.lanes() as usize;
        let offer = args.machine.offer();
        let root = tracing::info_span!(
            parent: None,
            "migration.destination",
            migration.id = %crate::migration::report::show_id(offer.migration_id),
            vm = %offer.vm.name,
            from = %args.peer,
            to = %args.host,
        );
        super::trace::join(&root, &offer.trace_parent);
        Ok(DestState {
            machine: args.machine,
            writer: args.writer,
            factory: args.factory,
            host: args.host,
            vm: None,
            ram: None,
            hashes: None,
            waiting_lanes: Vec::new(),
            lanes_seen: vec![false; lanes],
            arrived: Arc::new(AtomicU64::new(0)),
            generation: 0,
            announce: args.announce,
            adopt: args.adopt,
            on_end: Some(args.on_end),
            peer: args.peer,
            spans: Some(PhaseSpans::new(root)),
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<DestPump<C>>,
        s: &mut DestState<C>,
    ) -> Result<(), ActorProcessingErr> {
        pump(&myself, s).await;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<DestPump<C>>,
        msg: DestPump<C>,
        s: &mut DestState<C>,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            DestPump::Control(m) => s.machine.handle_message(now(), m),
            DestPump::Lane(lane, reader) => {
                if let Err(why) = accept_lane(&myself, s, lane, reader) {
                    s.machine.handle_failure(now(), why);
                }
            }
            DestPump::LaneRound(r) => {
                s.machine
                    .handle_lane_mark(now(), r.lane, r.round, r.pages, r.bytes);
            }
            DestPump::Failed(why) => s.machine.handle_failure(now(), why),
            DestPump::Tick => {
                let arrived = s.arrived.load(Ordering::Relaxed);
                s.machine.handle_data_arrived(now(), arrived);
                s.machine.handle_timeout(now());
            }
        }
        pump(&myself, s).await;
        Ok(())
    }
}

async fn read_control<C: Connection>(mut reader: FrameReader<C::Recv>, me: ActorRef<DestPump<C>>) {
    loop {
        match reader.read_message::<SourceMsg>(FrameKind::Control).await {
            Ok(m) => {
                if me.cast(DestPump::Control(m)).is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = me.cast(DestPump::Failed(format!("control stream: {e}")));
                return;
            }
        }
    }
}

fn accept_lane<C: Connection>(
    myself: &ActorRef<DestPump<C>>,
    s: &mut DestState<C>,
    lane: u32,
    reader: FrameReader<C::Recv>,
) -> Result<(), String> {
    let lanes = s.machine.lanes();
    let seen = s
        .lanes_seen
        .get_mut(lane as usize)
        .ok_or_else(|| format!("lane {lane} of {lanes}"))?;
    if std::mem::replace(seen, true) {
        return Err(format!("lane {lane} opened twice"));
    }
    let Some(ram) = &s.ram else {
        s.waiting_lanes.push((lane, reader));
        return Ok(());
    };
    // SAFETY: each lane index is taken once (checked above), and the shadow
    // VM stays paused while lanes write: it resumes only after every lane
    // delivered the final round.
    let sink = unsafe { ram.lane(lane, lanes, s.hashes.clone()) };
    let me = myself.clone();
    let arrived = s.arrived.clone();
    tokio::spawn(async move {
        let report = me.clone();
        let result = lanes::receive_lane(reader, sink, lane, &arrived, move |r| {
            let _ = report.cast(DestPump::LaneRound(r));
        })
        .await;
        if let Err(e) = result {
            let _ = me.cast(DestPump::Failed(e));
        }
    });
    Ok(())
}

async fn pump<C: Connection>(myself: &ActorRef<DestPump<C>>, s: &mut DestState<C>) {
    sync_spans(s);
    while let Some(action) = s.machine.poll_action() {
        let name = format!("{action:?}");
        let name = name.split(['(', ' ', '{']).next().unwrap_or("").to_owned();
        let started = now();
        let result = perform(myself, s, action).await;
        tracing::debug!(
            action = %name,
            ms = (now() - started).as_secs_f64() * 1e3,
            "destination action"
        );
        if let Err(why) = result {
            s.machine.handle_failure(now(), why);
        }
        sync_spans(s);
    }
    while let Some(outcome) = s.machine.poll_event() {
        let mut report = s.machine.report(now(), &s.peer, &s.host);
        report.started_unix_ms = crate::migration::report::unix_ms_ago(report.total_ms);
        if let Some(spans) = s.spans.take() {
            super::trace::set_attributes(
                spans.root(),
                vec![
                    opentelemetry::KeyValue::new("outcome", report.outcome.clone()),
                    opentelemetry::KeyValue::new("downtime_ms", report.downtime_ms),
                    opentelemetry::KeyValue::new("total_ms", report.total_ms),
                    opentelemetry::KeyValue::new(
                        "bytes_received",
                        i64::try_from(report.bytes_received).unwrap_or(i64::MAX),
                    ),
                ],
            );
            spans.finish(s.machine.timeline());
        }
        let vm = s.vm.take();
        let end = match (&outcome, vm) {
            (DestOutcome::Adopted | DestOutcome::ResumeFailed(_), Some(vm)) => DestEnd::Adopted(vm),
            (_, vm) => {
                if let Some(vm) = vm {
                    super::vm::discard(&vm);
                }
                DestEnd::Discarded
            }
        };
        tracing::info!(vm = %s.machine.offer().vm.name, ?outcome, "incoming migration ended");
        if let Some(on_end) = s.on_end.take() {
            on_end(end, report);
        }
        myself.stop(None);
    }
}

async fn perform<C: Connection>(
    myself: &ActorRef<DestPump<C>>,
    s: &mut DestState<C>,
    action: DestAction,
) -> Result<(), String> {
    match action {
        DestAction::Send(msg) => {
            let quiet = matches!(msg, crate::migration::DestMsg::Aborted { .. });
            let sent = s.writer.send_message(FrameKind::Control, &msg).await;
            if !quiet {
                sent.map_err(|e| format!("control stream: {e}"))?;
            }
        }
        DestAction::CreateShadow => {
            let config = s.machine.offer().vm.clone();
            let factory = s.factory.clone();
            let made = super::offload(move || factory.shadow(&config)).await;
            match made {
                Ok(guest) => {
                    let ram = guest.ram();
                    if s.machine.offer().verify_memory {
                        // Lanes hash pages as they land, so the check at the
                        // switchover is a sum, not a pass over all memory.
                        s.hashes = Some(Arc::new(PageHashes::new(ram.pages())));
                    }
                    s.ram = Some(ram);
                    let (vm, _) = Actor::spawn(
                        None,
                        VmActor,
                        VmArgs {
                            config: s.machine.offer().vm.clone(),
                            guest,
                            host: s.host.clone(),
                            generation: s.machine.offer().generation,
                            phase: VmPhase::Incoming,
                        },
                    )
                    .await
                    .map_err(|e| format!("spawning the VM actor: {e}"))?;
                    s.vm = Some(vm);
                    s.machine.handle_shadow_created(now(), Ok(()));
                    for (lane, reader) in std::mem::take(&mut s.waiting_lanes) {
                        s.lanes_seen[lane as usize] = false;
                        accept_lane(myself, s, lane, reader)?;
                    }
                }
                Err(e) => s.machine.handle_shadow_created(now(), Err(e.to_string())),
            }
        }
        DestAction::RestoreState(state) => {
            let vm = s.vm.as_ref().ok_or("no shadow VM")?;
            let r = with_guest(vm, move |g| g.restore_state(&state))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string());
            s.machine.handle_restored(now(), r);
        }
        DestAction::HashMemory => {
            let ram = s.ram.clone().ok_or("no shadow VM")?;
            let hashes = s.hashes.clone();
            let hash = super::offload(move || match hashes {
                Some(h) => h.fold(),
                None => ram.hash(),
            })
            .await;
            s.machine.handle_memory_hash(now(), hash);
        }
        DestAction::Adopt { generation } => {
            s.generation = generation;
            let vm = s.vm.clone().ok_or("no shadow VM")?;
            let _ = vm.cast(VmMsg::Adopted {
                generation,
                running: false,
            });
            let running = !s.machine.offer().cold;
            let answer = (s.adopt)(vm, generation, running).await;
            let r = answer.unwrap_or_else(|_| Err("the host actor is gone".into()));
            s.machine.handle_adopted(now(), r);
        }
        DestAction::Resume => {
            let vm = s.vm.as_ref().ok_or("no shadow VM")?;
            let r = with_guest(vm, |g| g.resume())
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string());
            if r.is_ok() {
                let _ = vm.cast(VmMsg::Adopted {
                    generation: s.generation,
                    running: true,
                });
            }
            s.machine.handle_resumed(now(), r);
        }
        DestAction::AnnounceMac(mac) => (s.announce)(mac),
        DestAction::DiscardShadow => {
            s.ram = None;
            s.hashes = None;
            if let Some(vm) = s.vm.take() {
                super::vm::discard(&vm);
            }
        }
        DestAction::Close => {
            let _ = s.writer.finish();
        }
    }
    Ok(())
}

fn sync_spans<C: Connection>(s: &mut DestState<C>) {
    if let Some(spans) = s.spans.as_mut() {
        spans.sync(s.machine.timeline());
    }
}
