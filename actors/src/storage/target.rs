//! Where a moving disk's copy goes.
//!
//! [`LocalTarget`] is a disk on a datastore of this host; the peer's side
//! of a cross-host move is [`super::remote::RemoteTarget`]. Writes reach
//! the target in the order they are issued: the disk actor relies on it
//! (a mirrored guest write must land after the chunk copy it follows).

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;

use super::datastore::Datastores;
use crate::disk::{DiskError, SharedDisk};
use crate::node::offload;

/// A boxed future, so targets can be trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The copy of a disk being moved.
pub trait DiskTarget: Send + Sync {
    /// Where it is, for reports and errors.
    fn describe(&self) -> String;

    /// Writes `data` at `offset`, after every earlier write.
    fn write(&mut self, offset: u64, data: Arc<Vec<u8>>) -> BoxFuture<'_, Result<(), DiskError>>;

    /// Writes `data` at `offset`, after every earlier write, and makes it
    /// durable (a mirrored guest write).
    fn write_durable(
        &mut self,
        offset: u64,
        data: Arc<Vec<u8>>,
    ) -> BoxFuture<'_, Result<(), DiskError>>;

    /// Copies `range` from `source` without passing it through memory, if
    /// the target can (`Ok(None)` if not); returns the bytes copied.
    fn copy_from(
        &mut self,
        source: SharedDisk,
        range: Range<u64>,
    ) -> BoxFuture<'_, Result<Option<u64>, DiskError>>;

    /// Makes every write so far durable.
    fn flush(&mut self) -> BoxFuture<'_, Result<(), DiskError>>;

    /// After a failed write or flush: reconnects and says up to where the
    /// target holds the first pass durably. Local targets cannot.
    fn reconnect(&mut self) -> BoxFuture<'_, Result<u64, DiskError>>;

    /// The copy is complete and durable: a local target hands over its
    /// disk (the source's actor continues on it); a remote one tells its
    /// host, which keeps the disk for the VM's arrival.
    fn finish(self: Box<Self>) -> BoxFuture<'static, Result<Option<SharedDisk>, DiskError>>;

    /// The move failed: delete what was written.
    fn discard(self: Box<Self>) -> BoxFuture<'static, ()>;
}

/// A disk on one of this host's datastores.
pub struct LocalTarget {
    disk: SharedDisk,
    stores: Arc<dyn Datastores>,
    datastore: String,
    path: String,
}

impl LocalTarget {
    /// Creates `path` (`len` bytes) on datastore `datastore`.
    pub async fn create(
        stores: Arc<dyn Datastores>,
        datastore: &str,
        path: &str,
        len: u64,
    ) -> Result<Self, DiskError> {
        let (s, ds, p) = (stores.clone(), datastore.to_owned(), path.to_owned());
        let disk = offload(move || s.create_disk(&ds, &p, len)).await?;
        Ok(Self {
            disk: crate::disk::shared(disk),
            stores,
            datastore: datastore.to_owned(),
            path: path.to_owned(),
        })
    }
}

impl DiskTarget for LocalTarget {
    fn describe(&self) -> String {
        format!("{}:{}", self.datastore, self.path)
    }

    fn write(&mut self, offset: u64, data: Arc<Vec<u8>>) -> BoxFuture<'_, Result<(), DiskError>> {
        let disk = self.disk.clone();
        Box::pin(offload(move || {
            disk.lock().expect("target disk").write_at(offset, &data)
        }))
    }

    fn write_durable(
        &mut self,
        offset: u64,
        data: Arc<Vec<u8>>,
    ) -> BoxFuture<'_, Result<(), DiskError>> {
        let disk = self.disk.clone();
        Box::pin(offload(move || {
            disk.lock()
                .expect("target disk")
                .write_durable(offset, &data)
        }))
    }

    fn copy_from(
        &mut self,
        source: SharedDisk,
        range: Range<u64>,
    ) -> BoxFuture<'_, Result<Option<u64>, DiskError>> {
        let disk = self.disk.clone();
        Box::pin(offload(move || {
            let len = range.end - range.start;
            let src = source.lock().expect("source disk");
            let mut dst = disk.lock().expect("target disk");
            Ok(src.copy_to(range, dst.as_mut())?.then_some(len))
        }))
    }

    fn flush(&mut self) -> BoxFuture<'_, Result<(), DiskError>> {
        let disk = self.disk.clone();
        Box::pin(offload(move || disk.lock().expect("target disk").flush()))
    }

    fn reconnect(&mut self) -> BoxFuture<'_, Result<u64, DiskError>> {
        Box::pin(async {
            Err(DiskError::Io {
                op: "reconnect",
                reason: "a local target has no link to restore".into(),
            })
        })
    }

    fn finish(self: Box<Self>) -> BoxFuture<'static, Result<Option<SharedDisk>, DiskError>> {
        Box::pin(async move { Ok(Some(self.disk)) })
    }

    fn discard(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let Self {
                disk,
                stores,
                datastore,
                path,
            } = *self;
            drop(disk);
            let _ = offload(move || stores.remove(&datastore, &path)).await;
        })
    }
}
