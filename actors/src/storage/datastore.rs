//! The datastores a host mounts, behind one narrow trait: files in
//! directories in `ferry-host`, [`MemDatastores`] in tests and the
//! simulation.
//!
//! A VM's home is the folder `VM/` on a datastore: its definition
//! (`vm.toml`), its log (`vm.log`) and its disks (`DISK.raw`). Hosts whose
//! datastores have the same [`Datastores::location`] share them: a VM
//! moving between them moves only its disks' locks.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use crate::disk::{BlockBackend, DiskError, MemDisk};

/// What storage migration needs from the datastores of a host.
pub trait Datastores: Send + Sync + 'static {
    /// The datastores' names.
    fn names(&self) -> Vec<String>;

    /// Where datastore `ds` really is; equal locations are shared.
    fn location(&self, ds: &str) -> Result<String, DiskError>;

    /// Creates a zeroed sparse disk at `path` on `ds` (its folder too),
    /// locked for this host; refuses to replace a file.
    fn create_disk(
        &self,
        ds: &str,
        path: &str,
        len: u64,
    ) -> Result<Box<dyn BlockBackend>, DiskError>;

    /// Opens the disk at `path` on `ds` and takes its lock.
    fn open_disk(&self, ds: &str, path: &str) -> Result<Box<dyn BlockBackend>, DiskError>;

    /// Writes a small file durably (replacing it).
    fn write_file(&self, ds: &str, path: &str, bytes: &[u8]) -> Result<(), DiskError>;

    /// Reads a small file.
    fn read_file(&self, ds: &str, path: &str) -> Result<Vec<u8>, DiskError>;

    /// Removes a file (a missing one is fine) and its folder once empty.
    fn remove(&self, ds: &str, path: &str) -> Result<(), DiskError>;

    /// The files (not disks' lock state) in folder `dir` of `ds`.
    fn list(&self, ds: &str, dir: &str) -> Result<Vec<String>, DiskError>;

    /// Renames a file (an open disk keeps working under its new name).
    fn rename(&self, ds: &str, from: &str, to: &str) -> Result<(), DiskError>;

    /// Every file on `ds`, in any VM folder, whose name ends with `suffix`.
    fn find(&self, ds: &str, suffix: &str) -> Result<Vec<String>, DiskError>;

    /// Space on `ds`: (bytes its files take, bytes it can hold).
    fn space(&self, ds: &str) -> Result<(u64, u64), DiskError>;

    /// Whether a file (disk or small file) is at `path` on `ds`.
    fn exists(&self, ds: &str, path: &str) -> Result<bool, DiskError>;
}

/// The name a disk or home file has while it arrives on `host`: a host
/// that restarts deletes its own (they belong to migrations that died
/// with it), never another host's on a shared datastore.
pub fn arriving_name(path: &str, host: &str) -> String {
    format!("{path}{}", arriving_suffix(host))
}

/// The suffix of [`arriving_name`].
pub fn arriving_suffix(host: &str) -> String {
    format!(".arriving-{host}")
}

/// Deletes what arrived on this host's datastores for migrations that
/// never finished (they died with the host's previous life).
pub fn remove_arrivals(stores: &dyn Datastores, host: &str) {
    let suffix = arriving_suffix(host);
    for ds in stores.names() {
        for path in stores.find(&ds, &suffix).unwrap_or_default() {
            tracing::info!(datastore = %ds, %path, "removing a half-arrived file");
            let _ = stores.remove(&ds, &path);
        }
    }
}

/// Finds datastore `name` among `names`, with a clear error.
pub fn check_datastore(stores: &dyn Datastores, name: &str) -> Result<(), DiskError> {
    let names = stores.names();
    if names.iter().any(|n| n == name) {
        Ok(())
    } else {
        Err(unknown_datastore(name, &names))
    }
}

/// The error for a datastore this host does not have, naming those it has.
pub fn unknown_datastore(name: &str, names: &[String]) -> DiskError {
    DiskError::Io {
        op: "find datastore",
        reason: format!(
            "no datastore named {name} (this host has: {})",
            names.join(", ")
        ),
    }
}

