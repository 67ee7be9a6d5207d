//! The coordinator as a library: [`run`] serves a cluster on listeners already
//! bound, from a validated [`ServeConfig`], until a shutdown future completes. The
//! `strata serve` command only parses its arguments into these; tests run a
//! coordinator in-process the same way.
//!
//! Lines on stdout, for people and for scripts that start it (`strata demo`, the
//! end-to-end tests): `coordinator grpc=ADDR http=ADDR` once workers can join, one
//! `stage N ...` line per stage when the first plan is loaded (or one
//! `no pipeline yet ...` line saying why it is not), and `listening http=ADDR
//! grpc=ADDR` then. The API serves before that, as soon as the workers named with
//! `--worker` are described: status shows the first load and its pulls, and
//! requests wait for its pipeline.

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use strata_proto::v1::WireDtype;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::cluster::{
    self, Cluster, ClusterConfig, CoordinatorService, Membership, MovePolicy, PlacementPolicy, ReturnPath, ServedModel,
    WeightsSource,
};
use crate::planner::PlanOptions;

/// How long stopping the cluster (ending what is in flight, unloading the stages,
/// the gRPC calls still open) may take in all once the API has stopped: a worker
/// cut off from the network, or a weight pull of minutes, must not keep the
/// coordinator from exiting.
const CLUSTER_STOP_GRACE: Duration = Duration::from_secs(2);

/// How long gRPC calls still open when the coordinator stops may run on.
const GRPC_STOP_GRACE: Duration = Duration::from_millis(500);

/// Everything a coordinator serves with, checked by [`ServeConfig::validate`].
#[derive(Clone)]
pub struct ServeConfig {
    /// The model, opened (and hashed) once.
    pub model: Arc<ServedModel>,
    /// Workers named on the command line, in pipeline order.
    pub workers: Vec<String>,
    /// The `--cluster` name to find workers under over mDNS; `None` turns mDNS off.
    pub mdns_cluster: Option<String>,
    /// Workers to wait for before the first plan.
    pub min_workers: usize,
    /// How long to wait for them; after that the plan uses the workers there are.
    pub worker_wait: Duration,
    /// The gRPC address workers pull weights from, when it is not the address on
    /// the route to each of them ([`WeightsSource`]).
    pub grpc_advertise: Option<String>,
    pub wire_dtype: WireDtype,
    pub return_path: ReturnPath,
    pub placement: PlacementPolicy,
    pub plan: PlanOptions,
    /// How long a request may wait for capacity.
    pub queue_timeout: Duration,
    pub move_sequences: MovePolicy,
    /// Keep finished requests' sequences for the next turn to start from.
    pub prefix_cache: bool,
    /// How long requests in flight may run on after shutdown begins.
    pub shutdown_grace: Duration,
    /// The keys the HTTP API asks for (none: open).
    pub api_keys: crate::api::ApiKeys,
    /// The token workers join with, printed at start (none: `--insecure`, or a
    /// coordinator run in-process without a CA).
    pub join_token: Option<strata_trust::JoinToken>,
}

/// A setting that cannot work, found before anything is bound or started.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--context must be at least 1 token")]
    ZeroContext,
    #[error("--context {context} is longer than the {trained} tokens the model was trained for")]
    ContextBeyondModel { context: usize, trained: usize },
    #[error("--sequences must be at least 1")]
    ZeroSequences,
    #[error("--min-workers must be at least 1")]
    ZeroMinWorkers,
    #[error("--worker {0} is given twice")]
    DuplicateWorker(String),
}

impl ServeConfig {
    /// Checks the settings against each other and the model.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.plan.context == 0 {
            return Err(ConfigError::ZeroContext);
        }
        let trained = self.model.card.context_length;
        if trained > 0 && self.plan.context > trained {
            return Err(ConfigError::ContextBeyondModel { context: self.plan.context, trained });
        }
        if self.plan.sequences == 0 {
            return Err(ConfigError::ZeroSequences);
        }
        if self.min_workers == 0 {
            return Err(ConfigError::ZeroMinWorkers);
        }
        for (i, w) in self.workers.iter().enumerate() {
            if self.workers[..i].contains(w) {
                return Err(ConfigError::DuplicateWorker(w.clone()));
            }
        }
        Ok(())
    }

    fn cluster(&self, grpc_bound: SocketAddr) -> ClusterConfig {
        ClusterConfig {
            workers: self.workers.clone(),
            min_workers: self.min_workers.max(self.workers.len()),
            worker_wait: self.worker_wait,
            wire_dtype: self.wire_dtype,
            return_path: self.return_path,
            weights_source: WeightsSource::for_bound(grpc_bound, self.grpc_advertise.clone()),
            placement: self.placement.clone(),
            plan: self.plan.clone(),
            queue_timeout: self.queue_timeout,
            move_sequences: self.move_sequences,
            prefix_cache: self.prefix_cache,
        }
    }
}

