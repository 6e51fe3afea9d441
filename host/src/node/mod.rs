//! Node wiring: a host actor, its accept loop and its guest factory over
//! QUIC, plus the node and client configuration files.

pub mod config;
pub mod factory;
pub mod local;
pub mod reload;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use ferry_actors::migration::Capacity;
use ferry_actors::node::NodeCtx;
use ferry_actors::node::factory::GuestFactory;
use ferry_actors::node::host::{HostMsg, start_host_with};
use ferry_actors::ops::jobs::Budgets;
use ferry_actors::ops::store::NodeStore;
use ferry_actors::storage::datastore::Datastores;
use ferry_transport::Transport;
use ractor::ActorRef;

/// Where a node keeps its state and how many migrations it runs at once.
pub struct Operations {
    /// Inventory, jobs, records, audit log.
    pub store: Arc<dyn NodeStore>,
    /// Concurrency limits.
    pub budgets: Budgets,
}

impl Operations {
    /// A store in memory (lost when the process ends) and default budgets:
    /// the demo's and the benchmarks' throwaway clusters.
    pub fn in_memory() -> Self {
        Self {
            store: Arc::new(ferry_actors::ops::store::MemStore::new()),
            budgets: Budgets::default(),
        }
    }
}

/// A running node.
pub struct Node<T: Transport> {
    /// Name, transport and peers.
    pub ctx: Arc<NodeCtx<T>>,
    /// The host actor.
    pub host: ActorRef<HostMsg<T>>,
}

impl<T: Transport> Node<T> {
    /// Starts host `name` on `transport`, knowing `peers`.
    pub async fn start(
        name: &str,
        transport: Arc<T>,
        peers: BTreeMap<String, T::Addr>,
        capacity: Capacity,
        factory: Arc<dyn GuestFactory>,
        stores: Arc<dyn Datastores>,
        ops: Operations,
    ) -> anyhow::Result<Self> {
        // Seconds since the epoch, wrapped: a restarted node gets a new
        // incarnation, so its migration ids never match its previous life's.
        let boot = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() % (1 << 32))
            .unwrap_or(0);
        let incarnation = u32::try_from(boot).unwrap_or(0);
        let ctx = Arc::new(NodeCtx::new(name.to_owned(), transport, peers, incarnation));
        let host = start_host_with(
            ctx.clone(),
            capacity,
            factory,
            stores,
            ops.store,
            ops.budgets,
        )
        .await?;
        Ok(Self { ctx, host })
    }
}

/// This host's CPU features: those its KVM gives guests, or (without
/// KVM) `/proc/cpuinfo`'s flags.
pub fn cpu_features() -> BTreeSet<String> {
    // Where KVM works, what it can give guests (the `host` CPU model).
    if let Ok(model) = crate::kvm::cpu::host_model() {
        return model;
    }
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("flags"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, flags)| flags.split_whitespace().map(str::to_owned).collect())
        })
        .unwrap_or_default()
}
