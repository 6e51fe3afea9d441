//! The destination side of a migration, as a sans-IO state machine.
//!
//! Admission (capacity, CPU features) happens before the machine exists:
//! see [`super::admission`]. The machine starts by creating the paused
//! shadow VM.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::report::DestReport;
use super::timeline::{Figure, PhaseId, Timeline};
use super::wire::{DestMsg, Mac, Offer, SourceMsg};

/// Silence from the source for this long before the commit discards the
/// shadow: no control message, no lane mark and no page data (a round may
/// take many minutes on a slow link; only the data stopping counts).
pub const IDLE_MAX: Duration = Duration::from_secs(30);

/// What the pump must do for the destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestAction {
    /// Send a message on the control stream.
    Send(DestMsg),
    /// Create the paused shadow VM (and prepare its memory in the
    /// background), then call [`DestMachine::handle_shadow_created`].
    CreateShadow,
    /// Apply vCPU and device state to the shadow, then call
    /// [`DestMachine::handle_restored`].
    RestoreState(Vec<u8>),
    /// Hash shadow memory, then call [`DestMachine::handle_memory_hash`].
    HashMemory,
    /// Take the VM over with this generation: its disks opened here and
    /// the VM durable in this host's inventory, together with the
    /// migration that brought it (so a source asking later is told the
    /// truth), then call [`DestMachine::handle_adopted`]. Nothing is
    /// acknowledged to the source before this is durable.
    Adopt {
        /// The VM's new ownership generation.
        generation: u64,
    },
    /// Run the vCPUs, then call [`DestMachine::handle_resumed`].
    Resume,
    /// Tell the virtual network that `mac` lives here now.
    AnnounceMac(Mac),
    /// Drop the shadow VM and its memory.
    DiscardShadow,
    /// Close the lanes and the control stream.
    Close,
}

/// How the destination's part ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestOutcome {
    /// The VM is ours (running unless cold).
    Adopted,
    /// The shadow was discarded; the VM stays with the source.
    Discarded(String),
    /// Ours, but resuming failed.
    ResumeFailed(String),
}

#[derive(Debug)]
enum State {
    Creating,
    Receiving { switchover: Option<(u32, Vec<u8>)> },
    Restoring,
    Hashing,
    AwaitingCommit,
    Adopting,
    Resuming,
    Done,
}

/// The destination of one migration.
///
/// Polling order is the source's: after each `handle_*`, drain
/// [`Self::poll_action`] (feeding results back), then [`Self::poll_event`],
/// then re-arm the timer from [`Self::poll_timeout`].
#[derive(Debug)]
pub struct DestMachine {
    offer: Offer,
    lanes: u32,
    state: State,
    actions: VecDeque<DestAction>,
    events: VecDeque<DestOutcome>,
    lane_next_round: Vec<u32>,
    round_totals: Vec<(u64, u64)>,
    rounds_complete: u32,
    /// Wire bytes the lanes have taken in so far, rounds finished or not.
    arrived_bytes: u64,
    last_heard: Instant,
    committed: bool,
    shadow: bool,
    timeline: Timeline,
    /// The phase on now, and the switchover it is part of.
    phase: Option<PhaseId>,
    switchover: Option<PhaseId>,
    switchover_at: Option<Instant>,
    downtime_ms: f64,
    outcome: Option<DestOutcome>,
}

impl DestMachine {
    /// An admitted offer; `lanes` is how many bulk streams we take.
    pub fn new(now: Instant, offer: Offer, lanes: u32) -> Self {
        assert!(lanes > 0, "at least one lane");
        let mut m = Self {
            offer,
            lanes,
            state: State::Creating,
            actions: VecDeque::new(),
            events: VecDeque::new(),
            lane_next_round: vec![0; lanes as usize],
            round_totals: Vec::new(),
            rounds_complete: 0,
            arrived_bytes: 0,
            last_heard: now,
            committed: false,
            shadow: false,
            timeline: Timeline::default(),
            phase: None,
            switchover: None,
            switchover_at: None,
            downtime_ms: 0.0,
            outcome: None,
        };
        m.timeline.start(now);
        m.enter(now, Some("shadow"));
        m.actions.push_back(DestAction::CreateShadow);
        m
    }

    /// Ends the phase on now and begins `next` (inside the switchover once
    /// it began).
    fn enter(&mut self, now: Instant, next: Option<&str>) {
        if let Some(p) = self.phase.take() {
            self.timeline.end(now, p);
        }
        if let Some(name) = next {
            self.phase = Some(self.timeline.begin(now, name, self.switchover));
        }
    }

    /// The phases so far (offsets from the offer's arrival).
    pub fn timeline(&self) -> &Timeline {
        &self.timeline
    }

