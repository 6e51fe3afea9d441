//! The acknowledged-write witness. A host learns its disk workload's
//! newest acknowledged write from its own disk when it restarts, so a
//! check that asks the host only ever sees what survived. The witness
//! looks from outside instead: it keeps, per VM, the newest write any
//! running copy acknowledged, and a running copy that later reports an
//! older one has lost acknowledged writes (the workload's numbers grow
//! across migrations and restarts).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::Duration;

use ferry_actors::node::client::{ClientReply, ClientRequest};

use crate::violation::{Kind, Violation};
use crate::world::World;

/// How often the witness looks.
pub const EVERY: Duration = Duration::from_millis(20);

/// The newest acknowledged write seen per VM, and where.
#[derive(Debug, Default)]
pub struct Witness {
    newest: BTreeMap<String, (u64, String)>,
}

impl Witness {
    /// Records that `vm`, running on `host`, reports `acked` as its newest
    /// acknowledged write; a violation if an earlier look saw a newer one.
    pub fn saw(&mut self, vm: &str, host: &str, acked: u64) -> Option<Violation> {
        let entry = self
            .newest
            .entry(vm.to_owned())
            .or_insert((0, String::new()));
        if acked >= entry.0 {
            *entry = (acked, host.to_owned());
            return None;
        }
        Some(Violation::new(
            Kind::WriteLost,
            format!(
                "{vm} on {host} reports write {acked} as its newest acknowledged, but {} had acknowledged write {}",
                entry.1, entry.0
            ),
        ))
    }

    /// Forgets `vm` (it may be lost with a crashed host, writes and all).
    pub fn forget(&mut self, vm: &str) {
        self.newest.remove(vm);
    }
}

/// One look: `(vm, host, newest acknowledged write)` for every VM with a
/// disk that runs on exactly one host (a VM on two is the ledger's to
/// report).
pub async fn look(world: &World) -> Vec<(String, String, u64)> {
    let mut seen = Vec::new();
    for (vm, copies) in world.census().await {
        let mut running = copies.iter().filter(|c| c.running);
        let (Some(owner), None) = (running.next(), running.next()) else {
            continue;
        };
        let Some(index) = world.index_of(&owner.host) else {
            continue;
        };
        let request = ClientRequest::Disks {
            vm: vm.clone(),
            verify: false,
        };
        if let ClientReply::Disks(disks) = world.request(index, request).await
            && let Some(acked) = disks.iter().map(|d| d.workload_acked).max()
        {
            seen.push((vm, owner.host.clone(), acked));
        }
    }
    seen
}

/// Records one [`look`]; VMs in `maybe_lost` lived on a host that crashed
/// and may have lost their writes with it.
pub fn record(
    witness: &mut Witness,
    seen: Vec<(String, String, u64)>,
    maybe_lost: &BTreeSet<String>,
) -> Vec<Violation> {
    let mut out = Vec::new();
    for (vm, host, acked) in seen {
        if maybe_lost.contains(&vm) {
            witness.forget(&vm);
        } else if let Some(v) = witness.saw(&vm, &host, acked) {
            out.push(v);
        }
    }
    out
}

/// Looks every [`EVERY`] until `stop`, adding what it finds to
/// `violations`.
pub async fn watch(
    world: Rc<World>,
    witness: Rc<RefCell<Witness>>,
    maybe_lost: Rc<RefCell<BTreeSet<String>>>,
    violations: Rc<RefCell<Vec<Violation>>>,
    stop: Rc<Cell<bool>>,
) {
    while !stop.get() {
        tokio::time::sleep(EVERY).await;
        let seen = look(&world).await;
        let found = record(&mut witness.borrow_mut(), seen, &maybe_lost.borrow());
        violations.borrow_mut().extend(found);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_newest_write_is_a_lost_write_and_a_newer_one_is_not() {
        let mut w = Witness::default();
        assert!(w.saw("vm0", "h0", 5).is_none());
        assert!(w.saw("vm0", "h1", 9).is_none(), "moved on and wrote more");
        let v = w.saw("vm0", "h0", 7).expect("writes 8 and 9 are gone");
        assert_eq!(v.kind, Kind::WriteLost);
        assert!(v.detail.contains("h1 had acknowledged write 9"), "{v}");
        assert!(w.saw("vm1", "h0", 0).is_none(), "another VM");
    }
}
