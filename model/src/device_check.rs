//! Each operation the model runs, on a device against the CPU, one at a time:
//! what `strata gpu-check` shows first, so that a model whose logits come out wrong
//! on a GPU names the operation to fix. The CPU side is the production CPU path
//! (strata's packed kernels for the quantized products, the libm activations), the
//! device side what a stage on that device runs.

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::gguf::Activation;
use crate::kv_cache::LayerCache;
use crate::linear::Linear;
use crate::norm::RmsNorm;

/// How far a float operation may stray: a device's transcendental functions and
/// summation order differ from the CPU's in the last bits.
const FLOAT_TOLERANCE: f32 = 1e-4;
/// Through f16, whose step is 2^-11 of the value.
const HALF_TOLERANCE: f32 = 2e-3;
/// A quantized product: the CPU quantizes the activations to Q8_0 or Q8_K and
/// candle's CUDA kernels to Q8_1, so the two round differently.
const QUANTIZED_TOLERANCE: f32 = 0.03;

/// One operation's outcome.
#[derive(Debug, Clone)]
pub struct OpComparison {
    pub name: String,
    /// The largest |device − CPU|, and the largest |CPU| it is measured against.
    pub max_abs_difference: f32,
    pub max_abs_value: f32,
    pub tolerance: f32,
    /// The operation failed outright on one side.
    pub error: Option<String>,
}

impl OpComparison {
    /// The largest difference relative to the largest value.
    pub fn relative(&self) -> f32 {
        self.max_abs_difference / self.max_abs_value.max(f32::MIN_POSITIVE)
    }

    pub fn passed(&self) -> bool {
        self.error.is_none() && self.relative() <= self.tolerance
    }
}

/// Inputs made on the CPU, an operation run on them there and on `device`.
struct Case {
    name: String,
    tolerance: f32,
    inputs: Vec<Tensor>,
    op: Box<dyn Fn(&Device, &[Tensor]) -> Result<Tensor>>,
}

/// Runs every case on `device` against the CPU.
pub fn compare_operations(device: &Device) -> Vec<OpComparison> {
    cases().into_iter().map(|case| run(&case, device)).collect()
}

fn run(case: &Case, device: &Device) -> OpComparison {
    let outcome = (|| -> Result<(f32, f32)> {
        let reference = values(&(case.op)(&Device::Cpu, &case.inputs)?)?;
        let moved = case.inputs.iter().map(|t| t.to_device(device)).collect::<candle_core::Result<Vec<_>>>()?;
        let on_device = values(&(case.op)(device, &moved)?)?;
        if reference.len() != on_device.len() {
            return Err(crate::Error::BadInput(format!(
                "{} values on the CPU, {} on the device",
                reference.len(),
                on_device.len()
            )));
        }
        Ok(largest_difference(&reference, &on_device))
    })();
    let (max_abs_difference, max_abs_value, error) = match outcome {
        Ok((d, v)) => (d, v, None),
        Err(e) => (f32::NAN, 0.0, Some(e.to_string())),
    };
    OpComparison { name: case.name.clone(), max_abs_difference, max_abs_value, tolerance: case.tolerance, error }
}

/// The largest |reference − other| and the largest |reference|. A NaN on either
/// side is an infinite difference, not a skipped one.
pub fn largest_difference(reference: &[f32], other: &[f32]) -> (f32, f32) {
    let max_value = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
    let max_difference = reference.iter().zip(other).fold(0f32, |m, (a, b)| {
        let d = (a - b).abs();
        if d.is_nan() {
            f32::INFINITY
        } else {
            m.max(d)
        }
    });
    (max_difference, max_value)
}

fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Deterministic values in [-1, 1): the same inputs on every machine.
fn random(seed: u64, dims: &[usize]) -> Tensor {
    let count: usize = dims.iter().product();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let data: Vec<f32> = (0..count)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    Tensor::from_vec(data, dims, &Device::Cpu).expect("the shape matches the values")
}

