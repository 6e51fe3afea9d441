//! What a long or lossy link does to datagrams, as a sans-IO state
//! machine: each datagram offered is dropped with a fixed probability
//! (seeded, so a run can be repeated) or held for a fixed one-way delay.
//! [`super::relay`] drives one per direction.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Delay and loss of one direction of a link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Impairment {
    /// Time every datagram spends on the link.
    pub one_way_delay: Duration,
    /// Probability (0 to 1) that a datagram is dropped.
    pub loss: f64,
}

/// Datagrams on their way through one direction of an impaired link.
#[derive(Debug)]
pub struct DelayLine {
    impairment: Impairment,
    rng: u64,
    queue: VecDeque<(Instant, Vec<u8>)>,
    dropped: u64,
}

impl DelayLine {
    /// An empty line; `seed` decides which datagrams are lost.
    pub fn new(impairment: Impairment, seed: u64) -> Self {
        Self {
            impairment,
            rng: seed | 1,
            queue: VecDeque::new(),
            dropped: 0,
        }
    }

    /// Takes `datagram` at `now`: false when the link loses it.
    pub fn offer(&mut self, now: Instant, datagram: Vec<u8>) -> bool {
        if self.lose() {
            self.dropped += 1;
            return false;
        }
        // A fixed delay keeps arrival order, so the queue stays sorted.
        self.queue
            .push_back((now + self.impairment.one_way_delay, datagram));
        true
    }

    /// The next datagram due by `now`, if any.
    pub fn pop_due(&mut self, now: Instant) -> Option<Vec<u8>> {
        match self.queue.front() {
            Some((due, _)) if *due <= now => self.queue.pop_front().map(|(_, d)| d),
            _ => None,
        }
    }

    /// When the next datagram is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.queue.front().map(|(due, _)| *due)
    }

    /// Datagrams lost so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    fn lose(&mut self) -> bool {
        if self.impairment.loss <= 0.0 {
            return false;
        }
        // xorshift64*: uniform enough for a loss rate, and repeatable.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let draw =
            (self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64;
        draw < self.impairment.loss
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(delay_ms: u64, loss: f64) -> DelayLine {
        DelayLine::new(
            Impairment {
                one_way_delay: Duration::from_millis(delay_ms),
                loss,
            },
            7,
        )
    }

    #[test]
    fn a_datagram_comes_out_after_the_delay_and_in_order() {
        let mut l = line(75, 0.0);
        let t0 = Instant::now();
        assert!(l.offer(t0, vec![1]));
        assert!(l.offer(t0 + Duration::from_millis(1), vec![2]));
        assert_eq!(l.pop_due(t0 + Duration::from_millis(74)), None);
        assert_eq!(l.next_due(), Some(t0 + Duration::from_millis(75)));
        assert_eq!(l.pop_due(t0 + Duration::from_millis(75)), Some(vec![1]));
        assert_eq!(l.pop_due(t0 + Duration::from_millis(75)), None);
        assert_eq!(l.pop_due(t0 + Duration::from_millis(80)), Some(vec![2]));
        assert_eq!(l.next_due(), None);
    }

    #[test]
    fn the_loss_rate_is_close_to_the_one_asked_for() {
        let mut l = line(0, 0.05);
        let now = Instant::now();
        let kept = (0..100_000).filter(|_| l.offer(now, Vec::new())).count();
        assert_eq!(l.dropped(), 100_000 - kept as u64);
        let lost = l.dropped() as f64 / 100_000.0;
        assert!((0.045..0.055).contains(&lost), "lost {lost}");
    }

    #[test]
    fn no_loss_asked_loses_nothing() {
        let mut l = line(0, 0.0);
        let now = Instant::now();
        assert!((0..10_000).all(|_| l.offer(now, Vec::new())));
        assert_eq!(l.dropped(), 0);
    }
}
