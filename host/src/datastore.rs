//! Datastores (directories) and the disks on them: raw, sparse files,
//! locked by the host that runs the VM.
//!
//! The lock is an open-file-description lock (`F_OFD_SETLK`) over the whole
//! file, held as long as the [`FileDisk`] is open: a second opener (another
//! host on a shared datastore, or the same process opening the file again)
//! is refused, so two owners never write one disk.

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ferry_actors::disk::{BlockBackend, DiskError, SECTOR_BYTES, check_range};

/// A datastore: a directory, possibly shared by several hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datastore {
    /// Name, as the node config gives it.
    pub name: String,
    /// Its directory.
    pub root: PathBuf,
    /// Its identity, written in it ([`IDENTITY_FILE`]) by the first host
    /// that opened it: hosts share a datastore when they read the same
    /// identity, whatever path each mounts it at (and two directories at
    /// the same path on two hosts are not shared).
    pub id: String,
}

/// The file in a datastore's directory that names it.
pub const IDENTITY_FILE: &str = ".ferry-datastore-id";

/// Reads the datastore identity in `root`, writing a new random one
/// (durably) if there is none yet. Two hosts opening a new shared
/// datastore at once agree: the file is created exclusively, and the
/// loser reads the winner's.
fn identity(root: &Path) -> Result<String, DiskError> {
    use std::io::{Read, Write};
    let path = root.join(IDENTITY_FILE);
    let mut fresh = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut fresh))
        .map_err(io("datastore identity"))?;
    let id: String = fresh.iter().map(|b| format!("{b:02x}")).collect();
    match OpenOptions::new().write(true).create_new(true).open(&path) {
        Ok(mut f) => {
            f.write_all(id.as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(io("datastore identity"))?;
            File::open(root)
                .and_then(|d| d.sync_all())
                .map_err(io("datastore identity"))?;
            Ok(id)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let text = std::fs::read_to_string(&path).map_err(io("datastore identity"))?;
            let text = text.trim();
            if text.len() != 32 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(DiskError::Io {
                    op: "datastore identity",
                    reason: format!("{} does not hold an identity", path.display()),
                });
            }
            Ok(text.to_owned())
        }
        Err(e) => Err(io("datastore identity")(e)),
    }
}

impl Datastore {
    /// A datastore at `root`, which must be an existing directory.
    pub fn open(name: &str, root: &Path) -> Result<Self, DiskError> {
        let meta = std::fs::metadata(root).map_err(io("open datastore"))?;
        if !meta.is_dir() {
            return Err(DiskError::Io {
                op: "open datastore",
                reason: format!("{} is not a directory", root.display()),
            });
        }
        Ok(Self {
            name: name.to_owned(),
            root: root.to_owned(),
            id: identity(root)?,
        })
    }

    /// Where `relative` lives on this datastore.
    pub fn path(&self, relative: &str) -> PathBuf {
        self.root.join(relative)
    }
}

fn io(op: &'static str) -> impl Fn(std::io::Error) -> DiskError {
    move |e| DiskError::Io {
        op,
        reason: e.to_string(),
    }
}

/// A raw disk image in a sparse file, locked while open.
#[derive(Debug)]
pub struct FileDisk {
    file: File,
    len: u64,
    path: PathBuf,
    /// The datastore's name, for errors (its folder until named).
    datastore: String,
}

