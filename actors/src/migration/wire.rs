//! What source and destination say to each other, as rkyv control messages.
//!
//! A migration uses one control stream ([`SourceMsg`] one way,
//! [`DestMsg`] the other) and `lanes` bulk streams that carry page batches
//! and a [`LaneMark`] after each round's pages. Every stream a node opens
//! starts with a [`StreamIntro`] saying what it is for.

// rkyv derives resolver twins of the enums whose fields carry no docs;
// every item written here is documented.
#![allow(missing_docs)]

use serde::Serialize;

/// Ethernet address of a VM's NIC.
pub type Mac = [u8; 6];

/// Formats a MAC the usual way (`52:54:00:12:34:56`).
pub fn mac_string(mac: &Mac) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Which backend runs a guest, and what it needs to recreate one.
#[derive(
    Debug, Clone, PartialEq, Eq, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub enum GuestKind {
    /// A KVM guest running the built-in test workload (vCPU and device
    /// state travel in the switchover).
    Kvm {
        /// Working set the workload rewrites, in bytes.
        wss_bytes: u64,
    },
    /// The in-memory synthetic guest, with its workload.
    Synthetic {
        /// Working set in bytes.
        wss_bytes: u64,
        /// Workload seed.
        seed: u64,
        /// Page writes per second.
        writes_per_sec: u64,
    },
    /// A KVM guest booting a Linux kernel (vCPU, device and console state
    /// travel in the switchover; the kernel files are read at boot only).
    Linux {
        /// The ELF `vmlinux` on the host that boots it.
        kernel: String,
        /// The initramfs, if any.
        initrd: Option<String>,
        /// The kernel command line.
        cmdline: String,
    },
}

impl GuestKind {
    /// Whether it runs under KVM (a destination needs `/dev/kvm`).
    pub fn needs_kvm(&self) -> bool {
        !matches!(self, GuestKind::Synthetic { .. })
    }
}

/// A VM's definition: what any host needs to run it.
#[derive(
    Debug, Clone, PartialEq, Eq, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct VmConfig {
    /// Cluster-unique name.
    pub name: String,
    /// Guest memory in bytes.
    pub memory_bytes: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// CPU features the guest may use; a destination must offer them all.
    pub cpu_features: Vec<String>,
    /// NIC address, announced by whichever host runs the VM.
    pub mac: Mac,
    /// Backend and workload.
    pub kind: GuestKind,
    /// Its disks.
    pub disks: Vec<DiskConfig>,
}

/// One of a VM's disks.
#[derive(
    Debug, Clone, PartialEq, Eq, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct DiskConfig {
    /// Name (`disk0`, …), unique in the VM.
    pub name: String,
    /// Size in bytes.
    pub len_bytes: u64,
    /// Datastore it lives on.
    pub datastore: String,
    /// Path on the datastore.
    pub path: String,
    /// Where the datastore really is (hosts that see the same location
    /// share it).
    pub location: String,
    /// Whether the synthetic guest's disk workload writes to it.
    pub workload: bool,
}

/// A storage move that rides along a VM migration: every disk goes to
/// `datastore` on the destination, copied by `method`, and the one
/// switchover covers memory and disks.
#[derive(
    Debug, Clone, PartialEq, Eq, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct StorageMove {
    /// Destination datastore.
    pub datastore: String,
    /// Copy method.
    pub method: crate::storage::Method,
    /// Copy rate limit in MB/s (0: none), to spare the source's storage.
    pub rate_mb_per_s: u64,
    /// Disks that go elsewhere than `datastore`: (disk name, datastore).
    pub disk_datastores: Vec<(String, String)>,
}

impl StorageMove {
    /// Where disk `disk` goes.
    pub fn datastore_for(&self, disk: &str) -> &str {
        self.disk_datastores
            .iter()
            .find(|(d, _)| d == disk)
            .map_or(self.datastore.as_str(), |(_, ds)| ds.as_str())
    }

