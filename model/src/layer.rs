//! One transformer block (pre-norm attention + SwiGLU MLP) over a ragged batch.
//!
//! The matrix products run once over the tokens of every sequence in the batch;
//! only attention, which needs each sequence's own history, runs per sequence.
//! Numerics follow llama.cpp's CPU path where it is cheap to do so (RMS norm with a
//! double-precision sum, RoPE angles built by repeated multiplication) so that greedy
//! outputs match it token for token.

use std::fs::File;
use std::io::BufReader;

use candle_core::{DType, Device, Tensor, D};

use crate::error::Result;
use crate::gguf::{Architecture, ModelFile, ModelInfo, RopeScaling};
use crate::kv_cache::LayerCache;
use crate::linear::Linear;

/// A root-mean-square norm with a learned scale.
#[derive(Debug, Clone)]
pub(crate) struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn load(file: &ModelFile, reader: &mut BufReader<File>, name: &str, device: &Device) -> Result<Self> {
        let weight = file.load_tensor(reader, name, device)?.dequantize(device)?;
        Ok(Self { weight, eps: file.info().norm_eps })
    }

    /// `x` is `[tokens, hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // llama.cpp sums squares in double and multiplies by 1/sqrt(mean + eps).
        let hidden = x.dim(D::Minus1)? as f64;
        let mean = x.to_dtype(DType::F64)?.sqr()?.sum_keepdim(D::Minus1)?.affine(1.0 / hidden, self.eps)?;
        let scale = mean.to_dtype(DType::F32)?.sqrt()?.recip()?;
        Ok(x.broadcast_mul(&scale)?.broadcast_mul(&self.weight)?)
    }
}

/// Rotary position embedding parameters; tables are built per call for the
/// positions at hand, so long contexts cost no memory up front.
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    head_dim: usize,
    theta_scale: f32,
    freq_scale: f32,
    /// Per-frequency divisors (`rope_freqs.weight`), if the model has them.
    freq_factors: Option<Vec<f32>>,
    /// Llama GGUFs pair adjacent dimensions; Qwen2 pairs `i` with `i + d/2`.
    interleaved: bool,
}

impl Rope {
    pub fn new(info: &ModelInfo, freq_factors: Option<Vec<f32>>) -> Self {
        let freq_scale = match info.rope_scaling {
            RopeScaling::Linear(f) => 1.0 / f,
            RopeScaling::None | RopeScaling::FreqFactors => 1.0,
        };
        Self {
            head_dim: info.head_dim,
            theta_scale: info.rope_base.powf(-2.0 / info.head_dim as f32),
            freq_scale,
            freq_factors,
            interleaved: info.architecture == Architecture::Llama,
        }
    }

    /// cos and sin tables, `[len, head_dim / 2]`, for positions `start..start + len`.
    pub fn tables(&self, start: usize, len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.head_dim / 2;
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for pos in start..start + len {
            // ggml's rope cache: theta_i = pos * theta_scale^i, built by repeated
            // multiplication in f32, which rounds differently from powf.
            let mut theta = pos as f32;
            for i in 0..half {
                let ff = self.freq_factors.as_ref().map_or(1.0, |f| f[i]);
                let angle = self.freq_scale * (theta / ff);
                cos.push(angle.cos());
                sin.push(angle.sin());
                theta *= self.theta_scale;
            }
        }
        Ok((
            Tensor::from_vec(cos, (len, half), device)?,
            Tensor::from_vec(sin, (len, half), device)?,
        ))
    }

    /// `x` is `[heads, len, head_dim]`.
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let x = x.unsqueeze(0)?.contiguous()?;
        let y = if self.interleaved {
            candle_nn::rotary_emb::rope_i(&x, cos, sin)?
        } else {
            candle_nn::rotary_emb::rope(&x, cos, sin)?
        };
        Ok(y.squeeze(0)?)
    }
}

/// Where one sequence's tokens sit in the batch, and where they start in its history.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Span {
    pub offset: usize,
    pub len: usize,
    pub position: usize,
}

