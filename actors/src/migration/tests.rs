//! Protocol tests: both state machines driven against each other in memory
//! with virtual time, a bandwidth model and synthetic guests, table-driven
//! through [`run`].

#![allow(clippy::cast_possible_truncation)] // small test sizes

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use super::*;
use crate::guest::{GuestBackend, PAGE_BYTES};
use crate::synthetic::{FILL_START, SyntheticGuest, SyntheticParams};

const MEMORY_BYTES: u64 = 32 << 20;
const LANES: u32 = 3;

#[derive(Debug, Clone)]
struct Case {
    wss_bytes: u64,
    writes_per_sec: u64,
    bandwidth_bytes_per_s: f64,
    options: MigrationOptions,
    features: Vec<&'static str>,
    /// The link breaks when this many control messages have passed.
    cut_after_messages: Option<usize>,
    /// After the cut the destination cannot even be asked how it ended.
    unreachable_after_cut: bool,
    stopped: bool,
    /// An operator cancels when this many control messages have passed.
    cancel_after_messages: Option<usize>,
    /// An operator fences (`vm recover --force`) once the source has
    /// asked an unreachable destination this many times.
    fence_after_questions: Option<usize>,
    /// This page arrives with one byte changed.
    corrupt_gfn: Option<u64>,
    /// When this many control messages have passed (long before the
    /// release), an operator tries `vm recover --force` and a stale
    /// "never took it" answer arrives.
    stray_recover_after_messages: Option<usize>,
}

impl Default for Case {
    fn default() -> Self {
        Self {
            wss_bytes: 0,
            writes_per_sec: 100_000,
            bandwidth_bytes_per_s: 1e9,
            options: MigrationOptions {
                lanes: LANES,
                verify_memory: true,
                ..MigrationOptions::default()
            },
            features: vec!["sse2"],
            cut_after_messages: None,
            unreachable_after_cut: false,
            stopped: false,
            cancel_after_messages: None,
            fence_after_questions: None,
            corrupt_gfn: None,
            stray_recover_after_messages: None,
        }
    }
}

#[derive(Debug)]
struct Ending {
    report: MigrationReport,
    dest: DestOutcome,
    source_running: bool,
    source_freed: bool,
    dest_running: bool,
    memory_equal_at_pause: Option<bool>,
    dest_report: Option<DestReport>,
    cancel_answer: Option<Result<(), String>>,
    /// How often the source asked how it ended.
    questions: usize,
    /// The generation an operator's fence gave the VM.
    fenced_generation: Option<u64>,
    /// The source resumed the VM before any fence or answer said so.
    resumed_in_doubt: bool,
    /// Simulated time from start to the end.
    elapsed: Duration,
}

enum Msg {
    ToDest(SourceMsg),
    ToSource(DestMsg),
}

