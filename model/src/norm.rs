//! The root-mean-square norm every family here uses: before attention and the FFN,
//! on each query and key head (Qwen3, Gemma 3), after attention and the FFN (Gemma 3)
//! and before the output head.

use std::fs::File;
use std::mem::MaybeUninit;
use std::io::BufReader;

use candle_core::{DType, Device, Tensor, D};

use crate::cpu_buffer::{as_matrix, is_cpu_f32, written, Rows, SharedOut};
use crate::error::{Error, Result};
use crate::gguf::ModelFile;

/// Below this many values a CPU norm stays on the calling thread.
const PARALLEL_MIN_VALUES: usize = 1 << 15;
/// Rows whose sums of squares one thread runs side by side.
pub(crate) const LANES: usize = 4;

/// A root-mean-square norm with a learned scale. Gemma's `1 + w` is already folded
/// into the weights by llama.cpp's converter, so one formula serves every family.
#[derive(Debug, Clone)]
pub(crate) struct RmsNorm {
    weight: Tensor,
    /// The weight's values when it is f32 in CPU memory, for the one-pass CPU paths.
    cpu_weight: Option<std::sync::Arc<[f32]>>,
    eps: f64,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        let cpu_weight = (weight.device().is_cpu() && weight.dtype() == DType::F32)
            .then(|| weight.flatten_all().and_then(|w| w.to_vec1::<f32>()).ok())
            .flatten()
            .map(std::sync::Arc::from);
        Self { weight, cpu_weight, eps }
    }

    pub fn load(file: &ModelFile, reader: &mut BufReader<File>, name: &str, device: &Device) -> Result<Self> {
        let weight = file.load_tensor(reader, name, device)?.dequantize(device)?;
        Ok(Self::new(weight, file.info().norm_eps))
    }

    /// The weight's values, when the one-pass CPU arithmetic can run (the weight is
    /// f32 in CPU memory).
    pub(crate) fn cpu_weight(&self) -> Option<&[f32]> {
        self.cpu_weight.as_deref()
    }

    /// Each row's `1/sqrt(Σx²/width + eps)`, `forward`'s arithmetic (the squares summed
    /// in f64 in order), for `L` rows side by side: each keeps its own sum in order (so
    /// its bits), and the independent additions overlap instead of each waiting for
    /// the one before it.
    pub(crate) fn scales<const L: usize>(&self, rows: [&[f32]; L]) -> [f32; L] {
        let width = rows[0].len();
        assert!(rows.iter().all(|r| r.len() == width), "norm rows differ in length");
        let mut sums = [0f64; L];
        for i in 0..width {
            for (sum, row) in sums.iter_mut().zip(&rows) {
                let v = f64::from(row[i]);
                *sum += v * v;
            }
        }
        let inv_width = 1.0 / width as f64;
        sums.map(|sum| ((sum * inv_width + self.eps) as f32).sqrt().recip())
    }

    /// The weight's length: what the last dimension of an input must be.
    pub fn width(&self) -> Result<usize> {
        Ok(self.weight.elem_count())
    }

    /// Normalizes over the last dimension of `x` (`[..., width]`). On the CPU one pass
    /// per row, rows spread over the compute pool, with `forward_ops`'s arithmetic: the
    /// squares summed in f64 in order, `mean = sum·(1/width) + eps` in f64, rounded to
    /// f32, `scale = 1/sqrt(mean)`, then `(x·scale)·w` (two f32 multiplies). Why: as
    /// nine candle operations, each with its own buffer and all on one thread, the norms
    /// (four or six a layer) cost a prefill more than their arithmetic.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let width = self.weight.elem_count();
        if width == 0 || x.dim(D::Minus1)? != width {
            return Err(Error::BadInput(format!("a norm of width {width} over rows of {:?}", x.dims())));
        }
        self.forward_segments(x)
    }

    /// Normalizes each head of `x` (`[tokens, heads · width]`, as a Q or K product
    /// gives it, possibly a column view of a stacked one) on its own; as `forward` of
    /// `x` reshaped to `[tokens, heads, width]`, without the copy.
    pub fn forward_heads(&self, x: &Tensor) -> Result<Tensor> {
        let width = self.weight.elem_count();
        let (_, row) = x.dims2()?;
        if width == 0 || !row.is_multiple_of(width) {
            return Err(Error::BadInput(format!("a norm of width {width} over heads of rows of {:?}", x.dims())));
        }
        self.forward_segments(x)
    }

    /// Normalizes every `width`-long segment of `x`'s last dimension (a multiple of
    /// `width`, checked by the callers).
    fn forward_segments(&self, x: &Tensor) -> Result<Tensor> {
        let width = self.weight.elem_count();
        let Some(weight) = self.cpu_weight().filter(|_| is_cpu_f32(x)) else {
            let dims = x.dims().to_vec();
            let row = x.dim(D::Minus1)?;
            return Ok(self.forward_ops(&x.reshape(((), row / width, width))?)?.reshape(dims)?);
        };
        let dims = x.dims().to_vec();
        let x = as_matrix(x)?;
        let (rows, row_width) = x.dims2()?;
        let out = {
            let (storage, layout) = x.storage_and_layout();
            let Some(src) = Rows::of(&storage, layout, "norm input")? else {
                drop(storage);
                return self.forward_segments(&x.contiguous()?);
            };
            let per_row = row_width / width;
            let fill = |shared: &SharedOut<'_, MaybeUninit<f32>>| {
                let run = |rows: std::ops::Range<usize>| {
                    // SAFETY: each row index goes to exactly one thread, so the rows are disjoint.
                    let dst = unsafe { shared.segment(rows.start * row_width, rows.len() * row_width) };
                    let segment = |s: usize| {
                        let (row, j) = (rows.start + s / per_row, s % per_row);
                        &src.row(row)[j * width..(j + 1) * width]
                    };
                    // Segments `LANES` at a time (see `scales`).
                    let segments = rows.len() * per_row;
                    for first in (0..segments).step_by(LANES) {
                        let count = LANES.min(segments - first);
                        let parts: [&[f32]; LANES] = std::array::from_fn(|l| segment(first + l.min(count - 1)));
                        let scales = self.scales(parts);
                        for (l, (&scale, part)) in scales.iter().zip(&parts).take(count).enumerate() {
                            write_normed(&mut dst[(first + l) * width..(first + l + 1) * width], part, scale, weight);
                        }
                    }
                };
                crate::parallel::run_chunks(rows, rows * row_width >= PARALLEL_MIN_VALUES, run);
            };
            // SAFETY: `run` covers every row, and each writes its whole `dst`.
            unsafe { written(rows * row_width, fill) }
        };
        Ok(Tensor::from_vec(out, dims, &Device::Cpu)?)
    }

    /// `forward` as candle operations: what other devices run.
    fn forward_ops(&self, x: &Tensor) -> Result<Tensor> {
        // llama.cpp sums squares in double and multiplies by 1/sqrt(mean + eps).
        let width = x.dim(D::Minus1)? as f64;
        let mean = x.to_dtype(DType::F64)?.sqr()?.sum_keepdim(D::Minus1)?.affine(1.0 / width, self.eps)?;
        let scale = mean.to_dtype(DType::F32)?.sqrt()?.recip()?;
        Ok(x.broadcast_mul(&scale)?.broadcast_mul(&self.weight)?)
    }
}

