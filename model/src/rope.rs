//! Rotary position embeddings. Tables are built per call for the positions at hand,
//! so long contexts cost no memory up front.

use std::mem::MaybeUninit;
use std::ops::Range;

use candle_core::{Device, Tensor};

use crate::cpu_buffer::{f32_values, is_cpu_f32, written, zeroed, Rows, SharedOut};
use crate::error::{Error, Result};
use crate::gguf::{ModelInfo, RopeScaling};

/// Below this many values a CPU rotation stays on the calling thread.
const PARALLEL_MIN_VALUES: usize = 1 << 15;

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

    /// A step's rows `x` (`[len, heads · head_dim]`) rotated for the positions of
    /// `tables`, as `[heads, len, head_dim]`: the layout attention and the KV cache take.
    ///
    /// On the CPU one pass writes that layout from `x` read in place (a column group
    /// of the stacked Q/K/V product needs no copy), with candle's arithmetic
    /// (`x1·cos − x2·sin`, `x1·sin + x2·cos`, products rounded before the sum). Why
    /// not candle's op: it rotates a prefill on rayon's threads, which sleep while
    /// the compute pool spins on the same cores, and waiting for them to wake cost a
    /// Gemma 3 prefill ~8% (0.7 ms a layer) where the arithmetic takes tens of µs.
    pub fn rotate_heads(&self, x: &Tensor, heads: usize, tables: &RopeTables) -> Result<Tensor> {
        let (len, width) = x.dims2()?;
        if heads == 0 || !width.is_multiple_of(heads) || width / heads < self.dims {
            return Err(Error::BadInput(format!("rows of {width} values do not hold {heads} heads of {} or more", self.dims)));
        }
        let head_dim = width / heads;
        if !is_cpu_f32(x) || !is_cpu_f32(&tables.0) || !is_cpu_f32(&tables.1) {
            return self.apply(&x.reshape((len, heads, head_dim))?.transpose(0, 1)?.contiguous()?, tables);
        }
        let (x_storage, x_layout) = x.storage_and_layout();
        let Some(rows) = Rows::of(&x_storage, x_layout, "rotary input")? else {
            drop(x_storage);
            return self.rotate_heads(&x.contiguous()?, heads, tables);
        };
        let half = self.dims / 2;
        let (cos, sin) = (tables.0.contiguous()?, tables.1.contiguous()?);
        let out = {
            let (c_storage, c_layout) = cos.storage_and_layout();
            let cos = f32_values(&c_storage, c_layout, len * half, "rotary table")?;
            let (s_storage, s_layout) = sin.storage_and_layout();
            let sin = f32_values(&s_storage, s_layout, len * half, "rotary table")?;
            // One unit is one head of one token, written at `[head, token]`.
            let fill = |shared: &SharedOut<'_, MaybeUninit<f32>>| {
                let run = |units: Range<usize>| {
                    for u in units {
                        let (h, t) = (u / len, u % len);
                        let src = &rows.row(t)[h * head_dim..(h + 1) * head_dim];
                        // SAFETY: unit (h, t) alone writes this head_dim-long piece.
                        let dst = zeroed(unsafe { shared.segment(u * head_dim, head_dim) });
                        let (c, s) = (&cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half]);
                        for i in 0..half {
                            let (i1, i2) = if self.interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
                            let (x1, x2) = (src[i1], src[i2]);
                            dst[i1] = x1 * c[i] - x2 * s[i];
                            dst[i2] = x1 * s[i] + x2 * c[i];
                        }
                        dst[self.dims..].copy_from_slice(&src[self.dims..]);
                    }
                };
                crate::parallel::run_chunks(heads * len, heads * len * head_dim >= PARALLEL_MIN_VALUES, run);
            };
            // SAFETY: the units cover every head of every token, and each writes its `dst`.
            unsafe { written(heads * len * head_dim, fill) }
        };
        drop(x_storage);
        Ok(Tensor::from_vec(out, (heads, len, head_dim), &Device::Cpu)?)
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 - 1001.0) * 0.0173).collect()
    }

    /// The one-pass rotation gives candle's op's bits on the reshaped rows, for both
    /// pairings, a partial rotation, a column view of a wider product, and one token
    /// (candle's serial path) as well as many (its rayon one).
    #[test]
    fn rotate_heads_equals_candles_rope() {
        let dev = Device::Cpu;
        for interleaved in [false, true] {
            for (heads, head_dim, dims) in [(4, 64, 64), (2, 32, 16)] {
                let rope = Rope { dims, theta_scale: libm::powf(10_000.0, -2.0 / dims as f32), freq_scale: 1.0, freq_factors: None, interleaved };
                for len in [1, 5, 70] {
                    let width = heads * head_dim;
                    // The rows sit between other columns, as Q does in a stacked Q/K/V product.
                    let wide = Tensor::from_vec(values(len * (width + 24), len), (len, width + 24), &dev).unwrap();
                    let x = wide.narrow(1, 8, width).unwrap();
                    let tables = rope.tables(3, len, &dev).unwrap();
                    let want = rope
                        .apply(&x.reshape((len, heads, head_dim)).unwrap().transpose(0, 1).unwrap().contiguous().unwrap(), &tables)
                        .unwrap();
                    let got = rope.rotate_heads(&x, heads, &tables).unwrap();
                    assert_eq!(got.dims(), [heads, len, head_dim]);
                    let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&want), "interleaved {interleaved}, {heads}x{head_dim} ({dims} rotated), {len} tokens");
                }
                let tables = rope.tables(0, 2, &dev).unwrap();
                assert!(rope.rotate_heads(&Tensor::zeros((2, heads * head_dim + 1), DType::F32, &dev).unwrap(), heads, &tables).is_err());
            }
        }
    }
}
