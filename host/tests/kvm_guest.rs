//! Real KVM guests: boot, progress, dirty tracking, pause/resume, and a
//! restore into a second VM that continues where the first stopped.
//!
//! Where /dev/kvm is missing every test prints one line saying it was
//! skipped and why, and passes.

#![allow(clippy::cast_possible_truncation)] // test arithmetic on small, known sizes

use std::time::{Duration, Instant};

use ferry_host::kvm::image::GuestParams;
use ferry_host::kvm::vcpu::VcpuStatus;
use ferry_host::kvm::{self, KvmVm, PAGE_BYTES};
use vm_memory::{Bytes, GuestAddress};

fn kvm_or_skip(test: &str) -> bool {
    match kvm::available() {
        Ok(()) => true,
        Err(e) => {
            println!("SKIPPED {test}: {e} (KVM tests need /dev/kvm)");
            false
        }
    }
}

/// Waits until `cond` holds or `limit` passes; reports the guest's state on failure.
fn wait_for(vm: &KvmVm, what: &str, limit: Duration, cond: impl Fn(&KvmVm) -> bool) {
    let start = Instant::now();
    while !cond(vm) {
        assert!(
            start.elapsed() < limit,
            "timed out waiting for {what}: vcpus {:?}, exception {:?}, pass {:?}",
            vm.vcpu_status(),
            vm.guest_exception(),
            vm.guest_pass()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn booted(memory_mib: u64, wss_mib: u64) -> KvmVm {
    let vm = KvmVm::with_test_guest(&GuestParams::new(memory_mib, wss_mib), 1).expect("create VM");
    vm.resume().expect("resume");
    wait_for(&vm, "the fill", Duration::from_secs(60), |vm| {
        vm.port_reports()
            .filled
            .load(std::sync::atomic::Ordering::Relaxed)
    });
    vm
}

#[test]
fn test_guest_boots_fills_memory_and_makes_progress() {
    if !kvm_or_skip("test_guest_boots_fills_memory_and_makes_progress") {
        return;
    }
    let vm = booted(64, 8);
    let first = vm.guest_pass().expect("pass");
    wait_for(&vm, "passes", Duration::from_secs(20), |vm| {
        vm.guest_pass().unwrap_or(0) >= first + 3
    });
    assert_eq!(vm.guest_exception().expect("status"), None);
    assert_eq!(vm.vcpu_status(), vec![VcpuStatus::Running]);
    // The busy vCPU thread's CPU time is what DRS weighs.
    let cpu = vm.vcpu_cpu_time();
    std::thread::sleep(Duration::from_millis(500));
    let more = vm.vcpu_cpu_time() - cpu;
    // Lenient: other tests share the two cores.
    assert!(
        more >= Duration::from_millis(50),
        "{more:?} of CPU in 500 ms"
    );
    // The fill left no zero page above 1 MiB.
    let mut page = vec![0u8; PAGE_BYTES as usize];
    for gfn in [256u64, 1000, 64 * 256 - 1] {
        vm.memory()
            .read_slice(&mut page, GuestAddress(gfn * PAGE_BYTES))
            .expect("read");
        assert!(page.iter().any(|b| *b != 0), "page {gfn} is zero");
    }
}

fn bit(bitmap: &[u64], page: u64) -> bool {
    bitmap[(page / 64) as usize] & (1 << (page % 64)) != 0
}

#[test]
fn dirty_log_reports_the_working_set_and_vmm_writes() {
    if !kvm_or_skip("dirty_log_reports_the_working_set_and_vmm_writes") {
        return;
    }
    let mut vm = booted(64, 4);
    vm.start_dirty_log().expect("start dirty log");
    let _ = vm.take_dirty_bitmap().expect("clear");
    let pass = vm.guest_pass().expect("pass");
    wait_for(&vm, "two passes", Duration::from_secs(20), |vm| {
        vm.guest_pass().unwrap_or(0) >= pass + 2
    });
    // The VMM writes a page far outside the working set.
    let vmm_page = 60 * 256;
    vm.memory()
        .write_slice(&[1, 2, 3], GuestAddress(vmm_page * PAGE_BYTES))
        .expect("write");
    let t = Instant::now();
    let bitmap = vm.take_dirty_bitmap().expect("dirty bitmap");
    let cost = t.elapsed();
    let wss = 256..256 + 4 * 256;
    assert!(
        wss.clone().all(|p| bit(&bitmap, p)),
        "every working-set page is dirty"
    );
    assert!(
        bit(&bitmap, vmm_page),
        "the VMM's own write is in the dirty set"
    );
    let others = (2 * 1024..64 * 256)
        .filter(|p| *p != vmm_page && bit(&bitmap, *p))
        .count();
    assert_eq!(others, 0, "pages outside the working set stay clean");
    println!(
        "dirty bitmap of 64 MiB (KVM log | VMM bitmap) in {:?}: {} pages dirty",
        cost,
        bitmap.iter().map(|w| w.count_ones()).sum::<u32>()
    );
    vm.stop_dirty_log().expect("stop");
    assert!(vm.take_dirty_bitmap().is_err(), "no bitmap without logging");
}

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    if !kvm_or_skip("pause_stops_the_guest_and_resume_continues_it") {
        return;
    }
    let vm = booted(64, 1);
    let mut latencies = Vec::new();
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(20));
        latencies.push(vm.pause().expect("pause"));
        assert_eq!(vm.vcpu_status(), vec![VcpuStatus::Paused]);
        let frozen = vm.guest_pass().expect("pass");
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(
            vm.guest_pass().expect("pass"),
            frozen,
            "a paused guest makes no progress"
        );
        vm.resume().expect("resume");
        wait_for(
            &vm,
            "progress after resume",
            Duration::from_secs(10),
            |vm| vm.guest_pass().unwrap_or(0) > frozen,
        );
    }
    latencies.sort();
    println!(
        "pause latency over 10 pauses: median {:?}, max {:?}",
        latencies[5], latencies[9]
    );
}

