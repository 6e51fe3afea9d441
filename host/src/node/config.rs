//! `node.toml` and `client.toml`: what a node and a client need to know.
//!
//! ```toml
//! # node.toml
//! name = "host-a"                 # must match the certificate's name
//! listen = "127.0.0.1:7701"
//! ca = "certs/ca.pem"
//! cert = "certs/host-a.pem"
//! key = "certs/host-a.key"
//!
//! memory_pool_mib = [4096]      # keep 4 GiB faulted in for incoming guests
//!
//! [capacity]
//! memory_mib = 16384
//! vcpus = 8
//!
//! [[peers]]
//! name = "host-b"
//! addr = "127.0.0.1:7702"
//! ```
//!
//! A client file has `ca`, `cert`, `key` and the same `[[nodes]]` list
//! (`name`, `addr`). Relative paths are relative to the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use ferry_transport::pki::Credentials;
use ferry_transport::quic::QuicAddr;
use serde::{Deserialize, Serialize};

/// A peer or node address book entry. Unknown keys are refused: in TOML a
/// node key written after a `[[peers]]` table lands in that peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    /// Host name (its certificate's).
    pub name: String,
    /// UDP address.
    pub addr: SocketAddr,
}

impl Peer {
    /// As a QUIC address.
    pub fn quic(&self) -> QuicAddr {
        QuicAddr {
            socket: self.addr,
            name: self.name.clone(),
        }
    }
}

/// What VMs may use on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapacityConfig {
    /// Guest memory over all VMs, in MiB.
    pub memory_mib: u64,
    /// vCPUs over all VMs.
    pub vcpus: u32,
}

/// `node.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Host name; must match the certificate.
    pub name: String,
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Cluster CA certificate (PEM).
    pub ca: PathBuf,
    /// This node's certificate (PEM).
    pub cert: PathBuf,
    /// Its key (PEM).
    pub key: PathBuf,
    /// The cluster's revocation list (PEM, from `ferry cluster revoke`):
    /// certificates it names are refused at the handshake. The node reads
    /// it again, with its certificate and key, when one of them changes
    /// or on SIGHUP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl: Option<PathBuf>,
    /// What VMs may use.
    pub capacity: CapacityConfig,
    /// Use synthetic guests even where KVM works.
    #[serde(default)]
    pub synthetic_guests: bool,
    /// Guest sizes (MiB) to keep memory faulted in for, so incoming
    /// migrations of that size do not pay for first touch (slow on these
    /// machines); each is refilled at low priority after use.
    #[serde(default)]
    pub memory_pool_mib: Vec<u64>,
    /// Datastores: directories for VM homes and disks. Hosts that name
    /// the same directory share the datastore (a VM moving between them
    /// moves only its disks' locks).
    #[serde(default)]
    pub datastores: Vec<DatastoreConfig>,
    /// An OpenTelemetry collector to send traces and metrics to, over
    /// OTLP/HTTP (e.g. `http://127.0.0.1:4318`); without it,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` is used if set, else nothing is
    /// exported.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// The node's database (inventory, jobs, migration records, audit
    /// log), relative to this file; default `ferry-NAME.db` beside it.
    #[serde(default)]
    pub state_db: Option<PathBuf>,
    /// Where the node keeps its VMM processes' sockets and logs (one
    /// process per KVM VM; they outlive the node, which finds them here
    /// when it starts again), relative to this file; default
    /// `ferry-NAME-vmm` beside it.
    #[serde(default)]
    pub vmm_dir: Option<PathBuf>,
    /// The Linux bridge Linux guests' NICs join (a tap each); without it
    /// their NICs have no cable. After a migration the destination
    /// announces the guest's MAC on it (RARP).
    #[serde(default)]
    pub bridge: Option<String>,
    /// How many migrations may run at once (`host_live`, `host_storage`,
    /// `datastore_storage`, `link`); defaults 8, 2, 8 and 4.
    #[serde(default)]
    pub budgets: ferry_actors::ops::jobs::Budgets,
    /// The other hosts.
    #[serde(default)]
    pub peers: Vec<Peer>,
}

/// One datastore of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatastoreConfig {
    /// Name VMs and `--datastore` use.
    pub name: String,
    /// Its directory (created if missing).
    pub path: PathBuf,
}

