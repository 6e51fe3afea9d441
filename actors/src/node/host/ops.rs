//! The host's side of operations: its load, placement over the peers'
//! loads, maintenance mode and evacuation, and the [`JobRunner`] the
//! scheduler starts migrations through.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_transport::{FrameKind, Transport};
use ractor::ActorRef;
use tokio::sync::{mpsc, oneshot};

use super::{HostMsg, HostState};
use crate::migration::{StreamIntro, VmConfig};
use crate::node::client::{ClientReply, ClientRequest, MigrateOptions};
use crate::node::disk::DiskMsg;
use crate::node::scheduler::{BoxFuture, JobRunner, SchedulerMsg};
use crate::node::vm::VmMsg;
use crate::node::{NodeCtx, open_stream};
use crate::ops::jobs::{Footprint, Job, JobState, Priority};
use crate::ops::placement::{HostLoad, HostScore, VmLoad, VmNeeds, best, rank};
use crate::ops::sdrs::{DatastoreSpace, DiskLoad};
use crate::ops::store::{SETTING_DEGRADED, SETTING_MAINTENANCE};
use crate::ops::unix_ms_now;

/// This host's load now: its VMs with their CPU and disk write rates
/// since the last look, and its datastores' space.
pub(super) async fn load<T: Transport>(s: &HostState<T>) -> HostLoad {
    let used = s.usage();
    let now = crate::node::now();
    let mut vms = Vec::new();
    let mut keys = std::collections::BTreeSet::new();
    for entry in s.vms.values() {
        let Some(actor) = &entry.actor else {
            continue;
        };
        let (running, cpu_ms, crashed) = match actor.call(VmMsg::Info, None).await {
            Ok(ractor::rpc::CallResult::Success(i)) => (i.running, i.cpu_ms, i.crashed),
            _ => (false, 0, String::new()),
        };
        let name = &entry.config.name;
        let cpu_key = format!("cpu {name}");
        // CPU ms per second = thousandths of a vCPU busy.
        let busy = rate(s, &cpu_key, now, cpu_ms);
        keys.insert(cpu_key);
        let mut disks = Vec::new();
        for d in &entry.disks {
            let activity = crate::node::disk::call(&d.actor, DiskMsg::Writes)
                .await
                .unwrap_or_default();
            let key = format!("disk {name}/{}", d.config.name);
            let per_s = rate(s, &key, now, activity.writes);
            keys.insert(key);
            disks.push(DiskLoad {
                vm: name.clone(),
                name: d.config.name.clone(),
                datastore: d.config.datastore.clone(),
                bytes: d.config.len_bytes,
                writes_per_s: as_u32(per_s),
                failing: activity.failing.unwrap_or_default(),
            });
        }
        let mut disk_locations: Vec<String> = entry
            .config
            .disks
            .iter()
            .map(|d| d.location.clone())
            .collect();
        disk_locations.dedup();
        vms.push(VmLoad {
            name: name.clone(),
            memory_bytes: entry.config.memory_bytes,
            vcpus: entry.config.vcpus,
            running,
            cpu_features: entry.config.cpu_features.clone(),
            disk_locations,
            cpu_busy_milli: as_u32(busy),
            disks,
            crashed,
        });
    }
    s.rates
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .retain(|k| keys.contains(k));
    let stores = s.stores.clone();
    let datastore_space = crate::node::offload(move || {
        stores
            .names()
            .into_iter()
            .filter_map(|n| {
                let location = stores.location(&n).ok()?;
                let (used_bytes, capacity_bytes) = stores.space(&n).ok()?;
                Some(DatastoreSpace {
                    name: n,
                    location,
                    used_bytes,
                    capacity_bytes,
                })
            })
            .collect::<Vec<_>>()
    })
    .await;
    HostLoad {
        name: s.ctx.name.clone(),
        memory_total: s.capacity.memory_bytes,
        memory_used: used.memory_bytes,
        vcpus_total: s.capacity.vcpus,
        vcpus_used: used.vcpus,
        cpu_features: s.capacity.cpu_features.iter().cloned().collect(),
        datastores: datastore_space
            .iter()
            .map(|d| (d.name.clone(), d.location.clone()))
            .collect(),
        migrations_out: u32::try_from(s.running.len()).unwrap_or(u32::MAX),
        migrations_in: u32::try_from(s.incoming.len()).unwrap_or(u32::MAX),
        maintenance: s.maintenance,
        degraded: s.degraded.clone(),
        vms,
        datastore_space,
    }
}