impl FileDisk {
    /// Creates a zeroed (sparse) disk of `len_bytes` at `path`; refuses to
    /// replace an existing file.
    pub fn create(path: &Path, len_bytes: u64) -> Result<Self, DiskError> {
        if !len_bytes.is_multiple_of(SECTOR_BYTES) {
            return Err(DiskError::Io {
                op: "create disk",
                reason: format!("{len_bytes} bytes is not whole sectors"),
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io("create disk"))?;
        lock(&file, path)?;
        file.set_len(len_bytes).map_err(io("size disk"))?;
        file.sync_all().map_err(io("sync new disk"))?;
        Ok(Self {
            file,
            len: len_bytes,
            path: path.to_owned(),
            datastore: folder_two_up(path),
        })
    }

    /// Opens the disk at `path` and takes its lock.
    pub fn open(path: &Path) -> Result<Self, DiskError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io("open disk"))?;
        lock(&file, path)?;
        let len = file.metadata().map_err(io("stat disk"))?.len();
        Ok(Self {
            file,
            len,
            path: path.to_owned(),
            datastore: folder_two_up(path),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Names the datastore the disk is on, for its errors.
    pub fn on(mut self, datastore: &str) -> Self {
        datastore.clone_into(&mut self.datastore);
        self
    }

    fn fail(&self, op: &'static str) -> impl Fn(std::io::Error) -> DiskError + '_ {
        on(&self.datastore, op)
    }
}

/// An I/O error of `op` on datastore `ds`, told apart when it is full.
fn on<'a>(ds: &'a str, op: &'static str) -> impl Fn(std::io::Error) -> DiskError + 'a {
    move |e| match e.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT) => DiskError::Full {
            op,
            datastore: ds.to_owned(),
        },
        _ => io(op)(e),
    }
}

/// The datastore folder of a disk at `DATASTORE/VM/DISK.raw`.
fn folder_two_up(path: &Path) -> String {
    path.parent()
        .and_then(Path::parent)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Takes an exclusive OFD lock on the whole of `file` (held until the
/// file is closed; a second open in any process is refused).
pub(crate) fn lock(file: &File, path: &Path) -> Result<(), DiskError> {
    // SAFETY: an all-zero `flock` is a valid value for the plain C struct.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::c_short::try_from(libc::F_WRLCK).expect("F_WRLCK is small");
    fl.l_whence = libc::c_short::try_from(libc::SEEK_SET).expect("SEEK_SET is small");
    // SAFETY: F_OFD_SETLK on an open descriptor with a valid `flock`.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN | libc::EACCES) => Err(DiskError::Locked(path.display().to_string())),
        _ => Err(DiskError::Io {
            op: "lock disk",
            reason: e.to_string(),
        }),
    }
}

impl BlockBackend for FileDisk {
    fn len_bytes(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        check_range(offset, buf.len(), self.len)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(io("read disk"))
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        check_range(offset, data.len(), self.len)?;
        self.file
            .write_all_at(data, offset)
            .map_err(self.fail("write disk"))
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        self.file.sync_data().map_err(self.fail("flush disk"))
    }

    fn write_durable(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        check_range(offset, data.len(), self.len)?;
        let mut done = 0usize;
        while done < data.len() {
            let iov = libc::iovec {
                iov_base: data[done..].as_ptr().cast_mut().cast(),
                iov_len: data.len() - done,
            };
            let at = libc::off_t::try_from(offset + done as u64).map_err(|_| too_large())?;
            // SAFETY: one iovec over live bytes of `data`, which the kernel
            // only reads; RWF_DSYNC makes this write (alone) durable.
            let n = unsafe { libc::pwritev2(self.file.as_raw_fd(), &iov, 1, at, libc::RWF_DSYNC) };
            if n < 0 {
                return Err(self.fail("write disk")(std::io::Error::last_os_error()));
            }
            done += n.cast_unsigned();
        }
        Ok(())
    }

    fn allocated(&self) -> Result<Vec<Range<u64>>, DiskError> {
        let fd = self.file.as_raw_fd();
        let mut extents = Vec::new();
        let mut at: libc::off_t = 0;
        let len = libc::off_t::try_from(self.len).map_err(|_| DiskError::Io {
            op: "map disk",
            reason: "too large".into(),
        })?;
        while at < len {
            // SAFETY: lseek on an open descriptor; it only moves the offset.
            let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
            if data < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENXIO) {
                    break; // no data past `at`
                }
                return Err(io("find data")(e));
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            if hole < 0 {
                return Err(io("find hole")(std::io::Error::last_os_error()));
            }
            let (start, end) = (data.cast_unsigned(), hole.cast_unsigned());
            extents.push(start..end.min(self.len));
            at = hole;
        }
        Ok(extents)
    }

    fn copy_to(&self, range: Range<u64>, dst: &mut dyn BlockBackend) -> Result<bool, DiskError> {
        let Some(out) = dst.raw_fd() else {
            return Ok(false);
        };
        check_range(range.start, 0, self.len)?;
        let mut off_in = libc::loff_t::try_from(range.start).map_err(|_| too_large())?;
        let mut off_out = off_in;
        let mut left = range.end - range.start;
        while left > 0 {
            let want = usize::try_from(left.min(1 << 30)).expect("at most 1 GiB");
            // SAFETY: copy_file_range between two open descriptors, with
            // offsets we own; the kernel reads and writes no user memory.
            let n = unsafe {
                libc::copy_file_range(
                    self.file.as_raw_fd(),
                    &mut off_in,
                    out,
                    &mut off_out,
                    want,
                    0,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL)
                ) && left == range.end - range.start
                {
                    // Not offered between these files: copy through memory.
                    return Ok(false);
                }
                return Err(io("copy range")(e));
            }
            if n == 0 {
                return Err(DiskError::Io {
                    op: "copy range",
                    reason: "source ended early".into(),
                });
            }
            left -= n.cast_unsigned() as u64;
        }
        Ok(true)
    }

    fn raw_fd(&self) -> Option<i32> {
        Some(self.file.as_raw_fd())
    }
}

/// Bytes allocated by the files under `dir` (what `du` counts).
fn allocated_under(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => allocated_under(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

/// The size of the filesystem `dir` is on.
fn filesystem_bytes(dir: &Path) -> Result<u64, DiskError> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| DiskError::Io {
        op: "statvfs",
        reason: format!("{} has a NUL byte", dir.display()),
    })?;
    // SAFETY: an all-zero statvfs is a valid value to be overwritten.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a NUL-terminated string and `st` a valid out
    // pointer.
    if unsafe { libc::statvfs(path.as_ptr(), &raw mut st) } != 0 {
        return Err(DiskError::Io {
            op: "statvfs",
            reason: format!("{}: {}", dir.display(), std::io::Error::last_os_error()),
        });
    }
    Ok(st.f_blocks.saturating_mul(st.f_frsize))
}

fn too_large() -> DiskError {
    DiskError::Io {
        op: "copy range",
        reason: "offset too large".into(),
    }
}

/// The datastores of a node: names mapped to directories.
#[derive(Debug, Clone, Default)]
pub struct FileDatastores {
    stores: std::collections::BTreeMap<String, Datastore>,
}

impl FileDatastores {
    /// Opens every `(name, directory)`; directories must exist.
    pub fn open(list: &[(String, PathBuf)]) -> Result<Self, DiskError> {
        let mut stores = std::collections::BTreeMap::new();
        for (name, root) in list {
            stores.insert(name.clone(), Datastore::open(name, root)?);
        }
        Ok(Self { stores })
    }

