//! One transformer block (attention + gated FFN) over a ragged batch, in the shape
//! every family here shares; [`Architecture`]'s answers switch its optional parts
//! (q/k/v biases, Q/K norms, post-norms, the activation, a sliding window).
//!
//! The matrix products run once over the tokens of every sequence in the batch;
//! attention, which needs each sequence's own history, takes each sequence's rows
//! against its own cache, all of them in one pass on the CPU.
//! Numerics follow llama.cpp's CPU path where it is cheap to do so (RMS norm with a
//! double-precision sum, RoPE angles built by repeated multiplication) so that greedy
//! outputs match it token for token.

use std::fs::File;
use std::io::BufReader;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::gguf::{Activation, Architecture, ModelFile};
use crate::kv_cache::{History, LayerCache};
use crate::linear::{Linear, Part, SharedInput};
use crate::moe::Moe;
use crate::norm::RmsNorm;
use crate::rope::{Ropes, RopeTables};

/// Where one sequence's tokens sit in the batch, and where they start in its history.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Span {
    pub offset: usize,
    pub len: usize,
    pub position: usize,
}

/// The rotary tables of every span of a batch: for global layers, and for sliding
/// layers when the model rotates them with a base of their own.
pub(crate) struct BatchRopes<'a> {
    pub ropes: &'a Ropes,
    pub global: Vec<RopeTables>,
    pub local: Vec<RopeTables>,
}

/// A layer's feed-forward block.
#[derive(Debug)]
enum Ffn {
    /// `down(act(gate(x)) * up(x))`, with the family's activation.
    Dense { gate_up: SharedInput<2>, down: Linear },
    /// A mixture of experts (MoE layers of Qwen3-MoE and GLM-4.5).
    Experts(Moe),
}

#[derive(Debug)]
pub(crate) struct Layer {
    attn_norm: RmsNorm,
    /// The query, key and value projections of the normed input.
    qkv: SharedInput<3>,
    /// Per-head norms of queries and keys, before RoPE (Qwen3, Gemma 3).
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    o: Linear,
    /// Norm of the attention output before the residual add (Gemma 3).
    post_attention_norm: Option<RmsNorm>,
    ffn_norm: RmsNorm,
    ffn: Ffn,
    /// Norm of the FFN output before the residual add (Gemma 3).
    post_ffn_norm: Option<RmsNorm>,
    activation: Activation,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f64,
    /// The positions each token sees, its own included, on a sliding-window layer.
    window: Option<usize>,
}

impl Layer {
    pub fn load(file: &ModelFile, reader: &mut BufReader<File>, index: usize, device: &Device) -> Result<Self> {
        let info = file.info();
        let arch: Architecture = info.architecture;
        let p = format!("blk.{index}");
        let part = |name: &str, bias: bool| Part {
            weight: format!("{p}.{name}.weight"),
            bias: bias.then(|| format!("{p}.{name}.bias")),
        };
        let biased = arch.has_qkv_bias();
        let qkv = SharedInput::load(file, reader, [part("attn_q", biased), part("attn_k", biased), part("attn_v", biased)], device)?;
        let o = Linear::load(file, reader, &format!("{p}.attn_output.weight"), None, device)?;
        let ffn = match &info.moe {
            Some(moe) if index >= moe.leading_dense => Ffn::Experts(Moe::load(file, reader, &p, device)?),
            _ => Ffn::Dense {
                gate_up: SharedInput::load(file, reader, [part("ffn_gate", false), part("ffn_up", false)], device)?,
                down: Linear::load(file, reader, &format!("{p}.ffn_down.weight"), None, device)?,
            },
        };
        let mut norm = |name: &str, width: usize| -> Result<RmsNorm> {
            let norm = RmsNorm::load(file, reader, &format!("{p}.{name}.weight"), device)?;
            match norm.width()? {
                w if w == width => Ok(norm),
                w => Err(Error::InvalidModel(format!("tensor `{p}.{name}.weight` has {w} values, expected {width}"))),
            }
        };
        // GLM-4.5 files have Q/K norms or not (`use_qk_norm`): the tensors say.
        let qk_norm = arch.has_qk_norm() || file.has_tensor(&format!("{p}.attn_q_norm.weight"));
        let (q_norm, k_norm) = if qk_norm {
            (Some(norm("attn_q_norm", info.head_dim)?), Some(norm("attn_k_norm", info.head_dim)?))
        } else {
            (None, None)
        };
        let (post_attention_norm, post_ffn_norm) = if arch.has_post_norms() {
            (Some(norm("post_attention_norm", info.hidden)?), Some(norm("post_ffw_norm", info.hidden)?))
        } else {
            (None, None)
        };
        Ok(Self {
            attn_norm: norm("attn_norm", info.hidden)?,
            ffn_norm: norm(arch.ffn_norm_name(), info.hidden)?,
            qkv,
            q_norm,
            k_norm,
            o,
            post_attention_norm,
            ffn,
            post_ffn_norm,
            activation: arch.activation(),
            heads: info.heads,
            kv_heads: info.kv_heads,
            head_dim: info.head_dim,
            scale: f64::from(info.attention_scale),
            window: info.window_of(index),
        })
    }

