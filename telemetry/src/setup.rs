//! Installing the process's subscriber: the log, and the OTLP export when asked.

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing_subscriber::filter::{filter_fn, EnvFilter, LevelFilter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::export::OtlpOnOwnRuntime;

/// Spans waiting for export past this many are dropped: a collector that is slow
/// or gone costs spans, never memory without bound or a request's time.
const MAX_QUEUED_SPANS: usize = 4096;
/// How long shutting down waits for the last spans to go out.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Where traces go; the same flags on the coordinator and on every worker.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TraceArgs {
    /// Send spans to this OTLP collector over gRPC (for example
    /// http://127.0.0.1:4317): a span per request on the coordinator, one per
    /// sequence on each worker's stage, in one trace. Off when not given.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL", value_parser = parse_endpoint)]
    pub otlp_endpoint: Option<String>,
    /// The share of requests traced, 0 to 1. Workers follow the coordinator's
    /// choice for each request; this only decides for spans with no parent.
    #[arg(long, default_value_t = 1.0, value_name = "RATIO", value_parser = parse_ratio)]
    pub trace_sample_ratio: f64,
}

fn parse_endpoint(value: &str) -> Result<String, String> {
    let lower = value.to_ascii_lowercase();
    if !(lower.starts_with("http://") || lower.starts_with("https://")) {
        return Err(format!("`{value}` is not an http:// or https:// URL (an OTLP gRPC endpoint)"));
    }
    if value.len() <= "https://".len() {
        return Err(format!("`{value}` names no host"));
    }
    Ok(value.to_string())
}

fn parse_ratio(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("`{value}` is not a number from 0 to 1")),
    }
}

/// Where the log lines go.
pub enum LogWriter {
    Stderr,
    /// Appended to an open file, without colours (a service has no console).
    File(std::fs::File),
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("{0}")]
    Exporter(String),
    #[error("a log subscriber is already installed")]
    AlreadyInstalled,
}

/// What [`init`] installed; [`Telemetry::shutdown`] sends the spans still queued.
#[must_use = "shut it down at exit, or the last spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Sends what is queued and stops the exporter. Blocking, bounded by a timeout;
    /// call it outside any async runtime or from a blocking thread.
    pub fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        // On a thread of its own: the SDK blocks on its export thread, which must
        // not happen on a runtime's thread.
        let flushed = std::thread::spawn(move || provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT)).join();
        if let Ok(Err(e)) = flushed {
            tracing::debug!(error = %e, "the last spans were not sent");
        }
    }
}

/// Installs the process's subscriber: log lines filtered by `STRATA_LOG` (else
/// `default_filter`) to `writer`, and, when `trace.otlp_endpoint` is set, strata's
/// INFO spans exported as `service_name`.
pub fn init(
    service_name: &str,
    default_filter: &str,
    writer: LogWriter,
    trace: &TraceArgs,
) -> Result<Telemetry, TelemetryError> {
    let filter = EnvFilter::try_from_env("STRATA_LOG").unwrap_or_else(|_| default_filter.into());
    let log = match writer {
        LogWriter::Stderr => tracing_subscriber::fmt::layer().with_writer(std::io::stderr).boxed(),
        LogWriter::File(file) => {
            tracing_subscriber::fmt::layer().with_ansi(false).with_writer(std::sync::Mutex::new(file)).boxed()
        }
    };
    let provider = match &trace.otlp_endpoint {
        Some(endpoint) => Some(provider(service_name, endpoint, trace.trace_sample_ratio)?),
        None => None,
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("strata"))
            // strata's spans are rarely entered (a request's lives across tasks):
            // busy/idle times, source locations and thread names would only be noise.
            .with_tracked_inactivity(false)
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            // The log's filter is for people reading it; the trace takes strata's
            // own spans and events at INFO whatever the log shows.
            .with_filter(
                filter_fn(|meta| {
                    meta.target().starts_with(crate::EXPORTED_TARGET_PREFIX) && *meta.level() <= tracing::Level::INFO
                })
                // Said, so that DEBUG and TRACE call sites (candle's among them)
                // stay off at the first, cheapest check.
                .with_max_level_hint(LevelFilter::INFO),
            )
    });
    tracing_subscriber::registry()
        .with(log.with_filter(filter))
        .with(otel)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    Ok(Telemetry { provider })
}

fn provider(service_name: &str, endpoint: &str, ratio: f64) -> Result<SdkTracerProvider, TelemetryError> {
    let exporter = OtlpOnOwnRuntime::new(endpoint).map_err(TelemetryError::Exporter)?;
    // The SDK reads OTEL_BSP_* from the environment first (the tests shorten the
    // delay); the queue is bounded here.
    let batch = BatchConfigBuilder::default().with_max_queue_size(MAX_QUEUED_SPANS).build();
    let processor = BatchSpanProcessor::builder(exporter).with_batch_config(batch).build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio))))
        .with_resource(
            Resource::builder()
                .with_service_name(service_name.to_string())
                // Several workers may share a machine and a service name.
                .with_attribute(KeyValue::new("process.pid", i64::from(std::process::id())))
                .build(),
        )
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_must_be_urls() {
        assert!(parse_endpoint("http://127.0.0.1:4317").is_ok());
        assert!(parse_endpoint("127.0.0.1:4317").unwrap_err().contains("not an http"));
        assert!(parse_endpoint("http://").unwrap_err().contains("no host"));
    }

    #[test]
    fn ratios_are_between_0_and_1() {
        assert_eq!(parse_ratio("0").unwrap(), 0.0);
        assert_eq!(parse_ratio("0.25").unwrap(), 0.25);
        for bad in ["-0.1", "1.5", "NaN", "half"] {
            assert!(parse_ratio(bad).is_err(), "{bad}");
        }
    }
}
