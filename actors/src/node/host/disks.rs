//! The host's side of disks: creating them with a VM, moving them between
//! this host's datastores, admitting and receiving them in migrations,
//! and attaching them to an arriving VM.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};

use ferry_transport::Transport;
use tokio::sync::mpsc;
use tracing::Instrument;

use super::super::client::{ClientReply, DiskSpec, DiskView};
use super::super::disk::{self, DiskMsg};
use super::super::vm::{VmMsg, with_guest};
use super::super::vm_disks::{VmDisk, WORKLOAD_GAP, open_disk, spawn_disk};
use super::super::{NodeError, offload};
use super::HostState;
use crate::disk::shared;
use crate::migration::wire::{DiskConfig, Refusal};
use crate::migration::{Offer, Progress, VmConfig};
use crate::node::disk::DiskPlace;
use crate::storage::datastore::{Datastores, check_datastore};
use crate::storage::remote::{DiskOpen, HomeFile, IncomingDisk};
use crate::storage::target::LocalTarget;
use crate::storage::{DiskMoveReport, Method, MoveOptions};

fn disk_err(e: impl std::fmt::Display) -> NodeError {
    NodeError::BadRequest(e.to_string())
}

/// The VM's home files: its definition and log.
pub fn home_files(config: &VmConfig, log: &str) -> Vec<HomeFile> {
    let mut def = format!(
        "name = \"{}\"\nmemory_mib = {}\nvcpus = {}\nmac = \"{}\"\n",
        config.name,
        config.memory_bytes >> 20,
        config.vcpus,
        crate::migration::wire::mac_string(&config.mac)
    );
    for d in &config.disks {
        def.push_str(&format!(
            "\n[[disk]]\nname = \"{}\"\nsize_mib = {}\ndatastore = \"{}\"\npath = \"{}\"\n",
            d.name,
            d.len_bytes >> 20,
            d.datastore,
            d.path
        ));
    }
    vec![
        HomeFile {
            path: format!("{}/vm.toml", config.name),
            bytes: def.into_bytes(),
        },
        HomeFile {
            path: format!("{}/vm.log", config.name),
            bytes: log.as_bytes().to_vec(),
        },
    ]
}

/// Creates the disks of a new VM (and its home, on the first disk's
/// datastore).
pub async fn create_disks(
    stores: &Arc<dyn Datastores>,
    vm: &str,
    specs: &[DiskSpec],
    workload: bool,
) -> Result<Vec<DiskConfig>, NodeError> {
    let mut configs = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        check_datastore(stores.as_ref(), &spec.datastore).map_err(disk_err)?;
        if spec.size_mib == 0 || spec.size_mib > (1 << 24) {
            return Err(NodeError::BadRequest(format!(
                "disk{i}: size must be 1 MiB to 16 TiB, not {} MiB",
                spec.size_mib
            )));
        }
        configs.push(DiskConfig {
            name: format!("disk{i}"),
            len_bytes: spec.size_mib << 20,
            datastore: spec.datastore.clone(),
            path: format!("{vm}/disk{i}.raw"),
            location: stores.location(&spec.datastore).map_err(disk_err)?,
            workload,
        });
    }
    Ok(configs)
}

/// Opens the created disks' files and spawns their actors.
pub async fn materialize(
    stores: &Arc<dyn Datastores>,
    config: &VmConfig,
) -> Result<Vec<VmDisk>, NodeError> {
    let mut disks = Vec::new();
    if let Some(first) = config.disks.first() {
        let (s, ds) = (stores.clone(), first.datastore.clone());
        let home = home_files(config, "created\n");
        offload(move || {
            home.iter()
                .try_for_each(|h| s.write_file(&ds, &h.path, &h.bytes))
        })
        .await
        .map_err(disk_err)?;
    }
    for c in &config.disks {
        let (s, cc) = (stores.clone(), c.clone());
        let made = offload(move || s.create_disk(&cc.datastore, &cc.path, cc.len_bytes)).await;
        let d = match made {
            Ok(d) => d,
            Err(e) => {
                remove_all(stores, config, &disks).await;
                return Err(disk_err(format!("{}: {e}", c.name)));
            }
        };
        disks.push(
            spawn_disk(c.clone(), shared(d), stores.clone(), 0)
                .await
                .map_err(NodeError::Gone)?,
        );
    }
    Ok(disks)
}

