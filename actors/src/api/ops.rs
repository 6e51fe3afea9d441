//! Operations through the API: jobs, the audit log, placement, DRS and
//! Storage DRS,
//! maintenance mode and batches: the same requests the `ferry` commands
//! make.

use ferry_transport::Transport;
use futures::StreamExt;

use super::{ClientError, Cluster};
use crate::migration::MigrationReport;
use crate::node::client::{ClientReply, ClientRequest, MigrateOptions};
use crate::ops::audit::{AuditEntry, AuditQuery, merge};
use crate::ops::drs::{DrsPlan, plan};
use crate::ops::jobs::{Job, Priority};
use crate::ops::placement::{HostLoad, HostScore};
use crate::ops::sdrs::{DiskMove, StoragePlan, StorageRules, plan as storage_plan};

/// What one request to every node brought back: the answers, and the
/// nodes that did not answer, with why.
#[derive(Debug)]
pub struct FanOut<R> {
    /// (node, answer), in node order.
    pub answers: Vec<(String, R)>,
    /// (node, why) of each node that did not answer.
    pub silent: Vec<(String, ClientError)>,
}

impl<R> FanOut<R> {
    /// The first failure when no node answered at all (a partial answer
    /// is still an answer: show it with [`Self::silent`]).
    pub fn require_any(mut self) -> Result<Self, ClientError> {
        if self.answers.is_empty() && !self.silent.is_empty() {
            return Err(self.silent.swap_remove(0).1);
        }
        Ok(self)
    }
}

/// One line of a batch: a VM and where it goes (`auto`: placement picks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchItem {
    /// The VM.
    pub vm: String,
    /// Destination host or `auto`.
    pub to: String,
}

/// Parses a batch file: one `VM HOST` per line (`HOST` may be `auto`);
/// blank lines and `#` comments are skipped.
///
/// # Errors
/// A line without exactly two words, named by its number.
pub fn parse_batch(text: &str) -> Result<Vec<BatchItem>, String> {
    let mut items = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [vm, to] => items.push(BatchItem {
                vm: (*vm).to_owned(),
                to: (*to).to_owned(),
            }),
            _ => {
                return Err(format!(
                    "line {}: expected `VM HOST` (HOST may be auto), got {line:?}",
                    n + 1
                ));
            }
        }
    }
    if items.is_empty() {
        return Err("the batch lists no migrations".into());
    }
    Ok(items)
}

/// How one batch line ended.
#[derive(Debug)]
pub struct BatchResult {
    /// The line.
    pub item: BatchItem,
    /// The report (which may say it aborted), or why it did not run.
    pub result: Result<MigrationReport, ClientError>,
}

impl BatchResult {
    /// Whether the VM moved.
    pub fn moved(&self) -> bool {
        self.result.as_ref().is_ok_and(MigrationReport::completed)
    }
}

impl<T: Transport> Cluster<T> {
    async fn expect<R>(
        &self,
        node: &str,
        request: &ClientRequest,
        pick: impl FnOnce(ClientReply) -> Option<R>,
    ) -> Result<R, ClientError> {
        pick(self.request(node, request, None).await?)
            .ok_or_else(|| ClientError::Unexpected(node.to_owned()))
    }

    /// `node`'s jobs, oldest first.
    pub async fn jobs(&self, node: &str) -> Result<Vec<Job>, ClientError> {
        self.expect(node, &ClientRequest::Jobs, |r| match r {
            ClientReply::Jobs(j) => Some(j),
            _ => None,
        })
        .await
    }

    /// Asks every node at once with `ask`: a node that does not answer
    /// costs its timeout once, not once per node before it.
    pub async fn from_all<R, F, Fut>(&self, ask: F) -> FanOut<R>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<R, ClientError>>,
    {
        let nodes = self.node_names();
        let replies = futures::future::join_all(nodes.iter().cloned().map(ask)).await;
        let mut out = FanOut {
            answers: Vec::new(),
            silent: Vec::new(),
        };
        for (node, reply) in nodes.into_iter().zip(replies) {
            match reply {
                Ok(r) => out.answers.push((node, r)),
                Err(e) => out.silent.push((node, e)),
            }
        }
        out
    }

    /// Every answering node's jobs, and the nodes that did not answer.
    pub async fn all_jobs(&self) -> FanOut<Vec<Job>> {
        self.from_all(|node| async move { self.jobs(&node).await })
            .await
    }