fn run(case: Case) -> Ending {
    let params = SyntheticParams {
        memory_bytes: MEMORY_BYTES,
        wss_bytes: case.wss_bytes,
        seed: 9,
        writes_per_sec: case.writes_per_sec,
    };
    let mut src_guest = SyntheticGuest::booted(params);
    if case.stopped {
        src_guest.pause().expect("stop");
    }
    let config = VmConfig {
        name: "web-1".into(),
        memory_bytes: MEMORY_BYTES,
        vcpus: 1,
        cpu_features: case.features.iter().map(|s| (*s).to_owned()).collect(),
        mac: [0x52, 0x54, 0, 0, 0, 1],
        kind: GuestKind::Synthetic {
            wss_bytes: case.wss_bytes,
            seed: 9,
            writes_per_sec: case.writes_per_sec,
        },
        disks: Vec::new(),
    };
    let capacity = Capacity {
        memory_bytes: 1 << 30,
        vcpus: 4,
        cpu_features: BTreeSet::from(["sse2".to_owned(), "avx2".to_owned()]),
        kvm: false,
    };
    let mut now = Instant::now();
    let mut options = case.options.clone();
    options.cold = case.stopped;
    let mut src = SourceMachine::new(1, config, 1, "a".into(), "b".into(), options);
    let mut dst: Option<DestMachine> = None;
    let mut dst_guest: Option<SyntheticGuest> = None;
    let mut wire: VecDeque<Msg> = VecDeque::new();
    let mut messages = 0usize;
    let mut cut = false;
    let mut report = None;
    let mut dest_outcome = None;
    let mut source_freed = false;
    let mut hash_at_pause = None;
    let latency = Duration::from_micros(50);
    let mut asked = false;
    let mut cancel_answer = None;
    let mut questions = 0usize;
    let mut fenced_generation = None;
    let mut resumed_in_doubt = false;
    let started = now;
    src.start(now);

    for _ in 0..1_000_000 {
        while let Some(action) = src.poll_action() {
            match action {
                SourceAction::Send(m) => wire.push_back(Msg::ToDest(m)),
                SourceAction::StartDirtyLog => src_guest.start_dirty_log().expect("log"),
                SourceAction::StopDirtyLog => src_guest.stop_dirty_log().expect("log"),
                SourceAction::StartStorage
                | SourceAction::FinishStorage
                | SourceAction::AbortStorage => panic!("these VMs have no disks"),
                SourceAction::SendRound {
                    round,
                    pages,
                    skip_zero,
                } => {
                    let mut per_lane = vec![(0u64, 0u64); LANES as usize];
                    let mut buf = vec![0u8; PAGE_BYTES as usize];
                    let ram = dst_guest.as_ref().map(GuestBackend::ram);
                    for gfn in pages.iter() {
                        src_guest.read_page(gfn, &mut buf).expect("read");
                        let zero = buf.iter().all(|b| *b == 0);
                        if zero && skip_zero {
                            continue;
                        }
                        if !cut && let Some(ram) = &ram {
                            if case.corrupt_gfn == Some(gfn) {
                                buf[7] ^= 0x40;
                            }
                            ram.write_page(gfn, &buf).expect("write");
                        }
                        let lane = &mut per_lane[(gfn % u64::from(LANES)) as usize];
                        lane.0 += 1;
                        lane.1 += 16 + if zero { 0 } else { PAGE_BYTES };
                    }
                    let bytes: u64 = per_lane.iter().map(|l| l.1).sum();
                    #[allow(clippy::cast_precision_loss)]
                    let dt = Duration::from_secs_f64(bytes as f64 / case.bandwidth_bytes_per_s);
                    src_guest.run_for(dt);
                    now += dt + latency;
                    if !cut && let Some(d) = dst.as_mut() {
                        for (lane, (pages, bytes)) in per_lane.into_iter().enumerate() {
                            d.handle_lane_mark(now, lane as u32, round, pages, bytes);
                        }
                    }
                }
                SourceAction::CollectDirty => {
                    let dirty = src_guest.take_dirty().expect("dirty");
                    src.handle_dirty(now, dirty);
                }
                SourceAction::SetThrottle(p) => src_guest.set_throttle(p).expect("throttle"),
                SourceAction::Pause => {
                    src_guest.pause().expect("pause");
                    src.handle_paused(now);
                }
                SourceAction::SaveState => {
                    hash_at_pause = Some(src_guest.ram().hash());
                    let state = src_guest.save_state().expect("save");
                    src.handle_state_saved(now, state);
                }
                SourceAction::HashMemory => src.handle_memory_hash(now, src_guest.ram().hash()),
                SourceAction::ReleaseOwnership { .. } => src.handle_released(now),
                SourceAction::ResumeLocal => {
                    resumed_in_doubt |=
                        questions > 0 && fenced_generation.is_none() && case.unreachable_after_cut;
                    src_guest.resume().expect("resume");
                }
                SourceAction::Fence { generation } => fenced_generation = Some(generation),
                SourceAction::FreeVm => source_freed = true,
                SourceAction::AskOutcome => {
                    asked = true;
                    questions += 1;
                }
                SourceAction::Close => {}
            }
        }
        while let Some(e) = src.poll_event() {
            if let SourceEvent::Finished(r) = e {
                report = Some(*r);
            }
        }
        if let Some(d) = dst.as_mut() {
            while let Some(action) = d.poll_action() {
                match action {
                    DestAction::Send(m) => wire.push_back(Msg::ToSource(m)),
                    DestAction::CreateShadow => {
                        dst_guest = Some(SyntheticGuest::blank(params));
                        d.handle_shadow_created(now, Ok(()));
                    }
                    DestAction::RestoreState(state) => {
                        let g = dst_guest.as_mut().expect("shadow");
                        let r = g.restore_state(&state).map_err(|e| e.to_string());
                        d.handle_restored(now, r);
                    }
                    DestAction::HashMemory => {
                        let h = dst_guest.as_ref().expect("shadow").ram().hash();
                        d.handle_memory_hash(now, h);
                    }
                    DestAction::Resume => {
                        dst_guest
                            .as_mut()
                            .expect("shadow")
                            .resume()
                            .expect("resume");
                        d.handle_resumed(now, Ok(()));
                    }
                    DestAction::DiscardShadow => dst_guest = None,
                    DestAction::Adopt { .. } => d.handle_adopted(now, Ok(())),
                    DestAction::AnnounceMac(_) | DestAction::Close => {}
                }
            }
            while let Some(o) = d.poll_event() {
                dest_outcome = Some(o);
            }
        }
        // A question about the outcome is answered once the destination
        // has settled (or not at all, when it is unreachable).
        if asked && (dest_outcome.is_some() || dst.is_none()) {
            asked = false;
            if case.unreachable_after_cut {
                if case.fence_after_questions.is_some_and(|n| questions >= n) {
                    src.handle_fence(now, "ops").expect("in doubt");
                } else {
                    src.handle_resolution_failed(now, "unreachable".into());
                }
            } else {
                let committed = dest_outcome == Some(DestOutcome::Adopted);
                src.handle_resolution(now, committed);
            }
            continue;
        }
        if report.is_some() && (dest_outcome.is_some() || dst.is_none()) && wire.is_empty() {
            break;
        }
        let due = [
            src.poll_timeout(),
            dst.as_ref().and_then(DestMachine::poll_timeout),
        ]
        .into_iter()
        .flatten()
        .min();
        if due.is_some_and(|due| due <= now) {
            src.handle_timeout(now);
            if let Some(d) = dst.as_mut() {
                d.handle_timeout(now);
            }
            continue;
        }
        if let Some(msg) = wire.pop_front() {
            now += latency;
            messages += 1;
            if cut {
                continue;
            }
            if case.cancel_after_messages == Some(messages) {
                cancel_answer = Some(src.handle_cancel(now, "ops"));
            }
            if case.stray_recover_after_messages == Some(messages) {
                cancel_answer = Some(src.handle_fence(now, "ops"));
                src.handle_resolution(now, false);
            }
            if case.cut_after_messages == Some(messages) {
                cut = true;
                wire.clear();
                src.handle_failure(now, "connection lost".into());
                if let Some(d) = dst.as_mut() {
                    d.handle_failure(now, "connection lost".into());
                }
                continue;
            }
            match msg {
                Msg::ToDest(SourceMsg::Offer(offer)) => {
                    match admit(&offer, &capacity, Usage::default(), false) {
                        Ok(()) => dst = Some(DestMachine::new(now, *offer, LANES)),
                        Err(refusal) => wire.push_back(Msg::ToSource(DestMsg::Refused(refusal))),
                    }
                }
                Msg::ToDest(m) => {
                    if let Some(d) = dst.as_mut() {
                        d.handle_message(now, m);
                    }
                }
                Msg::ToSource(m) => src.handle_message(now, m),
            }
        } else {
            // Nothing in flight: time passes until a timer fires.
            let due = due.expect("something is waiting");
            let dt = due.saturating_duration_since(now);
            src_guest.run_for(dt);
            now = now.max(due);
            src.handle_timeout(now);
            if let Some(d) = dst.as_mut() {
                d.handle_timeout(now);
            }
        }
    }
    let report = report.expect("the source always reports");
    let memory_equal_at_pause = match (&dst_guest, hash_at_pause) {
        (Some(g), Some(h)) if report.completed() && !case.stopped => Some(g.ram().hash() == h),
        _ => None,
    };
    Ending {
        dest: dest_outcome.unwrap_or(DestOutcome::Discarded("never admitted".into())),
        source_running: src_guest.is_running(),
        source_freed,
        dest_running: dst_guest.as_ref().is_some_and(GuestBackend::is_running),
        memory_equal_at_pause,
        dest_report: dst.as_ref().map(|d| d.report(now, "a", "b")),
        cancel_answer,
        questions,
        fenced_generation,
        resumed_in_doubt,
        elapsed: now - started,
        report,
    }
}

