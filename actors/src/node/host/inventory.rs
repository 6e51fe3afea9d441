//! The host's inventory in the node store: each VM's definition, disks,
//! generation and whether it ran, written at every change and read back
//! when the node starts again.
//!
//! A VM that was leaving when the node stopped comes back paused, in
//! doubt (never started on this host's own initiative), and the
//! destination is asked in the background, at once and then with back-off,
//! how the migration ended (the same `Resolve` question a source asks
//! after losing the link past the release). If the destination took the
//! VM, it is forgotten here; if not, it runs again. The host serves
//! meanwhile, however slow or silent the destination is. A VM whose arrival here its
//! source had not confirmed comes back paused too, until the source
//! answers (`confirm.rs`).

use std::sync::Arc;
use std::time::Duration;

use ferry_transport::Transport;
use ractor::{Actor, ActorRef};

use super::{HostMsg, HostState, VmEntry, announce, disks};
use crate::node::vm::{VmActor, VmArgs, VmMsg, VmPhase};
use crate::node::{NodeCtx, NodeError};
use crate::ops::store::StoredVm;

/// Writes VM `name` as it is now (`running`: whether it runs, if the VM
/// actor cannot say, as during a migration). A failed write is returned:
/// what it recorded must not be acknowledged.
pub(super) async fn persist<T: Transport>(
    s: &mut HostState<T>,
    name: &str,
    running: Option<bool>,
) -> Result<(), NodeError> {
    let Some(entry) = s.vms.get(name) else {
        return Ok(());
    };
    let Some(actor) = &entry.actor else {
        return Ok(());
    };
    let info = match actor.call(VmMsg::Info, None).await {
        Ok(ractor::rpc::CallResult::Success(i)) => i,
        _ => return Err(NodeError::Gone("VM actor".into())),
    };
    // A VM in doubt is paused here, but ran before: that is what counts.
    let before = entry.in_doubt.as_ref().map(|d| d.running);
    let stored = StoredVm {
        config: entry.config.clone(),
        generation: info.generation,
        running: running.or(before).unwrap_or(info.running),
        leaving: entry.leaving.clone(),
    };
    s.write_store(|store| store.put_vm(&stored))?;
    Ok(())
}

/// [`persist`] where nobody waits for an answer: a failure is logged (and
/// the host stops taking migrations until the store writes again).
pub(super) async fn persist_or_log<T: Transport>(
    s: &mut HostState<T>,
    name: &str,
    running: Option<bool>,
) {
    if let Err(e) = persist(s, name, running).await {
        tracing::error!(vm = %name, "storing the inventory: {e}");
    }
}

/// Forgets VM `name` in the store; whether that is durable.
pub(super) fn forget<T: Transport>(s: &mut HostState<T>, name: &str) -> bool {
    match s.write_store(|store| store.remove_vm(name)) {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(vm = %name, "removing from the inventory: {e}");
            false
        }
    }
}

/// Brings back the stored VMs.
pub(super) async fn restore<T: Transport>(
    myself: &ActorRef<HostMsg<T>>,
    s: &mut HostState<T>,
    vms: Vec<StoredVm>,
) {
    for stored in vms {
        let name = stored.config.name.clone();
        // A VM that was leaving comes back paused, in doubt, and its
        // destination is asked in the background (at once): this host
        // serves meanwhile, however slow or silent the destination is.
        let doubt = if let Some((to, migration_id)) = stored.leaving.clone() {
            tracing::info!(vm = %name, %to, "the VM was leaving when this host stopped: paused until its destination says how the migration ended");
            Some((
                Pending::Leaving(to, migration_id),
                super::doubt::InDoubt {
                    running: stored.running,
                    why: "this host restarted during the migration".into(),
                },
            ))
        } else {
            // An unconfirmed arrival likewise, until its source answers.
            s.arrivals.remove(&name).map(|(from, migration_id)| {
                tracing::info!(vm = %name, %from, "the VM's arrival is not confirmed: it stays paused until its source answers");
                (
                    Pending::Arrived(from, migration_id),
                    super::doubt::InDoubt {
                        running: stored.running,
                        why: "this host restarted before the source confirmed it".into(),
                    },
                )
            })
        };
        match bring_back(myself, s, &stored, doubt.clone()).await {
            Ok(()) => persist_or_log(s, &name, None).await,
            Err(e) => tracing::error!(vm = %name, "bringing the VM back: {e}"),
        }
        match doubt {
            Some((Pending::Leaving(to, migration_id), _)) => {
                super::doubt::keep_asking(myself, &s.ctx, name, to, migration_id);
            }
            Some((Pending::Arrived(from, migration_id), _)) => {
                super::confirm::keep_asking_source(myself, &s.ctx, name, from, migration_id);
            }
            None => {}
        }
    }
}

/// How a stored VM's guest came back when the node started.
#[derive(Debug, Clone, PartialEq, Eq)]
enum CameBack {
    /// Its VMM process ran on and still runs it.
    Running,
    /// Its VMM process ran on; the guest is paused.
    Paused,
    /// Booted again: its kind of guest ends with the node.
    Booted,
    /// Booted again (stopped): it should have run on but was gone.
    Lost(String),
}

