//! Storage migration on real files over real QUIC: each method moves a
//! disk between datastores of one host, and with its VM to another host,
//! while the disk workload keeps writing; every acknowledged write is on
//! the new copy afterwards, and the old files are gone.
//!
//! Guests are KVM ones where /dev/kvm works (the tests say so loudly where
//! it does not, and use synthetic guests).

use std::sync::Arc;
use std::time::Duration;

use ferry_actors::migration::Outcome;
use ferry_actors::node::client::{DiskSpec, VmSpec};
use ferry_actors::storage::Method;
use ferry_host::kvm;
use ferry_host::node::factory::HostFactory;
use ferry_host::node::local::{LocalCapacity, LocalCluster};

async fn cluster(test: &str) -> LocalCluster {
    let factory = match kvm::available() {
        Ok(()) => HostFactory::probe(),
        Err(e) => {
            println!("KVM MISSING for {test}: {e}; running it with synthetic guests instead");
            HostFactory::synthetic_only()
        }
    };
    LocalCluster::start(
        &[
            ("host-a", LocalCapacity::default()),
            ("host-b", LocalCapacity::default()),
        ],
        Arc::new(factory),
    )
    .await
    .expect("cluster")
}

async fn vm_with_disk(c: &LocalCluster, name: &str, datastore: &str) -> u64 {
    let spec = VmSpec {
        linux: None,
        name: name.to_owned(),
        memory_mib: 64,
        vcpus: 1,
        wss_mib: 4,
        synthetic: !c.kvm,
        cpu_features: Vec::new(),
        disks: vec![DiskSpec {
            size_mib: 32,
            datastore: datastore.to_owned(),
        }],
        disk_workload: true,
    };
    c.client.create_vm("host-a", spec).await.expect("create");
    c.client.vm(name).start().await.expect("start");
    acked_after(c, name, 50).await
}

/// Waits for `writes` more acknowledged workload writes; returns the count.
async fn workload_acked(c: &LocalCluster, vm: &str) -> u64 {
    c.client.vm(vm).disks(false).await.expect("disks")[0].workload_acked
}

async fn acked_after(c: &LocalCluster, vm: &str, writes: u64) -> u64 {
    let start = workload_acked(c, vm).await;
    for _ in 0..3000 {
        let now = workload_acked(c, vm).await;
        if now >= start + writes {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{vm}'s disk workload stalled at {start}");
}

async fn assert_intact(c: &LocalCluster, vm: &str, datastore: &str, before: u64) {
    let after = acked_after(c, vm, 20).await;
    assert!(after >= before + 20);
    let d = &c.client.vm(vm).disks(true).await.expect("verify")[0];
    assert_eq!(d.datastore, datastore);
    assert_eq!(d.verify_error, None, "{vm}");
    assert!(d.verified_blocks.unwrap_or(0) > 0);
}

fn dir_is_empty_or_gone(c: &LocalCluster, rel: &str) -> bool {
    let p = c.storage.path().join(rel);
    std::fs::read_dir(&p).map_or(true, |mut d| d.next().is_none())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_method_moves_a_disk_between_datastores_of_one_host() {
    let c = cluster("each_method_moves_a_disk_between_datastores_of_one_host").await;
    for method in Method::ALL {
        let vm = format!("db-{method}");
        let before = vm_with_disk(&c, &vm, "local").await;
        let reports = c
            .client
            .vm(&vm)
            .move_storage("archive", method, 0, &[], None)
            .await
            .expect("move");
        let r = &reports[0];
        println!(
            "{method}: {} bytes copied at {:.0} MB/s, pause {:.2} ms",
            r.copied_bytes, r.copy_mb_per_s, r.pause_ms
        );
        assert_intact(&c, &vm, "archive", before).await;
        assert!(dir_is_empty_or_gone(&c, &format!("host-a/local/{vm}")));
        let home = c.storage.path().join(format!("host-a/archive/{vm}"));
        assert!(home.join("vm.toml").exists(), "the home moved");
        assert!(home.join("disk0.raw").exists());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_method_moves_a_vm_and_its_disk_to_another_host() {
    let c = cluster("each_method_moves_a_vm_and_its_disk_to_another_host").await;
    for method in Method::ALL {
        let vm = format!("app-{method}");
        let before = vm_with_disk(&c, &vm, "local").await;
        let report = c
            .client
            .vm(&vm)
            .migrate_to("host-b")
            .storage("local", method)
            .downtime_ms(300)
            .await
            .expect("migrate");
        assert_eq!(report.outcome, Outcome::Completed, "{method}");
        println!(
            "{method}: downtime {:.1} ms, disk {:?}",
            report.downtime_ms,
            report.disks.first().map(|d| (d.copied_bytes, d.pause_ms))
        );
        assert_eq!(c.client.locate(&vm).await.expect("where"), "host-b");
        assert_intact(&c, &vm, "local", before).await;
        assert!(dir_is_empty_or_gone(&c, &format!("host-a/local/{vm}")));
        assert!(
            c.storage
                .path()
                .join(format!("host-b/local/{vm}/disk0.raw"))
                .exists()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_on_a_shared_datastore_moves_with_its_lock_only() {
    let c = cluster("a_vm_on_a_shared_datastore_moves_with_its_lock_only").await;
    let before = vm_with_disk(&c, "web", "shared").await;
    let report = c
        .client
        .vm("web")
        .migrate_to("host-b")
        .downtime_ms(300)
        .await
        .expect("migrate");
    assert_eq!(report.outcome, Outcome::Completed);
    assert!(report.disks.is_empty());
    assert_intact(&c, "web", "shared", before).await;
    // The file is locked by host-b now: a second opener is refused.
    let path = c.storage.path().join("shared/web/disk0.raw");
    assert!(matches!(
        ferry_host::datastore::FileDisk::open(&path),
        Err(ferry_actors::disk::DiskError::Locked(_))
    ));
}
