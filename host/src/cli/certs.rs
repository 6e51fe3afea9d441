//! `ferry cluster revoke`, `rotate` and `certs`: withdrawing and renewing
//! the certificates of a cluster directory.
//!
//! The revocation list `crl.pem` lives beside `ca.pem`; node and client
//! files name it (`crl = "crl.pem"`). Nodes read it again within
//! [`crate::node::reload::POLL`] of a change, or at once on SIGHUP.

use std::path::Path;

use anyhow::Context;
use ferry_transport::pki::ClusterCa;
use ferry_transport::revocation::{
    CertificateFacts, RevocationList, Revoked, certificate_facts, read_list, serial_text,
};

use crate::node::config::{ClientConfig, NodeConfig};

/// The revocation list's file in a cluster directory.
pub const CRL_FILE: &str = "crl.pem";

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn date(unix: i64) -> String {
    let at = u64::try_from(unix).map(|s| std::time::UNIX_EPOCH + std::time::Duration::from_secs(s));
    match at {
        Ok(at) => humantime::format_rfc3339_seconds(at).to_string()[..10].to_owned(),
        Err(_) => format!("@{unix}"),
    }
}

/// Writes an empty revocation list (cluster init).
pub fn write_empty_list(dir: &Path, ca: &ClusterCa) -> anyhow::Result<()> {
    replace(
        &dir.join(CRL_FILE),
        &ca.sign_list(&RevocationList::default(), now_unix())?,
        0o644,
    )
}

