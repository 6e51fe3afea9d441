//! The programmatic API: drive a ferry cluster from Rust.
//!
//! ```no_run
//! # async fn demo<T: ferry_transport::Transport>(cluster: ferry_actors::api::Cluster<T>)
//! # -> Result<(), ferry_actors::api::ClientError> {
//! let report = cluster.vm("web-1").migrate_to("host-b").downtime_ms(50).await?;
//! println!("{}", report.to_text());
//! # Ok(()) }
//! ```
//!
//! Operations (jobs, scheduled and batch migrations, the audit log,
//! placement, DRS, maintenance mode) are in `ops.rs`, as more methods of
//! [`Cluster`].
//!
//! A [`Cluster`] knows the nodes by name and address and talks to each over
//! the transport with the caller's (client) certificate, using the request
//! protocol of [`crate::node::client`].

mod ops;

pub use ops::{BatchItem, BatchResult, parse_batch};

use std::collections::HashMap;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;

use ferry_transport::{Connection, FrameKind, Transport};

use crate::migration::{MigrationReport, Progress, StreamIntro};
use crate::node::client::{ClientReply, ClientRequest, MigrateOptions, VmSpec};
use crate::node::host::history::MigrationRecord;
use crate::node::metrics::NodeStats;
use crate::node::open_stream;
use crate::node::vm::VmInfo;

/// Why a client call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// No node of that name.
    #[error("no node named {0}")]
    NoSuchNode(String),
    /// No node has the VM.
    #[error("no node has a VM named {0}")]
    NoSuchVm(String),
    /// The link to a node failed.
    #[error("{node}: {reason}")]
    Link {
        /// The node.
        node: String,
        /// Why.
        reason: String,
    },
    /// The node refused or failed the request.
    #[error("{node}: {reason}")]
    Node {
        /// The node.
        node: String,
        /// Its reason.
        reason: String,
    },
    /// No node knows the migration.
    #[error("no node knows migration {0}")]
    NoSuchMigration(String),
    /// The node answered something unexpected.
    #[error("{0}: unexpected reply")]
    Unexpected(String),
}

/// A progress callback.
pub type ProgressFn = Box<dyn FnMut(&Progress) + Send>;

/// A client of a ferry cluster.
pub struct Cluster<T: Transport> {
    transport: Arc<T>,
    nodes: Vec<(String, T::Addr)>,
    conns: tokio::sync::Mutex<HashMap<String, T::Connection>>,
    connect_timeout: std::time::Duration,
}

/// How long a client waits for a node to take its connection, by default.
pub const CONNECT_TIMEOUT_DEFAULT: std::time::Duration = std::time::Duration::from_secs(3);

impl<T: Transport> Cluster<T> {
    /// A client that reaches `nodes` (name, address) through `transport`.
    pub fn new(transport: Arc<T>, nodes: Vec<(String, T::Addr)>) -> Self {
        Self {
            transport,
            nodes,
            conns: tokio::sync::Mutex::new(HashMap::new()),
            connect_timeout: CONNECT_TIMEOUT_DEFAULT,
        }
    }

    /// Waits at most `timeout` for a node to take a connection (a node
    /// that is down costs this, once per command).
    pub fn with_connect_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The nodes' names.
    pub fn node_names(&self) -> Vec<String> {
        self.nodes.iter().map(|(n, _)| n.clone()).collect()
    }