    /// Every destination datastore named.
    pub fn datastores(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.datastore.as_str())
            .chain(self.disk_datastores.iter().map(|(_, ds)| ds.as_str()))
    }
}

/// The first message on every stream a node opens to another.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum StreamIntro {
    /// A migration's control stream; an [`Offer`] follows.
    Migration,
    /// Bulk stream `lane` of `lanes` of migration `migration_id`.
    Lane {
        /// The migration.
        migration_id: u64,
        /// This stream's lane.
        lane: u32,
    },
    /// A client's request stream.
    Client,
    /// One disk of migration `migration_id`; a
    /// [`crate::storage::remote::DiskOpen`] follows.
    Disk {
        /// The migration.
        migration_id: u64,
    },
    /// The source lost the link after releasing the VM and asks how
    /// migration `migration_id` ended; a [`Resolution`] answers.
    Resolve {
        /// The migration.
        migration_id: u64,
    },
    /// A MAC moved: `mac` now lives on `host` (the virtual network's
    /// gratuitous ARP).
    Announce {
        /// The NIC address.
        mac: Mac,
        /// Where it lives now.
        host: String,
    },
    /// A destination that restarted before its source confirmed that it
    /// let `vm` go (migration `migration_id`) asks whether the VM is its
    /// own; an [`Ownership`] answers.
    Arrived {
        /// The migration that brought the VM.
        migration_id: u64,
        /// The VM.
        vm: String,
    },
    /// The source knows that migration `migration_id` gave `vm` to the
    /// destination for good (it forgot the VM durably): the destination's
    /// arrival is confirmed. Nothing answers.
    Confirm {
        /// The migration.
        migration_id: u64,
        /// The VM.
        vm: String,
    },
}

/// The source's opening proposal.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Offer {
    /// Chosen by the source, unique on it.
    pub migration_id: u64,
    /// The VM.
    pub vm: VmConfig,
    /// Ownership generation the VM has on the source.
    pub generation: u64,
    /// A stopped VM: memory and state only, no rounds, not resumed.
    pub cold: bool,
    /// Bulk streams the source would like to use.
    pub lanes: u32,
    /// Hash destination memory before resuming, for the report.
    pub verify_memory: bool,
    /// Disks move too (shared-nothing migration); without it the disks
    /// must be on datastores both hosts share, and only their locks move.
    pub storage: Option<StorageMove>,
    /// The source's trace (W3C `traceparent`), which the destination's
    /// spans join; empty when the source exports no traces.
    pub trace_parent: String,
}

/// Why a destination said no.
#[derive(
    Debug, Clone, PartialEq, Eq, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub enum Refusal {
    /// The host lacks CPU features the VM uses.
    MissingCpuFeatures(Vec<String>),
    /// Not enough free memory.
    NoMemory {
        /// Bytes the VM needs.
        needed_bytes: u64,
        /// Bytes free.
        free_bytes: u64,
    },
    /// Not enough free vCPUs.
    NoVcpus {
        /// vCPUs the VM needs.
        needed: u32,
        /// vCPUs free.
        free: u32,
    },
    /// A VM of that name already lives there.
    AlreadyExists(String),
    /// The host cannot run this kind of guest.
    UnsupportedGuest(String),
    /// The shadow VM could not be created.
    ShadowFailed(String),
    /// The offer itself is malformed.
    BadOffer(String),
    /// A disk cannot be placed here.
    Datastore(String),
    /// The host takes no VMs now (maintenance mode, or degraded).
    OutOfService(String),
    /// The host runs as many migrations as its budgets allow; the source
    /// may offer again later.
    Busy(String),
}

