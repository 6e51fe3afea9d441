//! The timeline chart of one migration (`ferry migrate show ID --chart
//! out.svg`): against time since the offer, the pages still to send
//! (left axis, log scale) and each round's throughput (right axis), with
//! the pause-to-resume window and the disk copy marked.

use std::path::Path;

use anyhow::Context;
use ferry_actors::migration::{MigrationReport, PhaseReport};
use plotters::prelude::*;

const WIDTH: u32 = 1100;
const HEIGHT: u32 = 620;

/// The pause-to-resume window on the source, in ms since the offer: from
/// the vCPUs stopping to the destination's resume acknowledged.
pub fn pause_window(report: &MigrationReport) -> Option<(f64, f64)> {
    let find = |name: &str| report.phases.iter().find(|p| p.name == name);
    let paused = find("pause").and_then(|p| p.end_ms)?;
    let resumed = find("resume")
        .and_then(|p| p.end_ms)
        .unwrap_or(report.total_ms);
    Some((paused, resumed))
}

fn phase(report: &MigrationReport, name: &str) -> Option<PhaseReport> {
    report.phases.iter().find(|p| p.name == name).cloned()
}

/// `(time ms, pages still to send)` points: each round starts with its
/// pages and ends with the pages dirtied meanwhile.
pub fn pages_left_series(report: &MigrationReport) -> Vec<(f64, f64)> {
    let mut points = Vec::new();
    let last = report.round_log.len().saturating_sub(1);
    for (i, r) in report.round_log.iter().enumerate() {
        #[allow(clippy::cast_precision_loss)]
        let (pages, after) = (r.pages as f64, r.dirty_after as f64);
        points.push((r.start_ms, pages.max(1.0)));
        let end = r.start_ms + r.duration_ms;
        // The final round ends with nothing left to send.
        let left = if i == last && report.completed() {
            1.0
        } else {
            after.max(1.0)
        };
        points.push((end, left));
    }
    points
}

/// Writes the chart of `report` to `path` as SVG.
pub fn write_svg(report: &MigrationReport, path: &Path) -> anyhow::Result<()> {
    draw(report, path)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("drawing {}", path.display()))
}

