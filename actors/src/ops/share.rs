//! Bandwidth by priority: weighted fair sharing of one link between the
//! migrations that use it, sans-IO.
//!
//! Every page batch a migration's lane sends asks for a turn first; a
//! lane gives its previous turn back only after asking for the next, so
//! a flow that keeps sending stays active in between. At most `slots` batches are on the wire at
//! once (the most lanes any of the link's migrations has, so a migration
//! alone never waits). Turns go by weighted fair queuing: a request is
//! tagged `start = max(clock, flow's last finish)`, `finish = start +
//! bytes / weight`; the waiting request with the smallest finish goes
//! next, but only once it is *eligible*: its start is not past the last
//! finish of any other flow that is active (has a batch waiting or on
//! the wire). A flow ahead of its share thus waits even when a slot is
//! free, until the others catch up or go quiet. Under contention a
//! flow's share of the bytes is its weight's share of the weights: a
//! high-priority migration (weight 4) gets four times a low one's
//! (weight 1) and twice a normal one's (weight 2).

use std::collections::BTreeMap;

use super::jobs::Priority;

/// A priority's weight.
pub fn weight(priority: Priority) -> u32 {
    match priority {
        Priority::High => 4,
        Priority::Normal => 2,
        Priority::Low => 1,
    }
}

/// A request's place in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ticket(pub u64);

/// What a request got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// Send now (and release when sent).
    Now,
    /// Wait until a [`LinkShare::release`], [`LinkShare::request`] or
    /// [`LinkShare::leave`] grants this ticket.
    Wait(Ticket),
}

/// What [`LinkShare::leave`] changed.
#[derive(Debug, Clone, PartialEq)]
pub struct Left {
    /// Tickets of other flows granted now.
    pub granted: Vec<Ticket>,
    /// The leaving flow's waiting tickets, never to be granted.
    pub dropped: Vec<Ticket>,
    /// What the flow got.
    pub stats: Option<FlowStats>,
}

/// What one flow (migration) got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// Its weight.
    pub weight: u32,
    /// Bytes granted.
    pub bytes: u64,
    /// Bytes granted while another flow was active: the bytes the
    /// weights decided.
    pub contended_bytes: u64,
    /// Requests that had to wait.
    pub waits: u64,
}

#[derive(Debug)]
struct Flow {
    lanes: u32,
    last_finish: f64,
    waiting: usize,
    stats: FlowStats,
}

#[derive(Debug)]
struct Waiting {
    flow: u64,
    bytes: u64,
    start: f64,
    finish: f64,
    ticket: Ticket,
}

/// One link's turns.
#[derive(Debug, Default)]
pub struct LinkShare {
    flows: BTreeMap<u64, Flow>,
    waiting: Vec<Waiting>,
    /// Batches on the wire, by flow (a flow that left may still have
    /// some).
    wire: BTreeMap<u64, usize>,
    clock: f64,
    next_ticket: u64,
}

impl LinkShare {
    /// An idle link.
    pub fn new() -> Self {
        Self::default()
    }

    /// Flow `flow` starts using the link with `lanes` lanes at `weight`.
    pub fn join(&mut self, flow: u64, weight: u32, lanes: u32) {
        self.flows.insert(
            flow,
            Flow {
                lanes: lanes.max(1),
                last_finish: self.clock,
                waiting: 0,
                stats: FlowStats {
                    weight: weight.max(1),
                    ..FlowStats::default()
                },
            },
        );
    }

    /// Flow `flow` is done; its waiting requests are dropped.
    pub fn leave(&mut self, flow: u64) -> Left {
        let dropped = self
            .waiting
            .iter()
            .filter(|w| w.flow == flow)
            .map(|w| w.ticket)
            .collect();
        self.waiting.retain(|w| w.flow != flow);
        let stats = self.flows.remove(&flow).map(|f| f.stats);
        Left {
            granted: self.grant(),
            dropped,
            stats,
        }
    }

    /// At most this many batches on the wire at once.
    pub fn slots(&self) -> usize {
        self.flows
            .values()
            .map(|f| f.lanes as usize)
            .max()
            .unwrap_or(1)
    }

