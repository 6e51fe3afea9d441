//! Scenarios: a cluster, a workload of migrations and a fault schedule,
//! all drawn from one seed, run on a paused clock in one thread.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use ferry_actors::migration::Outcome;
use ferry_actors::node::client::MigrateOptions;
use ferry_actors::storage::Method;

use crate::net::{LinkParams, SimNetwork};
use crate::rng::SimRng;
use crate::violation::{Kind, Violation};
use crate::world::{self, Trace, World};

/// A migration that has not ended after this much simulated time never
/// reached a final state (a violation).
pub const MIGRATION_TIME_MAX: Duration = Duration::from_secs(600);

/// Which faults a scenario injects, and how often.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Faults {
    /// Connection cuts per simulated second (across the cluster).
    pub cuts_per_s: f64,
    /// Partitions per simulated second, each healed after up to
    /// `partition_max`.
    pub partitions_per_s: f64,
    /// Longest partition.
    pub partition_max: Duration,
    /// Clogs (a link slowed to 1% for a while) per simulated second.
    pub clogs_per_s: f64,
    /// Host crashes per simulated second; the host comes back empty after
    /// up to `down_max`.
    pub crashes_per_s: f64,
    /// Longest time a crashed host stays down.
    pub down_max: Duration,
    /// Clock jumps (simulated time leaps ahead by up to `jump_max`) per
    /// simulated second.
    pub jumps_per_s: f64,
    /// Largest clock jump.
    pub jump_max: Duration,
    /// Node stores that fail every write (a full or failing disk) per
    /// simulated second, each for up to `store_failure_max`; it lasts
    /// through a crash of its host.
    pub store_failures_per_s: f64,
    /// Longest store failure.
    pub store_failure_max: Duration,
    /// One-way partitions (packets one way vanish, no error) per simulated
    /// second, each for up to `silence_max`.
    pub one_way_per_s: f64,
    /// Black holes (both ways vanish, no error) per simulated second, each
    /// for up to `silence_max`.
    pub black_holes_per_s: f64,
    /// Longest one-way partition or black hole (past the transport's idle
    /// timeout the connections close).
    pub silence_max: Duration,
    /// Delay spikes (a link's latency at 50–500 ms) per simulated second,
    /// each for up to `spike_max`.
    pub spikes_per_s: f64,
    /// Longest delay spike.
    pub spike_max: Duration,
    /// Every chunk of every stream is late by up to this much (lost packets
    /// retransmitted), drawn per chunk: streams overtake one another.
    pub jitter_max: Duration,
    /// Faults aimed at a protocol step (a crash of either host, a cut or a
    /// black hole the moment a migration reaches it) per simulated second.
    pub aimed_per_s: f64,
}

impl Faults {
    /// No faults.
    pub const NONE: Faults = Faults {
        cuts_per_s: 0.0,
        partitions_per_s: 0.0,
        partition_max: Duration::ZERO,
        clogs_per_s: 0.0,
        crashes_per_s: 0.0,
        down_max: Duration::ZERO,
        jumps_per_s: 0.0,
        jump_max: Duration::ZERO,
        store_failures_per_s: 0.0,
        store_failure_max: Duration::ZERO,
        one_way_per_s: 0.0,
        black_holes_per_s: 0.0,
        silence_max: Duration::ZERO,
        spikes_per_s: 0.0,
        spike_max: Duration::ZERO,
        jitter_max: Duration::ZERO,
        aimed_per_s: 0.0,
    };
}

/// A scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Name, for logs.
    pub name: &'static str,
    /// Hosts.
    pub hosts: usize,
    /// Memory each host offers, in MiB.
    pub host_memory_mib: u64,
    /// VMs (spread over the hosts).
    pub vms: usize,
    /// Memory per VM, in MiB.
    pub vm_memory_mib: u64,
    /// Working set per VM, in MiB (each VM draws 0 to this).
    pub wss_mib_max: u64,
    /// Migrations started over the run.
    pub migrations: usize,
    /// Migrations start within this much simulated time.
    pub horizon: Duration,
    /// Link speed and delay.
    pub link: LinkParams,
    /// Faults.
    pub faults: Faults,
    /// Options of every migration.
    pub options: MigrateOptions,
    /// Each VM gets a disk of this many MiB on its host's `local`
    /// datastore, with the disk workload running, and every migration
    /// moves it along (a method drawn per migration); 0: no disks.
    pub disk_mib: u64,
    /// Hosts keep their node database through a crash: a crashed host's
    /// VMs come back when it restarts (a VM that was leaving is settled
    /// by asking its destination), so none may be lost with it.
    pub durable: bool,
}

