//! A mixture-of-experts FFN (Qwen3-MoE, GLM-4.5): a router picks a few experts for
//! each token, each expert is an ordinary gated FFN, and the token's output is the
//! weighted sum of its experts' (plus a shared expert's, when the model has one).
//!
//! The tokens of a batch routed to one expert run through it together, so an expert
//! reads its weights once per batch. Each token's sum is taken in its own routing
//! order, and every row of a product equals that row alone (`Linear`), so a token's
//! output does not depend on what it was batched with: splits and batches stay exact.

use std::fs::File;
use std::io::BufReader;

use candle_core::quantized::{QStorage, QTensor};
use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::gguf::{Activation, Gating, ModelFile, MoeConfig};
use crate::linear::Linear;

/// One gated FFN: `down(silu(gate(x)) * up(x))`.
#[derive(Debug)]
pub(crate) struct GatedFfn {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl GatedFfn {
    pub fn new(gate: Linear, up: Linear, down: Linear) -> Self {
        Self { gate, up, down }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = crate::activation::gated(&self.gate.forward(x)?, &self.up.forward(x)?, Activation::Silu)?;
        self.down.forward(&h)
    }
}

#[derive(Debug)]
pub(crate) struct Moe {
    /// `[experts, hidden]`: one logit per expert.
    router: Linear,
    /// Added to the router's scores to choose experts, not to weigh them (GLM-4.5).
    selection_bias: Option<Vec<f32>>,
    experts: Vec<GatedFfn>,
    shared: Option<GatedFfn>,
    config: MoeConfig,
}

impl Moe {
    /// Loads the MoE FFN of layer `prefix` (`blk.N`), checking every expert tensor's shape.
    pub fn load(file: &ModelFile, reader: &mut BufReader<File>, prefix: &str, device: &Device) -> Result<Self> {
        let info = file.info();
        let config = info.moe.clone().ok_or_else(|| Error::InvalidModel("an MoE layer in a dense model".into()))?;
        let (e, ff, hidden) = (config.experts, config.expert_feed_forward, info.hidden);
        // Experts are read on the CPU, to be cut apart; the rest where it computes.
        let mut tensor = |name: &str, shape: &[usize], on: &Device| -> Result<QTensor> {
            let name = format!("{prefix}.{name}");
            let t = file.load_tensor(reader, &name, on)?;
            if t.shape().dims() != shape {
                return Err(Error::InvalidModel(format!(
                    "tensor `{name}` has shape {:?}, expected {shape:?} ({e} experts, hidden {hidden}, expert feed-forward {ff})",
                    t.shape().dims()
                )));
            }
            Ok(t)
        };
        let cpu = &Device::Cpu;
        let router = Linear::new(tensor("ffn_gate_inp.weight", &[e, hidden], device)?, None)?;
        let gates = split_experts(&tensor("ffn_gate_exps.weight", &[e, ff, hidden], cpu)?, device)?;
        let ups = split_experts(&tensor("ffn_up_exps.weight", &[e, ff, hidden], cpu)?, device)?;
        let downs = split_experts(&tensor("ffn_down_exps.weight", &[e, hidden, ff], cpu)?, device)?;
        let selection_bias = if file.has_tensor(&format!("{prefix}.exp_probs_b.bias")) {
            let b = tensor("exp_probs_b.bias", &[e], cpu)?.dequantize(cpu)?;
            Some(b.to_vec1::<f32>()?)
        } else {
            None
        };
        let shared = if file.has_tensor(&format!("{prefix}.ffn_gate_shexp.weight")) {
            let mut load = |name: &str| -> Result<Linear> {
                Linear::load(file, reader, &format!("{prefix}.{name}.weight"), None, device)
            };
            Some(GatedFfn::new(load("ffn_gate_shexp")?, load("ffn_up_shexp")?, load("ffn_down_shexp")?))
        } else {
            None
        };
        let experts = gates
            .into_iter()
            .zip(ups)
            .zip(downs)
            .map(|((g, u), d)| Ok(GatedFfn::new(Linear::new(g, None)?, Linear::new(u, None)?, Linear::new(d, None)?)))
            .collect::<Result<_>>()?;
        Ok(Self { router, selection_bias, experts, shared, config })
    }

    /// `x` is `[tokens, hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (tokens, hidden) = x.dims2()?;
        let logits = self.router.forward(x)?.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
        let routes: Vec<Vec<(usize, f32)>> =
            logits.iter().map(|l| route(l, self.selection_bias.as_deref(), &self.config)).collect();
        // Per token and routing slot, that expert's weighted output.
        let k = self.config.experts_used;
        let mut slots = vec![0f32; tokens * k * hidden];
        for (expert, ffn) in self.experts.iter().enumerate() {
            let mut rows = Vec::new();
            for (t, route) in routes.iter().enumerate() {
                if let Some(slot) = route.iter().position(|&(e, _)| e == expert) {
                    rows.push((t, slot, route[slot].1));
                }
            }
            if rows.is_empty() {
                continue;
            }
            let ids = Tensor::new(rows.iter().map(|&(t, _, _)| t as u32).collect::<Vec<_>>(), x.device())?;
            let y = ffn.forward(&x.index_select(&ids, 0)?)?.to_vec2::<f32>()?;
            for (&(t, slot, weight), y) in rows.iter().zip(y) {
                let at = (t * k + slot) * hidden;
                for (out, v) in slots[at..at + hidden].iter_mut().zip(y) {
                    *out = v * weight;
                }
            }
        }
        let mut out = vec![0f32; tokens * hidden];
        for t in 0..tokens {
            let row = &mut out[t * hidden..(t + 1) * hidden];
            for slot in 0..routes[t].len() {
                let at = (t * k + slot) * hidden;
                for (o, v) in row.iter_mut().zip(&slots[at..at + hidden]) {
                    *o += v;
                }
            }
        }
        let out = Tensor::from_vec(out, (tokens, hidden), x.device())?;
        match &self.shared {
            Some(shared) => Ok((out + shared.forward(x)?)?),
            None => Ok(out),
        }
    }
}