    /// Flow `flow` wants to send `bytes`; `previous`: the lane gives
    /// back the turn it sent its last batch with, in the same step (so
    /// its flow stays active). An unknown flow (not sharing) is let
    /// through. Also returns other tickets granted on the way.
    pub fn request(&mut self, flow: u64, bytes: u64, previous: bool) -> (Turn, Vec<Ticket>) {
        let ticket = Ticket(self.next_ticket);
        self.next_ticket += 1;
        let Some(f) = self.flows.get_mut(&flow) else {
            if !previous {
                *self.wire.entry(flow).or_default() += 1;
            }
            return (Turn::Now, Vec::new());
        };
        let start = self.clock.max(f.last_finish);
        let finish = start + bytes as f64 / f64::from(f.stats.weight);
        f.last_finish = finish;
        f.waiting += 1;
        self.waiting.push(Waiting {
            flow,
            bytes,
            start,
            finish,
            ticket,
        });
        if previous {
            self.unwire(flow);
        }
        let mut granted = self.grant();
        if let Some(i) = granted.iter().position(|t| *t == ticket) {
            granted.remove(i);
            (Turn::Now, granted)
        } else {
            if let Some(f) = self.flows.get_mut(&flow) {
                f.stats.waits += 1;
            }
            (Turn::Wait(ticket), granted)
        }
    }

    /// A batch of flow `flow` is sent (or given up) and the lane asks
    /// for no other: its slot is free. Returns the tickets granted now.
    pub fn release(&mut self, flow: u64) -> Vec<Ticket> {
        self.unwire(flow);
        self.grant()
    }

    fn unwire(&mut self, flow: u64) {
        if let Some(n) = self.wire.get_mut(&flow) {
            *n -= 1;
            if *n == 0 {
                self.wire.remove(&flow);
            }
        }
    }

    /// What flow `flow` got so far.
    pub fn stats(&self, flow: u64) -> Option<FlowStats> {
        self.flows.get(&flow).map(|f| f.stats)
    }

    fn on_wire(&self) -> usize {
        self.wire.values().sum()
    }

    fn active(&self, flow: u64) -> bool {
        self.wire.contains_key(&flow) || self.flows.get(&flow).is_some_and(|f| f.waiting > 0)
    }

    /// Whether `w` may go: no other active flow is behind its start.
    fn eligible(&self, w: &Waiting) -> bool {
        self.flows
            .iter()
            .filter(|(id, _)| **id != w.flow && self.active(**id))
            .all(|(_, f)| w.start <= f.last_finish)
    }

