//! Products of one input by several weights — a layer's Q, K and V, its FFN's gate
//! and up — run as one product where our kernels serve them all.
//!
//! The weights' rows are stacked in one set of tiles, so a step quantizes the input
//! once and runs the pool once instead of once per weight: on a decode step of a
//! small model those fixed costs are a large part of each product. Every row of a
//! tile is computed on its own, from the same quantized input, so each output is bit
//! for bit what its own product gives (`stacked_products_are_the_separate_ones`).

use std::fs::File;
use std::io::BufReader;

use candle_core::{DType, Device, Tensor};

use super::packed::TILE;
use super::{Linear, Tiles, STREAM_CHUNK_BYTES};
use crate::error::{Error, Result};
use crate::gguf::ModelFile;

/// One weight of a [`SharedInput`]: its tensor's name and its bias's, if any.
pub(crate) struct Part {
    pub weight: String,
    pub bias: Option<String>,
}

/// `N` products of the same input.
#[derive(Debug, Clone)]
pub(crate) enum SharedInput<const N: usize> {
    /// One product whose output columns are the parts' outputs side by side.
    Stacked { linear: Linear, widths: [usize; N] },
    /// Weights that cannot share tiles (another device, a type candle runs, rows
    /// that do not fill whole tiles, types or widths that differ): one product each.
    Separate([Linear; N]),
}

impl<const N: usize> SharedInput<N> {
    pub fn load(file: &ModelFile, reader: &mut BufReader<File>, parts: [Part; N], device: &Device) -> Result<Self> {
        if let Some(stacked) = Self::load_stacked(file, reader, &parts, device)? {
            return Ok(stacked);
        }
        let mut each = Vec::with_capacity(N);
        for part in &parts {
            each.push(Linear::load(file, reader, &part.weight, part.bias.as_deref(), device)?);
        }
        Ok(Self::Separate(array(each)?))
    }

    /// The stacked product, when the parts allow one.
    fn load_stacked(
        file: &ModelFile,
        reader: &mut BufReader<File>,
        parts: &[Part; N],
        device: &Device,
    ) -> Result<Option<Self>> {
        if !device.is_cpu() {
            return Ok(None);
        }
        let layouts = parts.iter().map(|p| file.tensor_layout(&p.weight)).collect::<Option<Vec<_>>>();
        let Some(layouts) = layouts else { return Ok(None) };
        let mut widths = [0; N];
        let (mut dtype, mut cols) = (None, None);
        for ((layout_dtype, dims), width) in layouts.into_iter().zip(&mut widths) {
            // Our kernels' choice for a weight depends on its type, its width and
            // whether its rows fill whole tiles; parts alike in all three get the same
            // kernel stacked as alone, hence the same bits.
            let [rows, part_cols] = dims[..] else { return Ok(None) };
            if rows == 0 || !rows.is_multiple_of(TILE) || *dtype.get_or_insert(layout_dtype) != layout_dtype {
                return Ok(None);
            }
            if *cols.get_or_insert(part_cols) != part_cols {
                return Ok(None);
            }
            *width = rows;
        }
        for (part, &width) in parts.iter().zip(&widths) {
            // A bias that is not a plain vector takes candle's broadcasting: one
            // product each. Checked before any weight is read.
            let plain = |name: &String| file.tensor_layout(name).is_some_and(|(_, dims)| dims == [width]);
            if part.bias.as_ref().is_some_and(|name| !plain(name)) {
                return Ok(None);
            }
        }
        let (Some(dtype), Some(cols)) = (dtype, cols) else { return Ok(None) };
        let biased = parts.iter().filter(|p| p.bias.is_some()).count();
        if biased != 0 && biased != N {
            return Ok(None);
        }
        let Some(mut tiles) = Tiles::zeroed(dtype, widths.iter().sum(), cols)? else { return Ok(None) };
        let mut first = 0;
        let mut biases = Vec::new();
        for (part, width) in parts.iter().zip(widths) {
            tiles.stream_from(file, reader, &part.weight, first, STREAM_CHUNK_BYTES)?;
            first += width;
            if let Some(name) = &part.bias {
                biases.push(file.load_tensor(reader, name, device)?.dequantize(device)?.to_dtype(DType::F32)?);
            }
        }
        let bias = if biases.is_empty() { None } else { Some(Tensor::cat(&biases, 0)?) };
        Ok(Some(Self::Stacked { linear: Linear::packed(tiles, bias)?, widths }))
    }

    /// The `N` products of `x` (`[tokens, in]`), each `[tokens, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<[Tensor; N]> {
        match self {
            Self::Separate(each) => array(each.iter().map(|l| l.forward(x)).collect::<Result<Vec<_>>>()?),
            Self::Stacked { linear, widths } => split_columns(&linear.forward(x)?, widths),
        }
    }
}