    fn store(&self, ds: &str) -> Result<&Datastore, DiskError> {
        self.stores.get(ds).ok_or_else(|| {
            let names: Vec<String> = self.stores.keys().cloned().collect();
            ferry_actors::storage::datastore::unknown_datastore(ds, &names)
        })
    }

    fn file(&self, ds: &str, path: &str) -> Result<PathBuf, DiskError> {
        if path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(DiskError::Io {
                op: "find file",
                reason: format!("{path:?} is not a plain relative path"),
            });
        }
        Ok(self.store(ds)?.path(path))
    }
}

impl ferry_actors::storage::datastore::Datastores for FileDatastores {
    fn names(&self) -> Vec<String> {
        self.stores.keys().cloned().collect()
    }

    /// Bytes the datastore's files take on disk (sparse disks count what
    /// they allocated), and the size of the filesystem it is on.
    fn space(&self, ds: &str) -> Result<(u64, u64), DiskError> {
        let root = &self.store(ds)?.root;
        Ok((allocated_under(root), filesystem_bytes(root)?))
    }

    fn location(&self, ds: &str) -> Result<String, DiskError> {
        Ok(format!("datastore {}", self.store(ds)?.id))
    }

    fn create_disk(
        &self,
        ds: &str,
        path: &str,
        len: u64,
    ) -> Result<Box<dyn BlockBackend>, DiskError> {
        let file = self.file(ds, path)?;
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).map_err(io("create VM folder"))?;
        }
        Ok(Box::new(FileDisk::create(&file, len)?.on(ds)))
    }

    fn open_disk(&self, ds: &str, path: &str) -> Result<Box<dyn BlockBackend>, DiskError> {
        Ok(Box::new(FileDisk::open(&self.file(ds, path)?)?.on(ds)))
    }

    fn write_file(&self, ds: &str, path: &str, bytes: &[u8]) -> Result<(), DiskError> {
        let file = self.file(ds, path)?;
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).map_err(io("create VM folder"))?;
        }
        // Write aside, sync, rename: a crash leaves the old or the new file.
        let tmp = file.with_extension("tmp");
        let written = File::create(&tmp)
            .and_then(|mut f| std::io::Write::write_all(&mut f, bytes).and_then(|()| f.sync_all()))
            .map_err(on(ds, "write file"));
        if written.is_err() {
            // A half-written file would only hold on to space.
            let _ = std::fs::remove_file(&tmp);
        }
        written?;
        std::fs::rename(&tmp, &file).map_err(io("rename file"))
    }

    fn read_file(&self, ds: &str, path: &str) -> Result<Vec<u8>, DiskError> {
        std::fs::read(self.file(ds, path)?).map_err(io("read file"))
    }

    fn exists(&self, ds: &str, path: &str) -> Result<bool, DiskError> {
        self.file(ds, path)?
            .try_exists()
            .map_err(io("look for file"))
    }

    fn remove(&self, ds: &str, path: &str) -> Result<(), DiskError> {
        let file = self.file(ds, path)?;
        match std::fs::remove_file(&file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("remove file")(e)),
        }
        if let Some(dir) = file.parent()
            && dir != self.store(ds)?.root
        {
            // Only succeeds once the folder is empty.
            let _ = std::fs::remove_dir(dir);
        }
        Ok(())
    }

    fn rename(&self, ds: &str, from: &str, to: &str) -> Result<(), DiskError> {
        let (from, to) = (self.file(ds, from)?, self.file(ds, to)?);
        std::fs::rename(&from, &to).map_err(io("rename file"))?;
        if let Some(dir) = to.parent() {
            // The rename is durable once the folder is.
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io("sync folder"))?;
        }
        Ok(())
    }

    fn find(&self, ds: &str, suffix: &str) -> Result<Vec<String>, DiskError> {
        let root = &self.store(ds)?.root;
        let mut out = Vec::new();
        let dirs = match std::fs::read_dir(root) {
            Ok(d) => d,
            Err(e) => return Err(io("list datastore")(e)),
        };
        for dir in dirs {
            let dir = dir.map_err(io("list datastore"))?;
            if !dir.file_type().map_err(io("list datastore"))?.is_dir() {
                continue;
            }
            let name = dir.file_name().to_string_lossy().into_owned();
            for p in self.list(ds, &name)? {
                if p.ends_with(suffix) {
                    out.push(p);
                }
            }
        }
        Ok(out)
    }

    fn list(&self, ds: &str, dir: &str) -> Result<Vec<String>, DiskError> {
        let folder = self.file(ds, dir)?;
        let entries = match std::fs::read_dir(&folder) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io("list folder")(e)),
        };
        let mut out = Vec::new();
        for e in entries {
            let e = e.map_err(io("list folder"))?;
            if e.file_type().map_err(io("list folder"))?.is_file() {
                out.push(format!("{dir}/{}", e.file_name().to_string_lossy()));
            }
        }
        out.sort();
        Ok(out)
    }
}
