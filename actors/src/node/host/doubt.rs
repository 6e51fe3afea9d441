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
//!   generation jumps past the one the destination was handed, the fence
//!   is recorded durably (the destination, asking after a restart, is
//!   told its copy is not its own), and the VM runs here again. The
//!   operator vouches that the other copy is gone.
//!
//! A destination is in doubt the other way round after a restart that
//! came before its source confirmed an arrival (`confirm.rs`).
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
use crate::migration::wire::Ownership;
use crate::node::NodeCtx;
use crate::node::client::ClientReply;
use crate::node::vm::VmMsg;
use crate::ops::store::AdoptedFrom;

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
            "migration {} to {to} may have handed the VM over and its end is unknown ({}); asking {to}, or `vm recover --force`",
            crate::migration::report::show_id(migration_id),
            self.why
        )
    }

    /// For `vm list`, of a VM whose arrival is not confirmed.
    pub fn describe_arrival(&self, from: &str, migration_id: u64) -> String {
        format!(
            "arrived from {from} by migration {}, which has not confirmed it let the VM go ({}); asking {from}, or `vm recover --force`",
            crate::migration::report::show_id(migration_id),
            self.why
        )
    }
}

/// Why `entry` (in `phase`) is in doubt, for `vm list`; empty if it is
/// not.
pub(super) fn describe(entry: &super::VmEntry, phase: crate::node::vm::VmPhase) -> String {
    match (&entry.in_doubt, &entry.leaving, &entry.arrived) {
        (Some(d), Some((to, id)), _) => d.describe(to, *id),
        (Some(d), None, Some((from, id))) => d.describe_arrival(from, *id),
        (Some(d), None, None) => d.why.clone(),
        // Released, its migration still running: the answer is awaited.
        (None, Some((to, id)), _) if phase == crate::node::vm::VmPhase::Released => format!(
            "migration {} to {to} passed the release and has not heard how it ended; asking {to} (`vm recover` asks now, `--force` fences)",
            crate::migration::report::show_id(*id)
        ),
        _ => String::new(),
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
    let ctx = ctx.clone();
    retry_until_known(myself, format!("{vm} to {to}"), move || {
        let (ctx, vm, to) = (ctx.clone(), vm.clone(), to.clone());
        async move {
            let committed = inventory::ask_destination(&ctx, &to, migration_id).await?;
            Ok(HostMsg::InDoubtAnswer {
                vm,
                to,
                migration_id,
                committed,
            })
        }
    });
}

/// Runs `ask` until it gives the host message that settles a doubt (then
/// sends it), waiting longer after each failure, forever, or until the
/// host actor is gone. `what` names the doubt in the log.
pub(super) fn retry_until_known<T, F, Fut>(myself: &ActorRef<HostMsg<T>>, what: String, mut ask: F)
where
    T: Transport,
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<HostMsg<T>, String>> + Send,
{
    let me = myself.clone();
    tokio::spawn(async move {
        let mut failures = 0u32;
        loop {
            match ask().await {
                Ok(msg) => {
                    let _ = me.cast(msg);
                    return;
                }
                Err(e) => {
                    let wait = resolve_retry(failures);
                    failures += 1;
                    tracing::warn!(%what, attempt = failures, "cannot settle the migration's end ({e}); again in {wait:?}");
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
                crate::node::vm::discard(&actor);
            }
            super::leftovers::remove_copies(s, &entry.config, migration_id).await;
        }
        if inventory::forget(s, vm) {
            super::confirm::send_confirmation(&s.ctx, to.to_owned(), vm.to_owned(), migration_id);
        }
        return;
    }
    tracing::info!(%vm, %to, "the migration never completed: the VM is back here");
    take_back(myself, s, vm).await;
}

/// The VM in doubt is this host's again: phase back to normal, vCPUs
/// running if they ran before, written to the store.
pub(super) async fn take_back<T: Transport>(
    myself: &ActorRef<HostMsg<T>>,
    s: &mut HostState<T>,
    vm: &str,
) {
    let Some(entry) = s.vms.get_mut(vm) else {
        return;
    };
    let Some(doubt) = entry.in_doubt.take() else {
        return;
    };
    let leaving = entry.leaving.take();
    entry.arrived = None;
    let Some(actor) = entry.actor.clone() else {
        return;
    };
    if let Some((_, migration_id)) = leaving {
        super::leftovers::forget(s, vm, migration_id);
    }
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
    if let (Some(from), Some(_)) = (entry.arrived.clone(), &entry.in_doubt) {
        recover_arrival(myself, s, vm, from, force, reply).await;
        return;
    }
    let Some((to, migration_id)) = entry.leaving.clone() else {
        let _ = reply.send(ClientReply::Error(format!("{vm} is not in doubt")));
        return;
    };
    // A migration still pumping: its source machine settles it (fenced
    // now, or told the answer this question gets).
    if let Some(pump) = s.running.get(&migration_id).cloned() {
        let hosts = (myself.clone(), s.ctx.clone());
        let migration = (vm.to_owned(), to, migration_id);
        tokio::spawn(recover_pumping(hosts, pump, migration, force, who, reply));
        return;
    }
    if entry.in_doubt.is_none() {
        let _ = reply.send(ClientReply::Error(format!("{vm} is not in doubt")));
        return;
    }
    if force {
        let _ = reply.send(match fence(myself, s, vm, &who).await {
            Ok(()) => ClientReply::Ok,
            Err(why) => ClientReply::Error(why),
        });
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

/// `vm recover` of a VM whose migration is still running: only in doubt
/// (past the release, the end not heard) may it be fenced or asked; the
/// answer this question gets goes to the migration's machine.
async fn recover_pumping<T: Transport>(
    (me, ctx): (ActorRef<HostMsg<T>>, Arc<NodeCtx<T>>),
    pump: ActorRef<crate::node::source::SourcePump>,
    (vm, to, migration_id): (String, String, u64),
    force: bool,
    who: String,
    reply: mpsc::UnboundedSender<ClientReply>,
) {
    let in_doubt = pump
        .call(
            |port| crate::node::source::SourcePump::Recover {
                force,
                who,
                reply: port,
            },
            Some(std::time::Duration::from_secs(10)),
        )
        .await;
    match in_doubt {
        Ok(ractor::rpc::CallResult::Success(Ok(()))) => {}
        Ok(ractor::rpc::CallResult::Success(Err(why))) => {
            let _ = reply.send(ClientReply::Error(why));
            return;
        }
        _ => {
            let _ = reply.send(ClientReply::Error("the migration ended meanwhile".into()));
            return;
        }
    }
    if force {
        let _ = me.cast(HostMsg::RecordFence {
            vm,
            to,
            migration_id,
        });
        let _ = reply.send(ClientReply::Ok);
        return;
    }
    let _ = reply.send(match inventory::ask_destination(&ctx, &to, migration_id).await {
        Ok(committed) => {
            let _ = pump.cast(crate::node::source::SourcePump::Resolved(committed));
            ClientReply::Ok
        }
        Err(e) => ClientReply::Error(format!(
            "{to} cannot be asked how the migration ended ({e}); if {to} is gone for good, `vm recover --force` fences its copy"
        )),
    });
}

/// Fences the destination's copy of a VM in doubt and takes it back.
async fn fence<T: Transport>(
    myself: &ActorRef<HostMsg<T>>,
    s: &mut HostState<T>,
    vm: &str,
    who: &str,
) -> Result<(), String> {
    let gone = || format!("{vm} is gone");
    let actor = s
        .vms
        .get(vm)
        .and_then(|e| e.actor.clone())
        .ok_or_else(gone)?;
    let generation = match actor.call(VmMsg::Info, None).await {
        Ok(ractor::rpc::CallResult::Success(info)) => info.generation,
        _ => return Err(gone()),
    };
    // Its destination must never run its copy: remembered durably, for
    // when it asks (after a restart, or in a later life of this host).
    if let Some((to, migration_id)) = s.vms.get(vm).and_then(|e| e.leaving.clone()) {
        record_fence(s, vm, to, migration_id).map_err(|e| {
            tracing::error!(%vm, "recording the fence: {e}; the VM stays in doubt");
            e.to_string()
        })?;
    }
    // The destination was handed generation + 1.
    let _ = actor.cast(VmMsg::Fenced {
        generation: generation + 2,
    });
    tracing::warn!(%vm, %who, generation = generation + 2, "fenced: the VM runs here again");
    take_back(myself, s, vm).await;
    Ok(())
}

/// Records durably that migration `migration_id` of `vm` to `to` was
/// fenced: asked later, this host tells `to` the VM is not its own.
pub(super) fn record_fence<T: Transport>(
    s: &mut HostState<T>,
    vm: &str,
    to: String,
    migration_id: u64,
) -> Result<(), crate::node::NodeError> {
    let from = AdoptedFrom {
        peer: to,
        migration_id,
    };
    let key = crate::ops::store::fence_setting(&from);
    s.write_store(|store| store.set_setting(&key, vm))?;
    s.fences.insert((from.peer, migration_id));
    Ok(())
}

/// `vm recover` of a VM whose arrival its source has not confirmed: ask
/// the source now, or (`force`) run it here, on the operator's word that
/// the source's copy is gone.
async fn recover_arrival<T: Transport>(
    myself: &ActorRef<HostMsg<T>>,
    s: &mut HostState<T>,
    vm: &str,
    (from, migration_id): (String, u64),
    force: bool,
    reply: mpsc::UnboundedSender<ClientReply>,
) {
    if force {
        tracing::warn!(%vm, %from, "recover --force: the VM runs here without its source's word");
        super::confirm::settled(myself, s, vm, &from, migration_id, Ownership::Yours).await;
        let _ = reply.send(ClientReply::Ok);
        return;
    }
    let (me, ctx, vm) = (myself.clone(), s.ctx.clone(), vm.to_owned());
    tokio::spawn(async move {
        let answer = super::confirm::ask_source(&ctx, &from, &vm, migration_id).await;
        let _ = reply.send(match answer {
            Ok(Ownership::NotYet) => ClientReply::Error(format!(
                "{from} is still settling migration {}; try again shortly",
                crate::migration::report::show_id(migration_id)
            )),
            Ok(ownership) => {
                let _ = me.cast(HostMsg::ArrivalSettled {
                    vm,
                    peer: from,
                    migration_id,
                    ownership,
                });
                ClientReply::Ok
            }
            Err(e) => ClientReply::Error(format!(
                "{from} cannot be asked whether it let the VM go ({e}); if {from} is gone for good, `vm recover --force` runs the VM here"
            )),
        });
    });
}
