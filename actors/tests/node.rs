//! Whole nodes (host, VM and migration actors) over the in-memory
//! transport with synthetic guests: the production protocol code end to
//! end, without KVM or QUIC (`host/tests/` runs those).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use ferry_actors::api::{ClientError, Cluster};
use ferry_actors::migration::{Capacity, Outcome};
use ferry_actors::node::NodeCtx;
use ferry_actors::node::client::VmSpec;
use ferry_actors::node::factory::SyntheticFactory;
use ferry_actors::node::host::start_host;
use ferry_actors::node::vm::VmPhase;
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
    start_host(ctx.clone(), capacity, Arc::new(SyntheticFactory))
        .await
        .expect("host");
    Node { ctx }
}

struct World {
    a: Node,
    cluster: Cluster<MemTransport>,
}

async fn world(b_memory_mib: u64, b_features: &[&str]) -> World {
    let net = MemNetwork::new();
    let a = node(&net, "a", &["b"], 1024, &["sse2", "avx512f"]).await;
    let _b = node(&net, "b", &["a"], b_memory_mib, b_features).await;
    let client = Arc::new(net.endpoint(PeerIdentity::new("ops", Role::Operator)));
    let cluster = Cluster::new(
        client,
        vec![("a".into(), "a".into()), ("b".into(), "b".into())],
    );
    World { a, cluster }
}

fn spec(name: &str, memory_mib: u64, wss_mib: u64, features: &[&str]) -> VmSpec {
    VmSpec {
        name: name.into(),
        memory_mib,
        vcpus: 1,
        wss_mib,
        synthetic: true,
        cpu_features: features.iter().map(|s| (*s).to_owned()).collect(),
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
    // A zero budget can never be met (resume alone costs something).
    let report = w
        .cluster
        .vm("busy-1")
        .migrate_to("b")
        .downtime_ms(0)
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
        .downtime_ms(0)
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
    let _a = node(&net, "a", &[], 64, &["sse2"]).await;
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
