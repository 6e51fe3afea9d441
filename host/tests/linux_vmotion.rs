//! vMotion of a real guest, end to end: the Linux test guest writes
//! ferry's verifiable pattern to its virtio disk (O_DIRECT, fdatasync
//! after every write, each acknowledged write printed on its console) and
//! answers a UDP peer on its virtio NIC while it is migrated live, memory
//! and disk in one switchover, between two `ferry node` processes, each in
//! a network namespace of its own with its own bridge (a veth pair joins
//! the bridges; the peer hangs off host-a's). Once with each disk copy
//! method: mirror to host-b, cbt back to host-a, snapshot to host-b.
//!
//! Afterwards every write the guest saw acknowledged is on the final
//! destination's disk file, the guest still answers, and the test prints
//! how many of the peer's requests went unanswered around each switchover
//! and the longest silence (the destination announces the guest's MAC
//! with RARP, so the bridges learn its new port at once).
//!
//! Skipped loudly where /dev/kvm is missing, the guest is not built or
//! namespaces cannot be made (not root); under `FERRY_REQUIRE_GUEST=1`,
//! as in CI, the first two fail instead.

mod common;

use std::net::UdpSocket;
use std::path::Path;
use std::time::{Duration, Instant};

use common::Node;
use common::netns::{PEER_IP, Segment, host_ip};
use ferry_actors::storage::pattern::WritePattern;
use ferry_host::net::probe::{Prober, unix_ms_now};

const DISK_MIB: u64 = 16;
const GUEST_IP: &str = "10.77.0.2";
const GUEST_PORT: u16 = 7777;
/// How often the peer asks. The guest kernel's network path costs it
/// about 40 ms a packet here (its ring-0 code is emulated, PLATFORM.md),
/// so it answers about 25 a second when idle and fewer than 10 while a
/// user-space loop keeps its one vCPU busy: the guest runs no memory
/// dirtier in this test (its disk writer and responder still dirty
/// memory), and the peer asks 4 times a second.
const PROBE_EVERY: Duration = Duration::from_millis(250);

/// The cluster as seen from host-a's namespace.
struct Cluster<'a> {
    dir: &'a Path,
    ns: &'a str,
}

