//! A VM's disks on this host, and what a VM migration does with them:
//! copy them to the destination's datastore (shared-nothing migration,
//! one switchover for memory and disks), or, where both hosts share the
//! datastore, only hand their locks over.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ferry_transport::Connection;
use ractor::{Actor, ActorRef};

use super::disk::{self, DiskActor, DiskArgs, DiskMsg, DiskPlace};
use super::open_stream;
use super::source::{Redial, SourcePump};
use crate::disk::{SharedDisk, shared};
use crate::migration::StreamIntro;
use crate::migration::wire::{DiskConfig, StorageMove};
use crate::storage::datastore::Datastores;
use crate::storage::pattern::{PATTERN_BLOCK_BYTES, WritePattern};
use crate::storage::remote::{DiskOpen, HomeFile, OpenDiskStream, RemoteTarget};
use crate::storage::{DiskMoveReport, MoveOptions};

/// How often the synthetic disk workload writes.
pub const WORKLOAD_GAP: std::time::Duration = std::time::Duration::from_millis(2);

/// One disk of a VM.
#[derive(Clone)]
pub struct VmDisk {
    /// Its definition (where it is now).
    pub config: DiskConfig,
    /// Its actor.
    pub actor: ActorRef<DiskMsg>,
    /// The synthetic workload's last acknowledged write.
    pub acked: Arc<AtomicU64>,
    /// The guest's own disk device writes the workload (KVM test guest),
    /// not the disk actor.
    pub guest_driven: bool,
}

/// Spawns the actor for an open disk.
pub async fn spawn_disk(
    config: DiskConfig,
    disk: SharedDisk,
    stores: Arc<dyn Datastores>,
    acked: u64,
) -> Result<VmDisk, String> {
    let acked = Arc::new(AtomicU64::new(acked));
    let (actor, _) = Actor::spawn(
        None,
        DiskActor,
        DiskArgs {
            name: config.name.clone(),
            disk,
            place: DiskPlace {
                datastore: config.datastore.clone(),
                path: config.path.clone(),
            },
            stores,
            workload_acked: acked.clone(),
        },
    )
    .await
    .map_err(|e| format!("disk actor: {e}"))?;
    Ok(VmDisk {
        config,
        actor,
        acked,
        guest_driven: false,
    })
}

/// Connects the guest's disks: a guest with virtio block devices (a Linux
/// guest) gets a port onto each disk actor, in the VM's disk order, and
/// drives its disks itself; otherwise the guest's disk device (if it has
/// one: the KVM test guest) writes the pattern to its first disk when
/// that disk runs the workload.
pub async fn attach_to_guest(vm: &ActorRef<super::vm::VmMsg>, disks: &mut [VmDisk]) {
    let ports: Vec<Arc<dyn crate::disk::DiskPort>> = disks
        .iter()
        .map(|d| -> Arc<dyn crate::disk::DiskPort> {
            Arc::new(disk::PatternPort {
                inner: disk::ActorDiskPort(d.actor.clone()),
                pattern: WritePattern::new(d.config.len_bytes.max(PATTERN_BLOCK_BYTES)),
            })
        })
        .collect();
    if !ports.is_empty() {
        match super::vm::with_guest(vm, move |g| g.connect_block_devices(ports)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => {
                for d in disks.iter_mut().take(n) {
                    d.guest_driven = true;
                }
                return;
            }
            Ok(Err(e)) => tracing::warn!("connecting the guest's virtio disks: {e}"),
            Err(e) => tracing::warn!("connecting the guest's virtio disks: {e}"),
        }
    }
    let Some(d) = disks.first_mut().filter(|d| d.config.workload) else {
        return;
    };
    let pattern = WritePattern::new(d.config.len_bytes);
    let port: Arc<dyn crate::disk::DiskPort> = Arc::new(disk::ActorDiskPort(d.actor.clone()));
    let (blocks, stride) = (pattern.blocks(), pattern.stride());
    match super::vm::with_guest(vm, move |g| g.attach_disk(port, blocks, stride)).await {
        Ok(Ok(driven)) => d.guest_driven = driven,
        Ok(Err(e)) => tracing::warn!(disk = %d.config.name, "attaching the guest's disk: {e}"),
        Err(e) => tracing::warn!(disk = %d.config.name, "attaching the guest's disk: {e}"),
    }
}

