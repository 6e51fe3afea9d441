//! The node's links shared by priority: the async face of
//! [`LinkShare`](crate::ops::share::LinkShare).
//!
//! A migration joins its destination's link when it starts and leaves
//! when its lanes are done ([`Flow`] on drop); a lane holds a [`Round`]
//! while it sends a round (its flow counts as active in between batches)
//! and takes a [`Turn`] for each page batch, given back once written.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::ops::share::{FlowStats, LinkShare, Ticket, Turn as Asked};

#[derive(Default)]
struct Link {
    share: LinkShare,
    waiters: HashMap<Ticket, (oneshot::Sender<()>, u64)>,
}

impl Link {
    /// Wakes the granted waiters; a waiter that is gone gives its slot
    /// straight back.
    fn wake(&mut self, mut granted: Vec<Ticket>) {
        while let Some(ticket) = granted.pop() {
            let Some((tx, flow)) = self.waiters.remove(&ticket) else {
                continue;
            };
            if tx.send(()).is_err() {
                granted.extend(self.share.release(flow));
            }
        }
    }
}

type Shared = Arc<Mutex<Link>>;

fn lock(link: &Shared) -> std::sync::MutexGuard<'_, Link> {
    link.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Every link of a node, by destination host.
#[derive(Default)]
pub struct LinkShares {
    links: Mutex<BTreeMap<String, Shared>>,
    /// Figures of flows that ended, by migration id (the latest 64).
    ended: Mutex<BTreeMap<u64, FlowStats>>,
}

impl LinkShares {
    /// Migration `id` starts sending to `host` at `weight`.
    pub fn join(self: &Arc<Self>, host: &str, id: u64, weight: u32) -> Flow {
        let link = self
            .links
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(host.to_owned())
            .or_default()
            .clone();
        lock(&link).share.join(id, weight);
        Flow(Arc::new(Member {
            shares: self.clone(),
            link,
            id,
            weight,
        }))
    }

    /// What migration `id` got of its link, once it ended.
    pub fn ended(&self, id: u64) -> Option<FlowStats> {
        self.ended
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
            .copied()
    }

    fn record(&self, id: u64, stats: FlowStats) {
        let mut ended = self
            .ended
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        ended.insert(id, stats);
        while ended.len() > 64 {
            ended.pop_first();
        }
    }
}

/// One migration's membership of a link (lanes share clones); it leaves
/// when the last clone is dropped.
#[derive(Clone)]
pub struct Flow(Arc<Member>);

struct Member {
    shares: Arc<LinkShares>,
    link: Shared,
    id: u64,
    weight: u32,
}

impl Drop for Member {
    fn drop(&mut self) {
        let mut link = lock(&self.link);
        let left = link.share.leave(self.id);
        for ticket in &left.dropped {
            // Its waiter wakes to no turn.
            link.waiters.remove(ticket);
        }
        link.wake(left.granted);
        drop(link);
        if let Some(stats) = left.stats {
            self.shares.record(self.id, stats);
        }
    }
}

impl Flow {
    /// The send priority of its lanes' streams on a transport that queues
    /// (QUIC): below the default 0 of control streams, so that protocol
    /// messages never wait behind page data, and higher for a heavier
    /// weight, so that the transport's own queue drains in priority order
    /// too.
    pub fn stream_priority(&self) -> i32 {
        i32::try_from(self.0.weight).unwrap_or(i32::MAX).min(16) - 17
    }

    /// The send priority of its lanes while its guest is paused: above
    /// every migration's bulk data, still below control streams.
    pub const SWITCHOVER_STREAM_PRIORITY: i32 = -1;

    /// The migration enters (`true`) or leaves its switchover: while
    /// its guest is paused, the link's other migrations hold their pages.
    pub fn set_urgent(&self, urgent: bool) {
        let mut link = lock(&self.0.link);
        let granted = link.share.set_urgent(self.0.id, urgent);
        link.wake(granted);
    }

    /// A lane starts sending a round; the flow is active until the
    /// [`Round`] is dropped.
    pub fn round(&self) -> Round {
        lock(&self.0.link).share.begin_round(self.0.id);
        Round(self.clone())
    }

    /// Waits for a turn to send `bytes`.
    pub async fn turn(&self, bytes: u64) -> Turn {
        let m = &self.0;
        let wait = {
            let mut link = lock(&m.link);
            let (asked, granted) = link.share.request(m.id, bytes);
            link.wake(granted);
            match asked {
                Asked::Now => None,
                Asked::Wait(ticket) => {
                    let (tx, rx) = oneshot::channel();
                    link.waiters.insert(ticket, (tx, m.id));
                    Some(rx)
                }
            }
        };
        let granted = match wait {
            None => true,
            Some(rx) => rx.await.is_ok(),
        };
        Turn {
            link: granted.then(|| (m.link.clone(), m.id)),
        }
    }
}

/// A lane in the middle of a round; the round ends on drop.
pub struct Round(Flow);

impl Drop for Round {
    fn drop(&mut self) {
        let m = &(self.0).0;
        let mut link = lock(&m.link);
        let granted = link.share.end_round(m.id);
        link.wake(granted);
    }
}

/// A turn on the link: its slot is free again on drop.
pub struct Turn {
    link: Option<(Shared, u64)>,
}

impl Drop for Turn {
    fn drop(&mut self) {
        if let Some((shared, flow)) = &self.link {
            let mut link = lock(shared);
            let granted = link.share.release(*flow);
            link.wake(granted);
        }
    }
}
