//! Rotary position embeddings. Tables are built per call for the positions at hand,
//! so long contexts cost no memory up front.

use candle_core::{Device, Tensor};

use crate::error::Result;
use crate::gguf::{ModelInfo, RopeScaling};

/// One set of rotary parameters.
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    /// The dimensions rotated: the first `dims` of each head (all of it but for
    /// partial rotary, GLM-4.5); the rest pass through.
    dims: usize,
    theta_scale: f32,
    freq_scale: f32,
    /// Per-frequency divisors (`rope_freqs.weight`), if the model has them.
    freq_factors: Option<Vec<f32>>,
    /// Llama GGUFs pair adjacent dimensions; the others pair `i` with `i + d/2`.
    interleaved: bool,
}

/// cos and sin tables, `[len, head_dim / 2]` each, for a run of positions.
pub(crate) type RopeTables = (Tensor, Tensor);

impl Rope {
    fn new(info: &ModelInfo, base: f32, freq_scale: f32, freq_factors: Option<Vec<f32>>) -> Self {
        Self {
            dims: info.rope_dims,
            // A pure-Rust libm here and below: every platform builds the same tables
            // (a Windows worker's C runtime rounds powf, cos and sin differently).
            theta_scale: libm::powf(base, -2.0 / info.rope_dims as f32),
            freq_scale,
            freq_factors,
            interleaved: info.architecture.rope_pairs_adjacent(),
        }
    }

    /// cos and sin tables for positions `start..start + len`.
    pub fn tables(&self, start: usize, len: usize, device: &Device) -> Result<RopeTables> {
        let half = self.dims / 2;
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for pos in start..start + len {
            // ggml's rope cache: theta_i = pos * theta_scale^i, built by repeated
            // multiplication in f32, which rounds differently from powf.
            let mut theta = pos as f32;
            for i in 0..half {
                let ff = self.freq_factors.as_ref().map_or(1.0, |f| f[i]);
                let angle = self.freq_scale * (theta / ff);
                cos.push(libm::cosf(angle));
                sin.push(libm::sinf(angle));
                theta *= self.theta_scale;
            }
        }
        Ok((Tensor::from_vec(cos, (len, half), device)?, Tensor::from_vec(sin, (len, half), device)?))
    }

    /// `x` is `[heads, len, head_dim]`.
    pub fn apply(&self, x: &Tensor, tables: &RopeTables) -> Result<Tensor> {
        let head_dim = x.dim(2)?;
        if self.dims < head_dim {
            let rotated = self.rotate(&x.narrow(2, 0, self.dims)?, tables)?;
            return Ok(Tensor::cat(&[&rotated, &x.narrow(2, self.dims, head_dim - self.dims)?], 2)?);
        }
        self.rotate(x, tables)
    }

    fn rotate(&self, x: &Tensor, (cos, sin): &RopeTables) -> Result<Tensor> {
        let x = x.unsqueeze(0)?.contiguous()?;
        let y = if self.interleaved {
            candle_nn::rotary_emb::rope_i(&x, cos, sin)?
        } else {
            candle_nn::rotary_emb::rope(&x, cos, sin)?
        };
        Ok(y.squeeze(0)?)
    }
}

/// The rotary parameters of a model: one set for global layers, and another for
/// sliding-window layers when they rotate with their own base (Gemma 3: 10000
/// locally, 1000000 globally).
#[derive(Debug, Clone)]
pub(crate) struct Ropes {
    pub global: Rope,
    pub local: Option<Rope>,
}

impl Ropes {
    pub fn new(info: &ModelInfo, freq_factors: Option<Vec<f32>>) -> Self {
        let freq_scale = match info.rope_scaling {
            RopeScaling::Linear(f) => 1.0 / f,
            RopeScaling::None | RopeScaling::FreqFactors => 1.0,
        };
        // Positions are not stretched on local layers: their window is short.
        let local = info.sliding_window.as_ref().map(|w| Rope::new(info, w.rope_base, 1.0, None));
        Self { global: Rope::new(info, info.rope_base, freq_scale, freq_factors), local }
    }

    /// The rotation of a layer with or without a sliding window.
    pub fn for_layer(&self, sliding: bool) -> &Rope {
        match (&self.local, sliding) {
            (Some(local), true) => local,
            _ => &self.global,
        }
    }
}
