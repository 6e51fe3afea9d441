//! A full datastore is named as the cause, wherever it bites: a guest
//! whose thin disk cannot grow sees its writes fail, and `vm list`, `vm
//! disks` and the audit log say so until space comes back; a migration
//! whose destination datastore fills up aborts with that reason (not as a
//! broken link) and leaves the VM running on its source. Needs root (to
//! mount a small tmpfs as the datastore).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Node, SmallDisk, ferry, ferry_status};

const CLIENT: [&str; 2] = ["--client", "client.toml"];

fn with_client<'a>(args: &[&'a str]) -> Vec<&'a str> {
    args.iter().copied().chain(CLIENT).collect()
}

/// Polls `ferry ARGS` until its output contains (or, with `gone`, no
/// longer contains) `text`; the node samples disks every 5 s.
fn until_output(d: &Path, args: &[&str], text: &str, gone: bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (out, _, err) = ferry_status(d, &with_client(args));
        if out.contains(text) != gone {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "ferry {args:?}: {text:?} {}:\n{out}\n{err}",
            if gone { "never went" } else { "never came" }
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A cluster whose `datastore` on `host` is a 4 MiB tmpfs; `None` (said
/// loudly) where mounting is not allowed.
fn cluster_with_small(d: &Path, host: &str, test: &str) -> Option<SmallDisk> {
    common::two_synthetic_hosts(d);
    let small = SmallDisk::mount(&d.join(format!("datastores/{host}/archive")), "4m");
    if small.is_none() {
        println!("SKIPPED {test}: mounting a tmpfs needs root");
    }
    small
}

fn create_with_disk(d: &Path, vm: &str, datastore: &str, disk_mib: &str) {
    common::create_running_small(
        d,
        vm,
        &[
            "--disk-mib",
            disk_mib,
            "--datastore",
            datastore,
            "--disk-workload",
        ],
    );
}

#[test]
fn a_guest_whose_datastore_is_full_shows_failing_writes_until_space_returns() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let Some(small) = cluster_with_small(d, "host-a", "guest ENOSPC") else {
        return;
    };
    let _a = Node::start(d, "host-a", &[]);
    let _b = Node::start(d, "host-b", &[]);
    // A disk smaller than the datastore: once space is back it fits whole
    // (the workload keeps writing new blocks of it).
    create_with_disk(d, "web-1", "archive", "2");
    std::thread::sleep(Duration::from_secs(1));
    small.fill();

    let list = until_output(d, &["vm", "list"], "disk writes failing", false);
    assert!(
        list.contains("disk writes failing: disk disk0: write disk: datastore archive is full"),
        "{list}"
    );
    let disks = ferry(d, &with_client(&["vm", "disks", "web-1"]));
    assert!(disks.contains("WRITES FAILING"), "{disks}");
    let audit = until_output(d, &["audit"], "disk writes failing", false);
    assert!(audit.contains("web-1"), "{audit}");

    small.free();
    until_output(d, &["vm", "list"], "disk writes failing", true);
    until_output(d, &["audit"], "disk writes recovered", false);
    // Nothing the guest was told was written is missing.
    let verified = ferry(d, &with_client(&["vm", "disks", "web-1", "--verify"]));
    assert!(verified.contains("blocks ok"), "{verified}");
}

#[test]
fn a_migration_onto_a_full_datastore_aborts_naming_it_and_the_vm_stays() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let Some(small) = cluster_with_small(d, "host-b", "migration onto a full datastore") else {
        return;
    };
    let _a = Node::start(d, "host-a", &[]);
    let _b = Node::start(d, "host-b", &[]);
    create_with_disk(d, "web-1", "local", "32");
    // Some megabytes of written blocks to copy, and room for the VM's
    // home files but not for them.
    std::thread::sleep(Duration::from_secs(3));
    small.fill_leaving(256 << 10);

    let (out, ok, err) = ferry_status(
        d,
        &with_client(&[
            "migrate",
            "web-1",
            "--to",
            "host-b",
            "--datastore",
            "archive",
        ]),
    );
    assert!(!ok, "the migration cannot succeed:\n{out}");
    let said = format!("{out}\n{err}");
    assert!(
        said.contains("host-b could not store the disk copy")
            && said.contains("datastore archive is full"),
        "the cause is named:\n{said}"
    );
    assert!(
        !said.contains("then resume"),
        "not taken for a broken link and resumed:\n{said}"
    );
    let list = ferry(d, &with_client(&["vm", "list"]));
    let row = list.lines().find(|l| l.starts_with("web-1")).unwrap_or("");
    assert!(row.contains("host-a") && row.contains("Running"), "{list}");
    let verified = ferry(d, &with_client(&["vm", "disks", "web-1", "--verify"]));
    assert!(verified.contains("blocks ok"), "{verified}");
}
