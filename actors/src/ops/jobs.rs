//! The job queue: migrations waiting for their time and for a slot.
//!
//! Sans-IO: the scheduler actor ([`crate::node::scheduler`]) feeds it the
//! wall-clock time and each job's [`Footprint`]; the queue says which job
//! may start. A job starts when it is due (`not_before_unix_ms`), it is the
//! highest-priority due job whose footprint fits, and every budget it
//! touches has a free slot:
//!
//! - per host: live migrations (default 8) and storage migrations
//!   (default 2) leaving this host at once, as vSphere limits them;
//! - per datastore: storage migrations touching it (default 8);
//! - per link (destination host): migrations sharing it (default 4).

// rkyv derives resolver twins of the types whose fields carry no docs;
// every item written here is documented.
#![allow(missing_docs)]

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::node::client::MigrateOptions;

/// How urgent a job is: higher ones take free slots first.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Default,
    Serialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub enum Priority {
    /// After everything else (DRS moves).
    Low,
    /// The default.
    #[default]
    Normal,
    /// Before everything else (evacuations an operator waits on).
    High,
}

impl std::str::FromStr for Priority {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "low" => Ok(Self::Low),
            "normal" => Ok(Self::Normal),
            "high" => Ok(Self::High),
            other => Err(format!("unknown priority {other:?} (high, normal, low)")),
        }
    }
}

impl std::fmt::Display for Priority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Low => "low",
            Self::Normal => "normal",
            Self::High => "high",
        })
    }
}

/// Where a job is.
#[derive(
    Debug, Clone, PartialEq, Eq, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub enum JobState {
    /// Waiting for its time or a slot.
    Queued,
    /// Its migration runs.
    Running,
    /// The migration completed.
    Done,
    /// It failed or aborted (the VM stayed on its source), or could not
    /// start.
    Failed,
    /// Called off before it started, or cancelled while running.
    Cancelled,
}

impl JobState {
    /// Whether the job is over.
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Done | Self::Failed | Self::Cancelled)
    }
}

/// One migration to run.
#[derive(Debug, Clone, PartialEq, Serialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Job {
    /// Unique on its host.
    pub id: u64,
    /// The VM.
    pub vm: String,
    /// Destination host, or `auto` (placement picks it when the job starts).
    pub to: String,
    /// How.
    #[serde(skip)]
    pub options: MigrateOptions,
    /// How urgent.
    pub priority: Priority,
    /// Not before this time (ms since the epoch; 0: as soon as possible).
    pub not_before_unix_ms: u64,
    /// When it was submitted.
    pub submitted_unix_ms: u64,
    /// Who submitted it (certificate subject).
    pub submitted_by: String,
    /// Where it is.
    pub state: JobState,
    /// When it started (0: not yet).
    pub started_unix_ms: u64,
    /// When it ended (0: not yet).
    pub ended_unix_ms: u64,
    /// Its migration (0: none yet).
    pub migration_id: u64,
    /// The outcome in words (downtime, or why it failed).
    pub result: String,
}

/// What a running job holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Footprint {
    /// The destination host (its link).
    pub link: String,
    /// Whether disks move (a storage migration).
    pub storage: bool,
    /// Datastores the disks leave or arrive on (`host:datastore`).
    pub datastores: Vec<String>,
}

/// Concurrency limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Budgets {
    /// Live migrations leaving this host at once.
    pub host_live: u32,
    /// Storage migrations leaving this host at once.
    pub host_storage: u32,
    /// Storage migrations touching one datastore at once.
    pub datastore_storage: u32,
    /// Migrations to one destination host at once.
    pub link: u32,
}

impl Default for Budgets {
    fn default() -> Self {
        Self {
            host_live: 8,
            host_storage: 2,
            datastore_storage: 8,
            link: 4,
        }
    }
}

impl Budgets {
    /// Refuses a budget of zero (nothing could ever run).
    pub fn check(&self) -> Result<(), String> {
        for (name, v) in [
            ("host_live", self.host_live),
            ("host_storage", self.host_storage),
            ("datastore_storage", self.datastore_storage),
            ("link", self.link),
        ] {
            if v == 0 {
                return Err(format!("budget {name} is 0: no migration could start"));
            }
        }
        Ok(())
    }
}