fn assert_one_owner(e: &Ending) {
    assert!(
        !(e.source_running && e.dest_running),
        "the VM runs on both hosts: {e:?}"
    );
}

#[test]
fn idle_guest_moves_in_two_rounds_with_verified_memory() {
    let e = run(Case::default());
    assert!(e.report.completed(), "{e:?}");
    assert_eq!(e.dest, DestOutcome::Adopted);
    assert!(e.dest_running && !e.source_running && e.source_freed);
    assert_eq!(e.report.memory_verified, Some(true));
    assert_eq!(e.memory_equal_at_pause, Some(true));
    // Round 0 skips the zero pages below the fill.
    let filled = (MEMORY_BYTES - FILL_START) / PAGE_BYTES;
    assert!(
        e.report.round_log[0].pages >= filled,
        "{:?}",
        e.report.round_log
    );
    assert!(e.report.round_log[0].pages < MEMORY_BYTES / PAGE_BYTES);
    assert!(e.report.rounds <= 3, "{}", e.report.rounds);
    assert!(e.report.downtime_ms < 50.0, "{}", e.report.downtime_ms);
}

#[test]
fn busy_guest_converges_within_the_budget() {
    let mut options = Case::default().options;
    options.downtime_max = Duration::from_millis(3);
    let e = run(Case {
        wss_bytes: 8 << 20,
        writes_per_sec: 200_000,
        options,
        ..Case::default()
    });
    assert!(e.report.completed(), "{:?}", e.report);
    assert_eq!(e.memory_equal_at_pause, Some(true));
    assert!(e.report.rounds > 2, "a dirtying guest needs several rounds");
    assert!(e.report.predicted_downtime_ms <= 3.0);
}

