//! Hidden states to and from [`v1::Tensor`] bytes (little-endian f32 or f16).
//!
//! Decoding checks everything a peer could get wrong (dtype, rank, width, byte
//! length), so a bad frame becomes an error for its sequence, never a panic.

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::v1::{self, WireDtype};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("hidden states are missing from the frame")]
    Missing,
    #[error("unsupported wire dtype {0}")]
    DType(i32),
    #[error("hidden states must have shape [tokens, {hidden}], got {shape:?}")]
    Shape { shape: Vec<u32>, hidden: usize },
    #[error("hidden states carry {got} bytes, shape and dtype need {expected}")]
    Length { got: usize, expected: usize },
    #[error("frame has {tokens} token ids but {rows} rows of hidden states")]
    Rows { tokens: usize, rows: usize },
}

/// Encodes row-major f32 values of shape `[rows, hidden]`, in one pass into the
/// message's buffer: a prefill frame of a large model is tens of megabytes.
pub fn encode_hidden(values: &[f32], rows: usize, hidden: usize, dtype: WireDtype) -> v1::Tensor {
    let data = match dtype {
        WireDtype::F16 => {
            // half's slice conversion uses the CPU's f16 instructions where it has them.
            let mut halves = vec![f16::ZERO; values.len()];
            halves.convert_from_f32_slice(values);
            little_endian(&halves, f16::to_le_bytes)
        }
        _ => little_endian(values, f32::to_le_bytes),
    };
    let dtype = if dtype == WireDtype::F16 { WireDtype::F16 } else { WireDtype::F32 };
    v1::Tensor { dtype: dtype as i32, shape: vec![rows as u32, hidden as u32], data }
}

/// `values` as consecutive little-endian bytes. Fixed-size chunks let the compiler
/// turn this into plain copies where the machine is little-endian.
fn little_endian<T: Copy, const N: usize>(values: &[T], bytes: fn(T) -> [u8; N]) -> Vec<u8> {
    let mut data = vec![0u8; values.len() * N];
    for (out, &v) in data.chunks_exact_mut(N).zip(values) {
        out.copy_from_slice(&bytes(v));
    }
    data
}

/// Decodes and validates hidden states for `tokens` positions of width `hidden`.
pub fn decode_hidden(t: Option<&v1::Tensor>, tokens: usize, hidden: usize) -> Result<Vec<f32>, WireError> {
    let t = t.ok_or(WireError::Missing)?;
    let dtype = WireDtype::try_from(t.dtype).map_err(|_| WireError::DType(t.dtype))?;
    let width = match dtype {
        WireDtype::F32 => 4,
        WireDtype::F16 => 2,
        WireDtype::Unspecified => return Err(WireError::DType(t.dtype)),
    };
    let (rows, cols) = match t.shape.as_slice() {
        [r, c] if *c as usize == hidden => (*r as usize, *c as usize),
        _ => return Err(WireError::Shape { shape: t.shape.clone(), hidden }),
    };
    if rows != tokens {
        return Err(WireError::Rows { tokens, rows });
    }
    let expected = rows * cols * width;
    if t.data.len() != expected {
        return Err(WireError::Length { got: t.data.len(), expected });
    }
    Ok(match dtype {
        WireDtype::F16 => {
            let halves: Vec<f16> = t.data.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]])).collect();
            let mut values = vec![0.0; halves.len()];
            halves.convert_to_f32_slice(&mut values);
            values
        }
        _ => t.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_round_trips_exactly() {
        let values: Vec<f32> = (0..12).map(|i| i as f32 * 0.1 - 0.3).collect();
        let t = encode_hidden(&values, 3, 4, WireDtype::F32);
        assert_eq!(decode_hidden(Some(&t), 3, 4).unwrap(), values);
    }

    #[test]
    fn f16_round_trips_within_half_precision() {
        let values = vec![1.0f32, -2.5, 0.333, 1000.0];
        let t = encode_hidden(&values, 1, 4, WireDtype::F16);
        assert_eq!(t.data.len(), 8);
        let back = decode_hidden(Some(&t), 1, 4).unwrap();
        for (a, b) in values.iter().zip(back) {
            assert!((a - b).abs() <= a.abs() * 1e-3);
        }
    }

    /// The fast paths write what one conversion per value writes: the wire format
    /// is unchanged.
    #[test]
    fn the_bytes_are_each_value_little_endian() {
        let values = [0.0f32, -0.0, 1.0, -2.5, 0.333, 65504.0, 70000.0, 1e-8, -1e-5, f32::INFINITY, f32::MIN_POSITIVE, 123.456];
        let n = values.len();
        let t = encode_hidden(&values, 1, n, WireDtype::F32);
        assert_eq!(t.data, values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
        assert_eq!(decode_hidden(Some(&t), 1, n).unwrap(), values);
        let t = encode_hidden(&values, 1, n, WireDtype::F16);
        assert_eq!(t.data, values.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect::<Vec<u8>>());
        let want: Vec<f32> = values.iter().map(|v| f16::from_f32(*v).to_f32()).collect();
        assert_eq!(decode_hidden(Some(&t), 1, n).unwrap(), want);
    }

    #[test]
    fn bad_tensors_are_named() {
        let good = encode_hidden(&[0.0; 8], 2, 4, WireDtype::F32);
        assert_eq!(decode_hidden(None, 2, 4), Err(WireError::Missing));
        assert!(matches!(decode_hidden(Some(&good), 2, 5), Err(WireError::Shape { .. })));
        assert_eq!(decode_hidden(Some(&good), 3, 4), Err(WireError::Rows { tokens: 3, rows: 2 }));
        let short = v1::Tensor { data: vec![0; 7], ..good.clone() };
        assert_eq!(decode_hidden(Some(&short), 2, 4), Err(WireError::Length { got: 7, expected: 32 }));
        let odd = v1::Tensor { dtype: 99, ..good };
        assert_eq!(decode_hidden(Some(&odd), 2, 4), Err(WireError::DType(99)));
    }
}
