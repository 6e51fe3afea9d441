//! A UDP prober: asks an echo server (the Linux test guest's responder)
//! at a fixed period and notes when each answer came, so a migration's
//! network outage can be measured from outside the guest: requests left
//! unanswered, the longest silence, and the first answer after a given
//! moment (the destination's resume).

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, as reports give times.
pub fn unix_ms_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// A prober running on a thread of its own.
pub struct Prober {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Probes>,
}

/// What the prober saw: when each request went out and when its answer
/// came (Unix ms).
#[derive(Debug, Clone, Default)]
pub struct Probes {
    /// When request `i` went out.
    pub sent: Vec<f64>,
    /// When request `i`'s answer came, if it did.
    pub answered: Vec<Option<f64>>,
}

/// The network as the prober saw it over a window of time.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Outage {
    /// Requests sent in the window.
    pub sent: usize,
    /// Of those, never answered.
    pub unanswered: usize,
    /// The longest time in the window with no answer arriving, ms.
    pub longest_silence_ms: f64,
    /// Each request's fate: sent at (ms into the window), then answered
    /// after (ms) or `LOST`.
    pub fates: String,
}

impl Prober {
    /// Sends an 8-byte sequence number from `socket` to `target` every
    /// `every` until [`Self::finish`].
    pub fn start(socket: UdpSocket, target: SocketAddr, every: Duration) -> std::io::Result<Self> {
        socket.set_read_timeout(Some(Duration::from_millis(2)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("ferry-prober".into())
            .spawn(move || probe_until(&socket, target, every, &flag))?;
        Ok(Self { stop, thread })
    }

    /// Stops probing and returns what was seen.
    pub fn finish(self) -> Probes {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap_or_default()
    }
}

fn probe_until(
    socket: &UdpSocket,
    target: SocketAddr,
    every: Duration,
    stop: &AtomicBool,
) -> Probes {
    let mut p = Probes::default();
    let every_ms = every.as_secs_f64() * 1e3;
    let mut next = unix_ms_now();
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::SeqCst) {
        if unix_ms_now() >= next {
            let seq = u64::try_from(p.sent.len()).unwrap_or(u64::MAX);
            let _ = socket.send_to(&seq.to_le_bytes(), target);
            p.sent.push(unix_ms_now());
            p.answered.push(None);
            next += every_ms;
        }
        if let Ok((8, _)) = socket.recv_from(&mut buf) {
            p.note_answer(&buf[..8], unix_ms_now());
        }
    }
    p
}

impl Probes {
    /// Notes an answer `echo` (a request's sequence number) that came at
    /// `at`; unknown or repeated answers change nothing.
    pub fn note_answer(&mut self, echo: &[u8], at: f64) {
        let Ok(bytes) = <[u8; 8]>::try_from(echo) else {
            return;
        };
        let seq = usize::try_from(u64::from_le_bytes(bytes)).unwrap_or(usize::MAX);
        if let Some(a) = self.answered.get_mut(seq) {
            a.get_or_insert(at);
        }
    }

    /// Answers received in all.
    pub fn answered_count(&self) -> usize {
        self.answered.iter().flatten().count()
    }

    /// Answers that came at or after `since`.
    pub fn answered_since(&self, since: f64) -> usize {
        self.answered
            .iter()
            .flatten()
            .filter(|&&a| a >= since)
            .count()
    }

    /// How long after `since` the first answer came (`None`: none came).
    pub fn first_answer_after(&self, since: f64) -> Option<f64> {
        self.answered
            .iter()
            .flatten()
            .filter(|&&a| a >= since)
            .map(|a| a - since)
            .reduce(f64::min)
    }

    /// How long after a request was waiting for it the first answer at
    /// or after `since` came (`None`: none came). A request waits from
    /// `since` when one sent before it was still unanswered then (a lost
    /// one only if sent within `every` before `since`), else from the
    /// first request sent after `since`. Unlike
    /// [`Self::first_answer_after`], this leaves out the time the next
    /// request takes to come (up to `every`).
    pub fn first_answer_wait(&self, since: f64, every: f64) -> Option<f64> {
        let pending = self.sent.iter().zip(&self.answered).any(|(&sent, answer)| {
            sent < since
                && match answer {
                    Some(at) => *at >= since,
                    None => since - sent <= every,
                }
        });
        let waiting_from = if pending {
            since
        } else {
            self.sent.iter().copied().find(|&sent| sent >= since)?
        };
        let first = since + self.first_answer_after(since)?;
        Some(first - waiting_from)
    }

