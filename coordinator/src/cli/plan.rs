//! `strata plan`: will this model fit on these machines, how would it be split, and
//! how fast would it run? A what-if over the planner, no workers needed.
//!
//! Exits 0 when the model fits (or a `--layers` override fits), 1 after printing
//! the answer when it does not, and with an error for bad input.

use std::path::Path;

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;
use strata_proto::units::parse_bytes;

use crate::cluster::placement::one_device_node;
use crate::model_store;
use crate::planner::{self, catalog, format_bytes, MemoryLimits, ModelSpec, Plan, PlanError, PlanOptions, Shortfall};

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// A catalog model (`llama-3.1-70b-q4_k_m`: llama-3.1-8b/70b/405b, qwen-2.5-32b/72b,
    /// deepseek-v3, each -fp16, -q8_0 or -q4_k_m) or a GGUF file.
    #[arg(long, short = 'm')]
    pub model: String,
    /// The machines, comma-separated, each `[NAME=]DEVICE[+DEVICE…]`; a device is a
    /// catalog name (`rtx3090`, `m2-max-64gb`), `2x rtx4090` for two in one machine,
    /// or `MEMORY@BANDWIDTH` (`64GiB@50GB/s`). Without it, the workers of the running
    /// cluster at --coordinator, with what they offer and measured.
    #[arg(long)]
    pub nodes: Option<String>,
    #[command(flatten)]
    pub coordinator: super::admin::CoordinatorArg,
    /// Tokens of context every sequence may reach.
    #[arg(long, default_value_t = 4096)]
    pub context: usize,
    /// Sequences decoded at once, each with its own KV cache.
    #[arg(long, default_value_t = 1)]
    pub sequences: usize,
    /// Evaluate this placement instead of searching: `debian:0-9,gaming-pc:10-79`.
    #[arg(long)]
    pub layers: Option<String>,
    /// Offer at most this much of every device (`20GiB`).
    #[arg(long)]
    pub max_memory: Option<String>,
    /// Keep this much of every device free (`4GiB`); Apple chips keep a quarter by default.
    #[arg(long)]
    pub reserve: Option<String>,
    /// Milliseconds a hidden state takes from one machine to the next.
    #[arg(long, default_value_t = 0.5)]
    pub link_latency_ms: f64,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// The workers of the running cluster that may hold layers, as planner nodes.
fn live_nodes(
    coordinator: &super::admin::CoordinatorArg,
    limits: MemoryLimits,
    link_latency: f64,
) -> anyhow::Result<Vec<planner::NodeSpec>> {
    let status = super::admin::fetch_status(coordinator)
        .with_context(|| "without --nodes, `strata plan` plans for the running cluster".to_string())?;
    let nodes: Vec<planner::NodeSpec> = status
        .nodes
        .iter()
        .filter(|n| n.state == "ready")
        .map(|n| {
            let offered = limits.max_memory.map_or(n.memory_offered_bytes, |cap| cap.min(n.memory_offered_bytes));
            let offered = offered.saturating_sub(limits.reserve.unwrap_or(0));
            let device = n.devices.first().cloned().unwrap_or_else(|| "device".into());
            let mut node = one_device_node(n.name.clone(), device, offered, n.bandwidth_bytes_per_second);
            node.link_latency = link_latency;
            node
        })
        .collect();
    if nodes.is_empty() {
        bail!("the cluster at {} has no ready workers to plan for", coordinator.coordinator);
    }
    Ok(nodes)
}

