//! Storage migration on one host: each method moves a disk between two
//! datastores while a writer keeps writing the verifiable pattern, and
//! every acknowledged write is on the new copy afterwards.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ferry_actors::disk::shared;
use ferry_actors::node::disk::{
    DiskActor, DiskArgs, DiskMsg, DiskPlace, call, copy_until_converged, run_pattern_writer,
    start_move, verify_pattern,
};
use ferry_actors::storage::datastore::{Datastores, MemDatastores, MemStorage};
use ferry_actors::storage::pattern::WritePattern;
use ferry_actors::storage::target::LocalTarget;
use ferry_actors::storage::{Method, MoveOptions};
use ractor::Actor;

const LEN: u64 = 16 << 20;

/// A disk actor for `disk`, which lives at `ds1:vm/disk0.raw`.
async fn disk_actor(
    stores: &Arc<dyn Datastores>,
    disk: Box<dyn ferry_actors::disk::BlockBackend>,
    workload_acked: Arc<AtomicU64>,
) -> ractor::ActorRef<DiskMsg> {
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
            workload_acked,
        },
    )
    .await
    .expect("spawn");
    actor
}

async fn move_under_writes(method: Method, fail_target: bool) {
    let stores: Arc<dyn Datastores> = Arc::new(MemDatastores::new(
        MemStorage::new(),
        &[("ds1", "l1"), ("ds2", "l2")],
    ));
    let disk = stores
        .create_disk("ds1", "vm/disk0.raw", LEN)
        .expect("create");
    let actor = disk_actor(&stores, disk, Arc::default()).await;
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
    start_move(&actor, options, Box::new(target), to)
        .await
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
    let actor = disk_actor(&stores, disk, Arc::default()).await;
    actor
        .cast(DiskMsg::Workload(Some(Duration::from_millis(1))))
        .expect("cast");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let info = call(&actor, DiskMsg::Info).await.expect("info");
    let v = call(&actor, DiskMsg::VerifyWorkload).await.expect("call");
    assert!(v.is_ok(), "{v:?} after {}", info.workload_acked);
}

/// A snapshot copy to another host whose connection breaks half-way
/// continues where the destination's durable copy ends, not from zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_link_resumes_the_copy_where_it_stopped() {
    use ferry_actors::disk::MemDisk;
    use ferry_actors::node::disk::CopyProgress;
    use ferry_actors::storage::remote::{
        DiskOpen, IncomingDisk, OpenDiskStream, RemoteTarget, receive_disk,
    };
    use ferry_transport::mem::{MemConnection, MemNetwork};
    use ferry_transport::{
        Connection, FrameKind, FrameReader, FrameWriter, PeerIdentity, Role, Transport,
    };

    const DISK: u64 = 32 << 20;
    let net = MemNetwork::new();
    let dst = net.endpoint(PeerIdentity::new("dst", Role::Host));
    let src = Arc::new(net.endpoint(PeerIdentity::new("src", Role::Host)));
    let incoming = Arc::new(IncomingDisk {
        name: "disk0".into(),
        disk: shared(Box::new(MemDisk::new(DISK))),
        place: DiskPlace {
            datastore: "ds".into(),
            path: "vm/disk0.raw".into(),
        },
        durable: AtomicU64::new(0),
        done: std::sync::Mutex::new(None),
        discarded: std::sync::atomic::AtomicBool::new(false),
        home: Vec::new(),
        final_path: "vm/disk0.raw".into(),
    });
    let inc = incoming.clone();
    tokio::spawn(async move {
        while let Ok(conn) = dst.accept().await {
            let inc = inc.clone();
            tokio::spawn(async move {
                while let Ok((send, recv)) = conn.accept_stream().await {
                    let mut reader = FrameReader::new(recv);
                    let _: DiskOpen = reader.read_message(FrameKind::Control).await.expect("open");
                    let _ = receive_disk(FrameWriter::new(send), reader, inc.clone()).await;
                }
            });
        }
    });
    let current: Arc<std::sync::Mutex<Option<MemConnection>>> = Arc::default();
    let (src2, cur2) = (src.clone(), current.clone());
    let dial: OpenDiskStream<MemConnection> = Arc::new(move || {
        let (src, cur) = (src2.clone(), cur2.clone());
        Box::pin(async move {
            let conn = src
                .connect(&"dst".to_owned())
                .await
                .map_err(|e| e.to_string())?;
            let (send, recv) = conn.open_stream().await.map_err(|e| e.to_string())?;
            *cur.lock().expect("conn") = Some(conn);
            Ok((FrameWriter::new(send), FrameReader::new(recv)))
        })
    });

    // The source disk, full of data.
    let stores: Arc<dyn Datastores> =
        Arc::new(MemDatastores::new(MemStorage::new(), &[("ds1", "l1")]));
    let mut disk = stores
        .create_disk("ds1", "vm/disk0.raw", DISK)
        .expect("create");
    let pattern = WritePattern::new(DISK);
    let mut buf = vec![0u8; 4096];
    for seq in 1..=pattern.blocks() {
        pattern.fill(seq, &mut buf);
        disk.write_at(pattern.offset_of(seq), &buf).expect("fill");
    }
    let acked = Arc::new(AtomicU64::new(pattern.blocks()));
    let actor = disk_actor(&stores, disk, acked.clone()).await;
    let open = DiskOpen {
        migration_id: 1,
        disk: "disk0".into(),
        len: DISK,
        datastore: "ds".into(),
        path: "vm/disk0.raw".into(),
        home: Vec::new(),
    };
    let (target, durable) = RemoteTarget::<MemConnection>::open("dst", open, dial, acked.clone())
        .await
        .expect("open");
    assert_eq!(durable, 0);
    let mut options = MoveOptions::new(Method::Snapshot);
    options.chunk_bytes = 1 << 20;
    start_move(
        &actor,
        options,
        Box::new(target),
        DiskPlace {
            datastore: "ds".into(),
            path: "vm/disk0.raw".into(),
        },
    )
    .await
    .expect("start");
    actor
        .cast(DiskMsg::Workload(Some(Duration::from_millis(1))))
        .expect("workload");
    let mut broke = false;
    copy_until_converged(&actor, 3, |p| {
        if let CopyProgress::Copied { cursor, .. } = p
            && *cursor >= DISK / 2
            && !broke
        {
            broke = true;
            if let Some(c) = current.lock().expect("conn").take() {
                c.close("test: link cut");
            }
        }
    })
    .await
    .expect("the copy resumes and converges");
    let report = call(&actor, DiskMsg::Finish)
        .await
        .expect("call")
        .expect("finish");
    assert!(broke);
    assert_eq!(report.resumes, 1);
    assert!(
        report.copied_bytes < DISK * 3 / 2,
        "resumed, not restarted: {} bytes sent for a {DISK}-byte disk",
        report.copied_bytes
    );
    let acked_at_finish = acked.load(Ordering::SeqCst);
    assert!(incoming.done.lock().expect("done").is_some());
    let copy = incoming.disk.lock().expect("disk");
    let checked = pattern
        .verify(acked_at_finish, 0, |o, b| copy.read_at(o, b))
        .expect("every acknowledged write on the destination");
    assert_eq!(checked, pattern.blocks());
}
