//! The client protocol: what `ferry` commands and [`crate::api::Cluster`]
//! ask a node, on a stream introduced as [`StreamIntro::Client`].
//!
//! One request per stream; the node answers with zero or more
//! [`ClientReply::Progress`] and then exactly one final reply.
//!
//! [`StreamIntro::Client`]: crate::migration::StreamIntro::Client

// rkyv derives resolver twins of the enums whose fields carry no docs;
// every item written here is documented.
#![allow(missing_docs)]

use std::time::Duration;

use super::vm::VmInfo;
use crate::migration::{MigrationOptions, MigrationReport, Progress};

/// A VM to define.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct VmSpec {
    /// Name, unique in the cluster.
    pub name: String,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Working set the test workload rewrites, in MiB (0: idle).
    pub wss_mib: u64,
    /// Use the synthetic guest even where KVM works.
    pub synthetic: bool,
    /// CPU features the guest is declared to use (empty: the host's).
    pub cpu_features: Vec<String>,
    /// Disks to create.
    pub disks: Vec<DiskSpec>,
    /// Run the synthetic guest's disk workload (the verifiable write
    /// pattern) on its disks while the VM runs.
    pub disk_workload: bool,
    /// Boot this Linux kernel (files on the node's host) instead of the
    /// built-in test guest.
    pub linux: Option<LinuxSpec>,
}

/// A Linux kernel to boot, as files on the node's host.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct LinuxSpec {
    /// The ELF `vmlinux` (with a PVH entry).
    pub kernel: String,
    /// The initramfs, if any.
    pub initrd: Option<String>,
    /// The kernel command line.
    pub cmdline: String,
}

/// A disk to create with a VM.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct DiskSpec {
    /// Size in MiB.
    pub size_mib: u64,
    /// Datastore to create it on.
    pub datastore: String,
}

/// A disk as `ferry vm disks` shows it.
#[derive(
    Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, serde::Serialize,
)]
pub struct DiskView {
    /// Disk name.
    pub name: String,
    /// Datastore.
    pub datastore: String,
    /// Path on it.
    pub path: String,
    /// Size in bytes.
    pub len_bytes: u64,
    /// Guest writes acknowledged by this disk actor.
    pub writes: u64,
    /// The synthetic workload's last acknowledged write.
    pub workload_acked: u64,
    /// Median workload write latency since the last look, microseconds.
    pub write_latency_us_p50: u64,
    /// With `verify`: blocks checked against the workload's pattern.
    pub verified_blocks: Option<u64>,
    /// With `verify`: the first acknowledged write found missing.
    pub verify_error: Option<String>,
    /// Why the guest's writes fail, while they do (a full datastore).
    #[serde(default)]
    pub failing: Option<String>,
}

/// Migration options as a client sends them.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct MigrateOptions {
    /// Downtime budget in milliseconds.
    pub downtime_ms: u64,
    /// Pre-copy time limit in seconds.
    pub time_limit_s: u64,
    /// Throttle the guest when rounds stop shrinking.
    pub auto_converge: bool,
    /// Bulk streams.
    pub lanes: u32,
    /// Compare memory hashes before resuming.
    pub verify_memory: bool,
    /// Cold migration (the VM must be stopped).
    pub cold: bool,
    /// Move the disks to this datastore on the destination (empty: the
    /// disks stay, on storage both hosts share).
    pub datastore: String,
    /// How the disks move.
    pub method: crate::storage::Method,
    /// Disk copy rate limit in MB/s (0: none).
    pub disk_rate_mb_per_s: u64,
    /// Disks that go elsewhere than `datastore`: (disk name, datastore).
    pub disk_datastores: Vec<(String, String)>,
    /// Queue priority.
    pub priority: crate::ops::jobs::Priority,
    /// Start at this time (ms since the epoch; 0: now, and the request
    /// waits for the report). A migration with a start time (a past one
    /// runs at once) is queued and the request answers at once.
    pub at_unix_ms: u64,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        let d = MigrationOptions::default();
        Self {
            downtime_ms: u64::try_from(d.downtime_max.as_millis()).unwrap_or(u64::MAX),
            time_limit_s: d.precopy_time_max.as_secs(),
            auto_converge: d.auto_converge,
            lanes: d.lanes,
            verify_memory: d.verify_memory,
            cold: d.cold,
            datastore: String::new(),
            method: crate::storage::Method::Mirror,
            disk_rate_mb_per_s: 0,
            disk_datastores: Vec::new(),
            priority: crate::ops::jobs::Priority::Normal,
            at_unix_ms: 0,
        }
    }
}

