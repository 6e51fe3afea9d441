//! The project's Linux test guest migrated live between two real `ferry
//! node` processes over QUIC (mutual TLS) on loopback, while its
//! user-space dirtier rewrites and checks its memory: memory verified at
//! the switchover, and the console (read through the nodes, as `ferry vm
//! console` does) shows the passes going on on the destination.
//!
//! Skipped loudly where /dev/kvm is missing or the guest is not built
//! (failing instead under `FERRY_REQUIRE_GUEST=1`, as in CI).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Node, ferry, ferry_status, newest_dirtier_pass as newest_pass};

fn console(d: &Path, vm: &str) -> String {
    ferry_status(d, &["vm", "console", vm, "--client", "client.toml"]).0
}

/// Waits until the console shows dirtier pass `pass`; returns the text.
fn wait_for_pass(d: &Path, vm: &str, pass: u64, limit: Duration) -> String {
    let start = Instant::now();
    loop {
        let text = console(d, vm);
        if newest_pass(&text) >= pass {
            return text;
        }
        assert!(
            start.elapsed() < limit,
            "no dirtier pass {pass} within {limit:?}; console:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn a_linux_guest_migrates_live_between_two_nodes_and_its_dirtier_goes_on() {
    let Some(image) = common::linux_guest_or_skip("a_linux_guest_migrates_live", 32) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    common::two_hosts(d);
    let _a = Node::start(d, "host-a", &[]);
    let _b = Node::start(d, "host-b", &[]);
    let baseline = ferry(d, &["cluster", "cpu-baseline", "--client", "client.toml"]);
    println!("cluster CPU baseline: {baseline}");
    assert!(baseline.contains("sse2"), "{baseline}");
    let kernel = image.kernel.display().to_string();
    // Without `quiet`, the kernel says how many CPUs it brought up.
    let cmdline = image.cmdline.replace(" quiet", "");
    let initrd = image.initrd.as_ref().expect("initrd").display().to_string();
    ferry(
        d,
        &[
            "vm",
            "create",
            "lx",
            "--node",
            "host-a",
            "--memory",
            "256",
            "--vcpus",
            "2",
            "--cpu-model",
            "baseline",
            "--kernel",
            &kernel,
            "--initrd",
            &initrd,
            "--cmdline",
            &cmdline,
            "--client",
            "client.toml",
        ],
    );
    let booted = Instant::now();
    ferry(d, &["vm", "start", "lx", "--client", "client.toml"]);
    let before = wait_for_pass(d, "lx", 2, Duration::from_secs(240));
    println!(
        "booted to dirtier pass 2 in {:.1} s:\n{before}",
        booted.elapsed().as_secs_f64()
    );
    assert!(
        before.contains("Brought up 1 node, 2 CPUs"),
        "both vCPUs run:\n{before}"
    );
    let at_migration = newest_pass(&before);

    let report = ferry(
        d,
        &[
            "migrate",
            "lx",
            "--to",
            "host-b",
            "--verify",
            "--client",
            "client.toml",
        ],
    );
    println!("{report}");
    let list = ferry(d, &["vm", "list", "--client", "client.toml"]);
    let on: Vec<&str> = list
        .lines()
        .filter(|l| l.split_whitespace().next() == Some("lx"))
        .collect();
    assert_eq!(on.len(), 1, "one copy:\n{list}");
    assert!(
        on[0].contains("host-b") && on[0].contains("Running"),
        "{list}"
    );

    // The console carries its recent lines along: new passes must come
    // after the newest one host-b has at the start.
    let arrived = newest_pass(&console(d, "lx"));
    assert!(arrived >= at_migration, "the console's lines moved along");
    let after = wait_for_pass(d, "lx", arrived + 2, Duration::from_secs(90));
    println!("on host-b, from pass {arrived}:\n{after}");
}