/// Opens `config`'s disk (taking its lock) and spawns its actor. A disk
/// with the synthetic workload continues from the newest pattern write on
/// it (writes are durable before they are acknowledged, so that is the
/// last acknowledged one).
pub async fn open_disk(config: DiskConfig, stores: Arc<dyn Datastores>) -> Result<VmDisk, String> {
    let (s, c) = (stores.clone(), config.clone());
    let (disk, acked) = super::offload(move || {
        let mut d = s.open_disk(&c.datastore, &c.path)?;
        super::overlay::recover(s.as_ref(), &c.datastore, &c.path, d.as_mut())?;
        let acked = if c.workload {
            newest_pattern_write(d.as_ref())?
        } else {
            0
        };
        Ok::<_, crate::disk::DiskError>((d, acked))
    })
    .await
    .map_err(|e| format!("opening {}:{}: {e}", config.datastore, config.path))?;
    spawn_disk(config, shared(disk), stores, acked).await
}

fn newest_pattern_write(
    disk: &dyn crate::disk::BlockBackend,
) -> Result<u64, crate::disk::DiskError> {
    let pattern = WritePattern::new(disk.len_bytes());
    let mut buf = vec![0u8; crate::disk::to_usize(PATTERN_BLOCK_BYTES)];
    let mut newest = 0;
    for r in disk.allocated()? {
        let mut at = r.start.div_ceil(PATTERN_BLOCK_BYTES) * PATTERN_BLOCK_BYTES;
        while at + PATTERN_BLOCK_BYTES <= r.end {
            disk.read_at(at, &mut buf)?;
            newest = newest.max(pattern.decode(at / PATTERN_BLOCK_BYTES, &buf));
            at += PATTERN_BLOCK_BYTES;
        }
    }
    Ok(newest)
}

/// A VM's disks during its migration away (the pump's side).
pub struct MigratingDisks<C: Connection> {
    /// The disks.
    pub disks: Vec<VmDisk>,
    /// Where they go, if they move.
    pub storage: Option<StorageMove>,
    /// The VM's home files, written first on the destination.
    pub home: Vec<HomeFile>,
    /// This host's datastores.
    pub stores: Arc<dyn Datastores>,
    /// The link to the destination, and how to dial it again.
    pub conn: C,
    /// Dials again.
    pub redial: Redial<C>,
    /// Asks the host to reopen the disks (the migration failed after
    /// their locks were handed over).
    pub reopen: Box<dyn Fn() + Send>,
    released: bool,
}

impl<C: Connection> MigratingDisks<C> {
    /// The disks of a VM leaving for another host.
    pub fn new(
        disks: Vec<VmDisk>,
        storage: Option<StorageMove>,
        home: Vec<HomeFile>,
        stores: Arc<dyn Datastores>,
        conn: C,
        redial: Redial<C>,
        reopen: Box<dyn Fn() + Send>,
    ) -> Self {
        Self {
            disks,
            storage,
            home,
            stores,
            conn,
            redial,
            reopen,
            released: false,
        }
    }

