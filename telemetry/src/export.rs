//! The OTLP exporter on a runtime of its own.
//!
//! The SDK's batch processor exports from a plain thread of its own and polls the
//! export future with a minimal executor; tonic's channel needs a tokio reactor. The
//! exporter here owns a one-thread tokio runtime that its channel is built on and
//! every export runs on, so exporting never touches the runtime that serves
//! requests, and a collector that went away costs that thread a timeout, not a
//! request its latency.

use std::time::Duration;

use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use opentelemetry_sdk::Resource;

/// How long one export may take before it is given up (its spans are lost).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug)]
pub(crate) struct OtlpOnOwnRuntime {
    inner: opentelemetry_otlp::SpanExporter,
    runtime: tokio::runtime::Runtime,
}

impl OtlpOnOwnRuntime {
    pub(crate) fn new(endpoint: &str) -> Result<Self, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("strata-otlp")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the OTLP exporter's runtime: {e}"))?;
        // The channel is lazy (no connection until the first export) but needs a
        // runtime to be built on.
        let inner = {
            let _entered = runtime.enter();
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .with_timeout(EXPORT_TIMEOUT)
                .build()
                .map_err(|e| format!("the OTLP endpoint {endpoint}: {e}"))?
        };
        Ok(Self { inner, runtime })
    }
}

impl SpanExporter for OtlpOnOwnRuntime {
    fn export(&self, batch: Vec<SpanData>) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        // The batch processor calls this from its own thread, never from a runtime,
        // so blocking on ours is allowed here.
        let result = if tokio::runtime::Handle::try_current().is_ok() {
            Err(OTelSdkError::InternalFailure("export called from inside a tokio runtime".into()))
        } else {
            self.runtime.block_on(self.inner.export(batch))
        };
        std::future::ready(result)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}
