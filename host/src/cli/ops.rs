//! Operations commands: `ferry jobs`, `ferry audit`, `ferry recommend`,
//! `ferry host`, and `ferry migrate --at` / `--batch`.

use std::path::Path;

use anyhow::Context;
use clap::{Args, Subcommand};
use ferry_actors::api::{BatchResult, parse_batch};
use ferry_actors::ops::audit::AuditQuery;
use ferry_actors::ops::jobs::Job;
use ferry_actors::ops::unix_ms_now;

use super::client::{ClientArgs, MigrateArgs, block_on, connect, migrate_options};

/// A time: RFC 3339 (`2026-12-01T02:00:00Z`) or `+DURATION` from now
/// (`+30m`), as ms since the epoch.
pub fn parse_time(s: &str) -> Result<u64, String> {
    parse_time_at(s, unix_ms_now())
}

/// How far ahead a job may be scheduled.
const AHEAD_MS_MAX: u64 = 366 * 24 * 3600 * 1000;
/// How far in the past a given time may lie and still mean "now" (clocks
/// and typing take a moment).
const PAST_MS_SLACK: u64 = 60 * 1000;

/// [`parse_time`] with the clock at `now_ms`: times in the past (beyond a
/// minute) or more than a year ahead are refused.
fn parse_time_at(s: &str, now_ms: u64) -> Result<u64, String> {
    let at = if let Some(rel) = s.strip_prefix('+') {
        let d = humantime::parse_duration(rel).map_err(|e| format!("{s:?}: {e}"))?;
        now_ms.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    } else {
        let t = humantime::parse_rfc3339_weak(s)
            .map_err(|e| format!("{s:?}: {e} (use e.g. 2026-12-01T02:00:00Z or +30m)"))?;
        t.duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .map_err(|_| format!("{s:?} is before 1970"))?
    };
    if at.saturating_add(PAST_MS_SLACK) < now_ms {
        return Err(format!(
            "{s:?} is in the past ({}); leave out --at to run now",
            when(at)
        ));
    }
    if at > now_ms.saturating_add(AHEAD_MS_MAX) {
        return Err(format!("{s:?} is more than a year ahead"));
    }
    Ok(at)
}

/// Names the nodes that did not answer (the answer shown is partial).
fn say_silent(silent: &[(String, ferry_actors::api::ClientError)]) {
    for (node, e) in silent {
        eprintln!("partial answer: {node} did not answer: {e}");
    }
}

/// A past time: RFC 3339, or a duration ago (`1h`).
fn parse_since(s: &str) -> Result<u64, String> {
    match humantime::parse_duration(s) {
        Ok(d) => Ok(unix_ms_now().saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))),
        Err(_) => parse_time(s),
    }
}

