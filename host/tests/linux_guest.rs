//! The project's Linux test guest (guest/linux/build.sh) under ferry's KVM
//! backend: it boots through its PVH entry (and, as a bzImage, through the
//! 64-bit boot protocol), prints on the serial console,
//! and its user-space dirtier runs pass after pass; its state and memory
//! move into a second VM, where the passes go on.
//!
//! Where /dev/kvm is missing, or the test guest is not built, every test
//! prints one line saying it was skipped and why, and passes — unless
//! `FERRY_REQUIRE_GUEST=1` (CI sets it after building the guest), where a
//! missing guest fails.

use std::time::{Duration, Instant};

mod common;

use common::{linux_guest_or_skip as guest_or_skip, newest_dirtier_pass as newest_pass};
use ferry_host::kvm::{self, KvmVm};

/// One guest boots at a time: a boot is a core's worth of emulated ring-0
/// work for a minute or more on these machines (more since the test kernel
/// has networking), and a second in parallel pushed both past their time
/// limits in CI.
fn boot_slot() -> impl Drop {
    use std::sync::{Condvar, Mutex};
    static SLOTS: (Mutex<u32>, Condvar) = (Mutex::new(1), Condvar::new());
    struct Slot;
    impl Drop for Slot {
        fn drop(&mut self) {
            *SLOTS
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) += 1;
            SLOTS.1.notify_one();
        }
    }
    let mut free = SLOTS
        .0
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    while *free == 0 {
        free = SLOTS
            .1
            .wait(free)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
    }
    *free -= 1;
    Slot
}

fn console_text(vm: &KvmVm) -> String {
    let out = vm.console().expect("a Linux guest has a console");
    String::from_utf8_lossy(&out.0.lock().expect("console").tail()).into_owned()
}