/// Closes and deletes a VM's disks and home.
pub async fn remove_all(stores: &Arc<dyn Datastores>, config: &VmConfig, disks: &[VmDisk]) {
    for d in disks {
        let _ = disk::call(&d.actor, DiskMsg::Release).await;
    }
    let s = stores.clone();
    let config = config.clone();
    let _ = offload(move || {
        for d in &config.disks {
            let _ = s.remove(&d.datastore, &d.path);
        }
        if let Some(first) = config.disks.first() {
            for h in home_files(&config, "") {
                let _ = s.remove(&first.datastore, &h.path);
            }
        }
    })
    .await;
}

/// Turns the synthetic disk workload on or off.
pub fn set_workload(disks: &[VmDisk], on: bool) {
    for d in disks
        .iter()
        .filter(|d| d.config.workload && !d.guest_driven)
    {
        let _ = d.actor.cast(DiskMsg::Workload(on.then_some(WORKLOAD_GAP)));
    }
}

/// Describes (and with `verify` checks) a VM's disks.
pub async fn views(disks: &[VmDisk], verify: bool) -> Vec<DiskView> {
    let mut out = Vec::new();
    for d in disks {
        let Ok(info) = disk::call(&d.actor, DiskMsg::Info).await else {
            continue;
        };
        let (verified_blocks, verify_error) = if verify {
            match disk::call(&d.actor, DiskMsg::VerifyWorkload).await {
                Ok(Ok(n)) => (Some(n), None),
                Ok(Err(e)) => (None, Some(e)),
                Err(e) => (None, Some(e.to_string())),
            }
        } else {
            (None, None)
        };
        out.push(DiskView {
            name: info.name,
            datastore: info.place.datastore,
            path: info.place.path,
            len_bytes: info.len,
            writes: info.writes,
            workload_acked: info.workload_acked,
            write_latency_us_p50: info.write_latency_us_p50,
            verified_blocks,
            verify_error,
            failing: info.failing,
        });
    }
    out
}

/// Whether this host can take `offer`'s disks.
pub fn admit_disks(stores: &dyn Datastores, offer: &Offer) -> Result<(), Refusal> {
    if offer.vm.disks.is_empty() {
        return Ok(());
    }
    if let Some(m) = &offer.storage {
        if offer.cold {
            return Err(Refusal::Datastore(
                "a cold migration cannot move storage yet; start the VM or move its disks first"
                    .into(),
            ));
        }
        for (d, _) in &m.disk_datastores {
            if !offer.vm.disks.iter().any(|c| c.name == *d) {
                return Err(Refusal::Datastore(format!("the VM has no disk named {d}")));
            }
        }
        return m
            .datastores()
            .try_for_each(|ds| check_datastore(stores, ds))
            .map_err(|e| Refusal::Datastore(e.to_string()));
    }
    for d in &offer.vm.disks {
        match stores.location(&d.datastore) {
            Ok(l) if l == d.location => {}
            _ => {
                return Err(Refusal::Datastore(format!(
                    "{} lives on datastore {}, which this host does not share; move it with --datastore",
                    d.name, d.datastore
                )));
            }
        }
    }
    Ok(())
}

