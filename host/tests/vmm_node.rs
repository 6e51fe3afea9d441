//! VMs outlive their node: a `ferry node` killed with SIGKILL leaves its
//! guests running in their VMM processes; the node that starts again
//! re-attaches to them (same processes, pass counters going on, not a
//! fresh boot); a VMM that died while the node was down is reported as a
//! crash (the VM stays stopped, the audit log says why); `vm upgrade`
//! moves a running guest to a new VMM process and prints its downtime.
//! Skipped, saying so, where /dev/kvm is missing.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Node, ferry};
use ferry_actors::guest::GuestBackend;
use ferry_host::vmm::{VmmGuest, VmmHome};

fn home(d: &Path) -> VmmHome {
    VmmHome {
        exe: env!("CARGO_BIN_EXE_ferry").into(),
        dir: d.join("ferry-host-a-vmm"),
    }
}

/// The `vm list` line of `vm`: (phase, passes).
fn listed(d: &Path, vm: &str) -> (String, u64) {
    let list = ferry(d, &["vm", "list", "--client", "client.toml"]);
    let line = list
        .lines()
        .find(|l| l.split_whitespace().next() == Some(vm))
        .unwrap_or_else(|| panic!("{vm} not listed:\n{list}"));
    let cols: Vec<&str> = line.split_whitespace().collect();
    (cols[2].to_owned(), cols[6].parse().expect("passes"))
}

fn wait_listed_pass(d: &Path, vm: &str, pass: u64) -> u64 {
    let start = Instant::now();
    loop {
        let (_, now) = listed(d, vm);
        if now >= pass {
            return now;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{vm} stuck at pass {now} (< {pass})"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn create_and_start(d: &Path, vm: &str) {
    ferry(
        d,
        &[
            "vm",
            "create",
            vm,
            "--node",
            "host-a",
            "--memory",
            "64",
            "--wss",
            "1",
            "--client",
            "client.toml",
        ],
    );
    ferry(d, &["vm", "start", vm, "--client", "client.toml"]);
}

#[test]
fn guests_outlive_a_killed_node_and_are_reattached_and_upgraded() {
    if let Err(e) = ferry_host::kvm::available() {
        println!(
            "SKIPPED guests_outlive_a_killed_node_and_are_reattached_and_upgraded: {e} (KVM tests need /dev/kvm)"
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    common::two_hosts(d);
    // host-b only answers: an unreachable peer would slow every CLI call.
    let _b = Node::start(d, "host-b", &[]);
    let node = Node::start(d, "host-a", &[]);
    create_and_start(d, "kept");
    create_and_start(d, "lost");
    let before = wait_listed_pass(d, "kept", 3);
    let home = home(d);
    let pid_of = |vm: &str| {
        VmmGuest::attach(&home, vm)
            .expect("attach")
            .unwrap_or_else(|| panic!("no VMM serves {vm}"))
            .pid()
    };
    let (kept_pid, lost_pid) = (pid_of("kept"), pid_of("lost"));

    node.kill();
    // Nobody manages the guests now; they run on.
    let watcher = VmmGuest::attach(&home, "kept")
        .expect("attach")
        .expect("VMM");
    let p0 = watcher.progress().expect("progress").pass;
    let start = Instant::now();
    while watcher.progress().expect("progress").pass < p0 + 3 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the guest stopped with its node"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(watcher);
    // And one VMM dies meanwhile.
    // SAFETY: signalling a process this test's node started.
    unsafe { libc::kill(i32::try_from(lost_pid).expect("pid"), libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(300));

    let _node = Node::start(d, "host-a", &[]);
    let (phase, pass) = listed(d, "kept");
    assert_eq!(phase, "Running", "re-attached, running");
    assert!(
        pass >= before + 3,
        "the same guest, not a fresh boot: pass {pass}"
    );
    assert_eq!(pid_of("kept"), kept_pid, "the same VMM process");
    wait_listed_pass(d, "kept", pass + 2);

    let (phase, _) = listed(d, "lost");
    assert_eq!(
        phase, "Stopped",
        "a VM whose VMM died is not started silently"
    );
    let audit = ferry(d, &["audit", "--vm", "lost", "--client", "client.toml"]);
    assert!(
        audit.contains("vm crashed"),
        "the crash is in the audit log:\n{audit}"
    );

    let out = ferry(d, &["vm", "upgrade", "kept", "--client", "client.toml"]);
    println!("{out}");
    assert!(
        out.contains("downtime") && out.contains("no page copied"),
        "{out}"
    );
    let new_pid = pid_of("kept");
    assert_ne!(new_pid, kept_pid, "a new VMM process runs the guest");
    let (phase, pass) = listed(d, "kept");
    assert_eq!(phase, "Running");
    wait_listed_pass(d, "kept", pass + 2);

    // A VMM that dies under a running node is a VM crash: seen, audited,
    // left stopped; `vm start` boots it again.
    create_and_start(d, "victim");
    wait_listed_pass(d, "victim", 1);
    let victim = pid_of("victim");
    // SAFETY: signalling a process this test's node started.
    unsafe { libc::kill(i32::try_from(victim).expect("pid"), libc::SIGKILL) };
    let start = Instant::now();
    loop {
        let list = ferry(d, &["vm", "list", "--client", "client.toml"]);
        if list.contains("crashed: its VMM process") {
            assert_eq!(listed(d, "victim").0, "Stopped", "{list}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the crash went unseen:\n{list}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let start = Instant::now();
    while !ferry(d, &["audit", "--vm", "victim", "--client", "client.toml"]).contains("vm crashed")
    {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the crash is audited"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    ferry(d, &["vm", "start", "victim", "--client", "client.toml"]);
    assert_eq!(listed(d, "victim").0, "Running");
    assert_ne!(pid_of("victim"), victim, "booted in a new VMM process");
    wait_listed_pass(d, "victim", 2);

    ferry(d, &["vm", "stop", "kept", "--client", "client.toml"]);
    ferry(d, &["vm", "delete", "kept", "--client", "client.toml"]);
    let start = Instant::now();
    while Path::new(&format!("/proc/{new_pid}")).exists() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "deleting the VM ends its VMM process"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
