//! A linear layer over quantized weights: `y = x·Wᵀ (+ b)` for activations `[tokens, in]`.
//!
//! On CPU, Q4_0 / Q4_1 / Q5_0 / Q8_0 weights are repacked at load into 16-row tiles and
//! run by our own kernels (`packed.rs`, `x86.rs`): candle 0.11.1's Q4_1 and Q5_0 dot
//! products are scalar, and its Q4_0/Q8_0 ones reduce one row at a time. Q4_K, Q6_K
//! and 256-wide Q8_0 run on `kquant.rs`'s kernels, which reproduce candle's repacked
//! VNNI ones over a single copy of the weights (candle keeps a second, larger one),
//! and Q5_K, which reproduce its AVX2 dot product (5.6× faster on a decode matvec).
//! Activations are quantized
//! exactly as candle/ggml do, and the kernels repeat candle's float operations in
//! candle's order, so results are bit-identical to `QMatMul`'s: activations are
//! re-quantized to 8 bits at every layer, and any last-bit difference can change the
//! generated tokens (which must equal llama.cpp's). Everything else (other quant
//! types, CUDA/Metal weights) stays on candle's `QMatMul`.
//!
//! Threads come from the process's one compute pool ([`crate::compute_pool`], sized
//! by `CANDLE_NUM_THREADS` as candle's is), never a pool per kernel: several workers
//! share small machines and oversubscription costs more than any kernel gains. What
//! stays on candle's `QMatMul` runs on candle's own pool.

mod act;
mod packed;
mod kquant;
mod lines;
mod stacked;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use crate::error::{Error, Result};
use packed::{Format, Level, PackedWeights};
use kquant::{KFormat, PackedKQuant};
pub(crate) use stacked::{Part, SharedInput};

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    /// Bias not folded into the packed kernel's epilogue.
    bias: Option<Tensor>,
    out_features: usize,
}

/// The columns candle's CUDA DMMV kernels take per step of a row (`2 *
/// GGML_CUDA_DMMV_X`): a quantized weight whose rows are not a whole number of
/// steps cannot go through them.
const CUDA_DMMV_COLUMNS: usize = 64;

#[derive(Debug, Clone)]
enum Weight {
    Candle(QMatMul, RowPath),
    Packed {
        weight: Arc<Tiles>,
        bias: Option<Arc<[f32]>>,
    },
}

/// How much of a tensor a load reads at a time (see [`Linear::load`]).
const STREAM_CHUNK_BYTES: usize = 1 << 20;

/// Weights repacked for our own kernels.
#[derive(Debug)]
enum Tiles {
    /// The 32-value block formats (Q4_0, Q4_1, Q5_0, Q8_0).
    Blocks(PackedWeights),
    /// The 256-value superblock ones (Q4_K, Q6_K).
    KQuant(PackedKQuant),
}

impl Tiles {
    /// Zeroed tiles for a `rows × cols` weight of `dtype` on the CPU, when our
    /// kernels serve it here; `None` leaves it to candle.
    ///
    /// Our kernels reproduce candle's arithmetic bit for bit, which is what matches
    /// llama.cpp's tokens: Q4_1 and Q5_0 candle's scalar `vec_dot_unopt` at every level;
    /// Q4_0/Q8_0 its AVX2 dot products (one FMA chain per 4-element group). The SIMD
    /// levels need AVX2+FMA, so candle runs those same AVX2 dot products wherever
    /// they run. The scalar level can reproduce either candle path, but on a CPU
    /// without AVX2 it is no faster than candle's own, so Q4_0/Q8_0 stay there. Q8_0
    /// shapes that candle sends to its repacked VNNI kernels, and the K-quants, take
    /// `kquant.rs`'s kernels, which reproduce candle's (with AVX-512 VNNI all of
    /// them, with AVX2 alone Q4_K and Q6_K; the rest stay on candle).
    fn zeroed(dtype: GgmlDType, rows: usize, cols: usize) -> Result<Option<Self>> {
        let kquant = KFormat::from_dtype(dtype).filter(|k| {
            PackedKQuant::serves(*k, rows, cols) && (*k != KFormat::Q8_0 || packed::candle_repacks(Format::Q8_0, rows, cols))
        });
        if let Some(k) = kquant {
            return Ok(Some(Self::KQuant(PackedKQuant::zeroed(k, rows, cols)?)));
        }
        let format = Format::from_dtype(dtype).filter(|f| {
            matches!(f, Format::Q4_1 | Format::Q5_0)
                || (Level::detect() != Level::Scalar && !packed::candle_repacks(*f, rows, cols))
        });
        format.map(|f| Ok(Self::Blocks(PackedWeights::zeroed(f, rows, cols)?))).transpose()
    }

    fn ggml_row_bytes(&self) -> usize {
        match self {
            Self::Blocks(w) => w.ggml_row_bytes(),
            Self::KQuant(w) => w.ggml_row_bytes(),
        }
    }

    fn fill_rows(&mut self, first: usize, data: &[u8]) -> Result<()> {
        match self {
            Self::Blocks(w) => w.fill_rows(first, data),
            Self::KQuant(w) => w.fill_rows(first, data),
        }
    }

    fn rows(&self) -> usize {
        match self {
            Self::Blocks(w) => w.rows(),
            Self::KQuant(w) => w.rows(),
        }
    }

    fn cols(&self) -> usize {
        match self {
            Self::Blocks(w) => w.cols(),
            Self::KQuant(w) => w.cols(),
        }
    }

    fn dtype(&self) -> GgmlDType {
        match self {
            Self::Blocks(w) => w.format().dtype(),
            Self::KQuant(w) => w.format().dtype(),
        }
    }

    fn ggml_rows(&self, rows: &[u32]) -> Result<Vec<u8>> {
        match self {
            Self::Blocks(w) => w.ggml_rows(rows),
            Self::KQuant(w) => w.ggml_rows(rows),
        }
    }

