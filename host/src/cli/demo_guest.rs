//! Which guest `ferry demo` migrates, and the Linux guest's network: the
//! Linux test guest where it is built (else ferry's built-in test guest,
//! saying how to build it), and, as root, a private network namespace
//! with a bridge from which the demo asks the guest's UDP responder all
//! through the migration.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use ferry_actors::migration::MigrationReport;
use serde::Serialize;

use crate::kvm::{self, linux::LinuxImage};
use crate::net::private::PrivateNet;
use crate::net::probe::{Prober, Probes};
use crate::node::local::LocalCluster;

/// Which guest the demo migrates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoGuest {
    /// The Linux test guest where it is built and KVM works, else the
    /// built-in test guest, else the synthetic guest.
    Auto,
    /// The Linux test guest (`guest/linux/build.sh` builds it).
    Linux,
    /// ferry's built-in KVM test guest.
    Test,
    /// The synthetic guest (no KVM).
    Synthetic,
}

/// The guest chosen, with what it needs.
pub enum Chosen {
    /// The Linux test guest, and its network where one could be made.
    Linux {
        /// Its kernel and initramfs.
        image: LinuxImage,
        /// The private network its NIC joins (`None`: not root).
        net: Option<PrivateNet>,
    },
    /// The built-in KVM test guest.
    Test,
    /// The synthetic guest.
    Synthetic,
}

impl Chosen {
    /// The report's name for it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Linux { .. } => "linux",
            Self::Test => "kvm",
            Self::Synthetic => "synthetic",
        }
    }
}

const BRIDGE: &str = "ferry0";
const DEMO_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const GUEST_PORT: u16 = 7777;
/// How often the demo asks the guest. Its kernel's network path costs
/// tens of ms a packet here (ring-0 code is emulated: PLATFORM.md).
pub const PROBE_EVERY: Duration = Duration::from_millis(200);

/// Picks the guest for `wanted`, and for the Linux guest its network.
/// Call before any thread starts: the network namespace is the calling
/// thread's, and threads started afterwards share it. `say` gets the
/// notes a user should read (fallbacks, how to build the guest).
pub fn choose(wanted: DemoGuest, dirtier_mib: u64, say: &dyn Fn(String)) -> anyhow::Result<Chosen> {
    if wanted == DemoGuest::Synthetic {
        return Ok(Chosen::Synthetic);
    }
    if let Err(e) = kvm::available() {
        anyhow::ensure!(
            wanted == DemoGuest::Auto,
            "KVM is not usable here ({e}): only --guest synthetic runs"
        );
        say(format!(
            "WARNING: KVM is not usable here ({e}); the demo runs the synthetic guest instead"
        ));
        return Ok(Chosen::Synthetic);
    }
    if wanted == DemoGuest::Test {
        return Ok(Chosen::Test);
    }
    let image = match crate::guest_images::linux_test_guest("dirtier", dirtier_mib) {
        Ok(image) => image,
        Err(e) if wanted == DemoGuest::Auto => {
            say(format!(
                "note: {e} (once per machine, about 10 minutes); the demo runs ferry's built-in test guest instead"
            ));
            return Ok(Chosen::Test);
        }
        Err(e) => anyhow::bail!("{e} (once per machine, about 10 minutes)"),
    };
    let net = match PrivateNet::enter(BRIDGE, DEMO_ADDR, 24) {
        Ok(net) => Some(net),
        Err(e) => {
            let why = if PrivateNet::not_permitted(&e) {
                "it needs root, to make a private network namespace with a bridge".to_owned()
            } else {
                e.to_string()
            };
            say(format!(
                "note: the guest's network is not measured ({why}); its NIC has no cable"
            ));
            None
        }
    };
    Ok(Chosen::Linux { image, net })
}

/// The guest command line's network words for `net`.
pub fn guest_network_args(net: &PrivateNet) -> String {
    format!(
        "ferry_ip={GUEST_ADDR}/{} ferry_port={GUEST_PORT}",
        net.prefix
    )
}

