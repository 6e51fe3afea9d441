//! Mutual TLS: peers without a certificate from the cluster CA are dropped
//! during the handshake, before any application byte, and both sides say why.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::quic_pair;
use ferry_transport::mem::MemNetwork;
use ferry_transport::pki::ClusterCa;
use ferry_transport::quic::{QuicAddr, QuicConnection, QuicTransport, QuicTuning};
use ferry_transport::session;
use ferry_transport::{PeerIdentity, Role, Transport, TransportError};

const LIMIT: Duration = Duration::from_secs(10);

/// Drives a client attempt as far as it goes: connect, then the version
/// handshake (TLS 1.3 lets a client finish its side before the server has
/// checked the client's certificate). Returns the error text.
async fn client_attempt(
    attempt: impl Future<Output = Result<QuicConnection, TransportError>>,
) -> String {
    let outcome = tokio::time::timeout(LIMIT, async {
        let conn = attempt.await.map_err(|e| e.to_string())?;
        session::open(conn, "intruder").await.map_err(|e| {
            // Show the whole chain: the handshake error sits in the source.
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            text
        })
    })
    .await
    .expect("a refused client must not hang");
    match outcome {
        Ok(_) => panic!("a client without a valid certificate got a session"),
        Err(text) => text,
    }
}

async fn expect_rejection(server: &QuicTransport) -> String {
    match tokio::time::timeout(LIMIT, server.accept())
        .await
        .expect("accept must not hang")
    {
        Err(e @ TransportError::PeerRejected { .. }) => {
            assert!(e.is_per_peer());
            e.to_string()
        }
        Err(other) => panic!("expected a rejected peer, got {other}"),
        Ok(conn) => panic!(
            "server accepted {}",
            ferry_transport::Connection::peer(&conn)
        ),
    }
}

