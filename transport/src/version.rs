//! Protocol version handshake: the first exchange on a connection.
//!
//! The connecting side sends [`Hello`] with its version; the accepting side
//! answers [`HelloReply::Accepted`] with the version both will speak (the
//! lower of the two) when the peer's version is the current or the previous
//! one, and [`HelloReply::Refused`] otherwise. The refusal names both sides'
//! versions so an operator can see which node to upgrade.
//!
//! ## Versions
//! - 1: first wire format (page and extent batches, control messages).
//! - 2: current.

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 2;

/// The oldest version this build still accepts.
pub const PROTOCOL_VERSION_PREVIOUS: u16 = PROTOCOL_VERSION - 1;

/// First message on a connection, from the connecting side.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Hello {
    /// The sender's protocol version.
    pub version: u16,
    /// The sender's host or client name, for logs.
    pub name: String,
}

pub use reply::HelloReply;

mod reply {
    // rkyv derives an archived twin of the enum whose fields carry no docs.
    #![allow(missing_docs)]

    /// The accepting side's answer.
    #[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
    pub enum HelloReply {
        /// Both sides speak `version` from now on.
        Accepted {
            /// Negotiated version.
            version: u16,
        },
        /// The connection will be closed.
        Refused {
            /// Why, naming both versions.
            reason: String,
        },
    }
}

/// A version the other side cannot speak.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error(
    "protocol version mismatch: peer speaks v{peer}, this node speaks v{ours} and accepts v{oldest}..=v{ours}"
)]
pub struct VersionMismatch {
    /// The peer's version.
    pub peer: u16,
    /// Ours.
    pub ours: u16,
    /// The oldest we accept.
    pub oldest: u16,
}

/// Decides which version to speak with a peer that announced `peer`.
pub fn negotiate(peer: u16) -> Result<u16, VersionMismatch> {
    if peer == PROTOCOL_VERSION || peer == PROTOCOL_VERSION_PREVIOUS {
        Ok(peer.min(PROTOCOL_VERSION))
    } else {
        Err(VersionMismatch {
            peer,
            ours: PROTOCOL_VERSION,
            oldest: PROTOCOL_VERSION_PREVIOUS,
        })
    }
}

/// The reply to a peer's hello.
pub fn reply_to(hello: &Hello) -> HelloReply {
    match negotiate(hello.version) {
        Ok(version) => HelloReply::Accepted { version },
        Err(e) => HelloReply::Refused {
            reason: e.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_and_previous_are_accepted() {
        assert_eq!(negotiate(PROTOCOL_VERSION), Ok(PROTOCOL_VERSION));
        assert_eq!(
            negotiate(PROTOCOL_VERSION_PREVIOUS),
            Ok(PROTOCOL_VERSION_PREVIOUS)
        );
    }

    #[test]
    fn others_are_refused_naming_both_versions() {
        for v in [0, PROTOCOL_VERSION + 1, 999] {
            let err = negotiate(v).expect_err("must refuse");
            let text = err.to_string();
            assert!(text.contains(&format!("v{v}")), "{text}");
            assert!(text.contains(&format!("v{PROTOCOL_VERSION}")), "{text}");
        }
    }
}