/// The queue of one host's jobs.
#[derive(Debug)]
pub struct JobQueue {
    budgets: Budgets,
    jobs: BTreeMap<u64, Job>,
    running: BTreeMap<u64, Footprint>,
    next_id: u64,
    /// Most jobs that ran at once (for reports and tests).
    peak_running: usize,
}

/// Finished jobs kept in the queue for `jobs list`.
pub const FINISHED_KEPT: usize = 500;

impl JobQueue {
    /// An empty queue.
    pub fn new(budgets: Budgets) -> Self {
        Self {
            budgets,
            jobs: BTreeMap::new(),
            running: BTreeMap::new(),
            next_id: 1,
            peak_running: 0,
        }
    }

    /// The budgets.
    pub fn budgets(&self) -> Budgets {
        self.budgets
    }

    /// Takes jobs back after a restart: queued ones wait again; ones that
    /// were running when the node stopped are failed with `interrupted`.
    /// Returns the jobs whose state changed (to be stored again).
    pub fn restore(&mut self, jobs: Vec<Job>, now_unix_ms: u64, interrupted: &str) -> Vec<Job> {
        let mut changed = Vec::new();
        for mut job in jobs {
            self.next_id = self.next_id.max(job.id + 1);
            if job.state == JobState::Running {
                job.state = JobState::Failed;
                job.ended_unix_ms = now_unix_ms;
                job.result = interrupted.to_owned();
                changed.push(job.clone());
            }
            self.jobs.insert(job.id, job);
        }
        self.trim();
        changed
    }

    /// Adds a job (its `id` is assigned here) and returns it.
    pub fn submit(&mut self, mut job: Job) -> Job {
        job.id = self.next_id;
        self.next_id += 1;
        job.state = JobState::Queued;
        self.jobs.insert(job.id, job.clone());
        self.trim();
        job
    }

    /// Jobs due at `now`, most urgent first (priority, then start time,
    /// then submission order).
    pub fn due(&self, now_unix_ms: u64) -> Vec<u64> {
        let mut due: Vec<&Job> = self
            .jobs
            .values()
            .filter(|j| j.state == JobState::Queued && j.not_before_unix_ms <= now_unix_ms)
            .collect();
        due.sort_by_key(|j| (std::cmp::Reverse(j.priority), j.not_before_unix_ms, j.id));
        due.into_iter().map(|j| j.id).collect()
    }

    /// When the next queued job becomes due (ms since the epoch).
    pub fn next_due_at(&self) -> Option<u64> {
        self.jobs
            .values()
            .filter(|j| j.state == JobState::Queued)
            .map(|j| j.not_before_unix_ms)
            .min()
    }

    /// Whether a job holding `fp` may start now; otherwise which budget is
    /// full.
    pub fn fits(&self, fp: &Footprint) -> Result<(), String> {
        let b = &self.budgets;
        let live = self.running.len();
        if live >= b.host_live as usize {
            return Err(format!("host budget: {live} migrations running"));
        }
        if fp.storage {
            let storage = self.running.values().filter(|r| r.storage).count();
            if storage >= b.host_storage as usize {
                return Err(format!("host budget: {storage} storage migrations running"));
            }
            for ds in &fp.datastores {
                let on_ds = self
                    .running
                    .values()
                    .filter(|r| r.storage && r.datastores.contains(ds))
                    .count();
                if on_ds >= b.datastore_storage as usize {
                    return Err(format!(
                        "datastore budget: {on_ds} storage migrations on {ds}"
                    ));
                }
            }
        }
        let on_link = self.running.values().filter(|r| r.link == fp.link).count();
        if on_link >= b.link as usize {
            return Err(format!("link budget: {on_link} migrations to {}", fp.link));
        }
        Ok(())
    }

