//! A whole cluster in one process on loopback: throwaway CA and
//! certificates, one QUIC endpoint per node, a client. `ferry demo`,
//! `ferry bench migrate` and the host tests use it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_actors::api::Cluster;
use ferry_actors::migration::Capacity;
use ferry_actors::node::factory::GuestFactory;
use ferry_transport::Role;
use ferry_transport::pki::ClusterCa;
use ferry_transport::quic::{QuicAddr, QuicTransport, QuicTuning};

use super::Node;
use crate::net::path::NetPath;

/// Nodes and a client, all on 127.0.0.1.
pub struct LocalCluster {
    /// The nodes, in the order given.
    pub nodes: Vec<Node<QuicTransport>>,
    /// A client with an admin certificate.
    pub client: Cluster<QuicTransport>,
    /// Whether guests are KVM ones.
    pub kvm: bool,
    /// Every node's datastores live under here: `NODE/local`,
    /// `NODE/archive`, and `shared` (seen by every node).
    pub storage: tempfile::TempDir,
}

/// What each node of a [`LocalCluster`] may give its VMs.
#[derive(Debug, Clone)]
pub struct LocalCapacity {
    /// Memory in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// CPU features (default: this machine's).
    pub cpu_features: Option<BTreeSet<String>>,
}

impl Default for LocalCapacity {
    fn default() -> Self {
        Self {
            memory_mib: 16 << 10,
            vcpus: 16,
            cpu_features: None,
        }
    }
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// What joins the nodes of a [`LocalCluster`].
#[derive(Debug, Clone)]
pub enum LocalNetwork {
    /// Every node and the client on 127.0.0.1.
    Loopback,
    /// Two nodes on the two sides of a [`NetPath`]; the client on the
    /// first side.
    Path(Arc<NetPath>),
}

impl LocalNetwork {
    fn tuning(&self) -> QuicTuning {
        match self {
            Self::Loopback => QuicTuning::loopback(),
            Self::Path(p) => p.tuning(),
        }
    }

    fn check(&self, hosts: usize) -> anyhow::Result<()> {
        if matches!(self, Self::Path(_)) && hosts != 2 {
            anyhow::bail!("a network path joins two hosts, not {hosts}");
        }
        Ok(())
    }

    /// An endpoint for host `side` (the client: side 0).
    fn bind(
        &self,
        side: usize,
        creds: &ferry_transport::pki::Credentials,
        tuning: &QuicTuning,
    ) -> anyhow::Result<QuicTransport> {
        Ok(match self {
            Self::Loopback => QuicTransport::bind(loopback(), creds, tuning)?,
            Self::Path(p) => {
                let socket = p.bind_udp(side, tuning.socket_buffer_bytes)?;
                QuicTransport::with_socket(socket, creds, tuning)?
            }
        })
    }

    /// Where host `from` reaches `target`.
    fn reach(&self, from: usize, target: SocketAddr) -> anyhow::Result<SocketAddr> {
        Ok(match self {
            Self::Loopback => target,
            Self::Path(p) => p.reach(from, target)?,
        })
    }
}

impl LocalCluster {
    /// Starts `hosts` (name, capacity) with `factory` on loopback.
    pub async fn start(
        hosts: &[(&str, LocalCapacity)],
        factory: Arc<dyn GuestFactory>,
    ) -> anyhow::Result<Self> {
        Self::start_on(hosts, factory, &LocalNetwork::Loopback).await
    }

    /// Starts `hosts` (name, capacity) with `factory` on `network`.
    pub async fn start_on(
        hosts: &[(&str, LocalCapacity)],
        factory: Arc<dyn GuestFactory>,
        network: &LocalNetwork,
    ) -> anyhow::Result<Self> {
        network.check(hosts.len())?;
        let ca = ClusterCa::generate("demo").context("cluster CA")?;
        let tuning = network.tuning();
        let mut endpoints = Vec::new();
        for (side, (name, _)) in hosts.iter().enumerate() {
            let creds = ca.credentials(name, Role::Host)?;
            let t = network.bind(side, &creds, &tuning)?;
            let addr = t.local_addr()?;
            endpoints.push((name.to_string(), Arc::new(t), addr));
        }
        let storage = tempfile::Builder::new()
            .prefix("ferry-datastores-")
            .tempdir()
            .context("datastore folder")?;
        let mut nodes = Vec::new();
        for (side, ((name, t, _), (_, capacity))) in endpoints.iter().zip(hosts).enumerate() {
            let mut list = Vec::new();
            for (ds, dir) in [
                ("local", storage.path().join(name).join("local")),
                ("archive", storage.path().join(name).join("archive")),
                ("shared", storage.path().join("shared")),
            ] {
                std::fs::create_dir_all(&dir)?;
                list.push((ds.to_owned(), dir));
            }
            let stores = Arc::new(crate::datastore::FileDatastores::open(&list)?);
            let mut peers = BTreeMap::new();
            for (n, _, a) in endpoints.iter().filter(|(n, _, _)| n != name) {
                let socket = network.reach(side, *a)?;
                peers.insert(
                    n.clone(),
                    QuicAddr {
                        socket,
                        name: n.clone(),
                    },
                );
            }
            let capacity = Capacity {
                memory_bytes: capacity.memory_mib << 20,
                vcpus: capacity.vcpus,
                cpu_features: capacity
                    .cpu_features
                    .clone()
                    .unwrap_or_else(super::cpu_features),
                kvm: factory.kvm(),
            };
            nodes.push(
                Node::start(
                    name,
                    t.clone(),
                    peers,
                    capacity,
                    factory.clone(),
                    stores,
                    super::Operations::in_memory(),
                )
                .await?,
            );
        }
        let client_creds = ca.credentials("demo-admin", Role::Admin)?;
        let client_t = Arc::new(network.bind(0, &client_creds, &tuning)?);
        let client = Cluster::new(
            client_t,
            endpoints
                .iter()
                .map(|(n, _, a)| {
                    (
                        n.clone(),
                        QuicAddr {
                            socket: *a,
                            name: n.clone(),
                        },
                    )
                })
                .collect(),
        );
        Ok(Self {
            nodes,
            client,
            kvm: factory.kvm(),
            storage,
        })
    }

