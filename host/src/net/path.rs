//! A network path between two hosts on one machine, for benchmarks and
//! tests that should not run on loopback: two network namespaces joined
//! by a veth pair at a chosen MTU, optionally rate-limited with `htb` on
//! both ends, optionally with delay and loss from a [`Relay`] per
//! direction of connection. Addresses are 10.78.0.1 and 10.78.0.2, inside
//! these namespaces only. Built with iproute2's `ip` and `tc`; needs root.
//! Everything is deleted when the value drops.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use ferry_transport::quic::QuicTuning;

use super::impairment::Impairment;
use super::relay::Relay;

/// What the path between the two sides is like.
#[derive(Debug, Clone, PartialEq)]
pub struct PathSpec {
    /// The veth pair's MTU (1500: Ethernet; 9000: jumbo frames).
    pub link_mtu: u16,
    /// Rate limit in each direction, in Mbit/s (`None`: as fast as the
    /// CPU moves packets).
    pub rate_mbit: Option<u32>,
    /// Added delay each way.
    pub one_way_delay: Duration,
    /// Probability (0 to 1) that a datagram is lost, each way.
    pub loss: f64,
}

impl PathSpec {
    /// A plain veth pair at `link_mtu`.
    pub fn veth(link_mtu: u16) -> Self {
        Self {
            link_mtu,
            rate_mbit: None,
            one_way_delay: Duration::ZERO,
            loss: 0.0,
        }
    }

    /// Whether datagrams go through a relay (delay or loss asked for).
    pub fn impaired(&self) -> bool {
        !self.one_way_delay.is_zero() || self.loss > 0.0
    }

    /// Checks the numbers.
    pub fn validate(&self) -> Result<(), PathError> {
        let bad = |what: String| Err(PathError::Invalid(what));
        if !(1280..=65_535).contains(&self.link_mtu) {
            return bad(format!(
                "MTU {} is outside 1280..=65535 (QUIC needs at least 1280)",
                self.link_mtu
            ));
        }
        if self.rate_mbit == Some(0) {
            return bad("a rate of 0 Mbit/s carries nothing".into());
        }
        if !(0.0..0.5).contains(&self.loss) {
            return bad(format!("loss {:.1}% is outside 0..50%", self.loss * 100.0));
        }
        if self.one_way_delay > Duration::from_secs(5) {
            return bad(format!("{:?} one way is more than 5 s", self.one_way_delay));
        }
        Ok(())
    }

    /// Words for the path, e.g. "veth MTU 1500, 200 Mbit/s, 75 ms each
    /// way, 1.0% loss".
    pub fn describe(&self) -> String {
        let mut s = format!("veth MTU {}", self.link_mtu);
        if let Some(r) = self.rate_mbit {
            s += &format!(", {r} Mbit/s");
        }
        if !self.one_way_delay.is_zero() {
            s += &format!(", {} ms each way", self.one_way_delay.as_millis());
        }
        if self.loss > 0.0 {
            s += &format!(", {:.1}% loss", self.loss * 100.0);
        }
        s
    }
}

/// Why a path could not be built or used.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    /// The numbers asked for make no path.
    #[error("bad path: {0}")]
    Invalid(String),
    /// Namespaces need root.
    #[error("network namespaces need root (CAP_SYS_ADMIN)")]
    NotRoot,
    /// `ip` or `tc` failed.
    #[error("{command}: {reason}")]
    Command {
        /// The command line.
        command: String,
        /// Its error output.
        reason: String,
    },
    /// A socket or thread could not be made.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The two sides' addresses.
const SIDE_ADDRESSES: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 78, 0, 1), Ipv4Addr::new(10, 78, 0, 2)];

/// The veth ends' names (inside each side's namespace).
const SIDE_LINKS: [&str; 2] = ["fpva", "fpvb"];

static NEXT_PATH: AtomicU32 = AtomicU32::new(0);

/// Two namespaces and what joins them.
#[derive(Debug)]
pub struct NetPath {
    spec: PathSpec,
    namespaces: [String; 2],
    relays: Mutex<Vec<Relay>>,
}

impl NetPath {
    /// Builds the path.
    pub fn build(spec: PathSpec) -> Result<Self, PathError> {
        spec.validate()?;
        // SAFETY: no arguments.
        if unsafe { libc::geteuid() } != 0 {
            return Err(PathError::NotRoot);
        }
        let tag = format!(
            "fp{}n{}",
            std::process::id(),
            NEXT_PATH.fetch_add(1, Ordering::Relaxed)
        );
        let path = Self {
            namespaces: [format!("{tag}a"), format!("{tag}b")],
            spec,
            relays: Mutex::new(Vec::new()),
        };
        path.wire()?;
        Ok(path)
    }

    fn wire(&self) -> Result<(), PathError> {
        let [a, b] = &self.namespaces;
        for ns in [a, b] {
            run("ip", &["netns", "add", ns])?;
            run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        }
        run(
            "ip",
            &[
                "link",
                "add",
                SIDE_LINKS[0],
                "netns",
                a,
                "type",
                "veth",
                "peer",
                "name",
                SIDE_LINKS[1],
                "netns",
                b,
            ],
        )?;
        let mtu = self.spec.link_mtu.to_string();
        for side in 0..2 {
            let (ns, link) = (&self.namespaces[side], SIDE_LINKS[side]);
            let addr = format!("{}/24", SIDE_ADDRESSES[side]);
            run("ip", &["-n", ns, "link", "set", link, "mtu", &mtu])?;
            run("ip", &["-n", ns, "addr", "add", &addr, "dev", link])?;
            run("ip", &["-n", ns, "link", "set", link, "up"])?;
            if let Some(rate) = self.spec.rate_mbit {
                limit_rate(ns, link, rate)?;
            }
        }
        Ok(())
    }

