//! Arrivals the source has not confirmed yet.
//!
//! A VM adopted here is stored with its arrival (source host, migration
//! id) until the source, having forgotten the VM durably, confirms that it
//! let the VM go. A destination that restarts before that cannot prove its
//! copy is the newest: meanwhile the source may have been told the other
//! copy is gone (`vm recover --force`) and run the VM again. So such a VM
//! comes back paused, in doubt, and the host asks its source.
//!
//! Rules:
//! - a source confirms (`StreamIntro::Confirm`) only once its forget is
//!   durable;
//! - a restarted destination runs an unconfirmed arrival only when its
//!   source answers [`Ownership::Yours`]; [`Ownership::NotYours`] drops
//!   the copy here (its disk files stay: on a shared datastore they are
//!   the source's);
//! - a source answers from what it holds: the VM in doubt about this very
//!   migration means the destination took it (settled so here too); the
//!   migration fenced, or the VM here otherwise, is `NotYours`; neither
//!   is `Yours`.

use std::sync::Arc;
use std::time::Duration;

use ferry_transport::{FrameKind, Transport};
use ractor::ActorRef;

use super::{HostMsg, HostState, doubt, inventory};
use crate::migration::StreamIntro;
use crate::migration::wire::Ownership;
use crate::node::NodeCtx;
use crate::ops::store::AdoptedFrom;

/// Asks `from` whether migration `migration_id` left `vm` to this host.
pub(super) async fn ask_source<T: Transport>(
    ctx: &Arc<NodeCtx<T>>,
    from: &str,
    vm: &str,
    migration_id: u64,
) -> Result<Ownership, String> {
    let ask = async {
        let conn = ctx.link(from).await.map_err(|e| e.to_string())?;
        let intro = StreamIntro::Arrived {
            migration_id,
            vm: vm.to_owned(),
        };
        let (mut writer, mut reader) = crate::node::open_stream(&conn, &intro).await?;
        let answer = reader
            .read_message::<Ownership>(FrameKind::Control)
            .await
            .map_err(|e| e.to_string())?;
        let _ = writer.finish();
        Ok(answer)
    };
    tokio::time::timeout(Duration::from_secs(10), ask)
        .await
        .map_err(|_| "no answer in 10 s".to_owned())?
}

/// Asks the source of an unconfirmed arrival again and again, with
/// back-off, until it knows; the host is then told.
pub(super) fn keep_asking_source<T: Transport>(
    myself: &ActorRef<HostMsg<T>>,
    ctx: &Arc<NodeCtx<T>>,
    vm: String,
    from: String,
    migration_id: u64,
) {
    let ctx = ctx.clone();
    doubt::retry_until_known(myself, format!("{vm} from {from}"), move || {
        let (ctx, vm, from) = (ctx.clone(), vm.clone(), from.clone());
        async move {
            match ask_source(&ctx, &from, &vm, migration_id).await? {
                Ownership::NotYet => Err(format!("{from} is still settling the migration")),
                ownership => Ok(HostMsg::ArrivalSettled {
                    vm,
                    peer: from,
                    migration_id,
                    ownership,
                }),
            }
        }
    });
}

/// Tells `to` that migration `migration_id` gave it `vm` for good (this
/// host forgot the VM durably). Once: if it is lost, `to` asks when it
/// next restarts.
pub(super) fn send_confirmation<T: Transport>(
    ctx: &Arc<NodeCtx<T>>,
    to: String,
    vm: String,
    migration_id: u64,
) {
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let send = async {
            let conn = ctx.link(&to).await.map_err(|e| e.to_string())?;
            let intro = StreamIntro::Confirm { migration_id, vm };
            let (mut writer, _reader) = crate::node::open_stream(&conn, &intro).await?;
            writer.finish().map_err(|e| e.to_string())
        };
        if let Err(e) = send.await {
            tracing::info!(%to, "confirming the VM's arrival ({e}); it asks when it restarts");
        }
    });
}

/// The source's answer to a destination asking whether `vm`, which
/// migration `migration_id` brought to `peer`, is `peer`'s.
pub(super) async fn answer_question<T: Transport>(
    myself: &ActorRef<HostMsg<T>>,
    s: &mut HostState<T>,
    peer: &str,
    vm: &str,
    migration_id: u64,
) -> Ownership {
    if s.fences.contains(&(peer.to_owned(), migration_id)) {
        return Ownership::NotYours;
    }
    let Some(entry) = s.vms.get(vm) else {
        return Ownership::Yours;
    };
    let this_migration = entry
        .leaving
        .as_ref()
        .is_some_and(|(to, id)| to == peer && *id == migration_id);
    match (this_migration, entry.in_doubt.is_some()) {
        // The destination says it took the VM: that settles our doubt.
        (true, true) => {
            doubt::answered(myself, s, vm, peer, migration_id, true).await;
            Ownership::Yours
        }
        // The migration's own machine is still asking.
        (true, false) => Ownership::NotYet,
        (false, _) => Ownership::NotYours,
    }
}

/// The source answered for (or confirmed) an arrival.
pub(super) async fn settled<T: Transport>(
    myself: &ActorRef<HostMsg<T>>,
    s: &mut HostState<T>,
    vm: &str,
    peer: &str,
    migration_id: u64,
    ownership: Ownership,
) {
    let key = (peer.to_owned(), migration_id);
    let Some(entry) = s.vms.get_mut(vm) else {
        return;
    };
    if entry.arrived.as_ref() != Some(&key) {
        return;
    }
    let in_doubt = entry.in_doubt.is_some();
    match ownership {
        Ownership::Yours => {
            entry.arrived = None;
            let from = AdoptedFrom {
                peer: key.0,
                migration_id,
            };
            if let Err(e) = s.write_store(|store| store.confirm_arrival(vm, &from)) {
                tracing::warn!(%vm, "recording the confirmed arrival: {e}; a restart asks again");
            }
            if in_doubt {
                tracing::info!(%vm, %peer, "the source let the VM go: it runs here");
                doubt::take_back(myself, s, vm).await;
            }
        }
        Ownership::NotYours if in_doubt => {
            tracing::warn!(%vm, %peer, "the source took the VM back (fenced): this copy is dropped; its disk files stay");
            drop_copy(s, vm);
        }
        Ownership::NotYours | Ownership::NotYet => {}
    }
}

/// Forgets the copy of a VM that another host owns, without touching its
/// disk files.
fn drop_copy<T: Transport>(s: &mut HostState<T>, vm: &str) {
    if let Some(entry) = s.vms.remove(vm) {
        for d in &entry.disks {
            d.actor.stop(None);
        }
        if let Some(actor) = entry.actor {
            crate::node::vm::discard(&actor);
        }
    }
    inventory::forget(s, vm);
}
