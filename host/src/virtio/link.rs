//! A virtio-blk backend whose blocks are the node's: every request goes
//! to the VM's disk actor through a [`DiskPort`] (in process, or over the
//! VMM's disk channel), so a storage migration's mirror, changed-block
//! tracking and snapshot routing see every guest write, and a write is
//! acknowledged to the guest only once the disk actor made it durable
//! (on both copies while a mirror runs).
//!
//! The device exists from the VM's creation (Linux finds its disks at
//! boot, a shadow needs them to take the saved device state), but the
//! node connects the port later, and again after it restarts or the VMM
//! is upgraded: a request waits for a port, up to [`WAIT_FOR_NODE`].

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ferry_actors::disk::{DiskError, DiskPort};

use super::blk::BlockIo;

/// How long a guest request waits for the node to (re)connect its disk
/// before the guest is told the request failed.
pub const WAIT_FOR_NODE: Duration = Duration::from_secs(60);

/// Where a linked disk's port is plugged in.
#[derive(Default)]
pub struct DiskLink {
    port: Mutex<Option<Arc<dyn DiskPort>>>,
    changed: Condvar,
}

impl DiskLink {
    /// A link with nothing connected yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Plugs `port` in (replacing any port before it).
    pub fn connect(&self, port: Arc<dyn DiskPort>) {
        *self.port.lock().expect("disk link") = Some(port);
        self.changed.notify_all();
    }

    /// Whether a port is plugged in.
    pub fn connected(&self) -> bool {
        self.port.lock().expect("disk link").is_some()
    }

    /// Unplugs `port` if it is still the one plugged in (a newer one may
    /// have replaced it meanwhile).
    fn drop_port(&self, port: &Arc<dyn DiskPort>) {
        let mut slot = self.port.lock().expect("disk link");
        if slot.as_ref().is_some_and(|p| Arc::ptr_eq(p, port)) {
            *slot = None;
        }
    }

    /// The port, waiting until `deadline` for one.
    fn port_by(&self, deadline: Instant) -> Option<Arc<dyn DiskPort>> {
        let mut slot = self.port.lock().expect("disk link");
        loop {
            if let Some(p) = slot.as_ref() {
                return Some(p.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            slot = self.changed.wait_timeout(slot, left).expect("disk link").0;
        }
    }
}

/// A [`BlockIo`] of `len` bytes behind a [`DiskLink`].
pub struct LinkedBlock {
    len: u64,
    link: Arc<DiskLink>,
    wait: Duration,
}

impl LinkedBlock {
    /// A disk of `len` bytes reached through `link`; requests wait up to
    /// `wait` for a port.
    pub fn new(len: u64, link: Arc<DiskLink>, wait: Duration) -> Self {
        Self { len, link, wait }
    }

    /// Runs `op` on the port; a port that went away (the node restarted,
    /// the channel broke) is unplugged and the request waits for the next.
    fn call<T>(&self, op: impl Fn(&dyn DiskPort) -> Result<T, DiskError>) -> Result<T, String> {
        let deadline = Instant::now() + self.wait;
        loop {
            let Some(port) = self.link.port_by(deadline) else {
                return Err(format!(
                    "the node did not connect this disk within {} s",
                    self.wait.as_secs()
                ));
            };
            match op(port.as_ref()) {
                Err(DiskError::Unreachable { .. }) => self.link.drop_port(&port),
                other => return other.map_err(|e| e.to_string()),
            }
        }
    }
}

impl BlockIo for LinkedBlock {
    fn len_bytes(&self) -> u64 {
        self.len
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let len = u32::try_from(buf.len()).map_err(|_| "a read over 4 GiB".to_owned())?;
        let data = self.call(|p| p.read(offset, len))?;
        if data.len() != buf.len() {
            return Err(format!(
                "the node returned {} bytes for a {}-byte read",
                data.len(),
                buf.len()
            ));
        }
        buf.copy_from_slice(&data);
        Ok(())
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        self.call(|p| p.write(offset, data.to_vec(), None))
    }

    /// Every write the disk actor acknowledged is durable already
    /// (write-through), so a flush has nothing left to do.
    fn flush(&mut self) -> Result<(), String> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A port over a byte vector that fails as unreachable `outages` times.
    struct Port {
        bytes: Mutex<Vec<u8>>,
        outages: AtomicU32,
    }

    impl DiskPort for Port {
        fn write(&self, offset: u64, data: Vec<u8>, _: Option<u64>) -> Result<(), DiskError> {
            if self.outages.load(Ordering::SeqCst) > 0 {
                self.outages.fetch_sub(1, Ordering::SeqCst);
                return Err(DiskError::Unreachable {
                    op: "write",
                    reason: "test".into(),
                });
            }
            let o = ferry_actors::disk::to_usize(offset);
            self.bytes.lock().expect("test")[o..o + data.len()].copy_from_slice(&data);
            Ok(())
        }

        fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, DiskError> {
            let o = ferry_actors::disk::to_usize(offset);
            Ok(self.bytes.lock().expect("test")
                [o..o + ferry_actors::disk::to_usize(u64::from(len))]
                .to_vec())
        }
    }

    fn port(outages: u32) -> Arc<Port> {
        Arc::new(Port {
            bytes: Mutex::new(vec![0; 8192]),
            outages: AtomicU32::new(outages),
        })
    }

    #[test]
    fn a_request_waits_for_the_node_to_connect() {
        let link = DiskLink::new();
        let mut blk = LinkedBlock::new(8192, link.clone(), Duration::from_secs(10));
        let p = port(0);
        let later = {
            let (link, p) = (link.clone(), p.clone());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                link.connect(p);
            })
        };
        blk.write_at(4096, b"written after the node connected")
            .expect("write");
        later.join().expect("test");
        let mut back = [0u8; 32];
        blk.read_at(4096, &mut back).expect("read");
        assert_eq!(&back, b"written after the node connected");
        assert_eq!(&p.bytes.lock().expect("test")[4096..4128], &back);
    }

    #[test]
    fn an_unreachable_port_is_dropped_and_the_next_one_serves() {
        let link = DiskLink::new();
        let mut blk = LinkedBlock::new(8192, link.clone(), Duration::from_secs(10));
        let (broken, fresh) = (port(1), port(0));
        link.connect(broken.clone());
        let later = {
            let (link, fresh) = (link.clone(), fresh.clone());
            std::thread::spawn(move || {
                while link.connected() {
                    std::thread::sleep(Duration::from_millis(5));
                }
                link.connect(fresh);
            })
        };
        blk.write_at(0, b"once").expect("write");
        later.join().expect("test");
        assert_eq!(&fresh.bytes.lock().expect("test")[..4], b"once");
        assert_eq!(&broken.bytes.lock().expect("test")[..4], &[0; 4]);
    }

    #[test]
    fn without_a_node_the_request_fails_in_time() {
        let link = DiskLink::new();
        let mut blk = LinkedBlock::new(8192, link, Duration::from_millis(50));
        let err = blk.write_at(0, b"lost").expect_err("no node");
        assert!(err.contains("did not connect"), "{err}");
    }
}
