//! A simulated cluster: hosts running the production host actors over the
//! simulated network, synthetic guests, a trace, and the invariant checks.

use ferry_actors::storage::datastore::{MemDatastores, MemStorage};
use std::collections::BTreeMap;
use std::sync::Arc;

use ferry_actors::migration::{Capacity, MigrationReport};
use ferry_actors::node::NodeCtx;
use ferry_actors::node::client::{ClientReply, ClientRequest, MigrateOptions, VmSpec};
use ferry_actors::node::host::{HostMsg, start_host_with};
use ferry_actors::node::vm::{VmInfo, VmPhase};
use ferry_actors::ops::jobs::Budgets;
use ferry_actors::ops::store::MemStore;
use ferry_transport::Role;
use ractor::ActorRef;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::ledger::{ObservingFactory, RunLedger};
use crate::net::{SimNetwork, SimTransport};
use crate::violation::{Kind, Violation};

/// One simulated host.
pub struct SimHost {
    /// Its name.
    pub name: String,
    /// Its host actor.
    pub actor: ActorRef<HostMsg<SimTransport>>,
    /// Its node context (links, link shares).
    pub ctx: Arc<NodeCtx<SimTransport>>,
    /// Its node database (kept across lives when the world is durable).
    pub store: MemStore,
    transport: Arc<SimTransport>,
    incarnation: u32,
    up: bool,
    life: crate::life::Life,
    /// Its datastores as this life opened them (their locks die with it).
    stores: MemDatastores,
}

/// Events in the order they happened, with their simulated time; the
/// trace hash is the determinism check.
#[derive(Debug, Default)]
pub struct Trace {
    lines: Vec<String>,
}

impl Trace {
    /// Records `event` at simulated time `at` (since the start).
    pub fn record(&mut self, at: std::time::Duration, event: String) {
        self.lines
            .push(format!("{:>12.6} {event}", at.as_secs_f64() * 1e3));
    }

    /// xxh3 over every line.
    pub fn hash(&self) -> u64 {
        let mut all = String::new();
        for l in &self.lines {
            all.push_str(l);
            all.push('\n');
        }
        xxhash_rust::xxh3::xxh3_64(all.as_bytes())
    }

    /// The lines.
    pub fn lines(&self) -> &[String] {
        &self.lines
    }
}

/// The cluster.
pub struct World {
    /// The network.
    pub net: SimNetwork,
    hosts: std::cell::RefCell<Vec<SimHost>>,
    names: Vec<String>,
    memory_mib: u64,
    setup: HostSetup,
    started: Instant,
    /// Every host's datastores: `local` (its own) and `shared` (a SAN
    /// every host sees).
    pub storage: MemStorage,
    /// Which host runs which VM, told by the guests as it changes.
    pub ledger: Arc<RunLedger>,
}

/// How every host of a world is set up.
#[derive(Debug, Clone, Default)]
pub struct HostSetup {
    /// A crashed host keeps its node database and brings its VMs back
    /// when it restarts (otherwise it comes back empty).
    pub durable: bool,
    /// Every host's concurrency budgets.
    pub budgets: Budgets,
}

struct Boot<'a> {
    net: &'a SimNetwork,
    name: &'a str,
    names: &'a [String],
    memory_mib: u64,
    incarnation: u32,
    storage: &'a MemStorage,
    store: MemStore,
    budgets: Budgets,
    ledger: &'a Arc<RunLedger>,
}

