//! Storage DRS: proposes moves of VMs' disks between the datastores of
//! one host, as vSphere's Storage DRS does within a datastore cluster.
//!
//! Two rules, in order:
//! 1. **Space.** A datastore filled past `fill_max` (e.g. 0.8) sends
//!    disks to the datastore with the most room, largest disk first,
//!    until it is under the line (a move never pushes the receiver over
//!    it).
//! 2. **I/O.** When one datastore takes more than `io_tolerance` of the
//!    host's disk writes beyond an even share, the busiest disk whose
//!    move evens the spread out most goes to the least busy datastore
//!    (space allowing).
//!
//! Datastores in the same location (shared storage seen under two names)
//! count as one: moving between them changes nothing.

// rkyv derives resolver twins of the types whose fields carry no docs;
// every item written here is documented.
#![allow(missing_docs)]

use serde::Serialize;

/// One disk as a host's load shows it.
#[derive(
    Debug, Clone, PartialEq, Eq, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct DiskLoad {
    /// Its VM.
    pub vm: String,
    /// Disk name.
    pub name: String,
    /// Datastore it is on.
    pub datastore: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// Guest writes per second lately.
    pub writes_per_s: u32,
    /// Why the guest's writes to it fail, while they do (empty: they
    /// do not).
    #[serde(default)]
    pub failing: String,
}

/// One datastore's space.
#[derive(
    Debug, Clone, PartialEq, Eq, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct DatastoreSpace {
    /// Name.
    pub name: String,
    /// Where it really is (equal locations are one store).
    pub location: String,
    /// Bytes in use.
    pub used_bytes: u64,
    /// Bytes it holds in all.
    pub capacity_bytes: u64,
}

impl DatastoreSpace {
    /// Share in use, 0–1.
    pub fn fill(&self) -> f64 {
        if self.capacity_bytes == 0 {
            1.0
        } else {
            self.used_bytes as f64 / self.capacity_bytes as f64
        }
    }
}

/// One proposed disk move.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiskMove {
    /// The VM.
    pub vm: String,
    /// The disk.
    pub disk: String,
    /// From datastore.
    pub from: String,
    /// To datastore.
    pub to: String,
    /// Why, in words.
    pub reason: String,
}

/// A Storage DRS plan for one host.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoragePlan {
    /// The host.
    pub host: String,
    /// The moves, in order.
    pub moves: Vec<DiskMove>,
    /// Each datastore after the moves: (name, fill 0–1, share of the
    /// writes 0–1).
    pub after: Vec<(String, f64, f64)>,
}

/// What Storage DRS aims for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StorageRules {
    /// Fill above which a datastore sheds disks (0–1).
    pub fill_max: f64,
    /// Write share above an even share that counts as imbalance (0–1).
    pub io_tolerance: f64,
    /// Most moves in one plan.
    pub max_moves: usize,
}

impl Default for StorageRules {
    fn default() -> Self {
        Self {
            fill_max: 0.8,
            io_tolerance: 0.2,
            max_moves: 8,
        }
    }
}

struct Store {
    name: String,
    used: u64,
    capacity: u64,
    writes: u64,
}

impl Store {
    fn fill_with(&self, extra: u64) -> f64 {
        if self.capacity == 0 {
            1.0
        } else {
            (self.used + extra) as f64 / self.capacity as f64
        }
    }
}

/// Plans moves among `host`'s `datastores` for its `disks`.
pub fn plan(
    host: &str,
    datastores: &[DatastoreSpace],
    disks: &[DiskLoad],
    rules: StorageRules,
) -> StoragePlan {
    // One entry per location, named by its first datastore.
    let mut stores: Vec<Store> = Vec::new();
    let mut locations: Vec<&str> = Vec::new();
    let mut alias: Vec<(String, usize)> = Vec::new();
    for d in datastores {
        let i = match locations.iter().position(|l| *l == d.location) {
            Some(i) => i,
            None => {
                stores.push(Store {
                    name: d.name.clone(),
                    used: d.used_bytes,
                    capacity: d.capacity_bytes,
                    writes: 0,
                });
                locations.push(&d.location);
                stores.len() - 1
            }
        };
        alias.push((d.name.clone(), i));
    }
    let index = |ds: &str| alias.iter().find(|(n, _)| n == ds).map(|(_, i)| *i);
    let mut placed: Vec<(DiskLoad, usize)> = disks
        .iter()
        .filter_map(|d| index(&d.datastore).map(|i| (d.clone(), i)))
        .collect();
    for (d, i) in &placed {
        stores[*i].writes += u64::from(d.writes_per_s);
    }
    let mut moves = Vec::new();
    if stores.len() >= 2 {
        shed_space(&mut stores, &mut placed, rules, &mut moves);
        even_io(&mut stores, &mut placed, rules, &mut moves);
    }
    let total_writes: u64 = stores.iter().map(|s| s.writes).sum();
    StoragePlan {
        host: host.to_owned(),
        moves,
        after: stores
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    s.fill_with(0),
                    share(s.writes, total_writes),
                )
            })
            .collect(),
    }
}

