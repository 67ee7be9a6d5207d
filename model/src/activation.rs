//! The FFN activations. On the CPU they run through pure-Rust functions (SiLU through
//! `exp.rs`, GELU through a table built with libm's `tanhf`), so every platform computes
//! the same bits: a Windows worker's C runtime rounds `exp` and `tanh` differently from
//! glibc, and a pipeline's stages must agree to the bit whatever each runs on. Other
//! devices use candle's kernels.

use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use half::f16;

use crate::error::Result;
use crate::gguf::Activation;

/// √(2/π) as candle's GELU writes it.
const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;

pub(crate) fn activate(x: &Tensor, activation: Activation) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return Ok(match activation {
            Activation::Silu => candle_nn::ops::silu(x)?,
            // The table's rounding (input and result through f16) from candle's ops;
            // the GELU between may differ from the table's in the last f32 bits.
            Activation::GeluTanh => {
                let through_f16 = |t: &Tensor| t.to_dtype(DType::F16)?.to_dtype(x.dtype());
                through_f16(&through_f16(x)?.gelu()?)?
            }
        });
    }
    let dims = x.dims().to_vec();
    let mut values = x.flatten_all()?.to_vec1::<f32>()?;
    match activation {
        Activation::Silu => values.iter_mut().for_each(|v| *v /= 1.0 + crate::exp::exp(-*v)),
        Activation::GeluTanh => {
            let table = gelu_table();
            values.iter_mut().for_each(|v| *v = gelu_from_table(table, *v));
        }
    }
    Ok(Tensor::from_vec(values, dims, &Device::Cpu)?)
}

/// GELU (tanh form) exactly as llama.cpp's CPU backend computes it (`GGML_GELU_FP16`):
/// inputs at or below −10 give 0, at or above 10 themselves, and the rest are rounded to
/// f16 and looked up in a table of GELU's f16-rounded values. Why: a lookup costs a
/// few integer operations where `tanhf` cost ~14% of a Gemma 3 prefill, and it is the
/// arithmetic of the reference we measure against (KL divergence: see the README).
fn gelu_from_table(table: &[f32], x: f32) -> f32 {
    if x <= -10.0 {
        0.0
    } else if x >= 10.0 {
        x
    } else {
        table[usize::from(f16::from_f32(x).to_bits())]
    }
}

/// GELU of every f16 value, rounded to f16 (held as f32: no conversion per lookup).
fn gelu_table() -> &'static [f32] {
    static TABLE: OnceLock<Vec<f32>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|bits| {
                let x = f16::from_bits(bits).to_f32();
                let gelu = 0.5 * x * (1.0 + libm::tanhf(SQRT_TWO_OVER_PI * x * (1.0 + 0.044715 * x * x)));
                f16::from_f32(gelu).to_f32()
            })
            .collect()
    })
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
            // GELU goes through f16, whose step is 2^-11 of the value (x reaches 11).
            let tolerance = if act == Activation::GeluTanh { 11.0 / 1024.0 } else { 1e-5 };
            assert!(diff < tolerance, "{act:?}: {diff}");
        }
    }

    /// The table path is llama.cpp's: f16 in, f16-rounded GELU out, identity and zero
    /// past ±10, and NaN stays NaN.
    #[test]
    fn gelu_is_llama_cpps_f16_table() {
        let table = gelu_table();
        assert_eq!(gelu_from_table(table, 10.0), 10.0);
        assert_eq!(gelu_from_table(table, 123.5), 123.5);
        assert_eq!(gelu_from_table(table, -10.0), 0.0);
        assert_eq!(gelu_from_table(table, f32::NEG_INFINITY), 0.0);
        assert!(gelu_from_table(table, f32::NAN).is_nan());
        for x in [-9.99f32, -3.3, -0.51, 0.0, 0.0007, 0.25, 1.0, 2.71828, 9.99] {
            let rounded = f16::from_f32(x).to_f32();
            let exact = 0.5 * rounded * (1.0 + libm::tanhf(SQRT_TWO_OVER_PI * rounded * (1.0 + 0.044715 * rounded * rounded)));
            assert_eq!(gelu_from_table(table, x), f16::from_f32(exact).to_f32(), "{x}");
        }
    }
}