/// A disk stream of an incoming migration opened: the disk it fills
/// (created, with the VM's home, or found again after a broken link).
pub async fn incoming_disk<T: Transport>(
    s: &mut HostState<T>,
    peer: String,
    open: DiskOpen,
) -> Result<Arc<IncomingDisk>, String> {
    let key = (peer, open.migration_id);
    if !s.incoming.contains_key(&key) {
        return Err(format!(
            "no migration {} from {} here",
            open.migration_id, key.0
        ));
    }
    let list = s.incoming_disks.entry(key).or_default();
    if let Some(d) = list.iter().find(|d| d.name == open.disk) {
        return Ok(d.clone());
    }
    // Arriving files carry this host's mark until the VM arrives, so a
    // restart can tell them from finished ones.
    let host = s.ctx.name.clone();
    let arriving = |p: &str| crate::storage::datastore::arriving_name(p, &host);
    let path = arriving(&open.path);
    let home: Vec<(String, String)> = open
        .home
        .iter()
        .map(|h| (arriving(&h.path), h.path.clone()))
        .collect();
    let stores = s.stores.clone();
    let o = open.clone();
    let (p, h) = (path.clone(), home.clone());
    let disk = offload(move || {
        check_datastore(stores.as_ref(), &o.datastore)?;
        for (file, (tmp, _)) in o.home.iter().zip(&h) {
            stores.write_file(&o.datastore, tmp, &file.bytes)?;
        }
        // A copy that died with this host's previous life starts afresh.
        let _ = stores.remove(&o.datastore, &p);
        stores.create_disk(&o.datastore, &p, o.len)
    })
    .await
    .map_err(|e| e.to_string())?;
    let d = Arc::new(IncomingDisk {
        name: open.disk,
        disk: shared(disk),
        place: DiskPlace {
            datastore: open.datastore,
            path,
        },
        final_path: open.path,
        durable: AtomicU64::new(0),
        done: std::sync::Mutex::new(None),
        discarded: AtomicBool::new(false),
        home,
    });
    list.push(d.clone());
    Ok(d)
}

/// The VM arrives: its disks get actors here (the incoming disks stay
/// listed until the caller commits) — the copies that came with
/// it (renamed from their arriving names), or the shared files whose
/// locks the source just gave up. All or nothing: if one cannot be
/// opened, those opened are closed and the copies keep their arriving
/// names (so a discard deletes them), and the error says which.
pub async fn adopt<T: Transport>(
    s: &mut HostState<T>,
    key: &(String, u64),
    config: &mut VmConfig,
) -> Result<Adopted, String> {
    let arrived = s.incoming_disks.get(key).cloned().unwrap_or_default();
    let mut renamed = Vec::new();
    let mut disks = Vec::new();
    let mut failed = None;
    for c in &mut config.disks {
        let made = if let Some(inc) = arrived.iter().find(|d| d.name == c.name) {
            let (stores, inc2) = (s.stores.clone(), inc.clone());
            let named = offload(move || name_arrived(stores.as_ref(), &inc2, false)).await;
            if let Err(e) = named {
                failed = Some(format!("{}: naming the arrived copy: {e}", c.name));
                break;
            }
            renamed.push(inc.clone());
            c.datastore = inc.place.datastore.clone();
            c.path = inc.final_path.clone();
            c.location = s.stores.location(&c.datastore).unwrap_or_default();
            let acked = inc.done.lock().expect("done").unwrap_or(0);
            spawn_disk(c.clone(), inc.disk.clone(), s.stores.clone(), acked).await
        } else {
            open_disk(c.clone(), s.stores.clone()).await
        };
        match made {
            Ok(d) => disks.push(d),
            Err(e) => {
                failed = Some(format!("{}: {e}", c.name));
                break;
            }
        }
    }
    if let Some(why) = failed {
        undo_adopt(s, &disks, renamed).await;
        return Err(why);
    }
    Ok(Adopted { disks, renamed })
}

/// Disks of an arriving VM, opened; undone with [`undo_adopt`].
pub struct Adopted {
    /// The VM's disks here.
    pub disks: Vec<VmDisk>,
    /// Copies that came with it, renamed to their final names.
    pub renamed: Vec<Arc<IncomingDisk>>,
}

/// Takes back a half-done adoption: closes the disks opened and gives the
/// renamed copies their arriving names again.
pub async fn undo_adopt<T: Transport>(
    s: &HostState<T>,
    disks: &[VmDisk],
    renamed: Vec<Arc<IncomingDisk>>,
) {
    for d in disks {
        d.actor.stop(None);
    }
    let stores = s.stores.clone();
    offload(move || {
        for inc in renamed {
            if let Err(e) = name_arrived(stores.as_ref(), &inc, true) {
                tracing::error!(disk = %inc.name, "renaming an arrived copy back: {e}");
            }
        }
    })
    .await;
}