    fn matmul(&self, level: Level, x: &[f32], tokens: usize, bias: Option<&[f32]>) -> Result<Vec<f32>> {
        match self {
            Self::Blocks(w) => w.matmul(level, x, tokens, bias),
            Self::KQuant(w) => w.matmul(level, x, tokens, bias),
        }
    }

    /// Fills rows `first..` with weight `name` of the file, streamed whole rows at a
    /// time in pieces of about `piece_bytes`.
    fn stream_from(
        &mut self,
        file: &crate::gguf::ModelFile,
        reader: &mut std::io::BufReader<std::fs::File>,
        name: &str,
        first: usize,
        piece_bytes: usize,
    ) -> Result<()> {
        let row_bytes = self.ggml_row_bytes();
        let chunk_rows = (piece_bytes / row_bytes).max(1);
        let mut next = first;
        file.stream_tensor(reader, name, chunk_rows * row_bytes, |bytes| {
            self.fill_rows(next, bytes)?;
            next += bytes.len() / row_bytes;
            Ok(())
        })
    }
}

/// How a batch goes through candle so that every row's result is the one that row
/// gets alone: a sequence must compute the same whatever it is batched with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowPath {
    /// candle's kernel computes each row independently of the others.
    Whole,
    /// candle picks a kernel by row count (float weights go through `gemm`, whose
    /// blocking changes with it): one row at a time.
    EachRow,
    /// candle runs one row as a dot product and several through repacked tiles
    /// (Q6_K on x86): a lone row goes with a copy of itself, so it takes the tiles too.
    NeverAlone,
}

impl RowPath {
    fn for_weight(dtype: GgmlDType, device: &Device) -> Self {
        if !device.is_cpu() {
            // candle's CUDA kernels change with the row count too (MMVQ up to 8 rows,
            // MMQ beyond): exact first, until the GPU path is measured (issue 12).
            return Self::EachRow;
        }
        match dtype {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => Self::EachRow,
            GgmlDType::Q6K if cfg!(target_arch = "x86_64") => Self::NeverAlone,
            _ => Self::Whole,
        }
    }

    fn forward(self, w: &QMatMul, x: &Tensor) -> Result<Tensor> {
        let rows = x.dim(0)?;
        Ok(match self {
            Self::Whole => w.forward(x)?,
            Self::EachRow if rows > 1 => {
                let each = (0..rows).map(|i| w.forward(&x.narrow(0, i, 1)?)).collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&each, 0)?
            }
            Self::NeverAlone if rows == 1 && x.rank() == 2 => w.forward(&Tensor::cat(&[x, x], 0)?)?.narrow(0, 0, 1)?,
            Self::EachRow | Self::NeverAlone => w.forward(x)?,
        })
    }
}

impl Linear {
    pub fn new(weight: QTensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.shape().dims2()?;
        let tiles = if weight.device().is_cpu() {
            Tiles::zeroed(weight.dtype(), out_features, in_features)?
        } else {
            None
        };
        let Some(mut tiles) = tiles else {
            let device = weight.device();
            let rows = RowPath::for_weight(weight.dtype(), &device);
            let product = if !device.is_cpu() && in_features % CUDA_DMMV_COLUMNS != 0 && weight.dtype().block_size() > 1 {
                // candle's CUDA DMMV kernels step through a row 64 columns at a time
                // without a bounds check: a narrower or ragged row (a tiny MoE expert's
                // 32 columns) would be summed with the next row's values. Such small
                // matrices are multiplied as f32 instead (seen on an H200, 2026-12-04).
                QMatMul::Tensor(weight.dequantize(&device)?)
            } else {
                QMatMul::from_qtensor(weight)?
            };
            return Ok(Self { weight: Weight::Candle(product, rows), bias, out_features });
        };
        let data = weight.data()?;
        let what = format!("{:?} weight {out_features}x{in_features}", weight.dtype());
        packed::check_whole(&what, out_features, tiles.ggml_row_bytes(), &data)?;
        tiles.fill_rows(0, &data)?;
        Self::packed(tiles, bias)
    }

    /// Loads weight `name` (and its bias if asked) from a GGUF file. Weights our kernels
    /// serve stream from the file into their tiles a few rows at a time, so a tensor
    /// is never held twice (a 262144-token embedding is 178 MB); the rest go through
    /// candle as [`Self::new`].
    pub fn load(
        file: &crate::gguf::ModelFile,
        reader: &mut std::io::BufReader<std::fs::File>,
        name: &str,
        bias: Option<&str>,
        device: &Device,
    ) -> Result<Self> {
        Self::load_in_pieces(file, reader, name, bias, device, STREAM_CHUNK_BYTES)
    }

    fn load_in_pieces(
        file: &crate::gguf::ModelFile,
        reader: &mut std::io::BufReader<std::fs::File>,
        name: &str,
        bias: Option<&str>,
        device: &Device,
        piece_bytes: usize,
    ) -> Result<Self> {
        let bias = match bias {
            Some(b) => Some(file.load_tensor(reader, b, device)?.dequantize(device)?),
            None => None,
        };
        let (dtype, dims) = file.tensor_layout(name).ok_or_else(|| Error::MissingTensor(name.to_string()))?;
        let tiles = match dims[..] {
            [rows, cols] if device.is_cpu() => Tiles::zeroed(dtype, rows, cols)?,
            _ => None,
        };
        let Some(mut tiles) = tiles else {
            return Self::new(file.load_tensor(reader, name, device)?, bias);
        };
        tiles.stream_from(file, reader, name, 0, piece_bytes)?;
        Self::packed(tiles, bias)
    }