    /// This side's report, `from` the source host `to` this one.
    pub fn report(&self, now: Instant, from: &str, to: &str) -> DestReport {
        let outcome = match &self.outcome {
            None => "in progress".to_owned(),
            Some(DestOutcome::Adopted) => "adopted".to_owned(),
            Some(DestOutcome::Discarded(why)) => format!("discarded: {why}"),
            Some(DestOutcome::ResumeFailed(why)) => format!("resume failed: {why}"),
        };
        DestReport {
            migration_id: self.offer.migration_id,
            started_unix_ms: 0,
            vm: self.offer.vm.name.clone(),
            from: from.to_owned(),
            to: to.to_owned(),
            outcome,
            total_ms: self.timeline.offset_ms(now),
            downtime_ms: self.downtime_ms,
            rounds: self.rounds_complete,
            pages_received: self.round_totals.iter().map(|r| r.0).sum(),
            // Data counted as it arrives runs ahead of the rounds' marks:
            // a migration that ends inside a round still counts what crossed.
            bytes_received: self
                .round_totals
                .iter()
                .map(|r| r.1)
                .sum::<u64>()
                .max(self.arrived_bytes),
            phases: self.timeline.phases().to_vec(),
        }
    }

    /// Lanes in use.
    pub fn lanes(&self) -> u32 {
        self.lanes
    }