impl MigrateOptions {
    /// The full options these stand for.
    pub fn to_options(&self) -> MigrationOptions {
        MigrationOptions {
            downtime_max: Duration::from_millis(self.downtime_ms),
            precopy_time_max: Duration::from_secs(self.time_limit_s),
            auto_converge: self.auto_converge,
            lanes: self.lanes,
            verify_memory: self.verify_memory,
            cold: self.cold,
            storage: (!self.datastore.is_empty()).then(|| crate::migration::wire::StorageMove {
                datastore: self.datastore.clone(),
                method: self.method,
                rate_mb_per_s: self.disk_rate_mb_per_s,
                disk_datastores: self.disk_datastores.clone(),
            }),
            ..MigrationOptions::default()
        }
    }
}

/// A request.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum ClientRequest {
    /// Define a VM (memory allocated, workload loaded, vCPUs stopped).
    CreateVm(VmSpec),
    /// Run a VM's vCPUs.
    StartVm(String),
    /// Stop a VM's vCPUs.
    StopVm(String),
    /// Remove a stopped VM.
    DeleteVm(String),
    /// The VMs on this node.
    ListVms,
    /// Move a VM to another host (through this node's job queue).
    Migrate {
        /// The VM.
        vm: String,
        /// Destination host, or `auto` (placement picks).
        to: String,
        /// How.
        options: MigrateOptions,
    },
    /// Where this node believes each MAC lives.
    MacTable,
    /// Migrations this node took part in: `id`'s records, or the `last`
    /// most recent.
    Migrations {
        /// One migration (`None`: the most recent ones).
        id: Option<u64>,
        /// How many of the most recent.
        last: u32,
    },
    /// The node's migration metrics.
    Stats,
    /// Call off migration `id` if this node is sending it (before the VM
    /// is handed over; the VM keeps running here).
    CancelMigration {
        /// The migration.
        id: u64,
    },
    /// Move a VM's disks to another datastore of its host, live.
    MoveStorage {
        /// The VM.
        vm: String,
        /// Destination datastore.
        datastore: String,
        /// How.
        method: crate::storage::Method,
        /// Copy rate limit in MB/s (0: none).
        rate_mb_per_s: u64,
        /// Disks that go elsewhere than `datastore`: (disk, datastore).
        disk_datastores: Vec<(String, String)>,
    },
    /// Move a VM's guest to a new VMM process on its host (memory
    /// shared, not copied): `vm upgrade` after the ferry binary changed.
    UpgradeVm {
        /// The VM.
        vm: String,
    },
    /// The newest output of a VM's serial console (operators only: it may
    /// show what the guest's users typed).
    Console {
        /// The VM.
        vm: String,
    },
    /// Type into a VM's serial console (operators only).
    ConsoleInput {
        /// The VM.
        vm: String,
        /// What to type.
        bytes: Vec<u8>,
    },
    /// A VM's disks; with `verify`, each is checked against the synthetic
    /// workload's pattern (every acknowledged write present).
    Disks {
        /// The VM.
        vm: String,
        /// Check the pattern.
        verify: bool,
    },
    /// This node's jobs.
    Jobs,
    /// Call off a job: a queued one is dropped, a running one's migration
    /// is cancelled.
    CancelJob {
        /// The job.
        id: u64,
    },
    /// This node's audit log.
    Audit(crate::ops::audit::AuditQuery),
    /// This node's load (hosts ask each other for placement).
    HostLoad,
    /// Rank the hosts a VM of this node could go to.
    Recommend {
        /// The VM.
        vm: String,
        /// Datastore its disks would move to (empty: they stay).
        datastore: String,
    },
    /// Enter (`true`) or leave maintenance mode. Entering migrates every
    /// VM away and answers when the host is empty.
    Maintenance {
        /// Enter or leave.
        enter: bool,
    },
    /// The host reports itself degraded (`reason`; empty: healthy again).
    /// Degraded, it evacuates like maintenance mode.
    Degraded {
        /// Why.
        reason: String,
    },
    /// Settle a VM in doubt (a migration away whose end this host does not
    /// know): ask its destination again now; with `force`, fence the
    /// destination's copy instead (the VM's generation jumps past the one
    /// it was handed, so that copy can never be taken for the newest) and
    /// run the VM here.
    RecoverVm {
        /// The VM.
        vm: String,
        /// Fence without an answer.
        force: bool,
    },
}