fn draw(report: &MigrationReport, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let x_max = report.total_ms.max(1.0) * 1.02;
    let pages = pages_left_series(report);
    let y_max = pages.iter().map(|p| p.1).fold(10.0, f64::max) * 2.0;
    let mb_max = report
        .round_log
        .iter()
        .map(|r| r.bandwidth_mb_s)
        .fold(1.0, f64::max)
        * 1.2;
    let title = format!(
        "{}: {} -> {}, {:.0} ms total, {:.1} ms downtime, {} rounds",
        report.vm, report.from, report.to, report.total_ms, report.downtime_ms, report.rounds
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .right_y_label_area_size(80)
        .build_cartesian_2d(0.0..x_max, (1.0..y_max).log_scale())?
        .set_secondary_coord(0.0..x_max, 0.0..mb_max);
    chart
        .configure_mesh()
        .x_desc("time since the offer (ms)")
        .y_desc("pages still to send (log)")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    chart
        .configure_secondary_axes()
        .y_desc("round throughput (MB/s)")
        .draw()?;

    // Disk copy alongside pre-copy.
    let band = |start: f64, end: f64, colour: RGBColor, alpha: f64| {
        Rectangle::new([(start, 1.0), (end, y_max)], colour.mix(alpha).filled())
    };
    if let Some(storage) = phase(report, "storage") {
        let end = storage.end_ms.unwrap_or(report.total_ms);
        chart
            .draw_series([band(storage.start_ms, end, RGBColor(120, 170, 230), 0.12)])?
            .label("disk copy")
            .legend(|(x, y)| {
                Rectangle::new(
                    [(x, y - 5), (x + 16, y + 5)],
                    RGBColor(120, 170, 230).mix(0.3).filled(),
                )
            });
    }
    // The pause-to-resume window, at least a few pixels wide to be seen.
    if let Some((paused, resumed)) = pause_window(report) {
        let min_width = x_max * 3.0 / f64::from(WIDTH);
        let end = resumed.max(paused + min_width);
        chart
            .draw_series([band(paused, end, RED, 0.35)])?
            .label(format!("paused: {:.1} ms", resumed - paused))
            .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 16, y + 5)], RED.mix(0.5).filled()));
    }
    // Where the switchover began (the decision to pause).
    if let Some(sw) = phase(report, "switchover") {
        chart.draw_series(LineSeries::new(
            [(sw.start_ms, 1.0), (sw.start_ms, y_max)],
            BLACK.mix(0.4).stroke_width(1),
        ))?;
    }
    // Throughput per round: one bar over the round's time span.
    chart
        .draw_secondary_series(report.round_log.iter().map(|r| {
            Rectangle::new(
                [
                    (r.start_ms, 0.0),
                    (r.start_ms + r.duration_ms, r.bandwidth_mb_s),
                ],
                RGBColor(60, 160, 90).mix(0.35).filled(),
            )
        }))?
        .label("throughput per round (MB/s, right)")
        .legend(|(x, y)| {
            Rectangle::new(
                [(x, y - 5), (x + 16, y + 5)],
                RGBColor(60, 160, 90).mix(0.5).filled(),
            )
        });
    chart
        .draw_series(LineSeries::new(pages.clone(), BLUE.stroke_width(2)))?
        .label("pages still to send (left)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLUE.stroke_width(2)));
    chart.draw_series(pages.iter().map(|p| Circle::new(*p, 3, BLUE.filled())))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_actors::migration::{Outcome, RoundReport};

    fn round(round: u32, start_ms: f64, pages: u64, dirty_after: u64) -> RoundReport {
        RoundReport {
            round,
            start_ms,
            pages,
            bytes: pages * 4096,
            duration_ms: 10.0,
            dirty_after,
            dirty_rate_pages_per_s: 0.0,
            bandwidth_mb_s: 400.0,
            predicted_downtime_ms: 0.0,
            throttle_percent: 0,
        }
    }

    fn report() -> MigrationReport {
        let phase = |name: &str, start_ms: f64, end_ms: f64| PhaseReport {
            name: name.into(),
            parent: None,
            start_ms,
            end_ms: Some(end_ms),
            figures: Vec::new(),
        };
        MigrationReport {
            migration_id: 1,
            started_unix_ms: 0,
            vm: "web-1".into(),
            from: "a".into(),
            to: "b".into(),
            cold: false,
            outcome: Outcome::Completed,
            total_ms: 40.0,
            downtime_ms: 6.0,
            predicted_downtime_ms: 5.0,
            bytes_sent: 0,
            pages_sent: 0,
            rounds: 3,
            round_log: vec![
                round(0, 1.0, 5000, 300),
                round(1, 11.0, 300, 40),
                round(2, 31.0, 40, 7),
            ],
            throughput_mb_s: 400.0,
            throttle_max_percent: 0,
            state_bytes: 0,
            memory_verified: None,
            disks: Vec::new(),
            phases: vec![
                phase("offer", 0.0, 1.0),
                phase("switchover", 21.0, 40.0),
                phase("pause", 21.0, 34.0),
                phase("resume", 38.0, 40.0),
            ],
            destination: None,
        }
    }

    #[test]
    fn the_series_follow_the_rounds_and_the_window_the_pause() {
        let r = report();
        let pages = pages_left_series(&r);
        assert_eq!(pages[0], (1.0, 5000.0));
        assert_eq!(pages[1], (11.0, 300.0));
        assert_eq!(pages[3], (21.0, 40.0));
        assert_eq!(pages[5], (41.0, 1.0), "nothing left after the final round");
        assert_eq!(pause_window(&r), Some((34.0, 40.0)));
    }

    #[test]
    fn writes_an_svg_with_the_series_and_the_window() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("chart.svg");
        write_svg(&report(), &path).expect("chart");
        let svg = std::fs::read_to_string(&path).expect("read");
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        assert!(svg.contains("pages still to send"));
        assert!(svg.contains("paused: 6.0 ms"));
        assert!(svg.contains("web-1: a -&gt; b") || svg.contains("web-1: a -> b"));
    }
}