fn rate<T: Transport>(s: &HostState<T>, key: &str, now: std::time::Instant, count: u64) -> f64 {
    s.rates
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .observe(key, now, count)
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // clamped first
fn as_u32(x: f64) -> u32 {
    x.round().clamp(0.0, f64::from(u32::MAX)) as u32
}

/// The peers' loads with the round-trip of asking each; a peer that does
/// not answer is listed with why.
pub(super) async fn peer_loads<T: Transport>(
    ctx: &Arc<NodeCtx<T>>,
) -> (Vec<(HostLoad, f64)>, Vec<(String, String)>) {
    let (mut loads, mut failed) = (Vec::new(), Vec::new());
    for peer in ctx.peers.keys() {
        match tokio::time::timeout(Duration::from_secs(5), ask_load(ctx, peer)).await {
            Ok(Ok(l)) => loads.push(l),
            Ok(Err(e)) => failed.push((peer.clone(), e)),
            Err(_) => failed.push((peer.clone(), "no answer in 5 s".into())),
        }
    }
    (loads, failed)
}

async fn ask_load<T: Transport>(
    ctx: &Arc<NodeCtx<T>>,
    peer: &str,
) -> Result<(HostLoad, f64), String> {
    let conn = ctx.link(peer).await.map_err(|e| e.to_string())?;
    let asked = Instant::now();
    let (mut writer, mut reader) = open_stream(&conn, &StreamIntro::Client).await?;
    writer
        .send_message(FrameKind::Control, &ClientRequest::HostLoad)
        .await
        .map_err(|e| e.to_string())?;
    let reply = reader
        .read_message::<ClientReply>(FrameKind::Control)
        .await
        .map_err(|e| e.to_string())?;
    let rtt_ms = asked.elapsed().as_secs_f64() * 1000.0;
    let _ = writer.finish();
    match reply {
        ClientReply::Load(l) => Ok((l, rtt_ms)),
        ClientReply::Error(e) => Err(e),
        other => Err(format!("unexpected answer {other:?}")),
    }
}

/// Ranks the peers for `config` (disks moving to `datastore`, or staying).
pub(super) async fn recommend<T: Transport>(
    ctx: &Arc<NodeCtx<T>>,
    config: &VmConfig,
    datastore: &str,
) -> Vec<HostScore> {
    let (loads, failed) = peer_loads(ctx).await;
    let mut ranked = rank(&VmNeeds::of(config, datastore), &ctx.name, &loads);
    ranked.extend(failed.into_iter().map(|(host, why)| HostScore {
        host,
        score: None,
        reasons: vec![format!("unreachable: {why}")],
    }));
    ranked
}

/// Puts the host in or out of service and, going out, queues a
/// migration of every VM to the best host, at high priority.
pub(super) async fn set_service<T: Transport>(
    s: &mut HostState<T>,
    maintenance: Option<bool>,
    degraded: Option<String>,
    who: &str,
    reply: mpsc::UnboundedSender<ClientReply>,
) {
    if let Some(m) = maintenance {
        s.maintenance = m;
        setting(s, SETTING_MAINTENANCE, if m { "1" } else { "" });
    }
    if let Some(d) = degraded {
        s.degraded = d;
        setting(s, SETTING_DEGRADED, &s.degraded.clone());
    }
    if !s.maintenance && s.degraded.is_empty() {
        tracing::info!(host = %s.ctx.name, "back in service");
        let _ = reply.send(ClientReply::Ok);
        return;
    }
    tracing::warn!(host = %s.ctx.name, maintenance = s.maintenance, degraded = %s.degraded, "out of service: evacuating");
    let jobs = evacuation_jobs(s, who).await;
    match &s.scheduler {
        Some(scheduler) => {
            let _ = scheduler.cast(SchedulerMsg::Evacuate { jobs, reply });
        }
        None => {
            let _ = reply.send(ClientReply::Error("the scheduler is not running".into()));
        }
    }
}

fn setting<T: Transport>(s: &HostState<T>, key: &str, value: &str) {
    if let Err(e) = s.store.set_setting(key, value) {
        tracing::error!("storing setting {key}: {e}");
    }
}

async fn evacuation_jobs<T: Transport>(s: &HostState<T>, who: &str) -> Vec<Job> {
    let mut jobs = Vec::new();
    for e in s.vms.values().filter(|e| e.leaving.is_none()) {
        let Some(actor) = &e.actor else {
            continue;
        };
        // A stopped VM moves cold.
        let running = matches!(
            actor.call(VmMsg::Info, None).await,
            Ok(ractor::rpc::CallResult::Success(ref i)) if i.running
        );
        jobs.push(Job {
            id: 0,
            vm: e.config.name.clone(),
            to: "auto".into(),
            options: MigrateOptions {
                priority: Priority::High,
                cold: !running,
                ..MigrateOptions::default()
            },
            priority: Priority::High,
            not_before_unix_ms: 0,
            submitted_unix_ms: unix_ms_now(),
            submitted_by: format!("evacuation of {} by {who}", s.ctx.name),
            state: JobState::Queued,
            started_unix_ms: 0,
            ended_unix_ms: 0,
            migration_id: 0,
            result: String::new(),
        });
    }
    jobs
}

/// The scheduler's way into its host.
pub(super) struct HostRunner<T: Transport> {
    pub(super) host: ActorRef<HostMsg<T>>,
    pub(super) ctx: Arc<NodeCtx<T>>,
}

impl<T: Transport> JobRunner for HostRunner<T> {
    fn prepare(&self, job: &Job) -> BoxFuture<Result<Footprint, String>> {
        let (host, ctx, job) = (self.host.clone(), self.ctx.clone(), job.clone());
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            host.cast(HostMsg::JobFacts {
                vm: job.vm.clone(),
                reply: tx,
            })
            .map_err(|_| "the host actor is gone".to_owned())?;
            let config = rx
                .await
                .map_err(|_| "the host actor is gone".to_owned())??;
            let to = if job.to == "auto" {
                let (loads, _) = peer_loads(&ctx).await;
                best(
                    &VmNeeds::of(&config, &job.options.datastore),
                    &ctx.name,
                    &loads,
                )?
            } else {
                job.to.clone()
            };
            Ok(footprint(&ctx.name, &config, &to, &job.options))
        })
    }

    fn run(
        &self,
        job: &Job,
        replies: mpsc::UnboundedSender<ClientReply>,
    ) -> BoxFuture<Result<u64, String>> {
        let host = self.host.clone();
        let job = Box::new(job.clone());
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            host.cast(HostMsg::RunJob {
                job,
                replies,
                started: tx,
            })
            .map_err(|_| "the host actor is gone".to_owned())?;
            rx.await.map_err(|_| "the host actor is gone".to_owned())?
        })
    }

    fn cancel(&self, migration_id: u64, who: String, reply: mpsc::UnboundedSender<ClientReply>) {
        let _ = self.host.cast(HostMsg::Cancel {
            id: migration_id,
            who,
            reply,
        });
    }
}

/// What a migration of `config` from `host` to `to` holds.
fn footprint(host: &str, config: &VmConfig, to: &str, options: &MigrateOptions) -> Footprint {
    let storage = !options.datastore.is_empty();
    let mut datastores = Vec::new();
    if storage {
        for d in &config.disks {
            datastores.push(format!("{host}:{}", d.datastore));
        }
        datastores.push(format!("{to}:{}", options.datastore));
        for (_, ds) in &options.disk_datastores {
            datastores.push(format!("{to}:{ds}"));
        }
        datastores.sort();
        datastores.dedup();
    }
    Footprint {
        link: to.to_owned(),
        storage,
        datastores,
    }
}