    fn grant(&mut self) -> Vec<Ticket> {
        let mut granted = Vec::new();
        while self.on_wire() < self.slots() {
            let next = self
                .waiting
                .iter()
                .enumerate()
                .filter(|(_, w)| self.eligible(w))
                .min_by(|a, b| {
                    a.1.finish
                        .total_cmp(&b.1.finish)
                        .then(a.1.ticket.cmp(&b.1.ticket))
                })
                .map(|(i, _)| i);
            let Some(next) = next else {
                break;
            };
            let w = self.waiting.remove(next);
            self.clock = self.clock.max(w.start);
            let contended = self
                .flows
                .keys()
                .any(|id| *id != w.flow && self.active(*id));
            *self.wire.entry(w.flow).or_default() += 1;
            if let Some(f) = self.flows.get_mut(&w.flow) {
                f.waiting -= 1;
                f.stats.bytes += w.bytes;
                if contended {
                    f.stats.contended_bytes += w.bytes;
                }
            }
            granted.push(w.ticket);
        }
        granted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives a link like lanes do: each flow has `lanes` lanes, each
    /// lane sends a batch of `bytes` when granted and asks again as soon
    /// as it is sent; sends end in the order they were granted. Returns
    /// each flow's figures after `sends` sends.
    fn drive(flows: &[(u64, u32, u32)], bytes: u64, sends: usize) -> BTreeMap<u64, FlowStats> {
        let mut link = LinkShare::new();
        for &(id, weight, lanes) in flows {
            link.join(id, weight, lanes);
        }
        let mut owner = BTreeMap::new();
        let mut wire = std::collections::VecDeque::new();
        let on_grant = |t: Ticket,
                        owner: &mut BTreeMap<Ticket, u64>,
                        wire: &mut std::collections::VecDeque<u64>| {
            wire.push_back(owner.remove(&t).expect("a waiting ticket"));
        };
        for &(id, _, lanes) in flows {
            for _ in 0..lanes {
                let (turn, granted) = link.request(id, bytes, false);
                for t in granted {
                    on_grant(t, &mut owner, &mut wire);
                }
                match turn {
                    Turn::Now => wire.push_back(id),
                    Turn::Wait(t) => {
                        owner.insert(t, id);
                    }
                }
            }
        }
        for _ in 0..sends {
            // The lane asks for its next turn, then gives back the one
            // it sent with (so its flow stays active in between).
            let flow = wire.pop_front().expect("something on the wire");
            let (turn, granted) = link.request(flow, bytes, true);
            match turn {
                Turn::Now => wire.push_back(flow),
                Turn::Wait(t) => {
                    owner.insert(t, flow);
                }
            }
            for t in granted {
                on_grant(t, &mut owner, &mut wire);
            }
        }
        flows
            .iter()
            .map(|&(id, _, _)| (id, link.stats(id).expect("joined")))
            .collect()
    }

    fn ratio(stats: &BTreeMap<u64, FlowStats>, a: u64, b: u64) -> f64 {
        stats[&a].contended_bytes as f64 / stats[&b].contended_bytes as f64
    }

    #[test]
    fn under_contention_bytes_follow_the_weights() {
        let (high, normal, low) = (
            weight(Priority::High),
            weight(Priority::Normal),
            weight(Priority::Low),
        );
        for lanes in [1, 2, 4] {
            let s = drive(&[(1, high, lanes), (2, low, lanes)], 1 << 20, 1000);
            let r = ratio(&s, 1, 2);
            assert!((3.8..=4.2).contains(&r), "{lanes} lanes: high/low {r}");
            let s = drive(&[(1, high, lanes), (2, normal, lanes)], 1 << 20, 1000);
            let r = ratio(&s, 1, 2);
            assert!((1.9..=2.1).contains(&r), "{lanes} lanes: high/normal {r}");
            let s = drive(&[(1, normal, lanes), (2, normal, lanes)], 1 << 20, 1000);
            let r = ratio(&s, 1, 2);
            assert!((0.95..=1.05).contains(&r), "{lanes} lanes: equal {r}");
        }
        // Unequal lane counts do not buy a larger share.
        let s = drive(&[(1, normal, 1), (2, normal, 8)], 1 << 20, 1000);
        let r = ratio(&s, 1, 2);
        assert!((0.95..=1.05).contains(&r), "1 lane vs 8: {r}");
    }

    #[test]
    fn a_flow_alone_never_waits() {
        let s = drive(&[(7, weight(Priority::Low), 4)], 1 << 20, 400);
        assert_eq!(s[&7].waits, 0);
        assert_eq!(s[&7].contended_bytes, 0);
        assert_eq!(s[&7].bytes, 404 << 20);
    }

    #[test]
    fn a_flow_that_leaves_frees_its_turns() {
        let mut link = LinkShare::new();
        link.join(1, 1, 1);
        link.join(2, 4, 1);
        assert_eq!(link.request(1, 10, false).0, Turn::Now);
        let (Turn::Wait(t1), _) = link.request(1, 10, false) else {
            panic!("one slot")
        };
        let (Turn::Wait(t2), _) = link.request(2, 10, false) else {
            panic!("one slot")
        };
        // Flow 1 ends with a batch on the wire and one waiting: the
        // waiting one is dropped; the release grants flow 2.
        let left = link.leave(1);
        assert!(left.granted.is_empty(), "the slot is still taken");
        assert_eq!(left.dropped, vec![t1]);
        assert_eq!(left.stats.map(|s| s.bytes), Some(10));
        assert_eq!(link.release(1), vec![t2]);
    }

    #[test]
    fn a_flow_not_sharing_is_let_through() {
        let mut link = LinkShare::new();
        assert_eq!(link.request(9, 100, false), (Turn::Now, Vec::new()));
        assert!(link.release(9).is_empty());
    }

    #[test]
    fn a_quiet_flow_does_not_hold_others_back() {
        let mut link = LinkShare::new();
        link.join(1, 4, 2);
        link.join(2, 1, 2);
        // Flow 2 (low) sends alone while flow 1 is quiet: never held.
        for _ in 0..50 {
            assert_eq!(link.request(2, 1000, false).0, Turn::Now);
            assert!(link.release(2).is_empty());
        }
    }

    #[test]
    fn a_newcomer_does_not_get_credit_for_the_past() {
        let mut link = LinkShare::new();
        link.join(1, 1, 1);
        for _ in 0..100 {
            assert_eq!(link.request(1, 1000, false).0, Turn::Now);
            link.release(1);
        }
        // Flow 2 joins late at the same weight: from now on the two
        // share evenly; flow 2 does not send 100 batches first.
        link.join(2, 1, 1);
        let mut owner = BTreeMap::new();
        let mut order = Vec::new();
        let mut wire = vec![];
        for flow in [1, 2] {
            match link.request(flow, 1000, false).0 {
                Turn::Now => wire.push(flow),
                Turn::Wait(t) => {
                    owner.insert(t, flow);
                }
            }
        }
        for _ in 0..10 {
            let flow = wire.remove(0);
            order.push(flow);
            let (turn, granted) = link.request(flow, 1000, true);
            match turn {
                Turn::Now => wire.push(flow),
                Turn::Wait(t) => {
                    owner.insert(t, flow);
                }
            }
            for t in granted {
                wire.push(owner.remove(&t).expect("waiting"));
            }
        }
        let twos = order.iter().filter(|f| **f == 2).count();
        assert!((4..=6).contains(&twos), "{order:?}");
    }
}