/// The answer, as `--json` prints it.
#[derive(Debug, Serialize)]
struct Report {
    fits: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    plan: Option<Plan>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tokens_per_second: Option<f64>,
    /// The longest context the plan's stages hold as they are.
    #[serde(skip_serializing_if = "Option::is_none")]
    plan_max_context: Option<usize>,
    /// The longest context any plan on these nodes holds.
    nodes_max_context: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    shortfall: Option<Shortfall>,
    /// The shortfall in words, as the text output prints it.
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

pub fn run(args: PlanArgs) -> anyhow::Result<()> {
    let model = load_model(&args.model)?;
    let limits = MemoryLimits {
        max_memory: args.max_memory.as_deref().map(parse_bytes).transpose().context("--max-memory")?,
        reserve: args.reserve.as_deref().map(parse_bytes).transpose().context("--reserve")?,
    };
    if !(args.link_latency_ms.is_finite() && args.link_latency_ms >= 0.0) {
        bail!("--link-latency-ms must be a number of milliseconds, 0 or more");
    }
    let nodes = match &args.nodes {
        Some(spec) => planner::node::parse_nodes(spec, limits, args.link_latency_ms / 1e3).context("--nodes")?,
        None => live_nodes(&args.coordinator, limits, args.link_latency_ms / 1e3)?,
    };
    let options = PlanOptions { context: args.context, sequences: args.sequences, ..PlanOptions::default() };

    let result = match &args.layers {
        Some(spec) => {
            let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
            let assignment = planner::parse_layers(spec, &names, model.layers()).context("--layers")?;
            planner::evaluate(&model, &nodes, &assignment, &options)
        }
        None => planner::plan(&model, &nodes, &options),
    };
    let nodes_max_context = planner::largest_context(&model, &nodes, &options);
    let report = match result {
        Ok(plan) => Report {
            fits: plan.fits(),
            tokens_per_second: Some(plan.tokens_per_second()),
            plan_max_context: Some(plan.max_context(&model, &options)),
            plan: Some(plan),
            nodes_max_context,
            shortfall: None,
            message: None,
        },
        Err(PlanError::DoesNotFit(shortfall)) => Report {
            fits: false,
            plan: None,
            tokens_per_second: None,
            plan_max_context: None,
            nodes_max_context,
            message: Some(shortfall.to_string()),
            shortfall: Some(*shortfall),
        },
        Err(e) => return Err(e.into()),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&model, &options, args.link_latency_ms, &report);
    }
    if !report.fits {
        std::process::exit(1);
    }
    Ok(())
}

/// A catalog name, a GGUF path, or a known downloadable model.
fn load_model(spec: &str) -> anyhow::Result<ModelSpec> {
    if let Some(model) = catalog::model(spec) {
        return Ok(model);
    }
    let path = Path::new(spec);
    let path = if path.exists() || model_store::known(spec).is_some() {
        model_store::resolve(spec)?
    } else {
        bail!("unknown model `{spec}`: not a file, and not in the catalog ({})", catalog::model_names().join(", "));
    };
    let file = strata_model::ModelFile::open(&path)?;
    let name = path.file_name().map_or_else(|| spec.to_string(), |n| n.to_string_lossy().into_owned());
    Ok(ModelSpec::from_gguf(name, &file))
}

fn print_text(model: &ModelSpec, options: &PlanOptions, latency_ms: f64, report: &Report) {
    let sequences =
        if options.sequences == 1 { "1 sequence".to_string() } else { format!("{} sequences", options.sequences) };
    println!(
        "{}: {} layers, {} of weights; context {} × {sequences}",
        model.name,
        model.layers(),
        format_bytes(model.total_bytes()),
        options.context
    );
    println!("fits: {}", if report.fits { "yes" } else { "no" });
    if let Some(message) = &report.message {
        println!("{message}");
    }
    if let Some(plan) = &report.plan {
        println!();
        println!(
            "{:>5}  {:<14} {:<12} {:>7}  {:>10} {:>10} {:>10}  {:>21}",
            "stage", "node", "device", "layers", "weights", "kv cache", "scratch", "needed / offered"
        );
        for (i, s) in plan.stages.iter().enumerate() {
            let layers = format!("{}-{}", s.layers.start, s.layers.end - 1);
            let mark = if s.fits() { "" } else { "  does not fit" };
            println!(
                "{:>5}  {:<14} {:<12} {:>7}  {:>10} {:>10} {:>10}  {:>21}{mark}",
                i + 1,
                s.node,
                format!("{}#{}", s.device, s.device_index),
                layers,
                format_bytes(s.weight_bytes),
                format_bytes(s.kv_bytes),
                format_bytes(s.scratch_bytes),
                format!("{} / {}", format_bytes(s.needed_bytes()), format_bytes(s.offered_bytes)),
            );
        }
        for left in &plan.left_out {
            let what = match &left.device {
                Some(device) => format!("device {device} of {}", left.node),
                None => left.node.clone(),
            };
            println!("left out: {what} ({})", left.reason);
        }
        println!();
        println!(
            "predicted: {:.1} tokens/s single stream ({:.1} ms per token, {:.2} ms of it network at {latency_ms} ms per hop), at peak memory bandwidth",
            plan.tokens_per_second(),
            plan.seconds_per_token * 1e3,
            plan.network_seconds_per_token * 1e3,
        );
    }
    let nodes = match report.nodes_max_context {
        Some(n) => format!("{n} tokens"),
        None => "none".to_string(),
    };
    match report.plan_max_context {
        Some(p) => println!("largest context: {p} tokens with this plan, {nodes} with a plan made for it"),
        None => println!("largest context on these nodes: {nodes}"),
    }
}
