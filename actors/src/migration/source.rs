//! The source side of a migration, as a sans-IO state machine.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::options::{
    LinkFigures, MigrationOptions, SWITCHOVER_ONE_WAY_TRIPS, downtime_floor, next_throttle,
    predicted_downtime,
};
use super::report::{MigrationReport, Outcome, Progress, RoundReport};
use super::timeline::{Figure, PhaseId, Timeline};
use super::wire::{DestMsg, Offer, SourceMsg, VmConfig};
use crate::guest::{DirtyBitmap, PAGE_BYTES};

/// How long to wait before asking an unreachable destination again, the
/// first time; each further failure doubles it, up to [`RESOLVE_RETRY_MAX`].
pub const RESOLVE_RETRY: Duration = Duration::from_millis(500);

/// The longest wait between two questions: the source asks on its own,
/// for as long as it takes (an operator may fence with `vm recover --force`).
pub const RESOLVE_RETRY_MAX: Duration = Duration::from_secs(30);

/// The least share of a round's time taken as sending when the round trip
/// is taken out (guards against a round-trip estimate above the round).
const MIN_SENDING_SHARE: f64 = 0.1;

/// The wait before question number `attempt + 1` (0-based failures so far).
pub fn resolve_retry(failures: u32) -> Duration {
    RESOLVE_RETRY
        .saturating_mul(1 << failures.min(16))
        .min(RESOLVE_RETRY_MAX)
}

/// Device state assumed before it is measured (a KVM VM saves about 11 KiB).
const STATE_BYTES_ESTIMATE: u64 = 16 << 10;

/// What the pump must do for the source.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceAction {
    /// Send a message on the control stream.
    Send(SourceMsg),
    /// Start dirty tracking.
    StartDirtyLog,
    /// Send `pages` on the lanes as round `round`, then a lane mark on each.
    /// With `skip_zero`, zero pages are not sent at all (round 0: the
    /// destination's memory starts zeroed).
    SendRound {
        /// Round number.
        round: u32,
        /// Pages to send.
        pages: Arc<DirtyBitmap>,
        /// Leave zero pages out.
        skip_zero: bool,
    },
    /// Take the dirty set, then call [`SourceMachine::handle_dirty`].
    CollectDirty,
    /// Throttle the vCPUs to this percent.
    SetThrottle(u8),
    /// Pause the vCPUs, then call [`SourceMachine::handle_paused`].
    Pause,
    /// Save vCPU and device state, then call [`SourceMachine::handle_state_saved`].
    SaveState,
    /// Hash guest memory (the vCPUs are paused for good), then call
    /// [`SourceMachine::handle_memory_hash`].
    HashMemory,
    /// Stop dirty tracking.
    StopDirtyLog,
    /// Give up ownership (bump the generation, release locks), then call
    /// [`SourceMachine::handle_released`].
    ReleaseOwnership {
        /// The VM's generation from now on.
        generation: u64,
    },
    /// The migration failed before the release: run the VM here again.
    ResumeLocal,
    /// An operator fenced the destination's copy: the VM is ours again,
    /// at this generation (above the one the destination was given).
    Fence {
        /// The VM's generation from now on.
        generation: u64,
    },
    /// The destination runs the VM: free it here.
    FreeVm,
    /// The link failed after the release: ask the destination (on a fresh
    /// connection) whether it took the VM, then call
    /// [`SourceMachine::handle_resolution`] or, if the question could not
    /// be asked, [`SourceMachine::handle_resolution_failed`].
    AskOutcome,
    /// Close the lanes and the control stream.
    Close,
    /// Start copying the disks to the destination's datastore; call
    /// [`SourceMachine::handle_storage_converged`] once every copy has
    /// converged (or [`SourceMachine::handle_failure`]).
    StartStorage,
    /// The vCPUs are paused: copy the disks' last changes, make them
    /// durable on the destination and hand the disks over, then call
    /// [`SourceMachine::handle_storage_finished`].
    FinishStorage,
    /// The migration failed: the disks stay (or become again) the
    /// source's — copies discarded, overlays merged back, locks retaken.
    AbortStorage,
}

/// What the source reports to its caller.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceEvent {
    /// Where the migration stands.
    Progress(Progress),
    /// It ended; nothing more follows.
    Finished(Box<MigrationReport>),
}

#[derive(Debug)]
enum State {
    /// Offer sent, waiting for the answer.
    Offered,
    /// Round `round` is on the wire.
    Copying { round: u32 },
    /// Round `round` arrived; waiting for the dirty set.
    Collecting { round: u32 },
    /// Memory converged before the disks: `pending` waits for them.
    WaitingForDisks { round: u32, pending: DirtyBitmap },
    /// Pause requested; `pending` pages still to send.
    Pausing {
        pending: DirtyBitmap,
        predicted: Duration,
    },
    /// Paused; waiting for the last dirty set.
    FinalCollect {
        pending: DirtyBitmap,
        paused_at: Instant,
    },
    /// Final round, state and (maybe) hash on their way; waiting for Ready.
    Switching {
        paused_at: Instant,
        final_round: u32,
        ready: bool,
    },
    /// Ownership being released.
    Releasing { paused_at: Instant },
    /// Released and committed; waiting for the destination to resume.
    Committed { paused_at: Instant },
    /// The link failed after the release: asking how it ended, for as
    /// long as it takes (`failures` questions failed so far).
    Resolving {
        paused_at: Instant,
        reason: String,
        asking: bool,
        failures: u32,
    },
    /// Over.
    Done,
}

