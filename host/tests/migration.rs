//! Real two-node migrations on loopback: QUIC with mutual TLS, KVM guests.
//!
//! Where /dev/kvm is missing the tests say so loudly and run the same
//! nodes with synthetic guests, so the QUIC path is still covered.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use ferry_actors::migration::Outcome;
use ferry_actors::node::vm::VmPhase;
use ferry_host::node::factory::HostFactory;
use ferry_host::node::local::{LocalCapacity, LocalCluster};
use ferry_transport::Connection;

fn factory(test: &str) -> HostFactory {
    common::kvm_or_synthetic(test)
}

async fn cluster(test: &str, b: LocalCapacity) -> LocalCluster {
    LocalCluster::start(
        &[("host-a", LocalCapacity::default()), ("host-b", b)],
        Arc::new(factory(test)),
    )
    .await
    .expect("cluster")
}

async fn running_vm(c: &LocalCluster, name: &str, memory_mib: u64, wss_mib: u64) {
    c.start_vm("host-a", name, memory_mib, wss_mib)
        .await
        .expect("a running guest");
}

async fn phase(c: &LocalCluster, node: &str, vm: &str) -> Option<VmPhase> {
    c.client
        .list_vms(node)
        .await
        .expect("list")
        .into_iter()
        .find(|v| v.name == vm)
        .map(|v| v.phase)
}

async fn assert_keeps_running_on_a(c: &LocalCluster, vm: &str) {
    assert_eq!(phase(c, "host-a", vm).await, Some(VmPhase::Running));
    let before = c.guest_pass("host-a", vm).await.expect("pass");
    c.wait_for_pass("host-a", vm, before + 1, Duration::from_secs(10))
        .await
        .expect("the guest keeps running on the source");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_migration_over_quic_moves_a_running_guest() {
    let c = cluster("live_migration", LocalCapacity::default()).await;
    running_vm(&c, "web-1", 128, 16).await;
    let report = c
        .client
        .vm("web-1")
        .migrate_to("host-b")
        .verify_memory(true)
        .await
        .expect("migrate");
    assert!(report.completed(), "{report:?}");
    assert_eq!(report.memory_verified, Some(true), "{report:?}");
    assert!(
        report.bytes_sent > 100 << 20,
        "round 0 carries the filled memory"
    );
    assert_eq!(phase(&c, "host-a", "web-1").await, None);
    assert_eq!(phase(&c, "host-b", "web-1").await, Some(VmPhase::Running));
    let after = c.guest_pass("host-b", "web-1").await.expect("pass");
    c.wait_for_pass("host-b", "web-1", after + 2, Duration::from_secs(10))
        .await
        .expect("the guest progresses on the destination");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_cpu_feature_is_refused_over_quic() {
    let b = LocalCapacity {
        cpu_features: Some(BTreeSet::from(["fpu".to_owned()])),
        ..LocalCapacity::default()
    };
    let c = cluster("cpu_feature_refusal", b).await;
    running_vm(&c, "db-1", 32, 0).await;
    let report = c
        .client
        .vm("db-1")
        .migrate_to("host-b")
        .await
        .expect("report");
    let Outcome::Aborted { reason } = &report.outcome else {
        panic!("{report:?}")
    };
    assert!(reason.contains("missing CPU features"), "{reason}");
    // The VM's model (host-a's) is named feature by feature.
    assert!(
        reason.contains("sse2") && reason.contains("syscall"),
        "{reason}"
    );
    assert_keeps_running_on_a(&c, "db-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_capacity_is_refused_over_quic() {
    let b = LocalCapacity {
        memory_mib: 16,
        ..LocalCapacity::default()
    };
    let c = cluster("capacity_refusal", b).await;
    running_vm(&c, "big-1", 32, 0).await;
    let report = c
        .client
        .vm("big-1")
        .migrate_to("host-b")
        .await
        .expect("report");
    let Outcome::Aborted { reason } = &report.outcome else {
        panic!("{report:?}")
    };
    assert!(reason.contains("not enough memory"), "{reason}");
    assert_keeps_running_on_a(&c, "big-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_convergence_aborts_and_the_guest_runs_on() {
    let c = cluster("non_convergence", LocalCapacity::default()).await;
    running_vm(&c, "busy-1", 64, 16).await;
    let report = c
        .client
        .vm("busy-1")
        .migrate_to("host-b")
        .downtime_ms(1)
        .auto_converge(false)
        .time_limit_s(2)
        .await
        .expect("report");
    let Outcome::Aborted { reason } = &report.outcome else {
        panic!("{report:?}")
    };
    assert!(reason.contains("did not converge"), "{reason}");
    assert_keeps_running_on_a(&c, "busy-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_connection_mid_migration_leaves_the_guest_on_the_source() {
    let c = cluster("broken_connection", LocalCapacity::default()).await;
    running_vm(&c, "web-2", 128, 16).await;
    let link = c.nodes[0].ctx.link("host-b").await.expect("link");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let migrate = c
        .client
        .vm("web-2")
        .migrate_to("host-b")
        .downtime_ms(1)
        .auto_converge(false)
        .time_limit_s(60)
        .on_progress(move |p| {
            let _ = tx.send(p.round);
        });
    let cut = async {
        while let Some(round) = rx.recv().await {
            if round >= 1 {
                link.close("test cuts the link");
                return;
            }
        }
    };
    let (report, ()) = tokio::join!(migrate.into_future(), cut);
    let report = report.expect("report");
    assert!(
        matches!(report.outcome, Outcome::Aborted { .. }),
        "{report:?}"
    );
    assert_keeps_running_on_a(&c, "web-2").await;
    for _ in 0..100 {
        if phase(&c, "host-b", "web-2").await.is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("host-b kept the shadow");
}