    /// `x` is `[tokens, hidden]` for all spans; `caches[i]` belongs to `spans[i]`.
    pub fn forward(&self, x: &Tensor, spans: &[Span], caches: &mut [&mut LayerCache], ropes: &BatchRopes) -> Result<Tensor> {
        let h = self.attn_norm.forward(x)?;
        let [q, k, v] = self.qkv.forward(&h)?;
        let q = per_head_norm(q, self.q_norm.as_ref())?;
        let k = per_head_norm(k, self.k_norm.as_ref())?;
        let sliding = self.window.is_some();
        let rope = ropes.ropes.for_layer(sliding);
        let tables = if sliding && ropes.ropes.local.is_some() { &ropes.local } else { &ropes.global };
        let mut attends = Vec::with_capacity(spans.len());
        for ((span, cache), tables) in spans.iter().zip(caches.iter_mut()).zip(tables) {
            let rows = |t: &Tensor| t.narrow(0, span.offset, span.len);
            let q = rope.rotate_heads(&rows(&q)?, self.heads, tables)?;
            let k = rope.rotate_heads(&rows(&k)?, self.kv_heads, tables)?;
            let v = rows(&v)?.reshape((span.len, self.kv_heads, self.head_dim))?.transpose(0, 1)?.contiguous()?;
            let history = cache.append(&k, &v)?;
            attends.push((q, history, *span));
        }
        let attn = if x.device().is_cpu() {
            // Every sequence in one pass (see `attention::attend_all`).
            let args = attends.iter().map(|(q, history, span)| self.attend_args(q, history, span)).collect::<Result<Vec<_>>>()?;
            crate::attention::attend_all(&args)?
        } else {
            let mut outputs =
                attends.iter().map(|(q, history, span)| self.attention(q, history, span)).collect::<Result<Vec<_>>>()?;
            if outputs.len() == 1 { outputs.pop().unwrap_or_else(|| unreachable!()) } else { Tensor::cat(&outputs, 0)? }
        };
        let (x, h) = crate::residual::add_then_norm(x, &self.o.forward(&attn)?, self.post_attention_norm.as_ref(), &self.ffn_norm)?;
        let ffn = match &self.ffn {
            Ffn::Dense { gate_up, down } => {
                let [gate, up] = gate_up.forward(&h)?;
                down.forward(&crate::activation::gated(&gate, &up, self.activation)?)?
            }
            Ffn::Experts(moe) => moe.forward(&h)?,
        };
        crate::residual::add(&x, &ffn, self.post_ffn_norm.as_ref())
    }

    /// The first key position `span` may see and how many cached positions before it
    /// to skip: a sliding layer looks only at the keys inside its window, whatever
    /// older ones its cache still holds, so that what it computes does not depend on
    /// when the cache dropped them.
    fn visible_keys(&self, history: &History, span: &Span) -> Result<(usize, usize)> {
        let first_key = self.window.map_or(0, |w| (span.position + 1).saturating_sub(w));
        let skip = first_key.checked_sub(history.first).ok_or_else(|| {
            Error::BadInput(format!("positions from {first_key} are needed, the cache holds them from {}", history.first))
        })?;
        Ok((first_key, skip))
    }

