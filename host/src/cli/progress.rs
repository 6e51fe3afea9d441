//! The live migration progress bar (indicatif).

use std::sync::Arc;

use ferry_actors::migration::Progress;

/// A progress bar fed with migration [`Progress`]; hidden when quiet.
#[derive(Clone)]
pub struct ProgressBar {
    bar: Arc<indicatif::ProgressBar>,
}

impl ProgressBar {
    /// A bar on stderr, or a hidden one.
    pub fn new(quiet: bool) -> Self {
        let bar = if quiet {
            indicatif::ProgressBar::hidden()
        } else {
            indicatif::ProgressBar::new(1)
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {percent:>3}% {msg}",
            )
            .expect("valid template"),
        );
        Self { bar: Arc::new(bar) }
    }

    /// Shows `p`.
    pub fn update(&self, p: &Progress) {
        self.bar.set_length(p.pages_total.max(1));
        let done = if p.round == 0 {
            p.pages_total.saturating_sub(p.pages_left)
        } else {
            p.pages_total
                .saturating_sub(p.pages_left.min(p.pages_total))
        };
        self.bar.set_position(done);
        self.bar.set_message(format!(
            "{phase} round {round} · {left} pages left · {rate:.0} MB/s · predicted downtime {pred:.1} ms · throttle {thr}%",
            phase = p.phase,
            round = p.round,
            left = p.pages_left,
            rate = p.rate_bytes_per_s / 1e6,
            pred = p.predicted_downtime_ms,
            thr = p.throttle_percent,
        ));
        self.bar.tick();
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
