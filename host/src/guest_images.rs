//! Where the project's guest images are: the Linux test guest that
//! `guest/linux/build.sh` builds once per machine into a cache.

use std::path::PathBuf;

use crate::kvm::linux::{DEFAULT_CMDLINE, LinuxImage};

/// The cache root `guest/linux/build.sh` uses.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("FERRY_GUEST_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    base.join("ferry").join("guest")
}

/// The newest Linux test guest built, booting with `run` (what its /init
/// starts: `dirtier`, `shell` or `halt`) and a `mib`-MiB dirtier buffer.
/// The error says how to build it.
pub fn linux_test_guest(run: &str, mib: u64) -> Result<LinuxImage, String> {
    test_guest_with("vmlinux", run, mib)
}

/// As [`linux_test_guest`], the kernel as a bzImage (booted through the
/// 64-bit boot protocol instead of the PVH entry).
pub fn linux_test_guest_bzimage(run: &str, mib: u64) -> Result<LinuxImage, String> {
    test_guest_with("bzImage", run, mib)
}

fn test_guest_with(kernel_file: &str, run: &str, mib: u64) -> Result<LinuxImage, String> {
    let dir = cache_root().join("linux").join("current");
    let kernel = dir.join(kernel_file);
    let initrd = dir.join("initrd.cpio");
    if !kernel.is_file() || !initrd.is_file() {
        return Err(format!(
            "the Linux test guest is not built ({} is missing): run guest/linux/build.sh",
            kernel.display()
        ));
    }
    Ok(LinuxImage {
        kernel,
        initrd: Some(initrd),
        cmdline: format!("{DEFAULT_CMDLINE} ferry_run={run} ferry_mib={mib}"),
    })
}
