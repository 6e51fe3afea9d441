//! Bandwidth by priority: weighted fair sharing of one link between the
//! migrations that use it, sans-IO.
//!
//! Every page batch a migration's lane sends asks for a turn first and
//! gives it back once written. Turns go by weighted fair queuing in
//! virtual time: a request is tagged `start = max(clock, flow's last
//! finish)`, `finish = start + bytes / weight`, and may go only once it is
//! *eligible*: its start is not past the last finish of any other flow
//! that is active (a lane of it is in the middle of a round, or it has a
//! batch waiting or on the wire). Among eligible requests the smallest
//! finish goes first. There is no fixed number of slots: a flow that is
//! ahead of its share waits until the others catch up or go quiet, and a
//! flow alone never waits. A flow in its switchover (its guest paused)
//! is urgent: the others wait until it is through. Under contention a flow's share of the bytes is
//! its weight's share of the weights: a high-priority migration (weight 4)
//! gets four times a low one's (weight 1) and twice a normal one's
//! (weight 2).

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
    last_finish: f64,
    waiting: usize,
    /// Lanes in the middle of a round (between batches, they are about
    /// to ask again).
    busy_lanes: usize,
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
    /// Flows in their switchover: while any is, only they send.
    urgent: std::collections::BTreeSet<u64>,
    clock: f64,
    next_ticket: u64,
}

impl LinkShare {
    /// An idle link.
    pub fn new() -> Self {
        Self::default()
    }

