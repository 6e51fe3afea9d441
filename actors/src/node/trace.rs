//! Tracing spans for migrations: the pumps open and close one span per
//! phase of their machine's [`Timeline`], under one root span per side, and
//! the destination's root joins the source's trace through the W3C
//! `traceparent` the offer carries.
//!
//! Span names are fixed (`migration`, `migration.destination`,
//! `migration.phase`); the phase's own name (`offer`, `precopy.round`,
//! `switchover`, …) becomes the OpenTelemetry span name through `otel.name`,
//! and its figures become attributes. Without an OpenTelemetry layer these
//! are plain `tracing` spans: nothing is exported and the cost is a few
//! dozen spans per migration.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::{Context, KeyValue, Value};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::migration::{Figure, PhaseReport, Timeline};

/// Spans that follow a [`Timeline`].
pub struct PhaseSpans {
    root: Span,
    /// One entry per phase seen: its span while it is open.
    spans: Vec<Option<Span>>,
    /// Figures already written, per phase.
    written: Vec<usize>,
}

impl PhaseSpans {
    /// Phases become children of `root`.
    pub fn new(root: Span) -> Self {
        Self {
            root,
            spans: Vec::new(),
            written: Vec::new(),
        }
    }

    /// The root span.
    pub fn root(&self) -> &Span {
        &self.root
    }

    /// Opens spans for phases that began and closes those that ended since
    /// the last call.
    pub fn sync(&mut self, timeline: &Timeline) {
        let phases = timeline.phases();
        // Open first, close after: a phase that began inside a parent
        // that ended since the last call still finds its parent's span.
        for phase in &phases[self.spans.len()..] {
            let parent = phase
                .parent
                .and_then(|p| self.spans.get(p as usize).cloned().flatten())
                .unwrap_or_else(|| self.root.clone());
            let span = tracing::info_span!(
                parent: &parent,
                "migration.phase",
                otel.name = phase.name.as_str(),
                phase = phase.name.as_str()
            );
            self.spans.push(Some(span));
            self.written.push(0);
        }
        for (i, phase) in phases.iter().enumerate() {
            if let Some(span) = &self.spans[i] {
                for (key, value) in &phase.figures[self.written[i]..] {
                    span.set_attribute(key.clone(), figure_value(value));
                }
                self.written[i] = phase.figures.len();
            }
            if phase.end_ms.is_some() && self.spans[i].is_some() {
                close(self.spans[i].take(), phase);
            }
        }
    }

    /// Closes every span still open, the root last.
    pub fn finish(mut self, timeline: &Timeline) {
        self.sync(timeline);
        for span in self.spans.iter_mut() {
            span.take();
        }
    }
}

fn close(span: Option<Span>, phase: &PhaseReport) {
    if let Some(span) = span {
        let _entered = span.enter();
        tracing::debug!(
            phase = phase.name.as_str(),
            ms = phase.duration_ms().unwrap_or(0.0),
            "phase ended"
        );
    }
}

fn figure_value(figure: &Figure) -> Value {
    match figure {
        Figure::Count(n) => Value::I64(i64::try_from(*n).unwrap_or(i64::MAX)),
        Figure::Value(x) => Value::F64(*x),
        Figure::Text(t) => Value::String(t.clone().into()),
    }
}

/// Sets OpenTelemetry attributes on a span (they need no declaration).
pub fn set_attributes(span: &Span, attributes: Vec<KeyValue>) {
    for kv in attributes {
        span.set_attribute(kv.key, kv.value);
    }
}

/// The W3C `traceparent` of `span`, or an empty string when it belongs to
/// no exported trace.
pub fn traceparent(span: &Span) -> String {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if !sc.is_valid() {
        return String::new();
    }
    format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    )
}

/// Makes `span` a child of the remote span named by `traceparent` (an empty
/// or malformed value leaves it a root, with a warning for the latter).
pub fn join(span: &Span, traceparent: &str) {
    if traceparent.is_empty() {
        return;
    }
    match parse_traceparent(traceparent) {
        Some(sc) => {
            let _ = span.set_parent(Context::new().with_remote_span_context(sc));
        }
        None => tracing::warn!(traceparent, "ignoring a malformed traceparent"),
    }
}

fn parse_traceparent(value: &str) -> Option<SpanContext> {
    let mut parts = value.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || parts.next().is_some() || trace.len() != 32 || span.len() != 16 {
        return None;
    }
    let sc = SpanContext::new(
        TraceId::from_hex(trace).ok()?,
        SpanId::from_hex(span).ok()?,
        TraceFlags::new(u8::from_str_radix(flags, 16).ok()?),
        true,
        TraceState::default(),
    );
    sc.is_valid().then_some(sc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_parse_and_bad_ones_do_not() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let sc = parse_traceparent(good).expect("valid");
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled());
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn without_a_layer_there_is_no_traceparent() {
        let span = tracing::info_span!("migration");
        assert_eq!(traceparent(&span), "");
    }
}
