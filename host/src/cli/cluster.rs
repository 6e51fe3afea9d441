//! `ferry cluster init`: a cluster CA, certificates and config files.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use ferry_transport::Role;
use ferry_transport::pki::ClusterCa;

use crate::node::config::{CapacityConfig, ClientConfig, DatastoreConfig, NodeConfig, Peer};

/// Cluster commands.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Make a CA, host and user certificates, `node-NAME.toml` per host and
    /// `client.toml`, in one directory.
    Init(InitArgs),
}

/// Options of `ferry cluster init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Output directory (created; existing files are not overwritten).
    #[arg(long)]
    pub dir: PathBuf,
    /// A host as NAME=ADDR (repeat for each host).
    #[arg(long = "host", value_parser = parse_host, required = true)]
    pub hosts: Vec<(String, SocketAddr)>,
    /// A user as NAME=ROLE (admin, operator, viewer); the first one goes
    /// into `client.toml`.
    #[arg(long = "user", value_parser = parse_user, default_value = "admin=admin")]
    pub users: Vec<(String, Role)>,
    /// Guest memory each node offers, in MiB.
    #[arg(long, default_value_t = 16384)]
    pub memory_mib: u64,
    /// vCPUs each node offers.
    #[arg(long, default_value_t = 16)]
    pub vcpus: u32,
}

fn parse_host(s: &str) -> Result<(String, SocketAddr), String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=ADDR, e.g. host-a=127.0.0.1:7701"))?;
    let addr = addr
        .parse()
        .map_err(|e| format!("{addr:?} is not an address: {e}"))?;
    Ok((name.to_owned(), addr))
}

fn parse_user(s: &str) -> Result<(String, Role), String> {
    let (name, role) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=ROLE, e.g. alice=operator"))?;
    let role = match role {
        "admin" => Role::Admin,
        "operator" => Role::Operator,
        "viewer" => Role::Viewer,
        other => return Err(format!("unknown role {other:?} (admin, operator, viewer)")),
    };
    Ok((name.to_owned(), role))
}

/// Runs a cluster command.
pub fn run(cmd: ClusterCommand) -> anyhow::Result<()> {
    match cmd {
        ClusterCommand::Init(args) => init(&args),
    }
}

fn write_new(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

fn init(args: &InitArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let ca = ClusterCa::generate("ferry")?;
    write_new(&args.dir.join("ca.pem"), &ca.cert_pem())?;
    write_new(&args.dir.join("ca.key"), &ca.key_pem())?;
    let peers: Vec<Peer> = args
        .hosts
        .iter()
        .map(|(name, addr)| Peer {
            name: name.clone(),
            addr: *addr,
        })
        .collect();
    for (name, addr) in &args.hosts {
        let cert = ca.issue(name, Role::Host)?;
        write_new(&args.dir.join(format!("{name}.pem")), &cert.cert_pem)?;
        write_new(&args.dir.join(format!("{name}.key")), &cert.key_pem)?;
        let config = NodeConfig {
            name: name.clone(),
            listen: *addr,
            ca: "ca.pem".into(),
            cert: format!("{name}.pem").into(),
            key: format!("{name}.key").into(),
            capacity: CapacityConfig {
                memory_mib: args.memory_mib,
                vcpus: args.vcpus,
            },
            synthetic_guests: false,
            otlp_endpoint: None,
            memory_pool_mib: Vec::new(),
            datastores: vec![
                DatastoreConfig {
                    name: "local".into(),
                    path: format!("datastores/{name}/local").into(),
                },
                DatastoreConfig {
                    name: "archive".into(),
                    path: format!("datastores/{name}/archive").into(),
                },
                DatastoreConfig {
                    name: "shared".into(),
                    path: "datastores/shared".into(),
                },
            ],
            peers: peers.iter().filter(|p| &p.name != name).cloned().collect(),
        };
        write_new(
            &args.dir.join(format!("node-{name}.toml")),
            &toml::to_string_pretty(&config)?,
        )?;
    }
    for (i, (name, role)) in args.users.iter().enumerate() {
        let cert = ca.issue(name, *role)?;
        write_new(&args.dir.join(format!("{name}.pem")), &cert.cert_pem)?;
        write_new(&args.dir.join(format!("{name}.key")), &cert.key_pem)?;
        if i == 0 {
            let client = ClientConfig {
                ca: "ca.pem".into(),
                cert: format!("{name}.pem").into(),
                key: format!("{name}.key").into(),
                nodes: peers.clone(),
            };
            write_new(
                &args.dir.join("client.toml"),
                &toml::to_string_pretty(&client)?,
            )?;
        }
    }
    println!(
        "cluster in {}: ca.pem (keep ca.key off the nodes), {} node files, client.toml for {}",
        args.dir.display(),
        args.hosts.len(),
        args.users.first().map_or("nobody", |u| u.0.as_str())
    );
    Ok(())
}
