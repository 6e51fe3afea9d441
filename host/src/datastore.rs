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
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Takes an exclusive OFD lock on the whole of `file`.
fn lock(file: &File, path: &Path) -> Result<(), DiskError> {
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
            .map_err(io("write disk"))
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        self.file.sync_data().map_err(io("flush disk"))
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
}
