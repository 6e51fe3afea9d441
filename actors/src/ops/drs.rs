//! DRS: proposes migrations that even out the load of the hosts.
//!
//! A host's load is the mean of its memory share in use, its vCPU share
//! in use and the share of its vCPU time the guests kept busy lately
//! (their CPU time); the imbalance is the spread between the most and the least loaded
//! hosts in service. [`plan`] moves, one at a time, the running VM from
//! the most loaded host whose move to the least loaded one shrinks the
//! spread the most (placement's rules decide whether it may go there),
//! until the spread is within `tolerance` or no move helps.

// rkyv derives resolver twins of the types whose fields carry no docs;
// every item written here is documented.
#![allow(missing_docs)]

use serde::Serialize;

use super::placement::{HostLoad, VmNeeds, ruled_out};

/// One proposed migration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlannedMove {
    /// The VM.
    pub vm: String,
    /// From.
    pub from: String,
    /// To.
    pub to: String,
    /// Why, in words.
    pub reason: String,
}

/// A balancing plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DrsPlan {
    /// The moves, in order.
    pub moves: Vec<PlannedMove>,
    /// Spread before, 0–1.
    pub imbalance_before: f64,
    /// Spread after the moves, 0–1.
    pub imbalance_after: f64,
    /// Each host's load after the moves: (host, load 0–1).
    pub loads_after: Vec<(String, f64)>,
}

/// A host's load, 0–1.
pub fn load(h: &HostLoad) -> f64 {
    (h.memory_fraction() + h.vcpu_fraction() + h.cpu_busy_fraction()) / 3.0
}

fn spread(hosts: &[HostLoad]) -> f64 {
    let loads: Vec<f64> = hosts.iter().filter(|h| h.in_service()).map(load).collect();
    let max = loads.iter().copied().fold(f64::MIN, f64::max);
    let min = loads.iter().copied().fold(f64::MAX, f64::min);
    if loads.len() < 2 { 0.0 } else { max - min }
}

fn moved(hosts: &mut [HostLoad], from: usize, to: usize, vm: usize) {
    let v = hosts[from].vms.remove(vm);
    hosts[from].memory_used = hosts[from].memory_used.saturating_sub(v.memory_bytes);
    hosts[from].vcpus_used = hosts[from].vcpus_used.saturating_sub(u32::from(v.vcpus));
    hosts[to].memory_used += v.memory_bytes;
    hosts[to].vcpus_used += u32::from(v.vcpus);
    hosts[to].vms.push(v);
}

/// Proposes at most `max_moves` migrations bringing the spread within
/// `tolerance` (e.g. 0.1: loads within 10 points of each other).
pub fn plan(hosts: &[HostLoad], tolerance: f64, max_moves: usize) -> DrsPlan {
    let mut hosts = hosts.to_vec();
    let before = spread(&hosts);
    let mut moves = Vec::new();
    while moves.len() < max_moves {
        let now = spread(&hosts);
        if now <= tolerance {
            break;
        }
        let mut best: Option<(f64, usize, usize, usize)> = None;
        for from in 0..hosts.len() {
            if !hosts[from].in_service() {
                continue;
            }
            for to in 0..hosts.len() {
                if to == from || load(&hosts[to]) >= load(&hosts[from]) {
                    continue;
                }
                for (i, vm) in hosts[from].vms.iter().enumerate() {
                    if !vm.running || ruled_out(&VmNeeds::of_load(vm), &hosts[to]).is_some() {
                        continue;
                    }
                    let mut trial = hosts.clone();
                    moved(&mut trial, from, to, i);
                    let after = spread(&trial);
                    if after < now - 1e-9 && best.is_none_or(|b| after < b.0) {
                        best = Some((after, from, to, i));
                    }
                }
            }
        }
        let Some((after, from, to, i)) = best else {
            break;
        };
        moves.push(PlannedMove {
            vm: hosts[from].vms[i].name.clone(),
            from: hosts[from].name.clone(),
            to: hosts[to].name.clone(),
            reason: format!(
                "{} is at {:.0}% load, {} at {:.0}%; spread {:.0} -> {:.0} points",
                hosts[from].name,
                load(&hosts[from]) * 100.0,
                hosts[to].name,
                load(&hosts[to]) * 100.0,
                now * 100.0,
                after * 100.0
            ),
        });
        moved(&mut hosts, from, to, i);
    }
    DrsPlan {
        moves,
        imbalance_before: before,
        imbalance_after: spread(&hosts),
        loads_after: hosts.iter().map(|h| (h.name.clone(), load(h))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::placement::tests::{host, vm};

    #[test]
    fn a_loaded_host_sheds_vms_to_an_idle_one() {
        let vms: Vec<_> = (0..4).map(|i| vm(&format!("vm{i}"), 200)).collect();
        let hosts = vec![host("a", 800, vms), host("b", 0, vec![])];
        let p = plan(&hosts, 0.1, 10);
        assert_eq!(p.moves.len(), 2, "{p:?}");
        assert!(p.moves.iter().all(|m| m.from == "a" && m.to == "b"));
        assert!(p.imbalance_after < p.imbalance_before);
        assert!(p.imbalance_after <= 0.1, "{p:?}");
        assert!(
            p.moves[0].reason.contains("spread"),
            "{}",
            p.moves[0].reason
        );
    }

    #[test]
    fn a_balanced_cluster_needs_no_moves() {
        let hosts = vec![
            host("a", 200, vec![vm("x", 200)]),
            host("b", 200, vec![vm("y", 200)]),
        ];
        let p = plan(&hosts, 0.1, 10);
        assert!(p.moves.is_empty(), "{p:?}");
    }

    #[test]
    fn hosts_out_of_service_receive_nothing_and_stopped_vms_stay() {
        let mut idle = host("b", 0, vec![]);
        idle.maintenance = true;
        let mut stopped = vm("cold", 400);
        stopped.running = false;
        let hosts = vec![host("a", 800, vec![stopped, vm("hot", 400)]), idle];
        let p = plan(&hosts, 0.0, 10);
        assert!(p.moves.is_empty(), "{p:?}");
        let hosts = vec![
            host("a", 800, vec![vm("hot", 400), vm("hot2", 400)]),
            host("c", 0, vec![]),
        ];
        let p = plan(&hosts, 0.0, 1);
        assert_eq!(p.moves.len(), 1, "max_moves bounds the plan");
    }
}