    async fn conn(&self, node: &str) -> Result<T::Connection, ClientError> {
        // Not held while connecting: requests to several nodes go out at once.
        if let Some(c) = self.conns.lock().await.get(node)
            && !c.is_closed()
        {
            return Ok(c.clone());
        }
        let addr = self
            .nodes
            .iter()
            .find(|(n, _)| n == node)
            .map(|(_, a)| a.clone())
            .ok_or_else(|| ClientError::NoSuchNode(node.to_owned()))?;
        let link = |reason: String| ClientError::Link {
            node: node.to_owned(),
            reason,
        };
        let name = self.transport.local_identity().name.clone();
        let open = async {
            let conn = self
                .transport
                .connect(&addr)
                .await
                .map_err(|e| link(e.to_string()))?;
            ferry_transport::session::open(conn.clone(), &name)
                .await
                .map_err(|e| link(e.to_string()))?;
            Ok::<_, ClientError>(conn)
        };
        let conn = tokio::time::timeout(self.connect_timeout, open)
            .await
            .map_err(|_| {
                link(format!(
                    "no answer within {} ms (is the node running?)",
                    self.connect_timeout.as_millis()
                ))
            })??;
        self.conns
            .lock()
            .await
            .insert(node.to_owned(), conn.clone());
        Ok(conn)
    }

    /// Sends `request` to `node`; progress replies go to `on_progress`.
    pub async fn request(
        &self,
        node: &str,
        request: &ClientRequest,
        mut on_progress: Option<&mut ProgressFn>,
    ) -> Result<ClientReply, ClientError> {
        let conn = self.conn(node).await?;
        let link = |reason: String| ClientError::Link {
            node: node.to_owned(),
            reason,
        };
        let (mut writer, mut reader) = open_stream(&conn, &StreamIntro::Client)
            .await
            .map_err(link)?;
        writer
            .send_message(FrameKind::Control, request)
            .await
            .map_err(|e| link(e.to_string()))?;
        loop {
            let reply = reader
                .read_message::<ClientReply>(FrameKind::Control)
                .await
                .map_err(|e| link(e.to_string()))?;
            match reply {
                ClientReply::Progress(p) => {
                    if let Some(f) = on_progress.as_mut() {
                        f(&p);
                    }
                }
                ClientReply::Error(reason) => {
                    let _ = writer.finish();
                    return Err(ClientError::Node {
                        node: node.to_owned(),
                        reason,
                    });
                }
                other => {
                    let _ = writer.finish();
                    return Ok(other);
                }
            }
        }
    }

    /// Defines a VM on `node` (stopped).
    pub async fn create_vm(&self, node: &str, spec: VmSpec) -> Result<(), ClientError> {
        self.expect_ok(node, &ClientRequest::CreateVm(spec)).await
    }

    async fn expect_ok(&self, node: &str, request: &ClientRequest) -> Result<(), ClientError> {
        match self.request(node, request, None).await? {
            ClientReply::Ok => Ok(()),
            _ => Err(ClientError::Unexpected(node.to_owned())),
        }
    }

    /// The VMs on `node`.
    pub async fn list_vms(&self, node: &str) -> Result<Vec<VmInfo>, ClientError> {
        match self.request(node, &ClientRequest::ListVms, None).await? {
            ClientReply::Vms(v) => Ok(v),
            _ => Err(ClientError::Unexpected(node.to_owned())),
        }
    }

    /// `node`'s MAC table: MAC, host.
    pub async fn mac_table(&self, node: &str) -> Result<Vec<(String, String)>, ClientError> {
        match self.request(node, &ClientRequest::MacTable, None).await? {
            ClientReply::Macs(m) => Ok(m),
            _ => Err(ClientError::Unexpected(node.to_owned())),
        }
    }

    /// `node`'s migration metrics.
    pub async fn stats(&self, node: &str) -> Result<NodeStats, ClientError> {
        match self.request(node, &ClientRequest::Stats, None).await? {
            ClientReply::Stats(s) => Ok(s),
            _ => Err(ClientError::Unexpected(node.to_owned())),
        }
    }

    /// `node`'s records of migration `id`, or its `last` most recent ones.
    pub async fn migrations(
        &self,
        node: &str,
        id: Option<u64>,
        last: u32,
    ) -> Result<Vec<MigrationRecord>, ClientError> {
        match self
            .request(node, &ClientRequest::Migrations { id, last }, None)
            .await?
        {
            ClientReply::Migrations(r) => Ok(r),
            _ => Err(ClientError::Unexpected(node.to_owned())),
        }
    }

