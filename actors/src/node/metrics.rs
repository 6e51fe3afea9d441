//! A node's migration metrics: counters and histograms read by
//! `ferry node stats`, mirrored into OpenTelemetry instruments (exported
//! when the process installs a meter provider; no-ops otherwise).

// rkyv derives resolver twins of the types whose fields carry no docs;
// every item written here is documented.
#![allow(missing_docs)]

use std::collections::BTreeMap;
use std::sync::Mutex;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};
use serde::Serialize;

use crate::migration::{DestReport, MigrationReport, Outcome, Progress};

/// Upper bounds of the downtime histogram's buckets, in milliseconds (a
/// last bucket takes the rest).
pub const DOWNTIME_BUCKETS_MS: [f64; 10] =
    [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];

/// Upper bounds of the pages-per-round histogram's buckets.
pub const ROUND_PAGES_BUCKETS: [f64; 6] = [0.0, 1e2, 1e3, 1e4, 1e5, 1e6];

/// A histogram with fixed buckets.
#[derive(Debug, Clone, PartialEq, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Buckets {
    /// Upper bounds (inclusive); `counts` has one more entry, for the rest.
    pub bounds: Vec<f64>,
    /// Observations per bucket.
    pub counts: Vec<u64>,
    /// Observations.
    pub count: u64,
    /// Their sum.
    pub sum: f64,
}

impl Buckets {
    fn new(bounds: &[f64]) -> Self {
        Self {
            bounds: bounds.to_vec(),
            counts: vec![0; bounds.len() + 1],
            count: 0,
            sum: 0.0,
        }
    }

    fn observe(&mut self, value: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.count += 1;
        self.sum += value;
    }

    /// The bucket bound under which `q` (0..=1) of the observations fall
    /// (`None`: empty, or beyond the last bound).
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
        #[allow(clippy::cast_sign_loss)]
        let rank = ((q * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return self.bounds.get(i).copied();
            }
        }
        None
    }
}

/// A migration this node is sending now.
#[derive(Debug, Clone, PartialEq, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct ActiveMigration {
    /// Its id (as `ferry migrate show` takes it).
    pub id: String,
    /// The VM.
    pub vm: String,
    /// Destination host.
    pub to: String,
    /// Where it stands.
    pub progress: Progress,
}

/// What `ferry node stats` shows.
#[derive(Debug, Clone, PartialEq, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct NodeStats {
    /// The host.
    pub host: String,
    /// Outgoing migrations started.
    pub started: u64,
    /// Outgoing migrations that completed.
    pub succeeded: u64,
    /// Outgoing migrations that aborted (the VM stayed here).
    pub aborted: u64,
    /// Outgoing migrations that ended in doubt.
    pub in_doubt: u64,
    /// Incoming migrations adopted here.
    pub incoming_adopted: u64,
    /// Incoming migrations whose shadow was discarded.
    pub incoming_discarded: u64,
    /// Memory bytes sent by finished outgoing migrations.
    pub bytes_sent: u64,
    /// Memory bytes received by finished incoming migrations.
    pub bytes_received: u64,
    /// Disk bytes copied by finished migrations and storage moves.
    pub disk_bytes_copied: u64,
    /// Downtime of completed live migrations, in milliseconds.
    pub downtime_ms: Buckets,
    /// Pages per pre-copy round.
    pub round_pages: Buckets,
    /// Sum of the measured bandwidth of the migrations running now, bytes
    /// per second.
    pub throughput_bytes_per_s: f64,
    /// The migrations running now.
    pub active: Vec<ActiveMigration>,
}

struct Instruments {
    started: Counter<u64>,
    ended: Counter<u64>,
    bytes: Counter<u64>,
    downtime: Histogram<f64>,
    round_pages: Histogram<u64>,
}

impl Instruments {
    fn new() -> Self {
        let meter = opentelemetry::global::meter("ferry");
        Self {
            started: meter
                .u64_counter("ferry.migrations.started")
                .with_description("outgoing migrations started")
                .build(),
            ended: meter
                .u64_counter("ferry.migrations.ended")
                .with_description("migrations ended, by side and outcome")
                .build(),
            bytes: meter
                .u64_counter("ferry.migration.bytes")
                .with_unit("By")
                .with_description("memory and disk bytes moved, by direction")
                .build(),
            downtime: meter
                .f64_histogram("ferry.migration.downtime")
                .with_unit("ms")
                .with_boundaries(DOWNTIME_BUCKETS_MS.to_vec())
                .build(),
            round_pages: meter
                .u64_histogram("ferry.migration.round.pages")
                .with_boundaries(ROUND_PAGES_BUCKETS.to_vec())
                .build(),
        }
    }
}

/// One node's metrics.
pub struct NodeMetrics {
    host: String,
    stats: Mutex<NodeStats>,
    active: Mutex<BTreeMap<u64, ActiveMigration>>,
    otel: Instruments,
}