/// `client.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Cluster CA certificate (PEM).
    pub ca: PathBuf,
    /// The client's certificate (PEM).
    pub cert: PathBuf,
    /// Its key (PEM).
    pub key: PathBuf,
    /// The cluster's revocation list (PEM): nodes whose certificates it
    /// names are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl: Option<PathBuf>,
    /// The nodes.
    pub nodes: Vec<Peer>,
}

/// The most guest memory a node file may offer: 1 PiB (its bytes fit a
/// u64 many times over).
pub const CAPACITY_MIB_MAX: u64 = 1 << 30;

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        base.join(p)
    }
}

/// The folder a config file is in, as an absolute path: what the file
/// names is relative to it, and stays so if the working folder changes.
fn folder_of(path: &Path) -> anyhow::Result<PathBuf> {
    let path = std::path::absolute(path).with_context(|| format!("locating {}", path.display()))?;
    Ok(path.parent().unwrap_or(Path::new("/")).to_owned())
}

/// The files an endpoint's credentials come from, as absolute paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialFiles {
    /// Cluster CA certificate.
    pub ca: PathBuf,
    /// The endpoint's certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// The revocation list, if any.
    pub crl: Option<PathBuf>,
}

impl CredentialFiles {
    fn resolved(base: &Path, ca: &Path, cert: &Path, key: &Path, crl: Option<&Path>) -> Self {
        Self {
            ca: resolve(base, ca),
            cert: resolve(base, cert),
            key: resolve(base, key),
            crl: crl.map(|c| resolve(base, c)),
        }
    }

    /// Makes the paths a config file gives (relative to `base`) absolute in
    /// place, and loads the credentials they name.
    fn take(
        base: &Path,
        [ca, cert, key]: [&mut PathBuf; 3],
        crl: &mut Option<PathBuf>,
    ) -> anyhow::Result<Credentials> {
        let files = Self::resolved(base, ca, cert, key, crl.as_deref());
        let creds = files.load()?;
        (*ca, *cert, *key, *crl) = (files.ca, files.cert, files.key, files.crl);
        Ok(creds)
    }

    /// Reads and checks the credentials.
    pub fn load(&self) -> anyhow::Result<Credentials> {
        let creds = Credentials::from_pem(&read(&self.cert)?, &read(&self.key)?, &read(&self.ca)?)
            .with_context(|| format!("loading the certificate {}", self.cert.display()))?;
        match &self.crl {
            None => Ok(creds),
            Some(crl) => creds
                .with_revocations(&read(crl)?)
                .with_context(|| format!("loading the revocation list {}", crl.display())),
        }
    }

