//! CPU models: which CPUID feature bits a guest sees, by name.
//!
//! A model is a set of feature names (those of `/proc/cpuinfo`). `host` is
//! every feature this host's KVM supports; a cluster baseline is the
//! features every host supports (`ferry cluster cpu-baseline`), as VMware
//! EVC and libvirt's custom models do. A VM's model restricts the CPUID
//! its vCPUs get; a destination admits it only if its KVM supports every
//! feature of the model (admission names the missing ones), and a restore
//! refuses a saved CPUID with features this host cannot give.
//!
//! The table names the features guests and compilers select code paths
//! by; bits outside it (topology, cache and power leaves) pass through as
//! KVM reports them.

use std::collections::BTreeSet;

use kvm_bindings::CpuId;

/// A CPUID register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// A named feature bit: leaf, subleaf, register, bit.
struct Feature(&'static str, u32, u32, Reg, u8);

use Reg::{Eax, Ebx, Ecx, Edx};

const EXT: u32 = 0x8000_0001;

/// The features a model is made of.
const FEATURES: &[Feature] = &[
    Feature("fpu", 1, 0, Edx, 0),
    Feature("vme", 1, 0, Edx, 1),
    Feature("de", 1, 0, Edx, 2),
    Feature("pse", 1, 0, Edx, 3),
    Feature("tsc", 1, 0, Edx, 4),
    Feature("msr", 1, 0, Edx, 5),
    Feature("pae", 1, 0, Edx, 6),
    Feature("cx8", 1, 0, Edx, 8),
    Feature("apic", 1, 0, Edx, 9),
    Feature("sep", 1, 0, Edx, 11),
    Feature("mtrr", 1, 0, Edx, 12),
    Feature("pge", 1, 0, Edx, 13),
    Feature("cmov", 1, 0, Edx, 15),
    Feature("pat", 1, 0, Edx, 16),
    Feature("pse36", 1, 0, Edx, 17),
    Feature("clflush", 1, 0, Edx, 19),
    Feature("mmx", 1, 0, Edx, 23),
    Feature("fxsr", 1, 0, Edx, 24),
    Feature("sse", 1, 0, Edx, 25),
    Feature("sse2", 1, 0, Edx, 26),
    Feature("pni", 1, 0, Ecx, 0),
    Feature("pclmulqdq", 1, 0, Ecx, 1),
    Feature("ssse3", 1, 0, Ecx, 9),
    Feature("fma", 1, 0, Ecx, 12),
    Feature("cx16", 1, 0, Ecx, 13),
    Feature("pcid", 1, 0, Ecx, 17),
    Feature("sse4_1", 1, 0, Ecx, 19),
    Feature("sse4_2", 1, 0, Ecx, 20),
    Feature("x2apic", 1, 0, Ecx, 21),
    Feature("movbe", 1, 0, Ecx, 22),
    Feature("popcnt", 1, 0, Ecx, 23),
    Feature("aes", 1, 0, Ecx, 25),
    Feature("xsave", 1, 0, Ecx, 26),
    Feature("avx", 1, 0, Ecx, 28),
    Feature("f16c", 1, 0, Ecx, 29),
    Feature("rdrand", 1, 0, Ecx, 30),
    Feature("fsgsbase", 7, 0, Ebx, 0),
    Feature("bmi1", 7, 0, Ebx, 3),
    Feature("hle", 7, 0, Ebx, 4),
    Feature("avx2", 7, 0, Ebx, 5),
    Feature("smep", 7, 0, Ebx, 7),
    Feature("bmi2", 7, 0, Ebx, 8),
    Feature("erms", 7, 0, Ebx, 9),
    Feature("invpcid", 7, 0, Ebx, 10),
    Feature("rtm", 7, 0, Ebx, 11),
    Feature("avx512f", 7, 0, Ebx, 16),
    Feature("avx512dq", 7, 0, Ebx, 17),
    Feature("rdseed", 7, 0, Ebx, 18),
    Feature("adx", 7, 0, Ebx, 19),
    Feature("smap", 7, 0, Ebx, 20),
    Feature("avx512ifma", 7, 0, Ebx, 21),
    Feature("clflushopt", 7, 0, Ebx, 23),
    Feature("clwb", 7, 0, Ebx, 24),
    Feature("avx512cd", 7, 0, Ebx, 28),
    Feature("sha_ni", 7, 0, Ebx, 29),
    Feature("avx512bw", 7, 0, Ebx, 30),
    Feature("avx512vl", 7, 0, Ebx, 31),
    Feature("avx512vbmi", 7, 0, Ecx, 1),
    Feature("umip", 7, 0, Ecx, 2),
    Feature("pku", 7, 0, Ecx, 3),
    Feature("avx512_vbmi2", 7, 0, Ecx, 6),
    Feature("gfni", 7, 0, Ecx, 8),
    Feature("vaes", 7, 0, Ecx, 9),
    Feature("vpclmulqdq", 7, 0, Ecx, 10),
    Feature("avx512_vnni", 7, 0, Ecx, 11),
    Feature("avx512_bitalg", 7, 0, Ecx, 12),
    Feature("avx512_vpopcntdq", 7, 0, Ecx, 14),
    Feature("rdpid", 7, 0, Ecx, 22),
    Feature("fsrm", 7, 0, Edx, 4),
    Feature("xsaveopt", 0xd, 1, Eax, 0),
    Feature("xsavec", 0xd, 1, Eax, 1),
    Feature("xgetbv1", 0xd, 1, Eax, 2),
    Feature("xsaves", 0xd, 1, Eax, 3),
    Feature("lahf_lm", EXT, 0, Ecx, 0),
    Feature("abm", EXT, 0, Ecx, 5),
    Feature("sse4a", EXT, 0, Ecx, 6),
    Feature("misalignsse", EXT, 0, Ecx, 7),
    Feature("3dnowprefetch", EXT, 0, Ecx, 8),
    Feature("xop", EXT, 0, Ecx, 11),
    Feature("fma4", EXT, 0, Ecx, 16),
    Feature("tbm", EXT, 0, Ecx, 21),
    Feature("syscall", EXT, 0, Edx, 11),
    Feature("nx", EXT, 0, Edx, 20),
    Feature("mmxext", EXT, 0, Edx, 22),
    Feature("pdpe1gb", EXT, 0, Edx, 26),
    Feature("rdtscp", EXT, 0, Edx, 27),
    Feature("lm", EXT, 0, Edx, 29),
];

/// Whether `name` is a feature a model can hold.
pub fn is_known(name: &str) -> bool {
    FEATURES.iter().any(|f| f.0 == name)
}

/// Every feature name a model can hold.
pub fn known() -> impl Iterator<Item = &'static str> {
    FEATURES.iter().map(|f| f.0)
}

