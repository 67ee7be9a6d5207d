//! The FFN activations. On the CPU they run through pure-Rust functions (SiLU through
//! `exp.rs`, GELU through libm's `tanhf`), so every platform computes the same bits: a
//! Windows worker's C runtime rounds `exp` and `tanh` differently from glibc, and a
//! pipeline's stages must agree to the bit whatever each runs on. Other devices use
//! candle's kernels.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::gguf::Activation;

/// √(2/π) as candle's GELU writes it.
const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;

pub(crate) fn activate(x: &Tensor, activation: Activation) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return Ok(match activation {
            Activation::Silu => candle_nn::ops::silu(x)?,
            Activation::GeluTanh => x.gelu()?,
        });
    }
    let dims = x.dims().to_vec();
    let mut values = x.flatten_all()?.to_vec1::<f32>()?;
    match activation {
        Activation::Silu => values.iter_mut().for_each(|v| *v /= 1.0 + crate::exp::exp(-*v)),
        Activation::GeluTanh => values.iter_mut().for_each(|v| {
            let x = *v;
            *v = 0.5 * x * (1.0 + libm::tanhf(SQRT_TWO_OVER_PI * x * (1.0 + 0.044715 * x * x)));
        }),
    }
    Ok(Tensor::from_vec(values, dims, &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_to_candles_own() {
        let x = Tensor::from_vec((-300..300).map(|i| i as f32 * 0.037).collect::<Vec<_>>(), (20, 30), &Device::Cpu).unwrap();
        for (act, want) in [(Activation::Silu, candle_nn::ops::silu(&x).unwrap()), (Activation::GeluTanh, x.gelu().unwrap())] {
            let got = activate(&x, act).unwrap();
            assert_eq!(got.dims(), [20, 30]);
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-5, "{act:?}: {diff}");
        }
    }
}