/// A reply.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum ClientReply {
    /// Done.
    Ok,
    /// The VM list.
    Vms(Vec<VmInfo>),
    /// Migration progress (more replies follow).
    Progress(Progress),
    /// Migration report (final).
    Report(MigrationReport),
    /// MAC table entries: MAC, host.
    Macs(Vec<(String, String)>),
    /// A VM's disks.
    Disks(Vec<DiskView>),
    /// A VM's console output, oldest byte first.
    Console(Vec<u8>),
    /// Console input taken: how many bytes.
    Taken(u64),
    /// A VM moved to a new VMM process.
    Upgraded {
        /// Pause to resume, microseconds.
        downtime_us: u64,
        /// The process that ran it.
        old_pid: u32,
        /// The process that runs it now.
        new_pid: u32,
    },
    /// Storage moved on one host (final).
    StorageMoved(Vec<crate::storage::DiskMoveReport>),
    /// Migration records.
    Migrations(Vec<super::host::history::MigrationRecord>),
    /// Migration metrics.
    Stats(super::metrics::NodeStats),
    /// A migration was queued to run later (final).
    JobQueued(crate::ops::jobs::Job),
    /// Jobs.
    Jobs(Vec<crate::ops::jobs::Job>),
    /// Audit entries, oldest first.
    Audit(Vec<crate::ops::audit::AuditEntry>),
    /// A host's load.
    Load(crate::ops::placement::HostLoad),
    /// Candidate hosts, best first.
    Ranking(Vec<crate::ops::placement::HostScore>),
    /// The host was evacuated: the jobs that moved its VMs (final).
    Evacuated(Vec<crate::ops::jobs::Job>),
    /// The request failed.
    Error(String),
}

/// Whether a certificate role may make `request`, or why not.
///
/// Viewers read; operators also change VMs and run migrations; admins
/// also put hosts in and out of service. A host certificate is not a
/// user: hosts may only ask each other for their load.
pub fn allowed(role: ferry_transport::Role, request: &ClientRequest) -> Result<(), String> {
    use ferry_transport::Role;
    let needs = match request {
        ClientRequest::HostLoad => return Ok(()),
        ClientRequest::ListVms
        | ClientRequest::MacTable
        | ClientRequest::Migrations { .. }
        | ClientRequest::Stats
        | ClientRequest::Jobs
        | ClientRequest::Audit(_)
        | ClientRequest::Recommend { .. }
        | ClientRequest::Disks { verify: false, .. } => Role::Viewer,
        ClientRequest::Maintenance { .. }
        | ClientRequest::Degraded { .. }
        | ClientRequest::RecoverVm { force: true, .. } => Role::Admin,
        _ => Role::Operator,
    };
    let rank = |r: Role| match r {
        Role::Host => 0,
        Role::Viewer => 1,
        Role::Operator => 2,
        Role::Admin => 3,
    };
    if role == Role::Host {
        Err("a host certificate cannot act as a user".into())
    } else if rank(role) >= rank(needs) {
        Ok(())
    } else {
        Err(format!(
            "role {} may not {}; it needs {}",
            role.as_str(),
            action(request),
            needs.as_str()
        ))
    }
}

