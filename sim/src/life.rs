//! A host's life: a crash ends it at once. The host actor learns of the
//! crash by a message, which waits behind whatever it is doing (a restart
//! that asks slow peers can take many seconds); a real process killed
//! does nothing more. So every life's guests and store writes check its
//! flag: a dead life starts no guest and writes nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ferry_actors::ops::audit::{AuditEntry, AuditQuery};
use ferry_actors::ops::jobs::Job;
use ferry_actors::ops::store::{
    AdoptedFrom, MemStore, NodeStore, StoreError, StoredState, StoredVm,
};

/// One life of a host: alive until its crash.
#[derive(Debug, Clone)]
pub struct Life(Arc<AtomicBool>);

impl Life {
    /// A life that has begun.
    pub fn new() -> Self {
        Self(Arc::new(AtomicBool::new(true)))
    }

    /// Whether the host still lives this life.
    pub fn alive(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// The crash.
    pub fn end(&self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl Default for Life {
    fn default() -> Self {
        Self::new()
    }
}

/// The host's durable store as one life sees it: writes of a dead life
/// never land.
pub struct LifeStore {
    /// The store kept across lives.
    pub store: MemStore,
    /// This life.
    pub life: Life,
}

impl LifeStore {
    fn write(&self, f: impl FnOnce(&MemStore) -> Result<(), StoreError>) -> Result<(), StoreError> {
        if !self.life.alive() {
            return Err(StoreError("the host crashed".into()));
        }
        f(&self.store)
    }
}

impl NodeStore for LifeStore {
    fn load(&self) -> Result<StoredState, StoreError> {
        self.store.load()
    }

    fn put_vm(&self, vm: &StoredVm) -> Result<(), StoreError> {
        self.write(|s| s.put_vm(vm))
    }

    fn adopt(&self, vm: &StoredVm, from: &AdoptedFrom) -> Result<(), StoreError> {
        self.write(|s| s.adopt(vm, from))
    }

    fn confirm_arrival(&self, vm: &str, from: &AdoptedFrom) -> Result<(), StoreError> {
        self.write(|s| s.confirm_arrival(vm, from))
    }

    fn remove_vm(&self, name: &str) -> Result<(), StoreError> {
        self.write(|s| s.remove_vm(name))
    }

    fn put_job(&self, job: &Job) -> Result<(), StoreError> {
        self.write(|s| s.put_job(job))
    }

    fn put_migration(
        &self,
        record: &ferry_actors::node::host::history::MigrationRecord,
    ) -> Result<(), StoreError> {
        self.write(|s| s.put_migration(record))
    }

    fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        self.write(|s| s.append_audit(entry))
    }

    fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        self.store.audit(query)
    }

    fn set_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.write(|s| s.set_setting(key, value))
    }
}
