//! A linear layer over quantized weights: `y = x·Wᵀ (+ b)` for activations `[tokens, in]`.

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Module, Tensor};

use crate::error::Result;

#[derive(Debug, Clone)]
pub struct Linear {
    weight: QMatMul,
    bias: Option<Tensor>,
    out_features: usize,
}

impl Linear {
    pub fn new(weight: QTensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, _in_features) = weight.shape().dims2()?;
        Ok(Self { weight: QMatMul::from_qtensor(weight)?, bias, out_features })
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// `x` is `[tokens, in]` f32; the result is `[tokens, out]` f32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.weight.forward(x)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}
