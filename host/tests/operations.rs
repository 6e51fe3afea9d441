//! Operations across real `ferry node` processes over QUIC with mutual
//! TLS and SQLite node databases: a host joins with `ferry cluster
//! add-host`; users added with `ferry cluster add-user` are held to their
//! roles; a migration scheduled with `--at`
//! survives a restart of its node; the audit log and the jobs list tell
//! what happened; `recommend`, `--to auto` and maintenance mode work
//! through the CLI.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Node, ferry, ferry_status, free_udp_port};

fn client<'a>(file: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    [args, &["--client", file][..]].concat()
}

fn vm_host(d: &Path, vm: &str) -> Option<String> {
    let list = ferry(d, &client("client.toml", &["vm", "list"]));
    list.lines().find_map(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        (cols.len() > 2 && cols[0] == vm && cols[2] != "Incoming").then(|| cols[1].to_owned())
    })
}

#[test]
fn roles_schedules_restarts_audit_and_maintenance_through_the_cli() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let (pa, pb) = (free_udp_port(), free_udp_port());
    ferry(
        d,
        &[
            "cluster",
            "init",
            "--dir",
            ".",
            "--host",
            &format!("host-a=127.0.0.1:{pa}"),
            "--memory-mib",
            "1024",
        ],
    );
    // host-b joins after: its certificate and node file, and it is added
    // to host-a's peers and to client.toml.
    let addr_b = format!("127.0.0.1:{pb}");
    let add_b = [
        "cluster", "add-host", "host-b", "--addr", &addr_b, "--dir", ".",
    ];
    let added = ferry(d, &add_b);
    assert!(
        added.contains("added to client.toml and 1 node files"),
        "{added}"
    );
    for file in ["host-b.pem", "host-b.key", "node-host-b.toml"] {
        assert!(d.join(file).exists(), "{file}");
    }
    let node_a = std::fs::read_to_string(d.join("node-host-a.toml")).expect("node-host-a");
    assert!(node_a.contains("host-b"), "{node_a}");
    let (_, twice, err) = ferry_status(d, &add_b);
    assert!(!twice && err.contains("already"), "{err}");
    ferry(
        d,
        &[
            "cluster", "add-user", "vera", "--role", "viewer", "--dir", ".",
        ],
    );
    let (_, again, err) = ferry_status(
        d,
        &[
            "cluster", "add-user", "vera", "--role", "admin", "--dir", ".",
        ],
    );
    assert!(!again && err.contains("already has a certificate"), "{err}");
    for name in ["host-a", "host-b"] {
        let path = d.join(format!("node-{name}.toml"));
        let text = std::fs::read_to_string(&path).expect("node file");
        std::fs::write(
            &path,
            text.replace("synthetic_guests = false", "synthetic_guests = true"),
        )
        .expect("write");
    }
    let a = Node::start(d, "host-a", &[]);
    let b = Node::start(d, "host-b", &[]);
    let admin = "client.toml";
    ferry(
        d,
        &client(
            admin,
            &[
                "vm", "create", "web-1", "--node", "host-a", "--memory", "64", "--wss", "8",
            ],
        ),
    );
    ferry(d, &client(admin, &["vm", "start", "web-1"]));

    // A viewer may look, not migrate.
    ferry(d, &client("client-vera.toml", &["jobs", "list"]));
    let (_, ok, err) = ferry_status(
        d,
        &client("client-vera.toml", &["migrate", "web-1", "--to", "host-b"]),
    );
    assert!(
        !ok && err.contains("permission denied") && err.contains("viewer"),
        "{err}"
    );

    // Placement explains itself.
    let ranking = ferry(d, &client(admin, &["recommend", "web-1"]));
    assert!(
        ranking.contains("1. host-b") && ranking.contains("link:"),
        "{ranking}"
    );

    // DRS over the hosts, and Storage DRS over host-a's datastores
    // (directories on this machine's filesystem: far from full).
    let plan = ferry(d, &client(admin, &["drs", "plan"]));
    assert!(plan.contains("imbalance"), "{plan}");
    let storage = ferry(
        d,
        &client(admin, &["drs", "plan", "--storage", "--node", "host-a"]),
    );
    assert!(
        storage.contains("host-a: 0 disk moves") && storage.contains("% full"),
        "{storage}"
    );
    let (_, ok, err) = ferry_status(
        d,
        &client(admin, &["drs", "plan", "--storage", "--fill-max", "0"]),
    );
    assert!(!ok && err.contains("--fill-max"), "{err}");

    // Scheduled for later; the node restarts in between.
    let queued = ferry(
        d,
        &client(
            admin,
            &[
                "migrate",
                "web-1",
                "--to",
                "host-b",
                "--at",
                "+4s",
                "--priority",
                "high",
            ],
        ),
    );
    assert!(queued.contains("job 1 on host-a"), "{queued}");
    a.stop();
    assert!(
        d.join("ferry-host-a.db").exists(),
        "the node keeps a database"
    );
    let a = Node::start(d, "host-a", &[]);
    assert_eq!(
        vm_host(d, "web-1").as_deref(),
        Some("host-a"),
        "the VM came back"
    );
    let jobs = ferry(d, &client(admin, &["jobs", "list"]));
    assert!(jobs.contains("queued"), "{jobs}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while vm_host(d, "web-1").as_deref() != Some("host-b") {
        assert!(
            Instant::now() < deadline,
            "the scheduled migration did not run"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let jobs = ferry(d, &client(admin, &["jobs", "list", "--json"]));
    let jobs: serde_json::Value = serde_json::from_str(&jobs).expect("json");
    let job = &jobs[0]["job"];
    assert_eq!(job["state"], "Done", "{jobs:#}");
    assert_eq!(job["priority"], "High");

    // The audit log, on disk, tells who did what.
    let audit: serde_json::Value = serde_json::from_str(&ferry(
        d,
        &client(admin, &["audit", "--vm", "web-1", "--json"]),
    ))
    .expect("json");
    let entries = audit.as_array().expect("array");
    let outcomes: Vec<&str> = entries
        .iter()
        .filter_map(|e| e["outcome"].as_str())
        .collect();
    assert!(outcomes.contains(&"refused"), "{audit:#}");
    assert!(outcomes.contains(&"queued"), "{audit:#}");
    let ran = entries
        .iter()
        .find(|e| {
            e["who"]
                .as_str()
                .is_some_and(|w| w.starts_with("scheduler"))
        })
        .expect("the scheduled run is audited");
    assert_eq!(ran["outcome"], "ok", "{ran:#}");
    assert!(ran["downtime_ms"].as_f64().is_some(), "{ran:#}");

    // Maintenance: host-b empties onto host-a, then returns to service.
    let out = ferry(
        d,
        &client(admin, &["host", "maintenance", "enter", "host-b"]),
    );
    assert!(out.contains("host-b is empty (1 VMs moved)"), "{out}");
    assert_eq!(vm_host(d, "web-1").as_deref(), Some("host-a"));
    let (_, ok, err) = ferry_status(
        d,
        &client(
            admin,
            &["vm", "create", "x", "--node", "host-b", "--memory", "16"],
        ),
    );
    assert!(!ok && err.contains("maintenance"), "{err}");
    ferry(
        d,
        &client(admin, &["host", "maintenance", "exit", "host-b"]),
    );
    let report = ferry(
        d,
        &client(admin, &["migrate", "web-1", "--to", "auto", "--json"]),
    );
    assert!(report.contains("\"to\": \"host-b\""), "{report}");
    a.stop();
    b.stop();
}