/// Gives an arrived copy (and the VM's home files) their final names, or
/// with `back` their arriving names again.
fn name_arrived(
    stores: &dyn Datastores,
    inc: &IncomingDisk,
    back: bool,
) -> Result<(), crate::disk::DiskError> {
    let ds = &inc.place.datastore;
    let flip = |a: &str, b: &str| {
        if back {
            stores.rename(ds, b, a)
        } else {
            stores.rename(ds, a, b)
        }
    };
    for (tmp, fin) in &inc.home {
        flip(tmp, fin)?;
    }
    flip(&inc.place.path, &inc.final_path)
}

/// Connects an adopted VM's disks to its guest and runs their workload
/// if the guest runs.
pub async fn attach_adopted(vm: &ractor::ActorRef<VmMsg>, disks: &mut [VmDisk]) {
    super::super::vm_disks::attach_to_guest(vm, disks).await;
    let running = with_guest(vm, |g| g.is_running()).await.unwrap_or(false);
    set_workload(disks, running);
}

/// The migration ended without the VM: delete what arrived of its disks.
pub async fn discard_incoming<T: Transport>(s: &mut HostState<T>, key: &(String, u64)) {
    let arrived = s.incoming_disks.remove(key).unwrap_or_default();
    if arrived.is_empty() {
        return;
    }
    let stores = s.stores.clone();
    let _ = offload(move || {
        for d in arrived {
            *d.disk.lock().expect("disk") = Box::new(crate::disk::MemDisk::new(0));
            let _ = stores.remove(&d.place.datastore, &d.place.path);
            for (tmp, _) in &d.home {
                let _ = stores.remove(&d.place.datastore, tmp);
            }
        }
    })
    .await;
}

/// Moves every disk of a VM to `datastore` on this host, live, reporting
/// progress on `reply`; returns the disks' new definitions.
pub async fn move_storage(
    stores: Arc<dyn Datastores>,
    config: VmConfig,
    disks: Vec<VmDisk>,
    vm: ractor::ActorRef<VmMsg>,
    targets: crate::migration::wire::StorageMove,
    options: MoveOptions,
    reply: mpsc::UnboundedSender<ClientReply>,
) -> Result<(Vec<DiskConfig>, Vec<DiskMoveReport>), NodeError> {
    for ds in targets.datastores() {
        check_datastore(stores.as_ref(), ds).map_err(disk_err)?;
    }
    for (d, _) in &targets.disk_datastores {
        if !disks.iter().any(|x| x.config.name == *d) {
            return Err(NodeError::BadRequest(format!(
                "{} has no disk named {d}",
                config.name
            )));
        }
    }
    let target_of = |d: &VmDisk| targets.datastore_for(&d.config.name).to_owned();
    if disks.iter().all(|d| d.config.datastore == target_of(d)) {
        return Err(NodeError::BadRequest(format!(
            "{}'s disks are where they should go already",
            config.name
        )));
    }
    // The home moves first, with the first disk.
    let from = config.disks.first().map(|d| d.datastore.clone());
    let datastore = disks.first().map(target_of).unwrap_or_default();
    if let Some(from) = &from
        && *from != datastore
    {
        let (s, f, t, name) = (
            stores.clone(),
            from.clone(),
            datastore.clone(),
            config.name.clone(),
        );
        offload(move || {
            for p in s.list(&f, &name)? {
                if crate::node::overlay::is_disk_file(&p) {
                    continue;
                }
                let bytes = s.read_file(&f, &p)?;
                s.write_file(&t, &p, &bytes)?;
            }
            Ok::<(), crate::disk::DiskError>(())
        })
        .await
        .map_err(disk_err)?;
    }
    let mut configs = Vec::new();
    let mut reports = Vec::new();
    for d in &disks {
        let to = target_of(d);
        if d.config.datastore == to {
            configs.push(d.config.clone());
            continue;
        }
        let r = move_one(&stores, d, &vm, &to, options, &reply).await;
        match r {
            Ok(report) => reports.push(report),
            Err(e) => {
                // Earlier disks stay moved; this one and later ones stay.
                return Err(NodeError::BadRequest(format!("{}: {e}", d.config.name)));
            }
        }
        let mut c = d.config.clone();
        c.location = stores.location(&to).map_err(disk_err)?;
        c.datastore = to;
        configs.push(c);
    }
    if let Some(from) = from
        && from != datastore
        && configs.iter().all(|c| c.datastore != from)
    {
        let (s, name) = (stores.clone(), config.name.clone());
        let _ = offload(move || {
            for p in s.list(&from, &name).unwrap_or_default() {
                let _ = s.remove(&from, &p);
            }
        })
        .await;
    }
    Ok((configs, reports))
}

