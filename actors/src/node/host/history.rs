//! The migrations a host took part in, as source or destination: their
//! reports, kept for `ferry migrate show` and `ferry migrate list`.
//!
//! Bounded: the oldest records go first once [`HISTORY_KEPT`] are held.
//! Each record is also written to the node store, and read back when the
//! node starts again.

// rkyv derives resolver twins of the types whose fields carry no docs;
// every item written here is documented.
#![allow(missing_docs)]

use std::collections::VecDeque;

use serde::Serialize;

use crate::migration::{DestReport, MigrationReport};

/// Records kept per host.
pub const HISTORY_KEPT: usize = 1000;

/// One migration as this host saw it.
#[derive(Debug, Clone, PartialEq, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct MigrationRecord {
    /// The id (unique on the source host).
    pub id: u64,
    /// The VM.
    pub vm: String,
    /// Source host.
    pub from: String,
    /// Destination host.
    pub to: String,
    /// The source's report, if this host was the source.
    pub source: Option<MigrationReport>,
    /// The destination's report, if this host was the destination.
    pub destination: Option<DestReport>,
}

/// A host's records, oldest first.
#[derive(Debug, Default)]
pub struct History {
    records: VecDeque<MigrationRecord>,
}

impl History {
    fn push(&mut self, record: MigrationRecord) -> MigrationRecord {
        if self.records.len() >= HISTORY_KEPT {
            self.records.pop_front();
        }
        self.records.push_back(record.clone());
        record
    }

    /// Takes back the records a store kept (oldest first).
    pub fn restore(&mut self, records: Vec<MigrationRecord>) {
        let skip = records.len().saturating_sub(HISTORY_KEPT);
        self.records = records.into_iter().skip(skip).collect();
    }

    /// This host sent a migration.
    pub fn source_ended(&mut self, report: &MigrationReport) -> MigrationRecord {
        self.push(MigrationRecord {
            id: report.migration_id,
            vm: report.vm.clone(),
            from: report.from.clone(),
            to: report.to.clone(),
            source: Some(report.clone()),
            destination: None,
        })
    }

    /// This host received a migration.
    pub fn destination_ended(&mut self, report: &DestReport) -> MigrationRecord {
        self.push(MigrationRecord {
            id: report.migration_id,
            vm: report.vm.clone(),
            from: report.from.clone(),
            to: report.to.clone(),
            source: None,
            destination: Some(report.clone()),
        })
    }

    /// Records of migration `id` (`None`: the `last` most recent ones, newest
    /// first).
    pub fn find(&self, id: Option<u64>, last: usize) -> Vec<MigrationRecord> {
        match id {
            Some(id) => self
                .records
                .iter()
                .filter(|r| r.id == id)
                .cloned()
                .collect(),
            None => self.records.iter().rev().take(last).cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(id: u64) -> DestReport {
        DestReport {
            migration_id: id,
            started_unix_ms: id,
            vm: format!("vm-{id}"),
            from: "a".into(),
            to: "b".into(),
            outcome: "adopted".into(),
            total_ms: 1.0,
            downtime_ms: 0.5,
            rounds: 1,
            pages_received: 1,
            bytes_received: 4096,
            phases: Vec::new(),
        }
    }

    #[test]
    fn keeps_the_newest_and_finds_by_id() {
        let mut h = History::default();
        for id in 0..(HISTORY_KEPT as u64 + 5) {
            h.destination_ended(&dest(id));
        }
        assert!(h.find(Some(2), 10).is_empty(), "the oldest went first");
        assert_eq!(h.find(Some(7), 10).len(), 1);
        let recent = h.find(None, 3);
        let ids: Vec<u64> = recent.iter().map(|r| r.id).collect();
        let newest = HISTORY_KEPT as u64 + 4;
        assert_eq!(ids, vec![newest, newest - 1, newest - 2]);
    }
}
