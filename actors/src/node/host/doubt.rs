//! VMs in doubt: a migration away passed the release (the destination may
//! run the VM) and this host does not know how it ended — it restarted
//! before the answer came, and the destination could not be asked.
//!
//! Rules:
//! - a VM in doubt never runs here on this host's own initiative: it stays
//!   paused (`VmPhase::Released`), refuses start, stop, migrate and delete;
//! - the host keeps asking its destination, with back-off, for as long as
//!   it takes; the answer settles it (forgotten here, or back as it was);
//! - `vm recover` asks now; `vm recover --force` fences: the VM's
//!   generation jumps past the one the destination was handed, and it runs
//!   here again. The operator vouches that the other copy is gone.
//!
//! A migration still pumping (the link broke after the release) is in
//! doubt too; its source machine asks by itself and `vm recover` reaches
//! it through the pump.

use std::sync::Arc;

use ferry_transport::Transport;
use ractor::ActorRef;
use tokio::sync::mpsc;

use super::{HostMsg, HostState, inventory};
use crate::migration::source::resolve_retry;
use crate::node::NodeCtx;
use crate::node::client::ClientReply;
use crate::node::vm::VmMsg;

/// Why a VM is in doubt, and what it was doing before.
#[derive(Debug, Clone)]
pub(super) struct InDoubt {
    /// Its vCPUs ran before the migration: they run again if the VM comes
    /// back.
    pub running: bool,
    /// Why the end is not known.
    pub why: String,
}

impl InDoubt {
    /// For `vm list`.
    pub fn describe(&self, to: &str, migration_id: u64) -> String {
        format!(
            "migration {} to {to} passed the release and its end is unknown ({}); asking {to}, or `vm recover --force`",
            crate::migration::report::show_id(migration_id),
            self.why
        )
    }
}

/// Asks `to` how migration `migration_id` of `vm` ended, again and again
/// with back-off, until it answers (then the host is told) or the host
/// actor is gone.
pub(super) fn keep_asking<T: Transport>(
    myself: &ActorRef<HostMsg<T>>,
    ctx: &Arc<NodeCtx<T>>,
    vm: String,
    to: String,
    migration_id: u64,
) {
    let (me, ctx) = (myself.clone(), ctx.clone());
    tokio::spawn(async move {
        let mut failures = 0u32;
        loop {
            match inventory::ask_destination(&ctx, &to, migration_id).await {
                Ok(committed) => {
                    let _ = me.cast(HostMsg::InDoubtAnswer {
                        vm,
                        to,
                        migration_id,
                        committed,
                    });
                    return;
                }
                Err(e) => {
                    let wait = resolve_retry(failures);
                    failures += 1;
                    tracing::warn!(%vm, %to, attempt = failures, "cannot ask how the migration ended ({e}); again in {wait:?}");
                    tokio::time::sleep(wait).await;
                }
            }
            if me.get_status() != ractor::ActorStatus::Running {
                return;
            }
        }
    });
}

/// The destination answered for a VM in doubt: it took the VM
/// (`committed`: forget it here) or never will (the VM is ours again).
pub(super) async fn answered<T: Transport>(
    myself: &ActorRef<HostMsg<T>>,
    s: &mut HostState<T>,
    vm: &str,
    to: &str,
    migration_id: u64,
    committed: bool,
) {
    let Some(entry) = s.vms.get_mut(vm) else {
        return;
    };
    let still = entry.in_doubt.is_some()
        && entry
            .leaving
            .as_ref()
            .is_some_and(|(t, id)| t == to && *id == migration_id);
    if !still {
        return;
    }
    if committed {
        tracing::info!(%vm, %to, "the VM moved while this host did not know: forgotten here");
        if let Some(entry) = s.vms.remove(vm) {
            for d in &entry.disks {
                d.actor.stop(None);
            }
            if let Some(actor) = entry.actor {
                actor.stop(None);
            }
        }
        inventory::forget(s, vm);
        return;
    }
    tracing::info!(%vm, %to, "the migration never completed: the VM is back here");
    take_back(myself, s, vm).await;
}