    /// Calls off job `id` of `node` (a running one's migration is
    /// cancelled: the VM stays on its source).
    pub async fn cancel_job(&self, node: &str, id: u64) -> Result<(), ClientError> {
        self.expect_ok(node, &ClientRequest::CancelJob { id }).await
    }

    /// Queues a migration of `vm` to `to` (`auto`: placement picks when it
    /// starts) at `at_unix_ms` (0: now), and returns the job without
    /// waiting for it.
    pub async fn schedule_migration(
        &self,
        vm: &str,
        to: &str,
        at_unix_ms: u64,
        mut options: MigrateOptions,
    ) -> Result<(String, Job), ClientError> {
        let node = self.locate(vm).await?;
        options.at_unix_ms = at_unix_ms.max(1);
        let request = ClientRequest::Migrate {
            vm: vm.to_owned(),
            to: to.to_owned(),
            options,
        };
        let job = self
            .expect(&node, &request, |r| match r {
                ClientReply::JobQueued(j) => Some(j),
                _ => None,
            })
            .await?;
        Ok((node, job))
    }

    /// The audit logs of every node that answers, merged, oldest first.
    pub async fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>, ClientError> {
        self.audit_from_all(query).await.require_any().map(|f| {
            merge(
                f.answers.into_iter().flat_map(|(_, a)| a).collect(),
                query.limit,
            )
        })
    }

    /// Every answering node's audit entries matching `query`, and the
    /// nodes that did not answer.
    pub async fn audit_from_all(&self, query: &AuditQuery) -> FanOut<Vec<AuditEntry>> {
        self.from_all(|node| async move {
            self.expect(&node, &ClientRequest::Audit(query.clone()), |r| match r {
                ClientReply::Audit(a) => Some(a),
                _ => None,
            })
            .await
        })
        .await
    }

    /// `node`'s load.
    pub async fn host_load(&self, node: &str) -> Result<HostLoad, ClientError> {
        self.expect(node, &ClientRequest::HostLoad, |r| match r {
            ClientReply::Load(l) => Some(l),
            _ => None,
        })
        .await
    }

    /// Ranks the hosts `vm` could go to (disks moving to `datastore`;
    /// empty: they stay), best first, each with its reasons. The VM's
    /// host asks its peers, so link quality is measured from there.
    pub async fn recommend(
        &self,
        vm: &str,
        datastore: &str,
    ) -> Result<Vec<HostScore>, ClientError> {
        let node = self.locate(vm).await?;
        let request = ClientRequest::Recommend {
            vm: vm.to_owned(),
            datastore: datastore.to_owned(),
        };
        self.expect(&node, &request, |r| match r {
            ClientReply::Ranking(r) => Some(r),
            _ => None,
        })
        .await
    }

    /// Puts `host` in maintenance mode: it takes no new VMs and migrates
    /// every VM away (placement picks, budgets apply). Returns the jobs
    /// when the host is empty (or the ones that failed).
    pub async fn enter_maintenance(&self, host: &str) -> Result<Vec<Job>, ClientError> {
        self.expect(
            host,
            &ClientRequest::Maintenance { enter: true },
            |r| match r {
                ClientReply::Evacuated(j) => Some(j),
                _ => None,
            },
        )
        .await
    }

    /// Returns `host` to service.
    pub async fn exit_maintenance(&self, host: &str) -> Result<(), ClientError> {
        self.expect_ok(host, &ClientRequest::Maintenance { enter: false })
            .await
    }

    /// Reports `host` degraded (`reason`): it evacuates as in maintenance
    /// mode, and the jobs are returned when it is empty. An empty reason
    /// reports it healthy again.
    pub async fn report_degraded(&self, host: &str, reason: &str) -> Result<Vec<Job>, ClientError> {
        let request = ClientRequest::Degraded {
            reason: reason.to_owned(),
        };
        self.expect(host, &request, |r| match r {
            ClientReply::Evacuated(j) => Some(j),
            ClientReply::Ok => Some(Vec::new()),
            _ => None,
        })
        .await
    }

    /// Every node's load.
    pub async fn loads(&self) -> Result<Vec<HostLoad>, ClientError> {
        let mut loads = Vec::new();
        for node in self.node_names() {
            loads.push(self.host_load(&node).await?);
        }
        Ok(loads)
    }

