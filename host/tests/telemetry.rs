//! One migration between two `ferry node` processes that export to a small
//! OTLP/HTTP receiver run by the test: the spans of both hosts form one
//! trace (the destination's root is a child of the source's), with the
//! phases and their figures; metrics arrive too. The same run checks
//! `ferry migrate show` (text, JSON, chart) and `ferry node stats`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message;

mod common;
use common::{Node, ferry};

/// A span as received, with the host that sent it.
#[derive(Debug, Clone)]
struct Got {
    host: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent: Vec<u8>,
    attrs: BTreeMap<String, String>,
}

#[derive(Default)]
struct Received {
    spans: Vec<Got>,
    metrics: Vec<(String, String)>,
}

fn value_text(v: Option<&AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    }
}

fn attrs(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), value_text(kv.value.as_ref())))
        .collect()
}

/// Serves OTLP/HTTP on loopback until the test ends.
fn receiver() -> (String, Arc<Mutex<Received>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let got = Arc::new(Mutex::new(Received::default()));
    let sink = got.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let sink = sink.clone();
            std::thread::spawn(move || serve(conn, &sink));
        }
    });
    (format!("http://{addr}"), got)
}

/// HTTP/1.1 with keep-alive: requests until the client closes.
fn serve(conn: TcpStream, sink: &Mutex<Received>) {
    let mut writer = conn.try_clone().expect("clone");
    let mut reader = BufReader::new(conn);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let path = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or("")
            .to_owned();
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        record(&path, &body, sink);
        let answer =
            "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
        if writer.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

fn record(path: &str, body: &[u8], sink: &Mutex<Received>) {
    let mut got = sink.lock().expect("lock");
    if path.ends_with("/v1/traces") {
        let req = ExportTraceServiceRequest::decode(body).expect("an OTLP trace export");
        for rs in req.resource_spans {
            let resource = attrs(&rs.resource.map(|r| r.attributes).unwrap_or_default());
            let host = resource.get("host.name").cloned().unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.spans.push(Got {
                        host: host.clone(),
                        name: s.name,
                        trace_id: s.trace_id,
                        span_id: s.span_id,
                        parent: s.parent_span_id,
                        attrs: attrs(&s.attributes),
                    });
                }
            }
        }
    } else if path.ends_with("/v1/metrics") {
        let req = ExportMetricsServiceRequest::decode(body).expect("an OTLP metrics export");
        for rm in req.resource_metrics {
            let resource = attrs(&rm.resource.map(|r| r.attributes).unwrap_or_default());
            let host = resource.get("host.name").cloned().unwrap_or_default();
            for sm in rm.scope_metrics {
                for m in sm.metrics {
                    got.metrics.push((host.clone(), m.name));
                }
            }
        }
    }
}

fn children<'a>(spans: &'a [Got], parent: &Got) -> Vec<&'a Got> {
    spans
        .iter()
        .filter(|s| s.trace_id == parent.trace_id && s.parent == parent.span_id)
        .collect()
}

fn names(spans: &[&Got]) -> Vec<String> {
    spans.iter().map(|s| s.name.clone()).collect()
}