impl Scenario {
    /// The same scenario under another name.
    #[must_use]
    pub fn named(self, name: &'static str) -> Self {
        Self { name, ..self }
    }
}

/// What a run produced.
#[derive(Debug)]
pub struct RunResult {
    /// The seed.
    pub seed: u64,
    /// Hash of the trace.
    pub trace_hash: u64,
    /// The trace.
    pub trace: Vec<String>,
    /// Broken rules (empty when all held).
    pub violations: Vec<Violation>,
    /// Migrations that completed.
    pub completed: usize,
    /// Migrations that aborted (VM left on the source).
    pub aborted: usize,
    /// Migrations refused before starting (e.g. VM busy).
    pub rejected: usize,
    /// Migrations in doubt.
    pub in_doubt: usize,
    /// Simulated time.
    pub simulated: Duration,
    /// Wall time.
    pub wall: Duration,
}

/// Runs `scenario` with `seed` on a fresh single-threaded runtime with a
/// paused clock and tokio's own choices seeded.
pub fn run(scenario: &Scenario, seed: u64) -> RunResult {
    let wall = std::time::Instant::now();
    let mut result = crate::on_sim_runtime(seed, drive(scenario.clone(), seed));
    result.wall = wall.elapsed();
    result.violations.extend(
        crate::take_panics()
            .into_iter()
            .map(|p| Violation::new(Kind::Panic, p)),
    );
    result
}

