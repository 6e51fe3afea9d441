//! The node store on SQLite: inventory, jobs, migration records, audit
//! log and settings in one database file per node.
//!
//! WAL journal with `synchronous = FULL`: every write is durable (fsync'd)
//! when the call returns, so a node killed right after answering a
//! request still has what it answered about. Values are the actors'
//! rkyv archives; the audit log also keeps its searchable columns.

use std::path::Path;
use std::sync::Mutex;

use ferry_actors::node::host::history::MigrationRecord;
use ferry_actors::ops::audit::{AuditEntry, AuditQuery, merge};
use ferry_actors::ops::jobs::Job;
use ferry_actors::ops::store::{
    ADOPTIONS_KEPT, AdoptedFrom, NodeStore, StoreError, StoredState, StoredVm, decode, encode,
};
use rusqlite::{Connection, OptionalExtension, params};

/// Schema version this code writes.
const SCHEMA_VERSION: i64 = 3;

/// A node's SQLite database.
pub struct SqliteStore {
    db: Mutex<Connection>,
    /// `<db>.lock`, locked for as long as this store is open: one process
    /// per node identity (a second node started from a copy of the node
    /// file is refused instead of running the same VMs).
    _lock: std::fs::File,
}

/// Takes the node's exclusive lock beside its database.
fn lock_node(db: &Path) -> Result<std::fs::File, StoreError> {
    let mut name = db.as_os_str().to_owned();
    name.push(".lock");
    let path = std::path::PathBuf::from(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| err(format!("{}: {e}", path.display())))?;
    crate::datastore::lock(&file, &path).map_err(|e| match e {
        ferry_actors::disk::DiskError::Locked(_) => err(format!(
            "{} is in use by another ferry node process (one process per node; stop the other first)",
            db.display()
        )),
        other => err(format!("locking {}: {other}", path.display())),
    })?;
    Ok(file)
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    ///
    /// # Errors
    /// The file cannot be opened, or it was written by a newer ferry.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let lock = lock_node(path)?;
        let db = Connection::open(path).map_err(|e| err(format!("{}: {e}", path.display())))?;
        db.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             PRAGMA busy_timeout = 5000;
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS vms (name TEXT PRIMARY KEY, value BLOB NOT NULL);
             CREATE TABLE IF NOT EXISTS jobs (id INTEGER PRIMARY KEY, value BLOB NOT NULL);
             CREATE TABLE IF NOT EXISTS migrations (
                 source TEXT NOT NULL, id INTEGER NOT NULL, seq INTEGER NOT NULL,
                 value BLOB NOT NULL, PRIMARY KEY (source, id));
             CREATE TABLE IF NOT EXISTS audit (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT, at_ms INTEGER NOT NULL,
                 vm TEXT NOT NULL, read INTEGER NOT NULL, value BLOB NOT NULL);
             CREATE INDEX IF NOT EXISTS audit_at ON audit (at_ms);
             CREATE INDEX IF NOT EXISTS audit_vm ON audit (vm, at_ms);
             CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS adoptions (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT, value BLOB NOT NULL);
             CREATE TABLE IF NOT EXISTS arrivals (
                 vm TEXT PRIMARY KEY, peer TEXT NOT NULL, id INTEGER NOT NULL);",
        )
        .map_err(|e| err(format!("{}: {e}", path.display())))?;
        let version: Option<String> = db
            .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(err)?;
        match version.and_then(|v| v.parse::<i64>().ok()) {
            None => {
                db.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema', ?1)",
                    params![SCHEMA_VERSION.to_string()],
                )
                .map_err(err)?;
            }
            Some(v) if v > SCHEMA_VERSION => {
                return Err(err(format!(
                    "{} has schema {v}; this ferry knows up to {SCHEMA_VERSION}",
                    path.display()
                )));
            }
            Some(v) if v < SCHEMA_VERSION => {
                // Version 1 lacked the adoptions table, version 2 the arrivals
                // table (its VMs' arrivals count as confirmed); both are
                // created above.
                db.execute(
                    "UPDATE meta SET value = ?1 WHERE key = 'schema'",
                    params![SCHEMA_VERSION.to_string()],
                )
                .map_err(err)?;
            }
            Some(_) => {}
        }
        Ok(Self {
            db: Mutex::new(db),
            _lock: lock,
        })
    }

    fn with<R>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<R>) -> Result<R, StoreError> {
        let db = self
            .db
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&db).map_err(err)
    }

    fn blobs(&self, sql: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        self.with(|db| {
            let mut stmt = db.prepare(sql)?;
            let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
            rows.collect()
        })
    }
}

