//! The scenarios the sweeps run, by name: the seed tests
//! (`tests/sweep.rs`) and the sweep command (`cargo run --release -p
//! ferry-sim --bin sweep`) take them from here.

use std::time::Duration;

use ferry_actors::node::client::MigrateOptions;

use crate::net::LinkParams;
use crate::scenario::{Faults, Scenario};

fn options() -> MigrateOptions {
    MigrateOptions {
        downtime_ms: 5,
        time_limit_s: 20,
        auto_converge: true,
        lanes: 2,
        verify_memory: true,
        cold: false,
        ..MigrateOptions::default()
    }
}

/// The calm scenario every other one starts from.
pub fn base(name: &'static str) -> Scenario {
    Scenario {
        name,
        hosts: 4,
        host_memory_mib: 256,
        vms: 8,
        vm_memory_mib: 8,
        wss_mib_max: 2,
        migrations: 12,
        horizon: Duration::from_secs(2),
        link: LinkParams {
            bandwidth_bytes_per_s: 100e6,
            latency: Duration::from_micros(500),
        },
        faults: Faults::NONE,
        options: options(),
        disk_mib: 0,
        durable: false,
    }
}

/// Connections cut and links clogged.
pub fn cuts() -> Scenario {
    Scenario {
        faults: Faults {
            cuts_per_s: 4.0,
            partitions_per_s: 0.0,
            partition_max: Duration::ZERO,
            clogs_per_s: 4.0,
            ..Faults::NONE
        },
        ..base("cuts")
    }
}

/// Partitions that heal.
pub fn partitions() -> Scenario {
    Scenario {
        faults: Faults {
            cuts_per_s: 0.0,
            partitions_per_s: 3.0,
            partition_max: Duration::from_millis(800),
            clogs_per_s: 0.0,
            ..Faults::NONE
        },
        ..base("partitions")
    }
}

/// Hosts hold about three VMs each: many offers meet a full host.
pub fn full() -> Scenario {
    Scenario {
        host_memory_mib: 26,
        vms: 10,
        migrations: 16,
        ..base("full")
    }
}

/// 150 ms round trips: a cut often lands between the source's release
/// and the destination's answer.
pub fn long_distance() -> Scenario {
    Scenario {
        link: LinkParams {
            bandwidth_bytes_per_s: 50e6,
            latency: Duration::from_millis(75),
        },
        horizon: Duration::from_secs(4),
        faults: Faults {
            cuts_per_s: 3.0,
            partitions_per_s: 1.0,
            partition_max: Duration::from_secs(1),
            clogs_per_s: 0.0,
            ..Faults::NONE
        },
        options: MigrateOptions {
            downtime_ms: 200,
            ..options()
        },
        ..base("long-distance")
    }
}

/// A hundred hosts, a thousand VMs.
pub fn scale() -> Scenario {
    Scenario {
        hosts: 100,
        host_memory_mib: 64,
        vms: 1000,
        vm_memory_mib: 2,
        wss_mib_max: 0,
        migrations: 400,
        horizon: Duration::from_secs(1),
        link: LinkParams {
            bandwidth_bytes_per_s: 1e9,
            latency: Duration::from_micros(200),
        },
        faults: Faults {
            cuts_per_s: 20.0,
            partitions_per_s: 5.0,
            partition_max: Duration::from_millis(300),
            clogs_per_s: 10.0,
            ..Faults::NONE
        },
        ..base("scale")
    }
}

/// Hosts crash and come back empty; the clock jumps.
pub fn crashes() -> Scenario {
    Scenario {
        faults: Faults {
            cuts_per_s: 1.0,
            crashes_per_s: 2.0,
            down_max: Duration::from_millis(700),
            jumps_per_s: 1.0,
            jump_max: Duration::from_secs(3),
            ..Faults::NONE
        },
        horizon: Duration::from_secs(3),
        ..base("crashes")
    }
}

