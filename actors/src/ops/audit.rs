//! The audit log: every request a node served and how it ended, and every
//! job it ran without anyone present.

// rkyv derives resolver twins of the types whose fields carry no docs;
// every item written here is documented.
#![allow(missing_docs)]

use serde::Serialize;

/// One audited request.
#[derive(
    Debug, Clone, Default, PartialEq, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct AuditEntry {
    /// When it arrived (ms since the epoch).
    pub at_unix_ms: u64,
    /// The node that served it.
    pub node: String,
    /// Who asked: certificate subject (`CN=…,OU=role,O=ferry`), or
    /// `scheduler (for …)` for a job run later.
    pub who: String,
    /// What, in words (`migrate`, `vm create`, …).
    pub action: String,
    /// The VM it concerned (empty: none).
    pub vm: String,
    /// Source host of a migration (or the node).
    pub from: String,
    /// Destination host or datastore (empty: none).
    pub to: String,
    /// How long it took, ms.
    pub duration_ms: u64,
    /// A migration's downtime, ms.
    pub downtime_ms: Option<f64>,
    /// `ok`, `refused` (not allowed), `failed`, `aborted`, `queued`.
    pub outcome: String,
    /// The error or other detail.
    pub detail: String,
    /// Whether the request only read.
    pub read: bool,
}

/// Which entries to return.
#[derive(
    Debug, Clone, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct AuditQuery {
    /// Only this VM's.
    pub vm: Option<String>,
    /// Only entries at or after this time (ms since the epoch).
    pub since_unix_ms: u64,
    /// At most this many, the newest (0: no limit).
    pub limit: u32,
    /// Include requests that only read.
    pub reads: bool,
}

impl AuditQuery {
    /// Whether `e` is wanted.
    pub fn matches(&self, e: &AuditEntry) -> bool {
        e.at_unix_ms >= self.since_unix_ms
            && self.vm.as_ref().is_none_or(|vm| &e.vm == vm)
            && (self.reads || !e.read)
    }
}

/// Entries of many nodes merged: oldest first, and the newest `limit`.
pub fn merge(mut entries: Vec<AuditEntry>, limit: u32) -> Vec<AuditEntry> {
    entries.sort_by(|a, b| a.at_unix_ms.cmp(&b.at_unix_ms).then(a.node.cmp(&b.node)));
    if limit > 0 && entries.len() > limit as usize {
        entries.drain(..entries.len() - limit as usize);
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(at: u64, node: &str, vm: &str) -> AuditEntry {
        AuditEntry {
            at_unix_ms: at,
            node: node.into(),
            who: "CN=ops".into(),
            action: "migrate".into(),
            vm: vm.into(),
            from: node.into(),
            to: String::new(),
            duration_ms: 1,
            downtime_ms: None,
            outcome: "ok".into(),
            detail: String::new(),
            read: false,
        }
    }

    #[test]
    fn a_query_filters_by_vm_and_time() {
        let q = AuditQuery {
            vm: Some("web".into()),
            since_unix_ms: 10,
            limit: 0,
            reads: false,
        };
        let mut read = entry(11, "a", "web");
        read.read = true;
        assert!(!q.matches(&read));
        assert!(
            AuditQuery {
                reads: true,
                ..q.clone()
            }
            .matches(&read)
        );
        assert!(q.matches(&entry(10, "a", "web")));
        assert!(!q.matches(&entry(9, "a", "web")));
        assert!(!q.matches(&entry(11, "a", "db")));
        assert!(AuditQuery::default().matches(&entry(0, "a", "")));
    }

    #[test]
    fn merging_orders_by_time_and_keeps_the_newest() {
        let merged = merge(
            vec![entry(3, "b", "x"), entry(1, "a", "x"), entry(2, "a", "x")],
            2,
        );
        let times: Vec<u64> = merged.iter().map(|e| e.at_unix_ms).collect();
        assert_eq!(times, vec![2, 3]);
    }
}
