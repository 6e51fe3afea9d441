//! The cluster's public-key infrastructure: a cluster CA that issues node and
//! user certificates, and the rustls configurations that demand them.
//!
//! Every certificate carries `CN=<name>, OU=<role>, O=ferry` and the name as
//! a DNS subject-alternative name (a node's certificate is checked against
//! the host name a client dialled). One crypto provider serves the whole
//! workspace: rustls over *ring*, with AES-128-GCM preferred (the fastest
//! cipher on these machines).

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use crate::identity::{PeerIdentity, Role, identity_from_der};

/// ALPN protocol name of ferry connections.
pub const ALPN: &[u8] = b"ferry";

/// Why a certificate or TLS configuration could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused to generate or sign.
    #[error("generate certificate")]
    Generate(#[from] rcgen::Error),
    /// PEM input could not be read.
    #[error("read {what} PEM: {reason}")]
    Pem {
        /// Which input.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("tls configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The private key is not the certificate's.
    #[error(
        "the private key does not belong to the certificate for {subject}: give the key that was issued with it"
    )]
    KeyMismatch {
        /// The certificate's subject.
        subject: String,
    },
    /// The revocation list names our own certificate.
    #[error(
        "the certificate for {subject} is revoked: ask an admin for a new one (ferry cluster rotate NAME)"
    )]
    OwnRevoked {
        /// Our certificate's subject.
        subject: String,
    },
    /// A certificate verifier could not be built (a revocation list not
    /// signed by the cluster CA, for one).
    #[error("certificate verifier: {0}")]
    Verifier(String),
    /// A name that cannot be a certificate name.
    #[error("invalid name {0:?}: use letters, digits, '-' and '.'")]
    BadName(String),
    /// The certificate does not carry a ferry identity.
    #[error("certificate identity: {0}")]
    Identity(String),
}

/// The crypto provider every ferry TLS configuration uses.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// Checks that `name` can be a certificate common name and DNS name.
pub fn check_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && !name.starts_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(PkiError::BadName(name.to_owned()))
    }
}

/// The cluster certificate authority.
pub struct ClusterCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa").finish_non_exhaustive()
    }
}

/// A certificate and its private key, in PEM.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
}

/// How long a cluster CA is valid.
pub const CA_DAYS: i64 = 10 * 365;
/// How long a host's or user's certificate is valid (issue a new one
/// before: `ferry cluster add-host`/`add-user`).
pub const ISSUED_DAYS: i64 = 2 * 365;

/// From an hour ago (clocks differ a little) to `days` from now.
fn validity(days: i64) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let now =
        time::OffsetDateTime::from_unix_timestamp(now).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    (
        now - time::Duration::hours(1),
        now + time::Duration::days(days),
    )
}

