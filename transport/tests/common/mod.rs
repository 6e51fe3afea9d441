//! Builds connected endpoint pairs for each transport implementation.

#![allow(dead_code, missing_docs)]

use std::net::{Ipv4Addr, SocketAddr};

use ferry_transport::mem::{MemNetwork, MemTransport};
use ferry_transport::pki::ClusterCa;
use ferry_transport::quic::{QuicAddr, QuicTransport, QuicTuning};
use ferry_transport::{PeerIdentity, Role, Transport};

/// A server endpoint, a client endpoint and the address the client dials.
pub struct Pair<T: Transport> {
    pub server: T,
    pub client: T,
    pub addr: T::Addr,
    /// The CA that issued both certificates (QUIC only).
    pub ca: Option<ClusterCa>,
}

pub fn mem_pair() -> Pair<MemTransport> {
    let net = MemNetwork::new();
    Pair {
        server: net.endpoint(PeerIdentity::new("host-a", Role::Host)),
        client: net.endpoint(PeerIdentity::new("alice", Role::Operator)),
        addr: "host-a".to_owned(),
        ca: None,
    }
}

pub fn quic_pair() -> Pair<QuicTransport> {
    let ca = ClusterCa::generate("test").expect("ca");
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let tuning = QuicTuning::loopback();
    let server = QuicTransport::bind(
        loopback,
        &ca.credentials("host-a", Role::Host).expect("creds"),
        &tuning,
    )
    .expect("bind server");
    let client = QuicTransport::bind(
        loopback,
        &ca.credentials("alice", Role::Operator).expect("creds"),
        &tuning,
    )
    .expect("bind client");
    let addr = QuicAddr {
        socket: server.local_addr().expect("addr"),
        name: "host-a".into(),
    };
    Pair {
        server,
        client,
        addr,
        ca: Some(ca),
    }
}
