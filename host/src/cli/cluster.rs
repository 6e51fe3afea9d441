//! `ferry cluster init`: a cluster CA, certificates and config files.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use std::os::unix::fs::DirBuilderExt;

use anyhow::Context;
use clap::{Args, Subcommand};
use ferry_transport::Role;
use ferry_transport::pki::ClusterCa;

use crate::node::config::{CapacityConfig, ClientConfig, DatastoreConfig, NodeConfig, Peer};

/// Cluster commands.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Print the CPU features every node supports (comma-separated): the
    /// CPU model of VMs that may run on any host (`vm create --cpu-model
    /// baseline`).
    CpuBaseline(super::client::ClientArgs),
    /// Make a CA, host and user certificates, `node-NAME.toml` per host and
    /// `client.toml`, in one directory.
    Init(InitArgs),
    /// Issue a host certificate and `node-NAME.toml` from the cluster's CA
    /// (in --dir), and add the host to the other node files and to
    /// `client.toml` (restart the nodes to pick it up).
    AddHost {
        /// Host name.
        name: String,
        /// Its address (ADDR:PORT).
        #[arg(long)]
        addr: SocketAddr,
        /// The cluster directory (`ca.pem`, `ca.key`, node files).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Withdraw a host's or user's certificate: it goes into the cluster's
    /// revocation list (`crl.pem`), which every node checks at each
    /// handshake and reads again when it changes; its files are set aside.
    Revoke {
        /// Host or user name.
        name: String,
        /// The cluster directory.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Give a host or user a new key and certificate (same name and role),
    /// before the old one expires or after it was revoked; a node picks
    /// its new one up without restarting.
    Rotate {
        /// Host or user name.
        name: String,
        /// Also revoke the old certificate (after a key was exposed).
        #[arg(long)]
        revoke_old: bool,
        /// The cluster directory.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// List the certificates in the cluster directory: role, end of
    /// validity, revoked or not.
    Certs {
        /// The cluster directory.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Issue a user certificate with a role, and `client-NAME.toml` to use
    /// it (`FERRY_CLIENT=client-NAME.toml ferry ...`).
    AddUser {
        /// User name.
        name: String,
        /// admin (everything), operator (VMs and migrations) or viewer
        /// (reads).
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// The cluster directory.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    parse_user(&format!("x={s}")).map(|(_, r)| r)
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
    ferry_actors::node::values::check_name("host name", name).map_err(|e| e.to_string())?;
    let addr = addr
        .parse()
        .map_err(|e| format!("{addr:?} is not an address: {e}"))?;
    Ok((name.to_owned(), addr))
}

fn parse_user(s: &str) -> Result<(String, Role), String> {
    let (name, role) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=ROLE, e.g. alice=operator"))?;
    ferry_actors::node::values::check_name("user name", name).map_err(|e| e.to_string())?;
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
        ClusterCommand::CpuBaseline(args) => super::client::print_cpu_baseline(&args),
        ClusterCommand::AddHost { name, addr, dir } => {
            ferry_actors::node::values::check_name("host name", &name)?;
            add_host(&dir, &name, addr)
        }
        ClusterCommand::Revoke { name, dir } => super::certs::revoke(&dir, &name),
        ClusterCommand::Rotate {
            name,
            revoke_old,
            dir,
        } => super::certs::rotate(&dir, &name, revoke_old),
        ClusterCommand::Certs { dir } => super::certs::list(&dir),
        ClusterCommand::AddUser { name, role, dir } => {
            ferry_actors::node::values::check_name("user name", &name)?;
            add_user(&dir, &name, role)
        }
    }
}

pub(super) fn load_ca(dir: &Path) -> anyhow::Result<ClusterCa> {
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f)).with_context(|| {
            format!(
                "reading {} (run ferry cluster init first)",
                dir.join(f).display()
            )
        })
    };
    Ok(ClusterCa::from_pem(&read("ca.pem")?, &read("ca.key")?)?)
}

fn issue(dir: &Path, ca: &ClusterCa, name: &str, role: Role) -> anyhow::Result<()> {
    ferry_transport::pki::check_name(name)?;
    anyhow::ensure!(
        !dir.join(format!("{name}.pem")).exists(),
        "{} exists: {name} already has a certificate",
        dir.join(format!("{name}.pem")).display()
    );
    let cert = ca.issue(name, role)?;
    write_new(&dir.join(format!("{name}.pem")), &cert.cert_pem)?;
    write_key(&dir.join(format!("{name}.key")), &cert.key_pem)?;
    Ok(())
}

