//! What a node keeps across restarts: its inventory (VM definitions with
//! their disks, ownership generation and whether they ran), its jobs, its
//! migration records, its audit log and its settings (maintenance mode).
//!
//! [`NodeStore`] is the narrow trait the host and scheduler actors write
//! through; `ferry-host` implements it on SQLite, [`MemStore`] keeps it in
//! memory (tests, the simulation, the demo). Values are rkyv archives, so
//! the store does not need to know their fields.

// rkyv derives resolver twins of the types whose fields carry no docs;
// every item written here is documented.
#![allow(missing_docs)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use ferry_transport::message::{WireDecode, WireEncode};
use rkyv::api::high::{HighDeserializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor;

use super::audit::{AuditEntry, AuditQuery};
use super::jobs::Job;
use crate::migration::VmConfig;
use crate::node::host::history::MigrationRecord;

/// A VM as the inventory keeps it.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct StoredVm {
    /// Its definition (disks included, where they are now).
    pub config: VmConfig,
    /// Ownership generation.
    pub generation: u64,
    /// Whether its vCPUs ran (a restarted node starts it again).
    pub running: bool,
    /// A migration away was under way: (destination, migration id). On
    /// restart the destination is asked how it ended before the VM is
    /// brought back.
    pub leaving: Option<(String, u64)>,
}

/// A migration this host took a VM in by (its commit made durable with
/// the VM): kept so that a source asking how it ended gets the truth even
/// after this host restarted.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct AdoptedFrom {
    /// The source host.
    pub peer: String,
    /// Its migration id.
    pub migration_id: u64,
}

/// Adoptions kept (the oldest go first); a source asks within minutes of
/// its migration, so thousands are plenty.
pub const ADOPTIONS_KEPT: usize = 4096;

/// Everything a node reads back when it starts.
#[derive(Debug, Clone, Default)]
pub struct StoredState {
    /// The inventory.
    pub vms: Vec<StoredVm>,
    /// Jobs (finished ones too).
    pub jobs: Vec<Job>,
    /// Migration records, oldest first.
    pub migrations: Vec<MigrationRecord>,
    /// Settings by key.
    pub settings: BTreeMap<String, String>,
    /// Migrations that brought a VM here, oldest first.
    pub adoptions: Vec<AdoptedFrom>,
    /// VMs adopted whose source has not yet confirmed that it let them
    /// go, by VM name: (source host, migration id). Such a VM comes back
    /// paused, in doubt, until its source answers.
    pub arrivals: BTreeMap<String, (String, u64)>,
}

/// Why the store failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node store: {0}")]
pub struct StoreError(pub String);

/// Where a node keeps what must survive a restart. Every write is durable
/// when it returns.
pub trait NodeStore: Send + Sync {
    /// Reads everything back.
    fn load(&self) -> Result<StoredState, StoreError>;
    /// Adds or replaces a VM (by name).
    fn put_vm(&self, vm: &StoredVm) -> Result<(), StoreError>;
    /// A migration brought `vm` here: the VM and how it came, in one
    /// transaction (both or neither), so that a restart never has the one
    /// without the other. The arrival stays unconfirmed until
    /// [`Self::confirm_arrival`].
    fn adopt(&self, vm: &StoredVm, from: &AdoptedFrom) -> Result<(), StoreError>;
    /// The source of VM `vm`'s arrival by `from` knows it let the VM go:
    /// a restart brings the VM back running, without asking. Does nothing
    /// if the VM's arrival is another.
    fn confirm_arrival(&self, vm: &str, from: &AdoptedFrom) -> Result<(), StoreError>;
    /// Forgets a VM (and its unconfirmed arrival).
    fn remove_vm(&self, name: &str) -> Result<(), StoreError>;
    /// Adds or replaces a job (by id).
    fn put_job(&self, job: &Job) -> Result<(), StoreError>;
    /// Adds or replaces a migration record (by source and id).
    fn put_migration(&self, record: &MigrationRecord) -> Result<(), StoreError>;
    /// Appends to the audit log.
    fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError>;
    /// Reads the audit log, oldest first.
    fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError>;
    /// Sets a setting.
    fn set_setting(&self, key: &str, value: &str) -> Result<(), StoreError>;
}

/// Setting: the host is in maintenance mode (`"1"`).
pub const SETTING_MAINTENANCE: &str = "maintenance";
/// Setting: why the host reported itself degraded (absent or empty: it
/// is not).
pub const SETTING_DEGRADED: &str = "degraded";
/// Setting written to find out whether a store that failed writes again.
pub const SETTING_STORE_PROBE: &str = "store_probe";
/// Settings `fenced/<peer>/<migration id>` = VM: `vm recover --force`
/// took the VM back from that migration's destination, which must never
/// run its copy.
pub const SETTING_FENCE_PREFIX: &str = "fenced/";

/// The setting that records a fence of migration `from`.
pub fn fence_setting(from: &AdoptedFrom) -> String {
    format!("{SETTING_FENCE_PREFIX}{}/{}", from.peer, from.migration_id)
}

/// The migrations fenced, read back from the settings.
pub fn fences(settings: &BTreeMap<String, String>) -> std::collections::BTreeSet<(String, u64)> {
    settings
        .keys()
        .filter_map(|k| {
            let rest = k.strip_prefix(SETTING_FENCE_PREFIX)?;
            let (peer, id) = rest.rsplit_once('/')?;
            Some((peer.to_owned(), id.parse().ok()?))
        })
        .collect()
}

