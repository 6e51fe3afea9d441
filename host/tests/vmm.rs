//! Guests in VMM processes: the process-backed `GuestBackend` passes the
//! same suite as the in-process one; a VMM outlives the client that
//! started it and is attached to again; `upgrade` moves a running guest to
//! a new VMM process with its memory shared, not copied. Skipped, saying
//! so, where /dev/kvm is missing.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_actors::guest::GuestBackend;
use ferry_actors::guest::conformance::{self, Harness};
use ferry_host::kvm::image::FILL_START;
use ferry_host::kvm::{self, PAGE_BYTES};
use ferry_host::vmm::proto::Boot;
use ferry_host::vmm::{VmmGuest, VmmHome};

const MEMORY_MIB: u64 = 64;
const WSS_MIB: u64 = 1;

fn home(dir: &Path) -> VmmHome {
    VmmHome {
        exe: env!("CARGO_BIN_EXE_ferry").into(),
        dir: dir.to_owned(),
    }
}

fn test_guest(home: &VmmHome, name: &str) -> VmmGuest {
    let memory = kvm::shared_memory(MEMORY_MIB << 20).expect("memfd");
    let boot = Boot::TestGuest { wss_mib: WSS_MIB };
    VmmGuest::start(home, name, boot, 1, memory).expect("VMM")
}

