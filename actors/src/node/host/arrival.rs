//! An arriving VM becomes this host's: the destination's `Adopt` step.
//!
//! Rule: the VM and the migration that brought it are written to the node
//! store in one transaction before the destination resumes the guest or
//! answers the source. A destination killed right after it resumed still
//! has the VM when it comes back, and tells an asking source the truth;
//! one that cannot open a disk or write its store drops the VM before it
//! ever ran, and the source, told so, runs it again.

use ferry_transport::Transport;
use ractor::ActorRef;

use super::{HostState, disks};
use crate::node::vm::VmMsg;
use crate::ops::store::{AdoptedFrom, StoredVm};

/// Takes over the VM of incoming migration `key` (its shadow `actor`) at
/// `generation`; `running`: its vCPUs will run once resumed.
pub(super) async fn adopt_vm<T: Transport>(
    s: &mut HostState<T>,
    key: &(String, u64),
    vm: &str,
    actor: ActorRef<VmMsg>,
    generation: u64,
    running: bool,
) -> Result<(), String> {
    let mut config = s
        .vms
        .get(vm)
        .filter(|e| e.actor.is_none())
        .map(|e| e.config.clone())
        .ok_or_else(|| format!("no arriving VM named {vm}"))?;
    let disks::Adopted {
        disks: mut vm_disks,
        renamed,
    } = disks::adopt(s, key, &mut config).await?;
    let stored = StoredVm {
        config: config.clone(),
        generation,
        running,
        leaving: None,
    };
    let from = AdoptedFrom {
        peer: key.0.clone(),
        migration_id: key.1,
    };
    if let Err(e) = s.write_store(|store| store.adopt(&stored, &from)) {
        // The copies get their arriving names back, so the discard that
        // follows deletes them.
        disks::undo_adopt(s, &vm_disks, renamed).await;
        return Err(e.to_string());
    }
    s.incoming_disks.remove(key);
    disks::attach_adopted(&actor, &mut vm_disks).await;
    s.remember_outcome(key.clone(), true);
    if let Some(entry) = s.vms.get_mut(vm) {
        entry.actor = Some(actor);
        entry.disks = vm_disks;
        entry.config = config;
        entry.arrived = Some(key.clone());
    }
    Ok(())
}
