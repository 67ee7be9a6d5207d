//! Placement: which contiguous layers each node's devices hold, so that a token
//! passes through the pipeline as fast as possible while everything fits.
//!
//! Pure logic over sizes and speeds; nothing here reads files or talks to workers.
//! Decoding one token reads every weight once, so a stage takes about (bytes it
//! reads ÷ its memory bandwidth), and the predicted time per token is the sum of
//! the stages plus the latency of every hop. A device fits its stage when its
//! weights, the KV cache of its layers (context × sequences × bytes per token per
//! layer), the runtime's scratch and a fixed headroom are within what it offers.
//!
//! * [`model`]: the model's sizes ([`ModelSpec`]), from a GGUF or the catalog;
//! * [`node`]: what nodes offer ([`NodeSpec`]) and the `--nodes` syntax;
//! * [`catalog`]: built-in GPUs, Apple chips and models;
//! * [`overrides`]: the `--layers` manual override;
//! * `search`: the optimisation itself. The planner picks the order of the nodes:
//!   which is first (holds the embedding) and last (holds and reads the head); the
//!   others keep the order they were given in, which costs nothing when layers are
//!   of one size (see `search` for why).

pub mod catalog;
pub mod model;
pub mod node;
pub mod overrides;
mod search;

use std::fmt;
use std::ops::Range;

use serde::Serialize;

pub use model::ModelSpec;
pub use node::{DeviceSpec, MemoryLimits, NodeSpec, NodeSpecError};
pub use overrides::{parse_layers, OverrideError};
use search::{Placement, Problem};
/// Sizes print the same everywhere; the coordinator's code takes it from here.
pub use strata_proto::units::format_bytes;

/// What the plan must hold beyond the weights, and the costs it assumes.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanOptions {
    /// Tokens of context every sequence may reach.
    pub context: usize,
    /// Sequences decoded at once, each with a full context of KV cache.
    pub sequences: usize,
    /// Prompt tokens prefilled per sequence per step (the runtime's
    /// `StageOptions::prefill_chunk`); sizes the attention scratch.
    pub prefill_chunk: usize,
    /// Bytes kept free on every device: the CUDA context and the allocator's slack.
    pub headroom: u64,
    /// Seconds a hop between two devices of one node takes.
    pub intra_node_latency: f64,
}

impl Default for PlanOptions {
    /// Half a GiB of headroom covers a CUDA context and allocator slack; 50 µs is a
    /// hop between two workers of one machine, over loopback.
    fn default() -> Self {
        Self {
            context: 4096,
            sequences: 1,
            prefill_chunk: strata_proto::timing::PREFILL_CHUNK_TOKENS,
            headroom: 512 << 20,
            intra_node_latency: 50e-6,
        }
    }
}

/// One stage: a device and the layers it holds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stage {
    pub node: String,
    pub device: String,
    /// Index of the device within its node.
    pub device_index: usize,
    pub layers: Range<usize>,
    pub weight_bytes: u64,
    pub kv_bytes: u64,
    pub scratch_bytes: u64,
    pub headroom_bytes: u64,
    /// What the device offers.
    pub offered_bytes: u64,
    /// Predicted seconds this stage computes per token.
    pub seconds_per_token: f64,
}

impl Stage {
    pub fn needed_bytes(&self) -> u64 {
        self.weight_bytes + self.kv_bytes + self.scratch_bytes + self.headroom_bytes
    }

    pub fn fits(&self) -> bool {
        self.needed_bytes() <= self.offered_bytes
    }
}

/// Why a node or device holds no layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LeftOutReason {
    /// It cannot hold even one layer with its cache, scratch and headroom.
    TooSmall,
    /// The others hold the model, and faster without it.
    NotNeeded,
    /// A manual override did not name it.
    NotNamed,
}

impl fmt::Display for LeftOutReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LeftOutReason::TooSmall => "cannot hold one layer with its cache and scratch",
            LeftOutReason::NotNeeded => "not needed: the others hold the model faster without it",
            LeftOutReason::NotNamed => "not named in the layer override",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LeftOut {
    pub node: String,
    /// The device, when its node is in the plan but this device of it is not.
    pub device: Option<String>,
    pub reason: LeftOutReason,
}

