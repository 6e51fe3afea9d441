//! Revocation and renewal on running nodes: a revoked operator is refused
//! at the handshake once the nodes see the new revocation list (no
//! restart), other users are not; a node whose certificate is rotated
//! (old one revoked) picks its new one up and keeps serving clients and
//! peers.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Node, ferry, ferry_status};

/// Retries `ferry ARGS` until `done` says yes about (succeeded, stdout,
/// stderr), for at most 15 s (nodes look at their files every 2 s).
fn until(d: &Path, args: &[&str], done: impl Fn(bool, &str, &str) -> bool) -> (String, String) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (out, ok, err) = ferry_status(d, args);
        if done(ok, &out, &err) {
            return (out, err);
        }
        assert!(
            Instant::now() < deadline,
            "ferry {args:?} never got there:\n{out}\n{err}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn a_revoked_operator_is_refused_and_a_rotated_node_keeps_serving() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    common::two_synthetic_hosts(d);
    ferry(d, &["cluster", "add-user", "op", "--role", "operator"]);
    // The operator's own copy of their files, as on their workstation.
    std::fs::create_dir(d.join("op-home")).expect("dir");
    for f in ["op.pem", "op.key", "ca.pem", "crl.pem", "client-op.toml"] {
        std::fs::copy(d.join(f), d.join("op-home").join(f)).expect("copy");
    }
    let a = Node::start(d, "host-a", &[]);
    let b = Node::start(d, "host-b", &[]);
    let op_list = ["vm", "list", "--client", "op-home/client-op.toml"];
    ferry(d, &op_list);

    let out = ferry(d, &["cluster", "revoke", "op"]);
    assert!(out.contains("revoked op (operator"), "{out}");
    assert!(
        !d.join("op.pem").exists(),
        "the revoked files are set aside"
    );
    let (_, err) = until(d, &op_list, |ok, _, _| !ok);
    assert!(
        err.contains("revoked: ask an admin"),
        "the operator is told why:\n{err}"
    );
    // The admin is not affected, and the list says who is revoked.
    ferry(d, &["vm", "list", "--client", "client.toml"]);
    let certs = ferry(d, &["cluster", "certs"]);
    let op_row = certs.lines().find(|l| l.starts_with("op ")).unwrap_or("");
    assert!(
        op_row.is_empty(),
        "set-aside files are not listed:\n{certs}"
    );
    assert!(certs.contains("1 certificates revoked"), "{certs}");
    assert!(
        certs.contains("host-a") && certs.contains("days left"),
        "{certs}"
    );
    // Revoking again finds nothing to revoke.
    let (_, ok, err) = ferry_status(d, &["cluster", "revoke", "op"]);
    assert!(!ok && err.contains("no certificate for op"), "{err}");
    // A new certificate for the same operator lets them back in (their
    // client file in the cluster folder names it).
    ferry(d, &["cluster", "rotate", "op"]);
    ferry(d, &["vm", "list", "--client", "client-op.toml"]);

    // host-a gets a new certificate and its old one is revoked: clients
    // (which read crl.pem on each call) accept host-a again only once it
    // serves the new one, which it must do without a restart.
    let out = ferry(d, &["cluster", "rotate", "host-a", "--revoke-old"]);
    assert!(out.contains("the old certificate"), "{out}");
    until(
        d,
        &["vm", "list", "--client", "client.toml"],
        |ok, out, err| ok && !err.contains("host-a") && !out.contains("did not answer"),
    );
    // Node to node: a migration from host-a to host-b handshakes both ways.
    common::create_running_small(d, "web-1", &[]);
    ferry(
        d,
        &[
            "migrate",
            "web-1",
            "--to",
            "host-b",
            "--client",
            "client.toml",
        ],
    );
    let list = ferry(d, &["vm", "list", "--client", "client.toml"]);
    let row = list.lines().find(|l| l.contains("web-1")).unwrap_or("");
    assert!(row.contains("host-b"), "web-1 moved:\n{list}");
    a.stop();
    b.stop();
}