fn current_list(dir: &Path) -> anyhow::Result<RevocationList> {
    let path = dir.join(CRL_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => read_list(&text).with_context(|| format!("reading {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RevocationList::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// NAME's certificate; with `or_revoked`, the one set aside when it was
/// revoked will do (rotating issues a revoked user or host a new one).
fn certificate(
    dir: &Path,
    name: &str,
    or_revoked: bool,
) -> anyhow::Result<(String, CertificateFacts)> {
    anyhow::ensure!(
        name != "ca" && name != "crl",
        "{name:?} is not a host or user: the CA itself cannot be revoked or rotated here"
    );
    let mut path = dir.join(format!("{name}.pem"));
    let set_aside = dir.join(format!("{name}.pem.revoked"));
    if or_revoked && !path.exists() && set_aside.exists() {
        path = set_aside;
    }
    let pem = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no certificate for {name} in {} (ferry cluster certs lists them)",
            dir.display()
        )
    })?;
    let facts = certificate_facts(&pem).with_context(|| format!("reading {}", path.display()))?;
    Ok((pem, facts))
}

/// Writes `text` to `path` through a temporary file and a rename, so a
/// node reading it sees the old or the new file, never half of one.
fn replace(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

fn add_to_list(dir: &Path, ca: &ClusterCa, serial: Vec<u8>) -> anyhow::Result<bool> {
    let mut list = current_list(dir)?;
    if list.names(&serial) {
        return Ok(false);
    }
    list.number += 1;
    list.revoked.push(Revoked {
        serial,
        at_unix: now_unix(),
    });
    replace(
        &dir.join(CRL_FILE),
        &ca.sign_list(&list, now_unix())?,
        0o644,
    )?;
    Ok(true)
}

/// Makes every node and client file in `dir` name the revocation list;
/// returns the nodes that must restart to start reading it.
fn name_list_everywhere(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut restart = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let file = path.file_name().and_then(|f| f.to_str()).unwrap_or("");
        if !file.ends_with(".toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        if file.starts_with("node-") {
            let mut node: NodeConfig =
                toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
            if node.crl.is_none() {
                node.crl = Some(CRL_FILE.into());
                replace(&path, &toml::to_string_pretty(&node)?, 0o644)?;
                restart.push(node.name);
            }
        } else if file.starts_with("client") {
            let mut client: ClientConfig =
                toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
            if client.crl.is_none() {
                client.crl = Some(CRL_FILE.into());
                replace(&path, &toml::to_string_pretty(&client)?, 0o644)?;
            }
        }
    }
    Ok(restart)
}

fn set_aside(dir: &Path, name: &str) -> anyhow::Result<()> {
    for ext in ["pem", "key"] {
        let path = dir.join(format!("{name}.{ext}"));
        if path.exists() {
            std::fs::rename(&path, dir.join(format!("{name}.{ext}.revoked")))
                .with_context(|| format!("setting {} aside", path.display()))?;
        }
    }
    Ok(())
}

/// `ferry cluster revoke NAME`.
pub fn revoke(dir: &Path, name: &str) -> anyhow::Result<()> {
    let ca = super::cluster::load_ca(dir)?;
    let (_, facts) = certificate(dir, name, false)?;
    let serial = serial_text(&facts.serial);
    if !add_to_list(dir, &ca, facts.serial)? {
        println!("{name}'s certificate (serial {serial}) is already revoked");
        return Ok(());
    }
    set_aside(dir, name)?;
    let restart = name_list_everywhere(dir)?;
    println!(
        "revoked {name} ({}, serial {serial}): {CRL_FILE} updated; nodes refuse it within {} s \
         (at once on SIGHUP). Hosts with their own copy of the cluster files need the new {CRL_FILE}.",
        facts.identity.role,
        crate::node::reload::POLL.as_secs()
    );
    if !restart.is_empty() {
        println!(
            "these nodes did not read a revocation list: restart them to apply it: {}",
            restart.join(", ")
        );
    }
    Ok(())
}

/// `ferry cluster rotate NAME`: a new key and certificate with the same
/// name and role (also for a revoked one); with `revoke_old`, the old
/// certificate is revoked too.
pub fn rotate(dir: &Path, name: &str, revoke_old: bool) -> anyhow::Result<()> {
    let ca = super::cluster::load_ca(dir)?;
    let (_, old) = certificate(dir, name, true)?;
    let new = ca.issue(name, old.identity.role)?;
    let facts = certificate_facts(&new.cert_pem)?;
    // Key first: a node reading between the two writes finds a mismatch,
    // keeps its old credentials and reads again at the next change.
    replace(&dir.join(format!("{name}.key")), &new.key_pem, 0o600)?;
    replace(&dir.join(format!("{name}.pem")), &new.cert_pem, 0o644)?;
    println!(
        "{name} ({}) has a new key and certificate, valid until {}; a node using them reads \
         them within {} s (at once on SIGHUP)",
        old.identity.role,
        date(facts.not_after_unix),
        crate::node::reload::POLL.as_secs()
    );
    if revoke_old {
        add_to_list(dir, &ca, old.serial.clone())?;
        name_list_everywhere(dir)?;
        println!(
            "the old certificate (serial {}) is revoked",
            serial_text(&old.serial)
        );
    }
    Ok(())
}

/// `ferry cluster certs`: every certificate in the directory, its role,
/// the end of its validity and whether it is revoked.
pub fn list(dir: &Path) -> anyhow::Result<()> {
    let revoked = current_list(dir)?;
    let mut rows = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let file = path.file_name().and_then(|f| f.to_str()).unwrap_or("");
        let Some(name) = file.strip_suffix(".pem") else {
            continue;
        };
        if name == "ca" || name == "crl" {
            continue;
        }
        let Ok(facts) = certificate_facts(&std::fs::read_to_string(&path)?) else {
            continue;
        };
        let left = (facts.not_after_unix - now_unix()) / 86_400;
        let state = if revoked.names(&facts.serial) {
            "REVOKED".to_owned()
        } else if left < 30 {
            format!("renew soon: {left} days left (ferry cluster rotate {name})")
        } else {
            format!("{left} days left")
        };
        rows.push(format!(
            "{name:<16} {:<9} until {}  {state}",
            facts.identity.role.to_string(),
            date(facts.not_after_unix)
        ));
    }
    rows.sort();
    println!("{:<16} {:<9} {:<17} STATE", "NAME", "ROLE", "VALID");
    for row in rows {
        println!("{row}");
    }
    println!(
        "{} certificates revoked in {CRL_FILE}",
        revoked.revoked.len()
    );
    Ok(())
}