    /// Opens each disk's copy on the peer and starts the copies; a task
    /// tells `pump` when every copy has converged.
    pub async fn start(
        &mut self,
        peer: &str,
        (migration_id, stream_priority): (u64, i32),
        pump: ActorRef<SourcePump>,
    ) -> Result<(), String> {
        let Some(storage) = self.storage.clone() else {
            return Ok(());
        };
        let conn = self.conn.clone();
        let redial = self.redial.clone();
        let dial: OpenDiskStream<C> = Arc::new(move || {
            let (conn, redial) = (conn.clone(), redial.clone());
            Box::pin(async move {
                let intro = StreamIntro::Disk { migration_id };
                let (mut writer, reader) = match open_stream(&conn, &intro).await {
                    Ok(s) => s,
                    Err(_) => open_stream(&redial().await?, &intro).await?,
                };
                // Bulk data, like the memory lanes: under the control
                // streams, in the migration's priority.
                writer.set_priority(stream_priority);
                Ok((writer, reader))
            })
        });
        for (i, d) in self.disks.iter().enumerate() {
            let len = disk::call(&d.actor, DiskMsg::Info)
                .await
                .map_err(|e| e.to_string())?
                .len;
            let ds = storage.datastore_for(&d.config.name).to_owned();
            let open = DiskOpen {
                migration_id,
                disk: d.config.name.clone(),
                len,
                datastore: ds.clone(),
                path: d.config.path.clone(),
                home: if i == 0 {
                    self.home.clone()
                } else {
                    Vec::new()
                },
            };
            let (target, _) = RemoteTarget::<C>::open(peer, open, dial.clone(), d.acked.clone())
                .await
                .map_err(|e| format!("disk {}: {e}", d.config.name))?;
            let to = DiskPlace {
                datastore: ds,
                path: d.config.path.clone(),
            };
            let mut options = MoveOptions::new(storage.method);
            options.rate_bytes_per_sec = storage.rate_mb_per_s * 1_000_000;
            disk::start_move(&d.actor, options, Box::new(target), to)
                .await
                .map_err(|e| format!("disk {}: {e}", d.config.name))?;
        }
        let actors: Vec<(String, ActorRef<DiskMsg>)> = self
            .disks
            .iter()
            .map(|d| (d.config.name.clone(), d.actor.clone()))
            .collect();
        tokio::spawn(async move {
            for (name, actor) in actors {
                if let Err(e) = disk::copy_until_converged(&actor, 5, |_| {}).await {
                    let _ = pump.cast(SourcePump::Failed(format!("disk {name}: {e}")));
                    return;
                }
            }
            let _ = pump.cast(SourcePump::StorageConverged);
        });
        Ok(())
    }

    /// Under the pause: the disks' last changes, durable on the peer.
    pub async fn finish(&mut self) -> Result<Vec<DiskMoveReport>, String> {
        let mut reports = Vec::new();
        for d in &self.disks {
            let r = disk::call(&d.actor, DiskMsg::Finish)
                .await
                .and_then(|r| r)
                .map_err(|e| format!("disk {}: {e}", d.config.name))?;
            reports.push(r);
        }
        Ok(reports)
    }

    /// Ownership goes: disks on a shared datastore close, so the
    /// destination can take their locks.
    pub async fn release(&mut self) {
        if self.storage.is_none() {
            for d in &self.disks {
                let _ = disk::call(&d.actor, DiskMsg::Release).await;
            }
            self.released = !self.disks.is_empty();
        }
    }

    /// The migration failed: the disks are the source's again.
    pub async fn abort(&mut self, reason: &str) {
        if self.storage.is_some() {
            for d in &self.disks {
                let _ = disk::call(&d.actor, |reply| DiskMsg::Abort {
                    reason: reason.to_owned(),
                    reply,
                })
                .await;
            }
        }
        if self.released {
            self.released = false;
            (self.reopen)();
        }
    }

    /// The destination runs the VM: moved disks' sources (and the VM's
    /// old home) are deleted.
    pub async fn commit(&mut self) {
        if self.storage.is_none() {
            return;
        }
        for d in &self.disks {
            if let Err(e) = disk::call(&d.actor, DiskMsg::Commit).await.and_then(|r| r) {
                tracing::warn!(disk = %d.config.name, "deleting the source disk: {e}");
            }
        }
        if let Some(first) = self.disks.first() {
            let stores = self.stores.clone();
            let ds = first.config.datastore.clone();
            let home: Vec<String> = self.home.iter().map(|h| h.path.clone()).collect();
            let _ = super::offload(move || {
                for p in home {
                    let _ = stores.remove(&ds, &p);
                }
            })
            .await;
        }
    }

    /// The synthetic workload's position on every disk.
    pub fn acked(&self) -> Vec<u64> {
        self.disks
            .iter()
            .map(|d| d.acked.load(Ordering::SeqCst))
            .collect()
    }
}
