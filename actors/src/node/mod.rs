//! The node: actors that own VMs and pump migrations over a [`Transport`].
//!
//! - [`host::HostActor`]: one per node; owns the VMs, admits incoming
//!   migrations, starts outgoing ones, keeps the MAC table of the virtual
//!   network.
//! - [`vm::VmActor`]: one per VM; owns its [`GuestBackend`](crate::guest::GuestBackend).
//! - [`source::MigrationSource`] / [`destination::MigrationDestination`]:
//!   one pair per migration, each pumping its sans-IO state machine.
//! - [`net`]: the accept loop and stream dispatch; [`client`]: the
//!   request protocol `ferry` commands and [`crate::api`] speak.
//!
//! Every actor is passed the `ActorRef`s it needs: nothing here uses
//! ractor's global registry, so many simulated nodes share one process.

pub mod client;
pub mod destination;
pub mod disk;
pub mod factory;
pub mod host;
pub mod lanes;
pub mod metrics;
pub mod net;
pub mod overlay;
pub mod scheduler;
pub mod share;
pub mod source;
pub mod trace;
pub mod values;
pub mod vm;
pub mod vm_disks;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use ferry_transport::version::PROTOCOL_VERSION;
use ferry_transport::{Connection, Transport};

/// Why a node operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    /// No VM of that name here.
    #[error("no VM named {0}")]
    NoSuchVm(String),
    /// No peer of that name.
    #[error("no host named {0} (known: {1})")]
    NoSuchHost(String, String),
    /// A VM of that name exists.
    #[error("a VM named {0} already exists")]
    Exists(String),
    /// The VM is in a phase that does not allow this.
    #[error("busy: {0}")]
    Busy(String),
    /// The guest backend failed.
    #[error("guest: {0}")]
    Guest(String),
    /// The link to a peer failed.
    #[error("link to {host}: {reason}")]
    Link {
        /// Peer.
        host: String,
        /// Why.
        reason: String,
    },
    /// The caller's certificate role does not allow this.
    #[error("permission denied: {0}")]
    Denied(String),
    /// The request is malformed.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// Not enough capacity.
    #[error("no capacity: {0}")]
    NoCapacity(String),
    /// An actor went away.
    #[error("{0} is gone")]
    Gone(String),
    /// The node store did not take a write: the change is not durable, so
    /// it is not acknowledged.
    #[error("not recorded: {0}")]
    Store(#[from] crate::ops::store::StoreError),
}

thread_local! {
    static INLINE_BLOCKING: Cell<bool> = const { Cell::new(false) };
}

/// Makes [`offload`] run its work inline on this thread: the simulation
/// calls it on its single runtime thread, where a blocking pool would run
/// work at times no seed controls.
pub fn run_blocking_work_inline_on_this_thread() {
    INLINE_BLOCKING.with(|c| c.set(true));
}

/// Runs CPU-heavy or blocking work (building a guest, hashing memory) on
/// tokio's blocking pool, or inline where the simulation asked for it.
pub async fn offload<R: Send + 'static>(work: impl FnOnce() -> R + Send + 'static) -> R {
    if INLINE_BLOCKING.with(Cell::get) {
        return work();
    }
    match tokio::task::spawn_blocking(work).await {
        Ok(r) => r,
        // The runtime is shutting down: this task goes with it.
        Err(e) if e.is_cancelled() => std::future::pending().await,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// The current time: tokio's clock, so a paused runtime (the simulation)
/// gives virtual time.
pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// What every actor of a node shares: its name, its transport, the peers
/// it knows and the connections to them (one per peer).
pub struct NodeCtx<T: Transport> {
    /// This host's name (its certificate's).
    pub name: String,
    /// The endpoint.
    pub transport: Arc<T>,
    /// Peer hosts by name.
    pub peers: BTreeMap<String, T::Addr>,
    /// Which life of this host this is: migration ids carry it, so that a
    /// restarted host's ids never match what peers remember of its
    /// previous life. Production nodes take it from the boot time.
    pub incarnation: u32,
    /// The links' bandwidth, shared between migrations by priority.
    pub shares: Arc<share::LinkShares>,
    links: tokio::sync::Mutex<BTreeMap<String, T::Connection>>,
}

impl<T: Transport> NodeCtx<T> {
    /// A context for host `name` in its `incarnation`-th life.
    pub fn new(
        name: String,
        transport: Arc<T>,
        peers: BTreeMap<String, T::Addr>,
        incarnation: u32,
    ) -> Self {
        Self {
            name,
            transport,
            peers,
            incarnation,
            shares: Arc::default(),
            links: tokio::sync::Mutex::new(BTreeMap::new()),
        }
    }

    /// The connection to `host`, dialled (and version-checked) on first use.
    pub async fn link(&self, host: &str) -> Result<T::Connection, NodeError> {
        let mut links = self.links.lock().await;
        if let Some(conn) = links.get(host) {
            if !conn.is_closed() {
                return Ok(conn.clone());
            }
            // Cut or closed since: dial again.
            links.remove(host);
        }
        let conn = self.dial(host).await?;
        links.insert(host.to_owned(), conn.clone());
        Ok(conn)
    }

    /// A new connection to `host` (version-checked) of the caller's own,
    /// beside the shared link: bulk data spread over connections.
    pub async fn dial(&self, host: &str) -> Result<T::Connection, NodeError> {
        let addr = self.peers.get(host).ok_or_else(|| {
            let mut known: Vec<&str> = self.peers.keys().map(String::as_str).collect();
            known.sort_unstable();
            NodeError::NoSuchHost(host.to_owned(), known.join(", "))
        })?;
        let link_err = |reason: String| NodeError::Link {
            host: host.to_owned(),
            reason,
        };
        let conn = self
            .transport
            .connect(addr)
            .await
            .map_err(|e| link_err(e.to_string()))?;
        if conn.peer().name != host {
            return Err(link_err(format!(
                "its certificate names {}",
                conn.peer().name
            )));
        }
        let session = ferry_transport::session::open(conn.clone(), &self.name)
            .await
            .map_err(|e| link_err(e.to_string()))?;
        if session.version != PROTOCOL_VERSION {
            return Err(link_err(format!(
                "it speaks protocol version {}, migrations need {PROTOCOL_VERSION}",
                session.version
            )));
        }
        Ok(conn)
    }

    /// Forgets the connection to `host` (it failed); the next use redials.
    pub async fn drop_link(&self, host: &str) {
        if let Some(conn) = self.links.lock().await.remove(host) {
            conn.close("link dropped after a failure");
        }
    }
}

/// Opens a stream on `conn` and introduces it.
pub async fn open_stream<C: Connection>(
    conn: &C,
    intro: &crate::migration::StreamIntro,
) -> Result<
    (
        ferry_transport::FrameWriter<C::Send>,
        ferry_transport::FrameReader<C::Recv>,
    ),
    String,
> {
    let (send, recv) = conn.open_stream().await.map_err(|e| e.to_string())?;
    let mut writer = ferry_transport::FrameWriter::new(send);
    writer
        .send_message(ferry_transport::FrameKind::Control, intro)
        .await
        .map_err(|e| e.to_string())?;
    Ok((writer, ferry_transport::FrameReader::new(recv)))
}