    /// What changes when any of the files does (their sizes and times).
    pub fn stamp(&self) -> Vec<Option<(std::time::SystemTime, u64)>> {
        [
            Some(&self.ca),
            Some(&self.cert),
            Some(&self.key),
            self.crl.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(|p| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
    }
}

impl NodeConfig {
    /// Where this (loaded) node's credentials come from.
    pub fn credential_files(&self) -> CredentialFiles {
        CredentialFiles {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            crl: self.crl.clone(),
        }
    }

    /// Loads and checks a node file, returning it with its credentials.
    pub fn load(path: &Path) -> anyhow::Result<(Self, Credentials)> {
        let text = read(path)?;
        let mut config =
            Self::parse(&text).with_context(|| format!("parsing {}", path.display()))?;
        let base = folder_of(path)?;
        let creds = CredentialFiles::take(
            &base,
            [&mut config.ca, &mut config.cert, &mut config.key],
            &mut config.crl,
        )?;
        // Datastore folders are relative to the node file, like the keys.
        for d in &mut config.datastores {
            d.path = base.join(&d.path);
        }
        let db = config
            .state_db
            .clone()
            .unwrap_or_else(|| format!("ferry-{}.db", config.name).into());
        config.state_db = Some(resolve(&base, &db));
        let vmm_dir = config
            .vmm_dir
            .clone()
            .unwrap_or_else(|| format!("ferry-{}-vmm", config.name).into());
        config.vmm_dir = Some(resolve(&base, &vmm_dir));
        anyhow::ensure!(
            creds.identity().name == config.name,
            "{}: name is {:?} but the certificate is for {:?}",
            path.display(),
            config.name,
            creds.identity().name
        );
        anyhow::ensure!(
            creds.identity().role == ferry_transport::Role::Host,
            "{}: the certificate's role is {:?}, a node needs host",
            path.display(),
            creds.identity().role
        );
        Ok((config, creds))
    }

    /// Parses a node file's text and checks every value that needs no
    /// other file (names, capacity, budgets, datastores).
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let config: Self = toml::from_str(text)?;
        config.budgets.check().map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut names: Vec<&str> = config.datastores.iter().map(|d| d.name.as_str()).collect();
        names.sort_unstable();
        anyhow::ensure!(
            names.windows(2).all(|w| w[0] != w[1]),
            "two datastores share a name"
        );
        anyhow::ensure!(
            config.capacity.memory_mib > 0 && config.capacity.vcpus > 0,
            "capacity must be positive"
        );
        anyhow::ensure!(
            config.capacity.memory_mib <= CAPACITY_MIB_MAX,
            "capacity.memory_mib = {} is more than a host can have (at most {CAPACITY_MIB_MAX} MiB, 1 PiB)",
            config.capacity.memory_mib
        );
        let names = std::iter::once(("node name", &config.name))
            .chain(config.peers.iter().map(|p| ("peer name", &p.name)))
            .chain(
                config
                    .datastores
                    .iter()
                    .map(|d| ("datastore name", &d.name)),
            );
        for (what, name) in names {
            ferry_actors::node::values::check_name(what, name)?;
        }
        if let Some(bridge) = &config.bridge {
            check_interface_name(bridge)?;
        }
        Ok(config)
    }
}

/// A network interface's name as Linux takes it: 1 to 15 bytes of
/// letters, digits, `-`, `_` and `.`, not `.` or `..`.
fn check_interface_name(name: &str) -> anyhow::Result<()> {
    let ok = (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && name != "."
        && name != "..";
    anyhow::ensure!(
        ok,
        "bridge = {name:?} is not an interface name (1 to 15 letters, digits, '-', '_' or '.')"
    );
    Ok(())
}

impl ClientConfig {
    /// Loads a client file, returning it with its credentials.
    pub fn load(path: &Path) -> anyhow::Result<(Self, Credentials)> {
        let text = read(path)?;
        let mut config =
            Self::parse(&text).with_context(|| format!("parsing {}", path.display()))?;
        let base = folder_of(path)?;
        let creds = CredentialFiles::take(
            &base,
            [&mut config.ca, &mut config.cert, &mut config.key],
            &mut config.crl,
        )?;
        Ok((config, creds))
    }

    /// Parses a client file's text and checks it names at least one node.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let config: Self = toml::from_str(text)?;
        anyhow::ensure!(!config.nodes.is_empty(), "no [[nodes]]");
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_file_parses_and_rejects_unknown_keys() {
        let text = r#"
            name = "host-a"
            listen = "127.0.0.1:7701"
            ca = "ca.pem"
            cert = "host-a.pem"
            key = "host-a.key"
            [capacity]
            memory_mib = 1024
            vcpus = 4
            [[peers]]
            name = "host-b"
            addr = "127.0.0.1:7702"
        "#;
        let c: NodeConfig = toml::from_str(text).expect("parses");
        assert_eq!(c.peers[0].name, "host-b");
        assert!(!c.synthetic_guests);
        let bad = text.replace("vcpus = 4", "vcpus = 4\ncpus = 2");
        assert!(toml::from_str::<NodeConfig>(&bad).is_err());
    }

    #[test]
    fn a_bridge_must_be_an_interface_name() {
        let text = r#"
            name = "host-a"
            listen = "127.0.0.1:7701"
            ca = "ca.pem"
            cert = "host-a.pem"
            key = "host-a.key"
            bridge = "BRIDGE"
            [capacity]
            memory_mib = 1024
            vcpus = 4
        "#;
        let c = NodeConfig::parse(&text.replace("BRIDGE", "br-guests.1")).expect("parses");
        assert_eq!(c.bridge.as_deref(), Some("br-guests.1"));
        for bad in ["", "a bridge", "a/b", "..", "much-too-long-name"] {
            let err = NodeConfig::parse(&text.replace("BRIDGE", bad))
                .expect_err(bad)
                .to_string();
            assert!(err.contains("not an interface name"), "{bad}: {err}");
        }
    }
}