/// The source of one migration.
///
/// Polling order after every `handle_*` call (or [`Self::start`]): drain
/// [`Self::poll_action`] and carry each action out in order, feeding its
/// result back through the matching `handle_*` (which may queue more
/// actions), then drain [`Self::poll_event`], then re-arm the timer from
/// [`Self::poll_timeout`].
#[derive(Debug)]
pub struct SourceMachine {
    offer: Offer,
    from: String,
    to: String,
    options: MigrationOptions,
    pages_total: u64,
    state: State,
    actions: VecDeque<SourceAction>,
    events: VecDeque<SourceEvent>,
    started_at: Option<Instant>,
    deadline: Option<Instant>,
    round_started_at: Option<Instant>,
    round_pages: u64,
    rounds: Vec<RoundReport>,
    /// Wire bytes the lanes handed to the link so far (rounds finished
    /// or not).
    sent_bytes: u64,
    /// The link's least round-trip time seen (zero until one is seen):
    /// the switchover runs on a quiet link, while a round's queues
    /// inflate the connection's smoothed estimate.
    rtt: Duration,
    /// Share of packets the link lost so far.
    loss: f64,
    /// The budget was found below the link's [`downtime_floor`] (said
    /// once).
    floor_noted: bool,
    throttle: u8,
    throttle_max: u8,
    logging: bool,
    paused: bool,
    predicted: Duration,
    state_bytes: u64,
    source_hash: Option<u64>,
    dest_hash: Option<u64>,
    lanes: u32,
    /// A completed report waiting for the source's memory hash.
    held: Option<MigrationReport>,
    /// Disks still copying: the switchover waits for them.
    storage_pending: bool,
    disk_reports: Vec<crate::storage::DiskMoveReport>,
    /// What happened when, for the report, the chart and the spans.
    timeline: Timeline,
    phase: Phases,
}

/// The phases of [`SourceMachine::timeline`] that are still on.
#[derive(Debug, Default)]
struct Phases {
    offer: Option<PhaseId>,
    precopy: Option<PhaseId>,
    round: Option<PhaseId>,
    waiting: Option<PhaseId>,
    storage: Option<PhaseId>,
    storage_final: Option<PhaseId>,
    switchover: Option<PhaseId>,
    /// The current step of the switchover (pause, state, commit, resume).
    step: Option<PhaseId>,
}

impl SourceMachine {
    /// A migration of `vm` (generation `generation`) from host `from` to `to`.
    ///
    /// # Panics
    /// If `options` fail [`MigrationOptions::check`] (callers check first).
    pub fn new(
        migration_id: u64,
        vm: VmConfig,
        generation: u64,
        from: String,
        to: String,
        options: MigrationOptions,
    ) -> Self {
        options.check().expect("options checked by the caller");
        let pages_total = vm.memory_bytes / PAGE_BYTES;
        let offer = Offer {
            migration_id,
            vm,
            generation,
            cold: options.cold,
            lanes: options.lanes,
            verify_memory: options.verify_memory,
            storage: options.storage.clone(),
            trace_parent: String::new(),
        };
        let storage_pending = offer.storage.is_some();
        Self {
            offer,
            from,
            to,
            options,
            pages_total,
            state: State::Offered,
            actions: VecDeque::new(),
            events: VecDeque::new(),
            started_at: None,
            deadline: None,
            round_started_at: None,
            round_pages: 0,
            rounds: Vec::new(),
            sent_bytes: 0,
            rtt: Duration::ZERO,
            loss: 0.0,
            floor_noted: false,
            throttle: 0,
            throttle_max: 0,
            logging: false,
            paused: false,
            predicted: Duration::ZERO,
            state_bytes: 0,
            source_hash: None,
            dest_hash: None,
            lanes: 0,
            held: None,
            storage_pending,
            disk_reports: Vec::new(),
            timeline: Timeline::default(),
            phase: Phases::default(),
        }
    }

    /// Source and destination host.
    pub fn hosts(&self) -> (&str, &str) {
        (&self.from, &self.to)
    }

    /// Names the trace the destination's spans join (W3C `traceparent`;
    /// empty: none). Called before [`Self::start`].
    pub fn set_trace_parent(&mut self, traceparent: String) {
        assert!(self.started_at.is_none(), "the offer is already sent");
        self.offer.trace_parent = traceparent;
    }

    /// The phases so far (offsets from [`Self::start`]).
    pub fn timeline(&self) -> &Timeline {
        &self.timeline
    }

    /// Ends the current switchover step and begins `next` (if any).
    fn step(&mut self, now: Instant, next: Option<&str>) {
        if let Some(step) = self.phase.step.take() {
            self.timeline.end(now, step);
        }
        if let Some(name) = next {
            self.phase.step = Some(self.timeline.begin(now, name, self.phase.switchover));
        }
    }