/// A placement of the model with its predicted speed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub model: String,
    pub layers: usize,
    pub context: usize,
    pub sequences: usize,
    /// In pipeline order.
    pub stages: Vec<Stage>,
    pub left_out: Vec<LeftOut>,
    /// Stage compute plus hop latency, per token of one sequence.
    pub seconds_per_token: f64,
    pub network_seconds_per_token: f64,
}

impl Plan {
    /// Whether every stage fits its device (a planned one always does; an override
    /// may not).
    pub fn fits(&self) -> bool {
        self.stages.iter().all(Stage::fits)
    }

    /// Predicted decode speed of a single stream.
    pub fn tokens_per_second(&self) -> f64 {
        1.0 / self.seconds_per_token
    }

    /// The longest context these exact stages hold (same sequences), capped at the
    /// model's trained context; 0 when not even one token fits.
    pub fn max_context(&self, model: &ModelSpec, options: &PlanOptions) -> usize {
        let fits_at = |context: usize| {
            let scratch = model.scratch_bytes(context, options.sequences, options.prefill_chunk);
            self.stages.iter().all(|s| {
                let kv = model.kv_bytes(s.layers.clone(), context, options.sequences);
                s.weight_bytes + kv + scratch + s.headroom_bytes <= s.offered_bytes
            })
        };
        largest(model.max_context, fits_at)
    }
}

/// What went short, and what would help.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Shortfall {
    pub model: String,
    /// Weights and KV cache of the whole model.
    pub needed_bytes: u64,
    /// What the devices offer after their scratch and headroom.
    pub available_bytes: u64,
    pub short_by_bytes: u64,
    /// Enough memory in total, but the layers do not divide across the devices.
    pub layers_do_not_divide: bool,
    pub help: Vec<String>,
}

impl fmt::Display for Shortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} does not fit: ", self.model)?;
        if self.layers_do_not_divide {
            write!(
                f,
                "its layers do not divide across the devices (weights and kv cache need {}, the devices offer {})",
                format_bytes(self.needed_bytes),
                format_bytes(self.available_bytes)
            )?;
        } else {
            write!(
                f,
                "weights and kv cache need {} but the devices offer {} after scratch and headroom, {} short",
                format_bytes(self.needed_bytes),
                format_bytes(self.available_bytes),
                format_bytes(self.short_by_bytes)
            )?;
        }
        if !self.help.is_empty() {
            write!(f, "; what would help: {}", self.help.join("; "))?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("no nodes to plan for")]
    NoNodes,
    #[error("the model has no layers")]
    NoLayers,
    #[error("the context and the number of sequences must be at least 1")]
    Empty,
    #[error("node name `{0}` is used twice")]
    DuplicateNode(String),
    #[error("{0}")]
    DoesNotFit(Box<Shortfall>),
}

/// The fastest placement of `model` on (some of) `nodes` that fits, or what is
/// missing. Nodes that would only slow the pipeline are left out.
pub fn plan(model: &ModelSpec, nodes: &[NodeSpec], options: &PlanOptions) -> Result<Plan, PlanError> {
    check(model, nodes, options)?;
    match Problem::new(model, nodes, options).search() {
        Some((_, placements)) => Ok(describe(model, nodes, options, &placements, LeftOutReason::NotNeeded)),
        None => Err(PlanError::DoesNotFit(Box::new(shortfall(model, nodes, options)))),
    }
}

/// Evaluates a manual placement (from [`parse_layers`]): each node's range is split
/// over its devices as well as it can be; the plan says whether it fits.
pub fn evaluate(
    model: &ModelSpec,
    nodes: &[NodeSpec],
    assignment: &[(usize, Range<usize>)],
    options: &PlanOptions,
) -> Result<Plan, PlanError> {
    check(model, nodes, options)?;
    let problem = Problem::new(model, nodes, options);
    let mut placements = Vec::new();
    for (node, layers) in assignment {
        match problem.split(*node, layers.clone()) {
            Some((_, split)) => placements.extend(split),
            None => {
                // It does not fit either way; an even split shows by how much.
                let devices = nodes[*node].devices.len().min(layers.len());
                for d in 0..devices {
                    let a = layers.start + d * layers.len() / devices;
                    let b = layers.start + (d + 1) * layers.len() / devices;
                    placements.push(Placement { node: *node, device: d, layers: a..b });
                }
            }
        }
    }
    Ok(describe(model, nodes, options, &placements, LeftOutReason::NotNamed))
}