/// The coordinator's two listeners, bound by the caller (port 0 is fine: the
/// addresses are printed).
pub struct Listeners {
    /// The Coordinator gRPC service: joins, weight pulls.
    pub grpc: TcpListener,
    /// The OpenAI-compatible HTTP API and the admin routes.
    pub http: TcpListener,
}

/// Why a coordinator stopped other than by its shutdown future.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("the HTTP API failed: {0}")]
    Http(std::io::Error),
    #[error("writing to stdout: {0}")]
    Stdout(std::io::Error),
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
}

fn say(line: &str) -> Result<(), ServeError> {
    // Readers (tests, `strata demo`) wait on whole lines.
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}").and_then(|()| stdout.flush()).map_err(ServeError::Stdout)
}

/// The address to print for a bound listener: 127.0.0.1 in place of an
/// unspecified IP, so a script on this machine can use the line as it is.
fn printable(local: SocketAddr) -> String {
    let ip = if local.ip().is_unspecified() { std::net::Ipv4Addr::LOCALHOST.into() } else { local.ip() };
    SocketAddr::new(ip, local.port()).to_string()
}

/// Serves the cluster until `shutdown` completes. A pipeline that cannot be loaded
/// does not end it: the controller retries, and requests wait meanwhile.
pub async fn run(
    listeners: Listeners,
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    config.validate()?;
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let grpc_bound = listeners.grpc.local_addr().map_err(ServeError::Http)?;
    let advertised = config.grpc_advertise.clone().unwrap_or_else(|| printable(grpc_bound));
    let model = config.model.clone();
    let membership = Arc::new(Membership::default());
    let service = CoordinatorService {
        id: format!("strata-{}", std::process::id()),
        model: model.clone(),
        membership: membership.clone(),
    };
    let grpc_server = tokio::spawn(cluster::serve_grpc(listeners.grpc, service, stopped(stop.clone())));
    // The HTTP address too: a script can watch the first load's status before the
    // `listening` line.
    let http_addr = listeners.http.local_addr().map_err(ServeError::Http)?;
    say(&format!("coordinator grpc={advertised} http={}", printable(http_addr)))?;
    match &config.join_token {
        Some(token) => {
            say(&format!("join token {token}"))?;
            say(&format!("workers join with: strata-worker --join {advertised} --token {token}"))?;
        }
        None if !strata_trust::transport().secure() => say(
            "INSECURE: plain TCP between the nodes (--insecure); anyone on the network can join, read prompts and \
             steer workers",
        )?,
        None => {}
    }
    let discovery = (config.workers.is_empty()).then_some(config.mdns_cluster.clone()).flatten().map(|name| {
        let (membership, stop) = (membership.clone(), stopped(stop.clone()));
        tokio::spawn(async move {
            if let Err(e) = cluster::discovery::run(membership, name, stop).await {
                tracing::warn!("not looking for workers over mDNS: {e}");
            }
        })
    });
    // The gRPC server stops gracefully: it waits for calls in flight, and a weight
    // pull of a large stage can last minutes. It gets a short grace, then it is
    // cut off (a worker resumes the pull from what it has).
    let background = |deadline: tokio::time::Instant| async move {
        let grpc_abort = grpc_server.abort_handle();
        let discovery_abort = discovery.as_ref().map(|d| d.abort_handle());
        let all = async {
            let _ = grpc_server.await;
            if let Some(discovery) = discovery {
                let _ = discovery.await;
            }
        };
        // Pulls resume where they stopped, so they are worth only a short wait.
        let deadline = deadline.min(tokio::time::Instant::now() + GRPC_STOP_GRACE);
        if tokio::time::timeout_at(deadline, all).await.is_err() {
            tracing::warn!("calls still in flight (weight pulls?); cutting them off");
            grpc_abort.abort();
            if let Some(d) = discovery_abort {
                d.abort();
            }
        }
    };

    let cluster_config = config.cluster(grpc_bound);
    let mut cluster = tokio::select! {
        c = Cluster::launch(&cluster_config, model.clone(), membership) => c?,
        () = stopped(stop.clone()) => {
            background(tokio::time::Instant::now() + CLUSTER_STOP_GRACE).await;
            return Ok(());
        }
    };
    // The API serves from here, while the first plan loads: a first load of a large
    // model pulls gigabytes and takes minutes, and status must show it (requests
    // wait for the pipeline meanwhile, as after a failed load).
    let http_addr = listeners.http.local_addr().map_err(ServeError::Http)?;
    let engine: Arc<dyn crate::engine::Engine> = cluster.engine.clone();
    let served = tokio::spawn(crate::api::serve_with_grace(
        listeners.http,
        engine,
        Some(cluster.admin()),
        config.api_keys.clone(),
        stopped(stop.clone()),
        config.shutdown_grace,
    ));
    let planned = tokio::select! {
        () = cluster.first_plan() => true,
        () = stopped(stop.clone()) => false,
    };
    if planned {
        if let Some(reason) = &cluster.waiting_reason {
            say(&format!("no pipeline yet (requests wait; retrying): {reason}"))?;
        }
        for p in &cluster.placements {
            say(&format!(
                "stage {} layers {}..{} on {} ({}), weights {}, loaded in {:.1}s",
                p.stage,
                p.layers.start,
                p.layers.end,
                p.address,
                p.name,
                if p.weights_were_local { "local" } else { "pulled" },
                p.load_seconds
            ))?;
        }
        say(&format!("listening http={} grpc={advertised}", printable(http_addr)))?;
    }
    let served = match served.await {
        Ok(served) => served,
        Err(e) => Err(std::io::Error::other(format!("the HTTP API's task failed: {e}"))),
    };
    let deadline = tokio::time::Instant::now() + CLUSTER_STOP_GRACE;
    if tokio::time::timeout_at(deadline, cluster.shutdown()).await.is_err() {
        tracing::warn!("the cluster did not stop within {CLUSTER_STOP_GRACE:?}; leaving the workers to notice");
    }
    background(deadline).await;
    served.map_err(ServeError::Http)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ServeConfig {
        let dir = tempfile::tempdir().unwrap();
        let path = strata_model::synthetic::SyntheticModel::tiny().write_to(dir.path()).unwrap();
        let model = Arc::new(ServedModel::open(&path, "test".into()).unwrap());
        ServeConfig {
            model,
            workers: vec!["127.0.0.1:1".into()],
            mdns_cluster: None,
            min_workers: 1,
            worker_wait: Duration::from_secs(1),
            grpc_advertise: None,
            wire_dtype: WireDtype::F32,
            return_path: ReturnPath::Direct,
            placement: PlacementPolicy::Fastest,
            plan: PlanOptions { context: 64, ..PlanOptions::default() },
            queue_timeout: Duration::from_secs(1),
            move_sequences: MovePolicy::Auto,
            prefix_cache: true,
            shutdown_grace: Duration::from_secs(1),
            api_keys: crate::api::ApiKeys::default(),
            join_token: None,
        }
    }

    #[test]
    fn settings_that_cannot_work_are_refused_before_anything_starts() {
        let good = config();
        assert_eq!(good.validate(), Ok(()));
        let trained = good.model.card.context_length;
        type Change = Box<dyn Fn(&mut ServeConfig)>;
        let cases: Vec<(Change, ConfigError)> = vec![
            (Box::new(|c| c.plan.context = 0), ConfigError::ZeroContext),
            (
                Box::new(move |c| c.plan.context = trained + 1),
                ConfigError::ContextBeyondModel { context: trained + 1, trained },
            ),
            (Box::new(|c| c.plan.sequences = 0), ConfigError::ZeroSequences),
            (Box::new(|c| c.min_workers = 0), ConfigError::ZeroMinWorkers),
            (
                Box::new(|c| c.workers = vec!["127.0.0.1:1".into(), "127.0.0.1:1".into()]),
                ConfigError::DuplicateWorker("127.0.0.1:1".into()),
            ),
        ];
        for (change, want) in cases {
            let mut c = config();
            change(&mut c);
            assert_eq!(c.validate(), Err(want));
        }
    }

    #[test]
    fn a_bound_address_prints_as_one_reachable_here() {
        assert_eq!(printable("0.0.0.0:7100".parse().unwrap()), "127.0.0.1:7100");
        assert_eq!(printable("10.0.0.2:7100".parse().unwrap()), "10.0.0.2:7100");
    }
}
