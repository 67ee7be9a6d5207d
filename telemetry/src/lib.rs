//! Logs and traces of a strata process.
//!
//! Every process logs through [`init`]: the `STRATA_LOG` filter and a writer of its
//! choice. With `--otlp-endpoint` (or `OTEL_EXPORTER_OTLP_ENDPOINT`) the spans strata
//! opens at INFO also go to an OTLP collector over gRPC: one span per request on the
//! coordinator, one per sequence on each stage of the pipeline, tied into one trace
//! by a W3C `traceparent` ([`context`]). Nothing is exported per token: per-token
//! timings are metrics.

pub mod context;
mod export;
mod setup;

pub use setup::{init, LogWriter, Telemetry, TelemetryError, TraceArgs};

/// The target (module path prefix) of the spans that are exported: strata's own.
/// Other crates' spans (tonic's, h2's) stay out of the traces.
pub const EXPORTED_TARGET_PREFIX: &str = "strata";