/// Storage shared by every host of a test or simulation (a SAN): files by
/// (location, path).
#[derive(Debug, Clone, Default)]
pub struct MemStorage {
    files: Arc<Mutex<BTreeMap<(String, String), MemFile>>>,
}

#[derive(Debug)]
enum MemFile {
    Disk {
        disk: Arc<Mutex<MemDisk>>,
        /// Which [`MemDatastores`] (one per host life) holds the lock.
        holder: Arc<Mutex<Option<u64>>>,
    },
    Small(Vec<u8>),
}

/// Tells [`MemDatastores`] apart: each holds its disks' locks as its own.
static NEXT_HOLDER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl MemStorage {
    /// Empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    /// The machine holding `location` lost power: every disk there keeps
    /// only what was flushed ([`MemDisk::crash`]).
    pub fn crash_location(&self, location: &str) {
        for (key, file) in self.files.lock().expect("storage").iter() {
            if let (true, MemFile::Disk { disk, .. }) = (key.0 == location, file) {
                disk.lock().expect("disk").crash();
            }
        }
    }

    /// Every file as (location, path).
    pub fn files(&self) -> Vec<(String, String)> {
        self.files
            .lock()
            .expect("storage")
            .keys()
            .cloned()
            .collect()
    }
}

/// A host's datastores in [`MemStorage`]: name → location.
#[derive(Debug, Clone)]
pub struct MemDatastores {
    storage: MemStorage,
    stores: BTreeMap<String, String>,
    capacities: BTreeMap<String, u64>,
    /// The lock holder its disks are opened as (clones share it, as
    /// threads of one process share its file locks).
    holder: u64,
}

/// What a [`MemDatastores`] datastore holds unless told otherwise.
pub const MEM_CAPACITY_DEFAULT: u64 = 1 << 40;