    /// Job `id` started with footprint `fp` (its destination resolved).
    pub fn start(&mut self, id: u64, fp: Footprint, now_unix_ms: u64) -> Option<&Job> {
        let job = self.jobs.get_mut(&id)?;
        job.state = JobState::Running;
        job.started_unix_ms = now_unix_ms;
        job.to.clone_from(&fp.link);
        self.running.insert(id, fp);
        self.peak_running = self.peak_running.max(self.running.len());
        Some(job)
    }

    /// Job `id`'s migration got its id.
    pub fn set_migration(&mut self, id: u64, migration_id: u64) -> Option<&Job> {
        let job = self.jobs.get_mut(&id)?;
        job.migration_id = migration_id;
        Some(job)
    }

    /// Job `id` ended in `state` (`result` says how).
    pub fn finish(
        &mut self,
        id: u64,
        state: JobState,
        result: String,
        now_unix_ms: u64,
    ) -> Option<&Job> {
        self.running.remove(&id);
        let job = self.jobs.get_mut(&id)?;
        job.state = state;
        job.result = result;
        job.ended_unix_ms = now_unix_ms;
        Some(job)
    }

    /// Job `id` could not run yet (its destination was busy): it is
    /// queued again, `why` in its result, its slot freed.
    pub fn retry(&mut self, id: u64, why: String) -> Option<&Job> {
        self.running.remove(&id);
        let job = self.jobs.get_mut(&id)?;
        job.state = JobState::Queued;
        job.started_unix_ms = 0;
        job.migration_id = 0;
        job.result = why;
        Some(job)
    }

    /// Calls off a queued job. A running one is cancelled through its
    /// migration (the caller's business); a finished one cannot be.
    pub fn cancel(&mut self, id: u64, now_unix_ms: u64, who: &str) -> Result<&Job, String> {
        let job = self.jobs.get(&id).ok_or(format!("no job {id}"))?;
        match job.state {
            JobState::Queued => Ok(self
                .finish(
                    id,
                    JobState::Cancelled,
                    format!("cancelled by {who} before it started"),
                    now_unix_ms,
                )
                .expect("the job exists")),
            JobState::Running => Err(format!("job {id} is running")),
            _ => Err(format!("job {id} is over ({:?})", job.state)),
        }
    }

    /// One job.
    pub fn get(&self, id: u64) -> Option<&Job> {
        self.jobs.get(&id)
    }

    /// Every job kept, oldest first.
    pub fn list(&self) -> Vec<Job> {
        self.jobs.values().cloned().collect()
    }

    /// Jobs running now.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Most jobs that ran at once since this queue was made.
    pub fn peak_running(&self) -> usize {
        self.peak_running
    }