fn share(part: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        part as f64 / total as f64
    }
}

fn apply(stores: &mut [Store], placed: &mut [(DiskLoad, usize)], disk: usize, to: usize) {
    let (d, from) = (&placed[disk].0, placed[disk].1);
    stores[from].used = stores[from].used.saturating_sub(d.bytes);
    stores[from].writes = stores[from]
        .writes
        .saturating_sub(u64::from(d.writes_per_s));
    stores[to].used += d.bytes;
    stores[to].writes += u64::from(d.writes_per_s);
    placed[disk].1 = to;
}

fn shed_space(
    stores: &mut [Store],
    placed: &mut [(DiskLoad, usize)],
    rules: StorageRules,
    moves: &mut Vec<DiskMove>,
) {
    while moves.len() < rules.max_moves {
        let Some(full) = (0..stores.len())
            .filter(|i| stores[*i].fill_with(0) > rules.fill_max)
            .max_by(|a, b| stores[*a].fill_with(0).total_cmp(&stores[*b].fill_with(0)))
        else {
            return;
        };
        // The largest disk on it that fits under the line elsewhere, to
        // the datastore with the most room.
        let mut candidates: Vec<usize> =
            (0..placed.len()).filter(|i| placed[*i].1 == full).collect();
        candidates.sort_by_key(|i| std::cmp::Reverse(placed[*i].0.bytes));
        let choice = candidates.into_iter().find_map(|disk| {
            let bytes = placed[disk].0.bytes;
            (0..stores.len())
                .filter(|to| *to != full && stores[*to].fill_with(bytes) <= rules.fill_max)
                .min_by(|a, b| {
                    stores[*a]
                        .fill_with(bytes)
                        .total_cmp(&stores[*b].fill_with(bytes))
                })
                .map(|to| (disk, to))
        });
        let Some((disk, to)) = choice else {
            return;
        };
        let reason = format!(
            "{} is {:.0}% full (line {:.0}%); {} goes to {} ({:.0}% after)",
            stores[full].name,
            stores[full].fill_with(0) * 100.0,
            rules.fill_max * 100.0,
            placed[disk].0.name,
            stores[to].name,
            stores[to].fill_with(placed[disk].0.bytes) * 100.0
        );
        moves.push(DiskMove {
            vm: placed[disk].0.vm.clone(),
            disk: placed[disk].0.name.clone(),
            from: stores[full].name.clone(),
            to: stores[to].name.clone(),
            reason,
        });
        apply(stores, placed, disk, to);
    }
}

/// The write share above an even share of the busiest store.
fn io_excess(stores: &[Store]) -> f64 {
    let total: u64 = stores.iter().map(|s| s.writes).sum();
    let even = 1.0 / stores.len() as f64;
    stores
        .iter()
        .map(|s| share(s.writes, total) - even)
        .fold(0.0, f64::max)
}

