//! The long text form of a migration report (`ferry migrate show`): the
//! headline, the phases of both sides, the rounds table and the disks.

use std::fmt::Write as _;

use super::report::{DestReport, MigrationReport, Outcome, show_id};
use super::timeline::{Figure, PhaseReport};

/// `unix_ms` as an RFC 3339 UTC time (`1970-01-01T00:00:00.000Z`).
pub fn utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        unix_ms % 1000
    )
}

fn figure_text(f: &Figure) -> String {
    match f {
        Figure::Count(n) => n.to_string(),
        Figure::Value(x) => format!("{x:.2}"),
        Figure::Text(t) => t.clone(),
    }
}

fn depth(phases: &[PhaseReport], mut i: usize) -> usize {
    let mut d = 0;
    while let Some(p) = phases[i].parent {
        d += 1;
        i = p as usize;
    }
    d
}

/// One line per phase, indented under its parent; rounds are left to the
/// rounds table unless `with_rounds`.
fn phases_text(out: &mut String, phases: &[PhaseReport], with_rounds: bool) {
    let _ = writeln!(
        out,
        "  {:<28} {:>9} {:>9} {:>9}",
        "phase", "start ms", "end ms", "ms"
    );
    for (i, p) in phases.iter().enumerate() {
        let round_like = p.name == "precopy.round" || p.name == "round.received";
        if round_like && !with_rounds {
            continue;
        }
        let name = format!("{}{}", "  ".repeat(depth(phases, i)), p.name);
        let end = p.end_ms.map_or("-".to_owned(), |e| format!("{e:.1}"));
        let took = p
            .duration_ms()
            .map_or("-".to_owned(), |d| format!("{d:.2}"));
        let figures: Vec<String> = p
            .figures
            .iter()
            .map(|(k, v)| format!("{k}={}", figure_text(v)))
            .collect();
        let _ = writeln!(
            out,
            "  {name:<28} {:>9.1} {end:>9} {took:>9}  {}",
            p.start_ms,
            figures.join(" ")
        );
    }
}

fn destination_text(out: &mut String, d: &DestReport) {
    let _ = writeln!(
        out,
        "destination {}: {}, total {:.1} ms, downtime seen here {:.2} ms (switchover message to running)",
        d.to, d.outcome, d.total_ms, d.downtime_ms
    );
    #[allow(clippy::cast_precision_loss)]
    let mb = d.bytes_received as f64 / 1e6;
    let _ = writeln!(
        out,
        "  {} rounds, {} pages, {mb:.1} MB received",
        d.rounds, d.pages_received
    );
    phases_text(out, &d.phases, false);
}

impl MigrationReport {
    /// Everything in the report, for people: headline, phases, rounds,
    /// disks and the destination's side.
    pub fn to_detail_text(&self) -> String {
        let mut out = String::new();
        let outcome = match &self.outcome {
            Outcome::Completed => "completed".to_owned(),
            Outcome::Aborted { reason } => format!("aborted, VM still on {}: {reason}", self.from),
            Outcome::InDoubt { reason } => format!("in doubt: {reason}"),
        };
        let _ = writeln!(
            out,
            "migration {} of {}: {} -> {}{}, {outcome}",
            show_id(self.migration_id),
            self.vm,
            self.from,
            self.to,
            if self.cold { " (cold)" } else { "" }
        );
        if self.started_unix_ms > 0 {
            let _ = writeln!(out, "  started {}", utc(self.started_unix_ms));
        }
        let dest_downtime = self.destination.as_ref().map_or(String::new(), |d| {
            format!(", {:.2} ms of it seen on {}", d.downtime_ms, d.to)
        });
        let _ = writeln!(
            out,
            "  total {:.1} ms, downtime {:.2} ms measured on {} (predicted {:.2} ms{dest_downtime})",
            self.total_ms, self.downtime_ms, self.from, self.predicted_downtime_ms
        );
        let verified = match self.memory_verified {
            Some(true) => "memory verified",
            Some(false) => "MEMORY MISMATCH",
            None => "memory not verified",
        };
        let _ = writeln!(
            out,
            "  {} rounds, {} pages, {:.1} MB at {:.0} MB/s, throttle max {}%, device state {} bytes, {verified}",
            self.rounds,
            self.pages_sent,
            self.mb_sent(),
            self.throughput_mb_s,
            self.throttle_max_percent,
            self.state_bytes
        );
        let _ = writeln!(out, "source {}:", self.from);
        phases_text(&mut out, &self.phases, false);
        let _ = writeln!(out, "rounds:");
        let _ = writeln!(
            out,
            "  {:>5} {:>9} {:>9} {:>9} {:>8} {:>8} {:>11} {:>12} {:>12} {:>8}",
            "round",
            "start ms",
            "pages",
            "MB",
            "ms",
            "MB/s",
            "dirty after",
            "dirty/s",
            "predicted ms",
            "throttle"
        );
        for r in &self.round_log {
            #[allow(clippy::cast_precision_loss)]
            let mb = r.bytes as f64 / 1e6;
            let _ = writeln!(
                out,
                "  {:>5} {:>9.1} {:>9} {mb:>9.1} {:>8.1} {:>8.0} {:>11} {:>12.0} {:>12.2} {:>7}%",
                r.round,
                r.start_ms,
                r.pages,
                r.duration_ms,
                r.bandwidth_mb_s,
                r.dirty_after,
                r.dirty_rate_pages_per_s,
                r.predicted_downtime_ms,
                r.throttle_percent
            );
        }
        for d in &self.disks {
            let _ = writeln!(out, "{}", self.disk_line(d));
        }
        if let Some(d) = &self.destination {
            destination_text(&mut out, d);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(utc(1_795_996_800_123), "2026-11-30T00:00:00.123Z");
        assert_eq!(utc(1_796_000_461_005), "2026-11-30T01:01:01.005Z");
    }
}
