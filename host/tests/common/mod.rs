//! What the tests that run `ferry` processes share: running the binary,
//! free ports, and node processes that stop on SIGTERM.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod netns;

pub const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// KVM guests where /dev/kvm works; otherwise says so loudly for `test`
/// and gives synthetic guests, so the rest of the test still runs.
pub fn kvm_or_synthetic(test: &str) -> ferry_host::node::factory::HostFactory {
    use ferry_host::node::factory::HostFactory;
    match ferry_host::kvm::available() {
        Ok(()) => HostFactory::probe(),
        Err(e) => {
            println!("KVM MISSING for {test}: {e}; running it with synthetic guests instead");
            HostFactory::synthetic_only()
        }
    }
}

/// Runs `ferry ARGS` in `dir`, without a telemetry endpoint, and returns its
/// output, whether it succeeded and its stderr.
pub fn ferry_status(dir: &Path, args: &[&str]) -> (String, bool, String) {
    let out = Command::new(FERRY)
        .args(args)
        .current_dir(dir)
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .output()
        .expect("run ferry");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Runs `ferry ARGS` in `dir` and returns its output; fails the test if
/// it fails.
pub fn ferry(dir: &Path, args: &[&str]) -> String {
    let (out, ok, err) = ferry_status(dir, args);
    assert!(ok, "ferry {args:?} failed:\n{out}\n{err}");
    out
}

/// `cluster init` in `dir` for host-a and host-b on free loopback ports,
/// 1 GiB each, both running synthetic guests.
pub fn two_synthetic_hosts(dir: &Path) {
    two_hosts(dir);
    for name in ["host-a", "host-b"] {
        let path = dir.join(format!("node-{name}.toml"));
        let text = std::fs::read_to_string(&path).expect("node file");
        let text = text.replace("synthetic_guests = false", "synthetic_guests = true");
        std::fs::write(&path, text).expect("write");
    }
}

/// `cluster init` in `dir` for host-a and host-b on free loopback ports,
/// 1 GiB each (KVM guests where /dev/kvm works).
pub fn two_hosts(dir: &Path) {
    let (pa, pb) = (free_udp_port(), free_udp_port());
    ferry(
        dir,
        &[
            "cluster",
            "init",
            "--dir",
            ".",
            "--host",
            &format!("host-a=127.0.0.1:{pa}"),
            "--host",
            &format!("host-b=127.0.0.1:{pb}"),
            "--memory-mib",
            "1024",
        ],
    );
}

/// The Linux test guest running its dirtier on a `mib`-MiB buffer, or
/// `None` (having said why) where /dev/kvm is missing or the guest is not
/// built — a failure instead under `FERRY_REQUIRE_GUEST=1`, as in CI.
pub fn linux_guest_or_skip(test: &str, mib: u64) -> Option<ferry_host::kvm::linux::LinuxImage> {
    if let Err(e) = ferry_host::kvm::available() {
        println!("SKIPPED {test}: {e} (KVM tests need /dev/kvm)");
        return None;
    }
    match ferry_host::guest_images::linux_test_guest("dirtier", mib) {
        Ok(image) => Some(image),
        Err(e) if std::env::var_os("FERRY_REQUIRE_GUEST").is_some() => panic!("{test}: {e}"),
        Err(e) => {
            println!("SKIPPED {test}: {e}");
            None
        }
    }
}

/// The newest "ferry-dirtier pass N ok" in console output; fails the test
/// on a MISMATCH line.
pub fn newest_dirtier_pass(console: &str) -> u64 {
    assert!(
        !console.contains("MISMATCH"),
        "the dirtier found bad pages:\n{console}"
    );
    console
        .lines()
        .filter_map(|l| l.strip_prefix("ferry-dirtier pass ")?.strip_suffix(" ok"))
        .filter_map(|n| n.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

/// A `ferry node` process.
pub struct Node(Child);

impl Node {
    /// Starts `node-NAME.toml` in `dir` with `env` and waits until it
    /// listens.
    pub fn start(dir: &Path, name: &str, env: &[(&str, &str)]) -> Self {
        Self::start_watching(dir, name, env, "warn", &[]).0
    }

    /// Starts a node with log filter `log` and returns it with a channel
    /// that gets the index of each of `marks` the first time a log line
    /// contains it (the test's way to act at a protocol step within a few
    /// milliseconds).
    pub fn start_watching(
        dir: &Path,
        name: &str,
        env: &[(&str, &str)],
        log: &str,
        marks: &[&str],
    ) -> (Self, std::sync::mpsc::Receiver<usize>) {
        let mut command = Command::new(FERRY);
        command.args(["node", "--config", &format!("node-{name}.toml")]);
        command.env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
        command.envs(env.iter().copied());
        Self::start_command(command, dir, name, log, marks)
    }

    /// Starts `node-NAME.toml` inside network namespace `ns`.
    pub fn start_in_netns(dir: &Path, name: &str, ns: &str) -> Self {
        let mut command = netns::Segment::command(ns, Path::new(FERRY));
        command.args(["node", "--config", &format!("node-{name}.toml")]);
        command.env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
        Self::start_command(command, dir, name, "warn", &[]).0
    }

    /// Starts `node-NAME.toml` in its own mount namespace, where directory
    /// `over` is bind-mounted on path `at` (root only): two nodes on one
    /// machine see different directories at the same path, as two hosts
    /// would. `None` where that cannot be done.
    pub fn start_seeing(dir: &Path, name: &str, over: &Path, at: &Path) -> Option<Self> {
        let probe = Command::new("unshare")
            .args(["-m", "--propagation", "private", "true"])
            .status();
        if !probe.is_ok_and(|s| s.success()) {
            return None;
        }
        let mut command = Command::new("unshare");
        command
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .args(["-m", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount --bind "$0" "$1" && exec "$2" node --config "$3""#)
            .arg(over)
            .arg(at)
            .arg(FERRY)
            .arg(format!("node-{name}.toml"));
        Some(Self::start_command(command, dir, name, "warn", &[]).0)
    }

    fn start_command(
        mut command: Command,
        dir: &Path,
        name: &str,
        log: &str,
        marks: &[&str],
    ) -> (Self, std::sync::mpsc::Receiver<usize>) {
        // The caller's environment stays (a test may name a collector).
        let mut child = command
            .current_dir(dir)
            .env("RUST_LOG", log)
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn node");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        let (marks_tx, marks_rx) = std::sync::mpsc::channel();
        let marks: Vec<String> = marks.iter().map(|m| (*m).to_owned()).collect();
        let tag = name.to_owned();
        std::thread::spawn(move || {
            let mut seen = vec![false; marks.len()];
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening") {
                    let _ = tx.send(());
                }
                for (i, m) in marks.iter().enumerate() {
                    if !seen[i] && line.contains(m.as_str()) {
                        seen[i] = true;
                        let _ = marks_tx.send(i);
                    }
                }
                eprintln!("[{tag}] {line}");
            }
        });
        rx.recv_timeout(Duration::from_secs(30))
            .expect("the node came up");
        (Self(child), marks_rx)
    }

    /// SIGKILL, as a crash would, and wait until it is gone.
    pub fn kill(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// SIGTERM, so the node flushes its spans, then wait.
    pub fn stop(mut self) {
        let pid = i32::try_from(self.0.id()).expect("pid");
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.0.try_wait() {
                assert!(status.success(), "node exited with {status}");
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        panic!("the node did not stop on SIGTERM");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
    }
}

/// A small tmpfs mounted on a directory for the test's life (root only).
pub struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    pub fn mount(path: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(path).expect("mount point");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Self(path.to_owned()))
    }

    /// Writes a file until the filesystem is full.
    pub fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.0.join("filler")).expect("filler");
        let block = vec![0xa5u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }

    /// Fills the filesystem, then gives `bytes` of it back.
    pub fn fill_leaving(&self, bytes: u64) {
        self.fill();
        let filler = self.0.join("filler");
        let len = std::fs::metadata(&filler).expect("filler").len();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&filler)
            .expect("filler");
        f.set_len(len.saturating_sub(bytes)).expect("shrink filler");
    }

    pub fn free(&self) {
        std::fs::remove_file(self.0.join("filler")).expect("remove filler");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// `vm create VM --node host-a --memory 64 --wss 8 EXTRA...` then `vm
/// start VM`, with `client.toml`.
pub fn create_running_small(dir: &Path, vm: &str, extra: &[&str]) {
    let mut args = vec![
        "vm", "create", vm, "--node", "host-a", "--memory", "64", "--wss", "8",
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--client", "client.toml"]);
    ferry(dir, &args);
    ferry(dir, &["vm", "start", vm, "--client", "client.toml"]);
}