fn even_io(
    stores: &mut [Store],
    placed: &mut [(DiskLoad, usize)],
    rules: StorageRules,
    moves: &mut Vec<DiskMove>,
) {
    while moves.len() < rules.max_moves {
        let now = io_excess(stores);
        if now <= rules.io_tolerance {
            return;
        }
        let mut best: Option<(f64, usize, usize)> = None;
        for disk in 0..placed.len() {
            let (d, from) = (&placed[disk].0, placed[disk].1);
            if d.writes_per_s == 0 {
                continue;
            }
            for to in 0..stores.len() {
                if to == from || stores[to].fill_with(d.bytes) > rules.fill_max {
                    continue;
                }
                let mut trial: Vec<Store> = stores
                    .iter()
                    .map(|s| Store {
                        name: String::new(),
                        used: s.used,
                        capacity: s.capacity,
                        writes: s.writes,
                    })
                    .collect();
                let mut trial_placed = placed.to_vec();
                apply(&mut trial, &mut trial_placed, disk, to);
                let after = io_excess(&trial);
                if after < now - 1e-9 && best.is_none_or(|b| after < b.0) {
                    best = Some((after, disk, to));
                }
            }
        }
        let Some((after, disk, to)) = best else {
            return;
        };
        let from = placed[disk].1;
        let total: u64 = stores.iter().map(|s| s.writes).sum();
        let reason = format!(
            "{} takes {:.0}% of the writes; {} ({} writes/s) goes to {}: the busiest share {:.0} -> {:.0} points over even",
            stores[from].name,
            share(stores[from].writes, total) * 100.0,
            placed[disk].0.name,
            placed[disk].0.writes_per_s,
            stores[to].name,
            now * 100.0,
            after * 100.0
        );
        moves.push(DiskMove {
            vm: placed[disk].0.vm.clone(),
            disk: placed[disk].0.name.clone(),
            from: stores[from].name.clone(),
            to: stores[to].name.clone(),
            reason,
        });
        apply(stores, placed, disk, to);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn ds(name: &str, location: &str, used_gib: u64, capacity_gib: u64) -> DatastoreSpace {
        DatastoreSpace {
            name: name.into(),
            location: location.into(),
            used_bytes: used_gib * GIB,
            capacity_bytes: capacity_gib * GIB,
        }
    }

    fn disk(vm: &str, datastore: &str, gib: u64, writes_per_s: u32) -> DiskLoad {
        DiskLoad {
            vm: vm.into(),
            name: format!("{vm}-disk0"),
            datastore: datastore.into(),
            bytes: gib * GIB,
            writes_per_s,
            failing: String::new(),
        }
    }

    #[test]
    fn a_full_datastore_sheds_its_largest_disk_to_the_emptiest() {
        let stores = [
            ds("local", "h1", 90, 100),
            ds("archive", "h1-archive", 10, 100),
            ds("fast", "h1-fast", 50, 100),
        ];
        let disks = [
            disk("a", "local", 30, 0),
            disk("b", "local", 20, 0),
            disk("c", "local", 40, 0),
        ];
        let p = plan("h1", &stores, &disks, StorageRules::default());
        assert_eq!(p.moves.len(), 1, "{p:#?}");
        assert_eq!(
            (p.moves[0].vm.as_str(), p.moves[0].to.as_str()),
            ("c", "archive")
        );
        assert!(
            p.moves[0].reason.contains("90% full"),
            "{}",
            p.moves[0].reason
        );
        for (name, fill, _) in &p.after {
            assert!(*fill <= 0.8, "{name} at {fill}");
        }
    }

    #[test]
    fn no_move_pushes_another_datastore_over_the_line() {
        let stores = [ds("local", "h1", 95, 100), ds("archive", "h1-a", 75, 100)];
        let disks = [disk("a", "local", 10, 0)];
        let p = plan("h1", &stores, &disks, StorageRules::default());
        assert!(p.moves.is_empty(), "{p:#?}");
    }

    #[test]
    fn writes_are_spread_when_one_datastore_takes_most() {
        let stores = [ds("local", "h1", 30, 100), ds("archive", "h1-a", 10, 100)];
        let disks = [
            disk("db", "local", 10, 900),
            disk("web", "local", 10, 600),
            disk("log", "local", 10, 100),
        ];
        let p = plan("h1", &stores, &disks, StorageRules::default());
        assert_eq!(p.moves.len(), 1, "{p:#?}");
        let m = &p.moves[0];
        assert_eq!((m.vm.as_str(), m.to.as_str()), ("db", "archive"), "{m:?}");
        let shares: Vec<f64> = p.after.iter().map(|a| a.2).collect();
        assert!(shares.iter().all(|s| (s - 0.5).abs() <= 0.2), "{shares:?}");
    }

    #[test]
    fn names_of_one_location_are_one_datastore() {
        // `shared` and `san` are the same storage: nothing to even out.
        let stores = [ds("shared", "san", 95, 100), ds("san", "san", 95, 100)];
        let disks = [disk("a", "shared", 10, 500), disk("b", "san", 10, 0)];
        let p = plan("h1", &stores, &disks, StorageRules::default());
        assert!(p.moves.is_empty(), "{p:#?}");
        assert_eq!(p.after.len(), 1);
    }

    #[test]
    fn a_balanced_host_is_left_alone() {
        let stores = [ds("local", "h1", 40, 100), ds("archive", "h1-a", 40, 100)];
        let disks = [disk("a", "local", 10, 300), disk("b", "archive", 10, 280)];
        let p = plan("h1", &stores, &disks, StorageRules::default());
        assert!(p.moves.is_empty(), "{p:#?}");
    }
}