impl MemDatastores {
    /// Datastores `(name, location)` in `storage`.
    pub fn new(storage: MemStorage, stores: &[(&str, &str)]) -> Self {
        Self {
            storage,
            stores: stores
                .iter()
                .map(|(n, l)| ((*n).to_owned(), (*l).to_owned()))
                .collect(),
            capacities: BTreeMap::new(),
            holder: NEXT_HOLDER.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// The process that opened these datastores died: every lock it held
    /// is free, and its open disks fail writes from now on (as a dead
    /// process's file locks go with it, and it writes nothing more).
    pub fn power_off(&self) {
        for file in self.storage.files.lock().expect("storage").values() {
            if let MemFile::Disk { holder, .. } = file {
                let mut h = holder.lock().expect("lock holder");
                if *h == Some(self.holder) {
                    *h = None;
                }
            }
        }
    }

    /// Datastore `ds` holds `bytes` (default [`MEM_CAPACITY_DEFAULT`]).
    #[must_use]
    pub fn with_capacity(mut self, ds: &str, bytes: u64) -> Self {
        self.capacities.insert(ds.to_owned(), bytes);
        self
    }

    /// A host's usual datastores: `local` (its own), `archive` (its own)
    /// and `shared` (one SAN every host built this way sees).
    pub fn standard(storage: MemStorage, host: &str) -> Self {
        let archive = format!("{host}-archive");
        Self::new(
            storage,
            &[("local", host), ("archive", &archive), ("shared", "san")],
        )
    }

    /// The paths on `ds` that satisfy `keep`.
    fn paths_where(&self, ds: &str, keep: impl Fn(&str) -> bool) -> Result<Vec<String>, DiskError> {
        let location = self.location(ds)?;
        Ok(self
            .storage
            .files
            .lock()
            .expect("storage")
            .keys()
            .filter(|(l, p)| *l == location && keep(p))
            .map(|(_, p)| p.clone())
            .collect())
    }

    fn key(&self, ds: &str, path: &str) -> Result<(String, String), DiskError> {
        self.location(ds).map(|l| (l, path.to_owned()))
    }
}

/// An open [`MemDisk`] holding its file's lock until dropped.
#[derive(Debug)]
pub struct MemDiskHandle {
    disk: Arc<Mutex<MemDisk>>,
    holder: Arc<Mutex<Option<u64>>>,
    me: u64,
}

impl MemDiskHandle {
    /// Refuses a write once its holder lost the lock ([`MemDatastores::power_off`]).
    fn check_held(&self, op: &'static str) -> Result<(), DiskError> {
        if *self.holder.lock().expect("lock holder") == Some(self.me) {
            return Ok(());
        }
        Err(DiskError::Io {
            op,
            reason: "the disk's lock went with its host's power".into(),
        })
    }
}

impl Drop for MemDiskHandle {
    fn drop(&mut self) {
        let mut h = self.holder.lock().expect("lock holder");
        if *h == Some(self.me) {
            *h = None;
        }
    }
}

impl BlockBackend for MemDiskHandle {
    fn len_bytes(&self) -> u64 {
        self.disk.lock().expect("disk").len_bytes()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.disk.lock().expect("disk").read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        self.check_held("write")?;
        self.disk.lock().expect("disk").write_at(offset, data)
    }
    fn flush(&mut self) -> Result<(), DiskError> {
        self.check_held("flush")?;
        self.disk.lock().expect("disk").flush()
    }
    fn allocated(&self) -> Result<Vec<Range<u64>>, DiskError> {
        self.disk.lock().expect("disk").allocated()
    }
    fn write_durable(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        self.check_held("write")?;
        self.disk.lock().expect("disk").write_durable(offset, data)
    }
    fn copy_to(&self, _range: Range<u64>, _dst: &mut dyn BlockBackend) -> Result<bool, DiskError> {
        Ok(false)
    }
    fn raw_fd(&self) -> Option<i32> {
        None
    }
}

fn no_file(path: &str) -> DiskError {
    DiskError::Io {
        op: "open",
        reason: format!("{path}: no such file"),
    }
}

impl Datastores for MemDatastores {
    fn names(&self) -> Vec<String> {
        self.stores.keys().cloned().collect()
    }

    fn space(&self, ds: &str) -> Result<(u64, u64), DiskError> {
        let location = self.location(ds)?;
        let used = self
            .storage
            .files
            .lock()
            .expect("storage")
            .iter()
            .filter(|((l, _), _)| *l == location)
            .map(|(_, f)| match f {
                MemFile::Disk { disk, .. } => disk.lock().expect("disk").len_bytes(),
                MemFile::Small(bytes) => bytes.len() as u64,
            })
            .sum();
        let capacity = self
            .capacities
            .get(ds)
            .copied()
            .unwrap_or(MEM_CAPACITY_DEFAULT);
        Ok((used, capacity))
    }

    fn location(&self, ds: &str) -> Result<String, DiskError> {
        self.stores
            .get(ds)
            .cloned()
            .ok_or_else(|| unknown_datastore(ds, &self.names()))
    }

    fn create_disk(
        &self,
        ds: &str,
        path: &str,
        len: u64,
    ) -> Result<Box<dyn BlockBackend>, DiskError> {
        let key = self.key(ds, path)?;
        let mut files = self.storage.files.lock().expect("storage");
        if files.contains_key(&key) {
            return Err(DiskError::Io {
                op: "create disk",
                reason: format!("{path} exists on {ds}"),
            });
        }
        let disk = Arc::new(Mutex::new(MemDisk::new(len)));
        let holder = Arc::new(Mutex::new(Some(self.holder)));
        files.insert(
            key,
            MemFile::Disk {
                disk: disk.clone(),
                holder: holder.clone(),
            },
        );
        Ok(Box::new(MemDiskHandle {
            disk,
            holder,
            me: self.holder,
        }))
    }

    fn open_disk(&self, ds: &str, path: &str) -> Result<Box<dyn BlockBackend>, DiskError> {
        let key = self.key(ds, path)?;
        let files = self.storage.files.lock().expect("storage");
        match files.get(&key) {
            Some(MemFile::Disk { disk, holder }) => {
                let mut h = holder.lock().expect("lock holder");
                if h.is_some() {
                    return Err(DiskError::Locked(format!("{ds}:{path}")));
                }
                *h = Some(self.holder);
                Ok(Box::new(MemDiskHandle {
                    disk: disk.clone(),
                    holder: holder.clone(),
                    me: self.holder,
                }))
            }
            _ => Err(no_file(path)),
        }
    }

    fn write_file(&self, ds: &str, path: &str, bytes: &[u8]) -> Result<(), DiskError> {
        let key = self.key(ds, path)?;
        self.storage
            .files
            .lock()
            .expect("storage")
            .insert(key, MemFile::Small(bytes.to_vec()));
        Ok(())
    }

    fn read_file(&self, ds: &str, path: &str) -> Result<Vec<u8>, DiskError> {
        let key = self.key(ds, path)?;
        match self.storage.files.lock().expect("storage").get(&key) {
            Some(MemFile::Small(b)) => Ok(b.clone()),
            _ => Err(no_file(path)),
        }
    }

    fn remove(&self, ds: &str, path: &str) -> Result<(), DiskError> {
        let key = self.key(ds, path)?;
        self.storage.files.lock().expect("storage").remove(&key);
        Ok(())
    }

    fn rename(&self, ds: &str, from: &str, to: &str) -> Result<(), DiskError> {
        let (from, to) = (self.key(ds, from)?, self.key(ds, to)?);
        let mut files = self.storage.files.lock().expect("storage");
        let f = files.remove(&from).ok_or_else(|| no_file(&from.1))?;
        files.insert(to, f);
        Ok(())
    }

    fn find(&self, ds: &str, suffix: &str) -> Result<Vec<String>, DiskError> {
        self.paths_where(ds, |p| p.ends_with(suffix))
    }

    fn list(&self, ds: &str, dir: &str) -> Result<Vec<String>, DiskError> {
        let prefix = format!("{}/", dir.trim_end_matches('/'));
        self.paths_where(ds, |p| p.starts_with(&prefix))
    }

    fn exists(&self, ds: &str, path: &str) -> Result<bool, DiskError> {
        let key = self.key(ds, path)?;
        Ok(self
            .storage
            .files
            .lock()
            .expect("storage")
            .contains_key(&key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_hosts_locks_go_with_it_and_its_disks_write_no_more() {
        let san = MemStorage::new();
        let old_life = MemDatastores::new(san.clone(), &[("shared", "san-1")]);
        let mut old = old_life
            .create_disk("shared", "vm/d.raw", 4096)
            .expect("in a test");
        let next_life = MemDatastores::new(san, &[("shared", "san-1")]);
        assert!(matches!(
            next_life.open_disk("shared", "vm/d.raw"),
            Err(DiskError::Locked(_))
        ));
        old_life.power_off();
        let mut new = next_life
            .open_disk("shared", "vm/d.raw")
            .expect("the lock is free");
        assert!(
            old.write_durable(0, &[1; 512]).is_err(),
            "a dead process writes nothing"
        );
        drop(old);
        assert!(
            matches!(
                next_life.open_disk("shared", "vm/d.raw"),
                Err(DiskError::Locked(_))
            ),
            "the old handle's drop does not free the new holder's lock"
        );
        new.write_durable(0, &[2; 512])
            .expect("the new holder writes");
    }

    #[test]
    fn a_disk_is_locked_while_open_and_shared_locations_see_one_file() {
        let san = MemStorage::new();
        let a = MemDatastores::new(san.clone(), &[("shared", "san-1"), ("local-a", "a")]);
        let b = MemDatastores::new(san, &[("shared", "san-1")]);
        let mut disk = a
            .create_disk("shared", "vm/disk0.raw", 1 << 20)
            .expect("create");
        disk.write_at(0, &[7; 512]).expect("write");
        assert!(matches!(
            b.open_disk("shared", "vm/disk0.raw"),
            Err(DiskError::Locked(_))
        ));
        drop(disk);
        let other = b.open_disk("shared", "vm/disk0.raw").expect("lock moved");
        let mut buf = [0u8; 512];
        other.read_at(0, &mut buf).expect("read");
        assert_eq!(buf, [7; 512]);
        assert!(b.open_disk("local-a", "x").is_err(), "b has no local-a");
        assert_eq!(a.list("shared", "vm").expect("list"), vec!["vm/disk0.raw"]);
    }
}