    /// What the path is like.
    pub fn spec(&self) -> &PathSpec {
        &self.spec
    }

    /// Side `side`'s (0 or 1) address.
    pub fn address(&self, side: usize) -> Ipv4Addr {
        SIDE_ADDRESSES[side]
    }

    /// QUIC tuning for this path's MTU.
    pub fn tuning(&self) -> QuicTuning {
        QuicTuning::for_link(self.spec.link_mtu)
    }

    fn netns_file(&self, side: usize) -> PathBuf {
        Path::new("/run/netns").join(&self.namespaces[side])
    }

    /// A UDP socket on side `side`'s address (any port), made inside its
    /// namespace, with `buffer_bytes` socket buffers.
    pub fn bind_udp(&self, side: usize, buffer_bytes: usize) -> Result<UdpSocket, PathError> {
        let ns = self.netns_file(side);
        let listen = SocketAddr::from((self.address(side), 0));
        std::thread::spawn(move || {
            enter_netns(&ns)?;
            ferry_transport::quic::udp_socket(listen, buffer_bytes)
                .map_err(|e| std::io::Error::other(e.to_string()))
        })
        .join()
        .map_err(|_| std::io::Error::other("socket thread panicked"))?
        .map_err(PathError::from)
    }

    /// Where side `from` sends datagrams meant for `target` (an address on
    /// the other side): `target` itself, or the front of a relay started
    /// for it when the path has delay or loss.
    pub fn reach(&self, from: usize, target: SocketAddr) -> Result<SocketAddr, PathError> {
        if !self.spec.impaired() {
            return Ok(target);
        }
        let mut relays = self.relays.lock().unwrap_or_else(|e| e.into_inner());
        let relay = Relay::start(
            Some(self.netns_file(from)),
            SocketAddr::from((self.address(from), 0)),
            target,
            Impairment {
                one_way_delay: self.spec.one_way_delay,
                loss: self.spec.loss,
            },
            0x5eed + relays.len() as u64,
        )?;
        let front = relay.front();
        relays.push(relay);
        Ok(front)
    }

    /// Datagrams the relays have lost so far.
    pub fn dropped(&self) -> u64 {
        let relays = self.relays.lock().unwrap_or_else(|e| e.into_inner());
        relays.iter().map(Relay::dropped).sum()
    }
}

impl ferry_transport::bench::BenchNetwork for NetPath {
    fn socket(&self, side: usize, buffer_bytes: usize) -> std::io::Result<UdpSocket> {
        self.bind_udp(side, buffer_bytes)
            .map_err(|e| std::io::Error::other(e.to_string()))
    }

    fn reach(&self, from: usize, target: SocketAddr) -> std::io::Result<SocketAddr> {
        NetPath::reach(self, from, target).map_err(|e| std::io::Error::other(e.to_string()))
    }
}

impl Drop for NetPath {
    fn drop(&mut self) {
        self.relays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        for ns in &self.namespaces {
            let _ = run("ip", &["netns", "del", ns]);
        }
    }
}

/// Moves the calling thread into the network namespace at `netns`.
pub fn enter_netns(netns: &Path) -> std::io::Result<()> {
    let file = std::fs::File::open(netns)?;
    // SAFETY: a namespace file descriptor; only the calling thread moves.
    let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `htb` on `link`'s egress: every packet at most `rate_mbit`.
fn limit_rate(ns: &str, link: &str, rate_mbit: u32) -> Result<(), PathError> {
    run(
        "tc",
        &[
            "-n", ns, "qdisc", "add", "dev", link, "root", "handle", "1:", "htb", "default", "1",
        ],
    )?;
    let rate = format!("{rate_mbit}mbit");
    run(
        "tc",
        &[
            "-n", ns, "class", "add", "dev", link, "parent", "1:", "classid", "1:1", "htb", "rate",
            &rate, "ceil", &rate,
        ],
    )
}

fn run(program: &str, args: &[&str]) -> Result<(), PathError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| PathError::Command {
            command: command.clone(),
            reason: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(PathError::Command {
            command,
            reason: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_numbers_are_refused_with_what_is_wrong() {
        let mut spec = PathSpec::veth(576);
        assert!(matches!(spec.validate(), Err(PathError::Invalid(m)) if m.contains("MTU 576")));
        spec.link_mtu = 1500;
        spec.rate_mbit = Some(0);
        assert!(spec.validate().is_err());
        spec.rate_mbit = Some(200);
        spec.loss = 0.7;
        assert!(spec.validate().is_err());
        spec.loss = 0.01;
        spec.one_way_delay = Duration::from_millis(75);
        assert!(spec.validate().is_ok());
        assert!(spec.impaired());
        assert_eq!(
            spec.describe(),
            "veth MTU 1500, 200 Mbit/s, 75 ms each way, 1.0% loss"
        );
        assert!(!PathSpec::veth(9000).impaired());
    }
}
