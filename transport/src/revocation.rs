//! Certificate revocation: the cluster CA signs a revocation list (CRL,
//! PEM) naming the serial numbers of the certificates it withdrew; every
//! endpoint given the list refuses those certificates at the TLS
//! handshake (see [`Credentials::with_revocations`](crate::pki::Credentials::with_revocations)).
//!
//! The list is the only record: revoking one more certificate reads the
//! current list, adds an entry and signs it again with the next number.

use rustls::pki_types::CertificateRevocationListDer;
use rustls::pki_types::pem::PemObject;

use crate::pki::{ClusterCa, PkiError};

/// How long a revocation list is declared current. Nodes do not enforce
/// it (a list stays in force until replaced); it is what the CRL format
/// asks for.
pub const LIST_DAYS: i64 = 365;

/// One withdrawn certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// The certificate's serial number (big-endian bytes).
    pub serial: Vec<u8>,
    /// When it was revoked (Unix seconds).
    pub at_unix: i64,
}

/// A revocation list read back: its number and entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevocationList {
    /// The list's sequence number (0 for none yet).
    pub number: u64,
    /// The withdrawn certificates.
    pub revoked: Vec<Revoked>,
}

fn pem_error(what: &'static str) -> impl Fn(String) -> PkiError {
    move |reason| PkiError::Pem { what, reason }
}

/// What revoking or renewing a certificate needs to know of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFacts {
    /// Whom it names, with which role.
    pub identity: crate::PeerIdentity,
    /// Its serial number (big-endian bytes).
    pub serial: Vec<u8>,
    /// The end of its validity (Unix seconds).
    pub not_after_unix: i64,
}

/// Reads the certificate in `cert_pem`.
pub fn certificate_facts(cert_pem: &str) -> Result<CertificateFacts, PkiError> {
    let der = rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| pem_error("certificate")(e.to_string()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| pem_error("certificate")(e.to_string()))?;
    Ok(CertificateFacts {
        identity: crate::identity::identity_from_der(&der).map_err(PkiError::Identity)?,
        serial: trim(cert.raw_serial()),
        not_after_unix: cert.validity().not_after.timestamp(),
    })
}

/// The serial number of the certificate in `cert_pem`.
pub fn certificate_serial(cert_pem: &str) -> Result<Vec<u8>, PkiError> {
    certificate_facts(cert_pem).map(|f| f.serial)
}

/// A serial number as colon-separated hex, as tools print it.
pub fn serial_text(serial: &[u8]) -> String {
    serial
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A serial as DER carries a leading zero when its top bit is set.
fn trim(serial: &[u8]) -> Vec<u8> {
    let start = serial.iter().position(|b| *b != 0).unwrap_or(serial.len());
    serial[start..].to_vec()
}

/// Reads a revocation list (PEM) back.
pub fn read_list(crl_pem: &str) -> Result<RevocationList, PkiError> {
    let der = CertificateRevocationListDer::from_pem_slice(crl_pem.as_bytes())
        .map_err(|e| pem_error("revocation list")(e.to_string()))?;
    let (_, crl) = x509_parser::parse_x509_crl(&der)
        .map_err(|e| pem_error("revocation list")(e.to_string()))?;
    let number = crl
        .crl_number()
        .and_then(|n| u64::try_from(n).ok())
        .unwrap_or(0);
    let revoked = crl
        .iter_revoked_certificates()
        .map(|r| Revoked {
            serial: trim(r.raw_serial()),
            at_unix: r.revocation_date.timestamp(),
        })
        .collect();
    Ok(RevocationList { number, revoked })
}

fn unix_time(seconds: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(seconds).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

impl RevocationList {
    /// Whether the certificate with `serial` is on the list.
    pub fn names(&self, serial: &[u8]) -> bool {
        self.revoked.iter().any(|r| r.serial == serial)
    }
}

impl ClusterCa {
    /// Signs `list` as a revocation list (PEM), current from `now_unix`.
    pub fn sign_list(&self, list: &RevocationList, now_unix: i64) -> Result<String, PkiError> {
        let now = unix_time(now_unix);
        let params = rcgen::CertificateRevocationListParams {
            this_update: now,
            next_update: now + time::Duration::days(LIST_DAYS),
            crl_number: rcgen::SerialNumber::from(list.number),
            issuing_distribution_point: None,
            revoked_certs: list
                .revoked
                .iter()
                .map(|r| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(&r.serial),
                    revocation_time: unix_time(r.at_unix),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let (cert, key) = self.signer();
        Ok(params.signed_by(cert, key)?.pem()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Role;

    #[test]
    fn a_signed_list_reads_back_with_its_serials() {
        let ca = ClusterCa::generate("test").expect("ca");
        let issued = ca.issue("alice", Role::Operator).expect("cert");
        let serial = certificate_serial(&issued.cert_pem).expect("serial");
        assert!(!serial.is_empty() && serial[0] != 0);
        let list = RevocationList {
            number: 3,
            revoked: vec![Revoked {
                serial: serial.clone(),
                at_unix: 1_796_000_000,
            }],
        };
        let pem = ca.sign_list(&list, 1_796_000_100).expect("signed");
        assert_eq!(read_list(&pem).expect("reads"), list);
        let empty = ca
            .sign_list(&RevocationList::default(), 1_796_000_100)
            .expect("signed");
        assert_eq!(read_list(&empty).expect("reads"), RevocationList::default());
        assert!(read_list("not a list").is_err());
    }
}