/// A request in a few words, for errors and the audit log.
pub fn action(request: &ClientRequest) -> &'static str {
    match request {
        ClientRequest::CreateVm(_) => "vm create",
        ClientRequest::StartVm(_) => "vm start",
        ClientRequest::StopVm(_) => "vm stop",
        ClientRequest::DeleteVm(_) => "vm delete",
        ClientRequest::ListVms => "vm list",
        ClientRequest::Migrate { .. } => "migrate",
        ClientRequest::MacTable => "mac table",
        ClientRequest::Migrations { .. } => "migrate show",
        ClientRequest::Stats => "node stats",
        ClientRequest::CancelMigration { .. } => "migrate cancel",
        ClientRequest::MoveStorage { .. } => "vm move-storage",
        ClientRequest::Disks { verify: true, .. } => "vm disks --verify",
        ClientRequest::Console { .. } => "vm console",
        ClientRequest::UpgradeVm { .. } => "vm upgrade",
        ClientRequest::ConsoleInput { .. } => "vm console input",
        ClientRequest::Disks { .. } => "vm disks",
        ClientRequest::Jobs => "jobs list",
        ClientRequest::CancelJob { .. } => "jobs cancel",
        ClientRequest::Audit(_) => "audit",
        ClientRequest::HostLoad => "host load",
        ClientRequest::Recommend { .. } => "recommend",
        ClientRequest::Maintenance { enter: true } => "host maintenance enter",
        ClientRequest::Maintenance { enter: false } => "host maintenance exit",
        ClientRequest::Degraded { .. } => "host degraded",
        ClientRequest::RecoverVm { force: false, .. } => "vm recover",
        ClientRequest::RecoverVm { force: true, .. } => "vm recover --force",
    }
}

/// The VM and the destination a request names, for the audit log.
pub fn subject(request: &ClientRequest) -> (String, String) {
    match request {
        ClientRequest::CreateVm(spec) => (spec.name.clone(), String::new()),
        ClientRequest::StartVm(vm)
        | ClientRequest::StopVm(vm)
        | ClientRequest::DeleteVm(vm)
        | ClientRequest::RecoverVm { vm, .. }
        | ClientRequest::Disks { vm, .. }
        | ClientRequest::Console { vm }
        | ClientRequest::UpgradeVm { vm }
        | ClientRequest::ConsoleInput { vm, .. }
        | ClientRequest::Recommend { vm, .. } => (vm.clone(), String::new()),
        ClientRequest::Migrate { vm, to, .. } => (vm.clone(), to.clone()),
        ClientRequest::MoveStorage { vm, datastore, .. } => (vm.clone(), datastore.clone()),
        ClientRequest::CancelMigration { id } => {
            (String::new(), crate::migration::report::show_id(*id))
        }
        ClientRequest::CancelJob { id } => (String::new(), format!("job {id}")),
        _ => (String::new(), String::new()),
    }
}

/// Whether a request only reads (the audit log records reads too, and
/// `ferry audit` hides them unless asked).
pub fn is_read(request: &ClientRequest) -> bool {
    matches!(
        request,
        ClientRequest::ListVms
            | ClientRequest::MacTable
            | ClientRequest::Migrations { .. }
            | ClientRequest::Stats
            | ClientRequest::Jobs
            | ClientRequest::Audit(_)
            | ClientRequest::HostLoad
            | ClientRequest::Recommend { .. }
            | ClientRequest::Disks { .. }
            | ClientRequest::Console { .. }
    )
}