/// The experts one token runs through and their weights, best first: the router's
/// logits made probabilities (softmax or sigmoid); experts chosen by probability
/// plus the selection bias, only from the best groups when routing is
/// group-limited; weighed by their probability, renormalised and scaled as the
/// model says.
pub(crate) fn route(logits: &[f32], bias: Option<&[f32]>, config: &MoeConfig) -> Vec<(usize, f32)> {
    let probs: Vec<f32> = match config.gating {
        Gating::Softmax => {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exps: Vec<f32> = logits.iter().map(|&l| libm::expf(l - max)).collect();
            let sum: f32 = exps.iter().sum();
            exps.iter().map(|&e| e / sum).collect()
        }
        Gating::Sigmoid => logits.iter().map(|&l| 1.0 / (1.0 + libm::expf(-l))).collect(),
    };
    let mut selection: Vec<f32> = match bias {
        Some(b) => probs.iter().zip(b).map(|(p, b)| p + b).collect(),
        None => probs.clone(),
    };
    if config.groups > 1 && config.groups_used < config.groups {
        let size = config.experts / config.groups;
        // A group's score: the sum of its two best selection scores.
        let mut scored: Vec<(usize, f32)> = selection
            .chunks(size)
            .enumerate()
            .map(|(g, group)| {
                let mut best = group.to_vec();
                best.sort_by(|a, b| b.total_cmp(a));
                (g, best.iter().take(2).sum())
            })
            .collect();
        scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        for &(g, _) in &scored[config.groups_used..] {
            selection[g * size..(g + 1) * size].fill(f32::NEG_INFINITY);
        }
    }
    let mut order: Vec<usize> = (0..selection.len()).collect();
    order.sort_by(|&a, &b| selection[b].total_cmp(&selection[a]).then(a.cmp(&b)));
    let chosen = &order[..config.experts_used.min(order.len())];
    let mut weights: Vec<f32> = chosen.iter().map(|&e| probs[e]).collect();
    if config.normalize_weights {
        let sum: f32 = weights.iter().sum();
        if sum > 0.0 {
            weights.iter_mut().for_each(|w| *w /= sum);
        }
    }
    weights.iter_mut().for_each(|w| *w *= config.weights_scale);
    chosen.iter().copied().zip(weights).collect()
}

/// The experts of a `[experts, rows, cols]` tensor as `[rows, cols]` tensors on `device`.
fn split_experts(t: &QTensor, device: &Device) -> Result<Vec<QTensor>> {
    let (experts, rows, cols) = t.shape().dims3()?;
    let dtype = t.dtype();
    if cols % dtype.block_size() != 0 {
        return Err(Error::InvalidModel(format!("expert rows of {cols} are not whole {dtype:?} blocks")));
    }
    let data = t.data()?;
    let per_expert = rows * cols / dtype.block_size() * dtype.type_size();
    (0..experts)
        .map(|e| {
            let bytes = data[e * per_expert..(e + 1) * per_expert].to_vec();
            let storage = QStorage::from_data(std::borrow::Cow::Owned(bytes), device, dtype)?;
            Ok(QTensor::new(storage, (rows, cols))?)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(gating: Gating, used: usize, groups: (usize, usize), normalize: bool, scale: f32) -> MoeConfig {
        MoeConfig {
            experts: 8,
            experts_used: used,
            expert_feed_forward: 4,
            gating,
            normalize_weights: normalize,
            weights_scale: scale,
            groups: groups.0,
            groups_used: groups.1,
            leading_dense: 0,
        }
    }

    #[test]
    fn softmax_routing_takes_the_top_k_and_renormalises() {
        let logits = [0.0, 3.0, 1.0, 2.0, -1.0, 0.5, 2.5, 0.0];
        let r = route(&logits, None, &config(Gating::Softmax, 2, (1, 1), true, 1.0));
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), [1, 6]);
        assert!((r[0].1 + r[1].1 - 1.0).abs() < 1e-6);
        assert!((r[0].1 / r[1].1 - 0.5f32.exp()).abs() < 1e-5, "weights keep the softmax ratio");
    }

    #[test]
    fn the_selection_bias_chooses_but_does_not_weigh() {
        let logits = [0.0, 3.0, 1.0, 2.0, -1.0, 0.5, 2.5, 0.0];
        let bias = [0.0, 0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0];
        let r = route(&logits, Some(&bias), &config(Gating::Sigmoid, 2, (1, 1), false, 2.0));
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), [4, 1]);
        let sigmoid = |x: f32| 1.0 / (1.0 + (-x).exp());
        assert!((r[0].1 - 2.0 * sigmoid(-1.0)).abs() < 1e-6, "weighed by the unbiased probability, scaled");
    }

    #[test]
    fn group_limited_routing_chooses_within_the_best_groups() {
        // Groups of two: {0,1} {2,3} {4,5} {6,7}; group 3 holds the best single
        // expert but group 1 the best pair.
        let logits = [0.0, 0.0, 2.0, 2.0, 0.0, 0.0, 3.0, -5.0];
        let r = route(&logits, None, &config(Gating::Sigmoid, 2, (4, 1), true, 1.0));
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), [2, 3]);
    }
}
