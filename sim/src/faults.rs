//! The fault schedule: faults arrive as a Poisson process whose kinds are
//! drawn by their rates (`Faults`), each aimed at a random host or link.
//!
//! Network faults act on streams, as QUIC shows them to ferry: a lost
//! packet is a stream delayed by its retransmission (jitter, per stream,
//! so streams overtake each other), a black hole or one-way partition
//! stalls a direction silently until it heals or the idle timeout closes
//! the connections; only partitions refuse at once.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::Duration;

use crate::ledger::Step;
use crate::net::{LinkParams, SimNetwork};
use crate::rng::SimRng;
use crate::scenario::Faults;
use crate::world::{Census, Trace, World};

/// One kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Cut,
    Partition,
    Clog,
    Crash,
    StoreFailure,
    Jump,
    OneWay,
    BlackHole,
    Spike,
    Aimed,
}

impl Kind {
    /// Every kind with its rate, in the order the draw tests them (new
    /// kinds go last, so older scenarios keep their schedules).
    fn rates(f: &Faults) -> [(Kind, f64); 10] {
        [
            (Kind::Cut, f.cuts_per_s),
            (Kind::Partition, f.partitions_per_s),
            (Kind::Clog, f.clogs_per_s),
            (Kind::Crash, f.crashes_per_s),
            (Kind::StoreFailure, f.store_failures_per_s),
            (Kind::Jump, f.jumps_per_s),
            (Kind::OneWay, f.one_way_per_s),
            (Kind::BlackHole, f.black_holes_per_s),
            (Kind::Spike, f.spikes_per_s),
            (Kind::Aimed, f.aimed_per_s),
        ]
    }

    /// The kind at `x` in `0..total rate`.
    fn at(f: &Faults, x: f64) -> Kind {
        let mut upto = 0.0;
        for (kind, rate) in Self::rates(f) {
            upto += rate;
            if x < upto {
                return kind;
            }
        }
        Kind::Aimed
    }
}

/// What the fault task works on.
#[derive(Clone)]
pub struct FaultCtx {
    /// The network.
    pub net: SimNetwork,
    /// The cluster.
    pub world: Rc<World>,
    /// The run's trace.
    pub trace: Rc<RefCell<Trace>>,
    /// The scenario's link.
    pub link: LinkParams,
    /// The faults.
    pub faults: Faults,
    /// VMs that may be lost with a crashed host.
    pub maybe_lost: Rc<RefCell<BTreeSet<String>>>,
    /// Migrations under way: VM -> (source, destination).
    pub arriving: Rc<RefCell<BTreeMap<String, (String, String)>>>,
}

impl FaultCtx {
    fn record(&self, what: String) {
        self.trace
            .borrow_mut()
            .record(self.world.elapsed(), format!("fault: {what}"));
    }
}

/// Injects faults until `stop` is set.
pub async fn run(ctx: FaultCtx, mut rng: SimRng, stop: Rc<std::cell::Cell<bool>>) {
    let f = ctx.faults;
    let rate: f64 = Kind::rates(&f).iter().map(|(_, r)| r).sum();
    let names: Vec<String> = ctx.world.names().to_vec();
    if rate <= 0.0 || names.len() < 2 {
        return;
    }
    while !stop.get() {
        #[allow(clippy::cast_precision_loss)]
        let u = (rng.below(1 << 30) as f64 + 1.0) / f64::from(1u32 << 30);
        tokio::time::sleep(Duration::from_secs_f64(-u.ln() / rate)).await;
        let a = rng.pick(&names).clone();
        let mut b = rng.pick(&names).clone();
        if a == b {
            let i = names.iter().position(|n| *n == a).expect("in list");
            b = names[(i + 1) % names.len()].clone();
        }
        #[allow(clippy::cast_precision_loss)]
        let x = (rng.below(1 << 30) as f64) / f64::from(1u32 << 30) * rate;
        match Kind::at(&f, x) {
            Kind::Cut => {
                ctx.record(format!("cut {a}-{b}"));
                ctx.net.cut(&a, &b, "fault: connection cut");
            }
            Kind::Partition => partition(&ctx, a, b, &mut rng),
            Kind::Clog => clog(&ctx, a, b, &mut rng),
            Kind::Crash => crash(&ctx, &a, &mut rng).await,
            Kind::StoreFailure => store_failure(&ctx, &a, &mut rng),
            Kind::Jump => {
                let jump = up_to(&mut rng, f.jump_max);
                ctx.record(format!("clock jumps {jump:?}"));
                tokio::time::advance(jump).await;
            }
            Kind::OneWay => silence(&ctx, a, b, false, &mut rng),
            Kind::BlackHole => silence(&ctx, a, b, true, &mut rng),
            Kind::Spike => spike(&ctx, a, b, &mut rng),
            Kind::Aimed => aim(&ctx, &mut rng),
        }
    }
}

