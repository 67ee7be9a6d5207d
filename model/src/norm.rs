//! The root-mean-square norm every family here uses: before attention and the FFN,
//! on each query and key head (Qwen3, Gemma 3), after attention and the FFN (Gemma 3)
//! and before the output head.

use std::fs::File;
use std::io::BufReader;

use candle_core::{DType, Device, Tensor, D};

use crate::error::Result;
use crate::gguf::ModelFile;

/// A root-mean-square norm with a learned scale. Gemma's `1 + w` is already folded
/// into the weights by llama.cpp's converter, so one formula serves every family.
#[derive(Debug, Clone)]
pub(crate) struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps }
    }

    pub fn load(file: &ModelFile, reader: &mut BufReader<File>, name: &str, device: &Device) -> Result<Self> {
        let weight = file.load_tensor(reader, name, device)?.dequantize(device)?;
        Ok(Self { weight, eps: file.info().norm_eps })
    }

    /// The weight's length: what the last dimension of an input must be.
    pub fn width(&self) -> Result<usize> {
        Ok(self.weight.elem_count())
    }

    /// Normalizes over the last dimension of `x` (`[..., width]`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // llama.cpp sums squares in double and multiplies by 1/sqrt(mean + eps).
        let width = x.dim(D::Minus1)? as f64;
        let mean = x.to_dtype(DType::F64)?.sqr()?.sum_keepdim(D::Minus1)?.affine(1.0 / width, self.eps)?;
        let scale = mean.to_dtype(DType::F32)?.sqrt()?.recip()?;
        Ok(x.broadcast_mul(&scale)?.broadcast_mul(&self.weight)?)
    }
}