    /// The switchover begins (the pause is requested, or a cold copy is in).
    fn begin_switchover(&mut self, now: Instant, first_step: &str) {
        if let Some(p) = self.phase.precopy.take() {
            self.timeline.end(now, p);
        }
        self.phase.switchover = Some(self.timeline.begin(now, "switchover", None));
        self.step(now, Some(first_step));
    }

    /// Sends the offer.
    pub fn start(&mut self, now: Instant) {
        assert!(self.started_at.is_none(), "started twice");
        self.started_at = Some(now);
        self.timeline.start(now);
        self.phase.offer = Some(self.timeline.begin(now, "offer", None));
        self.deadline = Some(now + self.options.precopy_time_max);
        self.actions
            .push_back(SourceAction::Send(SourceMsg::Offer(Box::new(
                self.offer.clone(),
            ))));
        self.progress("offer", 0, self.pages_total);
    }

    /// The offer this migration makes.
    pub fn offer(&self) -> &Offer {
        &self.offer
    }

    /// Bulk streams the destination accepted (0 before it did).
    pub fn lanes(&self) -> u32 {
        self.lanes
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<SourceAction> {
        self.actions.pop_front()
    }

    /// The next thing to report.
    pub fn poll_event(&mut self) -> Option<SourceEvent> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Done => None,
            _ => self.deadline,
        }
    }

    /// Whether the migration is over.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// A message from the destination.
    pub fn handle_message(&mut self, now: Instant, msg: DestMsg) {
        match (std::mem::replace(&mut self.state, State::Done), msg) {
            (State::Done, _) => {}
            (State::Offered, DestMsg::Accepted { lanes }) => {
                if lanes == 0 || lanes > self.options.lanes {
                    self.state = State::Offered;
                    return self.fail(now, format!("destination asked for {lanes} lanes"));
                }
                self.lanes = lanes;
                if let Some(p) = self.phase.offer.take() {
                    self.timeline.end(now, p);
                }
                self.phase.precopy = Some(self.timeline.begin(now, "precopy", None));
                if !self.offer.cold {
                    if self.offer.storage.is_some() {
                        self.phase.storage = Some(self.timeline.begin(now, "storage", None));
                        self.actions.push_back(SourceAction::StartStorage);
                    }
                    self.actions.push_back(SourceAction::StartDirtyLog);
                    self.logging = true;
                }
                self.send_round(now, 0, DirtyBitmap::all(self.pages_total), true);
            }
            (State::Offered, DestMsg::Refused(refusal)) => {
                self.state = State::Offered;
                self.fail(now, format!("refused by {}: {refusal}", self.to));
            }
            (
                State::Copying { round },
                DestMsg::RoundReceived {
                    round: r,
                    pages,
                    bytes,
                },
            ) if r == round => {
                self.record_round(now, round, pages, bytes);
                if self.offer.cold {
                    self.paused = true;
                    self.begin_switchover(now, "state");
                    self.state = State::Switching {
                        paused_at: now,
                        final_round: round,
                        ready: false,
                    };
                    self.deadline = Some(now + self.options.switchover_time_max);
                    self.actions.push_back(SourceAction::SaveState);
                } else {
                    self.state = State::Collecting { round };
                    self.actions.push_back(SourceAction::CollectDirty);
                }
            }
            (
                State::Switching {
                    paused_at,
                    final_round,
                    ready: false,
                },
                DestMsg::RoundReceived {
                    round,
                    pages,
                    bytes,
                },
            ) if round == final_round && !self.offer.cold => {
                self.record_round(now, round, pages, bytes);
                self.state = State::Switching {
                    paused_at,
                    final_round,
                    ready: false,
                };
            }
            (
                State::Switching {
                    paused_at,
                    final_round,
                    ready: false,
                },
                DestMsg::Ready { memory_hash },
            ) => {
                self.dest_hash = memory_hash;
                self.state = State::Switching {
                    paused_at,
                    final_round,
                    ready: true,
                };
                self.release_if_verified(now);
            }
            (State::Committed { paused_at }, DestMsg::Resumed { .. }) => {
                self.actions.push_back(SourceAction::FreeVm);
                self.actions.push_back(SourceAction::Close);
                self.finish(now, Outcome::Completed, now - paused_at);
            }
            (state, DestMsg::Aborted { reason }) => {
                self.state = state;
                self.fail(now, format!("{} gave up: {reason}", self.to));
            }
            (state, other) => {
                self.state = state;
                self.fail(
                    now,
                    format!("unexpected message from {}: {other:?}", self.to),
                );
            }
        }
    }

    /// The dirty set the pump collected after [`SourceAction::CollectDirty`].
    pub fn handle_dirty(&mut self, now: Instant, dirty: DirtyBitmap) {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Collecting { round } => {
                let count = dirty.count();
                let previous = round
                    .checked_sub(1)
                    .and_then(|r| self.rounds.get(r as usize))
                    .map(|r| r.dirty_after);
                let predicted = predicted_downtime(
                    count * PAGE_BYTES,
                    self.state_bytes_estimate(),
                    self.bandwidth(),
                    LinkFigures {
                        rtt: self.rtt,
                        loss: self.loss,
                        resume_cost: self.options.resume_cost,
                    },
                );
                self.predicted = predicted;
                self.note_dirty(count, predicted);
                let converged = predicted <= self.options.downtime_max;
                let decision = if converged && self.storage_pending {
                    "wait for disks"
                } else if converged {
                    "switchover"
                } else if round + 1 >= self.options.rounds_max {
                    "give up"
                } else {
                    "another round"
                };
                self.decide(now, count, predicted, decision);
                if converged && self.storage_pending {
                    self.phase.waiting = Some(self.timeline.begin(
                        now,
                        "waiting_for_disks",
                        self.phase.precopy,
                    ));
                    // Memory is ready but the disks are not: hold the
                    // dirty set until they are, then go on with rounds.
                    self.progress("waiting for disks", round + 1, count);
                    self.state = State::WaitingForDisks {
                        round,
                        pending: dirty,
                    };
                    return;
                }
                if converged {
                    self.begin_switchover(now, "pause");
                    self.state = State::Pausing {
                        pending: dirty,
                        predicted,
                    };
                    self.actions.push_back(SourceAction::Pause);
                    self.progress("switchover", round + 1, count);
                    return;
                }
                if round + 1 >= self.options.rounds_max {
                    self.state = State::Collecting { round };
                    return self.fail(
                        now,
                        format!(
                            "did not converge in {} rounds (predicted downtime {:.1} ms, budget {} ms{})",
                            round + 1,
                            predicted.as_secs_f64() * 1e3,
                            self.options.downtime_max.as_millis(),
                            self.floor_hint()
                        ),
                    );
                }
                let throttle = next_throttle(&self.options, self.throttle, count, previous);
                if throttle != self.throttle {
                    self.throttle = throttle;
                    self.throttle_max = self.throttle_max.max(throttle);
                    self.actions.push_back(SourceAction::SetThrottle(throttle));
                }
                self.send_round(now, round + 1, dirty, false);
            }
            State::FinalCollect {
                mut pending,
                paused_at,
            } => {
                pending.union_with(&dirty);
                let final_round = self.rounds_done();
                self.state = State::Switching {
                    paused_at,
                    final_round,
                    ready: false,
                };
                self.deadline = Some(paused_at + self.options.switchover_time_max);
                // Dirty logging stays on through the switchover: turning it
                // off rewrites the memory slot (tens of milliseconds for
                // gigabytes), which must not count as downtime. A freed VM
                // takes it along; an aborted one has it stopped in `fail`.
                self.send_round(now, final_round, pending, false);
                // send_round moved the state to Copying; the switchover
                // waits for the final round's acknowledgement instead.
                self.state = State::Switching {
                    paused_at,
                    final_round,
                    ready: false,
                };
                self.step(now, Some("state"));
                self.actions.push_back(SourceAction::SaveState);
                if self.offer.verify_memory {
                    self.actions.push_back(SourceAction::HashMemory);
                }
            }
            // Failed while the dirty set was being read (an action queued
            // before the failure): nothing more to do with it.
            State::Done => {}
            other => {
                panic!("dirty set delivered in state {other:?}");
            }
        }
    }

    /// The vCPUs are paused.
    pub fn handle_paused(&mut self, now: Instant) {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Pausing { pending, predicted } => {
                self.paused = true;
                self.predicted = predicted;
                self.step(now, None);
                self.state = State::FinalCollect {
                    pending,
                    paused_at: now,
                };
                if self.offer.storage.is_some() {
                    self.phase.storage_final = Some(self.timeline.begin(
                        now,
                        "storage.final",
                        self.phase.switchover,
                    ));
                    self.actions.push_back(SourceAction::FinishStorage);
                }
                self.actions.push_back(SourceAction::CollectDirty);
            }
            // The migration failed while the pause was on its way (it was
            // queued before the failure): the guest runs again here.
            State::Done => {
                if !self.offer.cold {
                    self.actions.push_back(SourceAction::ResumeLocal);
                }
            }
            other => panic!("paused in state {other:?}"),
        }
    }

    /// Every disk copy has converged: the switchover may come.
    pub fn handle_storage_converged(&mut self, now: Instant) {
        self.storage_pending = false;
        for p in [self.phase.storage.take(), self.phase.waiting.take()]
            .into_iter()
            .flatten()
        {
            self.timeline.end(now, p);
        }
        match std::mem::replace(&mut self.state, State::Done) {
            State::WaitingForDisks { round, pending } => {
                self.send_round(now, round + 1, pending, false);
            }
            other => self.state = other,
        }
    }

    /// The disks are on the destination, durable, after
    /// [`SourceAction::FinishStorage`].
    pub fn handle_storage_finished(
        &mut self,
        now: Instant,
        reports: Vec<crate::storage::DiskMoveReport>,
    ) {
        if let Some(p) = self.phase.storage_final.take() {
            let bytes = reports.iter().map(|r| r.copied_bytes).sum();
            self.timeline
                .note(p, "disks", Figure::Count(reports.len() as u64));
            self.timeline.note(p, "bytes", Figure::Count(bytes));
            for r in &reports {
                let figures = vec![
                    ("disk", Figure::Text(r.disk.clone())),
                    ("method", Figure::Text(r.method.to_string())),
                    ("datastore", Figure::Text(r.to.clone())),
                    ("copied_bytes", Figure::Count(r.copied_bytes)),
                    ("skipped_bytes", Figure::Count(r.skipped_bytes)),
                    ("copy_mb_s", Figure::Value(r.copy_mb_per_s)),
                    ("final_step_ms", Figure::Value(r.pause_ms)),
                ];
                self.timeline.instant(now, "disk", Some(p), figures);
            }
            self.timeline.end(now, p);
        }
        self.disk_reports = reports;
    }

    /// State saved after [`SourceAction::SaveState`].
    pub fn handle_state_saved(&mut self, _now: Instant, state: Vec<u8>) {
        if self.is_done() {
            return; // failed meanwhile: nothing to send
        }
        if let Some(step) = self.phase.step {
            self.timeline
                .note(step, "state_bytes", Figure::Count(state.len() as u64));
        }
        assert!(
            matches!(self.state, State::Switching { .. }),
            "state saved in {:?}",
            self.state
        );
        let State::Switching { final_round, .. } = self.state else {
            unreachable!()
        };
        self.state_bytes = state.len() as u64;
        self.actions
            .push_back(SourceAction::Send(SourceMsg::Switchover {
                final_round,
                state,
            }));
        if self.offer.cold && self.offer.verify_memory {
            self.actions.push_back(SourceAction::HashMemory);
        }
    }

    /// The source's memory hash after [`SourceAction::HashMemory`]: with
    /// `verify_memory` the release waits for it and for the destination's,
    /// and goes ahead only if they are equal.
    pub fn handle_memory_hash(&mut self, now: Instant, hash: u64) {
        self.source_hash = Some(hash);
        if let Some(mut report) = self.held.take() {
            report.memory_verified = self.dest_hash.map(|d| d == hash);
            self.events
                .push_back(SourceEvent::Finished(Box::new(report)));
        }
        self.release_if_verified(now);
    }

    /// The destination is ready: release the VM, once memory is known to
    /// match where it is checked. A mismatch fails the migration before the
    /// release (the VM runs on here, the destination drops its copy).
    fn release_if_verified(&mut self, now: Instant) {
        let State::Switching {
            paused_at,
            ready: true,
            ..
        } = self.state
        else {
            return;
        };
        if self.offer.verify_memory {
            let Some(source) = self.source_hash else {
                return; // the hash is on its way
            };
            match self.dest_hash {
                Some(dest) if dest == source => {}
                Some(dest) => {
                    return self.fail(
                        now,
                        format!(
                            "destination memory differs from the source at the switchover (hash {dest:016x}, source {source:016x})"
                        ),
                    );
                }
                None => return self.fail(now, format!("{} sent no memory hash", self.to)),
            }
        }
        self.step(now, Some("commit"));
        self.state = State::Releasing { paused_at };
        self.actions.push_back(SourceAction::ReleaseOwnership {
            generation: self.offer.generation + 1,
        });
        self.progress("resume", self.rounds_done(), 0);
    }

    /// Ownership is released: from here on the source never resumes the VM.
    pub fn handle_released(&mut self, now: Instant) {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Releasing { paused_at } => {
                self.step(now, Some("resume"));
                self.state = State::Committed { paused_at };
                self.actions
                    .push_back(SourceAction::Send(SourceMsg::Commit {
                        generation: self.offer.generation + 1,
                    }));
            }
            // Failed before the release went out (the failure queued the
            // abort, the disks' reopening and the resume after it): no
            // commit is sent.
            State::Done => {}
            other => panic!("released in state {other:?}"),
        }
    }

    /// The destination's answer after [`SourceAction::AskOutcome`].
    pub fn handle_resolution(&mut self, now: Instant, committed: bool) {
        let Some((paused_at, reason)) = self.take_resolving() else {
            return;
        };
        if committed {
            self.actions.push_back(SourceAction::FreeVm);
            self.finish(now, Outcome::Completed, now - paused_at);
        } else {
            // The destination dropped the shadow and will never run it:
            // the VM is ours again.
            if !self.offer.vm.disks.is_empty() {
                self.actions.push_back(SourceAction::AbortStorage);
            }
            self.actions.push_back(SourceAction::ResumeLocal);
            self.finish(
                now,
                Outcome::Aborted {
                    reason: format!(
                        "{reason}; {} confirmed it never took the VM, resumed here",
                        self.to
                    ),
                },
                now - paused_at,
            );
        }
    }

    /// Leaves `Resolving` (for `Done`, until the caller finishes) and
    /// returns when the VM paused and why the end is unknown; in any other
    /// state, changes nothing.
    fn take_resolving(&mut self) -> Option<(Instant, String)> {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Resolving {
                paused_at, reason, ..
            } => Some((paused_at, reason)),
            other => {
                self.state = other;
                None
            }
        }
    }

    /// The question of [`SourceAction::AskOutcome`] could not be asked.
    pub fn handle_resolution_failed(&mut self, now: Instant, reason: String) {
        self.fail(now, reason);
    }

    /// An operator asks for the question to be put again now (`vm recover`).
    /// Returns whether the migration is in doubt at all.
    pub fn handle_ask_now(&mut self, now: Instant) -> bool {
        match self.state {
            State::Resolving { asking: true, .. } => true,
            State::Resolving { failures, .. } => {
                self.ask_outcome(now, failures + 1);
                true
            }
            _ => false,
        }
    }

    /// An operator (`who`) fences the destination's copy (`vm recover
    /// --force`): the VM is ours again at a generation above the one the
    /// destination was given, so that copy can never be taken for the
    /// newest.
    ///
    /// # Errors
    /// The migration is not in doubt.
    pub fn handle_fence(&mut self, now: Instant, who: &str) -> Result<(), String> {
        let Some((paused_at, reason)) = self.take_resolving() else {
            return Err("the migration is not in doubt".into());
        };
        self.actions.push_back(SourceAction::Fence {
            generation: self.offer.generation + 2,
        });
        if !self.offer.vm.disks.is_empty() {
            self.actions.push_back(SourceAction::AbortStorage);
        }
        if !self.offer.cold {
            self.actions.push_back(SourceAction::ResumeLocal);
        }
        self.finish(
            now,
            Outcome::Aborted {
                reason: format!("{reason}; fenced by {who}: the VM is back here"),
            },
            now - paused_at,
        );
        Ok(())
    }

    /// Puts the `attempt`-th question to the destination.
    fn ask_outcome(&mut self, now: Instant, attempt: u32) {
        if let State::Resolving {
            asking, failures, ..
        } = &mut self.state
        {
            *asking = true;
            *failures = attempt - 1;
        }
        self.deadline = Some(now + RESOLVE_RETRY);
        self.actions.push_back(SourceAction::AskOutcome);
    }

    /// An operator (`who`) calls the migration off. Before the release it
    /// aborts like any failure (the VM runs on here, the destination drops
    /// its shadow); from the release on the destination owns the VM and
    /// the answer is no.
    ///
    /// # Errors
    /// Too late (released, committed, resolving) or already over.
    pub fn handle_cancel(&mut self, now: Instant, who: &str) -> Result<(), String> {
        match self.state {
            State::Done => Err("it has already ended".into()),
            State::Releasing { .. } | State::Committed { .. } | State::Resolving { .. } => {
                Err(format!(
                    "too late: the VM was handed over to {} and the migration completes there",
                    self.to
                ))
            }
            _ => {
                self.fail(now, format!("cancelled by {who}"));
                Ok(())
            }
        }
    }

    /// A local operation or the link failed.
    pub fn handle_failure(&mut self, now: Instant, reason: String) {
        self.fail(now, reason);
    }

    /// The lanes have handed `total` wire bytes to the link so far (a
    /// running count): a migration that ends inside a round reports them.
    pub fn handle_data_sent(&mut self, total: u64) {
        self.sent_bytes = self.sent_bytes.max(total);
    }

    /// The share of packets the link to the destination has lost so far
    /// (the prediction counts the recovery of a lost packet).
    pub fn handle_loss(&mut self, loss: f64) {
        self.loss = loss.clamp(0.0, 1.0);
    }

    /// The link's round-trip time now (the least seen counts). A budget
    /// below what the link allows ([`downtime_floor`]) is said at once, as
    /// a progress note and in the report's phases, not found out when the
    /// rounds never converge.
    pub fn handle_rtt(&mut self, now: Instant, rtt: Duration) {
        if rtt.is_zero() {
            return;
        }
        self.rtt = if self.rtt.is_zero() {
            rtt
        } else {
            self.rtt.min(rtt)
        };
        let rtt = self.rtt;
        let floor = downtime_floor(rtt, self.options.resume_cost);
        if self.floor_noted || self.offer.cold || floor <= self.options.downtime_max {
            return;
        }
        self.floor_noted = true;
        let (floor_ms, budget_ms) = (
            floor.as_secs_f64() * 1e3,
            self.options.downtime_max.as_secs_f64() * 1e3,
        );
        self.timeline.instant(
            now,
            "budget_below_link",
            None,
            vec![
                ("floor_ms", Figure::Value(floor_ms)),
                ("budget_ms", Figure::Value(budget_ms)),
                ("rtt_ms", Figure::Value(rtt.as_secs_f64() * 1e3)),
            ],
        );
        self.progress_note(
            "budget below the link",
            format!(
                "the downtime budget of {budget_ms:.0} ms is below what this link allows: \
                 the switchover takes {SWITCHOVER_ONE_WAY_TRIPS} one-way trips of {:.1} ms \
                 ({floor_ms:.0} ms with the resume); it cannot converge unless the budget \
                 is raised (--downtime-ms)",
                rtt.as_secs_f64() * 1e3 / 2.0
            ),
        );
    }

    /// For a failure to converge: the link's floor, where the budget is
    /// below it.
    fn floor_hint(&self) -> String {
        if !self.floor_noted {
            return String::new();
        }
        let floor = downtime_floor(self.rtt, self.options.resume_cost);
        format!(
            "; this link allows no less than {:.0} ms",
            floor.as_secs_f64() * 1e3
        )
    }

    /// The timer from [`Self::poll_timeout`] fired.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(deadline) = self.deadline else {
            return;
        };
        if now < deadline {
            return;
        }
        if let State::Resolving {
            asking,
            ref mut failures,
            ..
        } = self.state
        {
            if asking {
                // An answer is on its way or the question fails; either
                // comes back.
                self.deadline = Some(now + RESOLVE_RETRY);
            } else {
                let attempt = *failures + 1;
                self.ask_outcome(now, attempt);
            }
            return;
        }
        let reason = match self.state {
            State::Done => return,
            State::Offered => format!("{} did not answer the offer", self.to),
            State::Copying { .. } | State::Collecting { .. } | State::WaitingForDisks { .. } => {
                format!(
                    "did not converge within {} s (predicted downtime {:.1} ms, budget {} ms{})",
                    self.options.precopy_time_max.as_secs(),
                    self.predicted.as_secs_f64() * 1e3,
                    self.options.downtime_max.as_millis(),
                    self.floor_hint()
                )
            }
            _ => format!(
                "switchover took longer than {} ms",
                self.options.switchover_time_max.as_millis()
            ),
        };
        self.fail(now, reason);
    }

    fn send_round(&mut self, now: Instant, round: u32, pages: DirtyBitmap, skip_zero: bool) {
        self.round_started_at = Some(now);
        self.round_pages = pages.count();
        let (name, parent) = if self.paused {
            ("final_pages", self.phase.switchover)
        } else {
            ("precopy.round", self.phase.precopy)
        };
        let phase = self.timeline.begin(now, name, parent);
        self.timeline
            .note(phase, "round", Figure::Count(u64::from(round)));
        self.timeline
            .note(phase, "pages_planned", Figure::Count(self.round_pages));
        self.phase.round = Some(phase);
        self.progress("precopy", round, self.round_pages);
        self.actions.push_back(SourceAction::SendRound {
            round,
            pages: Arc::new(pages),
            skip_zero,
        });
        self.state = State::Copying { round };
    }

    fn record_round(&mut self, now: Instant, round: u32, pages: u64, bytes: u64) {
        let started = self.round_started_at.expect("round started");
        assert_eq!(round as usize, self.rounds.len(), "rounds arrive in order");
        let duration_ms = (now - started).as_secs_f64() * 1e3;
        #[allow(clippy::cast_precision_loss)] // a rate
        let bandwidth_mb_s = bytes as f64 / 1e3 / duration_ms.max(1e-3);
        self.rounds.push(RoundReport {
            round,
            start_ms: self.timeline.offset_ms(started),
            pages,
            bytes,
            duration_ms,
            dirty_after: 0,
            dirty_rate_pages_per_s: 0.0,
            bandwidth_mb_s,
            predicted_downtime_ms: 0.0,
            throttle_percent: self.throttle,
        });
        if let Some(phase) = self.phase.round.take() {
            let t = &mut self.timeline;
            t.note(phase, "pages", Figure::Count(pages));
            t.note(phase, "bytes", Figure::Count(bytes));
            t.note(phase, "bandwidth_mb_s", Figure::Value(bandwidth_mb_s));
            t.note(
                phase,
                "throttle_percent",
                Figure::Count(u64::from(self.throttle)),
            );
            t.end(now, phase);
        }
    }

    /// The dirty set after the last round: onto its report and its phase.
    fn note_dirty(&mut self, count: u64, predicted: Duration) {
        let Some(last) = self.rounds.last_mut() else {
            return;
        };
        let seconds = (last.duration_ms / 1e3).max(1e-6);
        last.dirty_after = count;
        #[allow(clippy::cast_precision_loss)] // a rate
        let rate = count as f64 / seconds;
        last.dirty_rate_pages_per_s = rate;
        last.predicted_downtime_ms = predicted.as_secs_f64() * 1e3;
    }

    /// Records the convergence decision after a round.
    fn decide(&mut self, now: Instant, dirty: u64, predicted: Duration, decision: &str) {
        let figures = vec![
            ("dirty_pages", Figure::Count(dirty)),
            ("predicted_ms", Figure::Value(predicted.as_secs_f64() * 1e3)),
            (
                "budget_ms",
                Figure::Value(self.options.downtime_max.as_secs_f64() * 1e3),
            ),
            ("bandwidth_mb_s", Figure::Value(self.bandwidth() / 1e6)),
            ("decision", Figure::Text(decision.to_owned())),
        ];
        self.timeline
            .instant(now, "convergence", self.phase.precopy, figures);
    }

    /// Rounds acknowledged so far (bounded by `rounds_max`, a `u32`).
    fn rounds_done(&self) -> u32 {
        u32::try_from(self.rounds.len()).expect("rounds are bounded by rounds_max")
    }

    /// Bytes per second over all rounds so far. A round's time runs from
    /// its first page sent to its acknowledgement, so it holds one round
    /// trip that carried no data; that trip is taken out here (the
    /// switchover's own trips are counted apart, in the downtime floor),
    /// or on a long link a small round would look many times slower than
    /// the link is.
    pub(crate) fn bandwidth(&self) -> f64 {
        let bytes: u64 = self.rounds.iter().map(|r| r.bytes).sum();
        let ms: f64 = self.rounds.iter().map(|r| r.duration_ms).sum();
        #[allow(clippy::cast_precision_loss)] // a count of rounds
        let trips_ms = self.rounds.len() as f64 * self.rtt.as_secs_f64() * 1e3;
        let sending_ms = (ms - trips_ms).max(ms * MIN_SENDING_SHARE);
        #[allow(clippy::cast_precision_loss)]
        let rate = bytes as f64 / (sending_ms / 1e3).max(1e-6);
        rate
    }

    fn state_bytes_estimate(&self) -> u64 {
        if self.state_bytes > 0 {
            self.state_bytes
        } else {
            STATE_BYTES_ESTIMATE
        }
    }

    fn progress(&mut self, phase: &str, round: u32, pages_left: u64) {
        self.events.push_back(SourceEvent::Progress(Progress {
            phase: phase.to_owned(),
            round,
            pages_left,
            pages_total: self.pages_total,
            rate_bytes_per_s: self.bandwidth(),
            predicted_downtime_ms: self.predicted.as_secs_f64() * 1e3,
            throttle_percent: self.throttle,
        }));
    }

    /// Progress that is a sentence, not figures (waiting, in doubt).
    fn progress_note(&mut self, phase: &str, note: String) {
        self.events
            .push_back(SourceEvent::Progress(Progress::phase(format!(
                "{phase}: {note}"
            ))));
    }

    fn fail(&mut self, now: Instant, reason: String) {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Done => {}
            State::Committed { paused_at } => {
                // Ownership is gone: never resume here on our own. Ask the
                // destination whether it took the VM.
                self.actions.push_back(SourceAction::Close);
                self.timeline.instant(
                    now,
                    "link_lost",
                    None,
                    vec![("reason", Figure::Text(reason.clone()))],
                );
                self.timeline.begin(now, "resolve", None);
                self.state = State::Resolving {
                    paused_at,
                    reason,
                    asking: false,
                    failures: 0,
                };
                self.ask_outcome(now, 1);
            }
            State::Resolving {
                paused_at,
                reason: first,
                failures,
                ..
            } => {
                // No answer: ask again later, for as long as it takes.
                let wait = resolve_retry(failures);
                self.state = State::Resolving {
                    paused_at,
                    reason: first,
                    asking: false,
                    failures: failures + 1,
                };
                self.deadline = Some(now + wait);
                let to = self.to.clone();
                self.progress_note(
                    "in doubt",
                    format!(
                        "{to} cannot be asked how it ended ({reason}); asking again in {:.1} s (attempt {})",
                        wait.as_secs_f64(),
                        failures + 1
                    ),
                );
            }
            state => {
                let paused_at = match state {
                    State::FinalCollect { paused_at, .. }
                    | State::Switching { paused_at, .. }
                    | State::Releasing { paused_at } => Some(paused_at),
                    _ => None,
                };
                self.actions.push_back(SourceAction::Send(SourceMsg::Abort {
                    reason: reason.clone(),
                }));
                if self.logging {
                    self.logging = false;
                    self.actions.push_back(SourceAction::StopDirtyLog);
                }
                if self.throttle > 0 {
                    self.throttle = 0;
                    self.actions.push_back(SourceAction::SetThrottle(0));
                }
                if !self.offer.vm.disks.is_empty() {
                    self.actions.push_back(SourceAction::AbortStorage);
                }
                if self.paused && !self.offer.cold {
                    self.actions.push_back(SourceAction::ResumeLocal);
                }
                self.actions.push_back(SourceAction::Close);
                let downtime = paused_at.map_or(Duration::ZERO, |p| now - p);
                self.timeline.instant(
                    now,
                    "abort",
                    None,
                    vec![("reason", Figure::Text(reason.clone()))],
                );
                self.finish(now, Outcome::Aborted { reason }, downtime);
            }
        }
    }

    fn finish(&mut self, now: Instant, outcome: Outcome, downtime: Duration) {
        self.state = State::Done;
        self.timeline.end_all(now);
        let started = self.started_at.unwrap_or(now);
        // The rounds count what the destination confirmed; the lanes'
        // count runs ahead of it inside a round the migration ended in.
        let bytes: u64 = self
            .rounds
            .iter()
            .map(|r| r.bytes)
            .sum::<u64>()
            .max(self.sent_bytes);
        // Known whenever both sides hashed: a mismatch fails the migration
        // before the release, and its report says why.
        let memory_verified = match (self.source_hash, self.dest_hash) {
            (Some(a), Some(b)) => Some(a == b),
            _ => None,
        };
        let report = MigrationReport {
            migration_id: self.offer.migration_id,
            started_unix_ms: 0,
            vm: self.offer.vm.name.clone(),
            from: self.from.clone(),
            to: self.to.clone(),
            cold: self.offer.cold,
            outcome,
            total_ms: (now - started).as_secs_f64() * 1e3,
            downtime_ms: if self.offer.cold {
                0.0
            } else {
                downtime.as_secs_f64() * 1e3
            },
            predicted_downtime_ms: self.predicted.as_secs_f64() * 1e3,
            bytes_sent: bytes,
            pages_sent: self.rounds.iter().map(|r| r.pages).sum(),
            rounds: self.rounds_done(),
            round_log: self.rounds.clone(),
            throughput_mb_s: self.bandwidth() / 1e6,
            throttle_max_percent: self.throttle_max,
            state_bytes: self.state_bytes,
            memory_verified,
            disks: self.disk_reports.clone(),
            phases: self.timeline.phases().to_vec(),
            destination: None,
        };
        let hash_pending = report.outcome == Outcome::Completed
            && self.offer.verify_memory
            && self.source_hash.is_none();
        if hash_pending {
            self.held = Some(report);
        } else {
            self.events
                .push_back(SourceEvent::Finished(Box::new(report)));
        }
    }
}
