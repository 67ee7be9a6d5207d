//! `strata serve`: the coordinator of a cluster. Serves the Coordinator gRPC service
//! to workers, waits for them, loads the plan, and serves the OpenAI-compatible
//! HTTP API over the pipeline.
//!
//! Lines on stdout, for people and for scripts that start it:
//! `coordinator grpc=ADDR` once workers can join, one `stage N ...` line per stage
//! when the plan is loaded, and `listening http=ADDR grpc=ADDR` when it serves.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use strata_proto::v1::WireDtype;
use tokio::sync::watch;

use crate::cluster::{
    self, Cluster, ClusterConfig, CoordinatorService, Membership, MovePolicy, PlacementPolicy, ReturnPath,
    ServedModel,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WireDtypeArg {
    F32,
    F16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReturnPathArg {
    /// The last stage reports each token to the coordinator, which sends it on.
    Coordinator,
    /// The last stage sends each token straight back to stage 0.
    Direct,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A GGUF file, or a known model name (`smollm2-135m`), fetched on first use.
    #[arg(long, short = 'm', default_value = "smollm2-135m")]
    pub model: String,
    /// A worker's gRPC address (HOST:PORT), in pipeline order. Repeatable; workers
    /// may also join with `strata-worker --join`. Without any, workers are found
    /// over mDNS.
    #[arg(long = "worker", short = 'w')]
    pub workers: Vec<String>,
    /// Do not look for workers over mDNS.
    #[arg(long, env = "STRATA_NO_MDNS")]
    pub no_mdns: bool,
    /// Over mDNS, take only the workers started with this `--cluster` name.
    #[arg(long, env = "STRATA_CLUSTER", default_value = strata_discovery::DEFAULT_CLUSTER)]
    pub cluster: String,
    /// Workers to wait for before planning (default: the number of --worker flags,
    /// at least 1).
    #[arg(long)]
    pub min_workers: Option<usize>,
    /// Seconds to wait for the workers.
    #[arg(long, default_value_t = 120)]
    pub worker_wait: u64,
    /// Where workers reach the coordinator's gRPC service (join, weights).
    #[arg(long, env = "STRATA_GRPC_LISTEN", default_value = "0.0.0.0:7100")]
    pub grpc_listen: SocketAddr,
    /// The gRPC address workers should use, when it is not the bound one.
    #[arg(long)]
    pub grpc_advertise: Option<String>,
    /// Where the HTTP API listens; port 0 picks a free port.
    #[arg(long, env = "STRATA_HTTP_LISTEN", default_value = "127.0.0.1:8000")]
    pub http_listen: SocketAddr,
    /// Hidden states between stages: f32 reproduces one process exactly, f16 halves
    /// the bytes on the wire.
    #[arg(long, value_enum, default_value_t = WireDtypeArg::F32)]
    pub wire_dtype: WireDtypeArg,
    /// How sampled tokens get back to stage 0.
    #[arg(long, value_enum, default_value_t = ReturnPathArg::Direct)]
    pub return_path: ReturnPathArg,
    /// The model id clients send as `"model"` (default: the name, or file stem).
    #[arg(long)]
    pub model_id: Option<String>,
    /// How layers are spread: `fastest` (the planner's fastest plan for one stream;
    /// workers that would only slow it down hold nothing) or `spread` (every worker
    /// holds layers, in proportion to its speed).
    #[arg(long, value_enum, default_value_t = PlacementArg::Fastest)]
    pub placement: PlacementArg,
    /// A manual plan by worker name, such as `debian:0-9,gaming-pc:10-39,rack:40-79`
    /// (overrides --placement).
    #[arg(long)]
    pub layers: Option<String>,
    /// Context length every sequence may reach, for sizing the KV caches the plan
    /// must fit. A request whose prompt plus max_tokens exceeds it is refused (400).
    #[arg(long, default_value_t = 4096)]
    pub context: usize,
    /// Sequences decoded at once, for the same sizing. Requests beyond them wait in
    /// line for one (`strata status` shows the queue).
    #[arg(long, default_value_t = 4)]
    pub sequences: usize,
    /// Seconds a request may wait before it fails: in line for one of the
    /// --sequences (then 429), or for capacity after a worker is lost or drained
    /// with --force (then 503).
    #[arg(long, default_value_t = 120)]
    pub queue_timeout: u64,
    /// How requests in flight move when the plan changes while the old pipeline
    /// still works (drain, undrain, a worker joining): `replay` runs each again on
    /// the new stages, `transfer` moves each with its KV cache (stage to stage),
    /// `auto` picks the faster per request. A lost worker always means a replay.
    #[arg(long, value_enum, default_value_t = MoveSequencesArg::Auto)]
    pub move_sequences: MoveSequencesArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MoveSequencesArg {
    Replay,
    Transfer,
    Auto,
}

impl From<MoveSequencesArg> for MovePolicy {
    fn from(a: MoveSequencesArg) -> Self {
        match a {
            MoveSequencesArg::Replay => MovePolicy::Replay,
            MoveSequencesArg::Transfer => MovePolicy::Transfer,
            MoveSequencesArg::Auto => MovePolicy::Auto,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PlacementArg {
    Fastest,
    Spread,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let path = crate::model_store::resolve(&args.model)?;
    let model_id = args.model_id.clone().unwrap_or_else(|| default_model_id(&args.model));
    let model = Arc::new(ServedModel::open(&path, model_id).with_context(|| format!("opening {}", path.display()))?);
    // The coordinator computes nothing heavy (tokenizing runs on the blocking pool):
    // a small runtime leaves the cores to workers sharing this machine.
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(serve(args, model, super::serve_local::shutdown_signal()))
}

/// The model id a model is served under by default.
fn default_model_id(spec: &str) -> String {
    if crate::model_store::known(spec).is_some() {
        return spec.to_owned();
    }
    Path::new(spec).file_stem().and_then(|s| s.to_str()).unwrap_or(spec).to_owned()
}

fn say(line: &str) -> anyhow::Result<()> {
    // Readers (tests, `strata demo`) wait on whole lines.
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()?;
    Ok(())
}

/// Serves until `shutdown` completes.
pub async fn serve(
    args: ServeArgs,
    model: Arc<ServedModel>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let grpc = tokio::net::TcpListener::bind(args.grpc_listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.grpc_listen))?;
    let grpc_addr = grpc.local_addr()?;
    let advertised = args.grpc_advertise.clone().unwrap_or_else(|| advertised(grpc_addr));
    let membership = Arc::new(Membership::default());
    let service = CoordinatorService {
        id: format!("strata-{}", std::process::id()),
        model: model.clone(),
        membership: membership.clone(),
    };
    let grpc_server = tokio::spawn(cluster::serve_grpc(grpc, service, stopped(stop.clone())));
    say(&format!("coordinator grpc={advertised}"))?;
    let discovery = (args.workers.is_empty() && !args.no_mdns).then(|| {
        let (membership, cluster, stop) = (membership.clone(), args.cluster.clone(), stopped(stop.clone()));
        tokio::spawn(async move {
            if let Err(e) = cluster::discovery::run(membership, cluster, stop).await {
                tracing::warn!("not looking for workers over mDNS: {e}");
            }
        })
    });

    let config = ClusterConfig {
        workers: args.workers.clone(),
        min_workers: args.min_workers.unwrap_or(args.workers.len()).max(1),
        worker_wait: Duration::from_secs(args.worker_wait),
        wire_dtype: match args.wire_dtype {
            WireDtypeArg::F32 => WireDtype::F32,
            WireDtypeArg::F16 => WireDtype::F16,
        },
        return_path: match args.return_path {
            ReturnPathArg::Coordinator => ReturnPath::Coordinator,
            ReturnPathArg::Direct => ReturnPath::Direct,
        },
        weights_source: advertised.clone(),
        placement: match (&args.layers, args.placement) {
            (Some(layers), _) => PlacementPolicy::Manual(layers.clone()),
            (None, PlacementArg::Fastest) => PlacementPolicy::Fastest,
            (None, PlacementArg::Spread) => PlacementPolicy::Spread,
        },
        plan: crate::planner::PlanOptions {
            context: args.context.max(1),
            sequences: args.sequences.max(1),
            ..crate::planner::PlanOptions::default()
        },
        queue_timeout: Duration::from_secs(args.queue_timeout),
        move_sequences: args.move_sequences.into(),
    };
    let cluster = tokio::select! {
        c = Cluster::start(&config, model.clone(), membership) => c.context("cannot start the pipeline")?,
        () = stopped(stop.clone()) => {
            let _ = grpc_server.await;
            if let Some(discovery) = discovery {
                let _ = discovery.await;
            }
            return Ok(());
        }
    };
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

    let http = match tokio::net::TcpListener::bind(args.http_listen).await {
        Ok(l) => l,
        Err(e) => {
            cluster.shutdown().await;
            return Err(e).with_context(|| format!("cannot listen on {}", args.http_listen));
        }
    };
    let http_addr = http.local_addr()?;
    say(&format!("listening http={http_addr} grpc={advertised}"))?;
    let engine: Arc<dyn crate::engine::Engine> = cluster.engine.clone();
    let served = crate::api::serve(http, engine, Some(cluster.admin()), stopped(stop.clone())).await;
    cluster.shutdown().await;
    let _ = grpc_server.await;
    if let Some(discovery) = discovery {
        let _ = discovery.await;
    }
    served.context("the HTTP API failed")?;
    Ok(())
}

fn advertised(local: SocketAddr) -> String {
    let ip = if local.ip().is_unspecified() { std::net::Ipv4Addr::LOCALHOST.into() } else { local.ip() };
    SocketAddr::new(ip, local.port()).to_string()
}