impl Refusal {
    /// What a [`Refusal::Busy`] says first: a source's scheduler that
    /// finds it in an abort reason queues the job again.
    pub const BUSY: &'static str = "at its migration budget";
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Datastore(why) => write!(f, "storage: {why}"),
            Self::MissingCpuFeatures(list) => {
                write!(f, "missing CPU features: {}", list.join(", "))
            }
            Self::NoMemory {
                needed_bytes,
                free_bytes,
            } => write!(
                f,
                "not enough memory: needs {} MiB, {} MiB free",
                needed_bytes >> 20,
                free_bytes >> 20
            ),
            Self::NoVcpus { needed, free } => {
                write!(f, "not enough vCPUs: needs {needed}, {free} free")
            }
            Self::AlreadyExists(name) => write!(f, "a VM named {name} already exists there"),
            Self::UnsupportedGuest(why) => write!(f, "unsupported guest: {why}"),
            Self::ShadowFailed(why) => write!(f, "could not create the shadow VM: {why}"),
            Self::BadOffer(why) => write!(f, "bad offer: {why}"),
            Self::OutOfService(why) => write!(f, "the host takes no VMs: {why}"),
            Self::Busy(why) => write!(f, "{}: {why}", Self::BUSY),
        }
    }
}

/// Source to destination, on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum SourceMsg {
    /// Opens the migration.
    Offer(Box<Offer>),
    /// The vCPUs are paused: `final_round` holds the last pages, `state`
    /// the vCPU and device state.
    Switchover {
        /// The round whose pages complete memory.
        final_round: u32,
        /// Backend-encoded vCPU and device state.
        state: Vec<u8>,
    },
    /// The source released the VM: run it (`generation` is its new one).
    Commit {
        /// The VM's ownership generation from now on.
        generation: u64,
    },
    /// The migration is off; drop the shadow.
    Abort {
        /// Why.
        reason: String,
    },
}

/// Destination to source, on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum DestMsg {
    /// The shadow VM is ready; send pages on `lanes` bulk streams.
    Accepted {
        /// Bulk streams to open.
        lanes: u32,
    },
    /// No migration.
    Refused(Refusal),
    /// Every lane delivered round `round`.
    RoundReceived {
        /// The round.
        round: u32,
        /// Pages written (data and zero).
        pages: u64,
        /// Wire bytes received for the round.
        bytes: u64,
    },
    /// State restored; waiting for the commit.
    Ready {
        /// Hash of destination memory, if the offer asked for it.
        memory_hash: Option<u64>,
    },
    /// The VM runs here now (or is stopped here, for a cold migration).
    Resumed {
        /// Whether the vCPUs run.
        running: bool,
    },
    /// The destination gave up (before the commit).
    Aborted {
        /// Why.
        reason: String,
    },
}

/// Sent on a bulk stream after a round's pages on that lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct LaneMark {
    /// The round just completed on this lane.
    pub round: u32,
    /// Pages the lane sent in it.
    pub pages: u64,
}

/// The source's answer to [`StreamIntro::Arrived`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Ownership {
    /// The source let the VM go (it no longer has it and never fenced
    /// that migration): the destination runs it.
    Yours,
    /// The source took the VM back (`vm recover --force` fenced the
    /// migration, or the VM runs there): the destination drops its copy.
    NotYours,
    /// The source's own migration is still settling: ask again.
    NotYet,
}

/// The destination's answer to [`StreamIntro::Resolve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Resolution {
    /// The destination took the VM over (it got the commit). When false
    /// it has dropped the shadow and will never run it: the source may
    /// resume.
    pub committed: bool,
}

/// An offer of a small synthetic VM, for the machines' unit tests.
#[cfg(test)]
pub(crate) fn test_offer(name: &str, memory_bytes: u64, features: &[&str]) -> Offer {
    Offer {
        migration_id: 1,
        vm: VmConfig {
            name: name.into(),
            memory_bytes,
            vcpus: 1,
            cpu_features: features.iter().map(|s| (*s).to_owned()).collect(),
            mac: [0x52, 0x54, 0, 0, 0, 1],
            kind: GuestKind::Synthetic {
                wss_bytes: 0,
                seed: 1,
                writes_per_sec: 1,
            },
            disks: Vec::new(),
        },
        generation: 1,
        cold: false,
        lanes: 4,
        verify_memory: false,
        storage: None,
        trace_parent: String::new(),
    }
}
