//! Whether a host takes an incoming VM: capacity and CPU features.

use std::collections::BTreeSet;

use super::wire::{Offer, Refusal};
use crate::guest::PAGE_BYTES;

/// What a host can give its VMs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capacity {
    /// Guest memory in bytes, over all VMs.
    pub memory_bytes: u64,
    /// vCPUs, over all VMs.
    pub vcpus: u32,
    /// CPU features guests may use here.
    pub cpu_features: BTreeSet<String>,
    /// Whether KVM guests can run here.
    pub kvm: bool,
}

/// What the host's VMs (and admitted migrations) already take.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Guest memory in bytes.
    pub memory_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
}

/// Checks `offer` against what is left; `exists` says whether a VM of
/// that name already lives here.
pub fn admit(offer: &Offer, capacity: &Capacity, used: Usage, exists: bool) -> Result<(), Refusal> {
    let vm = &offer.vm;
    if vm.name.is_empty() || vm.memory_bytes == 0 || !vm.memory_bytes.is_multiple_of(PAGE_BYTES) {
        return Err(Refusal::BadOffer(format!(
            "VM {:?} with {} bytes of memory",
            vm.name, vm.memory_bytes
        )));
    }
    if vm.vcpus == 0 || offer.lanes == 0 {
        return Err(Refusal::BadOffer("no vCPUs or no lanes".into()));
    }
    if exists {
        return Err(Refusal::AlreadyExists(vm.name.clone()));
    }
    if vm.kind.needs_kvm() && !capacity.kvm {
        return Err(Refusal::UnsupportedGuest(
            "KVM guest, but this host has no /dev/kvm".into(),
        ));
    }
    let missing: Vec<String> = vm
        .cpu_features
        .iter()
        .filter(|f| !capacity.cpu_features.contains(*f))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(Refusal::MissingCpuFeatures(missing));
    }
    let free_bytes = capacity.memory_bytes.saturating_sub(used.memory_bytes);
    if vm.memory_bytes > free_bytes {
        return Err(Refusal::NoMemory {
            needed_bytes: vm.memory_bytes,
            free_bytes,
        });
    }
    let free = capacity.vcpus.saturating_sub(used.vcpus);
    if u32::from(vm.vcpus) > free {
        return Err(Refusal::NoVcpus {
            needed: u32::from(vm.vcpus),
            free,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::wire::GuestKind;

    fn offer(features: &[&str], memory_bytes: u64) -> Offer {
        crate::migration::wire::test_offer("web-1", memory_bytes, features)
    }

    fn capacity() -> Capacity {
        Capacity {
            memory_bytes: 1 << 30,
            vcpus: 2,
            cpu_features: ["sse2", "avx"].iter().map(|s| (*s).to_owned()).collect(),
            kvm: false,
        }
    }

    #[test]
    fn refusals_name_the_reason() {
        let c = capacity();
        assert_eq!(
            admit(&offer(&["sse2"], 1 << 20), &c, Usage::default(), false),
            Ok(())
        );
        assert_eq!(
            admit(
                &offer(&["sse2", "avx512f", "amx"], 1 << 20),
                &c,
                Usage::default(),
                false
            ),
            Err(Refusal::MissingCpuFeatures(vec![
                "avx512f".into(),
                "amx".into()
            ]))
        );
        let used = Usage {
            memory_bytes: 1 << 30,
            vcpus: 0,
        };
        assert!(matches!(
            admit(&offer(&[], 1 << 20), &c, used, false),
            Err(Refusal::NoMemory { .. })
        ));
        assert!(matches!(
            admit(&offer(&[], 1 << 20), &c, Usage::default(), true),
            Err(Refusal::AlreadyExists(_))
        ));
        let mut kvm = offer(&[], 1 << 20);
        kvm.vm.kind = GuestKind::Kvm { wss_bytes: 0 };
        assert!(matches!(
            admit(&kvm, &c, Usage::default(), false),
            Err(Refusal::UnsupportedGuest(_))
        ));
    }
}