    /// The CPU attention of `q` (`[heads, len, d]`) over the history, row by row in a
    /// fixed order: exact whatever the step's length (see `attention.rs`).
    fn attend_args<'a>(&self, q: &'a Tensor, history: &'a History, span: &Span) -> Result<crate::attention::Attend<'a>> {
        self.visible_keys(history, span)?;
        Ok(crate::attention::Attend {
            q,
            k: &history.k,
            v: &history.v,
            first: history.first,
            position: span.position,
            window: self.window,
            scale: self.scale as f32,
        })
    }

    /// Causal attention of `q` (`[heads, len, d]`) over the history (`[kv_heads, _,
    /// d]`) through candle's matmuls, on a GPU; returns `[len, heads * d]`.
    fn attention(&self, q: &Tensor, history: &History, span: &Span) -> Result<Tensor> {
        let (first_key, skip) = self.visible_keys(history, span)?;
        let total = history.k.dim(1)? - skip;
        let (k, v) = (history.k.narrow(1, skip, total)?, history.v.narrow(1, skip, total)?);
        let group = self.heads / self.kv_heads;
        // Query heads sharing a KV head are stacked so one matmul serves the group.
        let q = q.reshape((self.kv_heads, group * span.len, self.head_dim))?;
        let scores = (q.matmul(&k.t()?)? * self.scale)?;
        let scores = if span.len > 1 {
            let mask = attention_mask(span, first_key, total, self.window, q.device())?;
            scores.reshape((self.kv_heads, group, span.len, total))?.broadcast_add(&mask)?.reshape((
                self.kv_heads,
                group * span.len,
                total,
            ))?
        } else {
            scores
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v.contiguous()?)?;
        Ok(out
            .reshape((self.heads, span.len, self.head_dim))?
            .transpose(0, 1)?
            .reshape((span.len, self.heads * self.head_dim))?)
    }
}

/// `x` (`[tokens, heads * head_dim]`) with every head RMS-normed, when there is a norm.
fn per_head_norm(x: Tensor, norm: Option<&RmsNorm>) -> Result<Tensor> {
    match norm {
        Some(norm) => norm.forward_heads(&x),
        None => Ok(x),
    }
}

/// `[len, total]` over keys at positions `first_key..first_key + total`: 0 where the
/// span's token `i` (at `span.position + i`) may see the key, else -inf. It sees keys
/// at or before its own position and, with a window, fewer than `window` back.
fn attention_mask(span: &Span, first_key: usize, total: usize, window: Option<usize>, device: &Device) -> Result<Tensor> {
    let visible = |i: usize, j: usize| {
        let (query, key) = (span.position + i, first_key + j);
        key <= query && window.is_none_or(|w| query - key < w)
    };
    let mask: Vec<f32> = (0..span.len)
        .flat_map(|i| (0..total).map(move |j| if visible(i, j) { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Ok(Tensor::from_vec(mask, (span.len, total), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn visible(mask: &Tensor) -> Vec<Vec<bool>> {
        mask.to_vec2::<f32>().unwrap().into_iter().map(|r| r.into_iter().map(|x| x == 0.0).collect()).collect()
    }

    #[test]
    fn a_window_hides_keys_as_far_back_as_its_size() {
        let span = Span { offset: 0, len: 3, position: 4 };
        // Without a window: causal over keys 0..7.
        let full = visible(&attention_mask(&span, 0, 7, None, &Device::Cpu).unwrap());
        assert_eq!(full[0], [true, true, true, true, true, false, false]);
        // A window of 3 over keys 2..7: query 4 sees 2..=4, query 6 sees 4..=6.
        let sliding = visible(&attention_mask(&span, 2, 5, Some(3), &Device::Cpu).unwrap());
        assert_eq!(sliding[0], [true, true, true, false, false]);
        assert_eq!(sliding[2], [false, false, true, true, true]);
    }
}