    /// A DRS plan over the current loads: at most `max_moves` migrations
    /// bringing the hosts' loads within `tolerance` (0–1) of each other.
    pub async fn drs_plan(&self, tolerance: f64, max_moves: usize) -> Result<DrsPlan, ClientError> {
        Ok(plan(&self.loads().await?, tolerance, max_moves))
    }

    /// Runs a plan's moves through the scheduler at low priority, at most
    /// `parallel` at a time, and returns each result.
    pub async fn drs_apply(&self, plan: &DrsPlan, parallel: usize) -> Vec<BatchResult> {
        let items = plan
            .moves
            .iter()
            .map(|m| BatchItem {
                vm: m.vm.clone(),
                to: m.to.clone(),
            })
            .collect();
        let options = MigrateOptions {
            priority: Priority::Low,
            ..MigrateOptions::default()
        };
        self.migrate_batch(items, parallel, &options, |_| {}).await
    }

    /// Storage DRS plans: for each node (or just `node`), the disk moves
    /// among its datastores that `rules` call for (space first, then
    /// write load).
    pub async fn storage_drs_plan(
        &self,
        node: Option<&str>,
        rules: StorageRules,
    ) -> Result<Vec<StoragePlan>, ClientError> {
        let nodes = match node {
            Some(n) => vec![n.to_owned()],
            None => self.node_names(),
        };
        let mut plans = Vec::new();
        for n in nodes {
            let load = self.host_load(&n).await?;
            let disks: Vec<_> = load.vms.iter().flat_map(|v| v.disks.clone()).collect();
            plans.push(storage_plan(&n, &load.datastore_space, &disks, rules));
        }
        Ok(plans)
    }

    /// Carries out a Storage DRS plan's moves one at a time (a storage
    /// migration each, live, by mirroring), continuing past failures;
    /// `on_result` sees each as it ends.
    pub async fn storage_drs_apply(
        &self,
        plan: &StoragePlan,
        mut on_result: impl FnMut(&DiskMove, &Result<(), ClientError>),
    ) -> Vec<(DiskMove, Result<(), ClientError>)> {
        let mut results = Vec::new();
        for m in &plan.moves {
            let result = self.move_one_disk(m).await;
            on_result(m, &result);
            results.push((m.clone(), result));
        }
        results
    }

    async fn move_one_disk(&self, m: &DiskMove) -> Result<(), ClientError> {
        let vm = self.vm(&m.vm);
        // The VM's other disks stay where they are.
        let stay: Vec<(String, String)> = vm
            .disks(false)
            .await?
            .into_iter()
            .filter(|d| d.name != m.disk)
            .map(|d| (d.name, d.datastore))
            .collect();
        vm.move_storage(&m.to, crate::storage::Method::Mirror, 0, &stay, None)
            .await
            .map(|_| ())
    }

    /// Migrates each item, at most `parallel` at a time, continuing past
    /// failures; `on_result` sees each result as it comes. Results are in
    /// the order of `items`.
    pub async fn migrate_batch(
        &self,
        items: Vec<BatchItem>,
        parallel: usize,
        options: &MigrateOptions,
        mut on_result: impl FnMut(&BatchResult),
    ) -> Vec<BatchResult> {
        let runs = items.into_iter().enumerate().map(|(i, item)| async move {
            let run = self
                .vm(&item.vm)
                .migrate_to(&item.to)
                .options(options.clone());
            let result = run.await;
            (i, BatchResult { item, result })
        });
        let mut done: Vec<(usize, BatchResult)> = Vec::new();
        let mut stream = futures::stream::iter(runs).buffer_unordered(parallel.max(1));
        while let Some((i, r)) = stream.next().await {
            on_result(&r);
            done.push((i, r));
        }
        done.sort_by_key(|(i, _)| *i);
        done.into_iter().map(|(_, r)| r).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_file_is_one_vm_and_host_per_line() {
        let items = parse_batch("# evening moves\nweb-1 host-b\n\n db-1  auto  # placement\n")
            .expect("valid");
        assert_eq!(
            items,
            vec![
                BatchItem {
                    vm: "web-1".into(),
                    to: "host-b".into()
                },
                BatchItem {
                    vm: "db-1".into(),
                    to: "auto".into()
                },
            ]
        );
        let bad = parse_batch("web-1\n").expect_err("one word");
        assert!(bad.contains("line 1"), "{bad}");
        assert!(parse_batch("# nothing\n").is_err());
    }
}