    /// The network over `[from, to]` (Unix ms).
    pub fn outage(&self, from: f64, to: f64) -> Outage {
        let inside: Vec<usize> = (0..self.sent.len())
            .filter(|&i| self.sent[i] >= from && self.sent[i] <= to)
            .collect();
        let unanswered = inside
            .iter()
            .filter(|&&i| self.answered[i].is_none())
            .count();
        let mut arrivals: Vec<f64> = self
            .answered
            .iter()
            .flatten()
            .copied()
            .filter(|a| (from..=to).contains(a))
            .collect();
        arrivals.sort_by(f64::total_cmp);
        let mut longest = 0.0f64;
        let mut last = from;
        for a in arrivals.iter().copied().chain([to]) {
            longest = longest.max(a - last);
            last = a;
        }
        let fates: Vec<String> = inside
            .iter()
            .map(|&i| {
                let at = self.sent[i] - from;
                match self.answered[i] {
                    Some(a) => format!("{at:.0}:{:.0}", a - self.sent[i]),
                    None => format!("{at:.0}:LOST"),
                }
            })
            .collect();
        Outage {
            sent: inside.len(),
            unanswered,
            longest_silence_ms: longest,
            fates: fates.join(" "),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probes(sent: &[f64], answered: &[Option<f64>]) -> Probes {
        Probes {
            sent: sent.to_vec(),
            answered: answered.to_vec(),
        }
    }

    #[test]
    fn an_outage_counts_the_unanswered_and_the_longest_silence_in_its_window() {
        let p = probes(
            &[0.0, 100.0, 200.0, 300.0, 400.0],
            &[Some(10.0), Some(110.0), None, None, Some(420.0)],
        );
        let o = p.outage(50.0, 500.0);
        assert_eq!((o.sent, o.unanswered), (4, 2));
        assert_eq!(o.longest_silence_ms, 310.0, "from 110 to 420");
        assert_eq!(o.fates, "50:10 150:LOST 250:LOST 350:20");
        assert_eq!(p.first_answer_after(300.0), Some(120.0));
        assert_eq!(p.first_answer_after(500.0), None);
        assert_eq!((p.answered_count(), p.answered_since(100.0)), (3, 2));
    }

    #[test]
    fn the_wait_for_an_answer_starts_when_a_request_is_there_to_answer() {
        // A request pending at 250 (sent at 200, answered at 290).
        let p = probes(&[0.0, 200.0, 400.0], &[Some(5.0), Some(290.0), Some(410.0)]);
        assert_eq!(p.first_answer_wait(250.0, 200.0), Some(40.0));
        // Nothing pending at 300: the wait starts with the request at 400.
        assert_eq!(p.first_answer_wait(300.0, 200.0), Some(10.0));
        assert_eq!(p.first_answer_after(300.0), Some(110.0));
        // A request lost just before 250 was waiting; one lost long before was not.
        let lost = probes(&[0.0, 200.0, 400.0], &[None, None, Some(430.0)]);
        assert_eq!(lost.first_answer_wait(250.0, 200.0), Some(180.0));
        assert_eq!(lost.first_answer_wait(300.0, 50.0), Some(30.0));
        // No answer after `since`, or no request at all.
        assert_eq!(lost.first_answer_wait(440.0, 200.0), None);
        assert_eq!(Probes::default().first_answer_wait(0.0, 200.0), None);
    }

    #[test]
    fn answers_are_matched_by_sequence_and_only_the_first_counts() {
        let mut p = probes(&[0.0, 100.0], &[None, None]);
        p.note_answer(&1u64.to_le_bytes(), 130.0);
        p.note_answer(&1u64.to_le_bytes(), 150.0);
        p.note_answer(&7u64.to_le_bytes(), 160.0);
        p.note_answer(&[1, 2, 3], 170.0);
        assert_eq!(p.answered, vec![None, Some(130.0)]);
    }

    #[test]
    fn a_prober_meets_an_echo_server_on_loopback() {
        let echo = UdpSocket::bind("127.0.0.1:0").expect("echo socket");
        let target = echo.local_addr().expect("addr");
        echo.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let server = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            let mut echoed = 0;
            while echoed < 3 {
                if let Ok((n, from)) = echo.recv_from(&mut buf) {
                    let _ = echo.send_to(&buf[..n], from);
                    echoed += 1;
                }
            }
        });
        let socket = UdpSocket::bind("127.0.0.1:0").expect("prober socket");
        let prober = Prober::start(socket, target, Duration::from_millis(20)).expect("start");
        server.join().expect("echo server");
        std::thread::sleep(Duration::from_millis(30));
        let p = prober.finish();
        assert!(p.answered_count() >= 3, "{p:?}");
    }
}