/// The network as the demo saw it across the migration.
#[derive(Debug, Clone, Serialize)]
pub struct NetworkReport {
    /// How often the demo asked, ms.
    pub every_ms: f64,
    /// Requests sent while the migration ran (and 1 s after).
    pub sent: usize,
    /// Of those, never answered.
    pub unanswered: usize,
    /// The longest time without an answer in that window, ms.
    pub longest_silence_ms: f64,
    /// From the destination's resume to the first answer, ms (`None`: no
    /// answer came after it).
    pub first_answer_after_resume_ms: Option<f64>,
    /// The same, timed from when a request was there for the new host
    /// to answer (leaves out the wait for the next request), ms.
    pub first_answer_wait_ms: Option<f64>,
    /// Each request's fate: sent at (ms into the migration), answered
    /// after (ms) or `LOST`.
    pub fates: String,
}

/// Probing the guest while the migration runs.
pub struct NetWatch {
    prober: Prober,
    started_unix_ms: f64,
}

impl NetWatch {
    /// Waits (up to `limit`) until the guest answers on `net`, then
    /// starts asking it every [`PROBE_EVERY`].
    pub async fn start(net: &PrivateNet, limit: Duration) -> anyhow::Result<Self> {
        let target = SocketAddr::from((GUEST_ADDR, GUEST_PORT));
        let bind = SocketAddr::from((net.address, 0));
        let first = tokio::task::spawn_blocking(move || first_answer(bind, target, limit)).await?;
        first?;
        let socket = UdpSocket::bind(bind)?;
        Ok(Self {
            prober: Prober::start(socket, target, PROBE_EVERY)?,
            started_unix_ms: crate::net::probe::unix_ms_now(),
        })
    }

    /// Stops asking and sums up the window from `from_unix_ms` to now for
    /// `migration` (the destination's resume from its report).
    pub fn finish(self, from_unix_ms: f64, migration: &MigrationReport) -> NetworkReport {
        let to = crate::net::probe::unix_ms_now();
        let probes: Probes = self.prober.finish();
        let from = from_unix_ms.max(self.started_unix_ms);
        let outage = probes.outage(from, to);
        let every_ms = PROBE_EVERY.as_secs_f64() * 1e3;
        let resumed = resumed_unix_ms(migration);
        NetworkReport {
            every_ms,
            sent: outage.sent,
            unanswered: outage.unanswered,
            longest_silence_ms: outage.longest_silence_ms,
            first_answer_after_resume_ms: resumed.and_then(|r| probes.first_answer_after(r)),
            first_answer_wait_ms: resumed.and_then(|r| probes.first_answer_wait(r, every_ms)),
            fates: outage.fates,
        }
    }
}

/// Asks once a second until the guest answers, for up to `limit`.
fn first_answer(bind: SocketAddr, target: SocketAddr, limit: Duration) -> anyhow::Result<()> {
    let socket = UdpSocket::bind(bind)?;
    socket.set_read_timeout(Some(Duration::from_secs(1)))?;
    let started = Instant::now();
    let mut buf = [0u8; 64];
    while started.elapsed() < limit {
        socket.send_to(&u64::MAX.to_le_bytes(), target)?;
        if socket.recv_from(&mut buf).is_ok() {
            return Ok(());
        }
    }
    anyhow::bail!(
        "the guest's responder at {target} did not answer in {} s",
        limit.as_secs()
    )
}

/// When the destination's vCPUs ran again (Unix ms), from its side of
/// the report: the end of its `resume` phase.
fn resumed_unix_ms(migration: &MigrationReport) -> Option<f64> {
    let dest = migration.destination.as_ref()?;
    let resume = dest.phases.iter().find(|p| p.name == "resume")?;
    #[allow(clippy::cast_precision_loss)] // ms since 1970 fit an f64 exactly
    let started = dest.started_unix_ms as f64;
    Some(started + resume.end_ms.unwrap_or(resume.start_ms))
}

