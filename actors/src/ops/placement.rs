//! Placement: which host should a VM go to, and why.
//!
//! [`rank`] scores every candidate from its [`HostLoad`] and the link
//! round-trip measured to it. A candidate is ruled out (score `None`)
//! when it is in maintenance or degraded, lacks memory or vCPUs, lacks a
//! CPU feature the VM uses, or cannot reach the VM's disks. Otherwise
//! the score (0–100) weighs:
//!
//! - memory left after the VM arrives (40),
//! - vCPUs left after it arrives (25),
//! - link quality: round-trip time, 1 ms or less counting as perfect (20),
//! - migration load: migrations it is already sending or receiving (15).

// rkyv derives resolver twins of the types whose fields carry no docs;
// every item written here is documented.
#![allow(missing_docs)]

use serde::Serialize;

use crate::migration::VmConfig;

/// A VM as a host's load shows it.
#[derive(
    Debug, Clone, PartialEq, Eq, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct VmLoad {
    /// Name.
    pub name: String,
    /// Guest memory in bytes.
    pub memory_bytes: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Whether its vCPUs run.
    pub running: bool,
    /// CPU features it uses.
    pub cpu_features: Vec<String>,
    /// Locations of its disks' datastores.
    pub disk_locations: Vec<String>,
    /// vCPUs busy lately, in thousandths (from guest CPU time).
    pub cpu_busy_milli: u32,
    /// Its disks.
    pub disks: Vec<super::sdrs::DiskLoad>,
    /// Why its guest died (empty: it did not).
    pub crashed: String,
}

/// What one host reports about itself.
#[derive(
    Debug, Clone, PartialEq, Eq, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct HostLoad {
    /// Host name.
    pub name: String,
    /// Guest memory it offers, bytes.
    pub memory_total: u64,
    /// Guest memory in use or reserved, bytes.
    pub memory_used: u64,
    /// vCPUs it offers.
    pub vcpus_total: u32,
    /// vCPUs in use or reserved.
    pub vcpus_used: u32,
    /// CPU features it offers.
    pub cpu_features: Vec<String>,
    /// Its datastores: (name, location).
    pub datastores: Vec<(String, String)>,
    /// Migrations it is sending now.
    pub migrations_out: u32,
    /// Migrations it is receiving now.
    pub migrations_in: u32,
    /// In maintenance mode.
    pub maintenance: bool,
    /// Why it reports itself degraded (empty: healthy).
    pub degraded: String,
    /// Its VMs.
    pub vms: Vec<VmLoad>,
    /// Its datastores' space.
    pub datastore_space: Vec<super::sdrs::DatastoreSpace>,
}

impl HostLoad {
    /// Share of memory in use, 0–1.
    pub fn memory_fraction(&self) -> f64 {
        fraction(self.memory_used, self.memory_total)
    }

    /// Share of vCPUs in use, 0–1.
    pub fn vcpu_fraction(&self) -> f64 {
        fraction(u64::from(self.vcpus_used), u64::from(self.vcpus_total))
    }

    /// Share of its vCPUs' time the guests kept busy lately, 0–1.
    pub fn cpu_busy_fraction(&self) -> f64 {
        let busy: u64 = self.vms.iter().map(|v| u64::from(v.cpu_busy_milli)).sum();
        fraction(busy, u64::from(self.vcpus_total) * 1000)
    }

    /// Whether it takes new VMs at all.
    pub fn in_service(&self) -> bool {
        !self.maintenance && self.degraded.is_empty()
    }
}

fn fraction(used: u64, total: u64) -> f64 {
    if total == 0 {
        1.0
    } else {
        used as f64 / total as f64
    }
}

/// What the VM needs of a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmNeeds {
    /// The VM.
    pub name: String,
    /// Memory, bytes.
    pub memory_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// CPU features.
    pub cpu_features: Vec<String>,
    /// Locations the destination must see (its disks, when they stay
    /// put), or datastore names it must have (when they move).
    pub datastores: DiskAccess,
}

/// How the destination must reach the VM's disks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskAccess {
    /// No disks.
    None,
    /// The disks stay: the destination must mount these locations.
    Shared(Vec<String>),
    /// The disks move: the destination must have these datastores.
    Named(Vec<String>),
}

impl VmNeeds {
    /// The needs of `config`, moving its disks to `datastore` (empty: they
    /// stay where they are).
    pub fn of(config: &VmConfig, datastore: &str) -> Self {
        let datastores = if config.disks.is_empty() {
            DiskAccess::None
        } else if datastore.is_empty() {
            let mut l: Vec<String> = config.disks.iter().map(|d| d.location.clone()).collect();
            l.dedup();
            DiskAccess::Shared(l)
        } else {
            DiskAccess::Named(vec![datastore.to_owned()])
        };
        Self {
            name: config.name.clone(),
            memory_bytes: config.memory_bytes,
            vcpus: u32::from(config.vcpus),
            cpu_features: config.cpu_features.clone(),
            datastores,
        }
    }