impl Cluster<'_> {
    fn ferry(&self, args: &[&str]) -> String {
        let mut all = args.to_vec();
        all.extend(["--client", "client.toml"]);
        let (out, ok, err) = Segment::ferry(self.ns, self.dir, &all);
        assert!(ok, "ferry {args:?} failed:\n{out}\n{err}");
        out
    }

    /// The console's output (empty until the guest printed something).
    fn console(&self) -> String {
        let args = ["vm", "console", "lx", "--client", "client.toml"];
        Segment::ferry(self.ns, self.dir, &args).0
    }

    /// Waits until the console says `what` (checked by `seen`).
    fn wait_for<T>(&self, what: &str, limit: Duration, seen: impl Fn(&str) -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            let text = self.console();
            if let Some(t) = seen(&text) {
                return t;
            }
            assert!(
                start.elapsed() < limit,
                "no {what} within {limit:?}; console:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
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

/// Asks the guest every [`PROBE_EVERY`] from the peer's namespace (the
/// socket is made there; the prober thread may run anywhere).
fn probe(seg: &Segment) -> Prober {
    let socket = seg
        .in_peer(|| UdpSocket::bind((PEER_IP, 0)).expect("peer socket"))
        .join()
        .expect("peer namespace");
    let target = format!("{GUEST_IP}:{GUEST_PORT}").parse().expect("address");
    Prober::start(socket, target, PROBE_EVERY).expect("prober")
}

/// When the destination's vCPUs ran again (Unix ms), from its side of a
/// `migrate --json` report: the end of its `resume` phase.
fn resumed_unix_ms(report: &serde_json::Value) -> Option<f64> {
    let dest = &report["destination"];
    let resume = dest["phases"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == "resume")?;
    let at = resume["end_ms"]
        .as_f64()
        .or_else(|| resume["start_ms"].as_f64())?;
    Some(dest["started_unix_ms"].as_f64()? + at)
}

/// `cluster init` for two hosts listening on their bridges, whose guests'
/// NICs join bridge `br0`.
fn init_cluster(d: &Path) {
    let hosts: Vec<String> = (0..2)
        .map(|i| format!("host-{}={}:7401", ["a", "b"][i], host_ip(i)))
        .collect();
    common::ferry(
        d,
        &[
            "cluster",
            "init",
            "--dir",
            ".",
            "--host",
            &hosts[0],
            "--host",
            &hosts[1],
            "--memory-mib",
            "1024",
        ],
    );
    for name in ["host-a", "host-b"] {
        let path = d.join(format!("node-{name}.toml"));
        let text = std::fs::read_to_string(&path).expect("node file");
        // Shadows take memory faulted in ahead (first touch of cold
        // memory is slow on these machines, PLATFORM.md).
        let text = text
            .replace(
                "synthetic_guests = false",
                "synthetic_guests = false\nbridge = \"br0\"",
            )
            .replace("memory_pool_mib = []", "memory_pool_mib = [128]");
        std::fs::write(&path, text).expect("write");
    }
}

#[test]
fn a_linux_guest_keeps_its_disk_writes_and_its_network_peer_across_every_method() {
    let test = "a_linux_guest_keeps_its_disk_writes_and_its_network_peer";
    let Some(image) = common::linux_guest_or_skip(test, 8) else {
        return;
    };
    let seg = match Segment::two_hosts() {
        Ok(s) => s,
        Err(e) => {
            println!("SKIPPED {test}: {e}");
            return;
        }
    };
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    init_cluster(d);
    let _a = Node::start_in_netns(d, "host-a", &seg.hosts[0]);
    let _b = Node::start_in_netns(d, "host-b", &seg.hosts[1]);
    let c = Cluster {
        dir: d,
        ns: &seg.hosts[0],
    };
    let kernel = image.kernel.display().to_string();
    let initrd = image.initrd.as_ref().expect("initrd").display().to_string();
    // The disk writer pauses 250 ms between writes: each write costs the
    // guest's emulated kernel a few hundred ms of its one vCPU, which the
    // network path needs too.
    let cmdline = format!(
        "{} ferry_ip={GUEST_IP}/24 ferry_disk_gap=250",
        image
            .cmdline
            .replace("ferry_run=dirtier", "ferry_run=shell")
    );
    let disk_mib = DISK_MIB.to_string();
    c.ferry(&[
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
        &cmdline,
        "--disk-mib",
        &disk_mib,
        "--datastore",
        "local",
        "--disk-workload",
    ]);
    let booted = Instant::now();
    c.ferry(&["vm", "start", "lx"]);
    let first = c.wait_for("acknowledged disk write", Duration::from_secs(240), |t| {
        (newest_acked(t) > 0 && t.contains("ferry-responder on udp")).then(|| newest_acked(t))
    });
    println!(
        "booted, answering and writing its disk after {:.1} s (write {first})",
        booted.elapsed().as_secs_f64()
    );
    let prober = probe(&seg);
    std::thread::sleep(Duration::from_secs(2));

    let mut windows = Vec::new();
    let mut host = "host-a";
    for (method, to) in [
        ("mirror", "host-b"),
        ("cbt", "host-a"),
        ("snapshot", "host-b"),
    ] {
        let before = newest_acked(&c.console());
        let started = unix_ms_now();
        let out = c.ferry(&[
            "migrate",
            "lx",
            "--to",
            to,
            "--datastore",
            "local",
            "--method",
            method,
            "--verify",
            "--json",
        ]);
        let ended = unix_ms_now();
        let report: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("report {e}:\n{out}"));
        let disk = &report["disks"][0];
        assert_eq!(report["to"], to, "{report}");
        assert_eq!(disk["method"], method, "{report}");
        assert!(disk["error"].is_null(), "{report}");
        let line = c.ferry(&["vm", "list"]);
        assert!(
            line.lines()
                .any(|l| l.starts_with("lx") && l.contains(to) && l.contains("Running")),
            "{line}"
        );
        // The guest goes on writing on its new host, and the node there
        // finds every write the guest had acknowledged on its disk.
        let after = c.wait_for("disk write on the new host", Duration::from_secs(60), |t| {
            (newest_acked(t) > before + 1).then(|| newest_acked(t))
        });
        let disks = c.ferry(&["vm", "disks", "lx", "--verify"]);
        assert!(disks.contains("blocks ok"), "{disks}");
        windows.push((method, host, to, started, ended + 1000.0, report.clone()));
        println!(
            "{method} {host} -> {to}: total {:.1} ms, downtime {:.2} ms, memory verified {}, \
             disk copied {} of {} bytes ({} skipped), {} mirrored writes, {} overlay blocks, \
             disk pause {:.2} ms; guest disk writes acknowledged {before} before, {after} after",
            report["total_ms"].as_f64().unwrap_or(0.0),
            report["downtime_ms"].as_f64().unwrap_or(0.0),
            report["memory_verified"],
            disk["copied_bytes"],
            disk["disk_bytes"],
            disk["skipped_bytes"],
            disk["mirrored_writes"],
            disk["overlay_blocks"],
            disk["pause_ms"].as_f64().unwrap_or(0.0),
        );
        host = to;
    }
    std::thread::sleep(Duration::from_secs(1));
    let probes = prober.finish();
    let answered = probes.answered_count();
    println!(
        "the peer sent {} requests every {PROBE_EVERY:?}; {answered} answered",
        probes.sent.len()
    );
    let mut silences = Vec::new();
    for (method, from, to, start, end, report) in &windows {
        let o = probes.outage(*start, *end);
        let resumed = resumed_unix_ms(report);
        let every_ms = PROBE_EVERY.as_secs_f64() * 1e3;
        let first = resumed
            .and_then(|r| {
                Some((
                    probes.first_answer_after(r)?,
                    probes.first_answer_wait(r, every_ms)?,
                ))
            })
            .map_or_else(
                || "none".to_owned(),
                |(after, wait)| format!("{after:.0} ms ({wait:.0} ms after a request was there)"),
            );
        println!(
            "{method} {from} -> {to}: {} of {} requests unanswered, longest silence {:.0} ms \
             (downtime {:.2} ms), first answer after the resume {first}; \
             sent at ms:answered after ms: {}",
            o.unanswered,
            o.sent,
            o.longest_silence_ms,
            report["downtime_ms"].as_f64().unwrap_or(0.0),
            o.fates
        );
        silences.push((method, Duration::from_secs_f64(o.longest_silence_ms / 1e3)));
    }
    for (method, silence) in silences {
        assert!(
            silence < Duration::from_secs(3),
            "{method}: the guest was unreachable for {silence:?}"
        );
    }
    let last_second = probes.answered_since(unix_ms_now() - 1500.0);
    assert!(last_second > 0, "the guest answers on its last host");

    // Stop the guest, then check the disk file itself against the last
    // write the guest saw acknowledged.
    c.ferry(&["vm", "stop", "lx"]);
    let acked = newest_acked(&c.console());
    let path = d.join(format!("datastores/{host}/local/lx/disk0.raw"));
    let bytes = std::fs::read(&path).expect("disk file");
    assert_eq!(bytes.len() as u64, DISK_MIB << 20, "{}", path.display());
    let checked = WritePattern::new(DISK_MIB << 20)
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