    /// The most recent migrations over all nodes that answer, one record
    /// per migration (source and destination sides joined), newest first.
    pub async fn recent_migrations(&self, last: u32) -> Result<Vec<MigrationRecord>, ClientError> {
        let mut all = Vec::new();
        let mut answered = false;
        let mut first_error = None;
        for (node, _) in &self.nodes {
            match self.migrations(node, None, last).await {
                Ok(r) => {
                    answered = true;
                    all.extend(r);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if !answered && let Some(e) = first_error {
            return Err(e);
        }
        let mut joined = join_records(all);
        joined.sort_by_key(|r| std::cmp::Reverse(record_started(r)));
        joined.truncate(last as usize);
        Ok(joined)
    }

    /// Migration `id`'s report from its source, with the destination's
    /// side attached (`destination`). Asks every node that answers.
    pub async fn migration(&self, id: u64) -> Result<MigrationReport, ClientError> {
        let shown = crate::migration::report::show_id(id);
        let mut records = Vec::new();
        for (node, _) in &self.nodes {
            if let Ok(r) = self.migrations(node, Some(id), 0).await {
                records.extend(r);
            }
        }
        let mut joined = join_records(records);
        match joined.len() {
            0 => Err(ClientError::NoSuchMigration(shown)),
            1 => {
                let record = joined.remove(0);
                let Some(mut report) = record.source else {
                    return Err(ClientError::Node {
                        node: record.from,
                        reason: format!(
                            "only {} (the destination) remembers migration {shown}; the source's report is lost",
                            record.to
                        ),
                    });
                };
                report.destination = record.destination;
                Ok(report)
            }
            _ => Err(ClientError::Node {
                node: joined
                    .iter()
                    .map(|r| r.from.clone())
                    .collect::<Vec<_>>()
                    .join(", "),
                reason: format!("more than one source used id {shown}"),
            }),
        }
    }

    /// Calls off migration `id` before its VM is handed over: the VM keeps
    /// running on its source. Returns the source host.
    ///
    /// # Errors
    /// No node is sending it ([`ClientError::NoSuchMigration`]), or it is
    /// too late (the source's answer).
    pub async fn cancel_migration(&self, id: u64) -> Result<String, ClientError> {
        for (node, _) in &self.nodes {
            match self
                .request(node, &ClientRequest::CancelMigration { id }, None)
                .await
            {
                Ok(ClientReply::Ok) => return Ok(node.clone()),
                Ok(_) => return Err(ClientError::Unexpected(node.clone())),
                Err(ClientError::Node { reason, .. }) if reason.contains("is not sending") => {}
                Err(ClientError::Link { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Err(ClientError::NoSuchMigration(
            crate::migration::report::show_id(id),
        ))
    }

    /// The node a VM lives on.
    pub async fn locate(&self, vm: &str) -> Result<String, ClientError> {
        for (node, _) in &self.nodes {
            if self
                .list_vms(node)
                .await?
                .iter()
                .any(|v| v.name == vm && v.phase != crate::node::vm::VmPhase::Incoming)
            {
                return Ok(node.clone());
            }
        }
        Err(ClientError::NoSuchVm(vm.to_owned()))
    }

    /// A handle on VM `name`.
    pub fn vm(&self, name: &str) -> VmHandle<'_, T> {
        VmHandle {
            cluster: self,
            name: name.to_owned(),
        }
    }
}

/// One VM of a [`Cluster`].
pub struct VmHandle<'a, T: Transport> {
    cluster: &'a Cluster<T>,
    name: String,
}

impl<'a, T: Transport> VmHandle<'a, T> {
    /// Runs its vCPUs.
    pub async fn start(&self) -> Result<(), ClientError> {
        let node = self.cluster.locate(&self.name).await?;
        self.cluster
            .expect_ok(&node, &ClientRequest::StartVm(self.name.clone()))
            .await
    }

    /// Stops its vCPUs.
    pub async fn stop(&self) -> Result<(), ClientError> {
        let node = self.cluster.locate(&self.name).await?;
        self.cluster
            .expect_ok(&node, &ClientRequest::StopVm(self.name.clone()))
            .await
    }

    /// Moves its disks to `datastore` on its host, live, by `method`.
    pub async fn move_storage(
        &self,
        datastore: &str,
        method: crate::storage::Method,
        rate_mb_per_s: u64,
        disk_datastores: &[(String, String)],
        on_progress: Option<ProgressFn>,
    ) -> Result<Vec<crate::storage::DiskMoveReport>, ClientError> {
        let node = self.cluster.locate(&self.name).await?;
        let request = ClientRequest::MoveStorage {
            vm: self.name.clone(),
            datastore: datastore.to_owned(),
            method,
            rate_mb_per_s,
            disk_datastores: disk_datastores.to_vec(),
        };
        let mut on_progress = on_progress;
        match self
            .cluster
            .request(&node, &request, on_progress.as_mut())
            .await?
        {
            ClientReply::StorageMoved(r) => Ok(r),
            _ => Err(ClientError::Unexpected(node)),
        }
    }

    /// Its disks; with `verify`, each checked against the synthetic disk
    /// workload's pattern (every acknowledged write present).
    pub async fn disks(
        &self,
        verify: bool,
    ) -> Result<Vec<crate::node::client::DiskView>, ClientError> {
        let node = self.cluster.locate(&self.name).await?;
        let request = ClientRequest::Disks {
            vm: self.name.clone(),
            verify,
        };
        match self.cluster.request(&node, &request, None).await? {
            ClientReply::Disks(d) => Ok(d),
            _ => Err(ClientError::Unexpected(node)),
        }
    }

    /// Moves its guest to a new VMM process on the host that runs it
    /// (memory shared, not copied); the report gives the downtime.
    pub async fn upgrade(&self) -> Result<crate::guest::UpgradeReport, ClientError> {
        let node = self.cluster.locate(&self.name).await?;
        let request = ClientRequest::UpgradeVm {
            vm: self.name.clone(),
        };
        match self.cluster.request(&node, &request, None).await? {
            ClientReply::Upgraded {
                downtime_us,
                old_pid,
                new_pid,
            } => Ok(crate::guest::UpgradeReport {
                downtime: std::time::Duration::from_micros(downtime_us),
                old_pid,
                new_pid,
            }),
            _ => Err(ClientError::Unexpected(node)),
        }
    }

    /// Types `bytes` into its serial console (Linux guests), on the host
    /// that runs it; how many the console took (its FIFO holds 64: send
    /// the rest a moment later).
    pub async fn console_input(&self, bytes: &[u8]) -> Result<usize, ClientError> {
        let node = self.cluster.locate(&self.name).await?;
        let request = ClientRequest::ConsoleInput {
            vm: self.name.clone(),
            bytes: bytes.to_vec(),
        };
        match self.cluster.request(&node, &request, None).await? {
            ClientReply::Taken(n) => Ok(usize::try_from(n).unwrap_or(0)),
            _ => Err(ClientError::Unexpected(node)),
        }
    }

    /// The newest output of its serial console (Linux guests), from the
    /// host that runs it.
    pub async fn console(&self) -> Result<Vec<u8>, ClientError> {
        let node = self.cluster.locate(&self.name).await?;
        let request = ClientRequest::Console {
            vm: self.name.clone(),
        };
        match self.cluster.request(&node, &request, None).await? {
            ClientReply::Console(out) => Ok(out),
            _ => Err(ClientError::Unexpected(node)),
        }
    }

    /// A migration to `host`, to be configured and awaited.
    pub fn migrate_to(self, host: &str) -> Migrate<'a, T> {
        Migrate {
            cluster: self.cluster,
            vm: self.name,
            to: host.to_owned(),
            options: MigrateOptions::default(),
            on_progress: None,
        }
    }
}

/// A migration being set up; `.await` runs it and yields the report
/// (which may say it aborted: see [`MigrationReport::outcome`]).
pub struct Migrate<'a, T: Transport> {
    cluster: &'a Cluster<T>,
    vm: String,
    to: String,
    options: MigrateOptions,
    on_progress: Option<ProgressFn>,
}

impl<'a, T: Transport> Migrate<'a, T> {
    /// Downtime budget.
    pub fn downtime_ms(mut self, ms: u64) -> Self {
        self.options.downtime_ms = ms;
        self
    }

    /// Pre-copy time limit.
    pub fn time_limit_s(mut self, s: u64) -> Self {
        self.options.time_limit_s = s;
        self
    }

    /// Throttle when rounds stop shrinking (on by default).
    pub fn auto_converge(mut self, on: bool) -> Self {
        self.options.auto_converge = on;
        self
    }

    /// Bulk streams.
    pub fn lanes(mut self, lanes: u32) -> Self {
        self.options.lanes = lanes;
        self
    }

    /// Compare memory hashes before the destination resumes.
    pub fn verify_memory(mut self, on: bool) -> Self {
        self.options.verify_memory = on;
        self
    }

    /// Cold migration of a stopped VM.
    pub fn cold(mut self, on: bool) -> Self {
        self.options.cold = on;
        self
    }

    /// Move the disks along to `datastore` on the destination, by
    /// `method` (one switchover for memory and disks).
    pub fn storage(mut self, datastore: &str, method: crate::storage::Method) -> Self {
        self.options.datastore = datastore.to_owned();
        self.options.method = method;
        self
    }

    /// Send disk `disk` to `datastore` instead of the one given to
    /// [`Self::storage`].
    pub fn disk_datastore(mut self, disk: &str, datastore: &str) -> Self {
        self.options
            .disk_datastores
            .push((disk.to_owned(), datastore.to_owned()));
        self
    }

    /// Limit the disks' copy rate, in MB/s (0: none).
    pub fn storage_rate_mb_per_s(mut self, rate: u64) -> Self {
        self.options.disk_rate_mb_per_s = rate;
        self
    }

    /// Every option at once (the builder's other methods change one).
    pub fn options(mut self, options: MigrateOptions) -> Self {
        self.options = options;
        self
    }

    /// Queue priority: a higher one takes a free slot first.
    pub fn priority(mut self, priority: crate::ops::jobs::Priority) -> Self {
        self.options.priority = priority;
        self
    }

    /// Called with each progress update.
    pub fn on_progress(mut self, f: impl FnMut(&Progress) + Send + 'static) -> Self {
        self.on_progress = Some(Box::new(f));
        self
    }

    async fn run(mut self) -> Result<MigrationReport, ClientError> {
        let node = self.cluster.locate(&self.vm).await?;
        let request = ClientRequest::Migrate {
            vm: self.vm,
            to: self.to,
            options: self.options,
        };
        match self
            .cluster
            .request(&node, &request, self.on_progress.as_mut())
            .await?
        {
            ClientReply::Report(r) => Ok(r),
            _ => Err(ClientError::Unexpected(node)),
        }
    }
}

impl<'a, T: Transport> IntoFuture for Migrate<'a, T> {
    type Output = Result<MigrationReport, ClientError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}

/// Joins the source's and the destination's records of each migration
/// (same id, same source host).
fn join_records(records: Vec<MigrationRecord>) -> Vec<MigrationRecord> {
    let mut joined: Vec<MigrationRecord> = Vec::new();
    for r in records {
        match joined.iter_mut().find(|j| j.id == r.id && j.from == r.from) {
            Some(j) => {
                if j.source.is_none() {
                    j.source = r.source;
                }
                if j.destination.is_none() {
                    j.destination = r.destination;
                }
            }
            None => joined.push(r),
        }
    }
    joined
}

fn record_started(r: &MigrationRecord) -> u64 {
    r.source
        .as_ref()
        .map(|s| s.started_unix_ms)
        .or_else(|| r.destination.as_ref().map(|d| d.started_unix_ms))
        .unwrap_or(0)
}