impl NodeMetrics {
    /// Metrics of host `host`.
    pub fn new(host: &str) -> Self {
        Self {
            host: host.to_owned(),
            stats: Mutex::new(NodeStats {
                host: host.to_owned(),
                started: 0,
                succeeded: 0,
                aborted: 0,
                in_doubt: 0,
                incoming_adopted: 0,
                incoming_discarded: 0,
                bytes_sent: 0,
                bytes_received: 0,
                disk_bytes_copied: 0,
                downtime_ms: Buckets::new(&DOWNTIME_BUCKETS_MS),
                round_pages: Buckets::new(&ROUND_PAGES_BUCKETS),
                throughput_bytes_per_s: 0.0,
                active: Vec::new(),
            }),
            active: Mutex::new(BTreeMap::new()),
            otel: Instruments::new(),
        }
    }

    fn attrs(&self, extra: &[(&'static str, &'static str)]) -> Vec<KeyValue> {
        let mut v = vec![KeyValue::new("host", self.host.clone())];
        v.extend(extra.iter().map(|(k, val)| KeyValue::new(*k, *val)));
        v
    }

    fn with<R>(&self, f: impl FnOnce(&mut NodeStats) -> R) -> R {
        f(&mut self
            .stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// An outgoing migration started.
    pub fn started(&self, id: u64, vm: &str, to: &str, progress: Progress) {
        self.with(|s| s.started += 1);
        self.otel.started.add(1, &self.attrs(&[]));
        self.progress(id, vm, to, progress);
    }

    /// Where an outgoing migration stands.
    pub fn progress(&self, id: u64, vm: &str, to: &str, progress: Progress) {
        let mut active = self
            .active
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        active.insert(
            id,
            ActiveMigration {
                id: crate::migration::report::show_id(id),
                vm: vm.to_owned(),
                to: to.to_owned(),
                progress,
            },
        );
    }

    /// An outgoing migration ended.
    pub fn source_ended(&self, report: &MigrationReport) {
        self.active
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&report.migration_id);
        let outcome = match report.outcome {
            Outcome::Completed => "completed",
            Outcome::Aborted { .. } => "aborted",
            Outcome::InDoubt { .. } => "in_doubt",
        };
        let disk_bytes: u64 = report.disks.iter().map(|d| d.copied_bytes).sum();
        self.with(|s| {
            match report.outcome {
                Outcome::Completed => s.succeeded += 1,
                Outcome::Aborted { .. } => s.aborted += 1,
                Outcome::InDoubt { .. } => s.in_doubt += 1,
            }
            s.bytes_sent += report.bytes_sent;
            s.disk_bytes_copied += disk_bytes;
            if report.completed() && !report.cold {
                s.downtime_ms.observe(report.downtime_ms);
            }
            #[allow(clippy::cast_precision_loss)]
            for r in &report.round_log {
                s.round_pages.observe(r.pages as f64);
            }
        });
        let o = &self.otel;
        o.ended
            .add(1, &self.attrs(&[("side", "source"), ("outcome", outcome)]));
        o.bytes.add(
            report.bytes_sent,
            &self.attrs(&[("direction", "sent"), ("kind", "memory")]),
        );
        o.bytes.add(
            disk_bytes,
            &self.attrs(&[("direction", "sent"), ("kind", "disk")]),
        );
        if report.completed() && !report.cold {
            o.downtime.record(report.downtime_ms, &self.attrs(&[]));
        }
        for r in &report.round_log {
            o.round_pages.record(r.pages, &self.attrs(&[]));
        }
    }

    /// An incoming migration ended.
    pub fn destination_ended(&self, report: &DestReport) {
        let adopted = report.outcome == "adopted";
        self.with(|s| {
            if adopted {
                s.incoming_adopted += 1;
            } else {
                s.incoming_discarded += 1;
            }
            s.bytes_received += report.bytes_received;
        });
        let outcome = if adopted { "adopted" } else { "discarded" };
        self.otel.ended.add(
            1,
            &self.attrs(&[("side", "destination"), ("outcome", outcome)]),
        );
        self.otel.bytes.add(
            report.bytes_received,
            &self.attrs(&[("direction", "received"), ("kind", "memory")]),
        );
    }

    /// A storage move on this host copied `bytes`.
    pub fn disk_copied(&self, bytes: u64) {
        self.with(|s| s.disk_bytes_copied += bytes);
        self.otel.bytes.add(
            bytes,
            &self.attrs(&[("direction", "local"), ("kind", "disk")]),
        );
    }

    /// The figures now.
    pub fn snapshot(&self) -> NodeStats {
        let active: Vec<ActiveMigration> = self
            .active
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        self.with(|s| {
            let mut out = s.clone();
            out.throughput_bytes_per_s = active.iter().map(|a| a.progress.rate_bytes_per_s).sum();
            out.active = active;
            out
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_count_and_bound_quantiles() {
        let mut b = Buckets::new(&DOWNTIME_BUCKETS_MS);
        for v in [0.5, 3.0, 3.0, 15.0, 5000.0] {
            b.observe(v);
        }
        assert_eq!(b.count, 5);
        assert_eq!(b.counts[0], 1);
        assert_eq!(b.counts[2], 2, "3 ms falls under 5 ms");
        assert_eq!(b.counts[4], 1);
        assert_eq!(*b.counts.last().expect("overflow bucket"), 1);
        assert_eq!(b.quantile_bound(0.5), Some(5.0));
        assert_eq!(b.quantile_bound(0.8), Some(20.0));
        assert_eq!(b.quantile_bound(1.0), None, "beyond the last bound");
        assert!((b.sum - 5021.5).abs() < 1e-9);
    }
}
