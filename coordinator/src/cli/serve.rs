//! `strata serve`: the coordinator of a cluster. Parses its arguments into a
//! [`ServeConfig`], binds its two listeners and hands off to [`crate::server::run`],
//! which says on stdout what it does (see there).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use strata_proto::v1::WireDtype;

use crate::cluster::{MovePolicy, PlacementPolicy, ReturnPath, ServedModel};
use crate::server::{Listeners, ServeConfig};

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
    /// A worker's gRPC address (HOST:PORT or http://HOST:PORT), in pipeline order.
    /// Repeatable; workers may also join with `strata-worker --join`. Without any,
    /// workers are found over mDNS.
    #[arg(long = "worker", short = 'w', value_name = "ADDRESS", value_parser = strata_proto::address::canonical)]
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
    /// The gRPC address workers should use (HOST:PORT), when it is not the bound one.
    #[arg(long, value_name = "ADDRESS", value_parser = strata_proto::address::canonical)]
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
    /// must fit (default: the model's, at most 4096). A request whose prompt plus
    /// max_tokens exceeds it is refused (400).
    #[arg(long)]
    pub context: Option<usize>,
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
    /// Keep nothing when a request ends. By default the stages keep a copy of a
    /// finished request's prompt KV while a planned sequence is free for it, so the
    /// next turn of its conversation copies the KV of their shared prompt start
    /// (in whole frames of 512 tokens) instead of computing it again.
    #[arg(long)]
    pub no_prefix_cache: bool,
    /// Seconds requests in flight may run on after a stop is asked for (SIGTERM,
    /// Ctrl-C) before they are cut off.
    #[arg(long, default_value_t = 30)]
    pub shutdown_grace: u64,
    #[command(flatten)]
    pub keys: super::ApiKeyArgs,
    #[command(flatten)]
    pub trust: super::trust::TrustArgs,
    #[command(flatten)]
    pub trace: strata_telemetry::TraceArgs,
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

/// The context a plan is sized for when `--context` is not given.
const DEFAULT_CONTEXT: usize = 4096;

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let path = crate::model_store::resolve(&args.model)?;
    let model_id = args.model_id.clone().unwrap_or_else(|| super::serve_local::default_model_id(&args.model));
    let model = Arc::new(ServedModel::open(&path, model_id).with_context(|| format!("opening {}", path.display()))?);
    let mut config = config(&args, model);
    config.validate()?;
    config.api_keys = args.keys.keys()?;
    args.keys.warn_if_open(&config.api_keys, args.http_listen);
    config.join_token = args.trust.install()?;
    // The coordinator computes nothing heavy (tokenizing runs on the blocking pool):
    // a small runtime leaves the cores to workers sharing this machine.
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let served = runtime.block_on(async {
        let listeners = Listeners { grpc: bind(args.grpc_listen).await?, http: bind(args.http_listen).await? };
        crate::server::run(listeners, config, super::serve_local::shutdown_signal()).await?;
        anyhow::Ok(())
    });
    // `run` has already stopped everything within its graces; dropping the runtime
    // would still wait for blocking tasks (a weight shard being read for a pull cut
    // off a moment ago), and exiting must not.
    runtime.shutdown_background();
    served
}

async fn bind(address: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(address).await.with_context(|| format!("cannot listen on {address}"))
}

/// The settings `args` ask for, over `model`.
pub fn config(args: &ServeArgs, model: Arc<ServedModel>) -> ServeConfig {
    let trained = model.card.context_length;
    let context = args.context.unwrap_or(if trained > 0 { trained.min(DEFAULT_CONTEXT) } else { DEFAULT_CONTEXT });
    ServeConfig {
        model,
        workers: args.workers.clone(),
        mdns_cluster: (!args.no_mdns).then(|| args.cluster.clone()),
        min_workers: args.min_workers.unwrap_or(args.workers.len()).max(1),
        worker_wait: Duration::from_secs(args.worker_wait),
        grpc_advertise: args.grpc_advertise.clone(),
        wire_dtype: match args.wire_dtype {
            WireDtypeArg::F32 => WireDtype::F32,
            WireDtypeArg::F16 => WireDtype::F16,
        },
        return_path: match args.return_path {
            ReturnPathArg::Coordinator => ReturnPath::Coordinator,
            ReturnPathArg::Direct => ReturnPath::Direct,
        },
        placement: match (&args.layers, args.placement) {
            (Some(layers), _) => PlacementPolicy::Manual(layers.clone()),
            (None, PlacementArg::Fastest) => PlacementPolicy::Fastest,
            (None, PlacementArg::Spread) => PlacementPolicy::Spread,
        },
        plan: crate::planner::PlanOptions {
            context,
            sequences: args.sequences,
            ..crate::planner::PlanOptions::default()
        },
        queue_timeout: Duration::from_secs(args.queue_timeout),
        move_sequences: args.move_sequences.into(),
        prefix_cache: !args.no_prefix_cache,
        shutdown_grace: Duration::from_secs(args.shutdown_grace),
        api_keys: crate::api::ApiKeys::default(),
        join_token: None,
    }
}
