//! The threads that drive a NIC from outside the vCPUs: one delivers the
//! frames arriving on the tap, one announces the guest's MAC after it
//! arrived somewhere new. Both hold the VM's devices weakly and end with
//! the VM.

use std::fs::File;
use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::kvm::vcpu::GuestProgress;

/// Gaps before each RARP announcement after a resume: the first at once,
/// then with growing back-off (QEMU's announce sends 5, 50 ms apart
/// growing by 100 ms).
pub const ANNOUNCE_GAPS_MS: [u64; 5] = [0, 50, 150, 250, 350];
/// How long the receive thread waits for a frame before it checks that
/// the VM still exists.
const RECEIVE_WAIT_MS: i32 = 100;
/// How long it backs off when frames wait but the guest has no buffers
/// for them (or the vCPUs are paused).
const NO_BUFFER_BACKOFF: Duration = Duration::from_millis(2);

/// Starts announcing the VM's NIC: RARP frames at [`ANNOUNCE_GAPS_MS`].
pub fn start(progress: Weak<GuestProgress>) {
    let spawned = std::thread::Builder::new()
        .name("nic-announce".into())
        .spawn(move || {
            for gap in ANNOUNCE_GAPS_MS {
                std::thread::sleep(Duration::from_millis(gap));
                let Some(p) = progress.upgrade() else {
                    return;
                };
                let sent = p.mmio.announce();
                p.announced.fetch_add(sent as u64, Ordering::SeqCst);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("NIC announce thread: {e}");
    }
}

/// Starts the thread that delivers frames arriving on `tap` to the NIC
/// at bus `index`.
pub fn receive_thread(
    progress: Weak<GuestProgress>,
    index: usize,
    tap: File,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("nic-receive".into())
        .spawn(move || {
            loop {
                let readable = super::tap::wait_readable(&tap, RECEIVE_WAIT_MS);
                let Some(p) = progress.upgrade() else {
                    return;
                };
                if readable && !p.mmio.poll(index) {
                    drop(p);
                    std::thread::sleep(NO_BUFFER_BACKOFF);
                }
            }
        })
        .map(drop)
}