fn wait_for_pass(vm: &KvmVm, pass: u64, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let text = console_text(vm);
        if newest_pass(&text) >= pass {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "no dirtier pass {pass} after {limit:?}: vCPUs {:?}; console:\n{text}",
            vm.vcpu_status()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_test_kernel_boots_and_its_dirtier_passes_show_on_the_console() {
    let _slot = boot_slot();
    let Some(mut image) = guest_or_skip("the_test_kernel_boots", 16) else {
        return;
    };
    // The kernel's own lines say how many CPUs it brought up.
    image.cmdline = image.cmdline.replace(" quiet", "");
    let vm = KvmVm::with_linux(&image, 128 << 20, 2).expect("load the kernel");
    let started = Instant::now();
    vm.resume().expect("resume");
    wait_for_pass(&vm, 2, Duration::from_secs(240));
    let text = console_text(&vm);
    println!(
        "Linux test guest: dirtier pass 2 after {:.1} s; console:\n{text}",
        started.elapsed().as_secs_f64()
    );
    assert!(text.contains("ferry-guest: up"), "/init ran:\n{text}");
    assert!(
        text.contains("Brought up 1 node, 2 CPUs"),
        "both vCPUs run (the second started by INIT/SIPI):\n{text}"
    );
}

#[test]
fn the_test_kernel_boots_as_a_bzimage_through_the_64_bit_protocol() {
    let _slot = boot_slot();
    if guest_or_skip("the_test_kernel_boots_as_a_bzimage", 16).is_none() {
        return;
    }
    let image = ferry_host::guest_images::linux_test_guest_bzimage("dirtier", 16)
        .expect("build.sh builds the bzImage with the vmlinux");
    let vm = KvmVm::with_linux(&image, 128 << 20, 1).expect("load the bzImage");
    let started = Instant::now();
    vm.resume().expect("resume");
    wait_for_pass(&vm, 2, Duration::from_secs(240));
    let text = console_text(&vm);
    println!(
        "bzImage (decompressed by its own stub): dirtier pass 2 after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(text.contains("ferry-guest: up"), "/init ran:\n{text}");
}

#[test]
fn a_paused_linux_guest_moves_into_a_second_vm_and_its_passes_go_on() {
    let _slot = boot_slot();
    let Some(image) = guest_or_skip("a_paused_linux_guest_moves", 16) else {
        return;
    };
    let memory = 128 << 20;
    let source = KvmVm::with_linux(&image, memory, 1).expect("load the kernel");
    source.resume().expect("resume");
    wait_for_pass(&source, 2, Duration::from_secs(240));
    source.pause().expect("pause");
    let at_pause = newest_pass(&console_text(&source));
    let state = source.save_state().expect("save");
    let bytes = state.to_bytes();
    let hash = source.memory_hash().expect("hash");

    let dest = KvmVm::create(memory, 1).expect("second VM");
    dest.copy_memory_from(&source).expect("memory");
    drop(source);
    assert_eq!(dest.memory_hash().expect("hash"), hash);
    let state = kvm::state::VmState::from_bytes(&bytes).expect("decode");
    // (Restoring writes guest memory: KVM updates the kvmclock pages.)
    dest.restore_state(&state).expect("restore");
    dest.resume().expect("resume");
    let took = wait_for_pass(&dest, at_pause + 2, Duration::from_secs(60));
    println!(
        "the restored guest reached pass {} ({:.1} s after its resume)",
        at_pause + 2,
        took.as_secs_f64()
    );
}

/// Types `line` into the guest's console (its receive FIFO takes a few
/// bytes at a time).
fn type_line(vm: &KvmVm, line: &[u8]) {
    let mut rest = line;
    while !rest.is_empty() {
        let took = vm.console_input(rest).expect("a console");
        rest = &rest[took..];
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_for_text(vm: &KvmVm, text: &str, limit: Duration) -> String {
    let start = Instant::now();
    loop {
        let console = console_text(vm);
        if console.contains(text) {
            return console;
        }
        assert!(
            start.elapsed() < limit,
            "no {text:?} within {limit:?}; console:\n{console}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_linux_guest_reads_and_writes_its_virtio_disk() {
    let _slot = boot_slot();
    let Some(mut image) = guest_or_skip("a_linux_guest_reads_and_writes_its_virtio_disk", 16)
    else {
        return;
    };
    image.cmdline = format!(
        "{} {}",
        image
            .cmdline
            .replace("ferry_run=dirtier", "ferry_run=shell"),
        ferry_host::virtio::bus::cmdline_word(0)
    );
    // An 8 MiB disk file with a mark the host put at sector 100.
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("disk0.raw");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&path).expect("disk file");
        f.set_len(8 << 20).expect("size");
        f.write_all_at(b"ferry-mark-from-the-host", 100 * 512)
            .expect("mark");
    }
    let disk = ferry_host::datastore::FileDisk::open(&path).expect("open disk");
    let vm = KvmVm::with_linux(&image, 128 << 20, 1).expect("load the kernel");
    let word = vm
        .attach_block(
            ferry_host::virtio::blk::BackendBlock(Box::new(disk)),
            "ferry-disk0",
        )
        .expect("attach");
    assert_eq!(word, ferry_host::virtio::bus::cmdline_word(0));
    vm.resume().expect("resume");
    wait_for_text(&vm, "ferry-guest: up", Duration::from_secs(240));
    std::thread::sleep(Duration::from_secs(2));
    // The guest sees the disk's size, reads the host's mark, and writes
    // its own with fsync; the answers carry arithmetic so that the typed
    // line's echo does not count.
    type_line(
        &vm,
        b"blockdev --getsz /dev/vda; dd if=/dev/vda bs=512 skip=100 count=1 2>/dev/null | head -c 24; echo; echo ferry-from-the-guest | dd of=/dev/vda bs=512 seek=200 conv=sync,fsync 2>/dev/null; echo disk-$((40+2))-done\n",
    );
    let console = wait_for_text(&vm, "disk-42-done", Duration::from_secs(60));
    assert!(
        console.contains("16384"),
        "8 MiB = 16384 sectors:\n{console}"
    );
    let marks = console.matches("ferry-mark-from-the-host").count();
    assert!(marks >= 1, "the guest read the host's mark:\n{console}");
    let bytes = std::fs::read(&path).expect("disk file");
    assert_eq!(
        &bytes[200 * 512..200 * 512 + 20],
        b"ferry-from-the-guest",
        "the guest's write is on the disk file"
    );
    let state = {
        vm.pause().expect("pause");
        vm.save_state().expect("state")
    };
    assert_eq!(state.virtio.len(), 1, "the device's state is saved");
    assert!(
        state.virtio[0].queues[0].next_used > 0,
        "{:?}",
        state.virtio[0]
    );
}
