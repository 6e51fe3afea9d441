//! The guest's serial console: a 16550 UART at 0x3f8 (IRQ 4) from the
//! rust-vmm `vm-superio` crate. What the guest prints is kept: the newest
//! [`TAIL_BYTES`] in memory (for `ferry vm console` and tests) and, when
//! asked, in a size-capped log file (the VM's `console.log`).

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use vm_superio::{Serial, SerialState, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// First I/O port of COM1.
pub const PORT_BASE: u16 = 0x3f8;
/// Ports of COM1.
pub const PORTS: std::ops::RangeInclusive<u16> = PORT_BASE..=PORT_BASE + 7;
/// Its interrupt line (GSI).
pub const IRQ: u32 = 4;
/// Console output kept in memory.
pub const TAIL_BYTES: usize = 64 << 10;
/// A console log that reaches this size starts again (the previous one is
/// kept as `<log>.1`).
pub const LOG_BYTES_MAX: u64 = 4 << 20;

/// Raises the UART's interrupt through an irqfd.
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// What the guest printed: the in-memory tail and the log file.
#[derive(Debug, Default)]
pub struct Output {
    tail: VecDeque<u8>,
    /// Bytes printed since boot (on this host).
    total: u64,
    log: Option<(PathBuf, File, u64)>,
}

impl Output {
    /// The newest output, oldest byte first.
    pub fn tail(&self) -> Vec<u8> {
        self.tail.iter().copied().collect()
    }

    /// Bytes printed since the console was made.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Whether the output also goes to a log file.
    pub fn is_logged(&self) -> bool {
        self.log.is_some()
    }

    /// The newest `n` bytes (at most).
    pub fn newest(&self, n: usize) -> Vec<u8> {
        let skip = self.tail.len().saturating_sub(n);
        self.tail.iter().skip(skip).copied().collect()
    }

    /// Starts the tail with what the VM printed on its previous host.
    pub fn seed(&mut self, earlier: &[u8]) {
        let mut tail: VecDeque<u8> = earlier.iter().copied().collect();
        tail.extend(self.tail.drain(..));
        let over = tail.len().saturating_sub(TAIL_BYTES);
        tail.drain(..over);
        self.tail = tail;
    }

    /// The newest "ferry-dirtier pass N ok" the Linux test guest printed.
    pub fn dirtier_pass(&self) -> u64 {
        let text = self.newest(4096);
        String::from_utf8_lossy(&text)
            .lines()
            .filter_map(|l| l.strip_prefix("ferry-dirtier pass ")?.strip_suffix(" ok"))
            .filter_map(|n| n.trim().parse().ok())
            .max()
            .unwrap_or(0)
    }

    fn log_bytes(&mut self, bytes: &[u8]) {
        let Some((path, file, written)) = &mut self.log else {
            return;
        };
        if *written + bytes.len() as u64 > LOG_BYTES_MAX {
            let old = path.with_extension("log.1");
            let _ = std::fs::rename(&*path, old);
            match File::create(&*path) {
                Ok(f) => {
                    *file = f;
                    *written = 0;
                }
                Err(e) => {
                    tracing::warn!("console log {}: {e}; no longer kept", path.display());
                    self.log = None;
                    return;
                }
            }
        }
        if file.write_all(bytes).is_ok() {
            *written += bytes.len() as u64;
        }
    }
}

/// The shared output, written by the UART.
#[derive(Debug, Clone, Default)]
pub struct Sink(pub Arc<Mutex<Output>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = self.0.lock().expect("console output");
        out.total += buf.len() as u64;
        out.tail.extend(buf);
        let over = out.tail.len().saturating_sub(TAIL_BYTES);
        out.tail.drain(..over);
        out.log_bytes(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The UART and where its output goes.
pub struct Console {
    uart: Serial<IrqLine, vm_superio::serial::NoEvents, Sink>,
    output: Sink,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console").finish_non_exhaustive()
    }
}

impl Console {
    /// A UART raising `irq` (restored from `state` when given), printing
    /// into `output`.
    pub fn new(irq: EventFd, output: Sink, state: Option<&SerialState>) -> std::io::Result<Self> {
        let uart = match state {
            Some(s) => Serial::from_state(
                s,
                IrqLine(irq),
                vm_superio::serial::NoEvents,
                output.clone(),
            )
            .map_err(|e| std::io::Error::other(format!("{e:?}")))?,
            None => Serial::new(IrqLine(irq), output.clone()),
        };
        Ok(Self { uart, output })
    }

    /// Also keeps the output in `path` (appended, size-capped).
    pub fn log_to(&self, path: PathBuf) -> std::io::Result<()> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        let written = file.metadata()?.len();
        self.output.0.lock().expect("console output").log = Some((path, file, written));
        Ok(())
    }

    /// A second handle on the UART's interrupt line (for a UART restored
    /// in its place).
    pub fn irq(&self) -> std::io::Result<EventFd> {
        self.uart.interrupt_evt().0.try_clone()
    }

    /// The output.
    pub fn output(&self) -> &Sink {
        &self.output
    }

    /// A guest `in` from `port`.
    pub fn read(&mut self, port: u16) -> u8 {
        self.uart.read(offset(port))
    }

    /// A guest `out` to `port`.
    pub fn write(&mut self, port: u16, value: u8) {
        if let Err(e) = self.uart.write(offset(port), value) {
            tracing::debug!("serial write: {e:?}");
        }
    }

    /// Input for the guest (what an attached operator types); returns the
    /// bytes the UART took (its FIFO may be full).
    pub fn input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// The UART's registers and FIFO, to move with the VM.
    pub fn state(&self) -> SerialState {
        self.uart.state()
    }
}

fn offset(port: u16) -> u8 {
    u8::try_from(port - PORT_BASE).expect("a COM1 port")
}

/// The console once the VM has one.
#[derive(Debug, Default)]
pub struct ConsoleSlot(pub Mutex<Option<Console>>);

impl ConsoleSlot {
    /// Serves a guest `out`; false if there is no console.
    pub fn write(&self, port: u16, value: u8) -> bool {
        let mut slot = self.0.lock().expect("console");
        match slot.as_mut() {
            Some(c) => {
                c.write(port, value);
                true
            }
            None => false,
        }
    }

    /// Serves a guest `in`.
    pub fn read(&self, port: u16) -> Option<u8> {
        self.0
            .lock()
            .expect("console")
            .as_mut()
            .map(|c| c.read(port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_guest_prints_is_kept_and_the_log_is_capped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut c = Console::new(irq, Sink::default(), None).expect("console");
        let log = dir.path().join("console.log");
        c.log_to(log.clone()).expect("log");
        for b in b"hello\n" {
            c.write(PORT_BASE, *b);
        }
        assert_eq!(c.output().0.lock().expect("out").tail(), b"hello\n");
        assert_eq!(std::fs::read(&log).expect("log"), b"hello\n");
        let big = vec![b'x'; usize::try_from(LOG_BYTES_MAX).expect("fits")];
        c.output().clone().write_all(&big).expect("write");
        assert!(log.with_extension("log.1").exists(), "rotated");
        let out = c.output().0.lock().expect("out");
        assert_eq!(out.tail().len(), TAIL_BYTES);
        assert_eq!(out.total(), 6 + LOG_BYTES_MAX);
    }

    #[test]
    fn state_round_trips_through_a_new_uart() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut c = Console::new(irq, Sink::default(), None).expect("console");
        c.write(PORT_BASE + 7, 0x5a); // scratch register
        c.write(PORT_BASE + 1, 0x01); // interrupts on
        let s = c.state();
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut d = Console::new(irq, Sink::default(), Some(&s)).expect("restored");
        assert_eq!(d.read(PORT_BASE + 7), 0x5a);
        assert_eq!(d.read(PORT_BASE + 1), 0x01);
    }
}