#[test]
fn guest_outrunning_the_link_is_throttled_until_it_converges() {
    let e = run(Case {
        wss_bytes: 16 << 20,
        writes_per_sec: 2_000_000,
        bandwidth_bytes_per_s: 100e6,
        ..Case::default()
    });
    assert!(e.report.completed(), "{:?}", e.report);
    assert!(e.report.throttle_max_percent > 0, "{:?}", e.report);
    assert_eq!(e.memory_equal_at_pause, Some(true));
}

#[test]
fn non_convergence_aborts_and_leaves_the_vm_running_on_the_source() {
    let mut options = Case::default().options;
    options.auto_converge = false;
    options.precopy_time_max = Duration::from_secs(2);
    let e = run(Case {
        wss_bytes: 16 << 20,
        writes_per_sec: 2_000_000,
        bandwidth_bytes_per_s: 100e6,
        options,
        ..Case::default()
    });
    let Outcome::Aborted { reason } = &e.report.outcome else {
        panic!("{:?}", e.report)
    };
    assert!(reason.contains("did not converge"), "{reason}");
    assert!(e.source_running && !e.source_freed);
    assert!(matches!(e.dest, DestOutcome::Discarded(_)));
    assert!(!e.dest_running);
}

#[test]
fn missing_cpu_feature_is_refused_by_name() {
    let e = run(Case {
        features: vec!["sse2", "avx512f"],
        ..Case::default()
    });
    let Outcome::Aborted { reason } = &e.report.outcome else {
        panic!("{:?}", e.report)
    };
    assert!(reason.contains("missing CPU features: avx512f"), "{reason}");
    assert!(e.source_running);
    assert_one_owner(&e);
}

#[test]
fn broken_link_before_the_release_resumes_on_the_source() {
    // Cut at every point up to the commit: offer, accept, rounds,
    // switchover, ready.
    for cut in 1..=6 {
        let e = run(Case {
            wss_bytes: 4 << 20,
            cut_after_messages: Some(cut),
            ..Case::default()
        });
        assert!(
            matches!(e.report.outcome, Outcome::Aborted { .. }),
            "cut {cut}: {:?}",
            e.report
        );
        assert!(e.source_running, "cut {cut}: the VM must run on the source");
        assert!(!e.dest_running, "cut {cut}");
        assert_one_owner(&e);
    }
}

/// Messages of a clean run: offer, accepted, one acknowledgement per
/// round, switchover, ready, commit, resumed.
fn clean_run_messages() -> usize {
    let clean = run(Case::default());
    assert!(clean.report.completed());
    2 + clean.report.rounds as usize + 4
}