/// The disk workload's acknowledged writes around the move, and the
/// destination's check of them.
#[derive(Debug, Clone, Serialize)]
pub struct DiskContinuity {
    /// The newest write acknowledged when the migration started.
    pub acked_before: u64,
    /// The newest acknowledged by the end (on the destination).
    pub acked_after: u64,
    /// Blocks the destination checked against the pattern.
    pub verified_blocks: u64,
    /// No acknowledged write is missing from the destination's disk
    /// (`verified_blocks` says how many were checked).
    pub verified: bool,
}

impl DiskContinuity {
    /// From the destination's `vm disks --verify` answer.
    pub fn of(
        disks: &[ferry_actors::node::client::DiskView],
        acked_before: u64,
        acked_after: u64,
    ) -> Self {
        let verified_blocks = disks.iter().filter_map(|d| d.verified_blocks).sum();
        // Nothing checked proves nothing: a disk with no acknowledged
        // write does not count as verified.
        let verified = verified_blocks > 0
            && disks
                .iter()
                .all(|d| d.verify_error.is_none() && d.verified_blocks.is_some());
        Self {
            acked_before,
            acked_after,
            verified_blocks,
            verified,
        }
    }
}

/// The newest write the disk workload of `vm` saw acknowledged.
pub async fn disk_writes(local: &LocalCluster, vm: &str) -> anyhow::Result<u64> {
    let disks = local.client.vm(vm).disks(false).await?;
    Ok(disks.iter().map(|d| d.workload_acked).max().unwrap_or(0))
}

/// Waits (up to `limit`) for the disk workload's first acknowledged
/// write, so the demo moves a disk that is being written; the newest
/// acknowledged then (0 if none came in time: the demo then stops, as it has nothing to show).
pub async fn first_disk_writes(
    local: &LocalCluster,
    vm: &str,
    limit: Duration,
) -> anyhow::Result<u64> {
    let started = Instant::now();
    loop {
        let acked = disk_writes(local, vm).await?;
        if acked > 0 || started.elapsed() >= limit {
            return Ok(acked);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The last `lines` lines of a guest's console output, as text.
pub fn console_tail(console: &[u8], lines: usize) -> String {
    let text = String::from_utf8_lossy(console);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_actors::node::client::DiskView;

    fn disk(verified_blocks: Option<u64>, verify_error: Option<&str>) -> DiskView {
        DiskView {
            name: "disk0".into(),
            datastore: "local".into(),
            path: "demo-vm/disk0.raw".into(),
            len_bytes: 1 << 20,
            writes: 3,
            workload_acked: 3,
            write_latency_us_p50: 100,
            verified_blocks,
            verify_error: verify_error.map(str::to_owned),
            failing: None,
        }
    }

    #[test]
    fn a_disk_is_verified_only_when_blocks_were_checked_and_none_was_missing() {
        assert!(DiskContinuity::of(&[disk(Some(3), None)], 1, 3).verified);
        let nothing_checked = DiskContinuity::of(&[disk(Some(0), None)], 0, 0);
        assert!(
            !nothing_checked.verified,
            "zero blocks checked proves nothing"
        );
        assert!(!DiskContinuity::of(&[disk(Some(3), Some("block 7 lost write 5"))], 1, 3).verified);
        assert!(!DiskContinuity::of(&[disk(None, None)], 1, 3).verified);
        assert!(!DiskContinuity::of(&[], 1, 3).verified);
        let two = DiskContinuity::of(&[disk(Some(3), None), disk(Some(2), None)], 1, 3);
        assert_eq!(two.verified_blocks, 5);
        assert!(two.verified);
    }

    #[test]
    fn the_console_tail_keeps_the_last_lines() {
        let console = b"one\ntwo\nthree\nfour\n";
        assert_eq!(console_tail(console, 2), "three\nfour");
        assert_eq!(console_tail(console, 10), "one\ntwo\nthree\nfour");
        assert_eq!(console_tail(b"", 3), "");
    }
}