async fn move_one(
    stores: &Arc<dyn Datastores>,
    d: &VmDisk,
    vm: &ractor::ActorRef<VmMsg>,
    datastore: &str,
    options: MoveOptions,
    reply: &mpsc::UnboundedSender<ClientReply>,
) -> Result<DiskMoveReport, String> {
    let method = options.method;
    let len = d.config.len_bytes;
    let target = LocalTarget::create(stores.clone(), datastore, &d.config.path, len)
        .await
        .map_err(|e| e.to_string())?;
    let to = DiskPlace {
        datastore: datastore.to_owned(),
        path: d.config.path.clone(),
    };
    disk::start_move(&d.actor, options, Box::new(target), to)
        .await
        .map_err(|e| e.to_string())?;
    let name = d.config.name.clone();
    let span = tracing::info_span!("storage.disk", disk = %name, to = %datastore);
    let copy_span = tracing::info_span!(parent: &span, "storage.copy");
    let copied = disk::copy_until_converged(&d.actor, 0, |p| {
        if let disk::CopyProgress::Copied { cursor, len, sent } = p {
            let _ = reply.send(ClientReply::Progress(Progress {
                pages_left: (len - cursor) / 4096,
                pages_total: len / 4096,
                ..Progress::phase(format!("{name} copy"))
            }));
            let _ = sent;
        }
    })
    .instrument(copy_span)
    .await;
    if let Err(e) = copied {
        let _ = disk::call(&d.actor, |reply| DiskMsg::Abort {
            reason: e.to_string(),
            reply,
        })
        .await;
        return Err(e.to_string());
    }
    // The last changes go under a pause of the vCPUs (a mirror has none
    // left, so its guest never stops).
    let pause = method != Method::Mirror;
    let final_span = tracing::info_span!(parent: &span, "storage.final", paused = pause);
    let finished = async {
        let was_running = with_guest(vm, |g| g.is_running()).await.unwrap_or(false);
        if pause && was_running {
            let _ = with_guest(vm, |g| g.pause()).await;
        }
        let finished = disk::call(&d.actor, DiskMsg::Finish).await.and_then(|r| r);
        if pause && was_running {
            let _ = with_guest(vm, |g| g.resume()).await;
        }
        finished
    }
    .instrument(final_span)
    .await;
    match finished {
        Ok(report) => {
            super::super::trace::set_attributes(
                &span,
                vec![
                    opentelemetry::KeyValue::new(
                        "copied_bytes",
                        i64::try_from(report.copied_bytes).unwrap_or(i64::MAX),
                    ),
                    opentelemetry::KeyValue::new("copy_mb_s", report.copy_mb_per_s),
                    opentelemetry::KeyValue::new("final_step_ms", report.pause_ms),
                ],
            );
            disk::call(&d.actor, DiskMsg::Commit)
                .await
                .and_then(|r| r)
                .map_err(|e| format!("deleting the source: {e}"))?;
            Ok(report)
        }
        Err(e) => {
            let _ = disk::call(&d.actor, |reply| DiskMsg::Abort {
                reason: e.to_string(),
                reply,
            })
            .await;
            Err(e.to_string())
        }
    }
}

/// Disks arriving with incoming migrations, by (peer, migration id).
pub type IncomingDisks = BTreeMap<(String, u64), Vec<Arc<IncomingDisk>>>;