/// Records kept in the database (the oldest go first).
const MIGRATIONS_KEPT: i64 = 1000;

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// An id (all 64 bits used: migration ids start with a hash) as SQLite's
/// integer, one to one.
fn id_sql(id: u64) -> i64 {
    id.cast_signed()
}

fn id_from_sql(v: i64) -> u64 {
    v.cast_unsigned()
}

impl NodeStore for SqliteStore {
    fn load(&self) -> Result<StoredState, StoreError> {
        let vms = self
            .blobs("SELECT value FROM vms ORDER BY name")?
            .iter()
            .map(|b| decode::<StoredVm>(b))
            .collect::<Result<_, _>>()?;
        let jobs = self
            .blobs("SELECT value FROM jobs ORDER BY id")?
            .iter()
            .map(|b| decode::<Job>(b))
            .collect::<Result<_, _>>()?;
        let migrations = self
            .blobs("SELECT value FROM migrations ORDER BY seq")?
            .iter()
            .map(|b| decode::<MigrationRecord>(b))
            .collect::<Result<_, _>>()?;
        let settings = self.with(|db| {
            let mut stmt = db.prepare("SELECT key, value FROM settings")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })?;
        let adoptions = self
            .blobs("SELECT value FROM adoptions ORDER BY seq")?
            .iter()
            .map(|b| decode::<AdoptedFrom>(b))
            .collect::<Result<_, _>>()?;
        let arrivals = self.with(|db| {
            let mut stmt = db.prepare("SELECT vm, peer, id FROM arrivals")?;
            let rows =
                stmt.query_map([], |r| Ok((r.get(0)?, (r.get(1)?, id_from_sql(r.get(2)?)))))?;
            rows.collect()
        })?;
        Ok(StoredState {
            vms,
            jobs,
            migrations,
            settings,
            adoptions,
            arrivals,
        })
    }

    fn adopt(&self, vm: &StoredVm, from: &AdoptedFrom) -> Result<(), StoreError> {
        let (vm_value, from_value) = (encode(vm)?, encode(from)?);
        let mut db = self
            .db
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let tx = db.transaction().map_err(err)?;
        tx.execute(
            "INSERT OR REPLACE INTO vms (name, value) VALUES (?1, ?2)",
            params![vm.config.name, vm_value],
        )
        .map_err(err)?;
        tx.execute(
            "INSERT INTO adoptions (value) VALUES (?1)",
            params![from_value],
        )
        .map_err(err)?;
        tx.execute(
            "DELETE FROM adoptions WHERE seq <= (SELECT MAX(seq) FROM adoptions) - ?1",
            params![to_i64(ADOPTIONS_KEPT as u64)],
        )
        .map_err(err)?;
        tx.execute(
            "INSERT OR REPLACE INTO arrivals (vm, peer, id) VALUES (?1, ?2, ?3)",
            params![vm.config.name, from.peer, id_sql(from.migration_id)],
        )
        .map_err(err)?;
        tx.commit().map_err(err)
    }

    fn confirm_arrival(&self, vm: &str, from: &AdoptedFrom) -> Result<(), StoreError> {
        self.with(|db| {
            db.execute(
                "DELETE FROM arrivals WHERE vm = ?1 AND peer = ?2 AND id = ?3",
                params![vm, from.peer, id_sql(from.migration_id)],
            )
        })
        .map(drop)
    }