    fn packed(tiles: Tiles, bias: Option<Tensor>) -> Result<Self> {
        let out_features = tiles.rows();
        // A plain [out] bias is added in the kernel's store; anything else keeps
        // candle's broadcasting semantics.
        let (fused, bias) = match bias {
            Some(b) if b.device().is_cpu() && b.dims() == [out_features] => (
                Some(Arc::from(b.to_dtype(DType::F32)?.to_vec1::<f32>()?)),
                None,
            ),
            other => (None, other),
        };
        Ok(Self {
            weight: Weight::Packed {
                weight: Arc::new(tiles),
                bias: fused,
            },
            bias,
            out_features,
        })
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Rows `ids` of the weight as f32 `[ids, in]`: a head tied to the token embedding
    /// serves the lookups too, so the matrix is held once. Values are candle's own
    /// dequantization of the rows' ggml blocks, as `QTensor::embedding` gives.
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        match &self.weight {
            Weight::Candle(QMatMul::QTensor(q), _) => Ok(q.embedding(ids)?),
            Weight::Candle(QMatMul::Tensor(w), _) => Ok(w.embedding(ids)?),
            Weight::Candle(QMatMul::TensorF16(w), _) => Ok(w.embedding(ids)?.to_dtype(DType::F32)?),
            Weight::Packed { weight, .. } => {
                let ids = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                let bytes = weight.ggml_rows(&ids)?;
                let storage = QStorage::from_data(bytes.into(), &Device::Cpu, weight.dtype())?;
                let rows = QTensor::new(storage, (ids.len(), weight.cols()))?;
                Ok(rows.dequantize(&Device::Cpu)?)
            }
        }
    }

    /// `x` is `[tokens, in]` f32; the result is `[tokens, out]` f32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            Weight::Candle(w, rows) => rows.forward(w, x)?,
            Weight::Packed { weight, bias } => {
                packed_forward(weight, bias.as_deref(), x, Level::detect())?
            }
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Runs the packed kernels on `x` (`[..., in]`, any float dtype, CPU).
fn packed_forward(
    w: &Tiles,
    bias: Option<&[f32]>,
    x: &Tensor,
    level: Level,
) -> Result<Tensor> {
    let dims = x.dims();
    let (&k, lead) = match dims.split_last() {
        Some(split) if dims.len() >= 2 => split,
        _ => {
            return Err(Error::BadInput(format!(
                "linear input must be [tokens, {}], got {dims:?}",
                w.cols()
            )))
        }
    };
    if k != w.cols() {
        return Err(Error::BadInput(format!(
            "linear input has {k} features, the weight expects {}",
            w.cols()
        )));
    }
    if !x.device().is_cpu() {
        return Err(Error::BadInput(format!(
            "linear input is on {:?} but the weight is on the CPU",
            x.device()
        )));
    }
    let tokens: usize = lead.iter().product();
    let in_dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?.contiguous()?;
    let out = {
        let (storage, layout) = x32.storage_and_layout();
        let data = crate::cpu_buffer::f32_values(&storage, layout, tokens * k, "linear input")?;
        w.matmul(level, data, tokens, bias)?
    };
    let mut out_dims = lead.to_vec();
    out_dims.push(w.rows());
    let y = Tensor::from_vec(out, out_dims, &Device::Cpu)?;
    Ok(if in_dtype == DType::F32 {
        y
    } else {
        y.to_dtype(in_dtype)?
    })
}

#[cfg(test)]
mod tests {
    use super::act::{
        group_offsets, quantize_row, quantize_row_scalar, ActBlock, GroupOffsets, QK,
    };
    use super::*;

    /// Deterministic xorshift noise in [-1, 1), so failures reproduce.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }

        /// Values with a per-block magnitude spread, like real activations/weights.
        fn vec(&mut self, n: usize) -> Vec<f32> {
            let mut scale = 1.0;
            (0..n)
                .map(|i| {
                    if i % QK == 0 {
                        scale = 0.05 + 2.0 * self.next().abs();
                    }
                    self.next() * scale
                })
                .collect()
        }
    }

    fn quantized(rng: &mut Rng, rows: usize, cols: usize, dtype: GgmlDType) -> QTensor {
        let w = Tensor::from_vec(rng.vec(rows * cols), (rows, cols), &Device::Cpu).unwrap();
        QTensor::quantize(&w, dtype).unwrap()
    }

    fn pack(q: &QTensor) -> Tiles {
        let (rows, cols) = q.shape().dims2().unwrap();
        let kquant = KFormat::from_dtype(q.dtype())
            .filter(|k| *k != KFormat::Q8_0 || packed::candle_repacks(Format::Q8_0, rows, cols));
        if let Some(k) = kquant {
            return Tiles::KQuant(PackedKQuant::from_ggml(k, rows, cols, &q.data().unwrap()).unwrap());
        }
        let format = Format::from_dtype(q.dtype()).unwrap();
        Tiles::Blocks(PackedWeights::from_ggml(format, rows, cols, &q.data().unwrap()).unwrap())
    }