/// The VM in doubt is this host's again: phase back to normal, vCPUs
/// running if they ran before, written to the store.
async fn take_back<T: Transport>(myself: &ActorRef<HostMsg<T>>, s: &mut HostState<T>, vm: &str) {
    let Some(entry) = s.vms.get_mut(vm) else {
        return;
    };
    let Some(doubt) = entry.in_doubt.take() else {
        return;
    };
    entry.leaving = None;
    let Some(actor) = entry.actor.clone() else {
        return;
    };
    let _ = actor.cast(VmMsg::MigrationAborted);
    if doubt.running
        && !matches!(
            actor.call(VmMsg::Start, None).await,
            Ok(ractor::rpc::CallResult::Success(Ok(())))
        )
    {
        tracing::warn!(%vm, "restarting the VM failed; it stays stopped");
    }
    // Its disks stayed closed while in doubt; they open now (and their
    // workload runs if the VM does).
    let _ = myself.cast(HostMsg::ReopenDisks(vm.to_owned()));
    inventory::persist_or_log(s, vm, Some(doubt.running)).await;
}

/// `vm recover VM [--force]`.
pub(super) async fn recover<T: Transport>(
    myself: &ActorRef<HostMsg<T>>,
    s: &mut HostState<T>,
    vm: &str,
    force: bool,
    who: String,
    reply: mpsc::UnboundedSender<ClientReply>,
) {
    let Some(entry) = s.vms.get(vm) else {
        let _ = reply.send(ClientReply::Error(format!(
            "no VM named {vm} on {}",
            s.ctx.name
        )));
        return;
    };
    let Some((to, migration_id)) = entry.leaving.clone() else {
        let _ = reply.send(ClientReply::Error(format!("{vm} is not in doubt")));
        return;
    };
    // A migration still pumping: its source machine settles it (asked
    // again now, or fenced).
    if let Some(pump) = s.running.get(&migration_id).cloned() {
        let _ = to;
        tokio::spawn(async move {
            let answer = pump
                .call(
                    |port| crate::node::source::SourcePump::Recover {
                        force,
                        who,
                        reply: port,
                    },
                    Some(std::time::Duration::from_secs(10)),
                )
                .await;
            let _ = reply.send(match answer {
                Ok(ractor::rpc::CallResult::Success(Ok(()))) => ClientReply::Ok,
                Ok(ractor::rpc::CallResult::Success(Err(why))) => ClientReply::Error(why),
                _ => ClientReply::Error("the migration ended meanwhile".into()),
            });
        });
        return;
    }
    if entry.in_doubt.is_none() {
        let _ = reply.send(ClientReply::Error(format!("{vm} is not in doubt")));
        return;
    }
    if force {
        fence(myself, s, vm, &who).await;
        let _ = reply.send(ClientReply::Ok);
        return;
    }
    // Ask once, now; the answer settles the VM through the host.
    let (me, ctx, vm) = (myself.clone(), s.ctx.clone(), vm.to_owned());
    tokio::spawn(async move {
        let answer = inventory::ask_destination(&ctx, &to, migration_id).await;
        let _ = reply.send(match answer {
            Ok(committed) => {
                let _ = me.cast(HostMsg::InDoubtAnswer {
                    vm,
                    to: to.clone(),
                    migration_id,
                    committed,
                });
                ClientReply::Ok
            }
            Err(e) => ClientReply::Error(format!(
                "{to} cannot be asked how the migration ended ({e}); if {to} is gone for good, `vm recover --force` fences its copy"
            )),
        });
    });
}

/// Fences the destination's copy of a VM in doubt and takes it back.
async fn fence<T: Transport>(
    myself: &ActorRef<HostMsg<T>>,
    s: &mut HostState<T>,
    vm: &str,
    who: &str,
) {
    let Some(actor) = s.vms.get(vm).and_then(|e| e.actor.clone()) else {
        return;
    };
    let generation = match actor.call(VmMsg::Info, None).await {
        Ok(ractor::rpc::CallResult::Success(info)) => info.generation,
        _ => return,
    };
    // The destination was handed generation + 1.
    let _ = actor.cast(VmMsg::Fenced {
        generation: generation + 2,
    });
    tracing::warn!(%vm, %who, generation = generation + 2, "fenced: the VM runs here again");
    take_back(myself, s, vm).await;
}