async fn boot_host(b: Boot<'_>) -> SimHost {
    let Boot {
        net,
        name,
        names,
        memory_mib,
        incarnation,
        storage,
        store,
        budgets,
        ledger,
    } = b;
    let transport = Arc::new(net.endpoint(name, Role::Host));
    let peers: BTreeMap<String, String> = names
        .iter()
        .filter(|n| *n != name)
        .map(|n| (n.clone(), n.clone()))
        .collect();
    let ctx = Arc::new(NodeCtx::new(
        name.to_owned(),
        transport.clone(),
        peers,
        incarnation,
    ));
    let node_ctx = ctx.clone();
    let capacity = Capacity {
        memory_bytes: memory_mib << 20,
        vcpus: 1024,
        cpu_features: ["sse2".to_owned()].into_iter().collect(),
        kvm: false,
    };
    let stores = MemDatastores::standard(storage.clone(), name);
    let power = stores.clone();
    let life = crate::life::Life::new();
    let actor = start_host_with(
        ctx,
        capacity,
        Arc::new(ObservingFactory {
            host: name.to_owned(),
            ledger: ledger.clone(),
            life: life.clone(),
        }),
        Arc::new(stores),
        Arc::new(crate::life::LifeStore {
            store: store.clone(),
            life: life.clone(),
        }),
        budgets,
    )
    .await
    .expect("host actor");
    SimHost {
        name: name.to_owned(),
        actor,
        ctx: node_ctx,
        store,
        transport,
        incarnation,
        up: true,
        life,
        stores: power,
    }
}

impl World {
    /// Starts `hosts` hosts of `memory_mib` each, all peers of each other.
    pub async fn start(net: SimNetwork, hosts: usize, memory_mib: u64) -> Self {
        Self::start_with(net, hosts, memory_mib, HostSetup::default()).await
    }

    /// Starts `hosts` hosts set up as `setup` says.
    pub async fn start_with(
        net: SimNetwork,
        hosts: usize,
        memory_mib: u64,
        setup: HostSetup,
    ) -> Self {
        let names: Vec<String> = (0..hosts).map(|i| format!("h{i:03}")).collect();
        let mut list = Vec::new();
        let storage = MemStorage::new();
        let ledger = RunLedger::new();
        for name in &names {
            list.push(
                boot_host(Boot {
                    net: &net,
                    name,
                    names: &names,
                    memory_mib,
                    incarnation: 1,
                    storage: &storage,
                    store: MemStore::new(),
                    budgets: setup.budgets,
                    ledger: &ledger,
                })
                .await,
            );
        }
        Self {
            net,
            hosts: std::cell::RefCell::new(list),
            names,
            memory_mib,
            setup,
            storage,
            ledger,
            started: Instant::now(),
        }
    }

    /// Host names, by index.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Host `index`'s node context (its current life's).
    pub fn ctx(&self, index: usize) -> Arc<NodeCtx<SimTransport>> {
        self.hosts.borrow()[index].ctx.clone()
    }

    /// Whether crashed hosts keep their database.
    pub fn durable(&self) -> bool {
        self.setup.durable
    }

    /// Host `index`'s node database (kept across its lives when durable).
    pub fn store(&self, index: usize) -> MemStore {
        self.hosts.borrow()[index].store.clone()
    }

    /// Host `index`'s actor (its current life's).
    pub fn actor(&self, index: usize) -> ActorRef<HostMsg<SimTransport>> {
        self.hosts.borrow()[index].actor.clone()
    }

    /// Whether host `index` is up.
    pub fn is_up(&self, index: usize) -> bool {
        self.hosts.borrow()[index].up
    }

    /// Crashes host `index`: off the network, every actor stopped, its VMs
    /// gone with it, its local disks back to what was flushed.
    pub fn crash(&self, index: usize) {
        let mut hosts = self.hosts.borrow_mut();
        let h = &mut hosts[index];
        if !h.up {
            return;
        }
        h.up = false;
        h.life.end();
        self.net.unplug(&h.transport);
        let _ = h.actor.cast(HostMsg::PowerOff);
        h.stores.power_off();
        // Its own disks keep only what was flushed (the SAN stays up).
        let name = &self.names[index];
        self.storage.crash_location(name);
        self.storage.crash_location(&format!("{name}-archive"));
    }

    /// Boots host `index` again in its next life: empty, or with what
    /// its database kept when the world is durable.
    pub async fn restart(&self, index: usize) {
        let (name, incarnation, store) = {
            let hosts = self.hosts.borrow();
            if hosts[index].up {
                return;
            }
            let store = if self.setup.durable {
                hosts[index].store.clone()
            } else {
                MemStore::new()
            };
            (
                hosts[index].name.clone(),
                hosts[index].incarnation + 1,
                store,
            )
        };
        let host = boot_host(Boot {
            net: &self.net,
            name: &name,
            names: &self.names,
            memory_mib: self.memory_mib,
            incarnation,
            storage: &self.storage,
            store,
            budgets: self.setup.budgets,
            ledger: &self.ledger,
        })
        .await;
        self.hosts.borrow_mut()[index] = host;
    }

