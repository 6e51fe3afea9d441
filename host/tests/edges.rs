//! Bad values a new user might give are refused with an error that names
//! the value and what is allowed: VM names outside the safe set, sizes
//! that would wrap, zero vCPUs, a node file offering more memory than a
//! host can have. Both edges refuse: the CLI before asking a node, and the
//! node for a request that skipped the CLI. Commands that ask every node
//! show what the answering ones said and name the silent ones.

mod common;

use std::path::Path;

use common::{Node, ferry_status};

fn refused(d: &Path, args: &[&str], says: &str) {
    let (out, ok, err) = ferry_status(d, args);
    assert!(!ok, "ferry {args:?} was accepted:\n{out}");
    assert!(
        err.contains(says),
        "ferry {args:?} should say {says:?}:\n{err}"
    );
}

#[test]
fn bad_vm_definitions_and_node_files_are_refused_with_the_value_named() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    common::two_synthetic_hosts(d);
    let a = Node::start(d, "host-a", &[]);
    let b = Node::start(d, "host-b", &[]);
    let create = |name: &str, extra: &[&str]| {
        let mut args = vec![
            "vm",
            "create",
            name,
            "--node",
            "host-a",
            "--client",
            "client.toml",
        ];
        args.extend_from_slice(extra);
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>, says: &str| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(d, &args, says);
    };
    for name in ["..", ".", "a/b", "a b", "a\nb", "q\"uote"] {
        run(create(name, &[]), "is not allowed: use 1 to 64 letters");
    }
    run(
        create("big", &["--memory", "17592186044928"]),
        "memory (MiB) 17592186044928 is out of range",
    );
    run(
        create("none", &["--vcpus", "0"]),
        "vCPUs 0 is out of range: 1 to 64",
    );
    // Synthetic guests too: a VM uses only what its host offers.
    run(
        create("junk", &["--cpu-features", "sse2,notafeature"]),
        "CPU features notafeature are not offered by host-a; it offers: ",
    );
    // Migrations: a downtime budget no switchover can meet, a start time
    // in the past or absurdly far ahead.
    common::ferry(
        d,
        &[
            "vm",
            "create",
            "web-1",
            "--node",
            "host-a",
            "--memory",
            "64",
            "--wss",
            "8",
            "--client",
            "client.toml",
        ],
    );
    let migrate = |extra: &[&str], says: &str| {
        let mut args = vec![
            "migrate",
            "web-1",
            "--to",
            "host-b",
            "--client",
            "client.toml",
        ];
        args.extend_from_slice(extra);
        refused(d, &args, says);
    };
    migrate(
        &["--downtime-ms", "0"],
        "a downtime budget of 0 ms cannot be met",
    );
    migrate(&["--at", "1970-01-01T00:00:00Z"], "is in the past");
    migrate(&["--at", "+9999999999d"], "is more than a year ahead");
    let (jobs, ok, err) = ferry_status(d, &["jobs", "list", "--client", "client.toml"]);
    assert!(ok, "jobs list works:\n{jobs}\n{err}");
    common::ferry(d, &["vm", "delete", "web-1", "--client", "client.toml"]);
    // Nothing was created by any of them.
    let (list, ok, _) = ferry_status(d, &["vm", "list", "--client", "client.toml"]);
    assert!(ok);
    assert_eq!(list.lines().count(), 1, "only the header:\n{list}");

    // A refused request says nothing of having started.
    common::ferry(
        d,
        &[
            "cluster", "add-user", "vera", "--role", "viewer", "--dir", ".",
        ],
    );
    let (_, ok, err) = ferry_status(
        d,
        &[
            "host",
            "maintenance",
            "enter",
            "host-a",
            "--client",
            "client-vera.toml",
        ],
    );
    assert!(!ok, "a viewer cannot take a host out of service");
    assert!(err.contains("viewer"), "refused for the role:\n{err}");
    assert!(
        !err.contains("maintenance mode"),
        "claimed to enter it:\n{err}"
    );

    // A node file whose capacity would wrap when turned into bytes.
    let path = d.join("node-host-a.toml");
    let text = std::fs::read_to_string(&path).expect("node file");
    let start = text.find("memory_mib = ").expect("capacity");
    let end = start + text[start..].find('\n').expect("line end");
    let wrapped = format!(
        "{}memory_mib = {}{}",
        &text[..start],
        (1u64 << 44) + 1024,
        &text[end..]
    );
    std::fs::write(d.join("node-wrapped.toml"), wrapped).expect("write");
    refused(
        d,
        &["node", "--config", "node-wrapped.toml"],
        "capacity.memory_mib = 17592186045440 is more than a host can have",
    );
    // A node key written after `[[peers]]` belongs to the peer in TOML: it
    // is refused by name instead of being ignored.
    std::fs::write(
        d.join("node-late-key.toml"),
        format!("{text}state_db = \"other.db\"\n"),
    )
    .expect("write");
    refused(
        d,
        &["node", "--config", "node-late-key.toml"],
        "unknown field `state_db`",
    );

    // A key that is not the certificate's is named as such (it read
    // "tls configuration").
    std::fs::write(
        d.join("node-wrong-key.toml"),
        text.replace("host-a.key", "host-b.key"),
    )
    .expect("write");
    refused(
        d,
        &["node", "--config", "node-wrong-key.toml"],
        "the private key does not belong to the certificate for CN=host-a",
    );

    // `vm list` with a node down lists the rest and says which did not
    // answer; with none answering it fails.
    drop(b);
    let (_, ok, err) = ferry_status(d, &["vm", "list", "--client", "client.toml"]);
    assert!(ok, "{err}");
    assert!(
        err.contains("partial list: 1 of 2 nodes did not answer (host-b)"),
        "{err}"
    );
    for args in [&["jobs", "list"][..], &["audit"][..]] {
        let mut args = args.to_vec();
        args.extend(["--client", "client.toml"]);
        let (_, ok, err) = ferry_status(d, &args);
        assert!(
            ok,
            "{args:?} shows what the nodes that answered have: {err}"
        );
        assert!(
            err.contains("partial answer: host-b did not answer"),
            "{args:?}: {err}"
        );
    }
    drop(a);
    refused(
        d,
        &["vm", "list", "--client", "client.toml"],
        "no node answered",
    );
}

#[test]
fn cluster_init_keeps_private_keys_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    common::ferry(
        d,
        &[
            "cluster",
            "init",
            "--dir",
            "c",
            "--host",
            "host-a=127.0.0.1:7701",
        ],
    );
    let mode = |p: &str| std::fs::metadata(d.join(p)).expect(p).permissions().mode() & 0o777;
    assert_eq!(mode("c"), 0o700, "the cluster directory");
    for key in ["c/ca.key", "c/host-a.key"] {
        assert_eq!(mode(key), 0o600, "{key}");
    }
    assert_eq!(mode("c/ca.pem"), 0o644, "certificates stay readable");
    let keys: Vec<_> = std::fs::read_dir(d.join("c"))
        .expect("dir")
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "key"))
        .map(|e| {
            (
                e.file_name(),
                e.metadata().expect("stat").permissions().mode() & 0o777,
            )
        })
        .collect();
    assert!(keys.len() >= 3, "CA, host and user keys: {keys:?}");
    assert!(keys.iter().all(|(_, m)| *m == 0o600), "{keys:?}");
}