#[test]
fn restored_vm_continues_exactly_where_the_first_stopped() {
    if !kvm_or_skip("restored_vm_continues_exactly_where_the_first_stopped") {
        return;
    }
    let first = booted(64, 2);
    wait_for(&first, "some passes", Duration::from_secs(20), |vm| {
        vm.guest_pass().unwrap_or(0) >= 3
    });
    first.pause().expect("pause");
    let t = Instant::now();
    let state = first.save_state().expect("save");
    let save_time = t.elapsed();
    let bytes = state.to_bytes();
    let decoded = ferry_host::kvm::state::VmState::from_bytes(&bytes).expect("decode");
    assert_eq!(decoded, state, "state survives its encoding");
    let pass_at_pause = first.guest_pass().expect("pass");
    let hash_at_pause = first.memory_hash().expect("hash");

    let second = KvmVm::create(first.memory_bytes(), 1).expect("second VM");
    second.copy_memory_from(&first).expect("copy memory");
    let t = Instant::now();
    second.restore_state(&decoded).expect("restore");
    let restore_time = t.elapsed();
    assert_eq!(
        second.memory_hash().expect("hash"),
        hash_at_pause,
        "memory identical at the pause"
    );
    second.resume().expect("resume second");
    wait_for(
        &second,
        "progress on the restored VM",
        Duration::from_secs(20),
        |vm| vm.guest_pass().unwrap_or(0) >= pass_at_pause + 3,
    );
    assert_eq!(
        second.guest_exception().expect("status"),
        None,
        "no exception after restore"
    );
    assert_eq!(second.vcpu_status(), vec![VcpuStatus::Running]);
    assert_eq!(
        first.vcpu_status(),
        vec![VcpuStatus::Paused],
        "never both running"
    );
    assert_eq!(first.guest_pass().expect("pass"), pass_at_pause);
    println!(
        "state: {} bytes, save {:?}, restore {:?}",
        bytes.len(),
        save_time,
        restore_time
    );
}

