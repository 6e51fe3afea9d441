//! File disks on a datastore: the shared block-backend suite, locking and
//! sparseness.

use std::path::PathBuf;

use ferry_actors::disk::conformance::{self, DiskHarness};
use ferry_actors::disk::{BlockBackend, DiskError};
use ferry_host::datastore::{Datastore, FileDisk};

struct Files {
    dir: tempfile::TempDir,
    next: u32,
}

impl Files {
    fn path(&mut self) -> PathBuf {
        self.next += 1;
        self.dir.path().join(format!("disk-{}.raw", self.next))
    }
}

impl DiskHarness for Files {
    type Disk = FileDisk;
    fn fresh(&mut self, len_bytes: u64) -> FileDisk {
        let path = self.path();
        FileDisk::create(&path, len_bytes).expect("create")
    }
    fn reopen_after_crash(&mut self, disk: FileDisk) -> FileDisk {
        // A power cut cannot be staged here: close and reopen.
        let path = disk.path().to_owned();
        drop(disk);
        FileDisk::open(&path).expect("reopen")
    }
    fn loses_unflushed_writes(&self) -> bool {
        false
    }
}

#[test]
fn file_disks_pass_the_conformance_suite() {
    conformance::run_all(&mut Files {
        dir: tempfile::tempdir().expect("tempdir"),
        next: 0,
    });
}

#[test]
fn a_locked_disk_refuses_a_second_owner() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Datastore::open("ds1", dir.path()).expect("datastore");
    let path = store.path("web-1.raw");
    let disk = FileDisk::create(&path, 1 << 20).expect("create");
    match FileDisk::open(&path) {
        Err(DiskError::Locked(p)) => assert!(p.contains("web-1.raw"), "{p}"),
        other => panic!("a second open must be refused: {other:?}"),
    }
    drop(disk);
    FileDisk::open(&path).expect("free once the owner closed it");
    assert!(
        FileDisk::create(&path, 1 << 20).is_err(),
        "create never replaces a disk"
    );
}

#[test]
fn a_datastore_must_be_a_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").expect("write");
    assert!(Datastore::open("bad", &file).is_err());
    assert!(Datastore::open("missing", &dir.path().join("nope")).is_err());
}

#[test]
fn a_new_disk_is_sparse() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut d = FileDisk::create(&dir.path().join("big.raw"), 1 << 30).expect("create");
    d.write_at(512 << 20, &[7u8; 4096]).expect("write");
    d.flush().expect("flush");
    let extents = d.allocated().expect("extents");
    let covered: u64 = extents.iter().map(|r| r.end - r.start).sum();
    assert!(
        covered < 16 << 20,
        "1 GiB disk with one write maps {covered} bytes"
    );
}

#[test]
fn a_datastore_reports_what_its_files_take_and_what_its_filesystem_holds() {
    use ferry_actors::storage::datastore::Datastores;
    let dir = tempfile::tempdir().expect("tmp");
    let root = dir.path().join("local");
    std::fs::create_dir(&root).expect("mkdir");
    let stores =
        ferry_host::datastore::FileDatastores::open(&[("local".into(), root)]).expect("open");
    let (empty, capacity) = stores.space("local").expect("space");
    assert!(capacity > 0);
    // A sparse 64 MiB disk takes only what is written: 1 MiB here.
    let mut disk = stores
        .create_disk("local", "vm1/disk0.raw", 64 << 20)
        .expect("create");
    disk.write_durable(0, &vec![7u8; 1 << 20]).expect("write");
    let (used, capacity_after) = stores.space("local").expect("space");
    assert_eq!(capacity, capacity_after);
    assert!(used - empty >= 1 << 20, "{used} - {empty}");
    assert!(used - empty < 8 << 20, "sparse: {used} - {empty}");
    assert!(stores.space("nosuch").is_err());
}

#[test]
fn a_shared_datastore_is_known_by_the_identity_written_in_it_not_by_its_path() {
    use ferry_actors::storage::datastore::Datastores;
    use ferry_host::datastore::FileDatastores;
    let shared = tempfile::tempdir().expect("tempdir");
    let elsewhere = tempfile::tempdir().expect("tempdir");
    // Two hosts mount the same directory (here under two names) ...
    let host_a =
        FileDatastores::open(&[("shared".into(), shared.path().to_owned())]).expect("host a");
    let host_b = FileDatastores::open(&[("san".into(), shared.path().to_owned())]).expect("host b");
    assert_eq!(
        host_a.location("shared").expect("a"),
        host_b.location("san").expect("b")
    );
    // ... a third has a different directory under the same name and path
    // string elsewhere: not shared.
    let host_c =
        FileDatastores::open(&[("shared".into(), elsewhere.path().to_owned())]).expect("host c");
    assert_ne!(
        host_a.location("shared").expect("a"),
        host_c.location("shared").expect("c")
    );
    // A damaged identity is an error, not a new datastore.
    std::fs::write(
        elsewhere.path().join(ferry_host::datastore::IDENTITY_FILE),
        "not an id",
    )
    .expect("write");
    let e = Datastore::open("x", elsewhere.path()).expect_err("refused");
    assert!(e.to_string().contains("does not hold an identity"), "{e}");
}

#[test]
fn a_snapshot_overlay_left_by_a_crash_is_merged_when_the_disk_reopens() {
    use ferry_actors::node::disk::DiskPlace;
    use ferry_actors::node::overlay::{self, Overlay};
    use ferry_actors::storage::datastore::Datastores;
    use ferry_actors::storage::plan::BLOCK_BYTES;
    let dir = tempfile::tempdir().expect("tempdir");
    let stores =
        ferry_host::datastore::FileDatastores::open(&[("local".into(), dir.path().into())])
            .expect("open");
    let place = DiskPlace {
        datastore: "local".into(),
        path: "vm/disk0.raw".into(),
    };
    let base = stores
        .create_disk("local", &place.path, 4 * BLOCK_BYTES)
        .expect("base");
    let base = ferry_actors::disk::shared(base);
    let ov = Overlay::create(&stores, &place, 4 * BLOCK_BYTES).expect("overlay");
    ov.write(&base, &[2], 2 * BLOCK_BYTES, &[0xAB; 4096])
        .expect("acknowledged");
    // The process dies: its files close, the overlay stays behind.
    drop((ov, base));
    assert!(
        stores
            .exists("local", &overlay::map_path(&place.path))
            .expect("look")
    );
    let mut base = stores.open_disk("local", &place.path).expect("reopen");
    assert_eq!(
        overlay::recover(&stores, "local", &place.path, base.as_mut()).expect("recover"),
        1
    );
    let mut buf = [0u8; 4096];
    base.read_at(2 * BLOCK_BYTES, &mut buf).expect("read");
    assert!(
        buf.iter().all(|b| *b == 0xAB),
        "the acknowledged write is in the base"
    );
    let left: Vec<String> = std::fs::read_dir(dir.path().join("vm"))
        .expect("vm folder")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["disk0.raw"], "the overlay files are gone");
}