#[test]
fn one_migration_is_one_trace_across_two_node_processes() {
    let (endpoint, got) = receiver();
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    common::two_synthetic_hosts(d);
    let a = Node::start(d, "host-a", &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)]);
    let b = Node::start(d, "host-b", &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)]);
    let client = ["--client", "client.toml"];
    ferry(
        d,
        &[
            &[
                "vm", "create", "web-1", "--node", "host-a", "--memory", "64", "--wss", "8",
            ][..],
            &client,
        ]
        .concat(),
    );
    ferry(d, &[&["vm", "start", "web-1"][..], &client].concat());
    let report: serde_json::Value = serde_json::from_str(&ferry(
        d,
        &[
            &["migrate", "web-1", "--to", "host-b", "--verify", "--json"][..],
            &client,
        ]
        .concat(),
    ))
    .expect("report JSON");
    assert_eq!(report["outcome"], "Completed", "{report:#}");
    let id = format!("{:016x}", report["migration_id"].as_u64().expect("id"));

    // The report as `show` gives it: both sides, and the chart.
    let text = ferry(d, &[&["migrate", "show", &id][..], &client].concat());
    assert!(
        text.contains(&format!(
            "migration {id} of web-1: host-a -> host-b, completed"
        )),
        "{text}"
    );
    assert!(text.contains("destination host-b: adopted"), "{text}");
    assert!(
        text.contains("rounds:") && text.contains("switchover"),
        "{text}"
    );
    let chart = d.join("web-1.svg");
    let shown: serde_json::Value = serde_json::from_str(&ferry(
        d,
        &[
            &["migrate", "show", "last", "--json", "--chart", "web-1.svg"][..],
            &client,
        ]
        .concat(),
    ))
    .expect("show JSON");
    assert_eq!(shown["migration_id"], report["migration_id"]);
    assert_eq!(shown["destination"]["outcome"], "adopted");
    assert!(
        shown["destination"]["downtime_ms"]
            .as_f64()
            .expect("dest downtime")
            > 0.0
    );
    assert!(
        std::fs::read_to_string(&chart)
            .expect("chart")
            .contains("pages still to send")
    );
    let list = ferry(d, &[&["migrate", "list"][..], &client].concat());
    assert!(list.contains(&id) && list.contains("completed"), "{list}");

    // Metrics, as `node stats` reads them.
    let stats: serde_json::Value = serde_json::from_str(&ferry(
        d,
        &[&["node", "stats", "--json"][..], &client].concat(),
    ))
    .expect("stats JSON");
    assert_eq!(stats[0]["host"], "host-a");
    assert_eq!(stats[0]["succeeded"], 1);
    assert_eq!(stats[0]["downtime_ms"]["count"], 1);
    assert_eq!(stats[1]["incoming_adopted"], 1);
    assert_eq!(stats[1]["bytes_received"], report["bytes_sent"]);

    a.stop();
    b.stop();
    let got = got.lock().expect("lock");
    let spans = &got.spans;
    let root = spans
        .iter()
        .find(|s| s.name == "migration" && s.attrs.get("vm").map(String::as_str) == Some("web-1"))
        .unwrap_or_else(|| {
            panic!(
                "no migration span among {:?}",
                spans.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        });
    assert_eq!(root.host, "host-a");
    assert!(root.parent.is_empty(), "the source's span is the root");
    assert_eq!(root.attrs["migration.id"], id);
    assert_eq!(root.attrs["to"], "host-b");
    assert_eq!(root.attrs["outcome"], "completed");
    assert!(root.attrs["downtime_ms"].parse::<f64>().expect("downtime") > 0.0);

    let top = children(spans, root);
    let top_names = names(&top);
    for want in [
        "offer",
        "precopy",
        "switchover",
        "cleanup",
        "migration.destination",
    ] {
        assert!(
            top_names.iter().any(|n| n == want),
            "{want} missing from {top_names:?}"
        );
    }
    let precopy = top.iter().find(|s| s.name == "precopy").expect("precopy");
    let rounds: Vec<&Got> = children(spans, precopy)
        .into_iter()
        .filter(|s| s.name == "precopy.round")
        .collect();
    assert!(!rounds.is_empty());
    let first = rounds
        .iter()
        .find(|r| r.attrs["round"] == "0")
        .expect("round 0");
    for key in ["pages", "bytes", "bandwidth_mb_s", "throttle_percent"] {
        assert!(
            first.attrs.contains_key(key),
            "round 0 lacks {key}: {:?}",
            first.attrs
        );
    }
    let decision = children(spans, precopy)
        .into_iter()
        .rfind(|s| s.name == "convergence" && s.attrs["decision"] == "switchover")
        .expect("the decision to switch over");
    for key in ["predicted_ms", "budget_ms", "dirty_pages"] {
        assert!(decision.attrs.contains_key(key), "{:?}", decision.attrs);
    }
    let switchover = top
        .iter()
        .find(|s| s.name == "switchover")
        .expect("switchover");
    assert_eq!(
        names(&children(spans, switchover)),
        ["pause", "final_pages", "state", "commit", "resume"]
    );

    // The destination's spans: another process, same trace, under the root.
    let dest = top
        .iter()
        .find(|s| s.name == "migration.destination")
        .expect("destination root");
    assert_eq!(dest.host, "host-b", "exported by the other node");
    assert_eq!(dest.attrs["outcome"], "adopted");
    let dest_top = names(&children(spans, dest));
    assert_eq!(
        dest_top,
        ["shadow", "receive", "switchover"],
        "{dest_top:?}"
    );
    let dest_switch = children(spans, dest)
        .into_iter()
        .find(|s| s.name == "switchover")
        .expect("destination switchover");
    let steps: Vec<String> = names(&children(spans, dest_switch))
        .into_iter()
        .filter(|n| n != "round.received")
        .collect();
    assert_eq!(
        steps,
        ["final_pages", "restore", "verify", "await_commit", "resume"]
    );

    for (host, metric) in [
        ("host-a", "ferry.migrations.started"),
        ("host-a", "ferry.migration.downtime"),
        ("host-b", "ferry.migrations.ended"),
    ] {
        assert!(
            got.metrics.iter().any(|(h, m)| h == host && m == metric),
            "{metric} from {host} missing: {:?}",
            got.metrics
        );
    }
}