/// One row of a norm's output, `(x·scale)·w`, given its `scale` (`RmsNorm::scales`).
pub(crate) fn write_normed(out: &mut [MaybeUninit<f32>], row: &[f32], scale: f32, weight: &[f32]) {
    for ((o, &v), &w) in out.iter_mut().zip(row).zip(weight) {
        o.write(v * scale * w);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Per-head norms of a column view (Q inside a stacked Q/K/V product) give the bits
    /// of the norm of the reshaped copy, whatever the number of rows left over from the
    /// side-by-side sums.
    #[test]
    fn heads_of_a_view_equal_the_reshaped_copy() {
        let values = |n: usize, seed: usize| -> Vec<f32> {
            (0..n).map(|i| (((i * 7919 + seed * 104729) % 2003) as f32 - 1001.0) * 0.0173).collect()
        };
        let (heads, width) = (3, 64);
        let norm = RmsNorm::new(Tensor::from_vec(values(width, 2), width, &Device::Cpu).unwrap(), 1e-6);
        for tokens in [1, 2, 5, 200] {
            let wide = Tensor::from_vec(values(tokens * (heads * width + 40), tokens), (tokens, heads * width + 40), &Device::Cpu).unwrap();
            let x = wide.narrow(1, 40, heads * width).unwrap();
            let want = norm.forward_ops(&x.reshape((tokens, heads, width)).unwrap()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let got = norm.forward_heads(&x).unwrap();
            assert_eq!(got.dims(), [tokens, heads * width]);
            let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{tokens} tokens");
        }
    }

    /// The one-pass CPU norm gives the candle operations' bits, serial or on the pool,
    /// and refuses rows of the wrong width.
    #[test]
    fn one_pass_equals_the_operations() {
        let values = |n: usize, seed: usize| -> Vec<f32> {
            (0..n).map(|i| (((i * 7919 + seed * 104729) % 2003) as f32 - 1001.0) * 0.0173).collect()
        };
        for (rows, width) in [(1, 8), (3, 640), (128, 640), (64, 256)] {
            let x = Tensor::from_vec(values(rows * width, 1), (rows, width), &Device::Cpu).unwrap();
            let norm = RmsNorm::new(Tensor::from_vec(values(width, 2), width, &Device::Cpu).unwrap(), 1e-6);
            let want = norm.forward_ops(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let got = norm.forward(&x).unwrap();
            assert_eq!(got.dims(), [rows, width]);
            let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{rows}x{width}");
        }
        let norm = RmsNorm::new(Tensor::ones(8, DType::F32, &Device::Cpu).unwrap(), 1e-6);
        assert!(norm.forward(&Tensor::ones((2, 9), DType::F32, &Device::Cpu).unwrap()).is_err());
        assert!(norm.forward_heads(&Tensor::ones((2, 12), DType::F32, &Device::Cpu).unwrap()).is_err());
        let empty = RmsNorm::new(Tensor::zeros(0, DType::F32, &Device::Cpu).unwrap(), 1e-6);
        assert!(empty.forward(&Tensor::zeros((2, 0), DType::F32, &Device::Cpu).unwrap()).is_err());
    }
}