#[test]
fn lost_answer_after_the_release_is_resolved_as_completed() {
    // The commit went through, the destination's answer did not: the
    // source asks and learns the destination runs the VM.
    let e = run(Case {
        cut_after_messages: Some(clean_run_messages()),
        ..Case::default()
    });
    assert!(e.report.completed(), "{:?}", e.report);
    assert!(!e.source_running && e.source_freed);
    assert!(e.dest_running);
}

#[test]
fn lost_commit_is_resolved_by_resuming_on_the_source() {
    // The commit itself is lost: the destination drops the shadow; asked,
    // it says it never took the VM, so the source runs it again.
    let e = run(Case {
        cut_after_messages: Some(clean_run_messages() - 1),
        ..Case::default()
    });
    let Outcome::Aborted { reason } = &e.report.outcome else {
        panic!("{:?}", e.report)
    };
    assert!(reason.contains("never took the VM"), "{reason}");
    assert!(e.source_running && !e.dest_running);
}

#[test]
fn unreachable_destination_after_the_release_keeps_the_source_asking_until_fenced() {
    // Past the release the destination cannot be asked: the source keeps
    // asking with back-off, well past five minutes, never resuming on its
    // own; an operator's fence gives the VM back at generation + 2.
    let e = run(Case {
        cut_after_messages: Some(clean_run_messages() - 1),
        unreachable_after_cut: true,
        fence_after_questions: Some(20),
        ..Case::default()
    });
    assert_eq!(e.questions, 20);
    assert!(
        e.elapsed > Duration::from_secs(300),
        "asked for {:?} only",
        e.elapsed
    );
    assert!(
        !e.resumed_in_doubt,
        "after the release the source never resumes on its own"
    );
    let Outcome::Aborted { reason } = &e.report.outcome else {
        panic!("{:?}", e.report)
    };
    assert!(reason.contains("fenced by ops"), "{reason}");
    assert_eq!(e.fenced_generation, Some(3), "released at 2, fenced at 3");
    assert!(e.source_running && !e.dest_running);
}

#[test]
fn a_fence_or_an_answer_while_not_in_doubt_changes_nothing() {
    let e = run(Case {
        wss_bytes: 2 << 20,
        stray_recover_after_messages: Some(3),
        ..Case::default()
    });
    assert!(
        e.cancel_answer.clone().expect("tried").is_err(),
        "refused: not in doubt"
    );
    assert_eq!(e.report.outcome, Outcome::Completed, "{:?}", e.report);
    assert_one_owner(&e);
}

#[test]
fn a_page_changed_on_the_way_fails_verify_before_the_release() {
    // Pages above the fill start are non-zero and an idle guest never
    // rewrites them: one corrupted in round 0 stays wrong.
    let gfn = FILL_START / PAGE_BYTES + 3;
    let e = run(Case {
        corrupt_gfn: Some(gfn),
        ..Case::default()
    });
    let Outcome::Aborted { reason } = &e.report.outcome else {
        panic!("{:?}", e.report)
    };
    assert!(reason.contains("memory differs"), "{reason}");
    assert_eq!(e.report.memory_verified, Some(false));
    assert!(
        matches!(e.dest, DestOutcome::Discarded(_)),
        "the destination drops its copy: {:?}",
        e.dest
    );
    assert!(e.source_running && !e.dest_running && !e.source_freed);
}

#[test]
fn the_wait_between_questions_doubles_up_to_its_cap() {
    use super::source::{RESOLVE_RETRY, RESOLVE_RETRY_MAX, resolve_retry};
    assert_eq!(resolve_retry(0), RESOLVE_RETRY);
    assert_eq!(resolve_retry(1), RESOLVE_RETRY * 2);
    assert_eq!(resolve_retry(3), RESOLVE_RETRY * 8);
    assert_eq!(resolve_retry(40), RESOLVE_RETRY_MAX);
}

#[test]
fn cold_migration_moves_a_stopped_vm_without_rounds() {
    let e = run(Case {
        stopped: true,
        ..Case::default()
    });
    assert!(e.report.completed(), "{:?}", e.report);
    assert_eq!(e.report.rounds, 1);
    assert_eq!(e.report.memory_verified, Some(true));
    assert!(!e.dest_running && !e.source_running && e.source_freed);
}