/// `y` (`[tokens, Σ widths]`) cut into its column groups: views of `y`, not copies.
/// What comes next reads them in place where it can (the rotation, the norms, the
/// gated activation) and makes them contiguous where it must.
fn split_columns<const N: usize>(y: &Tensor, widths: &[usize; N]) -> Result<[Tensor; N]> {
    let mut start = 0;
    let mut parts = Vec::with_capacity(N);
    for &w in widths {
        parts.push(y.narrow(1, start, w)?);
        start += w;
    }
    array(parts)
}

fn array<T, const N: usize>(items: Vec<T>) -> Result<[T; N]> {
    let got = items.len();
    items.try_into().map_err(|_| Error::BadInput(format!("{got} products where {N} were expected")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::SyntheticModel;
    use candle_core::quantized::GgmlDType;

    fn part(name: &str, bias: bool) -> Part {
        Part { weight: format!("blk.1.{name}.weight"), bias: bias.then(|| format!("blk.1.{name}.bias")) }
    }

    fn input(tokens: usize, cols: usize) -> Tensor {
        let mut state = 0x9e37_79b9_u32;
        let values = (0..tokens * cols)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 8) as f32 / (1 << 23) as f32 - 1.0
            })
            .collect();
        Tensor::from_vec(values, (tokens, cols), &Device::Cpu).unwrap()
    }

    #[test]
    fn stacked_products_are_the_separate_ones() {
        let types = [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ];
        for dtype in types {
            for qkv_bias in [false, true] {
                let dir = tempfile::tempdir().unwrap();
                let spec = SyntheticModel { hidden: 256, feed_forward: 512, dtype, qkv_bias, ..SyntheticModel::tiny() };
                let file = ModelFile::open(spec.write_to(dir.path()).unwrap()).unwrap();
                let mut reader = file.reader().unwrap();
                let qkv = || [part("attn_q", qkv_bias), part("attn_k", qkv_bias), part("attn_v", qkv_bias)];
                let stacked = SharedInput::load(&file, &mut reader, qkv(), &Device::Cpu).unwrap();
                let [q, k, v] = qkv()
                    .map(|p| Linear::load(&file, &mut reader, &p.weight, p.bias.as_deref(), &Device::Cpu).unwrap());
                if matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q5_0) {
                    // Our kernels serve these everywhere.
                    assert!(matches!(stacked, SharedInput::Stacked { .. }), "{dtype:?}");
                }
                let gate_up = SharedInput::load(
                    &file,
                    &mut reader,
                    [part("ffn_gate", false), part("ffn_up", false)],
                    &Device::Cpu,
                )
                .unwrap();
                let [gate, up] = [part("ffn_gate", false), part("ffn_up", false)]
                    .map(|p| Linear::load(&file, &mut reader, &p.weight, None, &Device::Cpu).unwrap());
                for tokens in [1, 3, 17] {
                    let x = input(tokens, 256);
                    let got = stacked.forward(&x).unwrap();
                    for (got, alone) in got.iter().zip([&q, &k, &v]) {
                        let want = alone.forward(&x).unwrap();
                        assert_eq!(
                            got.to_vec2::<f32>().unwrap(),
                            want.to_vec2::<f32>().unwrap(),
                            "{dtype:?} bias {qkv_bias} tokens {tokens}"
                        );
                    }
                    let got = gate_up.forward(&x).unwrap();
                    for (got, alone) in got.iter().zip([&gate, &up]) {
                        let want = alone.forward(&x).unwrap();
                        assert_eq!(
                            got.to_vec2::<f32>().unwrap(),
                            want.to_vec2::<f32>().unwrap(),
                            "{dtype:?} gate/up tokens {tokens}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn weights_that_cannot_share_tiles_are_run_one_by_one() {
        let dir = tempfile::tempdir().unwrap();
        let spec = SyntheticModel {
            hidden: 256,
            feed_forward: 512,
            dtype: GgmlDType::Q4_1,
            matrix_types: vec![("attn_v", GgmlDType::Q8_0)],
            ..SyntheticModel::tiny()
        };
        let file = ModelFile::open(spec.write_to(dir.path()).unwrap()).unwrap();
        let mut reader = file.reader().unwrap();
        let qkv = SharedInput::load(
            &file,
            &mut reader,
            [part("attn_q", false), part("attn_k", false), part("attn_v", false)],
            &Device::Cpu,
        )
        .unwrap();
        assert!(matches!(qkv, SharedInput::Separate(_)));
        let [q, k, v] = qkv.forward(&input(2, 256)).unwrap();
        assert_eq!((q.dims(), k.dims(), v.dims()), ([2, 256].as_slice(), [2, 128].as_slice(), [2, 128].as_slice()));
        let missing =
            SharedInput::load(&file, &mut reader, [part("attn_q", false), part("attn_nope", false)], &Device::Cpu);
        assert!(matches!(missing, Err(Error::MissingTensor(_))));
    }
}