    fn put_vm(&self, vm: &StoredVm) -> Result<(), StoreError> {
        let value = encode(vm)?;
        self.with(|db| {
            db.execute(
                "INSERT OR REPLACE INTO vms (name, value) VALUES (?1, ?2)",
                params![vm.config.name, value],
            )
        })
        .map(drop)
    }

    fn remove_vm(&self, name: &str) -> Result<(), StoreError> {
        self.with(|db| {
            db.execute("DELETE FROM vms WHERE name = ?1", params![name])?;
            db.execute("DELETE FROM arrivals WHERE vm = ?1", params![name])
        })
        .map(drop)
    }

    fn put_job(&self, job: &Job) -> Result<(), StoreError> {
        let value = encode(job)?;
        self.with(|db| {
            db.execute(
                "INSERT OR REPLACE INTO jobs (id, value) VALUES (?1, ?2)",
                params![id_sql(job.id), value],
            )
        })
        .map(drop)
    }

    fn put_migration(&self, record: &MigrationRecord) -> Result<(), StoreError> {
        let value = encode(record)?;
        self.with(|db| {
            let seq: i64 = db.query_row(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM migrations",
                [],
                |r| r.get(0),
            )?;
            db.execute(
                "INSERT OR REPLACE INTO migrations (source, id, seq, value) VALUES (?1, ?2, ?3, ?4)",
                params![record.from, id_sql(record.id), seq, value],
            )?;
            db.execute(
                "DELETE FROM migrations WHERE seq <= ?1",
                params![seq - MIGRATIONS_KEPT],
            )
        })
        .map(drop)
    }

    fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        let value = encode(entry)?;
        self.with(|db| {
            db.execute(
                "INSERT INTO audit (at_ms, vm, read, value) VALUES (?1, ?2, ?3, ?4)",
                params![to_i64(entry.at_unix_ms), entry.vm, entry.read, value],
            )
        })
        .map(drop)
    }

    fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        let blobs = self.with(|db| {
            let mut stmt = db.prepare(
                "SELECT value FROM audit
                 WHERE at_ms >= ?1 AND (?2 IS NULL OR vm = ?2) AND (?3 OR read = 0)
                 ORDER BY at_ms, seq",
            )?;
            let rows = stmt.query_map(
                params![to_i64(query.since_unix_ms), query.vm, query.reads],
                |r| r.get::<_, Vec<u8>>(0),
            )?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })?;
        let entries = blobs
            .iter()
            .map(|b| decode::<AuditEntry>(b))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(merge(entries, query.limit))
    }

    fn set_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.with(|db| {
            db.execute(
                "INSERT OR REPLACE INTO settings (key, value) VALUES (?1, ?2)",
                params![key, value],
            )
        })
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_actors::node::client::MigrateOptions;
    use ferry_actors::ops::jobs::{JobState, Priority};

    fn job(id: u64) -> Job {
        Job {
            id,
            vm: "web".into(),
            to: "b".into(),
            options: MigrateOptions::default(),
            priority: Priority::High,
            not_before_unix_ms: 5,
            submitted_unix_ms: 1,
            submitted_by: "CN=alice".into(),
            state: JobState::Queued,
            started_unix_ms: 0,
            ended_unix_ms: 0,
            migration_id: 0,
            result: String::new(),
        }
    }

    fn entry(at: u64, vm: &str, read: bool) -> AuditEntry {
        AuditEntry {
            at_unix_ms: at,
            node: "a".into(),
            who: "CN=alice".into(),
            action: "migrate".into(),
            vm: vm.into(),
            from: "a".into(),
            to: "b".into(),
            duration_ms: 3,
            downtime_ms: Some(1.5),
            outcome: "ok".into(),
            detail: String::new(),
            read,
        }
    }

    #[test]
    fn what_is_written_is_there_after_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.db");
        {
            let store = SqliteStore::open(&path).expect("open");
            store.put_job(&job(1)).expect("job");
            let mut done = job(2);
            done.state = JobState::Done;
            store.put_job(&done).expect("job");
            store.put_job(&job(1)).expect("replace");
            store.set_setting("maintenance", "1").expect("setting");
            store.append_audit(&entry(10, "web", false)).expect("audit");
            store.append_audit(&entry(20, "db", false)).expect("audit");
            store.append_audit(&entry(30, "web", true)).expect("audit");
        }
        let store = SqliteStore::open(&path).expect("reopen");
        let state = store.load().expect("load");
        assert_eq!(state.jobs.len(), 2);
        assert_eq!(state.jobs[0], job(1));
        assert_eq!(state.jobs[1].state, JobState::Done);
        assert_eq!(
            state.settings.get("maintenance").map(String::as_str),
            Some("1")
        );
        let web = store
            .audit(&AuditQuery {
                vm: Some("web".into()),
                ..AuditQuery::default()
            })
            .expect("audit");
        assert_eq!(web, vec![entry(10, "web", false)]);
        let since = store
            .audit(&AuditQuery {
                since_unix_ms: 15,
                reads: true,
                ..AuditQuery::default()
            })
            .expect("audit");
        assert_eq!(since.len(), 2);
        store
            .remove_vm("nothing")
            .expect("removing nothing is fine");
    }

    #[test]
    fn a_second_process_for_the_same_node_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.db");
        let first = SqliteStore::open(&path).expect("open");
        let e = SqliteStore::open(&path).err().expect("refused");
        assert!(e.0.contains("in use by another ferry node"), "{e}");
        drop(first);
        SqliteStore::open(&path).expect("free once the first is closed");
    }

    #[test]
    fn an_adoption_is_kept_with_its_vm() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.db");
        let vm = StoredVm {
            config: ferry_actors::migration::VmConfig {
                name: "web".into(),
                memory_bytes: 16 << 20,
                vcpus: 1,
                cpu_features: Vec::new(),
                mac: [0x52, 0x54, 0, 1, 2, 3],
                kind: ferry_actors::migration::GuestKind::Synthetic {
                    wss_bytes: 0,
                    seed: 1,
                    writes_per_sec: 1,
                },
                disks: Vec::new(),
            },
            generation: 2,
            running: true,
            leaving: None,
        };
        // Migration ids use all 64 bits (they start with a name hash).
        let from = AdoptedFrom {
            peer: "host-a".into(),
            migration_id: (0xfe_dc_ba << 40) | 7,
        };
        SqliteStore::open(&path)
            .expect("open")
            .adopt(&vm, &from)
            .expect("adopt");
        let store = SqliteStore::open(&path).expect("reopen");
        let state = store.load().expect("load");
        assert_eq!(state.vms, vec![vm]);
        assert_eq!(state.adoptions, vec![from.clone()]);
        assert_eq!(
            state.arrivals.get("web"),
            Some(&("host-a".to_owned(), from.migration_id)),
            "unconfirmed until the source says it let the VM go"
        );
        let other = AdoptedFrom {
            migration_id: from.migration_id + 1,
            ..from.clone()
        };
        store.confirm_arrival("web", &other).expect("confirm");
        assert_eq!(
            store.load().expect("load").arrivals.len(),
            1,
            "another migration's confirmation changes nothing"
        );
        store.confirm_arrival("web", &from).expect("confirm");
        assert!(store.load().expect("load").arrivals.is_empty());
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.db");
        drop(SqliteStore::open(&path).expect("open"));
        let db = Connection::open(&path).expect("raw");
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema'", [])
            .expect("bump");
        drop(db);
        let e = SqliteStore::open(&path).err().expect("refused");
        assert!(e.0.contains("schema 99"), "{e}");
    }
}
