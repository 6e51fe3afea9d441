//! Recycled batch buffers.
//!
//! Fresh memory is expensive on these machines: the first touch of a page
//! the outer hypervisor took back costs more than copying into it. A batch
//! buffer is therefore taken from a pool, handed to the transport as
//! [`Bytes`] without a copy, and returns to the pool when the transport
//! drops it (once the data is acknowledged), still warm.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// A pool of equally sized byte buffers.
#[derive(Debug, Clone)]
pub struct BufferPool {
    free: Arc<Mutex<Vec<Vec<u8>>>>,
    buf_bytes: usize,
    keep_max: usize,
}

impl BufferPool {
    /// A pool of `buf_bytes`-capacity buffers keeping at most `keep_max` idle.
    pub fn new(buf_bytes: usize, keep_max: usize) -> Self {
        Self {
            free: Arc::new(Mutex::new(Vec::new())),
            buf_bytes,
            keep_max,
        }
    }

    /// Capacity of each buffer.
    pub fn buf_bytes(&self) -> usize {
        self.buf_bytes
    }

    /// An empty buffer with capacity `buf_bytes`, recycled when one is idle.
    pub fn take(&self) -> Vec<u8> {
        let recycled = self.free.lock().ok().and_then(|mut free| free.pop());
        recycled.unwrap_or_else(|| Vec::with_capacity(self.buf_bytes))
    }

    /// Turns a filled buffer into `Bytes` that return it here when dropped.
    pub fn freeze(&self, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Pooled {
            buf,
            pool: self.clone(),
        })
    }

    fn give_back(&self, mut buf: Vec<u8>) {
        if buf.capacity() != self.buf_bytes {
            return;
        }
        buf.clear();
        if let Ok(mut free) = self.free.lock()
            && free.len() < self.keep_max
        {
            free.push(buf);
        }
    }

    /// Idle buffers in the pool.
    pub fn idle(&self) -> usize {
        self.free.lock().map(|f| f.len()).unwrap_or(0)
    }
}

struct Pooled {
    buf: Vec<u8>,
    pool: BufferPool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_when_bytes_are_dropped() {
        let pool = BufferPool::new(1024, 4);
        let mut buf = pool.take();
        buf.extend_from_slice(b"page data");
        let ptr = buf.as_ptr();
        let bytes = pool.freeze(buf);
        let slice = bytes.slice(0..4);
        assert_eq!(&slice[..], b"page");
        drop(bytes);
        assert_eq!(pool.idle(), 0, "a slice still holds the buffer");
        drop(slice);
        assert_eq!(pool.idle(), 1);
        let again = pool.take();
        assert!(again.is_empty());
        assert_eq!(again.as_ptr(), ptr, "the same allocation is reused");
    }
}