fn foreign_credentials(name: &str) -> ferry_transport::pki::Credentials {
    ClusterCa::generate("other")
        .expect("ca")
        .credentials(name, Role::Admin)
        .expect("creds")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_certificate_is_dropped_and_told_why() {
    let pair = quic_pair();
    // Trusts the cluster CA but presents no certificate at all.
    let anon = pair
        .ca
        .as_ref()
        .expect("quic pair has a CA")
        .credentials("anyone", Role::Viewer)
        .expect("creds")
        .anonymous_client_config()
        .expect("tls");
    let (client_err, server_err) = tokio::join!(
        client_attempt(pair.client.connect_with(&pair.addr, anon)),
        expect_rejection(&pair.server)
    );
    assert!(
        server_err.contains("certificate"),
        "server said: {server_err}"
    );
    assert!(
        client_err.contains("certificate"),
        "client saw: {client_err}"
    );

    // The server keeps serving valid peers.
    let (s, c) = tokio::join!(pair.server.accept(), pair.client.connect(&pair.addr));
    assert_eq!(
        ferry_transport::Connection::peer(&s.expect("accept")).name,
        "alice"
    );
    drop(c.expect("connect"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_from_another_cluster_is_dropped() {
    let pair = quic_pair();
    let outsider = QuicTransport::bind(
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        &foreign_credentials("mallory"),
        &QuicTuning::loopback(),
    )
    .expect("bind");
    // The outsider trusts its own CA, so it even refuses the server first;
    // give it one that trusts ours to get as far as presenting its cert.
    let (client_err, server_err) = tokio::join!(
        client_attempt(outsider.connect(&pair.addr)),
        expect_rejection(&pair.server)
    );
    assert!(
        server_err.contains("certificate") || server_err.contains("UnknownIssuer"),
        "server said: {server_err}"
    );
    assert!(
        client_err.contains("certificate") || client_err.contains("UnknownIssuer"),
        "client saw: {client_err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_with_wrong_name_is_refused_by_the_client() {
    let pair = quic_pair();
    let wrong = QuicAddr {
        socket: pair.addr.socket,
        name: "host-b".into(),
    };
    let (client_err, _server) = tokio::join!(
        client_attempt(pair.client.connect(&wrong)),
        tokio::time::timeout(Duration::from_secs(2), pair.server.accept())
    );
    assert!(
        client_err.contains("host-b") && client_err.to_lowercase().contains("certificate"),
        "client saw: {client_err}"
    );
}

#[tokio::test]
async fn in_memory_outsider_is_rejected_like_quic() {
    let net = MemNetwork::new();
    let server = net.endpoint(PeerIdentity::new("host-a", Role::Host));
    let outsider = net.outsider(PeerIdentity::new("mallory", Role::Admin));
    let err = outsider
        .connect(&"host-a".to_owned())
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("certificate"), "{err}");
    let err = server.accept().await.expect_err("rejected");
    assert!(
        err.is_per_peer() && err.to_string().contains("certificate"),
        "{err}"
    );
}

fn revoking(ca: &ClusterCa, cert_pem: &str) -> String {
    use ferry_transport::revocation::{RevocationList, Revoked, certificate_serial};
    let list = RevocationList {
        number: 1,
        revoked: vec![Revoked {
            serial: certificate_serial(cert_pem).expect("serial"),
            at_unix: 1_796_000_000,
        }],
    };
    ca.sign_list(&list, 1_796_000_000).expect("signed list")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_client_is_refused_once_the_server_reloads_its_list() {
    use ferry_transport::pki::Credentials;
    let ca = ClusterCa::generate("test").expect("ca");
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let tuning = QuicTuning::loopback();
    let host = ca.issue("host-a", Role::Host).expect("host");
    let host_creds =
        || Credentials::from_pem(&host.cert_pem, &host.key_pem, &ca.cert_pem()).expect("creds");
    let server = QuicTransport::bind(loopback, &host_creds(), &tuning).expect("bind");
    let alice = ca.issue("alice", Role::Operator).expect("alice");
    let alice_creds =
        Credentials::from_pem(&alice.cert_pem, &alice.key_pem, &ca.cert_pem()).expect("creds");
    let client = QuicTransport::bind(loopback, &alice_creds, &tuning).expect("bind");
    let addr = QuicAddr {
        socket: server.local_addr().expect("addr"),
        name: "host-a".into(),
    };
    let (s, c) = tokio::join!(server.accept(), client.connect(&addr));
    c.expect("alice connects before the revocation");
    s.expect("accepted");

    let list = revoking(&ca, &alice.cert_pem);
    server
        .reload(&host_creds().with_revocations(&list).expect("list loads"))
        .expect("reload");
    let (client_err, server_err) = tokio::join!(
        client_attempt(client.connect(&addr)),
        expect_rejection(&server)
    );
    assert!(server_err.contains("Revoked"), "server said: {server_err}");
    assert!(
        client_err.contains("revoked: ask an admin"),
        "client saw: {client_err}"
    );
    // Other users still get in.
    let bob = ca.credentials("bob", Role::Viewer).expect("bob");
    let bob = QuicTransport::bind(loopback, &bob, &tuning).expect("bind");
    let (s, c) = tokio::join!(server.accept(), bob.connect(&addr));
    c.expect("bob connects");
    assert_eq!(
        ferry_transport::Connection::peer(&s.expect("accept")).name,
        "bob"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_refuses_a_revoked_node() {
    let ca = ClusterCa::generate("test").expect("ca");
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let tuning = QuicTuning::loopback();
    let host = ca.issue("host-a", Role::Host).expect("host");
    let server_creds =
        ferry_transport::pki::Credentials::from_pem(&host.cert_pem, &host.key_pem, &ca.cert_pem())
            .expect("creds");
    let server = QuicTransport::bind(loopback, &server_creds, &tuning).expect("bind");
    let client_creds = ca
        .credentials("alice", Role::Operator)
        .expect("creds")
        .with_revocations(&revoking(&ca, &host.cert_pem))
        .expect("list loads");
    let client = QuicTransport::bind(loopback, &client_creds, &tuning).expect("bind");
    let addr = QuicAddr {
        socket: server.local_addr().expect("addr"),
        name: "host-a".into(),
    };
    let (client_err, _) = tokio::join!(client_attempt(client.connect(&addr)), async {
        let _ = tokio::time::timeout(Duration::from_secs(2), server.accept()).await;
    });
    assert!(client_err.contains("Revoked"), "client saw: {client_err}");
}

#[test]
fn a_list_naming_ourselves_or_signed_by_another_ca_is_refused_at_load() {
    use ferry_transport::pki::{Credentials, PkiError};
    let ca = ClusterCa::generate("test").expect("ca");
    let alice = ca.issue("alice", Role::Operator).expect("alice");
    let creds =
        || Credentials::from_pem(&alice.cert_pem, &alice.key_pem, &ca.cert_pem()).expect("creds");
    let err = creds()
        .with_revocations(&revoking(&ca, &alice.cert_pem))
        .expect_err("our own certificate is on the list");
    assert!(matches!(err, PkiError::OwnRevoked { .. }), "{err}");
    let other = ClusterCa::generate("other").expect("ca");
    let foreign = other
        .sign_list(&Default::default(), 1_796_000_000)
        .expect("list");
    let err = creds()
        .with_revocations(&foreign)
        .expect_err("a list the CA did not sign");
    assert!(err.to_string().contains("certificate"), "{err}");
    assert!(creds().with_revocations("no list here").is_err());
}
