//! A coordinator run in the test's own process (`strata_coordinator::run`) over
//! listeners the test binds, driving worker processes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_coordinator::cli::http;
use strata_coordinator::cluster::{MovePolicy, PlacementPolicy, ReturnPath, ServedModel};
use strata_coordinator::planner::PlanOptions;
use strata_coordinator::server::ServeError;
use strata_coordinator::{Listeners, ServeConfig};
use strata_proto::v1::WireDtype;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A coordinator for `workers` (all of them in the pipeline, spread evenly), plain
/// TCP (the test process has no identity), mDNS off, a context of 256.
pub fn serve_config(model: Arc<ServedModel>, workers: Vec<String>) -> ServeConfig {
    ServeConfig {
        model,
        min_workers: workers.len(),
        workers,
        mdns_cluster: None,
        worker_wait: Duration::from_secs(30),
        grpc_advertise: None,
        wire_dtype: WireDtype::F32,
        return_path: ReturnPath::Direct,
        placement: PlacementPolicy::Spread,
        plan: PlanOptions { context: 256, sequences: 4, ..PlanOptions::default() },
        queue_timeout: Duration::from_secs(30),
        move_sequences: MovePolicy::Auto,
        prefix_cache: true,
        shutdown_grace: Duration::from_secs(5),
        api_keys: strata_coordinator::api::ApiKeys::default(),
        join_token: None,
    }
}

/// Both listeners on loopback ports of their own.
pub async fn listeners() -> anyhow::Result<Listeners> {
    Ok(Listeners { grpc: TcpListener::bind("127.0.0.1:0").await?, http: TcpListener::bind("127.0.0.1:0").await? })
}

/// A running in-process coordinator.
pub struct InProcessCoordinator {
    /// Its HTTP API's address.
    pub http: String,
    stop: oneshot::Sender<()>,
    running: JoinHandle<Result<(), ServeError>>,
}

impl InProcessCoordinator {
    /// Runs `config` and waits until it serves on a pipeline (at most a minute).
    pub async fn start(config: ServeConfig) -> anyhow::Result<Self> {
        let listeners = listeners().await?;
        let http = listeners.http.local_addr()?.to_string();
        let (stop, stopped) = oneshot::channel::<()>();
        let running = tokio::spawn(strata_coordinator::run(listeners, config, async {
            let _ = stopped.await;
        }));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = http::request(&http, "GET", "/admin/status", None).await?.json()?;
            if !status["pipeline_id"].is_null() {
                return Ok(Self { http, stop, running });
            }
            anyhow::ensure!(Instant::now() < deadline, "no pipeline after 60 s: {status}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `GET /admin/status`.
    pub async fn status(&self) -> anyhow::Result<serde_json::Value> {
        Ok(http::request(&self.http, "GET", "/admin/status", None).await?.json()?)
    }

    /// Stops it; an error unless it ends cleanly `within` that long.
    pub async fn stop(self, within: Duration) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        tokio::time::timeout(within, self.running).await???;
        Ok(())
    }
}