#[test]
fn state_of_another_shape_is_refused() {
    if !kvm_or_skip("state_of_another_shape_is_refused") {
        return;
    }
    let vm = booted(64, 0);
    vm.pause().expect("pause");
    let state = vm.save_state().expect("save");
    let other = KvmVm::create(32 << 20, 1).expect("other");
    let err = other.restore_state(&state).expect_err("size mismatch");
    assert!(err.to_string().contains("does not fit"), "{err}");
    assert!(ferry_host::kvm::state::VmState::from_bytes(&[1, 2, 3]).is_err());
    let same = KvmVm::create(64 << 20, 1).expect("same shape");
    let mut big_xsave = state.clone();
    big_xsave.vcpus[0].xsave_extra = vec![0; 1 << 20];
    let err = same
        .restore_state(&big_xsave)
        .expect_err("XSAVE area too large");
    assert!(err.to_string().contains("XSAVE area"), "{err}");
    let mut slow_tsc = state.clone();
    slow_tsc.vcpus[0].tsc_khz = 1;
    let err = same
        .restore_state(&slow_tsc)
        .expect_err("a TSC no host can run");
    assert!(err.to_string().contains("TSC runs at 1 kHz"), "{err}");
    vm.resume().expect("resume");
    assert!(
        vm.save_state().is_err(),
        "state is only read from a paused VM"
    );
}

#[test]
fn a_state_whose_cpuid_this_host_cannot_give_is_refused_by_name() {
    if !kvm_or_skip("a_state_whose_cpuid_this_host_cannot_give_is_refused_by_name") {
        return;
    }
    let vm = booted(64, 0);
    vm.pause().expect("pause");
    let mut state = vm.save_state().expect("save");
    let lacking = ferry_host::kvm::cpu::known()
        .find(|f| !vm.cpu_features().contains(*f))
        .expect("this host lacks some feature of the table");
    let mut entries = ferry_host::kvm::state::cpuid_entries(&state.vcpus[0]).expect("cpuid");
    assert!(
        ferry_host::kvm::cpu::set_feature(&mut entries, lacking),
        "{lacking}'s leaf is there"
    );
    ferry_host::kvm::state::set_cpuid_entries(&mut state.vcpus[0], &entries);
    let other = KvmVm::create(64 << 20, 1).expect("other");
    let err = other
        .restore_state(&state)
        .expect_err("a CPUID this host cannot give");
    assert!(err.to_string().contains(lacking), "names {lacking}: {err}");
}

