//! Network namespaces, bridges and veth pairs for tests that run nodes
//! as two hosts on one L2 segment (root only): each host's namespace has
//! a bridge; a veth pair joins the two bridges; a peer namespace hangs
//! off the first bridge. Every address is in 10.77.0.0/24, inside these
//! namespaces only. Everything is deleted when the value drops.

use std::path::Path;
use std::process::{Child, Command, Stdio};

/// The address a host's bridge gets (its node listens there).
pub fn host_ip(i: usize) -> String {
    format!("10.77.0.{}", 1 + 2 * i)
}

/// The peer's address.
pub const PEER_IP: &str = "10.77.0.9";

/// The namespaces of one test.
pub struct Segment {
    /// Each host's namespace.
    pub hosts: Vec<String>,
    /// The peer's namespace.
    pub peer: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn in_ns(ns: &str, args: &[&str]) -> Result<(), String> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    ip(&all)
}

impl Segment {
    /// Two host namespaces with bridge `br0` each (10.77.0.1 and .3),
    /// joined by a veth pair, and a peer namespace (10.77.0.9) on the
    /// first bridge. `Err` (why) where that cannot be done here.
    pub fn two_hosts() -> Result<Self, String> {
        // SAFETY: no arguments.
        if unsafe { libc::geteuid() } != 0 {
            return Err("network namespaces need root".into());
        }
        let tag = std::process::id();
        let seg = Self {
            hosts: vec![format!("fy{tag}a"), format!("fy{tag}b")],
            peer: format!("fy{tag}p"),
        };
        seg.build()?;
        Ok(seg)
    }

    fn build(&self) -> Result<(), String> {
        for ns in self.hosts.iter().chain([&self.peer]) {
            ip(&["netns", "add", ns])?;
            in_ns(ns, &["link", "set", "lo", "up"])?;
        }
        for (i, ns) in self.hosts.iter().enumerate() {
            in_ns(ns, &["link", "add", "br0", "type", "bridge"])?;
            in_ns(
                ns,
                &["addr", "add", &format!("{}/24", host_ip(i)), "dev", "br0"],
            )?;
            in_ns(ns, &["link", "set", "br0", "up"])?;
        }
        let (a, b) = (&self.hosts[0], &self.hosts[1]);
        ip(&[
            "link", "add", "fyva", "netns", a, "type", "veth", "peer", "fyvb", "netns", b,
        ])?;
        ip(&[
            "link", "add", "fyvp", "netns", &self.peer, "type", "veth", "peer", "fyvpa", "netns", a,
        ])?;
        for (ns, dev) in [(a, "fyva"), (b, "fyvb"), (a, "fyvpa")] {
            in_ns(ns, &["link", "set", dev, "master", "br0"])?;
            in_ns(ns, &["link", "set", dev, "up"])?;
        }
        in_ns(
            &self.peer,
            &["addr", "add", &format!("{PEER_IP}/24"), "dev", "fyvp"],
        )?;
        in_ns(&self.peer, &["link", "set", "fyvp", "up"])?;
        Ok(())
    }

    /// A command run inside namespace `ns`.
    pub fn command(ns: &str, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }

    /// Runs `ferry ARGS` in `dir` inside `ns`; returns its output, whether
    /// it succeeded and its stderr.
    pub fn ferry(ns: &str, dir: &Path, args: &[&str]) -> (String, bool, String) {
        let out = Self::command(ns, Path::new(super::FERRY))
            .args(args)
            .current_dir(dir)
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdin(Stdio::null())
            .output()
            .expect("run ferry");
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs `f` on a thread of its own inside the peer's namespace.
    pub fn in_peer<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.peer);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("peer namespace");
            // SAFETY: a namespace file descriptor; only this thread moves.
            let r =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        for ns in self.hosts.iter().chain([&self.peer]) {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// A process that is killed when the value drops.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
