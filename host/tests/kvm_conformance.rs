//! The KVM backend passes the same `GuestBackend` suite as the synthetic
//! guest. Skipped, saying so, where /dev/kvm is missing.

use std::time::{Duration, Instant};

use ferry_actors::guest::GuestBackend;
use ferry_actors::guest::conformance::{self, Harness};
use ferry_host::kvm::image::{FILL_START, GuestParams};
use ferry_host::kvm::{self, KvmVm, PAGE_BYTES};

const MEMORY_MIB: u64 = 64;
const WSS_MIB: u64 = 1;

struct Kvm;

impl Harness for Kvm {
    type Guest = KvmVm;

    fn running_guest(&mut self) -> KvmVm {
        let vm = KvmVm::with_test_guest(&GuestParams::new(MEMORY_MIB, WSS_MIB), 1).expect("VM");
        vm.resume().expect("resume");
        let start = Instant::now();
        while !vm
            .port_reports()
            .filled
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "guest never filled its memory"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        vm
    }

    fn blank_like(&mut self, guest: &KvmVm) -> KvmVm {
        KvmVm::create(guest.memory_bytes(), 1).expect("blank VM")
    }

    fn advance(&mut self, guest: &mut KvmVm, passes: u64) {
        let target = guest.progress().expect("progress").pass + passes;
        let start = Instant::now();
        while guest.progress().expect("progress").pass < target {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "guest stuck: {:?}",
                guest.vcpu_status()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn working_set(&self) -> std::ops::Range<u64> {
        let first = FILL_START / PAGE_BYTES;
        first..first + (WSS_MIB << 20) / PAGE_BYTES
    }

    fn quiet_page(&self) -> u64 {
        (MEMORY_MIB << 20) / PAGE_BYTES - 8
    }
}

#[test]
fn kvm_backend_passes_the_conformance_suite() {
    if let Err(e) = kvm::available() {
        println!("SKIPPED kvm_backend_passes_the_conformance_suite: {e}");
        return;
    }
    conformance::run_all(&mut Kvm);
}
