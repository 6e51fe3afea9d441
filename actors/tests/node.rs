//! Whole nodes (host, VM and migration actors) over the in-memory
//! transport with synthetic guests: the production protocol code end to
//! end, without KVM or QUIC (`host/tests/` runs those).

use ferry_actors::storage::datastore::{MemDatastores, MemStorage};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use ferry_actors::api::{ClientError, Cluster};
use ferry_actors::migration::{Capacity, Outcome};
use ferry_actors::node::NodeCtx;
use ferry_actors::node::client::{DiskSpec, VmSpec};
use ferry_actors::node::factory::SyntheticFactory;
use ferry_actors::node::host::start_host;
use ferry_actors::node::vm::VmPhase;
use ferry_actors::storage::Method;
use ferry_transport::mem::{MemNetwork, MemTransport};
use ferry_transport::{Connection, PeerIdentity, Role};

struct Node {
    ctx: Arc<NodeCtx<MemTransport>>,
}

async fn node(
    net: &MemNetwork,
    name: &str,
    peers: &[&str],
    memory_mib: u64,
    features: &[&str],
    storage: &MemStorage,
) -> Node {
    let transport = Arc::new(net.endpoint(PeerIdentity::new(name, Role::Host)));
    let peers: BTreeMap<String, String> = peers
        .iter()
        .map(|p| ((*p).to_owned(), (*p).to_owned()))
        .collect();
    let ctx = Arc::new(NodeCtx::new(name.to_owned(), transport, peers, 1));
    let capacity = Capacity {
        memory_bytes: memory_mib << 20,
        vcpus: 8,
        cpu_features: features
            .iter()
            .map(|s| (*s).to_owned())
            .collect::<BTreeSet<_>>(),
        kvm: false,
    };
    let stores = MemDatastores::standard(storage.clone(), name);
    start_host(
        ctx.clone(),
        capacity,
        Arc::new(SyntheticFactory),
        Arc::new(stores),
    )
    .await
    .expect("host");
    Node { ctx }
}

struct World {
    a: Node,
    cluster: Cluster<MemTransport>,
    storage: MemStorage,
}

async fn world(b_memory_mib: u64, b_features: &[&str]) -> World {
    let net = MemNetwork::new();
    let storage = MemStorage::new();
    let a = node(&net, "a", &["b"], 1024, &["sse2", "avx512f"], &storage).await;
    let _b = node(&net, "b", &["a"], b_memory_mib, b_features, &storage).await;
    let client = Arc::new(net.endpoint(PeerIdentity::new("ops", Role::Operator)));
    let cluster = Cluster::new(
        client,
        vec![("a".into(), "a".into()), ("b".into(), "b".into())],
    );
    World {
        a,
        cluster,
        storage,
    }
}

fn spec(name: &str, memory_mib: u64, wss_mib: u64, features: &[&str]) -> VmSpec {
    VmSpec {
        linux: None,
        name: name.into(),
        memory_mib,
        vcpus: 1,
        wss_mib,
        synthetic: true,
        cpu_features: features.iter().map(|s| (*s).to_owned()).collect(),
        disks: Vec::new(),
        disk_workload: false,
    }
}

async fn running_vm(w: &World, name: &str, memory_mib: u64, wss_mib: u64, features: &[&str]) {
    w.cluster
        .create_vm("a", spec(name, memory_mib, wss_mib, features))
        .await
        .expect("create");
    w.cluster.vm(name).start().await.expect("start");
}

async fn phase_on(w: &World, node: &str, vm: &str) -> Option<VmPhase> {
    w.cluster
        .list_vms(node)
        .await
        .expect("list")
        .into_iter()
        .find(|v| v.name == vm)
        .map(|v| v.phase)
}