    fn trim(&mut self) {
        let finished: Vec<u64> = self
            .jobs
            .values()
            .filter(|j| j.state.is_final())
            .map(|j| j.id)
            .collect();
        for id in finished
            .iter()
            .take(finished.len().saturating_sub(FINISHED_KEPT))
        {
            self.jobs.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(vm: &str, priority: Priority, not_before: u64) -> Job {
        Job {
            id: 0,
            vm: vm.into(),
            to: "b".into(),
            options: MigrateOptions::default(),
            priority,
            not_before_unix_ms: not_before,
            submitted_unix_ms: 0,
            submitted_by: "ops".into(),
            state: JobState::Queued,
            started_unix_ms: 0,
            ended_unix_ms: 0,
            migration_id: 0,
            result: String::new(),
        }
    }

    fn live(link: &str) -> Footprint {
        Footprint {
            link: link.into(),
            ..Footprint::default()
        }
    }

    fn storage(link: &str, ds: &[&str]) -> Footprint {
        Footprint {
            link: link.into(),
            storage: true,
            datastores: ds.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn higher_priority_goes_first_then_the_earlier_one() {
        let mut q = JobQueue::new(Budgets::default());
        let low = q.submit(job("low", Priority::Low, 0)).id;
        let normal = q.submit(job("normal", Priority::Normal, 0)).id;
        let high = q.submit(job("high", Priority::High, 5)).id;
        let later = q.submit(job("later", Priority::High, 100)).id;
        assert_eq!(q.due(10), vec![high, normal, low]);
        assert_eq!(q.due(100), vec![high, later, normal, low]);
        assert_eq!(q.next_due_at(), Some(0));
    }

    #[test]
    fn a_scheduled_job_is_not_due_before_its_time() {
        let mut q = JobQueue::new(Budgets::default());
        q.submit(job("vm", Priority::High, 1_000));
        assert!(q.due(999).is_empty());
        assert_eq!(q.due(1_000).len(), 1);
        assert_eq!(q.next_due_at(), Some(1_000));
    }

    #[test]
    fn each_budget_refuses_the_job_that_would_exceed_it() {
        let mut q = JobQueue::new(Budgets {
            host_live: 4,
            host_storage: 1,
            datastore_storage: 1,
            link: 2,
        });
        let ids: Vec<u64> = (0..4)
            .map(|i| q.submit(job(&format!("vm{i}"), Priority::Normal, 0)).id)
            .collect();
        q.start(ids[0], live("b"), 0);
        q.start(ids[1], live("b"), 0);
        let link = q.fits(&live("b")).expect_err("link full");
        assert!(link.contains("link budget"), "{link}");
        q.fits(&live("c")).expect("another link is free");
        q.start(ids[2], storage("c", &["a:local", "c:fast"]), 0);
        let host_storage = q
            .fits(&storage("d", &["a:other"]))
            .expect_err("storage full");
        assert!(
            host_storage.contains("storage migrations running"),
            "{host_storage}"
        );
        q.start(ids[3], live("d"), 0);
        let host = q.fits(&live("e")).expect_err("host full");
        assert!(host.contains("host budget: 4"), "{host}");
        q.finish(ids[2], JobState::Done, "ok".into(), 1);
        q.fits(&storage("e", &["a:other"]))
            .expect("a storage slot is free again");
        assert_eq!(q.peak_running(), 4);
    }

    #[test]
    fn the_datastore_budget_counts_storage_moves_on_that_datastore() {
        let mut q = JobQueue::new(Budgets {
            host_storage: 4,
            datastore_storage: 1,
            ..Budgets::default()
        });
        let id = q.submit(job("vm", Priority::Normal, 0)).id;
        q.start(id, storage("b", &["a:local", "b:local"]), 0);
        let e = q
            .fits(&storage("c", &["a:local", "c:local"]))
            .expect_err("a:local is busy");
        assert!(e.contains("a:local"), "{e}");
        q.fits(&storage("c", &["a:archive", "c:local"]))
            .expect("another datastore");
    }

    #[test]
    fn only_a_queued_job_can_be_called_off() {
        let mut q = JobQueue::new(Budgets::default());
        let a = q.submit(job("a", Priority::Normal, 0)).id;
        let b = q.submit(job("b", Priority::Normal, 0)).id;
        q.start(b, live("b"), 0);
        let cancelled = q.cancel(a, 5, "ops").expect("queued");
        assert_eq!(cancelled.state, JobState::Cancelled);
        assert!(q.cancel(a, 6, "ops").expect_err("over").contains("over"));
        assert!(
            q.cancel(b, 6, "ops")
                .expect_err("running")
                .contains("running")
        );
        assert!(q.cancel(99, 6, "ops").expect_err("none").contains("no job"));
        assert!(q.due(10).is_empty());
    }

    #[test]
    fn restore_requeues_waiting_jobs_and_fails_interrupted_ones() {
        let mut q = JobQueue::new(Budgets::default());
        let mut waiting = job("w", Priority::Normal, 500);
        waiting.id = 7;
        let mut running = job("r", Priority::Normal, 0);
        running.id = 8;
        running.state = JobState::Running;
        let changed = q.restore(vec![waiting, running], 100, "interrupted");
        assert_eq!(changed.len(), 1);
        assert_eq!(changed[0].state, JobState::Failed);
        assert_eq!(q.due(500), vec![7]);
        assert_eq!(q.submit(job("n", Priority::Normal, 0)).id, 9);
        assert_eq!(q.running(), 0);
    }

    #[test]
    fn zero_budgets_are_refused() {
        let bad = Budgets {
            link: 0,
            ..Budgets::default()
        };
        assert!(bad.check().expect_err("zero").contains("link"));
        Budgets::default().check().expect("defaults are fine");
    }
}
