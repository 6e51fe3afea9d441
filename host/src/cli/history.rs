//! What happened: `ferry migrate show ID [--json] [--chart out.svg]`,
//! `ferry migrate list` and `ferry node stats`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use ferry_actors::migration::MigrationReport;
use ferry_actors::migration::report::{parse_id, show_id};
use ferry_actors::migration::report_text::utc;
use ferry_actors::node::metrics::NodeStats;

use super::client::{ClientArgs, block_on, connect};

/// `ferry migrate` subcommands (without one, `ferry migrate VM --to HOST`
/// moves a VM).
#[derive(Debug, Subcommand)]
pub enum MigrateAction {
    /// One migration's report: phases of both hosts, rounds, downtime.
    Show(ShowArgs),
    /// The most recent migrations of the cluster.
    List(ListArgs),
    /// Call off a running migration before its VM is handed over (the VM
    /// keeps running on its source).
    Cancel(CancelArgs),
}

/// Options of `ferry migrate cancel`.
#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The migration id (as the progress bar, `ferry migrate list` and
    /// `ferry node stats` print it).
    pub id: String,
    /// The client file.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Options of `ferry migrate show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The migration id (16 hex digits, as reports and `ferry migrate list`
    /// print it), or `last` for the most recent one.
    pub id: String,
    /// Print the report (with the destination's side) as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also draw the timeline chart (SVG) to this file.
    #[arg(long, value_name = "FILE")]
    pub chart: Option<PathBuf>,
    /// The client file.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Options of `ferry migrate list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// How many.
    #[arg(long, default_value_t = 20)]
    pub last: u32,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// The client file.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Options of `ferry node stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Only this node (default: every node in the client file).
    #[arg(long)]
    pub node: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// The client file.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Runs a `ferry migrate` subcommand.
pub fn run(action: &MigrateAction) -> anyhow::Result<()> {
    match action {
        MigrateAction::Show(args) => show(args),
        MigrateAction::List(args) => list(args),
        MigrateAction::Cancel(args) => cancel(args),
    }
}

fn id_arg(text: &str) -> anyhow::Result<u64> {
    parse_id(text).with_context(|| {
        format!(
            "{text:?} is not a migration id: ids are up to 16 hex digits (see ferry migrate list)"
        )
    })
}

/// `ferry migrate cancel`.
pub fn cancel(args: &CancelArgs) -> anyhow::Result<()> {
    let id = id_arg(&args.id)?;
    let source = block_on(async {
        let cluster = connect(&args.client)?;
        Ok(cluster.cancel_migration(id).await?)
    })?;
    println!(
        "migration {} cancelled; its VM keeps running on {source}",
        show_id(id)
    );
    Ok(())
}

/// `ferry migrate show`.
pub fn show(args: &ShowArgs) -> anyhow::Result<()> {
    let report = block_on(async {
        let cluster = connect(&args.client)?;
        let id = if args.id == "last" {
            let recent = cluster.recent_migrations(1).await?;
            recent
                .first()
                .map(|r| r.id)
                .context("no node remembers any migration")?
        } else {
            id_arg(&args.id)?
        };
        Ok(cluster.migration(id).await?)
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.to_detail_text());
    }
    if let Some(path) = &args.chart {
        crate::chart::write_svg(&report, path)?;
        eprintln!("chart written to {}", path.display());
    }
    Ok(())
}