/// VMs with disks move with their storage through cuts and partitions.
pub fn storage() -> Scenario {
    Scenario {
        vms: 6,
        migrations: 8,
        disk_mib: 2,
        faults: Faults {
            cuts_per_s: 2.0,
            partitions_per_s: 1.0,
            partition_max: Duration::from_millis(500),
            clogs_per_s: 2.0,
            ..Faults::NONE
        },
        ..base("storage")
    }
}

/// VMs with disks move while hosts crash.
pub fn storage_crashes() -> Scenario {
    Scenario {
        vms: 6,
        migrations: 8,
        disk_mib: 2,
        faults: Faults {
            crashes_per_s: 0.5,
            down_max: Duration::from_millis(500),
            ..Faults::NONE
        },
        ..base("storage-crashes")
    }
}

/// Hosts crash and come back with their database.
pub fn durable_crashes() -> Scenario {
    Scenario {
        faults: Faults {
            cuts_per_s: 1.0,
            crashes_per_s: 1.5,
            down_max: Duration::from_millis(700),
            ..Faults::NONE
        },
        horizon: Duration::from_secs(3),
        durable: true,
        ..base("durable-crashes")
    }
}

/// Durable hosts whose node stores fail writes for a while (a full
/// disk), besides cuts and crashes: a node acknowledges nothing it did not
/// store and takes no migration while it cannot.
pub fn failing_stores() -> Scenario {
    Scenario {
        faults: Faults {
            cuts_per_s: 0.5,
            crashes_per_s: 0.7,
            down_max: Duration::from_millis(700),
            store_failures_per_s: 1.5,
            store_failure_max: Duration::from_millis(800),
            ..Faults::NONE
        },
        horizon: Duration::from_secs(3),
        durable: true,
        ..base("failing-stores")
    }
}

/// A lossy, bursty network: every chunk late by up to 3 ms (lost packets
/// retransmitted, so streams overtake each other), delay spikes of 50–500
/// ms, and cuts.
pub fn lossy() -> Scenario {
    Scenario {
        faults: Faults {
            cuts_per_s: 0.5,
            spikes_per_s: 1.0,
            spike_max: Duration::from_secs(2),
            jitter_max: Duration::from_millis(3),
            ..Faults::NONE
        },
        horizon: Duration::from_secs(3),
        ..base("lossy")
    }
}

/// Silent failures: one-way partitions and black holes (no error, packets
/// just vanish) of up to 15 s, past the transport's idle timeout, with
/// durable hosts that crash.
pub fn black_holes() -> Scenario {
    Scenario {
        faults: Faults {
            one_way_per_s: 0.7,
            black_holes_per_s: 0.5,
            silence_max: Duration::from_secs(15),
            crashes_per_s: 0.3,
            down_max: Duration::from_millis(700),
            ..Faults::NONE
        },
        horizon: Duration::from_secs(4),
        durable: true,
        ..base("black-holes")
    }
}

/// Faults aimed at the protocol's steps (shadow boot, source pause, state
/// save, state restore, destination resume): either host crashes, or the
/// link is cut or goes silent, the moment a migration gets there. Durable
/// hosts.
pub fn aimed() -> Scenario {
    Scenario {
        faults: Faults {
            aimed_per_s: 2.0,
            down_max: Duration::from_millis(700),
            ..Faults::NONE
        },
        horizon: Duration::from_secs(3),
        durable: true,
        ..base("aimed")
    }
}

/// [`aimed`] with disks moving along (every method), their workload's
/// acknowledged writes watched from outside ([`crate::witness`]).
pub fn aimed_disks() -> Scenario {
    Scenario {
        disk_mib: 2,
        ..aimed()
    }
    .named("aimed-disks")
}

/// Every scenario the sweep runs by default (the scale one is slow: it
/// runs when named).
pub fn all() -> Vec<Scenario> {
    vec![
        base("calm"),
        cuts(),
        partitions(),
        full(),
        long_distance(),
        crashes(),
        storage(),
        storage_crashes(),
        durable_crashes(),
        failing_stores(),
        lossy(),
        black_holes(),
        aimed(),
        aimed_disks(),
    ]
}

/// A scenario by name (`scale` included).
pub fn named(name: &str) -> Option<Scenario> {
    all().into_iter().chain([scale()]).find(|s| s.name == name)
}
