//! Operations on whole nodes over the in-memory transport: authorization
//! by certificate role, the job queue (priorities, budgets, start times,
//! cancel), a restart with a job pending, the audit log, placement, DRS,
//! batches, maintenance mode and the evacuation of a degraded host.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use ferry_actors::api::{BatchItem, ClientError, Cluster};
use ferry_actors::migration::Capacity;
use ferry_actors::node::NodeCtx;
use ferry_actors::node::client::{MigrateOptions, VmSpec};
use ferry_actors::node::factory::SyntheticFactory;
use ferry_actors::node::host::{HostMsg, start_host_with};
use ferry_actors::node::vm::VmPhase;
use ferry_actors::ops::audit::AuditQuery;
use ferry_actors::ops::jobs::{Budgets, Job, JobState, Priority};
use ferry_actors::ops::store::MemStore;
use ferry_actors::ops::unix_ms_now;
use ferry_actors::storage::datastore::{MemDatastores, MemStorage};
use ferry_transport::mem::{MemNetwork, MemTransport};
use ferry_transport::{PeerIdentity, Role};
use ractor::ActorRef;

struct Node {
    host: ActorRef<HostMsg<MemTransport>>,
    transport: Arc<MemTransport>,
    store: MemStore,
}

struct World {
    net: MemNetwork,
    storage: MemStorage,
    names: Vec<&'static str>,
    nodes: BTreeMap<&'static str, Node>,
    ops: Cluster<MemTransport>,
}

/// One life of a host.
struct Life {
    name: &'static str,
    memory_mib: u64,
    budgets: Budgets,
    store: MemStore,
    incarnation: u32,
    /// Capacity of its `local` datastore in MiB (0: the default).
    local_mib: u64,
}

