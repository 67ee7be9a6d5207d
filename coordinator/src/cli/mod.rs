//! The `strata` command line: one subcommand a module.

pub mod admin;
pub mod bench;
pub mod bench_cluster;
pub mod bench_switch;
pub mod children;
pub mod demo;
pub mod generate;
pub mod gpu_check;
pub mod http;
pub mod model;
pub mod perplexity;
pub mod plan;
pub mod serve;
pub mod serve_local;
pub mod trust;
pub mod top;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

/// strata: one large language model run across all the machines of a home lab.
#[derive(Debug, Parser)]
#[command(name = "strata", version, about)]
pub struct Cli {
    /// Compute threads of this process (its compute pool, the calling thread
    /// included). Several processes sharing a machine should split its cores
    /// between them rather than each take all.
    #[arg(long, global = true, env = "STRATA_THREADS")]
    pub threads: Option<usize>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Complete a prompt in this one process.
    Generate(generate::GenerateArgs),
    /// Manage local model files.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Measure prefill and decode speed, memory, and the size of each stage.
    Bench(bench::BenchArgs),
    /// Perplexity on a text, and KL divergence from a base run, as llama-perplexity computes them.
    Perplexity(perplexity::PerplexityArgs),
    /// Serve the OpenAI-compatible HTTP API over a model run in this one process.
    ServeLocal(serve_local::ServeLocalArgs),
    /// Coordinate a cluster of workers and serve the HTTP API over it.
    Serve(serve::ServeArgs),
    /// Start a coordinator and three workers here and answer a prompt through them.
    Demo(demo::DemoArgs),
    /// Print the join token workers need (`strata-worker --token`), making the
    /// cluster's certificate authority if this is the first time.
    Token(trust::TokenArgs),
    /// Will a model fit on these machines, how is it split, and how fast does it run?
    Plan(plan::PlanArgs),
    /// The workers of a running cluster: state, layers, memory, speed.
    Status(admin::StatusArgs),
    /// `strata status` refreshing in place, with the layer map: a live view over SSH.
    Top(top::TopArgs),
    /// Move a worker's layers to the others and free its memory.
    Drain(admin::DrainArgs),
    /// Bring a drained worker back; the cluster rebalances.
    Undrain(admin::UndrainArgs),
    /// Manage the cluster's nodes: `strata node revoke NAME`.
    #[command(subcommand)]
    Node(admin::NodeCommand),
    /// Check a GPU in minutes: device against CPU logits, speed, a drained 2-worker
    /// pipeline, on random models written on the spot.
    GpuCheck(gpu_check::GpuCheckArgs),
}

/// Which model and where to run it.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A GGUF file, or a known model name (`smollm2-135m`), fetched on first use.
    #[arg(long, short = 'm', default_value = "smollm2-135m")]
    pub model: String,
    /// `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl ModelArgs {
    pub fn open(&self) -> anyhow::Result<(strata_model::ModelFile, strata_model::Device)> {
        let path = crate::model_store::resolve(&self.model)?;
        let file = strata_model::ModelFile::open(&path)?;
        let device = strata_model::parse_device(&self.device)?;
        Ok((file, device))
    }
}

/// Who may use the HTTP API (`strata serve`, `strata serve-local`).
#[derive(Debug, Clone, Args)]
pub struct ApiKeyArgs {
    /// A key clients must send as `Authorization: Bearer KEY` (the `api_key` of
    /// OpenAI's clients); repeatable. With no key the API is open: fine on the
    /// loopback address it listens on by default, not on a LAN.
    #[arg(long = "api-key", value_name = "KEY", env = "STRATA_API_KEY", hide_env_values = true)]
    pub api_keys: Vec<String>,
    /// A file of client keys, one a line (`#` starts a comment).
    #[arg(long, value_name = "PATH")]
    pub api_key_file: Option<std::path::PathBuf>,
    /// The key the admin routes need (status, drain, undrain: what `strata status`
    /// and `strata drain` call); repeatable. A client key does not open them.
    #[arg(long = "admin-key", value_name = "KEY", env = "STRATA_ADMIN_KEY", hide_env_values = true)]
    pub admin_keys: Vec<String>,
    /// A file of admin keys, one a line.
    #[arg(long, value_name = "PATH")]
    pub admin_key_file: Option<std::path::PathBuf>,
}

impl ApiKeyArgs {
    pub fn keys(&self) -> anyhow::Result<crate::api::ApiKeys> {
        let gather = |given: &[String], file: &Option<std::path::PathBuf>, flag: &str| -> anyhow::Result<Vec<String>> {
            let mut keys = given.to_vec();
            if let Some(path) = file {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read --{flag}-file {}", path.display()))?;
                let before = keys.len();
                keys.extend(
                    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string),
                );
                anyhow::ensure!(keys.len() > before, "--{flag}-file {} holds no key", path.display());
            }
            Ok(keys)
        };
        let client = gather(&self.api_keys, &self.api_key_file, "api-key")?;
        let admin = gather(&self.admin_keys, &self.admin_key_file, "admin-key")?;
        Ok(crate::api::ApiKeys::new(&client, &admin)?)
    }

    /// Says what an API without client keys on a non-loopback address exposes.
    pub fn warn_if_open(&self, keys: &crate::api::ApiKeys, listen: std::net::SocketAddr) {
        if !keys.guards_clients() && !listen.ip().is_loopback() {
            let warning = format!(
                "warning: the HTTP API on {listen} has no API key: anyone who can reach it can run prompts on this cluster{}; pass --api-key or --api-key-file",
                if keys.is_open() { " and drain its workers" } else { "" }
            );
            eprintln!("{warning}");
            tracing::warn!("{warning}");
        }
    }
}

/// Sampling flags shared by every command that generates.
#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub min_p: Option<f32>,
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    pub fn params(&self) -> strata_model::SamplingParams {
        strata_model::SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repeat_penalty,
            seed: self.seed,
            ..strata_model::SamplingParams::greedy()
        }
    }
}

/// Sizes the compute pool (and candle's, through the same variables). Must run
/// before any tensor work starts the pool, and before other threads exist (it
/// writes the process environment).
pub fn set_compute_threads(threads: Option<usize>) {
    if let Some(n) = threads.filter(|&n| n > 0) {
        for key in ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"] {
            std::env::set_var(key, n.to_string());
        }
    }
}