    /// The needs of a VM as a host's load lists it (disks stay).
    pub fn of_load(vm: &VmLoad) -> Self {
        Self {
            name: vm.name.clone(),
            memory_bytes: vm.memory_bytes,
            vcpus: u32::from(vm.vcpus),
            cpu_features: vm.cpu_features.clone(),
            datastores: if vm.disk_locations.is_empty() {
                DiskAccess::None
            } else {
                DiskAccess::Shared(vm.disk_locations.clone())
            },
        }
    }
}

/// One candidate's verdict.
#[derive(Debug, Clone, PartialEq, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct HostScore {
    /// The host.
    pub host: String,
    /// 0–100, higher is better; `None`: it cannot take the VM.
    pub score: Option<f64>,
    /// Why, one reason per factor.
    pub reasons: Vec<String>,
}

/// Why `host` cannot take `vm`, if it cannot.
pub fn ruled_out(vm: &VmNeeds, host: &HostLoad) -> Option<String> {
    if host.maintenance {
        return Some("in maintenance mode".into());
    }
    if !host.degraded.is_empty() {
        return Some(format!("degraded: {}", host.degraded));
    }
    if host.vms.iter().any(|v| v.name == vm.name) {
        return Some(format!("already has a VM named {}", vm.name));
    }
    let free_mem = host.memory_total.saturating_sub(host.memory_used);
    if free_mem < vm.memory_bytes {
        return Some(format!(
            "{} MiB free, {} MiB needed",
            free_mem >> 20,
            vm.memory_bytes >> 20
        ));
    }
    let free_cpus = host.vcpus_total.saturating_sub(host.vcpus_used);
    if free_cpus < vm.vcpus {
        return Some(format!("{free_cpus} vCPUs free, {} needed", vm.vcpus));
    }
    let missing: Vec<&str> = vm
        .cpu_features
        .iter()
        .filter(|f| !host.cpu_features.contains(f))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Some(format!("lacks CPU features {}", missing.join(", ")));
    }
    match &vm.datastores {
        DiskAccess::None => None,
        DiskAccess::Shared(locations) => locations
            .iter()
            .find(|l| !host.datastores.iter().any(|(_, hl)| hl == *l))
            .map(|l| {
                format!("cannot see the disks' datastore at {l} (move them with --datastore)")
            }),
        DiskAccess::Named(names) => names
            .iter()
            .find(|n| !host.datastores.iter().any(|(hn, _)| hn == *n))
            .map(|n| format!("has no datastore {n}")),
    }
}

/// Scores `host` for `vm`, over a link with round-trip `rtt_ms`.
pub fn score(vm: &VmNeeds, host: &HostLoad, rtt_ms: f64) -> HostScore {
    if let Some(why) = ruled_out(vm, host) {
        return HostScore {
            host: host.name.clone(),
            score: None,
            reasons: vec![why],
        };
    }
    let mem_left = 1.0 - fraction(host.memory_used + vm.memory_bytes, host.memory_total);
    let cpu_left = 1.0
        - fraction(
            u64::from(host.vcpus_used + vm.vcpus),
            u64::from(host.vcpus_total),
        );
    // 1 ms or less is as good as a LAN link gets (finer differences are
    // noise); 10 ms scores half, 100 ms nothing.
    let link = (1.0 - rtt_ms.max(1.0).log10() / 2.0).clamp(0.0, 1.0);
    let busy = host.migrations_in + host.migrations_out;
    let load = 1.0 / (1.0 + f64::from(busy));
    let parts = [
        (
            40.0 * mem_left,
            format!("memory: {:.0}% free after the move", mem_left * 100.0),
        ),
        (
            25.0 * cpu_left,
            format!("vCPUs: {:.0}% free after the move", cpu_left * 100.0),
        ),
        (20.0 * link, format!("link: {rtt_ms:.2} ms round trip")),
        (15.0 * load, format!("migrations: {busy} running there")),
    ];
    let total: f64 = parts.iter().map(|p| p.0).sum();
    let mut reasons: Vec<String> = parts
        .iter()
        .map(|(points, why)| format!("{why} (+{points:.1})"))
        .collect();
    if vm.cpu_features.is_empty() {
        reasons.push("CPU: no features required".into());
    } else {
        reasons.push(format!(
            "CPU: has all {} features the VM uses",
            vm.cpu_features.len()
        ));
    }
    match &vm.datastores {
        DiskAccess::None => {}
        DiskAccess::Shared(_) => reasons.push("disks: sees their datastore".into()),
        DiskAccess::Named(n) => reasons.push(format!("disks: has datastore {}", n.join(", "))),
    }
    HostScore {
        host: host.name.clone(),
        score: Some((total * 10.0).round() / 10.0),
        reasons,
    }
}

/// Every candidate (`hosts` with their round-trips, `from` left out),
/// best first; ruled-out hosts last.
pub fn rank(vm: &VmNeeds, from: &str, hosts: &[(HostLoad, f64)]) -> Vec<HostScore> {
    let mut scores: Vec<HostScore> = hosts
        .iter()
        .filter(|(h, _)| h.name != from)
        .map(|(h, rtt)| score(vm, h, *rtt))
        .collect();
    scores.sort_by(|a, b| {
        b.score
            .unwrap_or(-1.0)
            .total_cmp(&a.score.unwrap_or(-1.0))
            .then(a.host.cmp(&b.host))
    });
    scores
}

