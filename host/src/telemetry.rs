//! Logging and OpenTelemetry export for the `ferry` process.
//!
//! Logs go to stderr (`RUST_LOG`, default `warn`). When an OTLP endpoint is
//! named — the node file's `otlp_endpoint`, else
//! `OTEL_EXPORTER_OTLP_ENDPOINT` — spans (`info` and above from ferry's
//! crates) and metrics are also sent there over OTLP/HTTP (protobuf), with
//! `service.name = ferry` and `host.name` set to the node. Without one, no
//! exporter, batch thread or OpenTelemetry layer exists, so nothing slows
//! down.
//!
//! Call [`init`] before any tokio runtime starts (the HTTP client is a
//! blocking one on its own thread) and keep the guard: dropping it flushes
//! what is still batched.

use std::time::Duration;

use anyhow::Context;
use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Environment variable naming the collector (the OpenTelemetry standard).
pub const ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// How often metrics are exported.
pub const METRICS_INTERVAL: Duration = Duration::from_secs(10);

/// Keeps the exporters alive; dropping it flushes them.
#[must_use = "dropping the guard stops the export"]
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
    /// Where spans and metrics go, if anywhere.
    pub endpoint: Option<String>,
}

impl Telemetry {
    /// Sends what is batched now.
    pub fn flush(&self) {
        if let Some(t) = &self.tracer {
            let _ = t.force_flush();
        }
        if let Some(m) = &self.meter {
            let _ = m.force_flush();
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(t) = self.tracer.take() {
            let _ = t.shutdown();
        }
        if let Some(m) = self.meter.take() {
            let _ = m.shutdown();
        }
    }
}

/// The collector to use: `configured`, else the environment's, else none.
pub fn endpoint(configured: Option<&str>) -> Option<String> {
    configured
        .map(str::to_owned)
        .or_else(|| std::env::var(ENDPOINT_ENV).ok())
        .map(|e| e.trim().trim_end_matches('/').to_owned())
        .filter(|e| !e.is_empty())
}

/// Installs logging, and the OTLP export when `endpoint` is set; `host` names
/// this process in the exported resource.
pub fn init(host: &str, endpoint: Option<String>) -> anyhow::Result<Telemetry> {
    let log_filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(log_filter);
    let Some(endpoint) = endpoint else {
        let _ = tracing_subscriber::registry().with(fmt).try_init();
        return Ok(Telemetry {
            tracer: None,
            meter: None,
            endpoint: None,
        });
    };
    let resource = Resource::builder()
        .with_service_name("ferry")
        .with_attribute(KeyValue::new("host.name", host.to_owned()))
        .build();
    let spans = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(format!("{endpoint}/v1/traces"))
        .build()
        .with_context(|| format!("OTLP span exporter for {endpoint}"))?;
    let tracer = SdkTracerProvider::builder()
        .with_batch_exporter(spans)
        .with_resource(resource.clone())
        .build();
    let metrics = opentelemetry_otlp::MetricExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(format!("{endpoint}/v1/metrics"))
        .build()
        .with_context(|| format!("OTLP metric exporter for {endpoint}"))?;
    let meter = SdkMeterProvider::builder()
        .with_reader(
            PeriodicReader::builder(metrics)
                .with_interval(METRICS_INTERVAL)
                .build(),
        )
        .with_resource(resource)
        .build();
    opentelemetry::global::set_meter_provider(meter.clone());
    // Spans go out at info and above from ferry's crates, whatever
    // RUST_LOG says about the log lines.
    let otel_filter = EnvFilter::new("warn,ferry_actors=info,ferry_host=info,ferry_transport=info");
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer.tracer("ferry"))
        .with_filter(otel_filter);
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init();
    Ok(Telemetry {
        tracer: Some(tracer),
        meter: Some(meter),
        endpoint: Some(endpoint),
    })
}
