//! Storage vMotion under a real guest: the Linux test guest writes ferry's
//! verifiable pattern to its virtio disk (O_DIRECT, fdatasync after every
//! write, each acknowledged write printed on its console) while it is
//! migrated live, memory and disk in one switchover, between two `ferry
//! node` processes, once with each copy method: mirror to host-b, cbt
//! back to host-a, snapshot to host-b. The guest's disk requests go
//! through the node's disk actor (the VMM's disk channel), so every
//! method sees every write. Afterwards every write the guest saw
//! acknowledged is on the destination's disk file.
//!
//! Skipped loudly where /dev/kvm is missing or the guest is not built
//! (failing instead under `FERRY_REQUIRE_GUEST=1`, as in CI).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Node, ferry, ferry_status};
use ferry_actors::storage::pattern::WritePattern;

const CLIENT: [&str; 2] = ["--client", "client.toml"];
const DISK_MIB: u64 = 16;

fn console(d: &Path, vm: &str) -> String {
    ferry_status(d, &["vm", "console", vm, "--client", "client.toml"]).0
}

/// The newest "ferry-diskwriter acked N" on the console; fails the test on
/// a failed write.
fn newest_acked(console: &str) -> u64 {
    assert!(
        !console.contains("ferry-diskwriter write"),
        "a guest disk write failed:\n{console}"
    );
    console
        .lines()
        .filter_map(|l| l.strip_prefix("ferry-diskwriter acked "))
        .filter_map(|n| n.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

/// Waits until the guest has acknowledged more than `than` writes.
fn wait_for_acked(d: &Path, vm: &str, than: u64, limit: Duration) -> u64 {
    let start = Instant::now();
    loop {
        let text = console(d, vm);
        let acked = newest_acked(&text);
        if acked > than {
            return acked;
        }
        assert!(
            start.elapsed() < limit,
            "no disk write past {than} within {limit:?}; console:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The VM's one line of `vm list`.
fn vm_line(d: &Path, vm: &str) -> String {
    let list = ferry(d, &["vm", "list", "--client", "client.toml"]);
    let lines: Vec<&str> = list
        .lines()
        .filter(|l| l.split_whitespace().next() == Some(vm))
        .collect();
    assert_eq!(lines.len(), 1, "one copy of {vm}:\n{list}");
    lines[0].to_owned()
}

/// Migrates `vm` with its disk to `to`'s `local` datastore by `method`
/// and returns the report.
fn migrate(d: &Path, vm: &str, to: &str, method: &str) -> serde_json::Value {
    let out = ferry(
        d,
        &[
            "migrate",
            vm,
            "--to",
            to,
            "--datastore",
            "local",
            "--method",
            method,
            "--verify",
            "--json",
            "--client",
            "client.toml",
        ],
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("report {e}:\n{out}"))
}

#[test]
fn a_linux_guest_writing_its_virtio_disk_migrates_with_it_by_every_method() {
    let Some(image) = common::linux_guest_or_skip("a_linux_guest_writing_its_disk", 8) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    common::two_hosts(d);
    let _a = Node::start(d, "host-a", &[]);
    let _b = Node::start(d, "host-b", &[]);
    let kernel = image.kernel.display().to_string();
    let initrd = image.initrd.as_ref().expect("initrd").display().to_string();
    let mut create = vec![
        "vm",
        "create",
        "lx",
        "--node",
        "host-a",
        "--memory",
        "128",
        "--vcpus",
        "1",
        "--kernel",
        &kernel,
        "--initrd",
        &initrd,
        "--cmdline",
        &image.cmdline,
        "--disk-mib",
        "16",
        "--datastore",
        "local",
        "--disk-workload",
    ];
    create.extend(CLIENT);
    ferry(d, &create);
    let booted = Instant::now();
    ferry(d, &["vm", "start", "lx", "--client", "client.toml"]);
    let first = wait_for_acked(d, "lx", 0, Duration::from_secs(180));
    println!(
        "the guest's first acknowledged disk writes after {:.1} s (write {first})",
        booted.elapsed().as_secs_f64()
    );

    let mut host = "host-a";
    for (method, to) in [
        ("mirror", "host-b"),
        ("cbt", "host-a"),
        ("snapshot", "host-b"),
    ] {
        let before = newest_acked(&console(d, "lx"));
        let report = migrate(d, "lx", to, method);
        let disk = &report["disks"][0];
        println!(
            "{method} {host} -> {to}: total {:.1} ms, downtime {:.2} ms, memory verified {}, \
             disk copied {} of {} bytes ({} skipped) in {} rounds, {} mirrored writes, \
             {} overlay blocks, disk pause {:.2} ms; guest writes acknowledged before: {before}",
            report["total_ms"].as_f64().unwrap_or(0.0),
            report["downtime_ms"].as_f64().unwrap_or(0.0),
            report["memory_verified"],
            disk["copied_bytes"],
            disk["disk_bytes"],
            disk["skipped_bytes"],
            disk["rounds"],
            disk["mirrored_writes"],
            disk["overlay_blocks"],
            disk["pause_ms"].as_f64().unwrap_or(0.0),
        );
        assert_eq!(report["to"], to, "{report}");
        assert_eq!(disk["method"], method, "{report}");
        assert!(disk["error"].is_null(), "{report}");
        let line = vm_line(d, "lx");
        assert!(line.contains(to) && line.contains("Running"), "{line}");
        host = to;
        // The guest goes on writing on its new host, and the node there
        // finds every write the guest had acknowledged on its disk.
        let after = wait_for_acked(d, "lx", before + 1, Duration::from_secs(60));
        let disks = ferry(
            d,
            &["vm", "disks", "lx", "--verify", "--client", "client.toml"],
        );
        println!("on {to}, the guest acknowledged write {after}:\n{disks}");
        assert!(disks.contains("local"), "{disks}");
        assert!(disks.contains("blocks ok"), "{disks}");
    }

    // Stop the guest, then check the disk file itself against the last
    // write the guest saw acknowledged.
    ferry(d, &["vm", "stop", "lx", "--client", "client.toml"]);
    let acked = newest_acked(&console(d, "lx"));
    let path = disk_file(d, host);
    let bytes = std::fs::read(&path).expect("disk file");
    assert_eq!(bytes.len() as u64, DISK_MIB << 20, "{}", path.display());
    let pattern = WritePattern::new(DISK_MIB << 20);
    let checked = pattern
        .verify(acked, 1 << 40, |offset, buf| {
            let at = usize::try_from(offset).expect("offset");
            buf.copy_from_slice(&bytes[at..at + buf.len()]);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("an acknowledged guest write is missing: {e}"));
    println!(
        "every write the guest acknowledged (up to {acked}) is on {}: {checked} blocks checked",
        path.display()
    );
    assert!(checked > 0);
}

/// The one disk file on `host`'s `local` datastore.
fn disk_file(d: &Path, host: &str) -> std::path::PathBuf {
    let root = d.join("datastores").join(host).join("local");
    let mut found = Vec::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("datastore").flatten() {
            let p = entry.path();
            if p.is_dir() {
                dirs.push(p);
            } else if std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0) == DISK_MIB << 20 {
                found.push(p);
            }
        }
    }
    assert_eq!(
        found.len(),
        1,
        "one disk file on {}: {found:?}",
        root.display()
    );
    found.remove(0)
}
