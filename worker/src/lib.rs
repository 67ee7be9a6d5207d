//! A strata worker: serves one layer range of a model over gRPC.
//!
//! [`run`] takes a bound listener, a [`WorkerConfig`], the [`profile::Profile`]
//! probed from it (or none, to probe there) and a shutdown future (tests pass a
//! oneshot, `main` a stop request, the Windows service its stop control). The
//! service is split by job:
//!
//! * [`service`]: the tonic adapter (Describe, LoadShard, Forward, Events, ...);
//! * [`compute`]: the dedicated thread that owns the stage and batches frames;
//! * [`forwarder`]: tasks that stream a stage's outputs to the next worker;
//! * [`weights`]: finding a shard's weights locally, in the cache, or by pulling;
//! * [`events`]: fan-out of events to subscribers, and counters;
//! * [`devices`], [`profile`], [`self_bench`]: what the machine has, what the worker
//!   offers (memory, measured bandwidth), and the start-up benchmark behind it;
//! * [`advertise`]: the mDNS advertisement (on unless `--no-mdns`);
//! * [`drain`]: whether the worker drains and who wants it to;
//! * [`yielding`]: draining while the machine's owner uses it (`--yield-to-*`).

pub mod advertise;
pub mod compute;
pub mod config;
pub mod devices;
pub mod drain;
pub mod events;
pub mod forwarder;
pub mod held_tokens;
pub mod inbox;
pub mod links;
pub mod local_lane;
pub mod profile;
pub mod route;
pub mod self_bench;
mod stage_trace;
pub mod service;
pub mod weights;
pub mod yielding;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use config::{Cli, Command, WorkerArgs, WorkerConfig, WorkerTrust};
use profile::{Profile, ProfileError};
use service::WorkerService;
use strata_proto::v1::coordinator_client::CoordinatorClient;
use strata_proto::v1::worker_server::WorkerServer;
use strata_proto::v1::JoinRequest;
use strata_proto::MAX_MESSAGE_BYTES;
use strata_trust::{Dial, NodeIdentity, Own, Transport};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How long open connections get to close after shutdown is signalled.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot read the listener's address: {0}")]
    Listener(std::io::Error),
    #[error("the gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error(
        "no join token: give --token (the token `strata serve` prints), --token-file or STRATA_TOKEN; or --insecure \
         for plain TCP on a network you trust"
    )]
    NoToken,
    #[error("the worker's identity: {0}")]
    Trust(#[from] strata_trust::TrustError),
}

/// The address peers should use for a listener bound to `local`.
pub fn advertised_address(local: SocketAddr) -> String {
    let ip = if local.ip().is_unspecified() {
        std::net::Ipv4Addr::LOCALHOST.into()
    } else {
        local.ip()
    };
    SocketAddr::new(ip, local.port()).to_string()
}

/// Serves the worker on `listener` until `shutdown` completes.
pub async fn run(
    listener: TcpListener,
    config: WorkerConfig,
    profile: Option<Arc<Profile>>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let local = listener.local_addr().map_err(RunError::Listener)?;
    let profile = match profile {
        Some(profile) => profile,
        None => {
            let probing = config.clone();
            let probed = tokio::task::spawn_blocking(move || Profile::probe(&probing)).await;
            // The probe does not panic (driver calls are caught), so only a
            // cancelled runtime ends here, and then nothing is served anyway.
            Arc::new(probed.map_err(|e| ProfileError::Task(e.to_string()))??)
        }
    };
    profile.log();
    let address = config
        .advertise
        .clone()
        .unwrap_or_else(|| advertised_address(local));
    let (stop_tx, stop_rx) = watch::channel(false);
    let service = WorkerService::new(config.clone(), profile, address.clone(), stop_rx.clone());
    match &config.trust {
        WorkerTrust::Token(token) => {
            let identity = NodeIdentity::open(&identity_dir(&config, &service.node_id()), service.node_id(), token)?;
            let enrolled = identity.enrolled();
            strata_trust::install(Transport::tls(token.ca_sha256, Own::Node(Arc::new(identity))))?;
            tracing::info!(enrolled, "mutual TLS with the cluster of the join token");
        }
        WorkerTrust::Insecure => {
            tracing::warn!("--insecure: plain TCP; anyone who can reach this port can load, read and steer this worker")
        }
        WorkerTrust::Missing => return Err(RunError::NoToken),
    }
    let transport = strata_trust::transport();
    // Removed with the worker: a stage started later at this address serves its own.
    let _local_lanes = service.serve_local_lanes();
    tracing::info!(%address, name = %config.name, "worker serving");
    if let Some(coordinator) = config.join.clone() {
        tokio::spawn(join_loop(service.clone(), coordinator, stop_rx.clone()));
    }
    yielding::spawn(service.drain().clone(), &config.yielding, &config.device, stop_rx.clone());
    let advertising =
        if config.mdns { advertise::Advertising::start(service.clone(), &config, local).await } else { None };
    let server = strata_proto::transport::server().add_service(
        WorkerServer::new(service.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    );
    let signal = async move {
        shutdown.await;
        tracing::info!("worker shutting down");
        // Leave mDNS first: browsers drop this worker before its server stops.
        if let Some(advertising) = advertising {
            advertising.leave().await;
        }
        let _ = stop_tx.send(true);
    };
    let serve =
        server.serve_with_incoming_shutdown(strata_trust::incoming(transport, listener), signal);
    tokio::pin!(serve);
    let mut stopped = stop_rx.clone();
    let grace = async move {
        let _ = stopped.wait_for(|s| *s).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    let result = tokio::select! {
        r = &mut serve => r.map_err(RunError::from),
        () = grace => {
            tracing::warn!("connections still open after the grace period; closing them");
            Ok(())
        }
    };
    service.unload(None).await;
    result
}

/// Where worker `node` keeps its key and certificate: `--identity-dir`, else beside
/// its shard cache (where `strata-worker drain` looks).
pub fn identity_dir(config: &WorkerConfig, node: &strata_proto::NodeId) -> std::path::PathBuf {
    config.identity_dir.clone().unwrap_or_else(|| identities_dir(&config.cache_dir).join(node.as_str()))
}

/// The folder of the identities of the workers sharing the cache `cache_dir`.
pub fn identities_dir(cache_dir: &std::path::Path) -> std::path::PathBuf {
    cache_dir.join("identity")
}

/// Announces this worker to the coordinator, retrying with backoff until it is
/// accepted or the worker stops.
async fn join_loop(service: WorkerService, coordinator: String, mut stop: watch::Receiver<bool>) {
    let mut delay = Duration::from_millis(100);
    loop {
        let attempt = async {
            let channel = strata_trust::transport()
                .connect(&coordinator, Dial::Coordinator)
                .await
                .map_err(|e| e.to_string())?;
            let request = JoinRequest {
                worker: Some(service.description()),
            };
            CoordinatorClient::new(channel).join(request).await.map_err(|s| match s.code() {
                tonic::Code::PermissionDenied => format!("the coordinator refused this worker: {}", s.message()),
                _ => s.message().to_string(),
            })
        };
        tokio::select! {
            result = attempt => match result {
                Ok(response) => {
                    tracing::info!(%coordinator, coordinator_id = %response.into_inner().coordinator_id, "joined");
                    return;
                }
                Err(e) => tracing::warn!(%coordinator, error = %e, "join failed; retrying in {delay:?}"),
            },
            _ = stop.wait_for(|s| *s) => return,
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}
