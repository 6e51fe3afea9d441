//! A slow link: a first round far longer than the destination's idle
//! limit completes, because arriving page data counts as the source being
//! alive (only the migration's own time limit ends a long round); a
//! migration cut inside its first round reports the bytes that went.
//!
//! Replay with `SIM_SEED=n cargo test -p ferry-sim --test slow_link`.

use std::rc::Rc;
use std::time::Duration;

use ferry_actors::migration::destination::IDLE_MAX;
use ferry_actors::node::client::MigrateOptions;
use ferry_sim::net::{LinkParams, SimNetwork};
use ferry_sim::world::{self, World};

/// 8 Mbit/s: a 48 MiB guest's first round takes about 50 s.
fn slow_link() -> LinkParams {
    LinkParams {
        bandwidth_bytes_per_s: 1e6,
        latency: Duration::from_millis(5),
    }
}

#[test]
fn a_first_round_longer_than_the_idle_limit_completes_and_counts_its_bytes() {
    for seed in ferry_sim::seeds(1, 1) {
        ferry_sim::on_sim_runtime(seed, async {
            let world = Rc::new(World::start(SimNetwork::new(slow_link()), 2, 256).await);
            world.create_vm(0, "big", 48, 0).await;
            let options = MigrateOptions {
                downtime_ms: 2_000,
                time_limit_s: 600,
                ..MigrateOptions::default()
            };
            let report = world::migrate(&world.actor(0), "big", "h001", options)
                .await
                .unwrap_or_else(|e| panic!("seed {seed}: the migration failed: {e}"));
            let first = &report.round_log[0];
            println!(
                "seed {seed}: first round {:.1} s, {} MB; total {:.1} s, downtime {:.0} ms",
                first.duration_ms / 1e3,
                first.bytes >> 20,
                report.total_ms / 1e3,
                report.downtime_ms
            );
            assert!(report.completed(), "seed {seed}: {:?}", report.outcome);
            assert!(
                first.duration_ms > 1.2 * IDLE_MAX.as_secs_f64() * 1e3,
                "seed {seed}: the first round took only {:.1} s: not a test of the idle limit",
                first.duration_ms / 1e3
            );
            assert!(
                report.bytes_sent >= 46 << 20,
                "seed {seed}: {} bytes sent",
                report.bytes_sent
            );
        });
    }
}

#[test]
fn a_migration_cut_inside_its_first_round_reports_the_bytes_that_went() {
    for seed in ferry_sim::seeds(1, 1) {
        ferry_sim::on_sim_runtime(seed, async {
            let net = SimNetwork::new(slow_link());
            let world = Rc::new(World::start(net.clone(), 2, 256).await);
            world.create_vm(0, "big", 48, 0).await;
            let migrating = {
                let world = world.clone();
                tokio::task::spawn_local(async move {
                    world::migrate(&world.actor(0), "big", "h001", MigrateOptions::default()).await
                })
            };
            tokio::time::sleep(Duration::from_secs(20)).await;
            net.partition("h000", "h001");
            let report = match migrating.await.expect("the migration task") {
                Ok(report) => report,
                Err(e) => panic!("seed {seed}: no report: {e}"),
            };
            println!(
                "seed {seed}: {:?} after {:.1} s with {} MB sent in {} rounds",
                report.outcome,
                report.total_ms / 1e3,
                report.bytes_sent >> 20,
                report.rounds
            );
            assert!(
                !report.completed(),
                "seed {seed}: completed across a partition"
            );
            assert_eq!(report.rounds, 0, "seed {seed}: the cut came inside round 0");
            // About 20 s at 1 MB/s went before the cut.
            assert!(
                report.bytes_sent >= 15 << 20,
                "seed {seed}: only {} bytes counted",
                report.bytes_sent
            );
        });
    }
}
