//! Rates from counters: guest CPU time and disk writes become "vCPUs
//! busy" and "writes per second" for DRS, sans-IO (the caller passes the
//! time).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    count: u64,
    rate: f64,
}

/// The latest rate of each named counter, over windows of at least
/// `min_window` (a shorter look keeps the last rate).
#[derive(Debug)]
pub struct Rates {
    min_window: Duration,
    last: BTreeMap<String, Sample>,
}

impl Rates {
    /// Rates over windows of at least `min_window`.
    pub fn new(min_window: Duration) -> Self {
        Self {
            min_window,
            last: BTreeMap::new(),
        }
    }

    /// Counter `key` reads `count` at `at`: its rate per second since
    /// the previous look (0 on the first; a counter that went back, as a
    /// VM's CPU time does when it arrives in a new guest, starts over).
    pub fn observe(&mut self, key: &str, at: Instant, count: u64) -> f64 {
        let prev = match self.last.get(key).copied() {
            Some(prev) if count >= prev.count => prev,
            _ => {
                let start = Sample {
                    at,
                    count,
                    rate: 0.0,
                };
                self.last.insert(key.to_owned(), start);
                return 0.0;
            }
        };
        let window = at.saturating_duration_since(prev.at);
        if window < self.min_window {
            return prev.rate;
        }
        let rate = (count - prev.count) as f64 / window.as_secs_f64();
        self.last.insert(key.to_owned(), Sample { at, count, rate });
        rate
    }

    /// Forgets the counters `keep` refuses (VMs and disks that left).
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.last.retain(|k, _| keep(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_is_the_counter_over_the_window() {
        let mut r = Rates::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(r.observe("vm", t0, 1000), 0.0);
        // Too soon: no new window yet.
        assert_eq!(r.observe("vm", t0 + Duration::from_millis(100), 1100), 0.0);
        let rate = r.observe("vm", t0 + Duration::from_secs(2), 2000);
        assert!((rate - 500.0).abs() < 1e-9, "{rate}");
        // The last rate holds until the next full window.
        assert_eq!(
            r.observe("vm", t0 + Duration::from_millis(2500), 2100),
            rate
        );
        // A counter that went back starts over.
        assert_eq!(r.observe("vm", t0 + Duration::from_secs(4), 10), 0.0);
        r.retain(|k| k != "vm");
        assert_eq!(r.observe("vm", t0 + Duration::from_secs(9), 5000), 0.0);
    }
}