fn wait_for_pass(guest: &VmmGuest, pass: u64) {
    let start = Instant::now();
    while guest.progress().expect("progress").pass < pass {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "guest stuck below pass {pass}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped by its parent) is not alive.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

struct Vmm {
    home: VmmHome,
    made: u32,
}

impl Harness for Vmm {
    type Guest = VmmGuest;

    fn running_guest(&mut self) -> VmmGuest {
        self.made += 1;
        let mut guest = test_guest(&self.home, &format!("vm{}", self.made));
        guest.resume().expect("resume");
        wait_for_pass(&guest, 1);
        guest
    }

    fn blank_like(&mut self, guest: &VmmGuest) -> VmmGuest {
        self.made += 1;
        let memory = kvm::shared_memory(guest.memory_bytes()).expect("memfd");
        VmmGuest::start(
            &self.home,
            &format!("vm{}", self.made),
            Boot::Blank,
            1,
            memory,
        )
        .expect("blank VMM")
    }

    fn advance(&mut self, guest: &mut VmmGuest, passes: u64) {
        let target = guest.progress().expect("progress").pass + passes;
        wait_for_pass(guest, target);
    }

    fn working_set(&self) -> std::ops::Range<u64> {
        let first = FILL_START / PAGE_BYTES;
        first..first + (WSS_MIB << 20) / PAGE_BYTES
    }

    fn quiet_page(&self) -> u64 {
        (MEMORY_MIB << 20) / PAGE_BYTES - 8
    }
}

fn skip(test: &str) -> bool {
    if let Err(e) = kvm::available() {
        println!("SKIPPED {test}: {e} (KVM tests need /dev/kvm)");
        return true;
    }
    false
}

#[test]
fn a_guest_in_a_vmm_process_passes_the_conformance_suite() {
    if skip("a_guest_in_a_vmm_process_passes_the_conformance_suite") {
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    conformance::run_all(&mut Vmm {
        home: home(dir.path()),
        made: 0,
    });
}

#[test]
fn a_vmm_outlives_its_client_and_is_attached_again_then_discarded() {
    if skip("a_vmm_outlives_its_client_and_is_attached_again_then_discarded") {
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    let home = home(dir.path());
    let mut guest = test_guest(&home, "kept");
    guest.resume().expect("resume");
    wait_for_pass(&guest, 2);
    let pid = guest.pid();
    drop(guest);
    std::thread::sleep(Duration::from_millis(300));
    let mut again = VmmGuest::attach(&home, "kept")
        .expect("attach")
        .expect("the VMM still serves its socket");
    assert_eq!(again.pid(), pid, "the same process");
    assert!(again.is_running(), "the guest ran on without a client");
    let pass = again.progress().expect("progress").pass;
    assert!(
        pass >= 2,
        "the pass counter went on from where it was ({pass})"
    );
    wait_for_pass(&again, pass + 2);
    again.discard();
    let start = Instant::now();
    while alive(pid) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the VMM did not exit"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        VmmGuest::attach(&home, "kept").expect("attach").is_none(),
        "nothing serves a discarded VM"
    );
}

#[test]
fn upgrade_moves_a_running_guest_to_a_new_vmm_without_copying_memory() {
    if skip("upgrade_moves_a_running_guest_to_a_new_vmm_without_copying_memory") {
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    let home = home(dir.path());
    let mut guest = test_guest(&home, "up");
    guest.resume().expect("resume");
    wait_for_pass(&guest, 2);
    // A mark only the shared memfd can carry across: a page the guest
    // never writes, written by this process through its own mapping.
    let quiet = (MEMORY_MIB << 20) / PAGE_BYTES - 8;
    let mark = vec![0x5a; usize::try_from(PAGE_BYTES).expect("page")];
    guest.write_page(quiet, &mark).expect("mark");
    let ram = guest.ram();
    let old_pid = guest.pid();
    let report = guest.upgrade().expect("upgrade");
    println!(
        "upgrade of a {MEMORY_MIB} MiB guest: downtime {:.3} ms (pid {} -> {})",
        report.downtime.as_secs_f64() * 1e3,
        report.old_pid,
        report.new_pid
    );
    assert_eq!(report.old_pid, old_pid);
    assert_ne!(report.new_pid, old_pid, "a new process runs the guest");
    assert_eq!(guest.pid(), report.new_pid);
    assert!(guest.is_running(), "the guest runs in the new process");
    let pass = guest.progress().expect("progress").pass;
    wait_for_pass(&guest, pass + 3);
    assert_eq!(guest.progress().expect("progress").exception, None);
    let mut seen = vec![0; usize::try_from(PAGE_BYTES).expect("page")];
    ram.read_page(quiet, &mut seen).expect("read");
    assert_eq!(seen, mark, "the same memory, not a copy");
    let start = Instant::now();
    while alive(old_pid) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the old VMM did not exit"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let again = VmmGuest::attach(&home, "up")
        .expect("attach")
        .expect("the successor took the socket's name");
    assert_eq!(again.pid(), report.new_pid);
    guest.discard();
}

#[test]
fn an_operator_types_into_a_linux_guests_console_through_its_vmm() {
    let Some(dirtier) =
        common::linux_guest_or_skip("an_operator_types_into_a_linux_guests_console", 16)
    else {
        return;
    };
    let image = ferry_host::kvm::linux::LinuxImage {
        cmdline: dirtier
            .cmdline
            .replace("ferry_run=dirtier", "ferry_run=shell"),
        ..dirtier
    };
    let dir = tempfile::tempdir().expect("dir");
    let home = home(dir.path());
    let memory = kvm::shared_memory(128 << 20).expect("memfd");
    let boot = Boot::Linux {
        kernel: image.kernel,
        initrd: image.initrd,
        cmdline: image.cmdline,
    };
    let mut guest = VmmGuest::start(&home, "shell", boot, 1, memory).expect("VMM");
    guest.resume().expect("resume");
    let console =
        |g: &VmmGuest| String::from_utf8_lossy(&g.console().unwrap_or_default()).into_owned();
    let wait_for = |g: &VmmGuest, text: &str, limit: Duration| {
        let start = Instant::now();
        while !console(g).contains(text) {
            assert!(
                start.elapsed() < limit,
                "no {text:?} within {limit:?}:\n{}",
                console(g)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_for(&guest, "ferry-guest: up", Duration::from_secs(240));
    // The shell needs a moment to start reading after /init says it is up.
    std::thread::sleep(Duration::from_secs(2));
    let line = b"echo ferry-$((6*7))\n";
    let mut rest: &[u8] = line;
    while !rest.is_empty() {
        let took = guest.console_input(rest).expect("input");
        rest = &rest[took..];
        std::thread::sleep(Duration::from_millis(10));
    }
    // Only the shell's answer holds the product (the echoed line does not).
    wait_for(&guest, "ferry-42", Duration::from_secs(60));
    let log = std::fs::read_to_string(home.console_log("shell")).expect("console.log");
    assert!(
        log.contains("ferry-42"),
        "the console log keeps the output too"
    );
    guest.discard();
}