/// The longest context (for `options.sequences`) any plan on these nodes holds,
/// capped at the model's trained context; `None` when not even one token fits.
pub fn largest_context(model: &ModelSpec, nodes: &[NodeSpec], options: &PlanOptions) -> Option<usize> {
    let context = largest(model.max_context, |context| {
        let options = PlanOptions { context, ..options.clone() };
        Problem::new(model, nodes, &options).search().is_some()
    });
    (context > 0).then_some(context)
}

fn check(model: &ModelSpec, nodes: &[NodeSpec], options: &PlanOptions) -> Result<(), PlanError> {
    if nodes.is_empty() {
        return Err(PlanError::NoNodes);
    }
    if model.layers() == 0 {
        return Err(PlanError::NoLayers);
    }
    if options.context == 0 || options.sequences == 0 {
        return Err(PlanError::Empty);
    }
    for (i, node) in nodes.iter().enumerate() {
        if nodes[..i].iter().any(|n| n.name == node.name) {
            return Err(PlanError::DuplicateNode(node.name.clone()));
        }
    }
    Ok(())
}

fn describe(
    model: &ModelSpec,
    nodes: &[NodeSpec],
    options: &PlanOptions,
    placements: &[Placement],
    reason: LeftOutReason,
) -> Plan {
    let problem = Problem::new(model, nodes, options);
    let stages: Vec<Stage> = placements
        .iter()
        .map(|p| {
            let device = &nodes[p.node].devices[p.device];
            Stage {
                node: nodes[p.node].name.clone(),
                device: device.name.clone(),
                device_index: p.device,
                layers: p.layers.clone(),
                weight_bytes: model.resident_bytes(p.layers.clone()),
                kv_bytes: problem.kv_bytes(&p.layers),
                scratch_bytes: problem.scratch_bytes(),
                headroom_bytes: options.headroom,
                offered_bytes: device.memory,
                seconds_per_token: problem.device_seconds(p.node, p.device, p.layers.clone()),
            }
        })
        .collect();
    let mut used: Vec<usize> = Vec::new();
    for p in placements {
        if !used.contains(&p.node) {
            used.push(p.node);
        }
    }
    let intra_hops = placements.windows(2).filter(|w| w[0].node == w[1].node).count();
    let network = problem.network_seconds(&used) + intra_hops as f64 * options.intra_node_latency;
    let mut left_out = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        if !used.contains(&n) {
            let reason = if reason == LeftOutReason::NotNeeded && !problem.can_hold_a_layer(n) { LeftOutReason::TooSmall } else { reason };
            left_out.push(LeftOut { node: node.name.clone(), device: None, reason });
            continue;
        }
        for (d, device) in node.devices.iter().enumerate() {
            if !placements.iter().any(|p| p.node == n && p.device == d) {
                let reason = if problem.can_hold_a_layer_on(n, d) { LeftOutReason::NotNeeded } else { LeftOutReason::TooSmall };
                left_out.push(LeftOut { node: node.name.clone(), device: Some(format!("{}#{d}", device.name)), reason });
            }
        }
    }
    Plan {
        model: model.name.clone(),
        layers: model.layers(),
        context: options.context,
        sequences: options.sequences,
        seconds_per_token: stages.iter().map(|s| s.seconds_per_token).sum::<f64>() + network,
        network_seconds_per_token: network,
        stages,
        left_out,
    }
}