impl ClusterCa {
    /// A new CA for the cluster `cluster`.
    pub fn generate(cluster: &str) -> Result<Self, PkiError> {
        check_name(cluster)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{cluster} cluster CA"));
        dn.push(DnType::OrganizationName, "ferry");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        (params.not_before, params.not_after) = validity(CA_DAYS);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    /// Loads a CA saved with [`ClusterCa::cert_pem`] and [`ClusterCa::key_pem`].
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let params = CertificateParams::from_ca_cert_pem(cert_pem)?;
        // Re-signing yields a certificate with the same subject and key, which
        // is all chain validation looks at.
        let cert = params.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    pub(crate) fn signer(&self) -> (&rcgen::Certificate, &KeyPair) {
        (&self.cert, &self.key)
    }

    /// The CA certificate.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// The CA private key: keep it off the nodes.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Issues a certificate for `name` with `role`.
    pub fn issue(&self, name: &str, role: Role) -> Result<IssuedCert, PkiError> {
        check_name(name)?;
        let mut params = CertificateParams::new(vec![name.to_owned()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationalUnitName, role.as_str());
        dn.push(DnType::OrganizationName, "ferry");
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        (params.not_before, params.not_after) = validity(ISSUED_DAYS);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues a certificate for `name` and bundles it with this CA into
    /// ready-to-use credentials.
    pub fn credentials(&self, name: &str, role: Role) -> Result<Credentials, PkiError> {
        let issued = self.issue(name, role)?;
        Credentials::from_pem(&issued.cert_pem, &issued.key_pem, &self.cert_pem())
    }
}

/// What an endpoint needs to take part in the cluster: its certificate
/// chain and key, and the cluster CA it trusts.
#[derive(Debug)]
pub struct Credentials {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    ca: Vec<CertificateDer<'static>>,
    revocations: Vec<CertificateRevocationListDer<'static>>,
    identity: PeerIdentity,
}

impl Clone for Credentials {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            ca: self.ca.clone(),
            revocations: self.revocations.clone(),
            identity: self.identity.clone(),
        }
    }
}

impl Credentials {
    /// Credentials from PEM text: certificate (chain), key and CA certificate.
    pub fn from_pem(cert_pem: &str, key_pem: &str, ca_pem: &str) -> Result<Self, PkiError> {
        let pem_err = |what| {
            move |e: rustls::pki_types::pem::Error| PkiError::Pem {
                what,
                reason: e.to_string(),
            }
        };
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem_err("certificate"))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(pem_err("key"))?;
        let ca = CertificateDer::pem_slice_iter(ca_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem_err("CA certificate"))?;
        let first = chain.first().ok_or(PkiError::Pem {
            what: "certificate",
            reason: "no certificate in the file".into(),
        })?;
        if ca.is_empty() {
            return Err(PkiError::Pem {
                what: "CA certificate",
                reason: "no certificate in the file".into(),
            });
        }
        let identity = identity_from_der(first).map_err(PkiError::Identity)?;
        let signing = crypto_provider()
            .key_provider
            .load_private_key(key.clone_key())?;
        let certified = rustls::sign::CertifiedKey::new(vec![first.clone()], signing);
        if let Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) =
            certified.keys_match()
        {
            return Err(PkiError::KeyMismatch {
                subject: identity.subject.clone(),
            });
        }
        Ok(Self {
            chain,
            key,
            ca,
            revocations: Vec::new(),
            identity,
        })
    }

    /// These credentials, refusing every certificate that the revocation
    /// list `crl_pem` (signed by the cluster CA) names, at each handshake.
    pub fn with_revocations(mut self, crl_pem: &str) -> Result<Self, PkiError> {
        self.revocations = CertificateRevocationListDer::pem_slice_iter(crl_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| PkiError::Pem {
                what: "revocation list",
                reason: e.to_string(),
            })?;
        if self.revocations.is_empty() {
            return Err(PkiError::Pem {
                what: "revocation list",
                reason: "no revocation list in the file".into(),
            });
        }
        self.check_own_certificate()?;
        Ok(self)
    }

    /// Checks our own certificate against the CA and the revocation list
    /// as a peer would: a list the CA did not sign (which would make every
    /// peer's status unknown, so refused) or one naming us fails here, at
    /// load, rather than at every handshake.
    fn check_own_certificate(&self) -> Result<(), PkiError> {
        let verifier = self.server_verifier()?;
        let (leaf, rest) = self.chain.split_first().ok_or(PkiError::Pem {
            what: "certificate",
            reason: "no certificate in the file".into(),
        })?;
        let name = rustls::pki_types::ServerName::try_from(self.identity.name.clone())
            .map_err(|e| PkiError::Identity(e.to_string()))?;
        rustls::client::danger::ServerCertVerifier::verify_server_cert(
            verifier.as_ref(),
            leaf,
            rest,
            &name,
            &[],
            rustls::pki_types::UnixTime::now(),
        )
        .map(|_| ())
        .map_err(|e| match e {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked) => {
                PkiError::OwnRevoked {
                    subject: self.identity.subject.clone(),
                }
            }
            other => PkiError::Tls(other),
        })
    }

    fn server_verifier(&self) -> Result<Arc<WebPkiServerVerifier>, PkiError> {
        let mut verifier =
            WebPkiServerVerifier::builder_with_provider(self.roots()?, crypto_provider());
        if !self.revocations.is_empty() {
            verifier = verifier
                .with_crls(self.revocations.clone())
                .only_check_end_entity_revocation();
        }
        verifier
            .build()
            .map_err(|e| PkiError::Verifier(e.to_string()))
    }

    /// Who these credentials say we are.
    pub fn identity(&self) -> &PeerIdentity {
        &self.identity
    }

    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, PkiError> {
        let mut roots = rustls::RootCertStore::empty();
        for ca in &self.ca {
            roots.add(ca.clone())?;
        }
        Ok(Arc::new(roots))
    }

    /// A TLS 1.3 server configuration that requires a client certificate
    /// signed by the cluster CA.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, PkiError> {
        let provider = crypto_provider();
        let mut verifier =
            WebPkiClientVerifier::builder_with_provider(self.roots()?, provider.clone());
        if !self.revocations.is_empty() {
            verifier = verifier
                .with_crls(self.revocations.clone())
                .only_check_end_entity_revocation();
        }
        let verifier = verifier
            .build()
            .map_err(|e| PkiError::Verifier(e.to_string()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }

    /// A TLS 1.3 client configuration that presents our certificate and
    /// trusts only the cluster CA.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, PkiError> {
        let mut config = rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_webpki_verifier(self.server_verifier()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }

    /// A client configuration that trusts the cluster CA but presents no
    /// certificate (what an outsider would try; tests use it).
    pub fn anonymous_client_config(&self) -> Result<rustls::ClientConfig, PkiError> {
        let mut config = rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots()?)
            .with_no_client_auth();
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificate_carries_name_and_role() {
        let ca = ClusterCa::generate("test").expect("ca");
        let creds = ca.credentials("host-a", Role::Host).expect("creds");
        assert_eq!(creds.identity().name, "host-a");
        assert_eq!(creds.identity().role, Role::Host);
        assert!(creds.identity().subject.contains("CN=host-a"));
        let user = ca.credentials("alice", Role::Viewer).expect("creds");
        assert_eq!(user.identity().role, Role::Viewer);
    }

    #[test]
    fn certificates_live_for_years_not_centuries() {
        let ca = ClusterCa::generate("test").expect("ca");
        let issued = ca.issue("host-a", Role::Host).expect("issue");
        let days = |pem: &str| {
            let p = CertificateParams::from_ca_cert_pem(pem).expect("parse");
            let now = validity(0).1;
            assert!(p.not_before < now && p.not_before > now - time::Duration::days(1));
            (p.not_after - p.not_before).whole_days()
        };
        assert_eq!(days(&ca.cert_pem()), CA_DAYS);
        assert_eq!(days(&issued.cert_pem), ISSUED_DAYS);
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused_saying_so() {
        let ca = ClusterCa::generate("test").expect("ca");
        let a = ca.issue("host-a", Role::Host).expect("issue");
        let b = ca.issue("host-b", Role::Host).expect("issue");
        let e =
            Credentials::from_pem(&a.cert_pem, &b.key_pem, &ca.cert_pem()).expect_err("mismatch");
        assert!(matches!(e, PkiError::KeyMismatch { .. }), "{e}");
        assert!(e.to_string().contains("CN=host-a"), "{e}");
        Credentials::from_pem(&a.cert_pem, &a.key_pem, &ca.cert_pem()).expect("matching pair");
    }

    #[test]
    fn ca_survives_a_pem_round_trip() {
        let ca = ClusterCa::generate("test").expect("ca");
        let again = ClusterCa::from_pem(&ca.cert_pem(), &ca.key_pem()).expect("load");
        let issued = again.issue("host-b", Role::Host).expect("issue");
        // Issued by the reloaded CA, trusted through the original CA cert.
        let creds =
            Credentials::from_pem(&issued.cert_pem, &issued.key_pem, &ca.cert_pem()).expect("pem");
        creds.server_config().expect("server config");
    }

    #[test]
    fn bad_names_and_pem_are_refused() {
        let ca = ClusterCa::generate("test").expect("ca");
        assert!(matches!(
            ca.issue("", Role::Host),
            Err(PkiError::BadName(_))
        ));
        assert!(matches!(
            ca.issue("a b", Role::Host),
            Err(PkiError::BadName(_))
        ));
        assert!(Credentials::from_pem("junk", "junk", "junk").is_err());
    }
}
