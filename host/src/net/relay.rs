//! A user-space UDP relay that adds delay and loss between two nodes
//! (this kernel has no `netem`). It listens on a front address; whatever
//! arrives there goes, through a [`DelayLine`], to the target from a
//! socket of its own, and the target's answers come back the same way to
//! whoever spoke last. One thread per relay, inside the network namespace
//! the relay is given. Datagrams larger than the next link carries are
//! dropped, as a router does with "don't fragment" packets, so MTU
//! discovery through the relay finds the real path MTU.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::impairment::{DelayLine, Impairment};

/// Socket buffers of the relay: deep enough for a long fat link.
const RELAY_BUFFER_BYTES: usize = 16 << 20;

/// How often the relay thread looks at its stop flag when idle.
const STOP_POLL: Duration = Duration::from_millis(20);

/// A running relay; it stops when dropped.
#[derive(Debug)]
pub struct Relay {
    front: SocketAddr,
    stop: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    /// Starts a relay inside the network namespace at `netns` (a
    /// `/run/netns/NAME` file; `None`: the caller's), listening on `listen`
    /// (port 0: any) and forwarding to `target`.
    pub fn start(
        netns: Option<PathBuf>,
        listen: SocketAddr,
        target: SocketAddr,
        impairment: Impairment,
        seed: u64,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop2, dropped2) = (stop.clone(), dropped.clone());
        let thread = std::thread::Builder::new()
            .name("ferry-relay".into())
            .spawn(move || {
                let sockets = netns
                    .as_deref()
                    .map_or(Ok(()), super::path::enter_netns)
                    .and_then(|()| relay_sockets(listen, target));
                match sockets {
                    Ok((front, upstream)) => {
                        let _ = ready_tx.send(front.local_addr());
                        let mut lines = Lines::new(impairment, seed);
                        lines.run(&front, &upstream, &stop2, &dropped2);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })?;
        let front = ready_rx
            .recv()
            .map_err(|_| std::io::Error::other("relay thread ended at start"))??;
        Ok(Self {
            front,
            stop,
            dropped,
            thread: Some(thread),
        })
    }

    /// Where to send datagrams meant for the target.
    pub fn front(&self) -> SocketAddr {
        self.front
    }

    /// Datagrams lost so far (by the impairment or for being too large).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn relay_sockets(
    listen: SocketAddr,
    target: SocketAddr,
) -> std::io::Result<(UdpSocket, UdpSocket)> {
    let open = |addr: SocketAddr| {
        ferry_transport::quic::udp_socket(addr, RELAY_BUFFER_BYTES)
            .map_err(|e| std::io::Error::other(e.to_string()))
    };
    let front = open(listen)?;
    let upstream = open(SocketAddr::new(listen.ip(), 0))?;
    upstream.connect(target)?;
    for s in [&front, &upstream] {
        s.set_nonblocking(true)?;
        refuse_fragmentation(s)?;
    }
    Ok((front, upstream))
}

/// Sets "don't fragment" and refuses datagrams over the path MTU.
fn refuse_fragmentation(socket: &UdpSocket) -> std::io::Result<()> {
    let value: libc::c_int = libc::IP_PMTUDISC_DO;
    // SAFETY: a live socket, and a c_int option value with its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&raw const value).cast(),
            libc::socklen_t::try_from(size_of::<libc::c_int>()).expect("c_int size fits"),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The two directions of the link and the last client heard.
struct Lines {
    to_target: DelayLine,
    to_client: DelayLine,
    client: Option<SocketAddr>,
    refused: u64,
    buf: Vec<u8>,
}

impl Lines {
    fn new(impairment: Impairment, seed: u64) -> Self {
        Self {
            to_target: DelayLine::new(impairment, seed),
            to_client: DelayLine::new(impairment, seed.rotate_left(32) ^ 0x9e37),
            client: None,
            refused: 0,
            buf: vec![0; 65_536],
        }
    }

    fn run(
        &mut self,
        front: &UdpSocket,
        upstream: &UdpSocket,
        stop: &AtomicBool,
        lost: &AtomicU64,
    ) {
        while !stop.load(Ordering::Relaxed) {
            wait_readable(&[front, upstream], self.wait_time());
            let now = Instant::now();
            self.take_from_client(front, now);
            self.take_from_target(upstream, now);
            let now = Instant::now();
            while let Some(d) = self.to_target.pop_due(now) {
                self.refused += u64::from(send_dropping(|| upstream.send(&d)));
            }
            while let Some(d) = self.to_client.pop_due(now) {
                if let Some(client) = self.client {
                    self.refused += u64::from(send_dropping(|| front.send_to(&d, client)));
                }
            }
            let impaired = self.to_target.dropped() + self.to_client.dropped();
            lost.store(impaired + self.refused, Ordering::Relaxed);
        }
    }

    fn wait_time(&self) -> Duration {
        let now = Instant::now();
        [self.to_target.next_due(), self.to_client.next_due()]
            .into_iter()
            .flatten()
            .map(|due| due.saturating_duration_since(now))
            .fold(STOP_POLL, Duration::min)
    }

    fn take_from_client(&mut self, front: &UdpSocket, now: Instant) {
        while let Ok((n, from)) = front.recv_from(&mut self.buf) {
            self.client = Some(from);
            self.to_target.offer(now, self.buf[..n].to_vec());
        }
    }

    fn take_from_target(&mut self, upstream: &UdpSocket, now: Instant) {
        while let Ok(n) = upstream.recv(&mut self.buf) {
            self.to_client.offer(now, self.buf[..n].to_vec());
        }
    }
}

/// Sends; true when the datagram was dropped (too large for the path, or
/// the socket's queue full, as a router's would be).
fn send_dropping(send: impl FnOnce() -> std::io::Result<usize>) -> bool {
    send().is_err()
}

/// Waits until one of `sockets` has a datagram, or `timeout`.
fn wait_readable(sockets: &[&UdpSocket], timeout: Duration) {
    let mut fds: Vec<libc::pollfd> = sockets
        .iter()
        .map(|s| libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: `fds` is a live array of pollfd of the length given, and
    // `ts` outlives the call; no signal mask is changed.
    unsafe {
        libc::ppoll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            &raw const ts,
            std::ptr::null(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_cross_both_ways_after_the_delay() {
        let target = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let relay = Relay::start(
            None,
            "127.0.0.1:0".parse().expect("address"),
            target.local_addr().expect("address"),
            Impairment {
                one_way_delay: Duration::from_millis(30),
                loss: 0.0,
            },
            1,
        )
        .expect("io");
        let client = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let start = Instant::now();
        client.send_to(b"ping", relay.front()).expect("io");
        let mut buf = [0u8; 16];
        let (n, via) = target.recv_from(&mut buf).expect("io");
        assert_eq!(&buf[..n], b"ping");
        assert!(start.elapsed() >= Duration::from_millis(30));
        target.send_to(b"pong", via).expect("io");
        let (n, from) = client.recv_from(&mut buf).expect("io");
        assert_eq!(&buf[..n], b"pong");
        assert_eq!(from, relay.front());
        assert!(start.elapsed() >= Duration::from_millis(60));
        assert_eq!(relay.dropped(), 0);
    }
}