#[test]
fn a_cpu_model_this_host_cannot_give_is_refused_and_one_it_can_is_applied() {
    if !kvm_or_skip("a_cpu_model_this_host_cannot_give_is_refused_and_one_it_can_is_applied") {
        return;
    }
    let host = ferry_host::kvm::cpu::host_model().expect("host model");
    let lacking = ferry_host::kvm::cpu::known()
        .find(|f| !host.contains(*f))
        .expect("this host lacks some feature of the table");
    let mut model = host.clone();
    model.insert(lacking.to_owned());
    let memory = |mib: u64| {
        ferry_host::kvm::memory_of(ferry_host::kvm::shared_memory(mib << 20).expect("memfd"))
            .expect("memory")
    };
    let err = KvmVm::create_on(memory(16), 1, Some(&model)).expect_err("refused");
    assert!(err.to_string().contains(lacking), "names {lacking}: {err}");
    // A smaller model is what the vCPU is given.
    let small: std::collections::BTreeSet<String> = ["fpu", "sse", "sse2", "lm", "nx", "syscall"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let vm = KvmVm::create_on(memory(16), 1, Some(&small)).expect("VM");
    let state = vm.save_state().expect("save");
    let given = ferry_host::kvm::cpu::features_of(
        &ferry_host::kvm::state::cpuid_entries(&state.vcpus[0]).expect("cpuid"),
    );
    assert!(given.contains("sse2") && given.contains("lm"), "{given:?}");
    if host.contains("cx16") {
        assert!(
            !given.contains("cx16"),
            "features outside the model are cleared: {given:?}"
        );
    }
}

#[test]
fn throttle_slows_the_guest() {
    if !kvm_or_skip("throttle_slows_the_guest") {
        return;
    }
    let mut vm = booted(64, 8);
    let rate = |vm: &KvmVm| {
        let start = vm.guest_pass().expect("pass");
        std::thread::sleep(Duration::from_millis(300));
        vm.guest_pass().expect("pass") - start
    };
    let free = rate(&vm);
    vm.set_throttle(80);
    let throttled = rate(&vm);
    vm.set_throttle(0);
    let again = rate(&vm);
    println!("passes per 300 ms: free {free}, 80% throttled {throttled}, unthrottled {again}");
    assert!(free >= 5, "the guest runs at all");
    assert!(
        throttled * 2 < free,
        "an 80% throttle at least halves the rate"
    );
    assert!(again * 2 > free, "lifting the throttle restores the rate");
}

/// The test guest's disk device: the guest writes the verifiable pattern
/// through the port, each write acknowledged only once the disk has it,
/// and counts the acknowledged ones in its own memory.
#[test]
fn test_guest_writes_its_disk_pattern_through_the_port() {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};

    use ferry_actors::disk::{BlockBackend, DiskError, DiskPort, MemDisk};
    use ferry_actors::guest::GuestBackend;
    use ferry_actors::storage::pattern::WritePattern;
    use ferry_host::kvm::image::{STATUS_ADDR, STATUS_DISK_SEQ};

    struct Port {
        disk: Mutex<MemDisk>,
        acked: AtomicU64,
    }
    impl DiskPort for Port {
        fn write(&self, offset: u64, data: Vec<u8>, seq: Option<u64>) -> Result<(), DiskError> {
            self.disk
                .lock()
                .expect("disk")
                .write_durable(offset, &data)?;
            self.acked.fetch_max(
                seq.expect("the test guest numbers its writes"),
                Ordering::SeqCst,
            );
            Ok(())
        }

        fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, DiskError> {
            let mut buf = vec![0; len as usize];
            self.disk.lock().expect("disk").read_at(offset, &mut buf)?;
            Ok(buf)
        }
    }

    if !kvm_or_skip("test_guest_writes_its_disk_pattern_through_the_port") {
        return;
    }
    const DISK: u64 = 1 << 20;
    let port = std::sync::Arc::new(Port {
        disk: Mutex::new(MemDisk::new(DISK)),
        acked: AtomicU64::new(0),
    });
    let pattern = WritePattern::new(DISK);
    let mut vm = booted(64, 0);
    GuestBackend::attach_disk(&mut vm, port.clone(), pattern.blocks(), pattern.stride())
        .expect("attach");
    // Past one full sweep of the 256 blocks, so every block is checked.
    wait_for(&vm, "disk writes", Duration::from_secs(30), |_| {
        port.acked.load(Ordering::SeqCst) >= 300
    });
    vm.pause().expect("pause");
    let acked = port.acked.load(Ordering::SeqCst);
    let counted = vm
        .memory()
        .read_obj::<u64>(GuestAddress(STATUS_ADDR + STATUS_DISK_SEQ))
        .expect("status");
    assert!(
        counted == acked || counted + 1 == acked,
        "the guest counted {counted}, the disk acknowledged {acked}"
    );
    let disk = port.disk.lock().expect("disk");
    let checked = pattern
        .verify(acked, 0, |o, b| disk.read_at(o, b))
        .expect("every acknowledged write on the disk");
    assert_eq!(checked, pattern.blocks());
}