fn phase_names(phases: &[PhaseReport], parent: Option<&str>) -> Vec<String> {
    phases
        .iter()
        .filter(|p| p.parent.map(|i| phases[i as usize].name.as_str()) == parent)
        .map(|p| p.name.clone())
        .collect()
}

#[test]
fn both_sides_record_their_phases_and_the_rounds_their_figures() {
    let e = run(Case {
        wss_bytes: 4 << 20,
        ..Case::default()
    });
    assert!(e.report.completed(), "{e:?}");
    let phases = &e.report.phases;
    assert!(phases.iter().all(|p| p.end_ms.is_some()), "{phases:#?}");
    let top = phase_names(phases, None);
    assert_eq!(top, ["offer", "precopy", "switchover"], "{phases:#?}");
    assert_eq!(
        phase_names(phases, Some("switchover")),
        ["pause", "final_pages", "state", "commit", "resume"]
    );
    let precopy = phase_names(phases, Some("precopy"));
    let rounds = precopy.iter().filter(|n| *n == "precopy.round").count();
    let decisions = precopy.iter().filter(|n| *n == "convergence").count();
    assert_eq!(
        rounds as u32 + 1,
        e.report.rounds,
        "the final round is under the switchover"
    );
    assert_eq!(decisions, rounds, "one decision per pre-copy round");
    let last = phases
        .iter()
        .rfind(|p| p.name == "convergence")
        .expect("a decision");
    assert_eq!(
        last.figure("decision"),
        Some(&Figure::Text("switchover".into()))
    );
    let Some(Figure::Value(predicted)) = last.figure("predicted_ms") else {
        panic!("no prediction: {last:?}");
    };
    assert!((predicted - e.report.predicted_downtime_ms).abs() < 1e-9);
    // Rounds start in order and carry their rates.
    for pair in e.report.round_log.windows(2) {
        assert!(pair[1].start_ms >= pair[0].start_ms + pair[0].duration_ms - 1e-6);
    }
    let first = &e.report.round_log[0];
    assert!(
        first.bandwidth_mb_s > 0.0 && first.dirty_rate_pages_per_s > 0.0,
        "{first:?}"
    );
    // The pause-to-resume window on the source is the downtime.
    let pause = phases.iter().find(|p| p.name == "pause").expect("pause");
    let resume = phases.iter().find(|p| p.name == "resume").expect("resume");
    let window = resume.end_ms.expect("ended") - pause.end_ms.expect("ended");
    assert!(
        (window - e.report.downtime_ms).abs() < 1e-6,
        "{window} vs {}",
        e.report.downtime_ms
    );

    let d = e.dest_report.expect("the destination reports");
    assert_eq!(d.outcome, "adopted");
    assert_eq!(d.rounds, e.report.rounds);
    assert_eq!(d.bytes_received, e.report.bytes_sent);
    assert_eq!(
        phase_names(&d.phases, None),
        ["shadow", "receive", "switchover"]
    );
    assert_eq!(
        phase_names(&d.phases, Some("switchover"))
            .into_iter()
            .filter(|n| n != "round.received")
            .collect::<Vec<_>>(),
        ["final_pages", "restore", "verify", "await_commit", "resume"]
    );
    assert!(
        d.downtime_ms > 0.0 && d.downtime_ms <= e.report.downtime_ms,
        "{d:?}"
    );
}

#[test]
fn an_abort_is_a_phase_with_its_reason() {
    let e = run(Case {
        features: vec!["avx512f"],
        ..Case::default()
    });
    let abort = e
        .report
        .phases
        .iter()
        .find(|p| p.name == "abort")
        .expect("abort phase");
    let Some(Figure::Text(reason)) = abort.figure("reason") else {
        panic!("{abort:?}");
    };
    assert!(reason.contains("avx512f"), "{reason}");
    assert!(e.report.phases.iter().all(|p| p.end_ms.is_some()));
}