    /// Creates VM `name` on `node` (a KVM guest where the cluster has KVM),
    /// starts it and waits until its workload runs (the KVM guest fills
    /// its memory first).
    pub async fn start_vm(
        &self,
        node: &str,
        name: &str,
        memory_mib: u64,
        wss_mib: u64,
    ) -> anyhow::Result<()> {
        self.start_vm_with_disk(node, name, memory_mib, wss_mib, 0)
            .await
    }

    /// As [`Self::start_vm`], with a disk of `disk_mib` (none for 0) on
    /// the node's `local` datastore running the synthetic disk workload.
    pub async fn start_vm_with_disk(
        &self,
        node: &str,
        name: &str,
        memory_mib: u64,
        wss_mib: u64,
        disk_mib: u64,
    ) -> anyhow::Result<()> {
        let spec = self.vm_spec(name, memory_mib, wss_mib, disk_mib);
        self.create_and_start(node, spec, Duration::from_secs(300))
            .await
    }

    /// Creates a Linux guest `name` of `memory_mib` booting `linux` on
    /// `node`, with a disk of `disk_mib` (none for 0) that its disk writer
    /// fills with the verifiable pattern, starts it and waits until its
    /// dirtier has done two passes (the boot takes a while here:
    /// PLATFORM.md).
    pub async fn start_linux_vm(
        &self,
        node: &str,
        name: &str,
        memory_mib: u64,
        linux: ferry_actors::node::client::LinuxSpec,
        disk_mib: u64,
    ) -> anyhow::Result<()> {
        let mut spec = self.vm_spec(name, memory_mib, 0, disk_mib);
        spec.linux = Some(linux);
        self.create_and_start(node, spec, Duration::from_secs(300))
            .await
    }

    fn vm_spec(
        &self,
        name: &str,
        memory_mib: u64,
        wss_mib: u64,
        disk_mib: u64,
    ) -> ferry_actors::node::client::VmSpec {
        let disks = if disk_mib == 0 {
            Vec::new()
        } else {
            vec![ferry_actors::node::client::DiskSpec {
                size_mib: disk_mib,
                datastore: "local".into(),
            }]
        };
        ferry_actors::node::client::VmSpec {
            linux: None,
            name: name.to_owned(),
            memory_mib,
            vcpus: 1,
            wss_mib,
            synthetic: !self.kvm,
            cpu_features: Vec::new(),
            disk_workload: disk_mib > 0,
            disks,
        }
    }

    async fn create_and_start(
        &self,
        node: &str,
        spec: ferry_actors::node::client::VmSpec,
        ready_within: Duration,
    ) -> anyhow::Result<()> {
        let name = spec.name.clone();
        self.client.create_vm(node, spec).await?;
        self.client.vm(&name).start().await?;
        self.wait_for_pass(node, &name, 2, ready_within).await?;
        Ok(())
    }

    /// Waits until VM `vm` on `node` has completed `passes` passes of its
    /// workload (the KVM guest fills its memory first).
    pub async fn wait_for_pass(
        &self,
        node: &str,
        vm: &str,
        passes: u64,
        limit: Duration,
    ) -> anyhow::Result<u64> {
        let started = Instant::now();
        loop {
            let pass = self.guest_pass(node, vm).await?;
            if pass >= passes {
                return Ok(pass);
            }
            anyhow::ensure!(
                started.elapsed() < limit,
                "{vm} did only {pass} passes in {} s",
                limit.as_secs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The guest's pass counter.
    pub async fn guest_pass(&self, node: &str, vm: &str) -> anyhow::Result<u64> {
        self.client
            .list_vms(node)
            .await?
            .into_iter()
            .find(|v| v.name == vm)
            .map(|v| v.guest_pass)
            .with_context(|| format!("{vm} is not on {node}"))
    }
}