    /// Flow `flow` starts using the link at `weight`.
    pub fn join(&mut self, flow: u64, weight: u32) {
        self.flows.insert(
            flow,
            Flow {
                last_finish: self.clock,
                waiting: 0,
                busy_lanes: 0,
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
        self.urgent.remove(&flow);
        let stats = self.flows.remove(&flow).map(|f| f.stats);
        Left {
            granted: self.grant(),
            dropped,
            stats,
        }
    }

    /// Flow `flow` enters (`true`) or leaves its switchover: its guest is
    /// paused, so its last pages are downtime. While any flow is urgent,
    /// the others' requests wait. Returns the tickets granted now.
    pub fn set_urgent(&mut self, flow: u64, urgent: bool) -> Vec<Ticket> {
        if urgent && self.flows.contains_key(&flow) {
            self.urgent.insert(flow);
        } else {
            self.urgent.remove(&flow);
        }
        self.grant()
    }

    /// A lane of `flow` starts a round: the flow stays active until
    /// [`Self::end_round`], even between its batches.
    pub fn begin_round(&mut self, flow: u64) {
        if let Some(f) = self.flows.get_mut(&flow) {
            f.busy_lanes += 1;
        }
    }

    /// A lane of `flow` sent its round. Returns the tickets granted now
    /// (others may have waited for this flow to catch up).
    pub fn end_round(&mut self, flow: u64) -> Vec<Ticket> {
        if let Some(f) = self.flows.get_mut(&flow) {
            f.busy_lanes = f.busy_lanes.saturating_sub(1);
        }
        self.grant()
    }

    /// Flow `flow` wants to send `bytes`. An unknown flow (not sharing)
    /// is let through. Also returns other tickets granted on the way (a
    /// request moves its flow's virtual time, which can make others'
    /// requests eligible).
    pub fn request(&mut self, flow: u64, bytes: u64) -> (Turn, Vec<Ticket>) {
        let ticket = Ticket(self.next_ticket);
        self.next_ticket += 1;
        let Some(f) = self.flows.get_mut(&flow) else {
            *self.wire.entry(flow).or_default() += 1;
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

    /// A batch of flow `flow` is sent (or given up). Returns the tickets
    /// granted now.
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

    fn active(&self, flow: u64) -> bool {
        self.wire.contains_key(&flow)
            || self
                .flows
                .get(&flow)
                .is_some_and(|f| f.waiting > 0 || f.busy_lanes > 0)
    }

    /// Whether `w` may go: during a switchover, only if it is the
    /// switchover's; otherwise if no other active flow is behind its
    /// start.
    fn eligible(&self, w: &Waiting) -> bool {
        if !self.urgent.is_empty() {
            return self.urgent.contains(&w.flow);
        }
        self.flows
            .iter()
            .filter(|(id, _)| **id != w.flow && self.active(**id))
            .all(|(_, f)| w.start <= f.last_finish)
    }

    fn grant(&mut self) -> Vec<Ticket> {
        let mut granted = Vec::new();
        loop {
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
    use std::collections::VecDeque;

    use super::*;

    /// Drives a link like lanes in the middle of a long round: each lane
    /// has one batch of `bytes` waiting or on the wire at a time; the wire
    /// delivers batches in the order they were granted, and a lane whose
    /// batch is delivered asks again. Returns each flow's figures after
    /// `sends` deliveries.
    fn drive(flows: &[(u64, u32, u32)], bytes: u64, sends: usize) -> BTreeMap<u64, FlowStats> {
        let mut link = LinkShare::new();
        let mut owner = BTreeMap::new();
        let mut wire = VecDeque::new();
        let ask = |link: &mut LinkShare,
                   flow: u64,
                   owner: &mut BTreeMap<Ticket, u64>,
                   wire: &mut VecDeque<u64>| {
            let (turn, granted) = link.request(flow, bytes);
            for t in granted {
                wire.push_back(owner.remove(&t).expect("a waiting ticket"));
            }
            match turn {
                Turn::Now => wire.push_back(flow),
                Turn::Wait(t) => {
                    owner.insert(t, flow);
                }
            }
        };
        for &(id, weight, _) in flows {
            link.join(id, weight);
        }
        for &(id, _, lanes) in flows {
            for _ in 0..lanes {
                link.begin_round(id);
                ask(&mut link, id, &mut owner, &mut wire);
            }
        }
        for _ in 0..sends {
            let flow = wire.pop_front().expect("something on the wire");
            for t in link.release(flow) {
                wire.push_back(owner.remove(&t).expect("a waiting ticket"));
            }
            ask(&mut link, flow, &mut owner, &mut wire);
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
        // More lanes do not buy a larger share.
        let s = drive(&[(1, normal, 1), (2, normal, 8)], 1 << 20, 1000);
        let r = ratio(&s, 1, 2);
        assert!((0.9..=1.1).contains(&r), "1 lane vs 8: {r}");
    }

    #[test]
    fn a_flow_alone_never_waits() {
        let s = drive(&[(7, weight(Priority::Low), 4)], 1 << 20, 400);
        assert_eq!(s[&7].waits, 0);
        assert_eq!(s[&7].contended_bytes, 0);
        assert_eq!(s[&7].bytes, 404 << 20);
    }

    /// High (flow 1) and low (flow 2) mid-round; low sends once and is
    /// then ahead of high (which has sent nothing yet): its next request
    /// waits, under the returned ticket.
    fn low_ahead_of_busy_high() -> (LinkShare, Ticket) {
        let mut link = LinkShare::new();
        link.join(1, 4);
        link.join(2, 1);
        link.begin_round(1);
        link.begin_round(2);
        assert_eq!(link.request(2, 1000).0, Turn::Now);
        link.release(2);
        let (Turn::Wait(t2), _) = link.request(2, 1000) else {
            panic!("low is ahead of busy high")
        };
        (link, t2)
    }

    #[test]
    fn a_flow_that_leaves_releases_the_others() {
        let (mut link, t2) = low_ahead_of_busy_high();
        // High leaves (its migration ended): low goes on.
        let left = link.leave(1);
        assert_eq!(left.granted, vec![t2]);
        assert!(left.dropped.is_empty());
        assert_eq!(left.stats.map(|s| s.bytes), Some(0));
    }

    #[test]
    fn a_round_that_ends_releases_the_others() {
        let (mut link, t2) = low_ahead_of_busy_high();
        assert_eq!(link.end_round(1), vec![t2]);
    }

    #[test]
    fn a_switchover_has_the_link_to_itself() {
        let mut link = LinkShare::new();
        link.join(1, 1);
        link.join(2, 4);
        link.begin_round(1);
        link.begin_round(2);
        // Low-priority flow 1 pauses its guest: high-priority flow 2
        // waits until the switchover is through.
        assert!(link.set_urgent(1, true).is_empty());
        let (Turn::Wait(t2), _) = link.request(2, 1000) else {
            panic!("flow 1 is in its switchover")
        };
        for _ in 0..10 {
            assert_eq!(link.request(1, 1000).0, Turn::Now);
            assert!(link.release(1).is_empty());
        }
        assert_eq!(link.set_urgent(1, false), vec![t2]);
        // A flow that leaves mid-switchover frees the link too.
        link.set_urgent(2, true);
        let (Turn::Wait(t1), _) = link.request(1, 1000) else {
            panic!("flow 2 is in its switchover")
        };
        assert_eq!(link.leave(2).granted, vec![t1]);
    }

    #[test]
    fn a_flow_not_sharing_is_let_through() {
        let mut link = LinkShare::new();
        assert_eq!(link.request(9, 100), (Turn::Now, Vec::new()));
        assert!(link.release(9).is_empty());
    }

    #[test]
    fn a_quiet_flow_does_not_hold_others_back() {
        let mut link = LinkShare::new();
        link.join(1, 4);
        link.join(2, 1);
        link.begin_round(2);
        // Flow 2 (low) sends alone while flow 1 is between rounds.
        for _ in 0..50 {
            assert_eq!(link.request(2, 1000).0, Turn::Now);
            assert!(link.release(2).is_empty());
        }
    }

    #[test]
    fn a_newcomer_does_not_get_credit_for_the_past() {
        let mut link = LinkShare::new();
        link.join(1, 1);
        link.begin_round(1);
        for _ in 0..100 {
            assert_eq!(link.request(1, 1000).0, Turn::Now);
            link.release(1);
        }
        // Flow 2 joins late at the same weight: from now on the two
        // alternate; flow 2 does not send 100 batches first.
        link.join(2, 1);
        link.begin_round(2);
        let mut order = Vec::new();
        let mut owner = BTreeMap::new();
        let mut wire = VecDeque::new();
        for flow in [1, 2] {
            let (turn, granted) = link.request(flow, 1000);
            for t in granted {
                wire.push_back(owner.remove(&t).expect("waiting"));
            }
            match turn {
                Turn::Now => wire.push_back(flow),
                Turn::Wait(t) => {
                    owner.insert(t, flow);
                }
            }
        }
        for _ in 0..10 {
            let flow = wire.pop_front().expect("on the wire");
            order.push(flow);
            for t in link.release(flow) {
                wire.push_back(owner.remove(&t).expect("waiting"));
            }
            let (turn, granted) = link.request(flow, 1000);
            for t in granted {
                wire.push_back(owner.remove(&t).expect("waiting"));
            }
            match turn {
                Turn::Now => wire.push_back(flow),
                Turn::Wait(t) => {
                    owner.insert(t, flow);
                }
            }
        }
        let twos = order.iter().filter(|f| **f == 2).count();
        assert!((4..=6).contains(&twos), "{order:?}");
    }
}
