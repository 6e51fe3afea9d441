//! A node's credentials follow their files: when its certificate, key, CA
//! or revocation list changes (or on SIGHUP), the node reads them again and
//! serves and dials with them from the next handshake on. Credentials that
//! do not load (a key and certificate caught between two writes, a list
//! naming this node) leave the old ones in place, with a warning.

use std::sync::Arc;
use std::time::Duration;

use ferry_transport::quic::QuicTransport;

use super::config::CredentialFiles;

/// How often the files are looked at.
pub const POLL: Duration = Duration::from_secs(2);

/// Watches `files` for the life of the runtime, reloading `transport`.
pub fn spawn(files: CredentialFiles, transport: Arc<QuicTransport>) -> anyhow::Result<()> {
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    tokio::spawn(async move {
        let mut seen = files.stamp();
        loop {
            let asked = tokio::select! {
                _ = hangup.recv() => true,
                () = tokio::time::sleep(POLL) => false,
            };
            let now = files.stamp();
            if !asked && now == seen {
                continue;
            }
            seen = now;
            reload(&files, &transport);
        }
    });
    Ok(())
}

fn reload(files: &CredentialFiles, transport: &QuicTransport) {
    let loaded = files.load().and_then(|creds| Ok(transport.reload(&creds)?));
    match loaded {
        Ok(()) => tracing::info!(
            cert = %files.cert.display(),
            crl = ?files.crl,
            "credentials reloaded: they apply from the next handshake"
        ),
        Err(e) => tracing::warn!("credentials not reloaded, keeping the old ones: {e:#}"),
    }
}