/// The guest of a stored VM: the one that ran on in its VMM process, or a
/// new boot. A VM in doubt is paused (its migration may have handed it
/// over), and a migration's leftovers (dirty log, throttle) are cleared:
/// the migration died with the node.
fn take_up(
    factory: &dyn crate::node::factory::GuestFactory,
    config: &crate::migration::VmConfig,
    in_doubt: bool,
) -> Result<(Box<dyn crate::guest::GuestBackend>, CameBack), crate::guest::GuestError> {
    use crate::node::factory::Reattach;
    match factory.reattach(config) {
        Reattach::Running(mut guest) => {
            if let Err(e) = guest.stop_dirty_log() {
                tracing::warn!(vm = %config.name, "clearing the dirty log of a reattached VM: {e}");
            }
            guest.set_throttle(0)?;
            if in_doubt {
                guest.pause()?;
            }
            let came = if guest.is_running() {
                CameBack::Running
            } else {
                CameBack::Paused
            };
            tracing::info!(vm = %config.name, ?came, "reattached to the VM's running VMM process");
            Ok((guest, came))
        }
        Reattach::NotKept => Ok((factory.boot(config)?, CameBack::Booted)),
        Reattach::Lost(why) => Ok((factory.boot(config)?, CameBack::Lost(why))),
    }
}

/// What a VM brought back in doubt waits for.
#[derive(Debug, Clone)]
enum Pending {
    /// How its migration away to (host, id) ended.
    Leaving(String, u64),
    /// Whether its arrival from (host, id) left it to this host.
    Arrived(String, u64),
}

pub(super) async fn ask_destination<T: Transport>(
    ctx: &Arc<NodeCtx<T>>,
    to: &str,
    migration_id: u64,
) -> Result<bool, String> {
    let ask = async {
        let conn = ctx.link(to).await.map_err(|e| e.to_string())?;
        crate::node::source::ask_destination(&conn, migration_id).await
    };
    tokio::time::timeout(Duration::from_secs(10), ask)
        .await
        .map_err(|_| "no answer in 10 s".to_owned())?
}

/// Boots a stored VM again: running if it ran, paused in doubt if its
/// migration's end is unknown (`doubt`: that migration and why).
async fn bring_back<T: Transport>(
    myself: &ActorRef<HostMsg<T>>,
    s: &mut HostState<T>,
    stored: &StoredVm,
    doubt: Option<(Pending, super::doubt::InDoubt)>,
) -> Result<(), NodeError> {
    let config = stored.config.clone();
    let factory = s.factory.clone();
    let boot_config = config.clone();
    let in_doubt = doubt.is_some();
    let (guest, came_back) =
        crate::node::offload(move || take_up(&*factory, &boot_config, in_doubt))
            .await
            .map_err(|e| NodeError::Guest(e.to_string()))?;
    if let CameBack::Lost(why) = &came_back {
        tracing::error!(vm = %config.name, "the VM crashed while the node was down: {why}; it stays stopped");
        let _ = myself.cast(HostMsg::Audit(Box::new(crate::ops::audit::AuditEntry {
            at_unix_ms: crate::ops::unix_ms_now(),
            who: "node (restart)".into(),
            action: "vm crashed".into(),
            vm: config.name.clone(),
            outcome: "failed".into(),
            detail: format!(
                "{why}; booted again but left stopped (start it with `ferry vm start`)"
            ),
            ..Default::default()
        })));
    }
    let phase = if came_back == CameBack::Running {
        VmPhase::Running
    } else {
        VmPhase::Stopped
    };
    let mut vm_disks = Vec::new();
    // A VM in doubt leaves its disks closed: the destination may hold
    // them. They open when it comes back.
    let disks_now: &[crate::migration::wire::DiskConfig] =
        if doubt.is_some() { &[] } else { &config.disks };
    for c in disks_now {
        vm_disks.push(
            crate::node::vm_disks::open_disk(c.clone(), s.stores.clone())
                .await
                .map_err(|e| NodeError::Guest(format!("{}: {e}", c.name)))?,
        );
    }
    let (actor, _) = Actor::spawn(
        None,
        VmActor,
        VmArgs {
            config: config.clone(),
            guest,
            host: s.ctx.name.clone(),
            generation: stored.generation,
            phase,
        },
    )
    .await
    .map_err(|e| NodeError::Gone(format!("VM actor ({e})")))?;
    crate::node::vm_disks::attach_to_guest(&actor, &mut vm_disks).await;
    let (mut leaving, mut arrived, mut in_doubt) = (None, None, None);
    if let Some((pending, d)) = doubt {
        let _ = actor.cast(VmMsg::Released);
        in_doubt = Some(d);
        match pending {
            Pending::Leaving(to, id) => leaving = Some((to, id)),
            Pending::Arrived(from, id) => arrived = Some((from, id)),
        }
    }
    let lost = matches!(came_back, CameBack::Lost(_));
    if stored.running && in_doubt.is_none() && !lost {
        match actor.call(VmMsg::Start, None).await {
            Ok(ractor::rpc::CallResult::Success(Ok(()))) => disks::set_workload(&vm_disks, true),
            _ => tracing::warn!(vm = %config.name, "restarting the VM failed; it stays stopped"),
        }
    }
    announce(myself, &s.ctx, config.mac);
    s.vms.insert(
        config.name.clone(),
        VmEntry {
            config,
            actor: Some(actor),
            disks: vm_disks,
            leaving,
            in_doubt,
            arrived,
        },
    );
    Ok(())
}
