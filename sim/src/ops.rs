//! Operations under simulation: the scheduler, budgets, priorities and
//! maintenance mode of the production host actors, on the simulated
//! network with seeded faults.
//!
//! - [`priority_share`]: two migrations on one slow link at once, one at
//!   high and one at low priority: what each got of the link;
//! - [`evacuation`]: a host entering maintenance with more VMs than its
//!   budgets let move at once, while links are cut and clogged; the job
//!   lists are polled at every check to see the budgets hold.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use ferry_actors::migration::{MigrationReport, Outcome};
use ferry_actors::node::client::{ClientReply, ClientRequest, MigrateOptions};
use ferry_actors::ops::jobs::{Budgets, JobState, Priority};
use ferry_actors::ops::share::FlowStats;

use crate::net::{LinkParams, SimNetwork};
use crate::rng::SimRng;
use crate::world::{self, HostSetup, Trace, World};

/// One migration of [`priority_share`].
#[derive(Debug, Clone)]
pub struct ShareEnd {
    /// Its priority.
    pub priority: Priority,
    /// Its report.
    pub report: MigrationReport,
    /// Simulated time from the start of both to its end.
    pub ended_after: Duration,
    /// What it got of the link.
    pub link: FlowStats,
}

/// Migrates two 64 MiB VMs from `h000` to `h001` over a 100 MB/s link at
/// the same moment, one at high and one at low priority.
pub fn priority_share(seed: u64) -> Result<[ShareEnd; 2], String> {
    crate::on_sim_runtime(seed, async move {
        let net = SimNetwork::new(LinkParams {
            bandwidth_bytes_per_s: 100e6,
            latency: Duration::from_micros(500),
        });
        let world = Rc::new(World::start(net, 2, 512).await);
        world.create_vm(0, "hi", 64, 4).await;
        world.create_vm(0, "lo", 64, 4).await;
        let start = tokio::time::Instant::now();
        let run = |vm: &'static str, priority: Priority| {
            let world = world.clone();
            tokio::task::spawn_local(async move {
                let options = MigrateOptions {
                    priority,
                    lanes: 2,
                    ..MigrateOptions::default()
                };
                let report = world::migrate(&world.actor(0), vm, "h001", options).await?;
                let ended_after = start.elapsed();
                let link = world
                    .ctx(0)
                    .shares
                    .ended(report.migration_id)
                    .ok_or_else(|| format!("{vm}: no link figures"))?;
                Ok::<_, String>(ShareEnd {
                    priority,
                    report,
                    ended_after,
                    link,
                })
            })
        };
        let high = run("hi", Priority::High);
        let low = run("lo", Priority::Low);
        let high = high.await.map_err(|e| e.to_string())??;
        let low = low.await.map_err(|e| e.to_string())??;
        for end in [&high, &low] {
            if end.report.outcome != Outcome::Completed {
                return Err(format!("{:?}: {:?}", end.priority, end.report.outcome));
            }
        }
        Ok([high, low])
    })
}

/// What [`evacuation`] saw.
#[derive(Debug, Default)]
pub struct EvacuationResult {
    /// The trace (its hash is the determinism check).
    pub trace: Vec<String>,
    /// Hash of the trace.
    pub trace_hash: u64,
    /// Broken rules.
    pub violations: Vec<String>,
    /// Most migrations seen running at once from the evacuated host.
    pub peak_running: usize,
    /// Most seen running at once to one destination.
    pub peak_per_link: usize,
    /// Evacuation jobs that failed in the first pass (faults).
    pub failed_first_pass: usize,
}

/// VMs on the host that enters maintenance.
pub const EVACUATED_VMS: usize = 6;

/// Host `h000` with [`EVACUATED_VMS`] VMs (one stopped) enters
/// maintenance under `host_live = 2, link = 1` while links are cut and
/// clogged at random; then the network heals and the operator enters
/// maintenance again to move what the faults stopped. Checked: no VM on
/// two hosts at any check, the budgets at every check, and in the end
/// every VM runs (or, the stopped one, exists) exactly once, off `h000`.
pub fn evacuation(seed: u64) -> EvacuationResult {
    crate::on_sim_runtime(seed, evacuate(seed))
}