/// The best host for `vm`, or why there is none.
pub fn best(vm: &VmNeeds, from: &str, hosts: &[(HostLoad, f64)]) -> Result<String, String> {
    let ranked = rank(vm, from, hosts);
    match ranked.first() {
        Some(HostScore {
            host,
            score: Some(_),
            ..
        }) => Ok(host.clone()),
        _ if ranked.is_empty() => Err(format!("no other host to place {} on", vm.name)),
        _ => Err(format!(
            "no host can take {}: {}",
            vm.name,
            ranked
                .iter()
                .map(|s| format!("{} ({})", s.host, s.reasons.join("; ")))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn host(name: &str, mem_used_mib: u64, vms: Vec<VmLoad>) -> HostLoad {
        HostLoad {
            name: name.into(),
            memory_total: 1024 << 20,
            memory_used: mem_used_mib << 20,
            vcpus_total: 16,
            vcpus_used: vms.iter().map(|v| u32::from(v.vcpus)).sum(),
            cpu_features: vec!["sse2".into(), "avx2".into()],
            datastores: vec![("shared".into(), "/shared".into())],
            migrations_out: 0,
            migrations_in: 0,
            maintenance: false,
            degraded: String::new(),
            vms,
            datastore_space: Vec::new(),
        }
    }

    pub(crate) fn vm(name: &str, mem_mib: u64) -> VmLoad {
        VmLoad {
            name: name.into(),
            memory_bytes: mem_mib << 20,
            vcpus: 1,
            running: true,
            cpu_features: vec!["sse2".into()],
            disk_locations: Vec::new(),
            cpu_busy_milli: 0,
            disks: Vec::new(),
            crashed: String::new(),
        }
    }

    #[test]
    fn the_emptier_host_ranks_first_and_every_factor_is_explained() {
        let needs = VmNeeds::of_load(&vm("web", 128));
        let hosts = vec![
            (host("a", 0, vec![]), 0.2),
            (host("b", 800, vec![]), 0.2),
            (host("c", 100, vec![]), 0.2),
        ];
        let ranked = rank(&needs, "a", &hosts);
        assert_eq!(ranked.len(), 2, "the source is not a candidate");
        assert_eq!(ranked[0].host, "c");
        assert!(ranked[0].score > ranked[1].score);
        for why in ["memory", "vCPUs", "link", "migrations", "CPU"] {
            assert!(
                ranked[0].reasons.iter().any(|r| r.starts_with(why)),
                "{why} missing in {:?}",
                ranked[0].reasons
            );
        }
        assert_eq!(best(&needs, "a", &hosts), Ok("c".into()));
    }

    #[test]
    fn busy_links_and_slow_links_score_lower() {
        let needs = VmNeeds::of_load(&vm("web", 64));
        let mut busy = host("busy", 0, vec![]);
        busy.migrations_in = 3;
        let idle = host("idle", 0, vec![]);
        let far = host("far", 0, vec![]);
        let ranked = rank(&needs, "a", &[(busy, 0.1), (idle, 0.1), (far, 8.0)]);
        let order: Vec<&str> = ranked.iter().map(|s| s.host.as_str()).collect();
        assert_eq!(order[0], "idle");
        assert!(order[1..].contains(&"busy") && order[1..].contains(&"far"));
    }

    #[test]
    fn hosts_that_cannot_take_the_vm_are_ruled_out_with_the_reason() {
        let mut needs = VmNeeds::of_load(&vm("web", 512));
        needs.cpu_features.push("avx512f".into());
        let mut maint = host("maint", 0, vec![]);
        maint.maintenance = true;
        let mut sick = host("sick", 0, vec![]);
        sick.degraded = "fan failure".into();
        let full = host("full", 900, vec![]);
        let mut old = host("old", 0, vec![]);
        old.cpu_features = vec!["sse2".into()];
        let cases = [
            (maint, "maintenance"),
            (sick, "fan failure"),
            (full, "MiB free"),
            (old, "avx512f"),
        ];
        for (h, why) in cases {
            let s = score(&needs, &h, 0.1);
            assert_eq!(s.score, None);
            assert!(s.reasons[0].contains(why), "{:?}", s.reasons);
        }
        let mut disks = VmNeeds::of_load(&vm("db", 64));
        disks.datastores = DiskAccess::Shared(vec!["/elsewhere".into()]);
        let s = score(&disks, &host("x", 0, vec![]), 0.1);
        assert!(s.reasons[0].contains("/elsewhere"), "{:?}", s.reasons);
        disks.datastores = DiskAccess::Named(vec!["fast".into()]);
        let s = score(&disks, &host("x", 0, vec![]), 0.1);
        assert!(
            s.reasons[0].contains("no datastore fast"),
            "{:?}",
            s.reasons
        );
        let none = best(&disks, "a", &[(host("x", 0, vec![]), 0.1)]).expect_err("none fits");
        assert!(none.contains("no host can take db"), "{none}");
    }
}