/// A random time in `0..max`.
fn up_to(rng: &mut SimRng, max: Duration) -> Duration {
    #[allow(clippy::cast_possible_truncation)] // fault lengths are seconds
    Duration::from_nanos(rng.below(max.as_nanos().max(1) as u64))
}

fn partition(ctx: &FaultCtx, a: String, b: String, rng: &mut SimRng) {
    let len = up_to(rng, ctx.faults.partition_max);
    ctx.record(format!("partition {a}-{b} for {len:?}"));
    ctx.net.partition(&a, &b);
    let net = ctx.net.clone();
    tokio::task::spawn_local(async move {
        tokio::time::sleep(len).await;
        net.heal(&a, &b);
    });
}

fn clog(ctx: &FaultCtx, a: String, b: String, rng: &mut SimRng) {
    let mut slow = ctx.link;
    slow.bandwidth_bytes_per_s /= 100.0;
    ctx.record(format!("clog {a}-{b}"));
    ctx.net.set_link(&a, &b, slow);
    let (net, normal) = (ctx.net.clone(), ctx.link);
    let len = Duration::from_millis(rng.below(200) + 1);
    tokio::task::spawn_local(async move {
        tokio::time::sleep(len).await;
        net.set_link(&a, &b, normal);
    });
}

/// Latency jumps to 50–500 ms on `a`–`b` for up to `spike_max`.
fn spike(ctx: &FaultCtx, a: String, b: String, rng: &mut SimRng) {
    let mut slow = ctx.link;
    slow.latency = Duration::from_millis(50 + rng.below(451));
    let len = up_to(rng, ctx.faults.spike_max);
    ctx.record(format!(
        "delay spike {a}-{b}: {:?} for {len:?}",
        slow.latency
    ));
    ctx.net.set_link(&a, &b, slow);
    let (net, normal) = (ctx.net.clone(), ctx.link);
    tokio::task::spawn_local(async move {
        tokio::time::sleep(len).await;
        net.set_link(&a, &b, normal);
    });
}

/// How long an aimed fault waits for a migration to reach its step.
const AIM_WAIT: Duration = Duration::from_secs(2);

/// What an aimed fault does when its step comes.
#[derive(Debug, Clone, Copy)]
enum Strike {
    /// Crash the host that showed the step.
    CrashHere,
    /// Crash the migration's other host.
    CrashPeer,
    /// Cut the link between the two.
    Cut,
    /// Silence the link both ways (a black hole) past the idle timeout.
    Silence,
}