fn register(e: &kvm_bindings::kvm_cpuid_entry2, reg: Reg) -> u32 {
    match reg {
        Eax => e.eax,
        Ebx => e.ebx,
        Ecx => e.ecx,
        Edx => e.edx,
    }
}

fn register_mut(e: &mut kvm_bindings::kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Eax => &mut e.eax,
        Ebx => &mut e.ebx,
        Ecx => &mut e.ecx,
        Edx => &mut e.edx,
    }
}

/// Whether entry `e` is the one feature `f` lives in (leaves whose
/// subleaf does not matter report index 0).
fn holds(e: &kvm_bindings::kvm_cpuid_entry2, f: &Feature) -> bool {
    e.function == f.1 && e.index == f.2
}

/// The named features `entries` has.
pub fn features_of(entries: &[kvm_bindings::kvm_cpuid_entry2]) -> BTreeSet<String> {
    FEATURES
        .iter()
        .filter(|f| {
            entries
                .iter()
                .any(|e| holds(e, f) && register(e, f.3) & (1 << f.4) != 0)
        })
        .map(|f| f.0.to_owned())
        .collect()
}

/// Sets feature `name` in `entries`; false if it is unknown or its leaf is
/// missing.
pub fn set_feature(entries: &mut [kvm_bindings::kvm_cpuid_entry2], name: &str) -> bool {
    let Some(f) = FEATURES.iter().find(|f| f.0 == name) else {
        return false;
    };
    let Some(e) = entries.iter_mut().find(|e| holds(e, f)) else {
        return false;
    };
    *register_mut(e, f.3) |= 1 << f.4;
    true
}

