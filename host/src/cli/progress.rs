//! The live migration progress bar (indicatif), or plain lines when
//! stderr is not a terminal (a log, a script): one at each phase change
//! and one every few seconds, so a long wait is never silent.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_actors::migration::Progress;

/// How often a plain line repeats while the phase stays the same.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// A progress bar fed with migration [`Progress`]; hidden when quiet.
#[derive(Clone)]
pub struct ProgressBar {
    bar: Arc<indicatif::ProgressBar>,
    /// Not a terminal: the last phase printed and when.
    plain: Option<Arc<Mutex<(String, Instant)>>>,
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
        let plain = (!quiet && !std::io::stderr().is_terminal())
            .then(|| Arc::new(Mutex::new((String::new(), Instant::now()))));
        Self {
            bar: Arc::new(bar),
            plain,
        }
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
        let message = format!(
            "{phase} round {round} · {left} pages left · {rate:.0} MB/s · predicted downtime {pred:.1} ms · throttle {thr}%",
            phase = p.phase,
            round = p.round,
            left = p.pages_left,
            rate = p.rate_bytes_per_s / 1e6,
            pred = p.predicted_downtime_ms,
            thr = p.throttle_percent,
        );
        if let Some(plain) = &self.plain {
            let mut last = plain
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.0 != p.phase || last.1.elapsed() >= PLAIN_EVERY {
                eprintln!("[{:>6.1} s] {message}", self.bar.elapsed().as_secs_f64());
                *last = (p.phase.clone(), Instant::now());
            }
        }
        self.bar.set_message(message);
        self.bar.tick();
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
