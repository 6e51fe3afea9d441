//! Who is at the other end of a connection: name and role from the peer's
//! certificate subject (`CN=name, OU=role, O=ferry`).

use std::fmt;
use std::str::FromStr;

/// What a certificate holder may do. Authorization is decided by the layers
/// above; the transport only reports the role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A ferry node (host).
    Host,
    /// A user with every right.
    Admin,
    /// A user who may run migrations and VMs.
    Operator,
    /// A user who may only look.
    Viewer,
}

impl Role {
    /// The role's name in certificates and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::Admin => "admin",
            Self::Operator => "operator",
            Self::Viewer => "viewer",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "host" => Self::Host,
            "admin" => Self::Admin,
            "operator" => Self::Operator,
            "viewer" => Self::Viewer,
            other => {
                return Err(format!(
                    "unknown role {other:?} (expected host, admin, operator or viewer)"
                ));
            }
        })
    }
}

/// The authenticated identity of a peer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    /// The certificate's common name: a host name or a user name.
    pub name: String,
    /// The role in the certificate.
    pub role: Role,
    /// The full subject, as the audit log records it.
    pub subject: String,
}

impl PeerIdentity {
    /// An identity with the subject ferry's CA would give it.
    pub fn new(name: impl Into<String>, role: Role) -> Self {
        let name = name.into();
        let subject = format!("CN={name}, OU={role}, O=ferry");
        Self {
            name,
            role,
            subject,
        }
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.role)
    }
}

/// Reads the identity from a DER certificate.
pub fn identity_from_der(der: &[u8]) -> Result<PeerIdentity, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unparsable peer certificate: {e}"))?;
    let subject = cert.subject();
    let first = |it: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue>| {
        it.next().and_then(|a| a.as_str().ok()).map(str::to_owned)
    };
    let name =
        first(&mut subject.iter_common_name()).ok_or("peer certificate has no common name")?;
    let role = first(&mut subject.iter_organizational_unit())
        .ok_or("peer certificate has no role (OU)")?;
    Ok(PeerIdentity {
        name,
        role: role.parse()?,
        subject: subject.to_string(),
    })
}