async fn boot(
    w_net: &MemNetwork,
    storage: &MemStorage,
    names: &[&'static str],
    life: Life,
) -> Node {
    let Life {
        name,
        memory_mib,
        budgets,
        store,
        incarnation,
        local_mib,
    } = life;
    let transport = Arc::new(w_net.endpoint(PeerIdentity::new(name, Role::Host)));
    let peers = names
        .iter()
        .filter(|p| **p != name)
        .map(|p| ((*p).to_owned(), (*p).to_owned()))
        .collect();
    let ctx = Arc::new(NodeCtx::new(
        name.to_owned(),
        transport.clone(),
        peers,
        incarnation,
    ));
    let capacity = Capacity {
        memory_bytes: memory_mib << 20,
        vcpus: 16,
        cpu_features: BTreeSet::from(["sse2".to_owned()]),
        kvm: false,
    };
    let host = start_host_with(
        ctx,
        capacity,
        Arc::new(SyntheticFactory),
        Arc::new(if local_mib == 0 {
            MemDatastores::standard(storage.clone(), name)
        } else {
            MemDatastores::standard(storage.clone(), name).with_capacity("local", local_mib << 20)
        }),
        Arc::new(store.clone()),
        budgets,
    )
    .await
    .expect("host");
    Node {
        host,
        transport,
        store,
    }
}

fn client(net: &MemNetwork, names: &[&str], who: &str, role: Role) -> Cluster<MemTransport> {
    Cluster::new(
        Arc::new(net.endpoint(PeerIdentity::new(who, role))),
        names
            .iter()
            .map(|n| ((*n).to_owned(), (*n).to_owned()))
            .collect(),
    )
}

/// Hosts with their memory in MiB; every one gets `budgets`.
async fn world(hosts: &[(&'static str, u64)], budgets: Budgets) -> World {
    let net = MemNetwork::new();
    let storage = MemStorage::new();
    let names: Vec<&'static str> = hosts.iter().map(|h| h.0).collect();
    let mut nodes = BTreeMap::new();
    for (name, mem) in hosts {
        let life = Life {
            name,
            memory_mib: *mem,
            budgets,
            store: MemStore::new(),
            incarnation: 1,
            local_mib: 0,
        };
        let node = boot(&net, &storage, &names, life).await;
        nodes.insert(*name, node);
    }
    let ops = client(&net, &names, "alice", Role::Admin);
    World {
        net,
        storage,
        names,
        nodes,
        ops,
    }
}

fn spec(name: &str) -> VmSpec {
    VmSpec {
        linux: None,
        name: name.into(),
        memory_mib: 16,
        vcpus: 1,
        wss_mib: 2,
        synthetic: true,
        cpu_features: vec!["sse2".into()],
        disks: Vec::new(),
        disk_workload: false,
    }
}

async fn running_vm(w: &World, node: &str, name: &str) {
    w.ops.create_vm(node, spec(name)).await.expect("create");
    w.ops.vm(name).start().await.expect("start");
}

async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) {
    for _ in 0..400 {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn job_over(w: &World, node: &str, id: u64) -> Job {
    let mut found = None;
    wait_for(&format!("job {id} on {node}"), async || {
        let jobs = w.ops.jobs(node).await.expect("jobs");
        found = jobs.into_iter().find(|j| j.id == id && j.state.is_final());
        found.is_some()
    })
    .await;
    found.expect("found")
}

fn denied(r: Result<impl std::fmt::Debug, ClientError>, needle: &str) {
    match r {
        Err(ClientError::Node { reason, .. }) => {
            assert!(reason.contains("permission denied"), "{reason}");
            assert!(reason.contains(needle), "{reason}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_is_held_to_its_rights_and_refusals_are_audited() {
    let w = world(&[("a", 512), ("b", 512)], Budgets::default()).await;
    running_vm(&w, "a", "web").await;
    let viewer = client(&w.net, &w.names, "victor", Role::Viewer);
    let operator = client(&w.net, &w.names, "olga", Role::Operator);
    // A host certificate (of a host not in this cluster's list, so that
    // its endpoint does not replace b's on the in-memory network).
    let host_cert = client(&w.net, &w.names, "host-z", Role::Host);

    assert_eq!(viewer.list_vms("a").await.expect("viewers read").len(), 1);
    viewer.jobs("a").await.expect("viewers read jobs");
    denied(
        viewer.vm("web").migrate_to("b").await,
        "viewer may not migrate",
    );
    denied(viewer.cancel_job("a", 1).await, "needs operator");
    denied(operator.enter_maintenance("a").await, "needs admin");
    denied(
        host_cert.list_vms("a").await,
        "host certificate cannot act as a user",
    );
    denied(
        host_cert.create_vm("a", spec("x")).await,
        "host certificate",
    );
    host_cert
        .host_load("a")
        .await
        .expect("hosts may ask each other for their load");

    let refused = w
        .ops
        .audit(&AuditQuery::default())
        .await
        .expect("audit")
        .into_iter()
        .filter(|e| e.outcome == "refused")
        .collect::<Vec<_>>();
    let whos: BTreeSet<&str> = refused.iter().map(|e| e.who.as_str()).collect();
    assert!(whos.iter().any(|w| w.contains("victor")), "{refused:?}");
    assert!(whos.iter().any(|w| w.contains("olga")), "{refused:?}");
    let migrate = refused
        .iter()
        .find(|e| e.action == "migrate")
        .expect("the refused migration is audited");
    assert_eq!((migrate.vm.as_str(), migrate.to.as_str()), ("web", "b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_free_slot_goes_to_the_highest_priority_and_budgets_hold() {
    let budgets = Budgets {
        host_live: 1,
        ..Budgets::default()
    };
    let w = world(&[("a", 512), ("b", 512)], budgets).await;
    for vm in ["low", "normal", "high"] {
        running_vm(&w, "a", vm).await;
    }
    // All due at the same moment; one slot: they run one at a time, most
    // urgent first, whatever the order they were submitted in.
    let at = unix_ms_now() + 400;
    let mut ids = BTreeMap::new();
    for (vm, p) in [
        ("low", Priority::Low),
        ("normal", Priority::Normal),
        ("high", Priority::High),
    ] {
        let options = MigrateOptions {
            priority: p,
            ..MigrateOptions::default()
        };
        let (node, job) = w
            .ops
            .schedule_migration(vm, "b", at, options)
            .await
            .expect("queued");
        assert_eq!(node, "a");
        assert_eq!(job.state, JobState::Queued);
        ids.insert(vm, job.id);
    }
    let mut jobs = Vec::new();
    for vm in ["high", "normal", "low"] {
        let job = job_over(&w, "a", ids[vm]).await;
        assert_eq!(job.state, JobState::Done, "{job:?}");
        assert!(job.started_unix_ms >= at, "started early: {job:?}");
        jobs.push(job);
    }
    for pair in jobs.windows(2) {
        assert!(
            pair[1].started_unix_ms >= pair[0].ended_unix_ms,
            "one slot: {:?} overlapped {:?}",
            pair[1].vm,
            pair[0].vm
        );
    }
    assert_eq!(w.ops.locate("low").await.expect("moved"), "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_migration_survives_a_restart_of_its_node() {
    let mut w = world(&[("a", 512), ("b", 512)], Budgets::default()).await;
    running_vm(&w, "a", "db").await;
    let at = unix_ms_now() + 1_500;
    let (_, job) = w
        .ops
        .schedule_migration("db", "b", at, MigrateOptions::default())
        .await
        .expect("queued");

    // Power a off and boot it again on the same store, in its next life.
    let old = w.nodes.remove("a").expect("a");
    let _ = old.host.cast(HostMsg::PowerOff);
    old.transport.close();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let life = Life {
        name: "a",
        memory_mib: 512,
        budgets: Budgets::default(),
        store: old.store.clone(),
        incarnation: 2,
        local_mib: 0,
    };
    let a = boot(&w.net, &w.storage, &w.names.clone(), life).await;
    w.nodes.insert("a", a);
    let ops = client(&w.net, &w.names, "alice", Role::Admin);
    w.ops = ops;

    let back = w.ops.list_vms("a").await.expect("list");
    assert_eq!(back.len(), 1, "the inventory came back: {back:?}");
    assert_eq!(back[0].phase, VmPhase::Running, "and it runs again");
    let pending = w.ops.jobs("a").await.expect("jobs");
    assert!(
        pending
            .iter()
            .any(|j| j.id == job.id && j.state == JobState::Queued),
        "{pending:?}"
    );
    let done = job_over(&w, "a", job.id).await;
    assert_eq!(done.state, JobState::Done, "{done:?}");
    assert!(done.started_unix_ms >= at);
    assert_eq!(w.ops.locate("db").await.expect("db"), "b");
    let audit = w
        .ops
        .audit(&AuditQuery {
            vm: Some("db".into()),
            ..AuditQuery::default()
        })
        .await
        .expect("audit");
    let ran = audit
        .iter()
        .find(|e| e.who.starts_with("scheduler"))
        .expect("the unattended run is audited");
    assert_eq!(ran.outcome, "ok", "{ran:?}");
    assert!(ran.downtime_ms.is_some());
    assert!(ran.who.contains("alice"), "{ran:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_job_can_be_called_off_and_never_runs() {
    let w = world(&[("a", 512), ("b", 512)], Budgets::default()).await;
    running_vm(&w, "a", "web").await;
    let (node, job) = w
        .ops
        .schedule_migration("web", "b", unix_ms_now() + 300, MigrateOptions::default())
        .await
        .expect("queued");
    w.ops.cancel_job(&node, job.id).await.expect("cancel");
    let again = w.ops.cancel_job(&node, job.id).await;
    assert!(
        matches!(again, Err(ClientError::Node { ref reason, .. }) if reason.contains("over")),
        "{again:?}"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let jobs = w.ops.jobs("a").await.expect("jobs");
    assert_eq!(jobs[0].state, JobState::Cancelled);
    assert_eq!(w.ops.locate("web").await.expect("web"), "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_ranks_with_reasons_and_auto_takes_the_best() {
    let w = world(
        &[("a", 512), ("small", 64), ("big", 2048)],
        Budgets::default(),
    )
    .await;
    running_vm(&w, "a", "app").await;
    let ranked = w.ops.recommend("app", "").await.expect("recommend");
    assert_eq!(ranked.len(), 2, "{ranked:?}");
    assert_eq!(ranked[0].host, "big", "{ranked:?}");
    assert!(ranked[0].score > ranked[1].score);
    assert!(ranked[0].reasons.iter().any(|r| r.contains("link")));
    let report = w.ops.vm("app").migrate_to("auto").await.expect("auto");
    assert!(report.completed(), "{report:?}");
    assert_eq!(report.to, "big");
    let audit = w.ops.audit(&AuditQuery::default()).await.expect("audit");
    let m = audit
        .iter()
        .find(|e| e.action == "migrate" && e.outcome == "ok")
        .expect("the migration is audited");
    assert_eq!((m.from.as_str(), m.to.as_str()), ("a", "big"));
    assert!(m.who.contains("alice"), "{m:?}");
    assert!(m.downtime_ms.is_some() && m.duration_ms > 0, "{m:?}");
}

/// Most jobs of `jobs` running at one moment (each start is such a
/// moment).
fn most_at_once(jobs: &[Job]) -> usize {
    jobs.iter()
        .map(|j| {
            let t = j.started_unix_ms;
            jobs.iter()
                .filter(|o| o.started_unix_ms <= t && t < o.ended_unix_ms)
                .count()
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_mode_empties_the_host_within_its_budgets() {
    let budgets = Budgets {
        host_live: 2,
        link: 1,
        ..Budgets::default()
    };
    let w = world(&[("a", 512), ("b", 512), ("c", 512)], budgets).await;
    for i in 0..5 {
        running_vm(&w, "a", &format!("vm{i}")).await;
    }
    w.ops
        .vm("vm4")
        .stop()
        .await
        .expect("a stopped VM moves cold");
    let jobs = w.ops.enter_maintenance("a").await.expect("evacuate");
    assert_eq!(jobs.len(), 5);
    for j in &jobs {
        assert_eq!(j.state, JobState::Done, "{j:?}");
        assert_eq!(j.priority, Priority::High);
    }
    assert!(w.ops.list_vms("a").await.expect("list").is_empty());
    assert!(most_at_once(&jobs) <= 2, "host budget: {jobs:?}");
    for link in ["b", "c"] {
        let on_link: Vec<Job> = jobs.iter().filter(|j| j.to == link).cloned().collect();
        assert!(
            most_at_once(&on_link) <= 1,
            "link budget to {link}: {on_link:?}"
        );
    }
    // Where each VM went is placement's choice (link round-trips vary
    // under load); every one of them left a.
    assert!(jobs.iter().all(|j| j.to == "b" || j.to == "c"), "{jobs:?}");

    let refused = w.ops.create_vm("a", spec("new")).await;
    assert!(
        matches!(refused, Err(ClientError::Node { ref reason, .. }) if reason.contains("maintenance")),
        "{refused:?}"
    );
    let back = w.ops.vm("vm0").migrate_to("a").await.expect("report");
    assert!(!back.completed(), "a host in maintenance takes no VMs");
    w.ops.exit_maintenance("a").await.expect("exit");
    w.ops
        .create_vm("a", spec("new"))
        .await
        .expect("back in service");
    let audit = w.ops.audit(&AuditQuery::default()).await.expect("audit");
    assert_eq!(
        audit
            .iter()
            .filter(|e| e.who.starts_with("scheduler"))
            .count(),
        5,
        "each evacuation move is audited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_degraded_host_evacuates_itself() {
    let w = world(&[("a", 512), ("b", 512)], Budgets::default()).await;
    running_vm(&w, "a", "x").await;
    running_vm(&w, "a", "y").await;
    // The node's own health check reports it (no client involved).
    let _ = w.nodes["a"]
        .host
        .cast(HostMsg::Degraded("ECC errors on DIMM 3".into()));
    wait_for("a to be empty", async || {
        w.ops.list_vms("a").await.expect("list").is_empty()
    })
    .await;
    assert_eq!(w.ops.locate("x").await.expect("x"), "b");
    let load = w.ops.host_load("a").await.expect("load");
    assert_eq!(load.degraded, "ECC errors on DIMM 3");
    let healthy = w.ops.report_degraded("a", "").await.expect("healthy again");
    assert!(healthy.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drs_evens_out_the_load_and_a_batch_continues_past_failures() {
    let w = world(&[("a", 256), ("b", 256)], Budgets::default()).await;
    for i in 0..4 {
        running_vm(&w, "a", &format!("d{i}")).await;
    }
    let plan = w.ops.drs_plan(0.05, 10).await.expect("plan");
    assert_eq!(plan.moves.len(), 2, "{plan:?}");
    assert!(plan.imbalance_after < plan.imbalance_before);
    let results = w.ops.drs_apply(&plan, 2).await;
    assert!(results.iter().all(|r| r.moved()), "{results:?}");
    assert_eq!(w.ops.list_vms("b").await.expect("b").len(), 2);
    assert!(
        w.ops
            .drs_plan(0.05, 10)
            .await
            .expect("plan")
            .moves
            .is_empty()
    );

    let items = vec![
        BatchItem {
            vm: "d0".into(),
            to: "auto".into(),
        },
        BatchItem {
            vm: "nosuch".into(),
            to: "b".into(),
        },
        BatchItem {
            vm: "d1".into(),
            to: "auto".into(),
        },
    ];
    let mut seen = 0;
    let results = w
        .ops
        .migrate_batch(items, 2, &MigrateOptions::default(), |_| seen += 1)
        .await;
    assert_eq!(seen, 3);
    assert_eq!(results.len(), 3);
    assert!(results[0].moved() && results[2].moved(), "{results:?}");
    assert!(matches!(results[1].result, Err(ClientError::NoSuchVm(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_at_its_budget_turns_offers_away_and_the_sources_retry() {
    // b takes one migration at a time; a and c each send it a VM at once.
    let net = MemNetwork::new();
    let storage = MemStorage::new();
    let names = vec!["a", "b", "c"];
    let mut nodes = BTreeMap::new();
    for name in ["a", "b", "c"] {
        let budgets = if name == "b" {
            Budgets {
                host_live: 1,
                ..Budgets::default()
            }
        } else {
            Budgets::default()
        };
        let life = Life {
            name,
            memory_mib: 1024,
            budgets,
            store: MemStore::new(),
            incarnation: 1,
            local_mib: 0,
        };
        nodes.insert(name, boot(&net, &storage, &names, life).await);
    }
    let ops = client(&net, &names, "alice", Role::Admin);
    for (node, vm) in [("a", "big-a"), ("c", "big-c")] {
        let spec = VmSpec {
            memory_mib: 128,
            wss_mib: 8,
            ..spec(vm)
        };
        ops.create_vm(node, spec).await.expect("create");
        ops.vm(vm).start().await.expect("start");
    }
    let phases = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let watch = |vm: &'static str| {
        let phases = phases.clone();
        ops.vm(vm).migrate_to("b").lanes(2).on_progress(move |p| {
            phases
                .lock()
                .expect("lock")
                .push(format!("{vm}: {}", p.phase))
        })
    };
    let (ra, rc) = tokio::join!(watch("big-a"), watch("big-c"));
    for r in [ra, rc] {
        let report = r.expect("the migration runs, at once or after waiting");
        assert_eq!(report.outcome, ferry_actors::migration::Outcome::Completed);
    }
    let phases = phases.lock().expect("lock").clone();
    let waited: Vec<&String> = phases
        .iter()
        .filter(|p| p.contains("destination busy") && p.contains("at its migration budget"))
        .collect();
    assert!(
        !waited.is_empty(),
        "one source was turned away and waited: {phases:?}"
    );
    let vms = ops.list_vms("b").await.expect("list");
    assert_eq!(vms.iter().filter(|v| v.running).count(), 2, "{vms:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_is_called_off_through_its_migration() {
    let w = world(&[("a", 2048), ("b", 2048)], Budgets::default()).await;
    // A guest that writes faster than it can converge to a 1 ms downtime:
    // its pre-copy goes on until its time limit, or until called off.
    let busy = VmSpec {
        memory_mib: 256,
        wss_mib: 192,
        ..spec("busy")
    };
    w.ops.create_vm("a", busy).await.expect("create");
    w.ops.vm("busy").start().await.expect("start");
    let options = MigrateOptions {
        downtime_ms: 1,
        auto_converge: false,
        time_limit_s: 60,
        ..MigrateOptions::default()
    };
    let (node, job) = w
        .ops
        .schedule_migration("busy", "b", 0, options)
        .await
        .expect("queued");
    wait_for("the job's migration to start", async || {
        let jobs = w.ops.jobs(&node).await.expect("jobs");
        jobs.iter()
            .any(|j| j.id == job.id && j.state == JobState::Running && j.migration_id != 0)
    })
    .await;
    if let Err(e) = w.ops.cancel_job(&node, job.id).await {
        let jobs = w.ops.jobs(&node).await.expect("jobs");
        panic!("cancel: {e:?}; {jobs:#?}");
    }
    let over = job_over(&w, &node, job.id).await;
    assert_eq!(over.state, JobState::Cancelled, "{over:?}");
    assert!(over.result.contains("cancelled"), "{}", over.result);
    assert_eq!(w.ops.locate("busy").await.expect("busy"), "a");
    let vms = w.ops.list_vms("a").await.expect("list");
    assert!(vms.iter().any(|v| v.name == "busy" && v.running), "{vms:?}");
    assert!(w.ops.list_vms("b").await.expect("list").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_migration_leaves_the_job_running_and_audited() {
    let w = world(&[("a", 1024), ("b", 1024)], Budgets::default()).await;
    let big = VmSpec {
        memory_mib: 128,
        wss_mib: 16,
        ..spec("big")
    };
    w.ops.create_vm("a", big).await.expect("create");
    w.ops.vm("big").start().await.expect("start");
    let (first_progress, progress_seen) = tokio::sync::oneshot::channel::<()>();
    let mut first_progress = Some(first_progress);
    let migrate = w
        .ops
        .vm("big")
        .migrate_to("b")
        .lanes(1)
        .on_progress(move |_| {
            if let Some(tx) = first_progress.take() {
                let _ = tx.send(());
            }
        });
    // The client goes away once the migration is under way.
    tokio::select! {
        r = migrate => panic!("the client stayed to the end: {r:?}"),
        _ = progress_seen => {}
    }
    let job = job_over(&w, "a", 1).await;
    assert_eq!(job.state, JobState::Done, "{job:?}");
    assert_eq!(w.ops.locate("big").await.expect("big"), "b");
    let mut log = Vec::new();
    wait_for("the audit entries", async || {
        log = w
            .ops
            .audit(&AuditQuery {
                vm: Some("big".into()),
                ..AuditQuery::default()
            })
            .await
            .expect("audit")
            .into_iter()
            .filter(|e| e.action == "migrate")
            .collect();
        log.len() >= 2
    })
    .await;
    let left = log
        .iter()
        .find(|e| e.outcome == "left")
        .expect("the client's entry");
    assert!(left.who.contains("alice"), "{left:?}");
    let end = log
        .iter()
        .find(|e| e.who.starts_with("scheduler (job 1 for"))
        .expect("the scheduler's entry");
    assert_eq!(end.outcome, "ok", "{end:?}");
    assert!(end.downtime_ms.is_some(), "{end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_drs_moves_disks_off_a_full_datastore_and_then_rests() {
    // a's `local` holds 64 MiB; three VMs put 3 x 20 MiB of disk on it
    // (94% full, over the 80% line).
    let net = MemNetwork::new();
    let storage = MemStorage::new();
    let names = vec!["a"];
    let life = Life {
        name: "a",
        memory_mib: 1024,
        budgets: Budgets::default(),
        store: MemStore::new(),
        incarnation: 1,
        local_mib: 64,
    };
    let _a = boot(&net, &storage, &names, life).await;
    let ops = client(&net, &names, "alice", Role::Admin);
    for vm in ["s1", "s2", "s3"] {
        let spec = VmSpec {
            disks: vec![ferry_actors::node::client::DiskSpec {
                size_mib: 20,
                datastore: "local".into(),
            }],
            disk_workload: true,
            ..spec(vm)
        };
        ops.create_vm("a", spec).await.expect("create");
        ops.vm(vm).start().await.expect("start");
    }
    let rules = ferry_actors::ops::sdrs::StorageRules::default();
    let plans = ops.storage_drs_plan(Some("a"), rules).await.expect("plan");
    let plan = &plans[0];
    assert_eq!(plan.moves.len(), 1, "{plan:#?}");
    let m = &plan.moves[0];
    assert_eq!(m.from, "local");
    assert!(m.reason.contains("full"), "{}", m.reason);
    let results = ops.storage_drs_apply(plan, |_, _| {}).await;
    assert!(results.iter().all(|(_, r)| r.is_ok()), "{results:?}");
    // The disk is on its new datastore, every acknowledged write on it.
    let disks = ops.vm(&m.vm).disks(true).await.expect("disks");
    assert_eq!(disks[0].datastore, m.to, "{disks:?}");
    assert!(disks[0].verify_error.is_none(), "{disks:?}");
    let load = ops.host_load("a").await.expect("load");
    let local = load
        .datastore_space
        .iter()
        .find(|d| d.name == "local")
        .expect("local");
    assert!(local.fill() <= 0.8, "{local:?}");
    let again = ops.storage_drs_plan(Some("a"), rules).await.expect("plan");
    assert!(again[0].moves.is_empty(), "{again:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drs_counts_guest_cpu_time() {
    // a has two busy guests; b three idle ones: by memory and vCPUs b is
    // the fuller host, by the time its guests use a is.
    let w = world(&[("a", 1024), ("b", 1024)], Budgets::default()).await;
    let guests = [
        ("a", "busy-1", 4),
        ("a", "busy-2", 4),
        ("b", "idle-1", 0),
        ("b", "idle-2", 0),
        ("b", "idle-3", 0),
    ];
    for (node, vm, wss) in guests {
        let spec = VmSpec {
            wss_mib: wss,
            ..spec(vm)
        };
        w.ops.create_vm(node, spec).await.expect("create");
        w.ops.vm(vm).start().await.expect("start");
    }
    // Two looks a window apart give the rates.
    w.ops.loads().await.expect("loads");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let loads = w.ops.loads().await.expect("loads");
    let a = loads.iter().find(|l| l.name == "a").expect("a");
    let b = loads.iter().find(|l| l.name == "b").expect("b");
    for v in &a.vms {
        assert!(v.cpu_busy_milli > 500, "{v:?}");
    }
    for v in &b.vms {
        assert_eq!(v.cpu_busy_milli, 0, "{v:?}");
    }
    let static_share =
        |h: &ferry_actors::ops::placement::HostLoad| h.memory_fraction() + h.vcpu_fraction();
    assert!(static_share(b) > static_share(a));
    assert!(
        ferry_actors::ops::drs::load(a) > ferry_actors::ops::drs::load(b),
        "CPU time makes a the busier host"
    );
    // So DRS never moves an idle guest onto a.
    let plan = w.ops.drs_plan(0.01, 4).await.expect("plan");
    assert!(plan.moves.iter().all(|m| m.from == "a"), "{plan:#?}");
}