fn case(
    name: impl Into<String>,
    tolerance: f32,
    inputs: Vec<Tensor>,
    op: impl Fn(&Device, &[Tensor]) -> Result<Tensor> + 'static,
) -> Case {
    Case { name: name.into(), tolerance, inputs, op: Box::new(op) }
}

/// The weight `w` (CPU, f32) quantized to `dtype` and placed on `device` the way a
/// stage loads it: the ggml blocks' bytes.
fn quantized_on(w: &Tensor, dtype: GgmlDType, device: &Device) -> Result<QTensor> {
    let q = QTensor::quantize(w, dtype)?;
    let data = q.data()?;
    let storage = QStorage::from_data(Cow::Owned(data.into_owned()), device, dtype)?;
    Ok(QTensor::new(storage, w.dims())?)
}

fn cases() -> Vec<Case> {
    let mut cases = vec![
        case("copy to the device and back", 0.0, vec![random(1, &[3, 70])], |_, x| Ok(x[0].clone())),
        case(
            "matmul [2,24,64]x[2,64,40]",
            FLOAT_TOLERANCE,
            vec![random(2, &[2, 24, 64]), random(3, &[2, 64, 40])],
            |_, x| Ok(x[0].matmul(&x[1])?),
        ),
        case(
            "matmul against a transposed K",
            FLOAT_TOLERANCE,
            vec![random(4, &[2, 24, 64]), random(5, &[2, 40, 64])],
            |_, x| Ok(x[0].matmul(&x[1].t()?)?),
        ),
        case(
            "matmul against a narrowed, contiguous V",
            FLOAT_TOLERANCE,
            vec![random(6, &[2, 24, 48]), random(7, &[2, 64, 32])],
            |_, x| Ok(x[0].matmul(&x[1].narrow(1, 0, 48)?.contiguous()?)?),
        ),
        case(
            "softmax over the last dimension",
            FLOAT_TOLERANCE,
            vec![(random(8, &[4, 6, 50]) * 8.0).expect("scaled")],
            |_, x| Ok(candle_nn::ops::softmax_last_dim(&x[0])?),
        ),
        case("attention mask, broadcast add", 0.0, vec![random(9, &[2, 3, 5, 7]), random(10, &[5, 7])], |_, x| {
            Ok(x[0].broadcast_add(&x[1])?)
        }),
        case("SiLU", FLOAT_TOLERANCE, vec![(random(11, &[8, 96]) * 6.0).expect("scaled")], |_, x| {
            crate::activation::activate(&x[0], Activation::Silu)
        }),
        case("GELU (tanh, through f16)", HALF_TOLERANCE, vec![(random(12, &[8, 96]) * 6.0).expect("scaled")], |_, x| {
            crate::activation::activate(&x[0], Activation::GeluTanh)
        }),
        case(
            "RMS norm (squares summed in f64)",
            FLOAT_TOLERANCE,
            vec![random(13, &[5, 256]), random(14, &[256])],
            |_, x| RmsNorm::new(x[1].clone(), 1e-6).forward(&x[0]),
        ),
        case(
            "RoPE, halves rotated (NEOX)",
            FLOAT_TOLERANCE,
            vec![random(15, &[1, 4, 9, 64]), random(16, &[9, 32]), random(17, &[9, 32])],
            |_, x| Ok(candle_nn::rotary_emb::rope(&x[0], &x[1], &x[2])?),
        ),
        case(
            "RoPE, adjacent pairs",
            FLOAT_TOLERANCE,
            vec![random(18, &[1, 4, 9, 64]), random(19, &[9, 32]), random(20, &[9, 32])],
            |_, x| Ok(candle_nn::rotary_emb::rope_i(&x[0], &x[1], &x[2])?),
        ),
        case("soft-cap, tanh", FLOAT_TOLERANCE, vec![(random(21, &[3, 200]) * 90.0).expect("scaled")], |_, x| {
            Ok(((&x[0] / 30.0)?.tanh()? * 30.0)?)
        }),
        case("f16 and back", HALF_TOLERANCE, vec![random(22, &[4, 128])], |_, x| {
            Ok(x[0].to_dtype(DType::F16)?.to_dtype(DType::F32)?)
        }),
        case("rows narrowed and concatenated", 0.0, vec![random(23, &[6, 40])], |_, x| {
            let rows = (0..6).rev().map(|i| x[0].narrow(0, i, 1)).collect::<candle_core::Result<Vec<_>>>()?;
            Ok(Tensor::cat(&rows, 0)?)
        }),
        case(
            "KV cache, three appends (slice_set)",
            0.0,
            vec![random(24, &[2, 5, 16]), random(25, &[2, 1, 16]), random(26, &[2, 3, 16])],
            |_, x| {
                let mut cache = LayerCache::new(None);
                let mut last = None;
                for chunk in x {
                    last = Some(cache.append(chunk, &(chunk * 2.0)?)?);
                }
                let history = last.expect("three appends");
                Ok(Tensor::cat(&[&history.k, &history.v], 1)?)
            },
        ),
    ];
    cases.push(case("rows gathered (index_select)", 0.0, vec![random(27, &[9, 40])], |device, x| {
        let ids = Tensor::new(&[7u32, 0, 7, 3], device)?;
        Ok(x[0].index_select(&ids, 0)?)
    }));
    // F32 is an MoE router's type in real files.
    for dtype in [
        GgmlDType::F32,
        GgmlDType::Q4_0,
        GgmlDType::Q8_0,
        GgmlDType::Q5_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ] {
        for rows in [1, 5] {
            cases.push(case(
                format!("{dtype:?} product, {rows} row(s)"),
                if dtype == GgmlDType::F32 { FLOAT_TOLERANCE } else { QUANTIZED_TOLERANCE },
                vec![random(30, &[64, 512]), random(31 + rows as u64, &[rows, 512])],
                move |device, x| {
                    let weight = x[0].to_device(&Device::Cpu)?;
                    Linear::new(quantized_on(&weight, dtype, device)?, None)?.forward(&x[1])
                },
            ));
        }
    }
    // A row narrower than the 64 columns candle's DMMV steps by (a tiny expert's).
    cases.push(case(
        "Q8_0 product, 32 columns",
        QUANTIZED_TOLERANCE,
        vec![random(35, &[48, 32]), random(36, &[3, 32])],
        |device, x| {
            let weight = x[0].to_device(&Device::Cpu)?;
            Linear::new(quantized_on(&weight, GgmlDType::Q8_0, device)?, None)?.forward(&x[1])
        },
    ));
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q8_0, GgmlDType::Q4K] {
        cases.push(case(
            format!("{dtype:?} embedding rows"),
            FLOAT_TOLERANCE,
            vec![random(40, &[64, 512])],
            move |device, x| {
                let weight = x[0].to_device(&Device::Cpu)?;
                let ids = Tensor::new(&[3u32, 0, 63, 3], device)?;
                Linear::new(quantized_on(&weight, dtype, device)?, None)?.embedding(&ids)
            },
        ));
    }
    cases
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_the_cpu_every_operation_agrees_with_itself() {
        let results = compare_operations(&Device::Cpu);
        assert!(results.len() > 20);
        for r in &results {
            assert!(r.passed(), "{r:?}");
            assert_eq!(r.max_abs_difference, 0.0, "{r:?}");
            assert!(r.max_abs_value > 0.0, "{r:?}");
        }
    }

    #[test]
    fn a_nan_is_a_failure() {
        let r = OpComparison {
            name: "x".into(),
            max_abs_difference: f32::INFINITY,
            max_abs_value: 1.0,
            tolerance: 1.0,
            error: None,
        };
        assert!(!r.passed());
    }
}