/// Works out the shortfall and what would close it, by planning again with less
/// context, fewer sequences, a smaller quantization, or one more device.
fn shortfall(model: &ModelSpec, nodes: &[NodeSpec], options: &PlanOptions) -> Shortfall {
    let problem = Problem::new(model, nodes, options);
    let layers = model.layers();
    let needed = model.total_bytes() - model.shared_bytes + problem.kv_bytes(&(0..layers));
    let overhead = problem.scratch_bytes() + options.headroom + model.shared_bytes;
    let available: u64 = nodes.iter().flat_map(|n| &n.devices).map(|d| d.memory.saturating_sub(overhead)).sum();
    let biggest_layer = model.layer_bytes.iter().copied().max().unwrap_or(0) + problem.kv_bytes(&(0..1));
    let layers_do_not_divide = needed <= available;
    let short_by = if layers_do_not_divide { biggest_layer } else { needed - available };

    let mut help = Vec::new();
    if let Some(context) = largest_context(model, nodes, options) {
        help.push(format!("a context of at most {context} tokens (--context {context})"));
    }
    if options.sequences > 1 {
        let sequences = largest(options.sequences - 1, |sequences| {
            let options = PlanOptions { sequences, ..options.clone() };
            Problem::new(model, nodes, &options).search().is_some()
        });
        if sequences > 0 {
            let plural = if sequences == 1 { "" } else { "s" };
            help.push(format!("at most {sequences} concurrent sequence{plural}"));
        }
    }
    let smaller = catalog::SMALLEST_QUANTIZATION;
    if let Some(bits) = model.bits_per_weight.filter(|&b| b > smaller.bits_per_weight + 0.1) {
        let scaled = scale_weights(model, smaller.bits_per_weight / bits);
        let weights = format_bytes(scaled.total_bytes());
        if Problem::new(&scaled, nodes, options).search().is_some() {
            help.push(format!("a smaller quantization: {} ({weights} of weights) fits", smaller.name));
        } else {
            help.push(format!("a smaller quantization alone is not enough ({} still has {weights} of weights)", smaller.name));
        }
    }
    // One more device must hold the missing bytes, its own overhead, and the slack
    // of a layer that does not divide evenly.
    let device_needs = short_by + overhead + biggest_layer;
    let biggest_gpu = catalog::devices().into_iter().filter(|d| d.default_reserve == 0).max_by_key(|d| d.memory);
    match (catalog::smallest_gpu_with(device_needs), biggest_gpu) {
        (Some(gpu), _) => help.push(format!(
            "another GPU offering at least {} (e.g. an {}, {})",
            format_bytes(device_needs),
            gpu.name,
            format_bytes(gpu.memory)
        )),
        // When even the biggest GPU would spend itself on scratch and one layer, more
        // GPUs do not help; the context has to shrink.
        (None, Some(gpu)) if gpu.memory > overhead + biggest_layer => {
            let count = short_by.div_ceil(gpu.memory - overhead - biggest_layer);
            help.push(format!("about {count} more GPUs of {} (e.g. {})", format_bytes(gpu.memory), gpu.name));
        }
        (None, _) => {}
    }
    Shortfall {
        model: model.name.clone(),
        needed_bytes: needed,
        available_bytes: available,
        short_by_bytes: short_by,
        layers_do_not_divide,
        help,
    }
}

fn scale_weights(model: &ModelSpec, factor: f64) -> ModelSpec {
    let scale = |bytes: u64| (bytes as f64 * factor).ceil() as u64;
    ModelSpec {
        layer_bytes: model.layer_bytes.iter().map(|&b| scale(b)).collect(),
        active_layer_bytes: model.active_layer_bytes.iter().map(|&b| scale(b)).collect(),
        embedding_bytes: scale(model.embedding_bytes),
        head_bytes: scale(model.head_bytes),
        shared_bytes: scale(model.shared_bytes),
        bits_per_weight: model.bits_per_weight.map(|b| b * factor),
        ..model.clone()
    }
}

/// The largest n in 1..=max with `fits(n)`, for a `fits` that holds up to some n
/// and fails beyond it; 0 when `fits(1)` fails.
fn largest(max: usize, fits: impl Fn(usize) -> bool) -> usize {
    if max == 0 || !fits(1) {
        return 0;
    }
    if fits(max) {
        return max;
    }
    let (mut good, mut bad) = (1, max);
    while bad - good > 1 {
        let mid = good + (bad - good) / 2;
        if fits(mid) {
            good = mid;
        } else {
            bad = mid;
        }
    }
    good
}

#[cfg(test)]
mod tests;