/// A fault aimed at a protocol step: armed now, struck the moment the
/// next migration's guest shows it (within the same simulated instant).
fn aim(ctx: &FaultCtx, rng: &mut SimRng) {
    let step = *rng.pick(&Step::ALL);
    let strike = *rng.pick(&[
        Strike::CrashHere,
        Strike::CrashPeer,
        Strike::Cut,
        Strike::Silence,
    ]);
    let down = up_to(rng, ctx.faults.down_max);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    ctx.world.ledger.arm(step, tx);
    let ctx = ctx.clone();
    tokio::task::spawn_local(async move {
        let Ok(Some((vm, here))) = tokio::time::timeout(AIM_WAIT, rx.recv()).await else {
            ctx.world.ledger.disarm();
            return;
        };
        let peer = ctx.arriving.borrow().get(&vm).map(|(from, to)| {
            if step.on_destination() {
                from.clone()
            } else {
                to.clone()
            }
        });
        ctx.record(format!("aimed at {step:?} of {vm} on {here}: {strike:?}"));
        match (strike, peer) {
            (Strike::CrashHere, _) => crash_for(&ctx, &here, down).await,
            (Strike::CrashPeer, Some(peer)) => crash_for(&ctx, &peer, down).await,
            (Strike::Cut, Some(peer)) => ctx.net.cut(&here, &peer, "fault: cut at a protocol step"),
            (Strike::Silence, Some(peer)) => {
                let holes = [ctx.net.silence(&here, &peer), ctx.net.silence(&peer, &here)];
                let net = ctx.net.clone();
                tokio::time::sleep(crate::net::idle_timeout() + down).await;
                for hole in holes {
                    net.unsilence(hole);
                }
            }
            (_, None) => {}
        }
    });
}

/// Packets from `a` to `b` (and back, for a black hole) vanish without a
/// word for up to `silence_max`.
fn silence(ctx: &FaultCtx, a: String, b: String, both: bool, rng: &mut SimRng) {
    let len = up_to(rng, ctx.faults.silence_max);
    let what = if both {
        "black hole"
    } else {
        "one-way partition"
    };
    let arrow = if both { "<->" } else { "->" };
    ctx.record(format!("{what} {a}{arrow}{b} for {len:?}"));
    let mut holes = vec![ctx.net.silence(&a, &b)];
    if both {
        holes.push(ctx.net.silence(&b, &a));
    }
    let net = ctx.net.clone();
    tokio::task::spawn_local(async move {
        tokio::time::sleep(len).await;
        for hole in holes {
            net.unsilence(hole);
        }
    });
}

fn store_failure(ctx: &FaultCtx, a: &str, rng: &mut SimRng) {
    let index = ctx.world.index_of(a).expect("a host");
    let len = up_to(rng, ctx.faults.store_failure_max);
    ctx.record(format!("{a}'s store fails writes for {len:?}"));
    let store = ctx.world.store(index);
    store.set_failing(true);
    tokio::task::spawn_local(async move {
        tokio::time::sleep(len).await;
        store.set_failing(false);
    });
}

async fn crash(ctx: &FaultCtx, a: &str, rng: &mut SimRng) {
    let down = up_to(rng, ctx.faults.down_max);
    crash_for(ctx, a, down).await;
}

/// Crashes host `a` for `down`.
async fn crash_for(ctx: &FaultCtx, a: &str, down: Duration) {
    let world = &ctx.world;
    let index = world.index_of(a).expect("a host");
    if !world.is_up(index) {
        return;
    }
    // What lived there may be lost with it, unless the host's database
    // brings it back.
    if !world.durable()
        && let Census(Some(vms)) = world.host_vms(index).await
    {
        ctx.maybe_lost.borrow_mut().extend(vms);
    }
    let arriving = ctx.arriving.borrow().clone();
    ctx.maybe_lost.borrow_mut().extend(
        arriving
            .iter()
            .filter(|(_, (_, to))| *to == a)
            .map(|(vm, _)| vm.clone()),
    );
    let in_flight: Vec<String> = arriving
        .iter()
        .filter(|(_, (from, to))| *from == a || *to == a)
        .map(|(vm, (from, _))| format!("{vm} {}", if *from == a { "out" } else { "in" }))
        .collect();
    ctx.record(format!(
        "crash {a} for {down:?} (migrating: {})",
        in_flight.join(", ")
    ));
    world.crash(index);
    let (world, trace, a) = (world.clone(), ctx.trace.clone(), a.to_owned());
    tokio::task::spawn_local(async move {
        tokio::time::sleep(down).await;
        world.restart(index).await;
        let how = if world.durable() {
            "with its database"
        } else {
            "empty"
        };
        trace
            .borrow_mut()
            .record(world.elapsed(), format!("{a} back up, {how}"));
    });
}