/// Clears every named feature of `cpuid` that `model` lacks.
pub fn restrict(cpuid: &mut CpuId, model: &BTreeSet<String>) {
    for e in cpuid.as_mut_slice() {
        for f in FEATURES {
            if holds(e, f) && !model.contains(f.0) {
                *register_mut(e, f.3) &= !(1 << f.4);
            }
        }
    }
}

/// The features of `wanted` that `offered` lacks, by name.
pub fn missing(wanted: &BTreeSet<String>, offered: &BTreeSet<String>) -> Vec<String> {
    wanted.difference(offered).cloned().collect()
}

/// The features every one of `hosts` has.
pub fn baseline<'a>(hosts: impl IntoIterator<Item = &'a BTreeSet<String>>) -> BTreeSet<String> {
    let mut hosts = hosts.into_iter();
    let Some(first) = hosts.next() else {
        return BTreeSet::new();
    };
    hosts.fold(first.clone(), |acc, h| {
        acc.intersection(h).cloned().collect()
    })
}

/// The features this host's KVM supports for guests (the `host` model).
pub fn host_model() -> Result<BTreeSet<String>, super::KvmError> {
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| super::KvmError::Unavailable(e.to_string()))?;
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| super::KvmError::Ioctl("KVM_GET_SUPPORTED_CPUID", e))?;
    Ok(features_of(cpuid.as_slice()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, ecx: u32, edx: u32) -> kvm_bindings::kvm_cpuid_entry2 {
        kvm_bindings::kvm_cpuid_entry2 {
            function,
            index,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn features_are_read_restricted_and_compared_by_name() {
        // Leaf 1: sse2 (edx 26), popcnt (ecx 23), aes (ecx 25); bit 31 of
        // ecx (the hypervisor bit) is not a model feature and stays.
        let leaf1 = entry(1, 0, (1 << 23) | (1 << 25) | (1 << 31), 1 << 26);
        let mut cpuid = CpuId::from_entries(&[leaf1]).expect("cpuid");
        assert_eq!(
            features_of(cpuid.as_slice()),
            set(&["aes", "popcnt", "sse2"])
        );
        restrict(&mut cpuid, &set(&["sse2", "aes"]));
        assert_eq!(features_of(cpuid.as_slice()), set(&["aes", "sse2"]));
        assert_ne!(cpuid.as_slice()[0].ecx & (1 << 31), 0, "unnamed bits pass");
        assert_eq!(
            missing(&set(&["aes", "avx2", "sse2"]), &set(&["sse2"])),
            vec!["aes".to_owned(), "avx2".to_owned()]
        );
        let a = set(&["aes", "sse2", "avx2"]);
        let b = set(&["sse2", "avx2", "sha_ni"]);
        assert_eq!(baseline([&a, &b]), set(&["avx2", "sse2"]));
        assert!(baseline(std::iter::empty()).is_empty());
        assert!(is_known("avx512f") && !is_known("warp_drive"));
    }

    #[test]
    fn the_host_model_comes_from_kvm() {
        match host_model() {
            Ok(m) => {
                println!("host model: {m:?}");
                assert!(m.contains("sse2") && m.contains("lm"), "{m:?}");
            }
            Err(e) => {
                println!("SKIPPED the_host_model_comes_from_kvm: {e} (KVM tests need /dev/kvm)")
            }
        }
    }
}