#[test]
fn a_cancel_in_any_phase_before_the_release_leaves_the_vm_on_the_source() {
    // Cancel after each message of a clean run: the offer, its answer,
    // each round's acknowledgement, the switchover, Ready (from there on
    // the VM is handed over and the cancel is refused), the commit.
    let messages = clean_run_messages();
    let mut cancelled = 0;
    let mut refused = 0;
    for at in 1..=messages {
        let e = run(Case {
            wss_bytes: 4 << 20,
            cancel_after_messages: Some(at),
            ..Case::default()
        });
        assert_one_owner(&e);
        match e.cancel_answer.clone().expect("asked") {
            Ok(()) => {
                cancelled += 1;
                let Outcome::Aborted { reason } = &e.report.outcome else {
                    panic!("cancel at {at}: {:?}", e.report)
                };
                assert_eq!(reason, "cancelled by ops", "at {at}");
                assert!(e.source_running, "at {at}: the VM runs on the source");
                assert!(!e.dest_running && !e.source_freed, "at {at}");
                assert!(
                    !matches!(e.dest, DestOutcome::Adopted),
                    "at {at}: {:?}",
                    e.dest
                );
                let phases = &e.report.phases;
                assert!(phases.iter().any(|p| p.name == "abort"), "at {at}");
            }
            Err(why) => {
                refused += 1;
                assert!(
                    why.contains("too late") || why.contains("ended"),
                    "at {at}: {why}"
                );
                assert!(
                    e.report.completed(),
                    "at {at}: a refused cancel changes nothing"
                );
                assert!(e.dest_running && !e.source_running);
            }
        }
    }
    // Offer, accepted, the rounds and the switchover can be cancelled; only
    // the last steps (after Ready) cannot.
    assert!(cancelled >= messages - 3, "{cancelled} of {messages}");
    assert!(refused >= 1, "the cancel after Ready is refused");
}

#[test]
fn a_cancel_while_the_guest_is_paused_resumes_it_on_the_source() {
    // The switchover message is the last thing the source sends before it
    // waits for Ready with the guest paused.
    let messages = clean_run_messages();
    let e = run(Case {
        cancel_after_messages: Some(messages - 3),
        ..Case::default()
    });
    assert_eq!(e.cancel_answer, Some(Ok(())));
    assert!(e.source_running && !e.dest_running);
    assert!(e.report.downtime_ms > 0.0, "it was paused: {:?}", e.report);
}

#[test]
fn the_least_round_trip_counts_and_a_budget_below_the_link_is_said_once() {
    let vm = super::wire::test_offer("far", 32 << 20, &[]).vm;
    let options = MigrationOptions::default(); // a 50 ms budget
    let mut src = SourceMachine::new(1, vm, 1, "a".into(), "b".into(), options);
    let now = Instant::now();
    let notes = |src: &mut SourceMachine| {
        std::iter::from_fn(|| src.poll_event())
            .filter(|e| matches!(e, SourceEvent::Progress(p) if p.phase.starts_with("budget below the link")))
            .count()
    };
    // A loaded round inflates the estimate; the quiet link's 1 ms stays.
    src.handle_rtt(now, Duration::from_millis(1));
    src.handle_rtt(now, Duration::from_millis(80));
    src.handle_rtt(now, Duration::ZERO);
    assert_eq!(notes(&mut src), 0, "1 ms round trips allow a 50 ms budget");
    // A long link: said once, however often the round trip is reported.
    let vm = super::wire::test_offer("far", 32 << 20, &[]).vm;
    let mut far = SourceMachine::new(
        1,
        vm,
        1,
        "a".into(),
        "b".into(),
        MigrationOptions::default(),
    );
    far.handle_rtt(now, Duration::from_millis(150));
    far.handle_rtt(now, Duration::from_millis(160));
    assert_eq!(notes(&mut far), 1);
}

#[test]
fn a_rounds_acknowledgement_trip_is_not_taken_for_slow_sending() {
    let vm = super::wire::test_offer("far", 32 << 20, &[]).vm;
    let mut src = SourceMachine::new(
        1,
        vm,
        1,
        "a".into(),
        "b".into(),
        MigrationOptions::default(),
    );
    let now = Instant::now();
    src.start(now);
    src.handle_rtt(now, Duration::from_millis(150));
    src.handle_message(now, DestMsg::Accepted { lanes: 1 });
    // 2 MB sent in 100 ms, acknowledged a round trip later.
    src.handle_message(
        now + Duration::from_millis(250),
        DestMsg::RoundReceived {
            round: 0,
            pages: 488,
            bytes: 2_000_000,
        },
    );
    let mb_s = src.bandwidth() / 1e6;
    assert!((19.0..21.0).contains(&mb_s), "{mb_s} MB/s, not 20");
}
