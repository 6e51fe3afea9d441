//! `ferry node`: run this host's node until interrupted.

use anyhow::Context;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use ferry_actors::migration::Capacity;
use ferry_transport::quic::{QuicTransport, QuicTuning};

use crate::node::config::NodeConfig;
use crate::node::factory::HostFactory;
use crate::node::{Node, cpu_features};

/// Options of `ferry node`.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// The node's configuration file.
    #[arg(long, required = true)]
    pub config: Option<PathBuf>,
}

/// Runs a node.
pub fn run(args: &NodeArgs) -> anyhow::Result<()> {
    let path = args
        .config
        .as_ref()
        .context("ferry node: give --config FILE")?;
    let (config, creds) = NodeConfig::load(path)?;
    let telemetry = crate::telemetry::init(
        &config.name,
        crate::telemetry::endpoint(config.otlp_endpoint.as_deref()),
    )?;
    if let Some(e) = &telemetry.endpoint {
        eprintln!("node {}: sending traces and metrics to {e}", config.name);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let tuning = if config.listen.ip().is_loopback() {
            QuicTuning::loopback()
        } else {
            QuicTuning::default()
        };
        let transport = Arc::new(QuicTransport::bind(config.listen, &creds, &tuning)?);
        crate::node::reload::spawn(config.credential_files(), transport.clone())?;
        let factory = if config.synthetic_guests {
            HostFactory::synthetic_only()
        } else {
            let vmms = crate::vmm::VmmHome {
                exe: std::env::current_exe().context("finding the ferry binary for VMMs")?,
                dir: config.vmm_dir.clone().expect("set at load"),
            };
            if let Some(bridge) = &config.bridge {
                anyhow::ensure!(
                    std::path::Path::new("/sys/class/net").join(bridge).join("bridge").exists(),
                    "bridge {bridge:?} (the node file's `bridge`) is not a bridge on this host: \
                     create it (ip link add {bridge} type bridge; ip link set {bridge} up) or remove the key"
                );
            }
            HostFactory::probe()
                .with_pool(&config.memory_pool_mib)
                .with_vmms(vmms)
                .with_bridge(config.bridge.clone())
        };
        if !factory.kvm() && !config.synthetic_guests {
            eprintln!("WARNING: /dev/kvm is not usable here: this node runs synthetic guests only");
        }
        use ferry_actors::node::factory::GuestFactory;
        let capacity = Capacity {
            memory_bytes: config.capacity.memory_mib << 20,
            vcpus: config.capacity.vcpus,
            cpu_features: cpu_features(),
            kvm: factory.kvm(),
        };
        let peers = config
            .peers
            .iter()
            .map(|p| (p.name.clone(), p.quic()))
            .collect();
        let mut list = Vec::new();
        for d in &config.datastores {
            std::fs::create_dir_all(&d.path)
                .with_context(|| format!("datastore {} at {}", d.name, d.path.display()))?;
            list.push((d.name.clone(), d.path.clone()));
        }
        let stores = crate::datastore::FileDatastores::open(&list)?;
        let db = config
            .state_db
            .clone()
            .unwrap_or_else(|| format!("ferry-{}.db", config.name).into());
        let store = crate::store::SqliteStore::open(&db)
            .with_context(|| format!("opening the node database {}", db.display()))?;
        let _node = Node::start(
            &config.name,
            transport,
            peers,
            capacity,
            Arc::new(factory),
            Arc::new(stores),
            crate::node::Operations {
                store: Arc::new(store),
                budgets: config.budgets,
            },
        )
        .await?;
        eprintln!(
            "node {} listening on {} ({} peers, state in {}); Ctrl-C stops it",
            config.name,
            config.listen,
            config.peers.len(),
            db.display()
        );
        wait_for_stop().await?;
        eprintln!("node {} stopping", config.name);
        anyhow::Ok(())
    })?;
    // Dropping the guard flushes the spans still batched.
    drop(telemetry);
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn wait_for_stop() -> std::io::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r,
        _ = term.recv() => Ok(()),
    }
}