    /// Asserts every output row matches to 1e-5 of that row's norm.
    fn assert_close(got: &Tensor, want: &Tensor, what: &str) {
        assert_eq!(got.dims(), want.dims(), "{what}: shape");
        let got = got.to_vec2::<f32>().unwrap();
        let want = want.to_vec2::<f32>().unwrap();
        for (t, (g, w)) in got.iter().zip(&want).enumerate() {
            let norm = w.iter().map(|v| v * v).sum::<f32>().sqrt();
            let worst = g
                .iter()
                .zip(w)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= 1e-5 * norm + 1e-30,
                "{what}: token {t}: max diff {worst} vs row norm {norm}"
            );
        }
    }

    /// Decodes candle's Q8_0 blocks (d: f16, qs: [i8; 32]) from raw bytes.
    fn candle_q8_0(x: &[f32]) -> Vec<(f32, [i8; QK])> {
        let t = Tensor::from_slice(x, (1, x.len()), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
        let bytes = q.data().unwrap();
        bytes
            .chunks_exact(34)
            .map(|b| {
                let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                (d, std::array::from_fn(|i| b[2 + i] as i8))
            })
            .collect()
    }

    /// Decodes candle's Q8_1 blocks (d: f16, s: f16, qs: [i8; 32]) from raw bytes.
    fn candle_q8_1(x: &[f32]) -> Vec<ActBlock> {
        let t = Tensor::from_slice(x, (1, x.len()), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q8_1).unwrap();
        let bytes = q.data().unwrap();
        bytes
            .chunks_exact(36)
            .map(|b| ActBlock {
                d: half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
                s: half::f16::from_le_bytes([b[2], b[3]]).to_f32(),
                qs: std::array::from_fn(|i| b[4 + i] as i8),
                sum: b[4..36].iter().map(|&q| i32::from(q as i8)).sum(),
            })
            .collect()
    }

    /// Activations with edge cases: an all-zero block, exact .5 ties after scaling,
    /// tiny and huge values, a constant block.
    fn edge_activations() -> Vec<f32> {
        let mut rng = Rng(0x5eed);
        let mut x = rng.vec(64 * QK);
        x[..QK].fill(0.0);
        for (i, v) in x[QK..2 * QK].iter_mut().enumerate() {
            *v = (i as f32 - 16.0) * 127.0 / 254.0;
        }
        x[2 * QK] = 1e-30;
        x[3 * QK] = 3.0e38;
        x[4 * QK..5 * QK].fill(-2.5);
        x
    }

    /// candle pairs Q4_0/Q8_0 weights with Q8_0 activations; our blocks are Q8_1's,
    /// whose `qs` and `d` must therefore equal Q8_0's.
    #[test]
    fn quantization_matches_candle_q8_0() {
        let x = edge_activations();
        let want = candle_q8_0(&x);
        let mut ours = vec![ActBlock::default(); x.len() / QK];
        quantize_row(&x, &mut ours, Level::detect() != Level::Scalar);
        for (b, (o, (d, qs))) in ours.iter().zip(&want).enumerate() {
            assert_eq!((o.d.to_bits(), o.qs), (d.to_bits(), *qs), "block {b}");
        }
        // Group offsets are exact multiples of each 4-element group's sum.
        let mut offs = vec![GroupOffsets::default(); ours.len()];
        group_offsets(&ours, 128, &mut offs);
        for (o, a) in offs.iter().zip(&ours) {
            for (g, &v) in o.0.iter().enumerate() {
                let sum: i32 = a.qs[4 * g..4 * g + 4].iter().map(|&q| q as i32).sum();
                assert_eq!(v, -128 * sum);
            }
        }
    }

    #[test]
    fn activation_quantization_matches_candle_bit_for_bit() {
        let x = edge_activations();
        let want = candle_q8_1(&x);
        let mut scalar = vec![ActBlock::default(); x.len() / QK];
        quantize_row_scalar(&x, &mut scalar);
        assert_eq!(scalar, want, "scalar quantizer");
        if Level::detect() != Level::Scalar {
            let mut simd = vec![ActBlock::default(); x.len() / QK];
            quantize_row(&x, &mut simd, true);
            assert_eq!(simd, want, "AVX2 quantizer");
        }
    }

    /// Every tier this machine has against candle's `QMatMul`.
    fn check_against_candle(
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        tokens: &[usize],
        seed: u64,
    ) {
        let mut rng = Rng(seed);
        let q = quantized(&mut rng, rows, cols, dtype);
        let packed = pack(&q);
        let candle = QMatMul::from_qtensor(q).unwrap();
        for &n in tokens {
            let x = Tensor::from_vec(rng.vec(n * cols), (n, cols), &Device::Cpu).unwrap();
            let want = candle.forward(&x).unwrap();
            for level in Level::available() {
                let got = packed_forward(&packed, None, &x, level).unwrap();
                let what = format!("{dtype:?} {rows}x{cols} tokens={n} {level:?}");
                // Bit-identical, not merely close: that is what keeps tokens equal to
                // llama.cpp's (see `Linear::new`). On x86 candle's Q4_0/Q8_0 paths are
                // its AVX2 or its scalar ones, both of which we reproduce; elsewhere it
                // has NEON/wasm kernels we do not, and those types stay on candle.
                let exact = matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q5_0)
                    || cfg!(target_arch = "x86_64");
                if exact {
                    let (g, w) = (
                        got.to_vec2::<f32>().unwrap(),
                        want.to_vec2::<f32>().unwrap(),
                    );
                    if g != w {
                        let diffs = g
                            .iter()
                            .flatten()
                            .zip(w.iter().flatten())
                            .filter(|(a, b)| a.to_bits() != b.to_bits())
                            .count();
                        panic!("{what}: not bit-identical to candle ({diffs} values differ)");
                    }
                } else {
                    assert_close(&got, &want, &what);
                }
            }
        }
    }

    #[test]
    fn embedding_rows_equal_candles_lookup() {
        let mut rng = Rng(77);
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K, GgmlDType::F32] {
            // 48 rows (whole tiles) and 256 columns let the K-quants take our kernels.
            let cols = if matches!(dtype, GgmlDType::Q4K | GgmlDType::Q6K) { 256 } else { 96 };
            let want_q = quantized(&mut rng, 48, cols, dtype);
            // A byte-for-byte copy: QTensor is not Clone.
            let storage = QStorage::from_data(want_q.data().unwrap(), &Device::Cpu, dtype).unwrap();
            let got_q = QTensor::new(storage, want_q.shape().clone()).unwrap();
            let linear = Linear::new(got_q, None).unwrap();
            let ids = Tensor::new(&[0u32, 17, 47, 17, 5], &Device::Cpu).unwrap();
            let want = want_q.embedding(&ids).unwrap().to_vec2::<f32>().unwrap();
            let got = linear.embedding(&ids).unwrap().to_vec2::<f32>().unwrap();
            assert!(got == want, "{dtype:?}");
            let bad = Tensor::new(&[48u32], &Device::Cpu).unwrap();
            assert!(linear.embedding(&bad).is_err(), "{dtype:?}: row out of range");
        }
    }

    #[test]
    fn q4_1_matches_candle() {
        for (i, &(rows, cols)) in [(576, 576), (1536, 576), (576, 1536), (40, 64)]
            .iter()
            .enumerate()
        {
            check_against_candle(GgmlDType::Q4_1, rows, cols, &[1, 3, 17, 64], 1 + i as u64);
        }
    }

    #[test]
    fn q8_0_matches_candle() {
        for (i, &(rows, cols)) in [(576, 576), (1000, 576), (4096, 576), (200, 96)]
            .iter()
            .enumerate()
        {
            check_against_candle(GgmlDType::Q8_0, rows, cols, &[1, 3, 17, 64], 10 + i as u64);
        }
    }

    #[test]
    fn q4_0_matches_candle() {
        for (i, &(rows, cols)) in [(576, 576), (1000, 576), (4096, 576), (200, 96), (24, 96)]
            .iter()
            .enumerate()
        {
            check_against_candle(GgmlDType::Q4_0, rows, cols, &[1, 3, 17, 64], 20 + i as u64);
        }
    }

    /// Gemma 3's real shapes (640 and 2048 wide, hence Q5_0 rather than a K-quant) and
    /// odd ones: every tier against candle's scalar Q5_0, bit for bit. (candle asserts
    /// an even block count in debug builds, so the reference needs one; ours does not.)
    #[test]
    fn q5_0_matches_candle() {
        for (i, &(rows, cols)) in [(1024, 640), (2048, 640), (640, 2048), (40, 128), (17, 64)]
            .iter()
            .enumerate()
        {
            // 40 tokens: more than other formats' calls take (AVX2 Q5_0 takes them in one).
            check_against_candle(GgmlDType::Q5_0, rows, cols, &[1, 3, 9, 17, 40], 30 + i as u64);
        }
    }

    /// Q4_K, Q6_K and Q8_0 (256-wide multiples) against candle's repacked kernels
    /// (which candle runs for Q6_K from two rows on), Q5_K against its AVX2 dot
    /// product, every tier, one row included: a lone row is compared with
    /// candle's result for that row doubled, the reference `RowPath::NeverAlone` took.
    #[test]
    fn k_quants_match_candles_repacked_kernels() {
        if !PackedKQuant::serves(KFormat::Q4K, 16, 256) {
            println!("SKIPPED: K-quants run on candle on this CPU (no AVX2)");
            return;
        }
        let cases = [(640, 2048), (256, 1024), (48, 256)];
        for (i, (dtype, (rows, cols))) in [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K, GgmlDType::Q8_0]
            .into_iter()
            .flat_map(|d| cases.map(|c| (d, c)))
            .enumerate()
        {
            let mut rng = Rng(60 + i as u64);
            let q = quantized(&mut rng, rows, cols, dtype);
            let packed = pack(&q);
            let candle = QMatMul::from_qtensor(q).unwrap();
            for n in [1usize, 2, 3, 5, 7, 9, 17] {
                let x = Tensor::from_vec(rng.vec(n * cols), (n, cols), &Device::Cpu).unwrap();
                let want = if n == 1 {
                    candle.forward(&Tensor::cat(&[&x, &x], 0).unwrap()).unwrap().narrow(0, 0, 1).unwrap()
                } else {
                    candle.forward(&x).unwrap()
                };
                let want = want.to_vec2::<f32>().unwrap();
                for level in Level::available() {
                    let got = packed_forward(&packed, None, &x, level).unwrap().to_vec2::<f32>().unwrap();
                    assert!(got == want, "{dtype:?} {rows}x{cols} tokens={n} {level:?}: not bit-identical to candle");
                }
            }
        }
    }

    /// Q4_0/Q8_0 weights run on our kernels wherever a SIMD level exists, except Q8_0
    /// shapes that candle itself sends to its repacked VNNI kernels.
    #[test]
    fn q4_0_and_q8_0_are_packed() {
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q8_0] {
            let lin = Linear::new(quantized(&mut Rng(8), 64, 64, dtype), None).unwrap();
            let packed = matches!(lin.weight, Weight::Packed { .. });
            assert_eq!(packed, Level::detect() != Level::Scalar, "{dtype:?}");
        }
    }

    /// Gemma 3's formats run on our kernels with AVX2 alone, not only with AVX-512:
    /// Q5_0 (every SIMD level) and Q4_K / Q6_K (from AVX2 on). On an AVX2-only CPU
    /// they had stayed on candle (Q5_0 on the portable kernel), and Gemma 3 270M
    /// decoded at 0.17× llama.cpp (AMD EPYC, 2026-12-06).
    #[test]
    fn gemma_formats_are_packed_wherever_avx2_is() {
        for (dtype, rows, cols) in [(GgmlDType::Q5_0, 64, 64), (GgmlDType::Q4K, 16, 256), (GgmlDType::Q6K, 16, 256)] {
            let lin = Linear::new(quantized(&mut Rng(9), rows, cols, dtype), None).unwrap();
            let packed = matches!(lin.weight, Weight::Packed { .. });
            let simd = Level::detect() != Level::Scalar;
            assert!(packed || (!simd && dtype != GgmlDType::Q5_0), "{dtype:?} stayed on candle");
        }
    }

    /// Whatever `Linear::new` picks, its output equals `QMatMul`'s bit for bit, including
    /// Q8_0 shapes (k a multiple of 256) that candle runs on its repacked x86 kernels.
    #[test]
    fn linear_is_bit_identical_to_qmatmul() {
        let cases = [
            (GgmlDType::Q8_0, 64, 512),
            (GgmlDType::Q8_0, 48, 768),
            (GgmlDType::Q8_0, 40, 576),
            (GgmlDType::Q8_0, 50, 512),
            (GgmlDType::Q4_0, 64, 512),
            (GgmlDType::Q4_1, 64, 512),
            (GgmlDType::Q5_0, 64, 640),
        ];
        for (i, (dtype, rows, cols)) in cases.into_iter().enumerate() {
            let mut rng = Rng(40 + i as u64);
            let q = quantized(&mut rng, rows, cols, dtype);
            let candle =
                QMatMul::from_qtensor(quantized(&mut Rng(40 + i as u64), rows, cols, dtype))
                    .unwrap();
            let lin = Linear::new(q, None).unwrap();
            for n in [1, 5] {
                let x = Tensor::from_vec(rng.vec(n * cols), (n, cols), &Device::Cpu).unwrap();
                let got = lin.forward(&x).unwrap().to_vec2::<f32>().unwrap();
                let want = candle.forward(&x).unwrap().to_vec2::<f32>().unwrap();
                assert!(got == want, "{dtype:?} {rows}x{cols} tokens={n}");
            }
        }
    }

    /// ggml's Q4_1·Q8_1 formula in f64 straight from the raw blocks: a reference
    /// for shapes candle's scalar Q4_1 path rejects (an odd number of blocks per row).
    fn reference_q4_1(q: &QTensor, x: &[f32], tokens: usize) -> Vec<f32> {
        let (rows, cols) = q.shape().dims2().unwrap();
        let kb = cols / QK;
        let w = q.data().unwrap();
        let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f64();
        let mut out = vec![0f32; tokens * rows];
        for t in 0..tokens {
            let acts = candle_q8_1(&x[t * cols..(t + 1) * cols]);
            for r in 0..rows {
                let mut acc = 0f64;
                for (b, a) in acts.iter().enumerate() {
                    let blk = &w[(r * kb + b) * 20..(r * kb + b + 1) * 20];
                    let isum: i32 = (0..16)
                        .map(|j| {
                            (blk[4 + j] & 0xF) as i32 * a.qs[j] as i32
                                + (blk[4 + j] >> 4) as i32 * a.qs[j + 16] as i32
                        })
                        .sum();
                    acc +=
                        isum as f64 * f16(&blk[0..2]) * a.d as f64 + f16(&blk[2..4]) * a.s as f64;
                }
                out[t * rows + r] = acc as f32;
            }
        }
        out
    }

    #[test]
    fn q4_1_odd_block_count_matches_reference() {
        let mut rng = Rng(7);
        let (rows, cols) = (80, 96);
        let q = quantized(&mut rng, rows, cols, GgmlDType::Q4_1);
        let packed = pack(&q);
        for tokens in [1, 3, 17, 64] {
            let xv = rng.vec(tokens * cols);
            let x = Tensor::from_slice(&xv, (tokens, cols), &Device::Cpu).unwrap();
            let want = Tensor::from_vec(
                reference_q4_1(&q, &xv, tokens),
                (tokens, rows),
                &Device::Cpu,
            )
            .unwrap();
            for level in Level::available() {
                let got = packed_forward(&packed, None, &x, level).unwrap();
                assert_close(
                    &got,
                    &want,
                    &format!("Q4_1 {rows}x{cols} tokens={tokens} {level:?}"),
                );
            }
        }
    }

    #[test]
    fn bias_and_layout_handling() {
        let mut rng = Rng(99);
        let (rows, cols) = (576, 576);
        let q = quantized(&mut rng, rows, cols, GgmlDType::Q4_1);
        let candle =
            QMatMul::from_qtensor(quantized(&mut Rng(99), rows, cols, GgmlDType::Q4_1)).unwrap();
        let b = Tensor::from_vec(rng.vec(rows), rows, &Device::Cpu).unwrap();
        let lin = Linear::new(q, Some(b.clone())).unwrap();
        assert_eq!(lin.out_features(), rows);
        assert!(
            matches!(lin.weight, Weight::Packed { bias: Some(_), .. }),
            "bias should be fused"
        );

        // A transposed (non-contiguous) input, three leading dims, and f16 input.
        let xt = Tensor::from_vec(rng.vec(cols * 5), (cols, 5), &Device::Cpu)
            .unwrap()
            .t()
            .unwrap();
        let want = candle
            .forward(&xt.contiguous().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        assert_close(&lin.forward(&xt).unwrap(), &want, "bias, strided input");

        let x3 = xt.contiguous().unwrap().reshape((1, 5, cols)).unwrap();
        let got3 = lin.forward(&x3).unwrap();
        assert_eq!(got3.dims(), [1, 5, rows]);
        assert_close(&got3.squeeze(0).unwrap(), &want, "rank-3 input");

        let got16 = lin.forward(&xt.to_dtype(DType::F16).unwrap()).unwrap();
        assert_eq!(got16.dtype(), DType::F16);

        let empty = lin
            .forward(&Tensor::zeros((0, cols), DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(empty.dims(), [0, rows]);
    }

    #[test]
    fn shape_errors_are_bad_input() {
        let q = quantized(&mut Rng(3), 64, 64, GgmlDType::Q4_1);
        let lin = Linear::new(q, None).unwrap();
        for bad in [
            Tensor::zeros((2, 96), DType::F32, &Device::Cpu).unwrap(),
            Tensor::zeros(64, DType::F32, &Device::Cpu).unwrap(),
        ] {
            match lin.forward(&bad) {
                Err(Error::BadInput(_)) => {}
                other => panic!("expected BadInput for {:?}, got {other:?}", bad.dims()),
            }
        }
        let packed = pack(&quantized(&mut Rng(3), 64, 64, GgmlDType::Q4_1));
        assert!(matches!(
            packed.matmul(Level::Scalar, &[0.0; 100], 2, None),
            Err(Error::BadInput(_))
        ));
        assert!(matches!(
            packed.matmul(Level::Scalar, &[0.0; 128], 2, Some(&[0.0; 3])),
            Err(Error::BadInput(_))
        ));
        assert!(matches!(
            PackedWeights::from_ggml(Format::Q4_1, 64, 64, &[0; 10]),
            Err(Error::BadInput(_))
        ));
    }

    /// A weight streamed from its file a few rows at a time (the last piece short)
    /// packs exactly as the whole tensor does.
    #[test]
    fn a_weight_loaded_in_pieces_equals_the_whole_tensor() {
        use crate::synthetic::SyntheticModel;
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1, GgmlDType::Q4K, GgmlDType::Q5K] {
            let dir = tempfile::tempdir().unwrap();
            let spec = SyntheticModel { hidden: 256, feed_forward: 512, dtype, ..SyntheticModel::tiny() };
            let file = crate::gguf::ModelFile::open(spec.write_to(dir.path()).unwrap()).unwrap();
            let mut reader = file.reader().unwrap();
            for name in ["token_embd.weight", "blk.0.ffn_down.weight", "blk.1.attn_q.weight"] {
                let whole = Linear::new(file.load_tensor(&mut reader, name, &Device::Cpu).unwrap(), None).unwrap();
                let pieces = Linear::load_in_pieces(&file, &mut reader, name, None, &Device::Cpu, 5000).unwrap();
                assert_eq!(
                    matches!(pieces.weight, Weight::Packed { .. }),
                    matches!(whole.weight, Weight::Packed { .. }),
                    "{dtype:?} {name}"
                );
                let cols = file.tensor_layout(name).unwrap().1[1];
                let x = Tensor::from_vec(Rng(3).vec(3 * cols), (3, cols), &Device::Cpu).unwrap();
                let (a, b) = (whole.forward(&x).unwrap(), pieces.forward(&x).unwrap());
                assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap(), "{dtype:?} {name}");
                let ids = Tensor::new(&[0u32, 17, 40], &Device::Cpu).unwrap();
                let (a, b) = (whole.embedding(&ids).unwrap(), pieces.embedding(&ids).unwrap());
                assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap(), "{dtype:?} {name}");
            }
        }
    }

    #[test]
    fn other_dtypes_fall_back_to_candle() {
        let q = quantized(&mut Rng(5), 32, 256, GgmlDType::Q3K);
        let lin = Linear::new(q, None).unwrap();
        assert!(matches!(lin.weight, Weight::Candle(..)));
        let x = Tensor::from_vec(Rng(6).vec(256), (1, 256), &Device::Cpu).unwrap();
        assert_eq!(lin.forward(&x).unwrap().dims(), [1, 32]);
    }

    /// Best of several rounds: the box is shared, so the minimum is the signal.
    fn time_ns(iters: usize, mut f: impl FnMut()) -> f64 {
        for _ in 0..iters.div_ceil(10) {
            f();
        }
        let per_round = iters.div_ceil(5).max(1);
        (0..5)
            .map(|_| {
                let start = std::time::Instant::now();
                for _ in 0..per_round {
                    f();
                }
                start.elapsed().as_nanos() as f64 / per_round as f64
            })
            .fold(f64::INFINITY, f64::min)
    }

    /// Ours alone on a Gemma 3 270M prefill of 128 tokens' products: gate/up stacked
    /// (Q5_0), down (Q4_K or Q6_K), the attention output (Q4_K), Q/K/V stacked (Q5_0).
    /// `cargo test --release -p strata-model --lib bench_prefill_products -- --ignored --nocapture`
    #[test]
    #[ignore = "benchmark; run explicitly with --ignored --nocapture"]
    fn bench_prefill_products() {
        let tokens = 128;
        for (dtype, rows, cols) in [
            (GgmlDType::Q5_0, 4096, 640),
            (GgmlDType::Q5_0, 1536, 640),
            (GgmlDType::Q4K, 640, 2048),
            (GgmlDType::Q6K, 640, 2048),
            (GgmlDType::Q4K, 640, 1024),
        ] {
            let mut rng = Rng(42);
            let ours = Linear::new(quantized(&mut rng, rows, cols, dtype), None).unwrap();
            let x = Tensor::from_vec(rng.vec(tokens * cols), (tokens, cols), &Device::Cpu).unwrap();
            let ns = time_ns(60, || drop(ours.forward(&x).unwrap()));
            println!("{dtype:?} {rows}x{cols} tokens={tokens}: {:.0} µs, {:.1} GMAC/s", ns / 1e3, (rows * cols * tokens) as f64 / ns);
        }
    }

    /// Hot-cache matvec/matmul times, candle's `QMatMul` against ours (every tier):
    /// `CANDLE_NUM_THREADS=2 cargo test -p strata-model --lib linear::tests::bench --
    /// --ignored --nocapture --test-threads=1`
    #[test]
    #[ignore = "benchmark; run explicitly with --ignored --nocapture --test-threads=1"]
    fn bench_matvec() {
        let threads = crate::compute_pool::compute_pool().threads();
        println!(
            "\npool threads: {threads}, kernel tier: {:?}",
            Level::detect()
        );
        let cases = [
            (GgmlDType::Q4_1, 1536, 576, 1, 2000),
            (GgmlDType::Q4_1, 576, 1536, 1, 2000),
            (GgmlDType::Q4_1, 576, 576, 1, 4000),
            (GgmlDType::Q4_1, 192, 576, 1, 4000),
            (GgmlDType::Q8_0, 49152, 576, 1, 100),
            (GgmlDType::Q4_0, 1536, 576, 1, 2000),
            (GgmlDType::Q4_1, 1536, 576, 64, 20),
            (GgmlDType::Q4_1, 1536, 576, 512, 3),
            (GgmlDType::Q8_0, 49152, 576, 16, 10),
            // Gemma 3 270M's tied head, 178 MB: most of its decode step.
            (GgmlDType::Q8_0, 262144, 640, 1, 10),
            // The types real Q4_K_M / Q5_K_M files hold, one 4096-wide decode matvec
            // each (weights well past the caches): GB/s below says how near the
            // memory bandwidth each runs.
            (GgmlDType::Q4K, 4096, 4096, 1, 50),
            (GgmlDType::Q5K, 4096, 4096, 1, 50),
            (GgmlDType::Q6K, 4096, 4096, 1, 50),
            (GgmlDType::Q5_0, 4096, 4096, 1, 50),
            (GgmlDType::Q8_0, 4096, 4096, 1, 50),
            (GgmlDType::Q5_0, 4096, 4096, 64, 5),
            (GgmlDType::Q4K, 4096, 4096, 64, 5),
        ];
        for (dtype, rows, cols, tokens, iters) in cases {
            let mut rng = Rng(42);
            let q = quantized(&mut rng, rows, cols, dtype);
            let candle = QMatMul::from_qtensor(quantized(&mut Rng(42), rows, cols, dtype)).unwrap();
            let ours = Linear::new(q, None).unwrap();
            let x = Tensor::from_vec(rng.vec(tokens * cols), (tokens, cols), &Device::Cpu).unwrap();
            let c = time_ns(iters, || drop(candle.forward(&x).unwrap()));
            let o = time_ns(iters, || drop(ours.forward(&x).unwrap()));
            let mut tiers = String::new();
            if let Weight::Packed { weight, .. } = &ours.weight {
                for level in Level::available() {
                    let ns = time_ns(iters, || {
                        drop(packed_forward(weight, None, &x, level).unwrap())
                    });
                    tiers += &format!(" {level:?}={:.0}", ns / 1e3);
                }
            }
            let bytes = rows * cols / dtype.block_size() * dtype.type_size();
            println!(
                "{dtype:?} {rows}x{cols} tokens={tokens}: candle {:.0} ns, ours {:.0} ns ({:.2}x, {:.1} GB/s of weights) [µs per tier:{tiers}]",
                c,
                o,
                c / o,
                bytes as f64 / o
            );
        }
    }

    /// One decode token's worth of matmuls for SmolLM2-135M-shaped weights (30 layers
    /// of q/k/v/o/gate/up/down in Q4_1 plus the 49152-row Q8_0 head): ~96 MB of
    /// distinct weights, so unlike `bench_matvec` nothing stays in L2 between calls.
    /// Run as `bench_matvec`.
    #[test]
    #[ignore = "benchmark; run explicitly with --ignored --nocapture --test-threads=1"]
    fn bench_decode_pass() {
        let (hidden, ffn, kv, vocab, layers) = (576, 1536, 192, 49152, 30);
        let shapes = [
            (hidden, hidden),
            (kv, hidden),
            (kv, hidden),
            (hidden, hidden),
            (ffn, hidden),
            (ffn, hidden),
            (hidden, ffn),
        ];
        let mut rng = Rng(11);
        let mut candle = Vec::new();
        let mut ours = Vec::new();
        let mut add = |rows: usize, cols: usize, dtype: GgmlDType| {
            let w = Tensor::from_vec(rng.vec(rows * cols), (rows, cols), &Device::Cpu).unwrap();
            candle.push(QMatMul::from_qtensor(QTensor::quantize(&w, dtype).unwrap()).unwrap());
            ours.push(Linear::new(QTensor::quantize(&w, dtype).unwrap(), None).unwrap());
        };
        for _ in 0..layers {
            for &(rows, cols) in &shapes {
                add(rows, cols, GgmlDType::Q4_1);
            }
        }
        add(vocab, hidden, GgmlDType::Q8_0);
        let x_h = Tensor::from_vec(Rng(12).vec(hidden), (1, hidden), &Device::Cpu).unwrap();
        let x_f = Tensor::from_vec(Rng(13).vec(ffn), (1, ffn), &Device::Cpu).unwrap();
        let input = |cols: usize| if cols == hidden { &x_h } else { &x_f };
        let n = candle.len();
        let threads = crate::compute_pool::compute_pool().threads();
        let shape_of = |i: usize| {
            if i == n - 1 {
                (vocab, hidden)
            } else {
                shapes[i % shapes.len()]
            }
        };
        // Best pass of (layers, head) times, the box being shared; the head runs right
        // after the layers have flushed it from cache, as in real decoding.
        let pass = |ls: &dyn Fn(usize) -> Tensor, passes: usize| {
            let mut layer_ns = Vec::new();
            let mut head_ns = Vec::new();
            for _ in 0..passes {
                let t0 = std::time::Instant::now();
                for i in 0..n - 1 {
                    drop(ls(i));
                }
                let t1 = std::time::Instant::now();
                drop(ls(n - 1));
                layer_ns.push((t1 - t0).as_secs_f64() * 1e3);
                head_ns.push(t1.elapsed().as_secs_f64() * 1e3);
            }
            let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
            (best(&layer_ns), best(&head_ns))
        };
        let (cl, ch) = pass(&|i| candle[i].forward(input(shape_of(i).1)).unwrap(), 5);
        let (ol, oh) = pass(&|i| ours[i].forward(input(shape_of(i).1)).unwrap(), 25);
        println!("\ndecode pass ({threads} threads), ms: 210 Q4_1 matmuls candle {cl:.2} ours {ol:.2} ({:.1}x); Q8_0 head candle {ch:.2} ours {oh:.2} ({:.1}x); total {:.1}x", cl / ol, ch / oh, (cl + ch) / (ol + oh));
    }

    #[test]
    fn every_row_of_a_batch_equals_that_row_alone_for_every_type() {
        use GgmlDType::*;
        let mut rng = Rng(11);
        for dtype in [F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2K, Q3K, Q4K, Q5K, Q6K] {
            let linear = Linear::new(quantized(&mut rng, 64, 512, dtype), None).unwrap();
            for m in [2usize, 3, 4, 5, 8, 9, 33] {
                let x = Tensor::from_vec(rng.vec(m * 512), (m, 512), &Device::Cpu).unwrap();
                let batch = linear.forward(&x).unwrap().to_vec2::<f32>().unwrap();
                for (i, row) in batch.iter().enumerate() {
                    let alone = linear.forward(&x.narrow(0, i, 1).unwrap()).unwrap().to_vec2::<f32>().unwrap();
                    assert_eq!(&alone[0], row, "{dtype:?}: row {i} of {m}");
                }
            }
        }
    }
}
