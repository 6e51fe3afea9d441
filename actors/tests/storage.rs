//! Storage migration on one host: each method moves a disk between two
//! datastores while a writer keeps writing the verifiable pattern, and
//! every acknowledged write is on the new copy afterwards.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ferry_actors::disk::shared;
use ferry_actors::node::disk::{
    DiskActor, DiskArgs, DiskMsg, DiskPlace, call, copy_until_converged, run_pattern_writer,
    verify_pattern,
};
use ferry_actors::storage::datastore::{Datastores, MemDatastores, MemStorage};
use ferry_actors::storage::pattern::WritePattern;
use ferry_actors::storage::target::LocalTarget;
use ferry_actors::storage::{Method, MoveOptions};
use ractor::Actor;

const LEN: u64 = 16 << 20;

async fn move_under_writes(method: Method, fail_target: bool) {
    let stores: Arc<dyn Datastores> = Arc::new(MemDatastores::new(
        MemStorage::new(),
        &[("ds1", "l1"), ("ds2", "l2")],
    ));
    let disk = stores
        .create_disk("ds1", "vm/disk0.raw", LEN)
        .expect("create");
    let (actor, _) = Actor::spawn(
        None,
        DiskActor,
        DiskArgs {
            name: "disk0".into(),
            disk: shared(disk),
            place: DiskPlace {
                datastore: "ds1".into(),
                path: "vm/disk0.raw".into(),
            },
            stores: stores.clone(),
            workload_acked: Arc::default(),
        },
    )
    .await
    .expect("spawn");
    let pattern = WritePattern::new(LEN);
    let acked = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let writer = tokio::spawn(run_pattern_writer(
        actor.clone(),
        pattern,
        acked.clone(),
        Duration::ZERO,
        stop_rx,
    ));
    // Let the guest fill part of the disk first.
    while acked.load(Ordering::SeqCst) < 1000 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let target = LocalTarget::create(stores.clone(), "ds2", "vm/disk0.raw", LEN)
        .await
        .expect("target");
    let mut options = MoveOptions::new(method);
    options.chunk_bytes = 256 << 10;
    let to = DiskPlace {
        datastore: "ds2".into(),
        path: "vm/disk0.raw".into(),
    };
    call(&actor, |reply| DiskMsg::StartMove {
        options,
        target: Box::new(target),
        to,
        reply,
    })
    .await
    .expect("call")
    .expect("start");
    let during = acked.load(Ordering::SeqCst);
    copy_until_converged(&actor, 0, |_| {}).await.expect("copy");
    if fail_target {
        let report = call(&actor, |reply| DiskMsg::Abort {
            reason: "test abort".into(),
            reply,
        })
        .await
        .expect("abort");
        assert_eq!(report.error.as_deref(), Some("test abort"));
    } else {
        let report = call(&actor, DiskMsg::Finish)
            .await
            .expect("call")
            .expect("finish");
        assert_eq!(report.method, method.name());
        assert!(report.copied_bytes > 0);
        call(&actor, DiskMsg::Commit)
            .await
            .expect("call")
            .expect("commit");
    }
    // The guest keeps writing on whichever copy won, then stops.
    let settled = acked.load(Ordering::SeqCst);
    while acked.load(Ordering::SeqCst) < settled + 200 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    stop_tx.send(true).expect("stop");
    let stats = writer.await.expect("writer");
    assert!(stats.error.is_none(), "{:?}", stats.error);
    assert!(settled > during, "the guest wrote during the move");
    let info = call(&actor, DiskMsg::Info).await.expect("info");
    let (home, gone) = if fail_target {
        ("ds1", "ds2")
    } else {
        ("ds2", "ds1")
    };
    assert_eq!(info.place.datastore, home);
    call(&actor, DiskMsg::Release).await.expect("release");
    let files = stores.list(gone, "vm").expect("list");
    assert!(files.is_empty(), "{gone} still holds {files:?}");
    let final_disk = stores.open_disk(home, "vm/disk0.raw").expect("reopen");
    let checked = verify_pattern(final_disk.as_ref(), &pattern, stats.acked)
        .expect("every acknowledged write");
    assert!(checked > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_moves_a_disk_under_writes() {
    move_under_writes(Method::Mirror, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cbt_moves_a_disk_under_writes() {
    move_under_writes(Method::Cbt, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_moves_a_disk_under_writes() {
    move_under_writes(Method::Snapshot, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_move_leaves_the_source_intact_and_no_target() {
    for method in Method::ALL {
        move_under_writes(method, true).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_workload_verifies() {
    let stores: Arc<dyn Datastores> =
        Arc::new(MemDatastores::new(MemStorage::new(), &[("ds1", "l1")]));
    let disk = stores
        .create_disk("ds1", "vm/disk0.raw", 8 << 20)
        .expect("create");
    let (actor, _) = Actor::spawn(
        None,
        DiskActor,
        DiskArgs {
            name: "disk0".into(),
            disk: shared(disk),
            place: DiskPlace {
                datastore: "ds1".into(),
                path: "vm/disk0.raw".into(),
            },
            stores: stores.clone(),
            workload_acked: Arc::default(),
        },
    )
    .await
    .expect("spawn");
    actor
        .cast(DiskMsg::Workload(Some(Duration::from_millis(1))))
        .expect("cast");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let info = call(&actor, DiskMsg::Info).await.expect("info");
    let v = call(&actor, DiskMsg::VerifyWorkload).await.expect("call");
    assert!(v.is_ok(), "{v:?} after {}", info.workload_acked);
}