async fn evacuate(seed: u64) -> EvacuationResult {
    let mut rng = SimRng::new(seed);
    let link = LinkParams {
        bandwidth_bytes_per_s: 200e6,
        latency: Duration::from_micros(500),
    };
    let net = SimNetwork::new(link);
    let setup = HostSetup {
        durable: false,
        budgets: Budgets {
            host_live: 2,
            link: 1,
            ..Budgets::default()
        },
    };
    let world = Rc::new(World::start_with(net.clone(), 3, 256, setup).await);
    let trace = Rc::new(RefCell::new(Trace::default()));
    let violations = Rc::new(RefCell::new(Vec::<String>::new()));
    let mut vms = Vec::new();
    for i in 0..EVACUATED_VMS {
        let name = format!("vm{i}");
        world.create_vm(0, &name, 16, rng.below(3)).await;
        vms.push(name);
    }
    let stopped = vms[EVACUATED_VMS - 1].clone();
    let _ = world
        .request(0, ClientRequest::StopVm(stopped.clone()))
        .await;

    let stop = Rc::new(std::cell::Cell::new(false));
    let peaks = Rc::new(RefCell::new((0usize, 0usize)));
    let checker = {
        let (world, violations, stop, peaks) = (
            world.clone(),
            violations.clone(),
            stop.clone(),
            peaks.clone(),
        );
        tokio::task::spawn_local(async move {
            while !stop.get() {
                tokio::time::sleep(Duration::from_millis(2)).await;
                if let ClientReply::Jobs(jobs) = world.request(0, ClientRequest::Jobs).await {
                    let running: Vec<_> = jobs
                        .iter()
                        .filter(|j| j.state == JobState::Running)
                        .collect();
                    let mut per_link = BTreeMap::<&str, usize>::new();
                    for j in &running {
                        *per_link.entry(j.to.as_str()).or_default() += 1;
                    }
                    let busiest = per_link.values().copied().max().unwrap_or(0);
                    let mut p = peaks.borrow_mut();
                    p.0 = p.0.max(running.len());
                    p.1 = p.1.max(busiest);
                    if running.len() > 2 || busiest > 1 {
                        violations.borrow_mut().push(format!(
                            "at {:?}: {} running, {busiest} on one link, over the budgets",
                            world.elapsed(),
                            running.len()
                        ));
                    }
                }
            }
        })
    };
    let faults = {
        let (net, world, trace, stop) = (net.clone(), world.clone(), trace.clone(), stop.clone());
        let names = world.names().to_vec();
        let mut rng = SimRng::new(rng.next_u64());
        tokio::task::spawn_local(async move {
            while !stop.get() {
                tokio::time::sleep(Duration::from_millis(20 + rng.below(80))).await;
                let other = rng.pick(&names[1..]).clone();
                if rng.chance(0.5) {
                    trace
                        .borrow_mut()
                        .record(world.elapsed(), format!("fault: cut h000-{other}"));
                    net.cut("h000", &other, "fault: connection cut");
                } else {
                    trace
                        .borrow_mut()
                        .record(world.elapsed(), format!("fault: clog h000-{other}"));
                    let mut slow = link;
                    slow.bandwidth_bytes_per_s /= 100.0;
                    net.set_link("h000", &other, slow);
                    tokio::time::sleep(Duration::from_millis(1 + rng.below(50))).await;
                    net.set_link("h000", &other, link);
                }
            }
        })
    };

    let mut result = EvacuationResult::default();
    let first = world
        .request(0, ClientRequest::Maintenance { enter: true })
        .await;
    result.failed_first_pass = record_pass(&world, &trace, "first pass", &first);
    stop.set(true);
    let _ = faults.await;
    let _ = checker.await;
    net.heal_all();
    for other in &world.names()[1..] {
        net.set_link("h000", other, link);
    }
    let second = world
        .request(0, ClientRequest::Maintenance { enter: true })
        .await;
    let failed_again = record_pass(&world, &trace, "second pass", &second);
    if failed_again > 0 {
        violations.borrow_mut().push(format!(
            "{failed_again} VMs did not move on a healed network"
        ));
    }
    tokio::time::sleep(ferry_actors::migration::destination::IDLE_MAX + Duration::from_secs(1))
        .await;
    violations.borrow_mut().extend(world.ledger.violations());
    let census = world.census().await;
    if let Err(v) = world::at_most_one_running(&census) {
        violations.borrow_mut().push(format!("settled: {v}"));
    }
    for vm in &vms {
        let copies = census.get(vm).map(Vec::as_slice).unwrap_or_default();
        let hosts: Vec<&str> = copies.iter().map(|c| c.host.as_str()).collect();
        let should_run = *vm != stopped;
        let running = copies.iter().filter(|c| c.running).count();
        if hosts.len() != 1 || hosts[0] == "h000" || running != usize::from(should_run) {
            violations.borrow_mut().push(format!(
                "settled: {vm} is on {hosts:?} ({running} running), not once off h000"
            ));
        }
    }
    let (peak_running, peak_per_link) = *peaks.borrow();
    result.peak_running = peak_running;
    result.peak_per_link = peak_per_link;
    let trace = trace.borrow();
    result.trace = trace.lines().to_vec();
    result.trace_hash = trace.hash();
    result.violations = violations.borrow().clone();
    result
}

/// Records an evacuation pass's jobs in the trace; returns how many failed.
fn record_pass(world: &World, trace: &RefCell<Trace>, pass: &str, reply: &ClientReply) -> usize {
    let ClientReply::Evacuated(jobs) = reply else {
        trace
            .borrow_mut()
            .record(world.elapsed(), format!("{pass}: {reply:?}"));
        return EVACUATED_VMS;
    };
    let mut failed = 0;
    for j in jobs {
        if j.state != JobState::Done {
            failed += 1;
        }
        trace.borrow_mut().record(
            world.elapsed(),
            format!("{pass}: {} -> {} {:?} {}", j.vm, j.to, j.state, j.result),
        );
    }
    failed
}
