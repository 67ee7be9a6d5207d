//! The W3C trace context (`traceparent`) that ties one request's spans on every
//! process into one trace.
//!
//! A worker's Forward stream carries many sequences, so the context cannot ride in
//! the stream's gRPC metadata: it travels in each sequence's `OpenSequence`, and
//! each stage makes its span for the sequence a child of it.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

const TRACEPARENT: &str = "traceparent";

/// `span`'s context as a `traceparent` header value; `None` when the span is not
/// traced (tracing is off, or the span was filtered out). An unsampled span still
/// gives one, with the sampled flag clear, so the next process drops its spans too.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    if span.is_disabled() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// Makes `span` a child of the remote span that `traceparent` names. An empty or
/// malformed value leaves `span` a root (sampled by the ratio, as any root).
pub fn adopt_parent(span: &tracing::Span, traceparent: &str) {
    if traceparent.is_empty() || span.is_disabled() {
        return;
    }
    let carrier = HashMap::from([(TRACEPARENT.to_string(), traceparent.to_string())]);
    let parent = TraceContextPropagator::new().extract(&carrier);
    // Fails only when the span is not traced by an OpenTelemetry layer: no trace.
    let _ = span.set_parent(parent);
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
    use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    fn traced(sampler: Sampler, body: impl FnOnce()) {
        let provider = SdkTracerProvider::builder().with_sampler(sampler).build();
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, body);
    }

    #[test]
    fn a_child_in_another_process_joins_the_trace_of_its_parent() {
        traced(Sampler::AlwaysOn, || {
            let request = tracing::info_span!("request");
            let header = traceparent(&request).expect("a traced span has a context");
            let parts: Vec<&str> = header.split('-').collect();
            assert_eq!(parts.len(), 4, "{header}");
            assert_eq!(parts[3], "01", "sampled: {header}");

            let stage = tracing::info_span!(parent: None, "stage");
            adopt_parent(&stage, &header);
            let (parent, child) = (request.context(), stage.context());
            let (parent, child) = (parent.span().span_context().clone(), child.span().span_context().clone());
            assert_eq!(child.trace_id(), parent.trace_id());
            assert_ne!(child.span_id(), parent.span_id());
            assert!(child.is_sampled());
        });
    }

    #[test]
    fn an_unsampled_request_makes_unsampled_children_and_garbage_makes_a_root() {
        traced(Sampler::ParentBased(Box::new(Sampler::AlwaysOff)), || {
            let request = tracing::info_span!("request");
            let header = traceparent(&request).expect("an unsampled span still has a context");
            assert!(header.ends_with("-00"), "{header}");
            let stage = tracing::info_span!(parent: None, "stage");
            adopt_parent(&stage, &header);
            assert!(!stage.context().span().span_context().is_sampled());

            let orphan = tracing::info_span!(parent: None, "stage");
            adopt_parent(&orphan, "00-not-a-trace-context");
            assert!(!orphan.context().span().span_context().is_sampled());
        });
    }

    #[test]
    fn without_tracing_there_is_no_context() {
        let span = tracing::info_span!("request");
        assert_eq!(traceparent(&span), None);
    }
}