    /// The offer being served.
    pub fn offer(&self) -> &Offer {
        &self.offer
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<DestAction> {
        self.actions.pop_front()
    }

    /// How the migration ended, once.
    pub fn poll_event(&mut self) -> Option<DestOutcome> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Done => None,
            _ if self.committed => None,
            _ => Some(self.last_heard + IDLE_MAX),
        }
    }

    /// Whether it is over.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// A completion arrives for an action queued before a failure ended
    /// the migration (the pump carries out every queued action): nothing
    /// more to do with it.
    fn finished_meanwhile(&self) -> bool {
        self.is_done()
    }

    /// The shadow VM exists (`Ok`) or could not be made.
    pub fn handle_shadow_created(&mut self, now: Instant, result: Result<(), String>) {
        if self.finished_meanwhile() {
            return;
        }
        assert!(matches!(self.state, State::Creating), "{:?}", self.state);
        self.last_heard = now;
        match result {
            Ok(()) => {
                self.shadow = true;
                self.enter(now, Some("receive"));
                self.state = State::Receiving { switchover: None };
                self.actions
                    .push_back(DestAction::Send(DestMsg::Accepted { lanes: self.lanes }));
            }
            Err(why) => {
                self.actions.push_back(DestAction::Send(DestMsg::Refused(
                    super::wire::Refusal::ShadowFailed(why.clone()),
                )));
                self.end(now, DestOutcome::Discarded(why));
            }
        }
    }

    /// The lanes have taken in `total` wire bytes so far (a running
    /// count): arriving data is a sign of life, so a first round that
    /// takes minutes on a slow link is not mistaken for a silent source.
    pub fn handle_data_arrived(&mut self, now: Instant, total: u64) {
        if total > self.arrived_bytes {
            self.arrived_bytes = total;
            self.last_heard = now;
        }
    }

    /// Lane `lane` finished round `round` with `pages` pages in `bytes`
    /// wire bytes.
    pub fn handle_lane_mark(
        &mut self,
        now: Instant,
        lane: u32,
        round: u32,
        pages: u64,
        bytes: u64,
    ) {
        self.last_heard = now;
        if !matches!(self.state, State::Receiving { .. }) {
            return self.fail(
                now,
                format!("lane {lane} sent round {round} after the last round"),
            );
        }
        let Some(next) = self.lane_next_round.get(lane as usize).copied() else {
            return self.fail(now, format!("lane {lane} of {}", self.lanes));
        };
        if round != next {
            return self.fail(
                now,
                format!("lane {lane} sent round {round}, expected {next}"),
            );
        }
        self.lane_next_round[lane as usize] += 1;
        let index = round as usize;
        if self.round_totals.len() <= index {
            self.round_totals.resize(index + 1, (0, 0));
        }
        self.round_totals[index].0 += pages;
        self.round_totals[index].1 += bytes;
        let all_done = *self.lane_next_round.iter().min().expect("lanes");
        while self.rounds_complete < all_done {
            let (pages, bytes) = self.round_totals[self.rounds_complete as usize];
            let figures = vec![
                ("round", Figure::Count(u64::from(self.rounds_complete))),
                ("pages", Figure::Count(pages)),
                ("bytes", Figure::Count(bytes)),
            ];
            let parent = self.switchover.or(self.phase);
            self.timeline
                .instant(now, "round.received", parent, figures);
            self.actions
                .push_back(DestAction::Send(DestMsg::RoundReceived {
                    round: self.rounds_complete,
                    pages,
                    bytes,
                }));
            self.rounds_complete += 1;
        }
        self.try_restore(now);
    }

    /// A message from the source.
    pub fn handle_message(&mut self, now: Instant, msg: SourceMsg) {
        self.last_heard = now;
        match (&mut self.state, msg) {
            (State::Done, _) => {}
            (_, SourceMsg::Abort { reason }) if !self.committed => {
                self.fail_quietly(now, format!("source aborted: {reason}"));
            }
            (State::Receiving { switchover }, SourceMsg::Switchover { final_round, state })
                if switchover.is_none() =>
            {
                if final_round < self.rounds_complete.saturating_sub(1) {
                    return self.fail(
                        now,
                        format!(
                            "final round {final_round} is older than round {} already received",
                            self.rounds_complete
                        ),
                    );
                }
                *switchover = Some((final_round, state));
                self.switchover_at = Some(now);
                self.enter(now, None);
                self.switchover = Some(self.timeline.begin(now, "switchover", None));
                self.enter(now, Some("final_pages"));
                self.try_restore(now);
            }
            (State::AwaitingCommit, SourceMsg::Commit { generation }) => {
                // The source has released the VM: from here on a lost link
                // changes nothing, the VM is taken over.
                self.committed = true;
                self.state = State::Adopting;
                self.actions.push_back(DestAction::Adopt { generation });
            }
            (_, other) => self.fail(
                now,
                format!("unexpected message from the source: {other:?}"),
            ),
        }
    }

    fn try_restore(&mut self, now: Instant) {
        let State::Receiving {
            switchover: Some((final_round, _)),
        } = &self.state
        else {
            return;
        };
        if self.rounds_complete <= *final_round {
            return;
        }
        let State::Receiving {
            switchover: Some((_, state)),
        } = std::mem::replace(&mut self.state, State::Restoring)
        else {
            unreachable!("matched above")
        };
        self.enter(now, Some("restore"));
        self.actions.push_back(DestAction::RestoreState(state));
    }

    /// State applied (or not).
    pub fn handle_restored(&mut self, now: Instant, result: Result<(), String>) {
        if self.finished_meanwhile() {
            return;
        }
        assert!(matches!(self.state, State::Restoring), "{:?}", self.state);
        self.last_heard = now;
        if let Err(why) = result {
            return self.fail(now, format!("restoring state: {why}"));
        }
        if self.offer.verify_memory {
            self.enter(now, Some("verify"));
            self.state = State::Hashing;
            self.actions.push_back(DestAction::HashMemory);
        } else {
            self.enter(now, Some("await_commit"));
            self.state = State::AwaitingCommit;
            self.actions
                .push_back(DestAction::Send(DestMsg::Ready { memory_hash: None }));
        }
    }

    /// Memory hashed.
    pub fn handle_memory_hash(&mut self, now: Instant, hash: u64) {
        if self.finished_meanwhile() {
            return;
        }
        assert!(matches!(self.state, State::Hashing), "{:?}", self.state);
        self.last_heard = now;
        self.enter(now, Some("await_commit"));
        self.state = State::AwaitingCommit;
        self.actions.push_back(DestAction::Send(DestMsg::Ready {
            memory_hash: Some(hash),
        }));
    }

    /// The VM is taken over durably (`Ok`), or could not be (its disks
    /// would not open, the store would not write): then it is dropped
    /// here before it ever ran, and the source, told so, runs it again.
    pub fn handle_adopted(&mut self, now: Instant, result: Result<(), String>) {
        if self.finished_meanwhile() {
            return;
        }
        assert!(matches!(self.state, State::Adopting), "{:?}", self.state);
        match result {
            Ok(()) if self.offer.cold => {
                self.actions
                    .push_back(DestAction::Send(DestMsg::Resumed { running: false }));
                self.actions.push_back(DestAction::Close);
                self.end(now, DestOutcome::Adopted);
            }
            Ok(()) => {
                self.enter(now, Some("resume"));
                self.state = State::Resuming;
                self.actions.push_back(DestAction::Resume);
            }
            Err(why) => {
                let reason = format!("taking the VM over failed: {why}");
                self.actions.push_back(DestAction::DiscardShadow);
                self.actions.push_back(DestAction::Send(DestMsg::Aborted {
                    reason: reason.clone(),
                }));
                self.actions.push_back(DestAction::Close);
                self.timeline.instant(
                    now,
                    "discard",
                    None,
                    vec![("reason", Figure::Text(reason.clone()))],
                );
                self.end(now, DestOutcome::Discarded(reason));
            }
        }
    }

    /// The vCPUs run (or failed to).
    pub fn handle_resumed(&mut self, now: Instant, result: Result<(), String>) {
        if self.finished_meanwhile() {
            return;
        }
        assert!(matches!(self.state, State::Resuming), "{:?}", self.state);
        if let Some(at) = self.switchover_at {
            self.downtime_ms = (now - at).as_secs_f64() * 1e3;
        }
        match result {
            Ok(()) => {
                self.actions
                    .push_back(DestAction::AnnounceMac(self.offer.vm.mac));
                self.actions
                    .push_back(DestAction::Send(DestMsg::Resumed { running: true }));
                self.actions.push_back(DestAction::Close);
                self.end(now, DestOutcome::Adopted);
            }
            Err(why) => {
                self.actions.push_back(DestAction::Send(DestMsg::Aborted {
                    reason: format!("resume failed: {why}"),
                }));
                self.actions.push_back(DestAction::Close);
                self.end(now, DestOutcome::ResumeFailed(why));
            }
        }
    }

    /// The link or a local operation failed.
    pub fn handle_failure(&mut self, now: Instant, reason: String) {
        if self.committed {
            // The VM is ours; a lost link after the commit changes nothing,
            // the resume goes on.
            return;
        }
        self.fail_quietly(now, reason);
    }

    /// The timer fired.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(due) = self.poll_timeout()
            && now >= due
        {
            self.fail(
                now,
                format!("no word from the source for {} s", IDLE_MAX.as_secs()),
            );
        }
    }

    /// Gives up, telling the source.
    fn fail(&mut self, now: Instant, reason: String) {
        if self.committed || matches!(self.state, State::Done) {
            return;
        }
        self.actions.push_back(DestAction::Send(DestMsg::Aborted {
            reason: reason.clone(),
        }));
        self.fail_quietly(now, reason);
    }

    fn fail_quietly(&mut self, now: Instant, reason: String) {
        if matches!(self.state, State::Done) {
            return;
        }
        if self.shadow {
            self.actions.push_back(DestAction::DiscardShadow);
        }
        self.actions.push_back(DestAction::Close);
        self.timeline.instant(
            now,
            "discard",
            None,
            vec![("reason", Figure::Text(reason.clone()))],
        );
        self.end(now, DestOutcome::Discarded(reason));
    }

    fn end(&mut self, now: Instant, outcome: DestOutcome) {
        self.state = State::Done;
        self.timeline.end_all(now);
        self.outcome = Some(outcome.clone());
        self.events.push_back(outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer() -> Offer {
        crate::migration::wire::test_offer("slow-link", 1 << 30, &[])
    }

    /// A destination receiving its first round (shadow made, accepted).
    fn receiving(start: Instant) -> DestMachine {
        let mut m = DestMachine::new(start, offer(), 1);
        m.handle_shadow_created(start, Ok(()));
        while m.poll_action().is_some() {}
        m
    }

    fn aborted(m: &mut DestMachine) -> Option<String> {
        std::iter::from_fn(|| m.poll_action()).find_map(|a| match a {
            DestAction::Send(DestMsg::Aborted { reason }) => Some(reason),
            _ => None,
        })
    }

    #[test]
    fn a_round_of_minutes_with_data_arriving_is_not_silence() {
        let start = Instant::now();
        let mut m = receiving(start);
        // Five minutes of one round on a slow link: 1 MB every 10 s.
        for step in 1..=30u64 {
            let now = start + Duration::from_secs(10 * step);
            m.handle_data_arrived(now, step << 20);
            m.handle_timeout(now);
            assert_eq!(aborted(&mut m), None, "aborted after {} s", 10 * step);
        }
        assert!(!m.is_done());
        // The data stops: the watchdog fires IDLE_MAX after the last byte.
        let last = start + Duration::from_secs(300);
        m.handle_data_arrived(last + Duration::from_secs(10), 30 << 20);
        m.handle_timeout(last + IDLE_MAX - Duration::from_secs(1));
        assert_eq!(aborted(&mut m), None, "the same count is no new data");
        m.handle_timeout(last + IDLE_MAX);
        let reason = aborted(&mut m).expect("silence aborts");
        assert!(reason.contains("no word from the source"), "{reason}");
    }

    #[test]
    fn the_report_counts_the_bytes_of_an_unfinished_round() {
        let start = Instant::now();
        let mut m = receiving(start);
        m.handle_data_arrived(start + Duration::from_secs(1), 300 << 20);
        m.handle_failure(start + Duration::from_secs(2), "link lost".into());
        let report = m.report(start + Duration::from_secs(2), "a", "b");
        assert_eq!(report.bytes_received, 300 << 20);
        assert_eq!(report.rounds, 0);
    }
}