/// `ferry migrate list`.
pub fn list(args: &ListArgs) -> anyhow::Result<()> {
    let records = block_on(async {
        let cluster = connect(&args.client)?;
        Ok(cluster.recent_migrations(args.last).await?)
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&records)?);
        return Ok(());
    }
    println!(
        "{:<16}  {:<24}  {:<12} {:<10} {:<10} {:>10} {:>11}  outcome",
        "id", "started (UTC)", "vm", "from", "to", "total ms", "downtime ms"
    );
    for r in &records {
        let (started, total, downtime, outcome) = match (&r.source, &r.destination) {
            (Some(s), _) => (
                s.started_unix_ms,
                s.total_ms,
                s.downtime_ms,
                outcome_word(s),
            ),
            (None, Some(d)) => (
                d.started_unix_ms,
                d.total_ms,
                d.downtime_ms,
                d.outcome.clone(),
            ),
            (None, None) => continue,
        };
        println!(
            "{:<16}  {:<24}  {:<12} {:<10} {:<10} {total:>10.1} {downtime:>11.2}  {outcome}",
            show_id(r.id),
            utc(started),
            r.vm,
            r.from,
            r.to
        );
    }
    Ok(())
}

fn outcome_word(r: &MigrationReport) -> String {
    use ferry_actors::migration::Outcome;
    match &r.outcome {
        Outcome::Completed => "completed".into(),
        Outcome::Aborted { reason } => format!("aborted: {reason}"),
        Outcome::InDoubt { reason } => format!("in doubt: {reason}"),
    }
}

/// `ferry node stats`.
pub fn stats(args: &StatsArgs) -> anyhow::Result<()> {
    let all = block_on(async {
        let cluster = connect(&args.client)?;
        let nodes = match &args.node {
            Some(n) => vec![n.clone()],
            None => cluster.node_names(),
        };
        let mut all = Vec::new();
        for node in nodes {
            all.push(cluster.stats(&node).await?);
        }
        Ok(all)
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        for s in &all {
            print!("{}", stats_text(s));
        }
    }
    Ok(())
}

/// A node's figures for people.
pub fn stats_text(s: &NodeStats) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "{}:", s.host);
    let _ = writeln!(
        out,
        "  outgoing: {} started, {} completed, {} aborted, {} in doubt, {:.1} MB sent",
        s.started,
        s.succeeded,
        s.aborted,
        s.in_doubt,
        mb(s.bytes_sent)
    );
    let _ = writeln!(
        out,
        "  incoming: {} adopted, {} discarded, {:.1} MB received; disks: {:.1} MB copied",
        s.incoming_adopted,
        s.incoming_discarded,
        mb(s.bytes_received),
        mb(s.disk_bytes_copied)
    );
    let h = &s.downtime_ms;
    if h.count > 0 {
        #[allow(clippy::cast_precision_loss)]
        let mean = h.sum / h.count as f64;
        let bound = |q| {
            h.quantile_bound(q)
                .map_or("more".to_owned(), |b| format!("<= {b}"))
        };
        let _ = writeln!(
            out,
            "  downtime: {} migrations, mean {mean:.1} ms, p50 {} ms, p99 {} ms",
            h.count,
            bound(0.5),
            bound(0.99)
        );
        let mut buckets = Vec::new();
        for (i, c) in h.counts.iter().enumerate().filter(|(_, c)| **c > 0) {
            let label = h
                .bounds
                .get(i)
                .map_or("more".to_owned(), |b| format!("<={b}"));
            buckets.push(format!("{label}: {c}"));
        }
        let _ = writeln!(out, "    ms buckets {}", buckets.join(", "));
    }
    let r = &s.round_pages;
    if r.count > 0 {
        #[allow(clippy::cast_precision_loss)]
        let mean = r.sum / r.count as f64;
        let _ = writeln!(out, "  rounds: {}, mean {mean:.0} pages per round", r.count);
    }
    let _ = writeln!(
        out,
        "  now: {} running, {:.0} MB/s",
        s.active.len(),
        s.throughput_bytes_per_s / 1e6
    );
    for a in &s.active {
        let _ = writeln!(
            out,
            "    {} {} -> {}: {} round {}, {} pages left, {:.0} MB/s",
            a.id,
            a.vm,
            a.to,
            a.progress.phase,
            a.progress.round,
            a.progress.pages_left,
            a.progress.rate_bytes_per_s / 1e6
        );
    }
    out
}

#[allow(clippy::cast_precision_loss)]
fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}
