//! The FFN activations. On the CPU they run through pure-Rust functions (SiLU through
//! `exp.rs`, GELU through a table built with libm's `tanhf`), so every platform computes
//! the same bits: a Windows worker's C runtime rounds `exp` and `tanh` differently from
//! glibc, and a pipeline's stages must agree to the bit whatever each runs on. Other
//! devices use candle's kernels.

use std::mem::MaybeUninit;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::cpu_buffer::{as_matrix, is_cpu_f32, written, Rows, SharedOut};
use crate::error::{Error, Result};
use crate::gguf::Activation;

/// Below this many values `gated` stays on the calling thread (a decode step's few
/// thousand are done before the pool would have woken).
const PARALLEL_MIN_VALUES: usize = 1 << 15;
/// Values per unit of pool work in `gated`.
const CHUNK: usize = 4096;

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
    let table = gelu_table();
    values.iter_mut().for_each(|v| *v = activate_value(activation, table, *v));
    Ok(Tensor::from_vec(values, dims, &Device::Cpu)?)
}

/// One value's activation on the CPU: SiLU through `exp.rs`, GELU through `gelu_table`.
#[inline]
fn activate_value(activation: Activation, gelu_table: &GeluTable, x: f32) -> f32 {
    match activation {
        Activation::Silu => x / (1.0 + crate::exp::exp(-x)),
        Activation::GeluTanh => gelu_from_table(gelu_table, x),
    }
}

/// `activation(gate) · up`, elementwise: the gated FFN's middle, on the CPU in one pass
/// over the compute pool with no intermediate tensor. Each value is the activation then
/// one f32 multiply, so the bits equal `activate(gate) * up`'s. `gate` and `up` may be
/// column views of one stacked product (`[tokens, 2·ffn]`): their rows are read in
/// place.
pub(crate) fn gated(gate: &Tensor, up: &Tensor, activation: Activation) -> Result<Tensor> {
    if gate.dims() != up.dims() {
        return Err(Error::BadInput(format!("gate {:?} and up {:?} differ in shape", gate.dims(), up.dims())));
    }
    if !is_cpu_f32(gate) || !is_cpu_f32(up) {
        return Ok((activate(gate, activation)? * up)?);
    }
    let dims = gate.dims().to_vec();
    let (gate, up) = (as_matrix(gate)?, as_matrix(up)?);
    let (rows_count, width) = gate.dims2()?;
    let out = {
        let (g_storage, g_layout) = gate.storage_and_layout();
        let (u_storage, u_layout) = up.storage_and_layout();
        let (Some(g), Some(u)) = (Rows::of(&g_storage, g_layout, "gate")?, Rows::of(&u_storage, u_layout, "up")?) else {
            drop((g_storage, u_storage));
            return gated(&gate.contiguous()?, &up.contiguous()?, activation);
        };
        let table = gelu_table();
        // A unit is a piece of at most CHUNK values of one row.
        let pieces = width.div_ceil(CHUNK).max(1);
        let fill = |shared: &SharedOut<'_, MaybeUninit<f32>>| {
            let run = |units: std::ops::Range<usize>| {
                let mut halves = [f16::ZERO; CHUNK];
                for unit in units {
                    let (row, piece) = (unit / pieces, unit % pieces);
                    let cols = piece * CHUNK..((piece + 1) * CHUNK).min(width);
                    let (g, u) = (&g.row(row)[cols.clone()], &u.row(row)[cols.clone()]);
                    // SAFETY: each unit goes to exactly one thread, so the pieces are disjoint.
                    let dst = unsafe { shared.segment(row * width + cols.start, cols.len()) };
                    match activation {
                        Activation::GeluTanh => {
                            // All of the piece's f16 roundings at once (F16C where the CPU
                            // has it): the same rounding, to nearest even, as one by one.
                            let halves = &mut halves[..g.len()];
                            halves.convert_from_f32_slice(g);
                            for (((o, &g), &u), h) in dst.iter_mut().zip(g).zip(u).zip(halves.iter()) {
                                o.write(gelu_from_f16(table, g, *h) * u);
                            }
                        }
                        Activation::Silu => {
                            for ((o, &g), &u) in dst.iter_mut().zip(g).zip(u) {
                                o.write(activate_value(activation, table, g) * u);
                            }
                        }
                    }
                }
            };
            crate::parallel::run_chunks(rows_count * pieces, rows_count * width >= PARALLEL_MIN_VALUES, run);
        };
        // SAFETY: the units cover every piece of every row, and each writes its `dst`.
        unsafe { written(rows_count * width, fill) }
    };
    Ok(Tensor::from_vec(out, dims, &Device::Cpu)?)
}

