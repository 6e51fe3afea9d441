//! A long link (150 ms round trips): the downtime prediction counts the
//! switchover's trips, a budget below what the link allows is said at the
//! start and in the report, and a budget the link allows is kept.
//!
//! Replay with `SIM_SEED=n cargo test -p ferry-sim --test long_link`.

use std::rc::Rc;
use std::time::Duration;

use ferry_actors::migration::MigrationReport;
use ferry_actors::node::client::MigrateOptions;
use ferry_sim::net::{LinkParams, SimNetwork};
use ferry_sim::world::{self, World};

const ONE_WAY: Duration = Duration::from_millis(75);

async fn migrate_over_a_long_link(seed: u64, downtime_ms: u64) -> MigrationReport {
    let link = LinkParams {
        bandwidth_bytes_per_s: 100e6,
        latency: ONE_WAY,
    };
    let world = Rc::new(World::start(SimNetwork::new(link), 2, 256).await);
    world.create_vm(0, "far", 16, 1).await;
    let options = MigrateOptions {
        downtime_ms,
        time_limit_s: 10,
        ..MigrateOptions::default()
    };
    match world::migrate(&world.actor(0), "far", "h001", options).await {
        Ok(report) => report,
        Err(e) => panic!("seed {seed}: no report: {e}"),
    }
}

fn budget_note(report: &MigrationReport) -> Option<&ferry_actors::migration::PhaseReport> {
    report.phases.iter().find(|p| p.name == "budget_below_link")
}

#[test]
fn a_budget_the_long_link_allows_is_kept_within_one_one_way_delay() {
    for seed in ferry_sim::seeds(1, 1) {
        let report = ferry_sim::on_sim_runtime(seed, migrate_over_a_long_link(seed, 300));
        println!(
            "seed {seed}: {:?}, downtime {:.0} ms (predicted {:.0} ms), {} rounds",
            report.outcome, report.downtime_ms, report.predicted_downtime_ms, report.rounds
        );
        assert!(report.completed(), "seed {seed}: {:?}", report.outcome);
        assert!(
            budget_note(&report).is_none(),
            "seed {seed}: 300 ms is within reach"
        );
        // Three one-way trips (225 ms) at least, and the prediction knew.
        assert!(
            report.predicted_downtime_ms >= 225.0,
            "seed {seed}: {report:?}"
        );
        let limit = 300.0 + ONE_WAY.as_secs_f64() * 1e3;
        assert!(
            report.downtime_ms <= limit,
            "seed {seed}: downtime {:.0} ms over {limit} ms",
            report.downtime_ms
        );
    }
}

#[test]
fn a_budget_below_what_the_long_link_allows_is_said_at_the_start() {
    for seed in ferry_sim::seeds(1, 1) {
        let report = ferry_sim::on_sim_runtime(seed, migrate_over_a_long_link(seed, 50));
        println!("seed {seed}: {:?}", report.outcome);
        let note = budget_note(&report).unwrap_or_else(|| panic!("seed {seed}: not said"));
        assert!(
            note.start_ms < 1_000.0,
            "seed {seed}: said only after {:.0} ms",
            note.start_ms
        );
        assert!(
            !report.completed(),
            "seed {seed}: a 50 ms budget cannot hold over 150 ms round trips"
        );
        let reason = format!("{:?}", report.outcome);
        assert!(
            reason.contains("this link allows no less than"),
            "seed {seed}: the failure does not say why: {reason}"
        );
    }
}