/// A value as stored bytes.
pub fn encode<T: WireEncode>(value: &T) -> Result<Vec<u8>, StoreError> {
    rkyv::to_bytes::<rancor::Error>(value)
        .map(|b| b.to_vec())
        .map_err(|e| StoreError(format!("encoding: {e}")))
}

/// Stored bytes back as a value (validated first).
pub fn decode<T>(bytes: &[u8]) -> Result<T, StoreError>
where
    T: WireDecode,
    T::Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<T, HighDeserializer<rancor::Error>>,
{
    // Copy into an aligned buffer: a database hands out unaligned bytes.
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    rkyv::from_bytes::<T, rancor::Error>(&aligned)
        .map_err(|e| StoreError(format!("decoding a stored value: {e}")))
}

#[derive(Default)]
struct MemInner {
    vms: BTreeMap<String, StoredVm>,
    jobs: BTreeMap<u64, Job>,
    migrations: Vec<MigrationRecord>,
    audit: Vec<AuditEntry>,
    settings: BTreeMap<String, String>,
    adoptions: std::collections::VecDeque<AdoptedFrom>,
    arrivals: BTreeMap<String, (String, u64)>,
    /// Every write fails (a full or broken disk), for tests.
    failing: bool,
}

/// A store in memory. Clones share it, so a test can stop a node and
/// start it again on the same store, as a restart on the same disk would.
#[derive(Clone, Default)]
pub struct MemStore(Arc<Mutex<MemInner>>);

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<R>(&self, f: impl FnOnce(&mut MemInner) -> R) -> R {
        f(&mut self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// From now on every write fails (`true`) or works again, as a full
    /// or failing disk under a database would.
    pub fn set_failing(&self, failing: bool) {
        self.with(|m| m.failing = failing);
    }

    /// Runs a write, unless writes fail.
    fn write(&self, f: impl FnOnce(&mut MemInner)) -> Result<(), StoreError> {
        self.with(|m| {
            if m.failing {
                return Err(StoreError("write failed: no space left on device".into()));
            }
            f(m);
            Ok(())
        })
    }
}

impl NodeStore for MemStore {
    fn load(&self) -> Result<StoredState, StoreError> {
        Ok(self.with(|m| StoredState {
            vms: m.vms.values().cloned().collect(),
            jobs: m.jobs.values().cloned().collect(),
            migrations: m.migrations.clone(),
            settings: m.settings.clone(),
            adoptions: m.adoptions.iter().cloned().collect(),
            arrivals: m.arrivals.clone(),
        }))
    }

    fn put_vm(&self, vm: &StoredVm) -> Result<(), StoreError> {
        self.write(|m| {
            m.vms.insert(vm.config.name.clone(), vm.clone());
        })
    }

    fn adopt(&self, vm: &StoredVm, from: &AdoptedFrom) -> Result<(), StoreError> {
        self.write(|m| {
            m.vms.insert(vm.config.name.clone(), vm.clone());
            if m.adoptions.len() >= ADOPTIONS_KEPT {
                m.adoptions.pop_front();
            }
            m.adoptions.push_back(from.clone());
            m.arrivals.insert(
                vm.config.name.clone(),
                (from.peer.clone(), from.migration_id),
            );
        })
    }

    fn confirm_arrival(&self, vm: &str, from: &AdoptedFrom) -> Result<(), StoreError> {
        self.write(|m| {
            if m.arrivals.get(vm) == Some(&(from.peer.clone(), from.migration_id)) {
                m.arrivals.remove(vm);
            }
        })
    }

    fn remove_vm(&self, name: &str) -> Result<(), StoreError> {
        self.write(|m| {
            m.vms.remove(name);
            m.arrivals.remove(name);
        })
    }

    fn put_job(&self, job: &Job) -> Result<(), StoreError> {
        self.write(|m| {
            m.jobs.insert(job.id, job.clone());
        })
    }

    fn put_migration(&self, record: &MigrationRecord) -> Result<(), StoreError> {
        self.write(|m| {
            match m
                .migrations
                .iter_mut()
                .find(|r| r.id == record.id && r.from == record.from)
            {
                Some(r) => *r = record.clone(),
                None => m.migrations.push(record.clone()),
            }
        })
    }

    fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        self.write(|m| m.audit.push(entry.clone()))
    }

    fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        let found = self.with(|m| {
            m.audit
                .iter()
                .filter(|e| query.matches(e))
                .cloned()
                .collect()
        });
        Ok(super::audit::merge(found, query.limit))
    }

    fn set_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.write(|m| {
            m.settings.insert(key.to_owned(), value.to_owned());
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::GuestKind;

    #[test]
    fn stored_values_round_trip_through_bytes() {
        let vm = StoredVm {
            config: VmConfig {
                name: "web".into(),
                memory_bytes: 16 << 20,
                vcpus: 2,
                cpu_features: vec!["sse2".into()],
                mac: [0x52, 0x54, 0, 1, 2, 3],
                kind: GuestKind::Synthetic {
                    wss_bytes: 1 << 20,
                    seed: 3,
                    writes_per_sec: 10,
                },
                disks: Vec::new(),
            },
            generation: 4,
            running: true,
            leaving: Some(("b".into(), 9)),
        };
        let bytes = encode(&vm).expect("encode");
        // Unaligned, as a database may hand it back.
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&bytes);
        assert_eq!(decode::<StoredVm>(&shifted[1..]).expect("decode"), vm);
        assert!(decode::<StoredVm>(&bytes[..bytes.len() / 2]).is_err());
    }
}
