//! `ferry drs`: DRS over the hosts (migrations) and Storage DRS over each
//! host's datastores (disk moves), planned or applied, once or every so
//! often.

use clap::{Args, Subcommand};
use ferry_actors::ops::sdrs::StorageRules;

use super::client::{ClientArgs, block_on, connect};
use super::ops::line;

/// `ferry drs`.
#[derive(Debug, Subcommand)]
pub enum DrsCommand {
    /// Show the migrations that would even out the hosts' load (memory,
    /// vCPUs and guest CPU time); with `--storage`, the disk moves that
    /// would even out each host's datastores (space, then writes).
    Plan(DrsArgs),
    /// Run them: migrations through the scheduler at low priority; disk
    /// moves one at a time.
    Apply(DrsArgs),
}

/// Options of `ferry drs`.
#[derive(Debug, Args)]
pub struct DrsArgs {
    /// Loads within this many points (0-100) of each other are balanced.
    #[arg(long, default_value_t = 10.0)]
    pub tolerance: f64,
    /// At most this many migrations.
    #[arg(long, default_value_t = 8)]
    pub max_moves: usize,
    /// Migrations at once (apply).
    #[arg(long, default_value_t = 2)]
    pub parallel: usize,
    /// Apply: plan and apply again every this often (e.g. 5m), until
    /// stopped (automatic mode).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub every: Option<std::time::Duration>,
    /// Storage DRS: move disks between each host's datastores.
    #[arg(long)]
    pub storage: bool,
    /// Storage DRS: only this host.
    #[arg(long, requires = "storage")]
    pub node: Option<String>,
    /// Storage DRS: a datastore fuller than this (percent) sheds disks.
    #[arg(long, default_value_t = 80.0, requires = "storage")]
    pub fill_max: f64,
    /// Storage DRS: a datastore taking this many points more than an even
    /// share of the writes sheds busy disks.
    #[arg(long, default_value_t = 20.0, requires = "storage")]
    pub io_tolerance: f64,
    /// The client file.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Runs `ferry drs`.
pub fn drs(cmd: &DrsCommand) -> anyhow::Result<()> {
    let (args, apply) = match cmd {
        DrsCommand::Plan(a) => (a, false),
        DrsCommand::Apply(a) => (a, true),
    };
    anyhow::ensure!(
        (0.0..=100.0).contains(&args.tolerance),
        "--tolerance is 0 to 100 points"
    );
    if args.storage {
        return storage_drs(args, apply);
    }
    block_on(async {
        let cluster = connect(&args.client)?;
        loop {
            let plan = cluster
                .drs_plan(args.tolerance / 100.0, args.max_moves)
                .await?;
            println!(
                "imbalance {:.0} points -> {:.0} after {} moves",
                plan.imbalance_before * 100.0,
                plan.imbalance_after * 100.0,
                plan.moves.len()
            );
            for m in &plan.moves {
                println!("  {} {} -> {}: {}", m.vm, m.from, m.to, m.reason);
            }
            if apply && !plan.moves.is_empty() {
                let results = cluster.drs_apply(&plan, args.parallel).await;
                for r in &results {
                    println!("  {}", line(r));
                }
                let failed = results.iter().filter(|r| !r.moved()).count();
                anyhow::ensure!(failed == 0, "{failed} DRS migrations failed");
            }
            match (apply, args.every) {
                (true, Some(every)) => tokio::time::sleep(every).await,
                _ => return Ok(()),
            }
        }
    })
}

fn storage_drs(args: &DrsArgs, apply: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1.0..=100.0).contains(&args.fill_max),
        "--fill-max is 1 to 100 percent"
    );
    anyhow::ensure!(
        (0.0..=100.0).contains(&args.io_tolerance),
        "--io-tolerance is 0 to 100 points"
    );
    let rules = StorageRules {
        fill_max: args.fill_max / 100.0,
        io_tolerance: args.io_tolerance / 100.0,
        max_moves: args.max_moves,
    };
    block_on(async {
        let cluster = connect(&args.client)?;
        loop {
            let plans = cluster
                .storage_drs_plan(args.node.as_deref(), rules)
                .await?;
            let mut failed = 0;
            for plan in &plans {
                let now: Vec<String> = plan
                    .after
                    .iter()
                    .map(|(ds, fill, writes)| {
                        format!(
                            "{ds} {:.0}% full, {:.0}% of writes",
                            fill * 100.0,
                            writes * 100.0
                        )
                    })
                    .collect();
                println!(
                    "{}: {} disk moves; after them: {}",
                    plan.host,
                    plan.moves.len(),
                    now.join("; ")
                );
                for m in &plan.moves {
                    println!("  {}/{} {} -> {}: {}", m.vm, m.disk, m.from, m.to, m.reason);
                }
                if apply && !plan.moves.is_empty() {
                    let results = cluster
                        .storage_drs_apply(plan, |m, r| match r {
                            Ok(()) => println!("  {}/{} moved to {}", m.vm, m.disk, m.to),
                            Err(e) => println!("  {}/{} not moved: {e}", m.vm, m.disk),
                        })
                        .await;
                    failed += results.iter().filter(|(_, r)| r.is_err()).count();
                }
            }
            anyhow::ensure!(failed == 0, "{failed} disk moves failed");
            match (apply, args.every) {
                (true, Some(every)) => tokio::time::sleep(every).await,
                _ => return Ok(()),
            }
        }
    })
}