#[derive(Debug)]
pub(crate) struct Layer {
    attn_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ffn_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Layer {
    pub fn load(file: &ModelFile, reader: &mut BufReader<File>, index: usize, device: &Device) -> Result<Self> {
        let info = file.info();
        let p = format!("blk.{index}");
        let mut linear = |name: &str, bias: bool| -> Result<Linear> {
            let w = file.load_tensor(reader, &format!("{p}.{name}.weight"), device)?;
            let b = if bias {
                Some(file.load_tensor(reader, &format!("{p}.{name}.bias"), device)?.dequantize(device)?)
            } else {
                None
            };
            Linear::new(w, b)
        };
        let biased = info.architecture == Architecture::Qwen2;
        let q = linear("attn_q", biased)?;
        let k = linear("attn_k", biased)?;
        let v = linear("attn_v", biased)?;
        let o = linear("attn_output", false)?;
        let gate = linear("ffn_gate", false)?;
        let up = linear("ffn_up", false)?;
        let down = linear("ffn_down", false)?;
        Ok(Self {
            attn_norm: RmsNorm::load(file, reader, &format!("{p}.attn_norm.weight"), device)?,
            ffn_norm: RmsNorm::load(file, reader, &format!("{p}.ffn_norm.weight"), device)?,
            q,
            k,
            v,
            o,
            gate,
            up,
            down,
            heads: info.heads,
            kv_heads: info.kv_heads,
            head_dim: info.head_dim,
        })
    }

    /// `x` is `[tokens, hidden]` for all spans; `caches[i]` belongs to `spans[i]` and
    /// `ropes[i]` holds its cos/sin tables.
    pub fn forward(
        &self,
        x: &Tensor,
        spans: &[Span],
        caches: &mut [&mut LayerCache],
        ropes: &[(Tensor, Tensor)],
        rope: &Rope,
    ) -> Result<Tensor> {
        let h = self.attn_norm.forward(x)?;
        let q = self.q.forward(&h)?;
        let k = self.k.forward(&h)?;
        let v = self.v.forward(&h)?;
        let mut outputs = Vec::with_capacity(spans.len());
        for ((span, cache), (cos, sin)) in spans.iter().zip(caches.iter_mut()).zip(ropes) {
            let take = |t: &Tensor, heads: usize| -> Result<Tensor> {
                Ok(t.narrow(0, span.offset, span.len)?
                    .reshape((span.len, heads, self.head_dim))?
                    .transpose(0, 1)?
                    .contiguous()?)
            };
            let q = rope.apply(&take(&q, self.heads)?, cos, sin)?;
            let k = rope.apply(&take(&k, self.kv_heads)?, cos, sin)?;
            let v = take(&v, self.kv_heads)?;
            let (k, v) = cache.append(&k, &v)?;
            outputs.push(self.attention(&q, &k, &v, span)?);
        }
        let attn = if outputs.len() == 1 { outputs.pop().unwrap_or_else(|| unreachable!()) } else { Tensor::cat(&outputs, 0)? };
        let x = (x + self.o.forward(&attn)?)?;
        let h = self.ffn_norm.forward(&x)?;
        let mlp = (candle_nn::ops::silu(&self.gate.forward(&h)?)? * self.up.forward(&h)?)?;
        Ok((x + self.down.forward(&mlp)?)?)
    }

    /// Causal attention of `q` (`[heads, len, d]`) over the history `k`, `v`
    /// (`[kv_heads, total, d]`); returns `[len, heads * d]`.
    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, span: &Span) -> Result<Tensor> {
        let total = k.dim(1)?;
        let group = self.heads / self.kv_heads;
        // Query heads sharing a KV head are stacked so one matmul serves the group.
        let q = q.reshape((self.kv_heads, group * span.len, self.head_dim))?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let scores = if span.len > 1 {
            let mask = causal_mask(span.len, span.position, total, q.device())?;
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

/// `[len, total]`: 0 where token `i` (at `position + i`) may see column `j`, else -inf.
fn causal_mask(len: usize, position: usize, total: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..len)
        .flat_map(|i| (0..total).map(move |j| if j <= position + i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Ok(Tensor::from_vec(mask, (len, total), device)?)
}