    /// Simulated time since the start.
    pub fn elapsed(&self) -> std::time::Duration {
        Instant::now() - self.started
    }

    /// Sends `request` to host `index` and waits for its final reply.
    pub async fn request(&self, index: usize, request: ClientRequest) -> ClientReply {
        if !self.is_up(index) {
            return ClientReply::Error("host is down".into());
        }
        let actor = self.actor(index);
        request_to(&actor, request).await
    }

    /// Creates and starts a VM on host `index`.
    pub async fn create_vm(&self, index: usize, name: &str, memory_mib: u64, wss_mib: u64) {
        self.create_vm_with_disk(index, name, memory_mib, wss_mib, 0)
            .await;
    }

    /// Creates and starts a VM on host `index`, with a disk of `disk_mib`
    /// on the host's `local` datastore running the disk workload (none
    /// for 0).
    pub async fn create_vm_with_disk(
        &self,
        index: usize,
        name: &str,
        memory_mib: u64,
        wss_mib: u64,
        disk_mib: u64,
    ) {
        let disks = if disk_mib == 0 {
            Vec::new()
        } else {
            vec![ferry_actors::node::client::DiskSpec {
                size_mib: disk_mib,
                datastore: "local".into(),
            }]
        };
        let spec = VmSpec {
            linux: None,
            name: name.to_owned(),
            memory_mib,
            vcpus: 1,
            wss_mib,
            synthetic: true,
            cpu_features: Vec::new(),
            disk_workload: disk_mib > 0,
            disks,
        };
        let created = self.request(index, ClientRequest::CreateVm(spec)).await;
        assert_eq!(created, ClientReply::Ok, "creating {name}");
        let started = self
            .request(index, ClientRequest::StartVm(name.to_owned()))
            .await;
        assert_eq!(started, ClientReply::Ok, "starting {name}");
    }

    /// The VMs host `index` has (any phase).
    pub async fn host_vms(&self, index: usize) -> Census {
        match self.request(index, ClientRequest::ListVms).await {
            ClientReply::Vms(vms) => Census(Some(vms.into_iter().map(|v| v.name).collect())),
            _ => Census(None),
        }
    }

    /// Every VM each host reports, by VM name.
    pub async fn census(&self) -> BTreeMap<String, Vec<VmInfo>> {
        let mut all: BTreeMap<String, Vec<VmInfo>> = BTreeMap::new();
        for i in 0..self.names.len() {
            if let ClientReply::Vms(vms) = self.request(i, ClientRequest::ListVms).await {
                for v in vms {
                    all.entry(v.name.clone()).or_default().push(v);
                }
            }
        }
        all
    }

    /// Host index by name.
    pub fn index_of(&self, host: &str) -> Option<usize> {
        self.names.iter().position(|h| h == host)
    }
}

/// VM names a host reported (`None`: it did not answer).
pub struct Census(pub Option<Vec<String>>);

/// Sends `request` to `host` and waits for its final reply.
pub async fn request_to(
    host: &ActorRef<HostMsg<SimTransport>>,
    request: ClientRequest,
) -> ClientReply {
    let (tx, mut rx) = mpsc::unbounded_channel();
    if host
        .cast(HostMsg::Client(
            request,
            "CN=sim,OU=admin,O=ferry".into(),
            tx,
        ))
        .is_err()
    {
        return ClientReply::Error("host actor gone".into());
    }
    while let Some(reply) = rx.recv().await {
        if !matches!(reply, ClientReply::Progress(_)) {
            return reply;
        }
    }
    ClientReply::Error("host dropped the request".into())
}