/// Polls b every 20 ms, `tries` times, until it no longer lists `vm`.
async fn assert_shadow_dropped(w: &World, vm: &str, tries: u32) {
    for _ in 0..tries {
        if phase_on(w, "b", vm).await.is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("b kept the shadow of {vm}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_migration_moves_the_vm_and_its_mac() {
    let w = world(1024, &["sse2"]).await;
    running_vm(&w, "web-1", 32, 4, &["sse2"]).await;
    let mut rounds_seen = 0;
    let report = w
        .cluster
        .vm("web-1")
        .migrate_to("b")
        .verify_memory(true)
        .on_progress(move |p| rounds_seen = rounds_seen.max(p.round))
        .await
        .expect("migrate");
    assert!(report.completed(), "{report:?}");
    assert_eq!(report.memory_verified, Some(true));
    assert!(report.rounds >= 2);
    assert_eq!(
        phase_on(&w, "a", "web-1").await,
        None,
        "freed on the source"
    );
    assert_eq!(phase_on(&w, "b", "web-1").await, Some(VmPhase::Running));
    // The destination announced the MAC to its peer.
    let mut moved = false;
    for _ in 0..50 {
        let table = w.cluster.mac_table("a").await.expect("macs");
        if table.iter().any(|(_, host)| host == "b") {
            moved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(moved, "a's MAC table still points at a");
    // And it can come back.
    let back = w.cluster.vm("web-1").migrate_to("a").await.expect("back");
    assert!(back.completed(), "{back:?}");
    assert_eq!(phase_on(&w, "a", "web-1").await, Some(VmPhase::Running));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_cpu_feature_is_refused_and_the_vm_stays() {
    let w = world(1024, &["sse2"]).await;
    running_vm(&w, "db-1", 8, 0, &["sse2", "avx512f"]).await;
    let report = w.cluster.vm("db-1").migrate_to("b").await.expect("report");
    let Outcome::Aborted { reason } = &report.outcome else {
        panic!("{report:?}")
    };
    assert!(reason.contains("missing CPU features: avx512f"), "{reason}");
    assert_eq!(phase_on(&w, "a", "db-1").await, Some(VmPhase::Running));
    assert_eq!(phase_on(&w, "b", "db-1").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_capacity_is_refused_and_the_vm_stays() {
    let w = world(16, &["sse2", "avx512f"]).await;
    running_vm(&w, "big-1", 64, 0, &[]).await;
    let report = w.cluster.vm("big-1").migrate_to("b").await.expect("report");
    let Outcome::Aborted { reason } = &report.outcome else {
        panic!("{report:?}")
    };
    assert!(reason.contains("not enough memory"), "{reason}");
    assert_eq!(phase_on(&w, "a", "big-1").await, Some(VmPhase::Running));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_convergence_aborts_with_the_vm_running_on_the_source() {
    let w = world(1024, &["sse2", "avx512f"]).await;
    running_vm(&w, "busy-1", 16, 8, &[]).await;
    // A 1 ms budget can never be met (resume alone is counted at 1 ms).
    let report = w
        .cluster
        .vm("busy-1")
        .migrate_to("b")
        .downtime_ms(1)
        .auto_converge(false)
        .time_limit_s(1)
        .await
        .expect("report");
    let Outcome::Aborted { reason } = &report.outcome else {
        panic!("{report:?}")
    };
    assert!(reason.contains("did not converge"), "{reason}");
    assert_eq!(phase_on(&w, "a", "busy-1").await, Some(VmPhase::Running));
    // The shadow is gone from b.
    assert_shadow_dropped(&w, "busy-1", 50).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_connection_mid_migration_leaves_the_vm_on_the_source() {
    let w = world(1024, &["sse2", "avx512f"]).await;
    running_vm(&w, "web-2", 64, 16, &[]).await;
    let link = w.a.ctx.link("b").await.expect("link");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let migrate = w
        .cluster
        .vm("web-2")
        .migrate_to("b")
        .downtime_ms(1)
        .auto_converge(false)
        .time_limit_s(30)
        .on_progress(move |p| {
            let _ = tx.send(p.phase.clone());
        });
    let cut = async {
        while let Some(phase) = rx.recv().await {
            if phase == "precopy" {
                tokio::time::sleep(Duration::from_millis(30)).await;
                link.close("test cuts the link");
                return;
            }
        }
    };
    let (report, ()) = tokio::join!(migrate.into_future(), cut);
    let report = report.expect("report");
    let Outcome::Aborted { reason } = &report.outcome else {
        panic!("{report:?}")
    };
    assert!(reason.contains("test cuts the link"), "{reason}");
    assert_eq!(phase_on(&w, "a", "web-2").await, Some(VmPhase::Running));
    assert_shadow_dropped(&w, "web-2", 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_migration_moves_a_stopped_vm() {
    let w = world(1024, &["sse2", "avx512f"]).await;
    running_vm(&w, "cold-1", 8, 1, &[]).await;
    let refused = w.cluster.vm("cold-1").migrate_to("b").cold(true).await;
    assert!(
        matches!(refused, Err(ClientError::Node { ref reason, .. }) if reason.contains("stop it")),
        "{refused:?}"
    );
    w.cluster.vm("cold-1").stop().await.expect("stop");
    let report = w
        .cluster
        .vm("cold-1")
        .migrate_to("b")
        .cold(true)
        .verify_memory(true)
        .await
        .expect("report");
    assert!(report.completed(), "{report:?}");
    assert_eq!(report.memory_verified, Some(true));
    assert_eq!(phase_on(&w, "b", "cold-1").await, Some(VmPhase::Stopped));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewers_may_look_but_not_migrate() {
    let net = MemNetwork::new();
    let _a = node(&net, "a", &[], 64, &["sse2"], &MemStorage::new()).await;
    let viewer = Cluster::new(
        Arc::new(net.endpoint(PeerIdentity::new("eve", Role::Viewer))),
        vec![("a".into(), "a".into())],
    );
    assert!(viewer.list_vms("a").await.expect("list").is_empty());
    let denied = viewer.create_vm("a", spec("x", 8, 0, &[])).await;
    assert!(
        matches!(denied, Err(ClientError::Node { ref reason, .. }) if reason.contains("permission denied")),
        "{denied:?}"
    );
}

fn disk_spec(name: &str, datastore: &str) -> VmSpec {
    let mut s = spec(name, 16, 2, &["sse2"]);
    s.disks = vec![DiskSpec {
        size_mib: 8,
        datastore: datastore.into(),
    }];
    s.disk_workload = true;
    s
}

/// Creates VM `vm` on a with a disk on `datastore`, starts it, and waits
/// for `writes` acknowledged disk writes; returns the count.
async fn running_vm_with_disk(w: &World, vm: &str, datastore: &str, writes: u64) -> u64 {
    w.cluster
        .create_vm("a", disk_spec(vm, datastore))
        .await
        .expect("create");
    w.cluster.vm(vm).start().await.expect("start");
    disk_writes(w, vm, writes).await
}

/// Waits until the VM's disk workload has acknowledged `writes` more writes.
async fn disk_writes(w: &World, vm: &str, writes: u64) -> u64 {
    let start = w.cluster.vm(vm).disks(false).await.expect("disks")[0].workload_acked;
    loop {
        let now = w.cluster.vm(vm).disks(false).await.expect("disks")[0].workload_acked;
        if now >= start + writes {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Every acknowledged write of the disk workload is on the VM's disk,
/// which lives on `datastore` and keeps taking writes.
async fn assert_disk_intact(w: &World, vm: &str, datastore: &str, acked_before: u64) {
    let after = disk_writes(w, vm, 20).await;
    assert!(after >= acked_before + 20, "the workload continued");
    let disks = w.cluster.vm(vm).disks(true).await.expect("verify");
    assert_eq!(disks[0].datastore, datastore);
    assert_eq!(disks[0].verify_error, None);
    assert!(disks[0].verified_blocks.unwrap_or(0) > 0);
}

fn files_at(w: &World, location: &str, vm: &str) -> Vec<String> {
    w.storage
        .files()
        .into_iter()
        .filter(|(l, p)| l == location && p.starts_with(&format!("{vm}/")))
        .map(|(_, p)| p)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_moves_between_datastores_of_one_host_by_each_method() {
    let w = world(1024, &["sse2"]).await;
    for (i, method) in Method::ALL.into_iter().enumerate() {
        let vm = format!("db-{i}");
        let before = running_vm_with_disk(&w, &vm, "local", 50).await;
        let reports = w
            .cluster
            .vm(&vm)
            .move_storage(
                "archive",
                method,
                if method == Method::Snapshot { 100 } else { 0 },
                &[],
                None,
            )
            .await
            .expect("move");
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].method, method.name());
        assert_disk_intact(&w, &vm, "archive", before).await;
        assert!(
            files_at(&w, "a", &vm).is_empty(),
            "{method}: source left behind"
        );
        let moved = files_at(&w, "a-archive", &vm);
        assert!(
            moved.contains(&format!("{vm}/vm.toml")),
            "home moved: {moved:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compute_and_storage_move_to_another_host_in_one_switchover() {
    let w = world(1024, &["sse2"]).await;
    for (i, method) in Method::ALL.into_iter().enumerate() {
        let vm = format!("app-{i}");
        let before = running_vm_with_disk(&w, &vm, "local", 50).await;
        let report = w
            .cluster
            .vm(&vm)
            .migrate_to("b")
            .storage("local", method)
            .downtime_ms(200)
            .await
            .expect("migrate");
        assert_eq!(report.outcome, Outcome::Completed, "{method}");
        assert_eq!(report.disks.len(), 1);
        assert_eq!(w.cluster.locate(&vm).await.expect("where"), "b");
        assert_disk_intact(&w, &vm, "local", before).await;
        assert!(
            files_at(&w, "a", &vm).is_empty(),
            "{method}: source left behind"
        );
        assert!(!files_at(&w, "b", &vm).is_empty());
        // Its disks are on b's own storage now: back to a only with them.
        let back = w.cluster.vm(&vm).migrate_to("a").await.expect("answered");
        assert!(
            matches!(&back.outcome, Outcome::Aborted { reason } if reason.contains("does not share")),
            "{method}: {:?}",
            back.outcome
        );
        let before = disk_writes(&w, &vm, 10).await;
        let back = w
            .cluster
            .vm(&vm)
            .migrate_to("a")
            .storage("archive", method)
            .downtime_ms(200)
            .await
            .expect("migrate back");
        assert_eq!(back.outcome, Outcome::Completed, "{method}");
        assert_disk_intact(&w, &vm, "archive", before).await;
        assert!(files_at(&w, "b", &vm).is_empty(), "{method}: b left files");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_datastore_moves_only_the_lock() {
    let w = world(1024, &["sse2"]).await;
    let before = running_vm_with_disk(&w, "web", "shared", 50).await;
    let report = w
        .cluster
        .vm("web")
        .migrate_to("b")
        .downtime_ms(200)
        .await
        .expect("migrate");
    assert_eq!(report.outcome, Outcome::Completed);
    assert!(report.disks.is_empty(), "no copy: the lock moved");
    assert_disk_intact(&w, "web", "shared", before).await;
    assert_eq!(files_at(&w, "san", "web").len(), 3, "disk and home stay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_on_unshared_storage_needs_a_storage_move() {
    let w = world(1024, &["sse2"]).await;
    let before = running_vm_with_disk(&w, "solo", "local", 20).await;
    let report = w.cluster.vm("solo").migrate_to("b").await.expect("migrate");
    let Outcome::Aborted { reason } = report.outcome else {
        panic!("must be refused: {:?}", report.outcome)
    };
    assert!(reason.contains("does not share"), "{reason}");
    assert_eq!(w.cluster.locate("solo").await.expect("where"), "a");
    assert_disk_intact(&w, "solo", "local", before).await;
    let refused = w
        .cluster
        .vm("solo")
        .move_storage("nowhere", Method::Mirror, 0, &[], None)
        .await
        .expect_err("no such datastore");
    assert!(
        refused.to_string().contains("no datastore named nowhere"),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_disk_can_go_to_its_own_datastore() {
    let w = world(1024, &["sse2"]).await;
    let mut two = disk_spec("pair", "local");
    two.disks.push(DiskSpec {
        size_mib: 4,
        datastore: "local".into(),
    });
    w.cluster.create_vm("a", two).await.expect("create");
    w.cluster.vm("pair").start().await.expect("start");
    disk_writes(&w, "pair", 20).await;
    // On a's datastores: disk0 to archive, disk1 to shared.
    let moved = w
        .cluster
        .vm("pair")
        .move_storage(
            "archive",
            Method::Mirror,
            0,
            &[("disk1".into(), "shared".into())],
            None,
        )
        .await
        .expect("move");
    assert_eq!(moved.len(), 2);
    let place = |d: &ferry_actors::node::client::DiskView| d.datastore.clone();
    let disks = w.cluster.vm("pair").disks(true).await.expect("disks");
    assert_eq!(
        disks.iter().map(place).collect::<Vec<_>>(),
        ["archive", "shared"]
    );
    assert!(disks.iter().all(|d| d.verify_error.is_none()));
    // To b: disk0 to b's local, disk1 to b's archive, one switchover.
    let report = w
        .cluster
        .vm("pair")
        .migrate_to("b")
        .storage("local", Method::Cbt)
        .disk_datastore("disk1", "archive")
        .downtime_ms(200)
        .await
        .expect("migrate");
    assert_eq!(report.outcome, Outcome::Completed);
    assert_eq!(report.disks.len(), 2);
    let disks = w.cluster.vm("pair").disks(true).await.expect("disks");
    assert_eq!(
        disks.iter().map(place).collect::<Vec<_>>(),
        ["local", "archive"]
    );
    assert!(disks.iter().all(|d| d.verify_error.is_none()));
    assert!(
        files_at(&w, "b-archive", "pair")
            .iter()
            .any(|p| p.ends_with("disk1.raw"))
    );
    assert!(files_at(&w, "a-archive", "pair").is_empty());
    assert!(files_at(&w, "san", "pair").is_empty());
    let bad = w
        .cluster
        .vm("pair")
        .migrate_to("a")
        .storage("local", Method::Mirror)
        .disk_datastore("disk9", "archive")
        .await
        .expect("answered");
    assert!(
        matches!(&bad.outcome, Outcome::Aborted { reason } if reason.contains("no disk named disk9")),
        "{:?}",
        bad.outcome
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_hosts_keep_the_report_and_count_the_outcomes() {
    let w = world(1024, &["sse2"]).await;
    running_vm(&w, "web-1", 16, 2, &["sse2"]).await;
    running_vm(&w, "db-1", 8, 0, &["sse2", "avx512f"]).await;
    let done = w.cluster.vm("web-1").migrate_to("b").await.expect("report");
    assert!(done.completed(), "{done:?}");
    let refused = w.cluster.vm("db-1").migrate_to("b").await.expect("report");
    assert!(!refused.completed());

    // One report, the source's with the destination's side joined.
    let full = w.cluster.migration(done.migration_id).await.expect("kept");
    assert_eq!(full.round_log, done.round_log);
    let dest = full.destination.expect("b's side");
    assert_eq!((dest.from.as_str(), dest.to.as_str()), ("a", "b"));
    assert_eq!(dest.outcome, "adopted");
    assert_eq!(dest.bytes_received, done.bytes_sent);
    assert!(full.started_unix_ms > 0);
    let refused_full = w
        .cluster
        .migration(refused.migration_id)
        .await
        .expect("kept");
    assert!(refused_full.phases.iter().any(|p| p.name == "abort"));
    let recent = w.cluster.recent_migrations(10).await.expect("recent");
    assert_eq!(recent.len(), 2, "one record per migration: {recent:?}");
    assert_eq!(recent[0].id, refused.migration_id, "newest first");
    let missing = w.cluster.migration(12345).await;
    assert!(
        matches!(missing, Err(ClientError::NoSuchMigration(_))),
        "{missing:?}"
    );

    let a = w.cluster.stats("a").await.expect("a's stats");
    assert_eq!((a.started, a.succeeded, a.aborted), (2, 1, 1));
    assert_eq!(a.bytes_sent, done.bytes_sent + refused.bytes_sent);
    assert_eq!(a.downtime_ms.count, 1, "only completed live migrations");
    assert_eq!(a.round_pages.count, u64::from(done.rounds));
    assert!(a.active.is_empty());
    let b = w.cluster.stats("b").await.expect("b's stats");
    assert_eq!((b.incoming_adopted, b.incoming_discarded), (1, 0));
    assert_eq!(b.bytes_received, done.bytes_sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_migration_leaves_the_vm_running_on_the_source() {
    let w = Arc::new(world(1024, &["sse2", "avx512f"]).await);
    running_vm(&w, "busy-1", 16, 8, &[]).await;
    // A budget it cannot meet keeps it in pre-copy until cancelled.
    let w2 = w.clone();
    let migration = tokio::spawn(async move {
        w2.cluster
            .vm("busy-1")
            .migrate_to("b")
            .downtime_ms(1)
            .auto_converge(false)
            .time_limit_s(60)
            .await
    });
    let mut id = None;
    for _ in 0..500 {
        let stats = w.cluster.stats("a").await.expect("stats");
        if let Some(active) = stats.active.first()
            && active.progress.phase == "precopy"
            && active.progress.round >= 1
        {
            id = Some(active.id.clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let id = id.expect("the migration shows as running in pre-copy");
    let id = ferry_actors::migration::report::parse_id(&id).expect("an id");
    assert_eq!(
        w.cluster.cancel_migration(id).await.expect("cancelled"),
        "a"
    );
    let report = migration.await.expect("task").expect("report");
    let Outcome::Aborted { reason } = &report.outcome else {
        panic!("{report:?}")
    };
    assert_eq!(reason, "cancelled by ops");
    assert_eq!(phase_on(&w, "a", "busy-1").await, Some(VmPhase::Running));
    assert_shadow_dropped(&w, "busy-1", 50).await;
    // It is over now: nothing to cancel.
    let again = w.cluster.cancel_migration(id).await;
    assert!(
        matches!(again, Err(ClientError::NoSuchMigration(_))),
        "{again:?}"
    );
}