/// Rewrites a TOML file in place, atomically.
fn rewrite(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

fn add_host(dir: &Path, name: &str, addr: SocketAddr) -> anyhow::Result<()> {
    let ca = load_ca(dir)?;
    let client_path = dir.join("client.toml");
    let mut client: ClientConfig = toml::from_str(
        &std::fs::read_to_string(&client_path)
            .with_context(|| format!("reading {}", client_path.display()))?,
    )?;
    anyhow::ensure!(
        client.nodes.iter().all(|n| n.name != name),
        "{name} is already in {}",
        client_path.display()
    );
    issue(dir, &ca, name, Role::Host)?;
    let peers = client.nodes.clone();
    let me = Peer {
        name: name.to_owned(),
        addr,
    };
    let mut config = node_config(name, addr, 16384, 16);
    config.crl = crl_of(dir);
    config.peers = peers.clone();
    write_new(
        &dir.join(format!("node-{name}.toml")),
        &toml::to_string_pretty(&config)?,
    )?;
    for p in &peers {
        let path = dir.join(format!("node-{}.toml", p.name));
        if let Ok(text) = std::fs::read_to_string(&path) {
            let mut other: NodeConfig = toml::from_str(&text)?;
            other.peers.push(me.clone());
            rewrite(&path, &toml::to_string_pretty(&other)?)?;
        }
    }
    client.nodes.push(me);
    rewrite(&client_path, &toml::to_string_pretty(&client)?)?;
    println!(
        "{name}: {name}.pem, node-{name}.toml; added to client.toml and {} node files (restart those nodes)",
        peers.len()
    );
    Ok(())
}

fn add_user(dir: &Path, name: &str, role: Role) -> anyhow::Result<()> {
    let ca = load_ca(dir)?;
    let client_path = dir.join("client.toml");
    let client: ClientConfig = toml::from_str(
        &std::fs::read_to_string(&client_path)
            .with_context(|| format!("reading {}", client_path.display()))?,
    )?;
    issue(dir, &ca, name, role)?;
    let mine = ClientConfig {
        ca: "ca.pem".into(),
        cert: format!("{name}.pem").into(),
        key: format!("{name}.key").into(),
        crl: crl_of(dir),
        nodes: client.nodes,
    };
    let file = format!("client-{name}.toml");
    write_new(&dir.join(&file), &toml::to_string_pretty(&mine)?)?;
    println!("{name} ({role}): {name}.pem and {file}; use it with FERRY_CLIENT={file}");
    Ok(())
}

/// The revocation list for a new node or client file: the directory's,
/// if it has one (clusters made before revocation have none).
fn crl_of(dir: &Path) -> Option<PathBuf> {
    let file = super::certs::CRL_FILE;
    dir.join(file).exists().then(|| file.into())
}

fn node_config(name: &str, addr: SocketAddr, memory_mib: u64, vcpus: u32) -> NodeConfig {
    NodeConfig {
        name: name.to_owned(),
        listen: addr,
        ca: "ca.pem".into(),
        cert: format!("{name}.pem").into(),
        key: format!("{name}.key").into(),
        crl: Some(super::certs::CRL_FILE.into()),
        capacity: CapacityConfig { memory_mib, vcpus },
        synthetic_guests: false,
        otlp_endpoint: None,
        bridge: None,
        state_db: None,
        vmm_dir: None,
        budgets: ferry_actors::ops::jobs::Budgets::default(),
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
        peers: Vec::new(),
    }
}

fn write_new(path: &Path, text: &str) -> anyhow::Result<()> {
    write_new_mode(path, text, 0o644)
}

/// A private key: readable by its owner only.
fn write_key(path: &Path, text: &str) -> anyhow::Result<()> {
    write_new_mode(path, text, 0o600)
}

fn write_new_mode(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

fn init(args: &InitArgs) -> anyhow::Result<()> {
    if !args.dir.exists() {
        // A directory of its own holds the CA's and every host's private
        // key: its owner's only. (An existing one keeps its mode; the
        // keys in it are private anyway.)
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&args.dir)
            .with_context(|| format!("creating {}", args.dir.display()))?;
    }
    let ca = ClusterCa::generate("ferry")?;
    write_new(&args.dir.join("ca.pem"), &ca.cert_pem())?;
    write_key(&args.dir.join("ca.key"), &ca.key_pem())?;
    super::certs::write_empty_list(&args.dir, &ca)?;
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
        write_key(&args.dir.join(format!("{name}.key")), &cert.key_pem)?;
        let mut config = node_config(name, *addr, args.memory_mib, args.vcpus);
        config.peers = peers.iter().filter(|p| &p.name != name).cloned().collect();
        write_new(
            &args.dir.join(format!("node-{name}.toml")),
            &toml::to_string_pretty(&config)?,
        )?;
    }
    for (i, (name, role)) in args.users.iter().enumerate() {
        let cert = ca.issue(name, *role)?;
        write_new(&args.dir.join(format!("{name}.pem")), &cert.cert_pem)?;
        write_key(&args.dir.join(format!("{name}.key")), &cert.key_pem)?;
        if i == 0 {
            let client = ClientConfig {
                ca: "ca.pem".into(),
                cert: format!("{name}.pem").into(),
                key: format!("{name}.key").into(),
                crl: Some(super::certs::CRL_FILE.into()),
                nodes: peers.clone(),
            };
            write_new(
                &args.dir.join("client.toml"),
                &toml::to_string_pretty(&client)?,
            )?;
        }
    }
    println!(
        "cluster in {}: ca.pem (keep ca.key off the nodes), crl.pem, {} node files, client.toml for {}",
        args.dir.display(),
        args.hosts.len(),
        args.users.first().map_or("nobody", |u| u.0.as_str())
    );
    Ok(())
}