/// Migrates `vm` from host `from` to `to`.
pub async fn migrate(
    host: &ActorRef<HostMsg<SimTransport>>,
    vm: &str,
    to: &str,
    options: MigrateOptions,
) -> Result<MigrationReport, String> {
    match request_to(
        host,
        ClientRequest::Migrate {
            vm: vm.to_owned(),
            to: to.to_owned(),
            options,
        },
    )
    .await
    {
        ClientReply::Report(r) => Ok(r),
        ClientReply::Error(e) => Err(e),
        other => Err(format!("unexpected reply {other:?}")),
    }
}

/// Checks the rule that holds at every instant: no VM runs on two hosts.
pub fn at_most_one_running(census: &BTreeMap<String, Vec<VmInfo>>) -> Result<(), String> {
    for (vm, copies) in census {
        let running: Vec<&str> = copies
            .iter()
            .filter(|c| c.running)
            .map(|c| c.host.as_str())
            .collect();
        if running.len() > 1 {
            return Err(format!("{vm} runs on {running:?} at once"));
        }
    }
    Ok(())
}

/// In a settled cluster, checks every running VM's disk: each write its
/// disk workload acknowledged is on it, and no host but the VM's keeps
/// files of it (a half-copied destination left behind).
pub async fn disk_violations(
    world: &World,
    census: &BTreeMap<String, Vec<VmInfo>>,
    maybe_lost: &std::collections::BTreeSet<String>,
) -> Vec<Violation> {
    let mut out = Vec::new();
    for (vm, copies) in census {
        let Some(owner) = copies.iter().find(|c| c.running) else {
            continue;
        };
        let index = world.index_of(&owner.host).expect("a host");
        let request = ClientRequest::Disks {
            vm: vm.clone(),
            verify: true,
        };
        match world.request(index, request).await {
            ClientReply::Disks(disks) => {
                for d in disks {
                    if let Some(e) = d.verify_error {
                        out.push(Violation::new(
                            Kind::WriteLost,
                            format!("{vm} on {}: {}: {e}", owner.host, d.name),
                        ));
                    }
                }
            }
            other => out.push(Violation::new(
                Kind::WriteLost,
                format!("{vm}: its disks cannot be read: {other:?}"),
            )),
        }
        if maybe_lost.contains(vm) {
            continue;
        }
        for (location, path) in world.storage.files() {
            let stray = path.starts_with(&format!("{vm}/"))
                && location != owner.host
                && world.names().contains(&location);
            if stray {
                out.push(Violation::new(
                    Kind::LeftBehind,
                    format!("{vm} runs on {} but {location} keeps {path}", owner.host),
                ));
            }
        }
    }
    out
}

/// Checks the rules of a settled cluster (hosts up, no migration in
/// flight): every VM of `expected` runs on exactly one host (a VM in
/// `maybe_lost` lived on a host that crashed: it may also be gone), and
/// nothing is left half-way (no shadow, no VM still marked as leaving, no
/// second copy).
pub fn settled(
    census: &BTreeMap<String, Vec<VmInfo>>,
    expected: &[String],
    maybe_lost: &std::collections::BTreeSet<String>,
) -> Result<(), Violation> {
    for vm in expected {
        let copies = census.get(vm).map(Vec::as_slice).unwrap_or_default();
        let running = copies.iter().filter(|c| c.running).count();
        if copies.is_empty() && maybe_lost.contains(vm) {
            continue;
        }
        if running != 1 {
            let kind = if running == 0 {
                Kind::VmLost
            } else {
                Kind::TwoHosts
            };
            return Err(Violation::new(
                kind,
                format!(
                    "{vm} runs on {running} hosts once settled: {:?}",
                    copies
                        .iter()
                        .map(|c| (&c.host, c.phase, c.running))
                        .collect::<Vec<_>>()
                ),
            ));
        }
        if let Some(c) = copies
            .iter()
            .find(|c| matches!(c.phase, VmPhase::Incoming | VmPhase::MigratingOut))
        {
            return Err(Violation::new(
                Kind::LeftBehind,
                format!("{vm} left {:?} on {}", c.phase, c.host),
            ));
        }
        if copies.len() > 1 {
            return Err(Violation::new(
                Kind::LeftBehind,
                format!(
                    "{vm} has copies on {:?}",
                    copies.iter().map(|c| &c.host).collect::<Vec<_>>()
                ),
            ));
        }
    }
    Ok(())
}