fn when(ms: u64) -> String {
    /// 9999-12-31T23:59:59Z: RFC 3339 has four-digit years.
    const LAST_MS: u64 = 253_402_300_799_000;
    if ms == 0 {
        return "-".into();
    }
    if ms > LAST_MS {
        // A time stored by an older ferry that took any --at.
        return format!("{ms} ms after 1970");
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// `ferry migrate VM --to HOST --at TIME`.
pub fn schedule(args: &MigrateArgs, vm: &str, to: &str, at: u64) -> anyhow::Result<()> {
    let (node, job) = block_on(async {
        let cluster = connect(&args.client)?;
        Ok(cluster
            .schedule_migration(vm, to, at, migrate_options(args))
            .await?)
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&job)?);
    } else {
        println!(
            "job {} on {node}: {} to {} at {} ({} priority); `ferry jobs list` follows it",
            job.id,
            job.vm,
            job.to,
            when(job.not_before_unix_ms),
            job.priority
        );
    }
    Ok(())
}

/// `ferry migrate --batch FILE`.
pub fn batch(args: &MigrateArgs, file: &Path) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let items = parse_batch(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let total = items.len();
    eprintln!("{total} migrations, {} at a time", args.parallel.max(1));
    let results = block_on(async {
        let cluster = connect(&args.client)?;
        let options = migrate_options(args);
        Ok(cluster
            .migrate_batch(items, args.parallel, &options, |r| eprintln!("{}", line(r)))
            .await)
    })?;
    let moved = results.iter().filter(|r| r.moved()).count();
    if args.json {
        let rows: Vec<serde_json::Value> = results
            .iter()
            .map(|r| {
                serde_json::json!({
                    "vm": r.item.vm, "to": r.item.to, "moved": r.moved(),
                    "report": r.result.as_ref().ok(),
                    "error": r.result.as_ref().err().map(ToString::to_string),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!("batch: {moved} of {total} moved");
        for r in results.iter().filter(|r| !r.moved()) {
            println!("  not moved: {}", line(r));
        }
    }
    anyhow::ensure!(
        moved == total,
        "{} of {total} migrations failed",
        total - moved
    );
    Ok(())
}

pub(super) fn line(r: &BatchResult) -> String {
    match &r.result {
        Ok(rep) if rep.completed() => format!(
            "{} -> {}: moved in {:.0} ms, {:.1} ms downtime",
            r.item.vm, rep.to, rep.total_ms, rep.downtime_ms
        ),
        Ok(rep) => format!("{} -> {}: {:?}", r.item.vm, rep.to, rep.outcome),
        Err(e) => format!("{} -> {}: {e}", r.item.vm, r.item.to),
    }
}

/// `ferry jobs`.
#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Every node's jobs: queued, scheduled, running and recent ones.
    List {
        /// JSON.
        #[arg(long)]
        json: bool,
        /// The client file.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Call off a job (a running one's migration is cancelled; the VM
    /// keeps running on its source).
    Cancel {
        /// The job's node.
        #[arg(long)]
        node: String,
        /// The job.
        id: u64,
        /// The client file.
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// Runs `ferry jobs`.
pub fn jobs(cmd: &JobsCommand) -> anyhow::Result<()> {
    match cmd {
        JobsCommand::List { json, client } => {
            let fanned = block_on(async { Ok(connect(client)?.all_jobs().await.require_any()?) })?;
            say_silent(&fanned.silent);
            let jobs: Vec<(String, Job)> = fanned
                .answers
                .into_iter()
                .flat_map(|(node, jobs)| jobs.into_iter().map(move |j| (node.clone(), j)))
                .collect();
            if *json {
                let rows: Vec<serde_json::Value> = jobs
                    .iter()
                    .map(|(node, j)| serde_json::json!({"node": node, "job": j}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(());
            }
            println!(
                "{:<8} {:>4} {:<12} {:<8} {:<7} {:<10} {:<20} result",
                "node", "job", "vm", "to", "prio", "state", "at"
            );
            for (node, j) in &jobs {
                println!("{}", job_row(node, j));
            }
            if jobs.is_empty() {
                println!("(no jobs)");
            }
            Ok(())
        }
        JobsCommand::Cancel { node, id, client } => {
            block_on(async { Ok(connect(client)?.cancel_job(node, *id).await?) })?;
            println!("job {id} on {node} cancelled");
            Ok(())
        }
    }
}

fn job_row(node: &str, j: &Job) -> String {
    let at = match j.started_unix_ms {
        0 => j.not_before_unix_ms.max(j.submitted_unix_ms),
        t => t,
    };
    format!(
        "{node:<8} {:>4} {:<12} {:<8} {:<7} {:<10} {:<20} {}",
        j.id,
        j.vm,
        j.to,
        j.priority.to_string(),
        format!("{:?}", j.state).to_lowercase(),
        when(at),
        j.result
    )
}

/// Options of `ferry audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Only this VM's entries.
    #[arg(long)]
    pub vm: Option<String>,
    /// Only entries since: RFC 3339, or a duration ago (`1h`).
    #[arg(long, value_parser = parse_since)]
    pub since: Option<u64>,
    /// Include requests that only read.
    #[arg(long)]
    pub reads: bool,
    /// At most this many, the newest.
    #[arg(long, default_value_t = 200)]
    pub last: u32,
    /// JSON.
    #[arg(long)]
    pub json: bool,
    /// The client file.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Runs `ferry audit`.
pub fn audit(args: &AuditArgs) -> anyhow::Result<()> {
    let query = AuditQuery {
        vm: args.vm.clone(),
        since_unix_ms: args.since.unwrap_or(0),
        limit: args.last,
        reads: args.reads,
    };
    let fanned = block_on(async {
        Ok(connect(&args.client)?
            .audit_from_all(&query)
            .await
            .require_any()?)
    })?;
    say_silent(&fanned.silent);
    let entries = ferry_actors::ops::audit::merge(
        fanned.answers.into_iter().flat_map(|(_, a)| a).collect(),
        query.limit,
    );
    if args.json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    for e in &entries {
        let downtime = e
            .downtime_ms
            .map_or(String::new(), |d| format!(" downtime {d:.1} ms"));
        let route = match (e.from.as_str(), e.to.as_str()) {
            (f, "") => f.to_owned(),
            (f, t) => format!("{f} -> {t}"),
        };
        println!(
            "{} {:<9} {:<24} {:<10} {:<12} {} ({} ms{downtime}) by {}{}",
            when(e.at_unix_ms),
            e.node,
            e.action,
            e.outcome,
            e.vm,
            route,
            e.duration_ms,
            e.who,
            if e.detail.is_empty() {
                String::new()
            } else {
                format!(": {}", e.detail)
            }
        );
    }
    if entries.is_empty() {
        println!("(no entries)");
    }
    Ok(())
}

/// Options of `ferry recommend`.
#[derive(Debug, Args)]
pub struct RecommendArgs {
    /// The VM.
    pub vm: String,
    /// The disks would move to this datastore (default: they stay).
    #[arg(long)]
    pub datastore: Option<String>,
    /// JSON.
    #[arg(long)]
    pub json: bool,
    /// The client file.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Runs `ferry recommend`.
pub fn recommend(args: &RecommendArgs) -> anyhow::Result<()> {
    let ds = args.datastore.clone().unwrap_or_default();
    let ranked = block_on(async { Ok(connect(&args.client)?.recommend(&args.vm, &ds).await?) })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&ranked)?);
        return Ok(());
    }
    for (i, s) in ranked.iter().enumerate() {
        match s.score {
            Some(score) => println!("{}. {} (score {score:.1})", i + 1, s.host),
            None => println!("-  {} (cannot take {})", s.host, args.vm),
        }
        for r in &s.reasons {
            println!("     {r}");
        }
    }
    if ranked.is_empty() {
        println!("no other host");
    }
    Ok(())
}

/// `ferry host`.
#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// Maintenance mode: `enter` migrates every VM away and waits until
    /// the host is empty; `exit` returns it to service.
    Maintenance {
        /// enter or exit.
        #[arg(value_parser = ["enter", "exit"])]
        action: String,
        /// The host.
        host: String,
        /// The client file.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Report a host degraded (it evacuates like maintenance mode), or
    /// healthy again with `--healthy`.
    Degraded {
        /// The host.
        host: String,
        /// Why.
        #[arg(long, required_unless_present = "healthy")]
        reason: Option<String>,
        /// It is healthy again.
        #[arg(long)]
        healthy: bool,
        /// The client file.
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// Runs `ferry host`.
pub fn host(cmd: &HostCommand) -> anyhow::Result<()> {
    let (client, host) = match cmd {
        HostCommand::Maintenance { client, host, .. }
        | HostCommand::Degraded { client, host, .. } => (client, host),
    };
    let jobs = block_on(async {
        let cluster = connect(client)?;
        Ok(match cmd {
            HostCommand::Maintenance { action, .. } if action == "exit" => {
                cluster.exit_maintenance(host).await?;
                None
            }
            HostCommand::Maintenance { .. } => {
                let jobs = cluster.enter_maintenance(host).await?;
                // Said once the host took it (the role check comes first).
                eprintln!("{host}: in maintenance mode, its VMs migrating away");
                Some(jobs)
            }
            HostCommand::Degraded {
                reason, healthy, ..
            } => {
                let reason = if *healthy {
                    String::new()
                } else {
                    reason.clone().unwrap_or_default()
                };
                Some(cluster.report_degraded(host, &reason).await?).filter(|_| !reason.is_empty())
            }
        })
    })?;
    let Some(jobs) = jobs else {
        println!("{host} is back in service");
        return Ok(());
    };
    for j in &jobs {
        println!("{}", job_row(host, j));
    }
    let left = jobs
        .iter()
        .filter(|j| j.state != ferry_actors::ops::jobs::JobState::Done)
        .count();
    anyhow::ensure!(left == 0, "{host} still has {left} VMs: see the jobs above");
    println!("{host} is empty ({} VMs moved)", jobs.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_in_the_past_or_absurdly_far_are_refused_and_any_stored_one_prints() {
        let now = 1_800_000_000_000;
        assert_eq!(parse_time_at("+30m", now), Ok(now + 30 * 60 * 1000));
        let e = parse_time_at("+9999999999d", now).expect_err("absurd");
        assert!(e.contains("more than a year ahead"), "{e}");
        let e = parse_time_at("1970-01-01T00:00:00Z", now).expect_err("past");
        assert!(e.contains("in the past"), "{e}");
        assert!(parse_time_at("2027-06-01T02:00:00Z", now).is_ok());
        assert!(parse_time_at("next tuesday", now).is_err());
        // `jobs list` printed such a time with a panic.
        assert_eq!(when(u64::MAX), format!("{} ms after 1970", u64::MAX));
        assert_eq!(when(0), "-");
        assert_eq!(when(1_000), "1970-01-01T00:00:01Z");
    }
}