/// GELU (tanh form) exactly as llama.cpp's CPU backend computes it (`GGML_GELU_FP16`):
/// inputs at or below −10 give 0, at or above 10 themselves, and the rest are rounded to
/// f16 and looked up in a table of GELU's f16-rounded values. Why: a lookup costs a
/// few integer operations where `tanhf` cost ~14% of a Gemma 3 prefill, and it is the
/// arithmetic of the reference we measure against (KL divergence: see the README).
fn gelu_from_table(table: &GeluTable, x: f32) -> f32 {
    gelu_from_f16(table, x, f16::from_f32(x))
}

/// `gelu_from_table` given `x` already rounded to f16.
#[inline]
fn gelu_from_f16(table: &GeluTable, x: f32, rounded: f16) -> f32 {
    if x <= -10.0 {
        0.0
    } else if x >= 10.0 {
        x
    } else {
        table[usize::from(rounded.to_bits())]
    }
}

/// GELU of every f16 value, rounded to f16 (held as f32: no conversion per lookup).
/// An array of exactly 2¹⁶ entries, so that a lookup by an f16's bits needs no bounds
/// check.
fn gelu_table() -> &'static GeluTable {
    static TABLE: OnceLock<Box<GeluTable>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = Box::new([0f32; 1 << 16]);
        for (bits, entry) in (0..=u16::MAX).zip(table.iter_mut()) {
            let x = f16::from_bits(bits).to_f32();
            let gelu = 0.5 * x * (1.0 + libm::tanhf(SQRT_TWO_OVER_PI * x * (1.0 + 0.044715 * x * x)));
            *entry = f16::from_f32(gelu).to_f32();
        }
        table
    })
}

type GeluTable = [f32; 1 << 16];

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

    /// The fused pass gives `activate` then a multiply's bits, serial or on the pool.
    #[test]
    fn gated_equals_activate_then_multiply() {
        for n in [7, 3 * CHUNK + 5, PARALLEL_MIN_VALUES + 123] {
            let g = Tensor::from_vec((0..n).map(|i| ((i * 37 % 1001) as f32 - 500.0) * 0.023).collect::<Vec<_>>(), (1, n), &Device::Cpu).unwrap();
            let u = Tensor::from_vec((0..n).map(|i| ((i * 11 % 97) as f32 - 48.0) * 0.1).collect::<Vec<_>>(), (1, n), &Device::Cpu).unwrap();
            for act in [Activation::Silu, Activation::GeluTanh] {
                let want = (activate(&g, act).unwrap() * &u).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let got = gated(&g, &u, act).unwrap();
                assert_eq!(got.dims(), [1, n]);
                let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{act:?}, {n} values");
            }
        }
        assert!(gated(&Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap(), &Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap(), Activation::Silu).is_err());
    }

    /// Gate and up as the two halves of one stacked product, read in place, give the
    /// bits of the contiguous copies.
    #[test]
    fn gated_reads_column_views_in_place() {
        let (tokens, ffn) = (9, CHUNK + 300);
        let y = Tensor::from_vec((0..tokens * 2 * ffn).map(|i| ((i * 37 % 1001) as f32 - 500.0) * 0.023).collect::<Vec<_>>(), (tokens, 2 * ffn), &Device::Cpu).unwrap();
        let (gate, up) = (y.narrow(1, 0, ffn).unwrap(), y.narrow(1, ffn, ffn).unwrap());
        for act in [Activation::Silu, Activation::GeluTanh] {
            let want = gated(&gate.contiguous().unwrap(), &up.contiguous().unwrap(), act).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let got = gated(&gate, &up, act).unwrap();
            assert_eq!(got.dims(), [tokens, ffn]);
            let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{act:?}");
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
        for x in [-9.99f32, -3.3, -0.51, 0.0, 0.0007, 0.25, 1.0, 2.7, 9.99] {
            let rounded = f16::from_f32(x).to_f32();
            let exact = 0.5 * rounded * (1.0 + libm::tanhf(SQRT_TWO_OVER_PI * rounded * (1.0 + 0.044715 * rounded * rounded)));
            assert_eq!(gelu_from_table(table, x), f16::from_f32(exact).to_f32(), "{x}");
        }
    }
}