async fn drive(s: Scenario, seed: u64) -> RunResult {
    let mut rng = SimRng::new(seed);
    let net = SimNetwork::new(s.link);
    if s.faults.jitter_max > Duration::ZERO {
        // Its own generator: the schedule drawn from `rng` stays the same.
        net.set_jitter(s.faults.jitter_max, seed ^ 0x6a17_7e55);
    }
    let setup = world::HostSetup {
        durable: s.durable,
        ..world::HostSetup::default()
    };
    let world = Rc::new(World::start_with(net.clone(), s.hosts, s.host_memory_mib, setup).await);
    let trace = Rc::new(RefCell::new(Trace::default()));
    let violations = Rc::new(RefCell::new(Vec::<Violation>::new()));
    let maybe_lost = Rc::new(RefCell::new(std::collections::BTreeSet::<String>::new()));
    // Migrations under way, VM -> (source, destination): a VM arriving
    // on a host that crashes may be lost with it too.
    let arriving = Rc::new(RefCell::new(std::collections::BTreeMap::<
        String,
        (String, String),
    >::new()));

    let mut vms = Vec::new();
    for i in 0..s.vms {
        let name = format!("vm{i:04}");
        let wss = if s.wss_mib_max == 0 {
            0
        } else {
            rng.below(s.wss_mib_max + 1)
        };
        world
            .create_vm_with_disk(i % s.hosts, &name, s.vm_memory_mib, wss, s.disk_mib)
            .await;
        vms.push(name);
    }
    trace.borrow_mut().record(
        world.elapsed(),
        format!("{} VMs on {} hosts", s.vms, s.hosts),
    );

    // The workload: migrations at random times, to random hosts.
    let mut tasks = Vec::new();
    for k in 0..s.migrations {
        #[allow(clippy::cast_possible_truncation)] // the horizon is seconds
        let at = Duration::from_nanos(rng.below(s.horizon.as_nanos().max(1) as u64));
        let vm = rng.pick(&vms).clone();
        let dest_pick = usize::try_from(rng.below(s.hosts as u64)).expect("host index fits");
        let world = world.clone();
        let trace = trace.clone();
        let violations = violations.clone();
        let arriving = arriving.clone();
        let mut options = s.options.clone();
        if s.disk_mib > 0 {
            options.datastore = "local".into();
            options.method = *rng.pick(&Method::ALL);
        }
        tasks.push(tokio::task::spawn_local(async move {
            tokio::time::sleep(at).await;
            let census = world.census().await;
            let Some(owner) = census
                .get(&vm)
                .and_then(|c| c.iter().find(|v| v.running).map(|v| v.host.clone()))
            else {
                trace
                    .borrow_mut()
                    .record(world.elapsed(), format!("m{k}: {vm} not running anywhere, skipped"));
                return MigrationEnd::Rejected;
            };
            let names = world.names();
            let mut to = names[dest_pick].clone();
            if to == owner {
                to = names[(dest_pick + 1) % names.len()].clone();
            }
            let from = world.index_of(&owner).expect("owner is a host");
            trace.borrow_mut().record(
                world.elapsed(),
                format!("m{k}: {vm} {owner} -> {to} ({})", options.method),
            );
            arriving
                .borrow_mut()
                .insert(vm.clone(), (owner.clone(), to.clone()));
            let r = tokio::time::timeout(
                MIGRATION_TIME_MAX,
                world::migrate(&world.actor(from), &vm, &to, options),
            )
            .await;
            arriving.borrow_mut().remove(&vm);
            let r = match r {
                Ok(r) => r,
                Err(_) => {
                    trace
                        .borrow_mut()
                        .record(world.elapsed(), format!("m{k}: {vm} never ended"));
                    return MigrationEnd::Lost;
                }
            };
            let end = match &r {
                Ok(report) => {
                    if report.memory_verified == Some(false) {
                        violations.borrow_mut().push(Violation::new(
                            Kind::MemoryMismatch,
                            format!("m{k}: {vm} destination memory differs from the source at the switchover"),
                        ));
                    }
                    match &report.outcome {
                        Outcome::Completed => MigrationEnd::Completed,
                        Outcome::Aborted { .. } => MigrationEnd::Aborted,
                        Outcome::InDoubt { .. } => MigrationEnd::InDoubt,
                    }
                }
                Err(_) => MigrationEnd::Rejected,
            };
            let what = match r {
                Ok(report) => format!(
                    "{:?} rounds {} pages {} verified {:?}",
                    report.outcome, report.rounds, report.pages_sent, report.memory_verified
                ),
                Err(e) => format!("rejected: {e}"),
            };
            trace
                .borrow_mut()
                .record(world.elapsed(), format!("m{k}: {vm} ended: {what}"));
            end
        }));
    }

    // Faults, until the workload is over.
    let stop = Rc::new(std::cell::Cell::new(false));
    let fault_ctx = crate::faults::FaultCtx {
        net: net.clone(),
        world: world.clone(),
        trace: trace.clone(),
        link: s.link,
        faults: s.faults,
        maybe_lost: maybe_lost.clone(),
        arriving: arriving.clone(),
    };
    let fault_rng = SimRng::new(rng.next_u64());
    let faults = tokio::task::spawn_local(crate::faults::run(fault_ctx, fault_rng, stop.clone()));
    let witness = Rc::new(RefCell::new(crate::witness::Witness::default()));
    let watcher = (s.disk_mib > 0).then(|| {
        tokio::task::spawn_local(crate::witness::watch(
            world.clone(),
            witness.clone(),
            maybe_lost.clone(),
            violations.clone(),
            stop.clone(),
        ))
    });

    let mut ends = Vec::new();
    for t in tasks {
        ends.push(t.await.unwrap_or(MigrationEnd::Lost));
    }
    stop.set(true);
    let _ = faults.await;
    if let Some(w) = watcher {
        let _ = w.await;
    }

    // Settle: heal the network, give timers (the destination's idle limit)
    // time to fire, then check the cluster's final state.
    net.heal_all();
    for i in 0..world.names().len() {
        world.store(i).set_failing(false);
        world.restart(i).await;
    }
    tokio::time::sleep(ferry_actors::migration::destination::IDLE_MAX + Duration::from_secs(1))
        .await;
    violations.borrow_mut().extend(
        world
            .ledger
            .violations()
            .into_iter()
            .map(|v| Violation::new(Kind::TwoHosts, v)),
    );
    let census = world.census().await;
    if let Err(v) = world::settled(&census, &vms, &maybe_lost.borrow()) {
        violations.borrow_mut().push(v);
    }
    if s.disk_mib > 0 {
        // Every write the disk workload had acknowledged is on the disk of
        // the one host that runs the VM, whichever way its migrations went.
        let lost = maybe_lost.borrow().clone();
        let seen = crate::witness::look(&world).await;
        let found = crate::witness::record(&mut witness.borrow_mut(), seen, &lost);
        violations.borrow_mut().extend(found);
        for v in world::disk_violations(&world, &census, &lost).await {
            violations.borrow_mut().push(v);
        }
    }
    if ends.contains(&MigrationEnd::Lost) {
        violations.borrow_mut().push(Violation::new(
            Kind::NeverEnded,
            "a migration never reached a final state",
        ));
    }
    let count = |e: MigrationEnd| ends.iter().filter(|x| **x == e).count();
    let simulated = world.elapsed();
    let trace = trace.borrow();
    RunResult {
        seed,
        trace_hash: trace.hash(),
        trace: trace.lines().to_vec(),
        violations: violations.borrow().clone(),
        completed: count(MigrationEnd::Completed),
        aborted: count(MigrationEnd::Aborted),
        rejected: count(MigrationEnd::Rejected),
        in_doubt: count(MigrationEnd::InDoubt),
        simulated,
        wall: Duration::ZERO,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MigrationEnd {
    Completed,
    Aborted,
    InDoubt,
    Rejected,
    Lost,
}
