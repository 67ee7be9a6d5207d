//! K-quant weights (Q4_K, Q5_K, Q6_K) in 16-row tiles at (about) ggml's size, and their
//! matmul, bit-identical to candle 0.11.1's repacked x86 kernels (`repack_x86::
//! q4k_tile` / `q6k_tile` and their 256-bit twins, which all do the same float steps).
//!
//! Why our own: candle repacks these types into a second copy of the weights (Q4_K
//! 1.33×, Q6_K 1.5× the file's size, f32 scales, Q6_K one byte per 6-bit value) and
//! keeps the original beside it; it sends a lone Q6_K row down another kernel (AVX2
//! `vec_dot_q6k_q8k`, another summation order) than a batch; and with AMX it sends
//! Q4_K batches of 32 rows or more down a third. Here every row count runs one kernel
//! over one copy of the weights, so a row's result never depends on its batch.
//!
//! The arithmetic, as candle's: activations are Q8_K (`d`, 256 `qs`, `bsums` of 16);
//! per sub-block the integer sum `Σ u·y` over the raw unsigned codes `u` is exact, and
//! per row, sub-blocks and superblocks in order:
//! - Q6_K (16 sub-blocks of 16): `f = f32(isum) − 32·bsum[s]` (exact: both integers
//!   far below 2²⁴), `acc = fma(f, (d·scale_s)·d_y, acc)`.
//! - Q4_K (8 sub-blocks of 32): `acc = fma(f32(isum), (d·scale_s)·d_y, acc)`, then
//!   `acc = fma(−(dmin·min_s), d_y·f32(bsum[2s] + bsum[2s+1]), acc)`.
//!
//! - Q5_K (candle repacks none on x86, so its AVX2 `vec_dot_q5k_q8k`): per superblock
//!   eight i32 lanes, lane `l` summing `scale_s · Σ u·y` over values `32s+4l..+4` of
//!   every sub-block `s` (exact integers), then `acc_l = fma(d·d_y, f32(lane),
//!   acc_l)`; the mins apart, `summs += (−d_y·dmin)·f32(Σ_s min_s·(bsum[2s] +
//!   bsum[2s+1]))`; at the end candle's `hsum_float_8` of the lanes, `+ summs`.
//!
//! `d·scale` (an f16 times a small integer) is exact in f32, so computing it in the
//! kernel instead of storing it changes nothing.
//!
//! Tile layout (`kb` superblocks per row):
//!
//! ```text
//! d:      [kb][16 rows] f16, then for Q4_K/Q5_K [kb][16 rows] f16 of dmin (per block)
//! (zero padding to 64 bytes)
//! scales: [kb][16][16 rows] u8     Q6_K: 16 sub-block scales (i8);
//!                                  Q4_K/Q5_K: 8 scales, then 8 mins (6-bit codes)
//! qs:     [kb][subs][vectors][16 rows][4 bytes]
//! ```
//!
//! Q6_K sub-block `s` holds values `16s..16s+16` of each row as four groups of four
//! (`g`: values `16s+4g..16s+4g+4`) in three vectors: vector 0 has groups 0 (low
//! nibbles) and 1 (high nibbles), vector 1 groups 2 and 3, each value's low four bits;
//! vector 2 the two high bits of all four groups, group `g` at bits `2g..2g+2`.
//! Q4_K sub-block `s` holds values `32s..32s+32` as eight groups of four in four
//! vectors: vector `p` has group `p` in its low nibbles and group `p + 4` in its high
//! ones. Q5_K's sub-block adds a fifth vector of high bits: byte `k` of a row's word
//! holds, at bit `g`, the fifth bit of value `4g+k`. Q4_K's scales take 16 bytes a row instead of ggml's 12 (148 bytes a block
//! instead of 144); Q6_K's size is ggml's.


use candle_core::quantized::GgmlDType;
use half::f16;

#[cfg(test)]
use super::packed::check_whole;
use super::packed::{candle_hsum8, for_each_tile, round_up, Level, Line, TILE};
use crate::cpu_buffer::{written, SharedOut};
use super::lines::Lines;
use crate::error::{Error, Result};

/// Values per superblock (ggml's QK_K).
pub(crate) const QK_K: usize = 256;
/// Q8_K keeps one sum per 16 values.
const BSUMS: usize = QK_K / 16;
/// Scale bytes per row and superblock in the tile (Q4_K, Q6_K).
const SCALE_BYTES: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KFormat {
    Q4K,
    /// Reproduces candle's AVX2 `vec_dot_q5k_q8k` (candle repacks no Q5_K on x86):
    /// see `q5k_avx512`.
    Q5K,
    Q6K,
    /// Q8_0 seen eight blocks at a time, as candle's repacked VNNI kernel sees it
    /// (`q8_0_tile2`: Q8_K activations, `acc = fma(f32(isum) − 128·bsum, d·d_y, acc)`
    /// per 32-value block over the weights stored `q + 128`), for the shapes candle
    /// sends there (columns a multiple of 256).
    Q8_0,
}

impl KFormat {
    /// Token rows a kernel call takes: the weights unpacked once serve them all. Q5_K's
    /// kernel keeps eight accumulators a token, so four fill the registers.
    fn max_tokens(self) -> usize {
        match self {
            Self::Q5K => 4,
            Self::Q4K | Self::Q6K | Self::Q8_0 => MAX_TOKENS,
        }
    }

    pub(crate) fn from_dtype(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4K => Some(Self::Q4K),
            GgmlDType::Q5K => Some(Self::Q5K),
            GgmlDType::Q6K => Some(Self::Q6K),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            _ => None,
        }
    }

    pub(crate) fn dtype(self) -> GgmlDType {
        match self {
            Self::Q4K => GgmlDType::Q4K,
            Self::Q5K => GgmlDType::Q5K,
            Self::Q6K => GgmlDType::Q6K,
            Self::Q8_0 => GgmlDType::Q8_0,
        }
    }

    /// ggml's bytes for 256 values of a row: Q4_K d, dmin (f16), scales[12], qs[128];
    /// Q5_K d, dmin, scales[12], qh[32], qs[128]; Q6_K ql[128], qh[64], scales[16] (i8), d (f16); Q8_0 eight blocks of d (f16),
    /// qs[32].
    fn ggml_block_bytes(self) -> usize {
        match self {
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
            Self::Q8_0 => 8 * 34,
        }
    }

    /// f16 values per row and superblock in the `d` section.
    fn f16s(self) -> usize {
        self.ggml_f16_at().len()
    }

    /// Scale bytes per row and superblock in the `scales` section.
    fn scale_bytes(self) -> usize {
        match self {
            Self::Q4K | Self::Q5K | Self::Q6K => SCALE_BYTES,
            Self::Q8_0 => 0,
        }
    }

    fn subs(self) -> usize {
        match self {
            Self::Q4K | Self::Q5K | Self::Q8_0 => 8,
            Self::Q6K => 16,
        }
    }

    /// Bytes of one sub-block of one tile's quants.
    fn sub_bytes(self) -> usize {
        match self {
            Self::Q4K => 4 * 64,
            Self::Q5K => 5 * 64,
            Self::Q6K => 3 * 64,
            Self::Q8_0 => 8 * 64,
        }
    }

    fn qs_block_bytes(self) -> usize {
        self.subs() * self.sub_bytes()
    }

    /// Value `v` (0..256) of a ggml block as its unsigned code (4, 5, 6 or 8 bits; Q8_0's
    /// `q + 128`).
    fn ggml_value(self, blk: &[u8], v: usize) -> u8 {
        match self {
            Self::Q8_0 => blk[(v / 32) * 34 + 2 + v % 32] ^ 0x80,
            Self::Q4K => {
                let (chunk, within) = (v / 64, v % 64);
                let byte = blk[16 + 32 * chunk + within % 32];
                if within < 32 {
                    byte & 0x0F
                } else {
                    byte >> 4
                }
            }
            Self::Q5K => {
                let (chunk, within) = (v / 64, v % 64);
                let byte = blk[48 + 32 * chunk + within % 32];
                let low = if within < 32 { byte & 0x0F } else { byte >> 4 };
                let high = (blk[16 + within % 32] >> (2 * chunk + within / 32)) & 1;
                low | (high << 4)
            }
            Self::Q6K => {
                let (ql, qh) = (&blk[..128], &blk[128..192]);
                let (half, j) = (v / 128, v % 128);
                let (quarter, l) = (j / 32, j % 32);
                let low = ql[half * 64 + (quarter % 2) * 32 + l];
                let low = if quarter < 2 { low & 0x0F } else { low >> 4 };
                let high = (qh[half * 32 + l] >> (2 * quarter)) & 3;
                low | (high << 4)
            }
        }
    }

    /// Puts code `u` of value `v` into a ggml block (the inverse of `ggml_value`;
    /// `blk` starts zeroed).
    fn set_ggml_value(self, blk: &mut [u8], v: usize, u: u8) {
        match self {
            Self::Q8_0 => blk[(v / 32) * 34 + 2 + v % 32] = u ^ 0x80,
            Self::Q4K => {
                let (chunk, within) = (v / 64, v % 64);
                let shift = if within < 32 { 0 } else { 4 };
                blk[16 + 32 * chunk + within % 32] |= u << shift;
            }
            Self::Q5K => {
                let (chunk, within) = (v / 64, v % 64);
                let shift = if within < 32 { 0 } else { 4 };
                blk[48 + 32 * chunk + within % 32] |= (u & 0x0F) << shift;
                blk[16 + within % 32] |= (u >> 4) << (2 * chunk + within / 32);
            }
            Self::Q6K => {
                let (half, j) = (v / 128, v % 128);
                let (quarter, l) = (j / 32, j % 32);
                let shift = if quarter < 2 { 0 } else { 4 };
                blk[half * 64 + (quarter % 2) * 32 + l] |= (u & 0x0F) << shift;
                blk[128 + half * 32 + l] |= (u >> 4) << (2 * quarter);
            }
        }
    }

    /// Where value `v` of row `lane` sits in a superblock's qs: the byte holding its
    /// low bits and their shift and mask, then (Q5_K, Q6_K) the byte holding its high
    /// bits, their shift and mask.
    fn qs_position(self, v: usize, lane: usize) -> (CodeBits, Option<CodeBits>) {
        let (sub_values, s) = (QK_K / self.subs(), v / (QK_K / self.subs()));
        let (g, k) = ((v % sub_values) / 4, v % 4);
        let byte = lane * 4 + k;
        match self {
            Self::Q4K => ((s * 256 + (g % 4) * 64 + byte, 4 * (g / 4), 0x0F), None),
            Self::Q5K => (
                (s * 320 + (g % 4) * 64 + byte, 4 * (g / 4), 0x0F),
                Some((s * 320 + 256 + byte, g, 1)),
            ),
            Self::Q6K => (
                (s * 192 + (g / 2) * 64 + byte, 4 * (g % 2), 0x0F),
                Some((s * 192 + 128 + byte, 2 * g, 3)),
            ),
            Self::Q8_0 => ((s * 512 + g * 64 + byte, 0, 0xFF), None),
        }
    }

    /// Code of value `v` of row `lane` in a tile superblock's qs.
    fn tile_value(self, qs: &[u8], v: usize, lane: usize) -> u8 {
        let ((at, shift, mask), high) = self.qs_position(v, lane);
        let low = (qs[at] >> shift) & mask;
        match high {
            Some((at, shift, mask)) => low | (((qs[at] >> shift) & mask) << 4),
            None => low,
        }
    }

    /// Puts code `u` of value `v` of row `lane` into a zeroed tile superblock's qs.
    fn put_tile_value(self, qs: &mut [u8], v: usize, lane: usize, u: u8) {
        let ((at, shift, mask), high) = self.qs_position(v, lane);
        qs[at] |= (u & mask) << shift;
        if let Some((at, shift, _)) = high {
            qs[at] |= (u >> 4) << shift;
        }
    }

    /// The row's 16 tile scale bytes of a ggml block: Q6_K its 16 scales; Q4_K and
    /// Q5_K their 8 scales and 8 mins unpacked from their 6-bit fields (ggml's
    /// `get_scale_min_k4`).
    fn tile_scales(self, blk: &[u8]) -> [u8; SCALE_BYTES] {
        let mut out = [0u8; SCALE_BYTES];
        match self {
            Self::Q8_0 => {}
            Self::Q6K => out.copy_from_slice(&blk[192..208]),
            Self::Q4K | Self::Q5K => {
                let sc = &blk[4..16];
                for j in 0..8 {
                    let (scale, min) = if j < 4 {
                        (sc[j] & 63, sc[j + 4] & 63)
                    } else {
                        ((sc[j + 4] & 0x0F) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4))
                    };
                    out[j] = scale;
                    out[8 + j] = min;
                }
            }
        }
        out
    }

    /// The inverse of `tile_scales`, into a zeroed ggml block.
    fn set_ggml_scales(self, blk: &mut [u8], scales: &[u8; SCALE_BYTES]) {
        match self {
            Self::Q8_0 => {}
            Self::Q6K => blk[192..208].copy_from_slice(scales),
            Self::Q4K | Self::Q5K => {
                let sc = &mut blk[4..16];
                for j in 0..8 {
                    let (scale, min) = (scales[j], scales[8 + j]);
                    if j < 4 {
                        sc[j] |= scale;
                        sc[j + 4] |= min;
                    } else {
                        sc[j + 4] |= (scale & 0x0F) | ((min & 0x0F) << 4);
                        sc[j - 4] |= (scale >> 4) << 6;
                        sc[j] |= (min >> 4) << 6;
                    }
                }
            }
        }
    }

    /// Byte offsets of the block's f16 values (d, then a dmin) in a ggml block.
    fn ggml_f16_at(self) -> &'static [usize] {
        match self {
            Self::Q4K | Self::Q5K => &[0, 2],
            Self::Q6K => &[208],
            Self::Q8_0 => &[0, 34, 68, 102, 136, 170, 204, 238],
        }
    }
}
/// Where some of a code's bits sit in a tile's qs: byte, shift, mask.
type CodeBits = (usize, usize, u8);

/// Token rows one kernel call handles at most (candle's `MAX_MT` is 4; any count gives
/// the same per-row arithmetic): see `KFormat::max_tokens`.
const MAX_TOKENS: usize = 8;
/// Below this many row·superblock·token units a matmul stays on the calling thread.
const PARALLEL_MIN_WORK: usize = 512;

/// One Q8_K activation block, as candle's `BlockQ8K::from_float` computes it.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C, align(64))]
pub(crate) struct SuperAct {
    pub(crate) qs: [i8; QK_K],
    pub(crate) bsums: [i16; BSUMS],
    pub(crate) d: f32,
}

impl Default for SuperAct {
    fn default() -> Self {
        Self {
            qs: [0; QK_K],
            bsums: [0; BSUMS],
            d: 0.0,
        }
    }
}

/// candle's (and ggml's reference) `quantize_row_q8k`: the value of largest magnitude
/// maps to −127 (`iscale = −127/max`), each value to `round(iscale·x)` clamped to i8,
/// `d = 1/iscale`; an all-zero block is all zeros.
pub(crate) fn quantize_row_q8k(x: &[f32], out: &mut [SuperAct]) {
    assert_eq!(x.len(), out.len() * QK_K, "activation row / block count mismatch");
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        for (xs, blk) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
            // SAFETY: AVX2 was just detected (a cached load); `xs` has QK_K values.
            unsafe { quantize_block_q8k_avx2(xs, blk) };
            fill_bsums(blk);
        }
        return;
    }
    quantize_row_q8k_scalar(x, out);
}

/// The bsums: each run of 16 quants summed.
fn fill_bsums(blk: &mut SuperAct) {
    for (s, qs) in blk.bsums.iter_mut().zip(blk.qs.chunks_exact(16)) {
        *s = qs.iter().map(|&q| q as i16).sum();
    }
}

/// `quantize_row_q8k`'s qs and d for one block, 8 values a step; the same bits as the
/// scalar loop (and candle): the magnitude's maximum skips NaNs as `<` does, the
/// extreme is the first value of that magnitude, and rounding is half away from zero.
///
/// # Safety
/// AVX2 present; `xs.len() == QK_K`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_block_q8k_avx2(xs: &[f32], blk: &mut SuperAct) {
    use super::act::{pack_bytes, round_to_i8};
    use std::arch::x86_64::*;
    assert_eq!(xs.len(), QK_K);
    const VECS: usize = QK_K / 8;
    let p = xs.as_ptr().cast::<__m256i>();
    // `lddqu`: an unaligned load with no debug-build precondition checks (see act.rs).
    // SAFETY: `xs` holds VECS vectors of 8 floats.
    let v: [__m256; VECS] = std::array::from_fn(|i| unsafe { _mm256_castsi256_ps(_mm256_lddqu_si256(p.wrapping_add(i))) });
    let sign_mask = _mm256_set1_ps(-0.0);
    // maxps returns its second operand when either is NaN: NaNs are skipped.
    let mut m = _mm256_setzero_ps();
    for vi in &v {
        m = _mm256_max_ps(_mm256_andnot_ps(sign_mask, *vi), m);
    }
    let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
    if amax == 0.0 {
        *blk = SuperAct::default();
        return;
    }
    let amax_v = _mm256_set1_ps(amax);
    let first = v
        .iter()
        .enumerate()
        .find_map(|(i, vi)| {
            let hits = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(_mm256_andnot_ps(sign_mask, *vi), amax_v));
            (hits != 0).then(|| 8 * i + hits.trailing_zeros() as usize)
        })
        .unwrap_or(0);
    let iscale = -127f32 / xs[first];
    let scale = _mm256_set1_ps(iscale);
    // `round().clamp(-128, 127) as i8`, as the scalar loop (see `act::round_to_i8`).
    let quantize = |x: __m256| round_to_i8(_mm256_mul_ps(x, scale));
    for (four, q) in v.chunks_exact(4).zip(blk.qs.chunks_exact_mut(32)) {
        let p8 = pack_bytes([quantize(four[0]), quantize(four[1]), quantize(four[2]), quantize(four[3])]);
        // SAFETY: `q` is 32 bytes; an unaligned store.
        unsafe { _mm256_storeu_si256(q.as_mut_ptr().cast(), p8) };
    }
    blk.d = 1.0 / iscale;
}

/// The portable `quantize_row_q8k`, the definition the SIMD one matches.
fn quantize_row_q8k_scalar(x: &[f32], out: &mut [SuperAct]) {
    for (xs, blk) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let (mut max, mut amax) = (0f32, 0f32);
        for &v in xs {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            *blk = SuperAct::default();
            continue;
        }
        let iscale = -127f32 / max;
        for (q, &v) in blk.qs.iter_mut().zip(xs) {
            *q = (iscale * v).round().clamp(-128.0, 127.0) as i8;
        }
        fill_bsums(blk);
        blk.d = 1.0 / iscale;
    }
}

pub(crate) struct PackedKQuant {
    format: KFormat,
    rows: usize,
    cols: usize,
    kb: usize,
    scales_offset: usize,
    qs_offset: usize,
    tile_stride: usize,
    buf: Lines,
}

impl std::fmt::Debug for PackedKQuant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedKQuant")
            .field("format", &self.format)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish_non_exhaustive()
    }
}

impl PackedKQuant {
    /// Whether our kernels serve a `format` weight of `rows × cols` here: the shapes
    /// candle itself runs through its repacked kernels (whose arithmetic this
    /// reproduces). With AVX-512 VNNI that is every format; with AVX2 alone candle
    /// repacks Q4_K and Q6_K (its `q4k_tile_avx2` / `q6k_tile_avx2`, the same float
    /// steps), while Q5_K and Q8_0 stay on candle's dot products there.
    pub(crate) fn serves(format: KFormat, rows: usize, cols: usize) -> bool {
        let here = match Level::detect() {
            Level::Avx512Vnni => true,
            Level::Avx2 => has_avx2_kernel(format),
            Level::Scalar => false,
        };
        here && rows.is_multiple_of(TILE) && cols != 0 && cols.is_multiple_of(QK_K)
    }

    #[cfg(test)]
    pub(crate) fn from_ggml(format: KFormat, rows: usize, cols: usize, data: &[u8]) -> Result<Self> {
        let mut packed = Self::zeroed(format, rows, cols)?;
        check_whole(&format!("{format:?} weight {rows}x{cols}"), rows, packed.ggml_row_bytes(), data)?;
        packed.fill_rows(0, data)?;
        Ok(packed)
    }

    /// ggml's bytes for one row of these weights.
    pub(crate) fn ggml_row_bytes(&self) -> usize {
        self.kb * self.format.ggml_block_bytes()
    }

    /// Room for `rows × cols` weights, all zero, to be filled by [`Self::fill_rows`].
    pub(crate) fn zeroed(format: KFormat, rows: usize, cols: usize) -> Result<Self> {
        if cols == 0 || !cols.is_multiple_of(QK_K) {
            return Err(Error::BadInput(format!(
                "{format:?} weight with {cols} columns: not a positive multiple of {QK_K}"
            )));
        }
        let kb = cols / QK_K;
        let n_tiles = rows.div_ceil(TILE);
        let scales_offset = round_up(kb * TILE * 2 * format.f16s(), 64);
        let qs_offset = scales_offset + kb * format.scale_bytes() * TILE;
        let tile_stride = qs_offset + kb * format.qs_block_bytes();
        let total = n_tiles
            .checked_mul(tile_stride)
            .ok_or_else(|| Error::BadInput(format!("{format:?} weight {rows}x{cols} is too large")))?;
        Ok(Self {
            format,
            rows,
            cols,
            kb,
            scales_offset,
            qs_offset,
            tile_stride,
            buf: Lines::zeroed(total / 64),
        })
    }

    /// Packs whole rows from `first` on, given as ggml blocks (see
    /// `PackedWeights::fill_rows`).
    pub(crate) fn fill_rows(&mut self, first: usize, data: &[u8]) -> Result<()> {
        let (format, scales_offset, qs_offset, tile_stride) = (self.format, self.scales_offset, self.qs_offset, self.tile_stride);
        let bb = format.ggml_block_bytes();
        let row_bytes = self.ggml_row_bytes();
        if !data.len().is_multiple_of(row_bytes) || first + data.len() / row_bytes > self.rows {
            return Err(Error::BadInput(format!(
                "{} bytes from row {first} are not whole rows of a {format:?} weight with {} rows",
                data.len(),
                self.rows
            )));
        }
        let bytes = Line::bytes_mut(&mut self.buf);
        for (r, row) in data.chunks_exact(row_bytes).enumerate() {
            let r = first + r;
            let tile = (r / TILE) * tile_stride;
            let lane = r % TILE;
            for (b, blk) in row.chunks_exact(bb).enumerate() {
                for (i, &at) in format.ggml_f16_at().iter().enumerate() {
                    let d_at = tile + ((b * format.f16s() + i) * TILE + lane) * 2;
                    bytes[d_at..d_at + 2].copy_from_slice(&blk[at..at + 2]);
                }
                let sb = format.scale_bytes();
                for (j, &sc) in format.tile_scales(blk).iter().take(sb).enumerate() {
                    bytes[tile + scales_offset + (b * sb + j) * TILE + lane] = sc;
                }
                let qs = tile + qs_offset + b * format.qs_block_bytes();
                let qs = &mut bytes[qs..qs + format.qs_block_bytes()];
                for v in 0..QK_K {
                    format.put_tile_value(qs, v, lane, format.ggml_value(blk, v));
                }
            }
        }
        Ok(())
    }

    /// The ggml block bytes of `rows`, one after another (the inverse of `from_ggml`).
    pub(crate) fn ggml_rows(&self, rows: &[u32]) -> Result<Vec<u8>> {
        let format = self.format;
        let bb = format.ggml_block_bytes();
        let bytes = Line::bytes(&self.buf);
        let mut out = Vec::with_capacity(rows.len() * self.kb * bb);
        for &r in rows {
            let r = r as usize;
            if r >= self.rows {
                return Err(Error::BadInput(format!("row {r} is out of range for {} rows", self.rows)));
            }
            let tile = (r / TILE) * self.tile_stride;
            let lane = r % TILE;
            for b in 0..self.kb {
                let mut blk = vec![0u8; bb];
                let qs = &bytes[tile + self.qs_offset + b * format.qs_block_bytes()..];
                for v in 0..QK_K {
                    format.set_ggml_value(&mut blk, v, format.tile_value(qs, v, lane));
                }
                let sb = format.scale_bytes();
                let scales = std::array::from_fn(|j| {
                    if j < sb {
                        bytes[tile + self.scales_offset + (b * sb + j) * TILE + lane]
                    } else {
                        0
                    }
                });
                format.set_ggml_scales(&mut blk, &scales);
                for (i, &at) in format.ggml_f16_at().iter().enumerate() {
                    let d_at = tile + ((b * format.f16s() + i) * TILE + lane) * 2;
                    blk[at..at + 2].copy_from_slice(&bytes[d_at..d_at + 2]);
                }
                out.extend_from_slice(&blk);
            }
        }
        Ok(out)
    }

    pub(crate) fn format(&self) -> KFormat {
        self.format
    }

    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    fn tile(&self, t: usize) -> &[u8] {
        &Line::bytes(&self.buf)[t * self.tile_stride..(t + 1) * self.tile_stride]
    }

    /// `y[t][o] = Σ_k x[t][k]·W[o][k] (+ bias[o])` for `x` of `tokens × cols` f32.
    pub(crate) fn matmul(
        &self,
        level: Level,
        x: &[f32],
        tokens: usize,
        bias: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        let (rows, cols, kb) = (self.rows, self.cols, self.kb);
        if tokens.checked_mul(cols) != Some(x.len()) {
            return Err(Error::BadInput(format!(
                "linear input has {} values, expected {tokens} tokens of {cols}",
                x.len()
            )));
        }
        if bias.is_some_and(|b| b.len() != rows) {
            return Err(Error::BadInput(format!("bias length differs from {rows} rows")));
        }
        assert!(
            level as u8 <= Level::detect() as u8,
            "{level:?} is not supported here"
        );
        if tokens == 0 || rows == 0 {
            return Ok(Vec::new());
        }
        let mut acts = vec![SuperAct::default(); tokens * kb];
        let parallel = rows * kb * tokens >= PARALLEL_MIN_WORK;
        if parallel && tokens >= 4 {
            // A prefill's rows quantized on the pool too, not only its products.
            let shared = SharedOut::new(&mut acts);
            crate::compute_pool::compute_pool().run_chunks(tokens, |range: std::ops::Range<usize>| {
                for t in range {
                    // SAFETY: each token index goes to exactly one thread, so the
                    // `kb`-block segments are disjoint.
                    quantize_row_q8k(&x[t * cols..(t + 1) * cols], unsafe { shared.segment(t * kb, kb) });
                }
            });
        } else {
            for (xs, dst) in x.chunks_exact(cols).zip(acts.chunks_exact_mut(kb)) {
                quantize_row_q8k(xs, dst);
            }
        }
        let acts = &acts[..];
        let products = |out: &SharedOut<'_, std::mem::MaybeUninit<f32>>| {
            for_each_tile(rows, tokens, self.format.max_tokens(), bias, parallel, out, |tile, ts, res| {
                let act_rows: [&[SuperAct]; MAX_TOKENS] = std::array::from_fn(|i| {
                    if i < ts.len() {
                        &acts[(ts.start + i) * kb..(ts.start + i + 1) * kb]
                    } else {
                        &[][..]
                    }
                });
                self.tile_dot(level, tile, &act_rows[..ts.len()], res);
            });
        };
        // SAFETY: `for_each_tile` writes all `tokens × rows` outputs.
        Ok(unsafe { written(tokens * rows, products) })
    }

    /// Dot products of tile `tile` against `acts.len()` (1..=MAX_TOKENS) rows.
    fn tile_dot(&self, level: Level, tile: usize, acts: &[&[SuperAct]], out: &mut [[f32; TILE]]) {
        let bytes = self.tile(tile);
        let n = acts.len();
        assert!(n == out.len() && (1..=MAX_TOKENS).contains(&n));
        assert!(acts.iter().all(|a| a.len() == self.kb));
        #[cfg(target_arch = "x86_64")]
        if level == Level::Avx512Vnni {
            let acts: [*const SuperAct; MAX_TOKENS] =
                std::array::from_fn(|i| if i < n { acts[i].as_ptr() } else { std::ptr::null() });
            let t = bytes.as_ptr();
            let (so, qo, kb) = (self.scales_offset, self.qs_offset, self.kb);
            let o = out.as_mut_ptr();
            let a = |i: usize| acts[i];
            // SAFETY (every arm): the tier is at most the detected one (asserted in
            // `matmul`), so AVX-512 F/BW/VNNI are present; the tile spans its three
            // sections (laid out by `from_ggml`, 64-byte aligned) and each activation
            // row has `kb` blocks.
            macro_rules! run {
                ($kernel:ident, $($n:literal)*) => {
                    match n {
                        $($n => unsafe { $kernel::<$n>(t, kb, so, qo, std::array::from_fn(a), o) },)*
                        _ => unreachable!("chunks are 1..={} long", self.format.max_tokens()),
                    }
                };
            }
            match self.format {
                KFormat::Q4K => run!(q4k_avx512, 1 2 3 4 5 6 7 8),
                KFormat::Q5K => run!(q5k_avx512, 1 2 3 4),
                KFormat::Q6K => run!(q6k_avx512, 1 2 3 4 5 6 7 8),
                KFormat::Q8_0 => run!(q8_0_avx512, 1 2 3 4 5 6 7 8),
            }
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if level == Level::Avx2 && has_avx2_kernel(self.format) {
            let t = bytes.as_ptr();
            let (so, qo, kb) = (self.scales_offset, self.qs_offset, self.kb);
            for (acts, out) in acts.chunks(AVX2_MAX_TOKENS).zip(out.chunks_mut(AVX2_MAX_TOKENS)) {
                let n = acts.len();
                let acts: [*const SuperAct; AVX2_MAX_TOKENS] =
                    std::array::from_fn(|i| if i < n { acts[i].as_ptr() } else { std::ptr::null() });
                let o = out.as_mut_ptr();
                let a = |i: usize| acts[i];
                // SAFETY (every arm): the tier is at most the detected one (asserted
                // in `matmul`), so AVX2/FMA/F16C are present; the tile and the rows
                // are as for the AVX-512 kernels above.
                macro_rules! run {
                    ($kernel:ident) => {
                        match n {
                            1 => unsafe { $kernel::<1>(t, kb, so, qo, std::array::from_fn(a), o) },
                            2 => unsafe { $kernel::<2>(t, kb, so, qo, std::array::from_fn(a), o) },
                            3 => unsafe { $kernel::<3>(t, kb, so, qo, std::array::from_fn(a), o) },
                            4 => unsafe { $kernel::<4>(t, kb, so, qo, std::array::from_fn(a), o) },
                            _ => unreachable!("chunks are 1..={AVX2_MAX_TOKENS} long"),
                        }
                    };
                }
                match self.format {
                    KFormat::Q4K => run!(q4k_avx2),
                    KFormat::Q6K => run!(q6k_avx2),
                    KFormat::Q5K | KFormat::Q8_0 => unreachable!("no AVX2 kernel for {:?}", self.format),
                }
            }
            return;
        }
        let _ = level;
        for (a, o) in acts.iter().zip(out.iter_mut()) {
            match self.format {
                KFormat::Q5K => q5k_dot_scalar(bytes, self.kb, self.scales_offset, self.qs_offset, a, o),
                f => tile_dot_scalar(f, bytes, self.kb, self.scales_offset, self.qs_offset, a, o),
            }
        }
    }
}

/// Portable kernel over the same layout (one activation row): the reference the
/// AVX-512 ones are tested against, candle's float steps in candle's order.
fn tile_dot_scalar(
    format: KFormat,
    tile: &[u8],
    kb: usize,
    scales_offset: usize,
    qs_offset: usize,
    act: &[SuperAct],
    out: &mut [f32; TILE],
) {
    let f16_at = |at: usize| f16::from_le_bytes([tile[at], tile[at + 1]]).to_f32();
    let mut acc = [0f32; TILE];
    for (b, a) in act.iter().enumerate().take(kb) {
        let qs = &tile[qs_offset + b * format.qs_block_bytes()..];
        let scale_byte = |j: usize, lane: usize| tile[scales_offset + (b * SCALE_BYTES + j) * TILE + lane];
        let per_sub = QK_K / format.subs();
        for s in 0..format.subs() {
            for (lane, acc) in acc.iter_mut().enumerate() {
                let isum: i32 = (s * per_sub..(s + 1) * per_sub)
                    .map(|v| format.tile_value(qs, v, lane) as i32 * a.qs[v] as i32)
                    .sum();
                // The block scale of a K-quant row; Q8_0 has one per 32-value block.
                let d = || f16_at((b * format.f16s() * TILE + lane) * 2);
                match format {
                    KFormat::Q8_0 => {
                        // candle subtracts 128·bsum from the sum over `q + 128`: the
                        // same exact integer as the sum over the signed `q`.
                        let f = isum as f32 - 128.0 * (a.bsums[2 * s] as i32 + a.bsums[2 * s + 1] as i32) as f32;
                        let d = f16_at(((b * 8 + s) * TILE + lane) * 2);
                        *acc = f.mul_add(d * a.d, *acc);
                    }
                    KFormat::Q6K => {
                        let f = isum as f32 - 32.0 * a.bsums[s] as f32;
                        let scale = scale_byte(s, lane) as i8 as f32;
                        *acc = f.mul_add((d() * scale) * a.d, *acc);
                    }
                    KFormat::Q5K => unreachable!("Q5_K runs `q5k_dot_scalar`"),
                    KFormat::Q4K => {
                        let dmin = f16_at(((b * 2 + 1) * TILE + lane) * 2);
                        let scale = d() * scale_byte(s, lane) as f32;
                        let min = dmin * scale_byte(8 + s, lane) as f32;
                        *acc = (isum as f32).mul_add(scale * a.d, *acc);
                        let bsum = (a.bsums[2 * s] as i32 + a.bsums[2 * s + 1] as i32) as f32;
                        *acc = (-min).mul_add(a.d * bsum, *acc);
                    }
                }
            }
        }
    }
    *out = acc;
}

/// The portable Q5_K kernel (one activation row), candle's AVX2 steps in its order
/// (see the module's note).
fn q5k_dot_scalar(
    tile: &[u8],
    kb: usize,
    scales_offset: usize,
    qs_offset: usize,
    act: &[SuperAct],
    out: &mut [f32; TILE],
) {
    let format = KFormat::Q5K;
    let f16_at = |at: usize| f16::from_le_bytes([tile[at], tile[at + 1]]).to_f32();
    for (lane, out) in out.iter_mut().enumerate() {
        let mut acc = [0f32; 8];
        let mut summs = 0f32;
        for (b, a) in act.iter().enumerate().take(kb) {
            let qs = &tile[qs_offset + b * format.qs_block_bytes()..];
            let code = |j: usize| tile[scales_offset + (b * SCALE_BYTES + j) * TILE + lane] as i32;
            let d = a.d * f16_at((b * 2 * TILE + lane) * 2);
            let dmin = -a.d * f16_at(((b * 2 + 1) * TILE + lane) * 2);
            let mins: i32 = (0..8).map(|s| code(8 + s) * (a.bsums[2 * s] as i32 + a.bsums[2 * s + 1] as i32)).sum();
            summs += dmin * mins as f32;
            for (l, acc) in acc.iter_mut().enumerate() {
                let lane_sum: i32 = (0..8)
                    .map(|s| {
                        let values = (32 * s + 4 * l)..(32 * s + 4 * l + 4);
                        code(s) * values.map(|v| format.tile_value(qs, v, lane) as i32 * a.qs[v] as i32).sum::<i32>()
                    })
                    .sum();
                *acc = d.mul_add(lane_sum as f32, *acc);
            }
        }
        *out = candle_hsum8(&acc) + summs;
    }
}

/// Broadcasts bytes `4·word..4·word+4` of an activation block's `qs` (from `at`).
///
/// # Safety
/// `at` plus `4·word + 4` bytes must be readable; AVX-512 F present.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn act_word(at: *const u8, word: usize) -> std::arch::x86_64::__m512i {
    // SAFETY: per the contract; `[u8; 4]` needs no alignment.
    unsafe { std::arch::x86_64::_mm512_set1_epi32(i32::from_le_bytes(*at.wrapping_add(4 * word).cast::<[u8; 4]>())) }
}

/// A kernel's place in a tile's three sections and in its activation rows: one
/// superblock at a time.
#[cfg(target_arch = "x86_64")]
struct Cursor<const T: usize> {
    d: *const u8,
    sc: *const u8,
    q: *const u8,
    a: [*const SuperAct; T],
}

#[cfg(target_arch = "x86_64")]
impl<const T: usize> Cursor<T> {
    fn new(tile: *const u8, scales_offset: usize, qs_offset: usize, acts: [*const SuperAct; T]) -> Self {
        Self { d: tile, sc: tile.wrapping_add(scales_offset), q: tile.wrapping_add(qs_offset), a: acts }
    }

    fn next(&mut self, format: KFormat) {
        self.d = self.d.wrapping_add(format.f16s() * TILE * 2);
        self.sc = self.sc.wrapping_add(format.scale_bytes() * TILE);
        self.q = self.q.wrapping_add(format.qs_block_bytes());
        self.a = self.a.map(|p| p.wrapping_add(1));
    }
}

/// A Q4_K/Q5_K sub-block's four nibble vectors as eight groups: vector `p`'s low
/// nibbles are group `p`, its high ones group `p + 4`.
///
/// # Safety
/// `v` points at 256 readable, 64-byte aligned bytes; AVX-512 F/BW present.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn nibble_groups(v: *const u8) -> [std::arch::x86_64::__m512i; 8] {
    use std::arch::x86_64::*;
    let low4 = _mm512_set1_epi8(0x0F);
    let mut w = [_mm512_setzero_si512(); 8];
    for p in 0..4 {
        // SAFETY: per the contract.
        let packed = unsafe { _mm512_load_si512(v.wrapping_add(p * 64).cast()) };
        w[p] = _mm512_and_si512(packed, low4);
        w[p + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(packed), low4);
    }
    w
}

/// Stores a tile's results for T token rows.
///
/// # Safety
/// `out` has T rows of 16 floats; AVX-512 F present.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn store_rows<const T: usize>(out: *mut [f32; TILE], rows: [std::arch::x86_64::__m512; T]) {
    for (t, row) in rows.into_iter().enumerate() {
        // SAFETY: per the contract.
        unsafe { std::arch::x86_64::_mm512_storeu_ps(out.wrapping_add(t).cast::<f32>(), row) };
    }
}

/// # Safety
/// AVX-512 F/BW/VNNI + F16C present; `tile` is a Q6_K tile of `kb` superblocks laid
/// out as `PackedKQuant::from_ggml` does (64-byte aligned); each `acts[t]` has `kb`
/// blocks; `out` has `T` rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q6k_avx512<const T: usize>(
    tile: *const u8,
    kb: usize,
    scales_offset: usize,
    qs_offset: usize,
    acts: [*const SuperAct; T],
    out: *mut [f32; TILE],
) {
    use std::arch::x86_64::*;
    const FORMAT: KFormat = KFormat::Q6K;
    const SUB_BYTES: usize = 3 * 64;
    let low4 = _mm512_set1_epi8(0x0F);
    let high2 = _mm512_set1_epi8(0x30);
    let mut acc = [_mm512_setzero_ps(); T];
    let mut c = Cursor::new(tile, scales_offset, qs_offset, acts);
    for _ in 0..kb {
        // SAFETY: `d`, `sc`, `q` and `c.a[t]` point at superblock b of their sections,
        // in bounds and aligned (64 for the qs vectors, 16 for each sub's scales).
        unsafe {
            let dw = _mm512_cvtph_ps(_mm256_load_si256(c.d.cast()));
            for s in 0..16 {
                let v = c.q.wrapping_add(s * SUB_BYTES);
                super::x86::prefetch_lines::<{ SUB_BYTES / 64 }>(v);
                let lo01 = _mm512_load_si512(v.cast());
                let lo23 = _mm512_load_si512(v.wrapping_add(64).cast());
                let hi = _mm512_load_si512(v.wrapping_add(128).cast());
                let w0 = _mm512_or_si512(
                    _mm512_and_si512(lo01, low4),
                    _mm512_and_si512(_mm512_slli_epi16::<4>(hi), high2),
                );
                let w1 = _mm512_or_si512(
                    _mm512_and_si512(_mm512_srli_epi16::<4>(lo01), low4),
                    _mm512_and_si512(_mm512_slli_epi16::<2>(hi), high2),
                );
                let w2 = _mm512_or_si512(_mm512_and_si512(lo23, low4), _mm512_and_si512(hi, high2));
                let w3 = _mm512_or_si512(
                    _mm512_and_si512(_mm512_srli_epi16::<4>(lo23), low4),
                    _mm512_and_si512(_mm512_srli_epi16::<2>(hi), high2),
                );
                let scale_i8 = _mm_load_si128(c.sc.wrapping_add(s * TILE).cast());
                let scale = _mm512_mul_ps(dw, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(scale_i8)));
                // Groups outermost, tokens inside, as in `q4k_avx512`.
                let mut isums = [_mm512_setzero_si512(); T];
                for (g, wg) in [w0, w1, w2, w3].into_iter().enumerate() {
                    for (isum, a) in isums.iter_mut().zip(c.a) {
                        *isum = _mm512_dpbusd_epi32(*isum, wg, act_word(a.cast::<u8>().wrapping_add(s * 16), g));
                    }
                }
                for ((acc, a), isum) in acc.iter_mut().zip(c.a).zip(isums) {
                    let act = &*a;
                    let f = _mm512_sub_ps(
                        _mm512_cvtepi32_ps(isum),
                        _mm512_set1_ps(32.0 * act.bsums[s] as f32),
                    );
                    *acc = _mm512_fmadd_ps(f, _mm512_mul_ps(scale, _mm512_set1_ps(act.d)), *acc);
                }
            }
        }
        c.next(FORMAT);
    }
    // SAFETY: `out` has T rows.
    unsafe { store_rows(out, acc) };
}

/// # Safety
/// As `q6k_avx512`, for a Q4_K tile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q4k_avx512<const T: usize>(
    tile: *const u8,
    kb: usize,
    scales_offset: usize,
    qs_offset: usize,
    acts: [*const SuperAct; T],
    out: *mut [f32; TILE],
) {
    use std::arch::x86_64::*;
    const FORMAT: KFormat = KFormat::Q4K;
    const SUB_BYTES: usize = 4 * 64;
    let mut acc = [_mm512_setzero_ps(); T];
    let mut c = Cursor::new(tile, scales_offset, qs_offset, acts);
    for _ in 0..kb {
        // SAFETY: as in `q6k_avx512`; the d section holds d then dmin per block.
        unsafe {
            let dw = _mm512_cvtph_ps(_mm256_load_si256(c.d.cast()));
            let dminw = _mm512_cvtph_ps(_mm256_load_si256(c.d.wrapping_add(TILE * 2).cast()));
            for s in 0..8 {
                let v = c.q.wrapping_add(s * SUB_BYTES);
                super::x86::prefetch_lines::<{ SUB_BYTES / 64 }>(v);
                let w = nibble_groups(v);
                let code = |j: usize| {
                    _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_load_si128(c.sc.wrapping_add(j * TILE).cast())))
                };
                let scale = _mm512_mul_ps(dw, code(s));
                let min = _mm512_mul_ps(dminw, code(8 + s));
                // Groups outermost, tokens inside: each token's integer sum waits on
                // its own previous `vpdpbusd` T instructions back, not on the one just
                // before (see `x86::q5_0_avx512`). Integer sums: the order is free.
                let mut isums = [_mm512_setzero_si512(); T];
                for (g, wg) in w.iter().enumerate() {
                    for (isum, a) in isums.iter_mut().zip(c.a) {
                        *isum = _mm512_dpbusd_epi32(*isum, *wg, act_word(a.cast::<u8>().wrapping_add(s * 32), g));
                    }
                }
                for ((acc, a), isum) in acc.iter_mut().zip(c.a).zip(isums) {
                    let act = &*a;
                    *acc = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(isum),
                        _mm512_mul_ps(scale, _mm512_set1_ps(act.d)),
                        *acc,
                    );
                    let bsum = (act.bsums[2 * s] as i32 + act.bsums[2 * s + 1] as i32) as f32;
                    *acc = _mm512_fnmadd_ps(min, _mm512_set1_ps(act.d * bsum), *acc);
                }
            }
        }
        c.next(FORMAT);
    }
    // SAFETY: `out` has T rows.
    unsafe { store_rows(out, acc) };
}

/// # Safety
/// As `q6k_avx512`, for a Q5_K tile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q5k_avx512<const T: usize>(
    tile: *const u8,
    kb: usize,
    scales_offset: usize,
    qs_offset: usize,
    acts: [*const SuperAct; T],
    out: *mut [f32; TILE],
) {
    use std::arch::x86_64::*;
    const FORMAT: KFormat = KFormat::Q5K;
    const SUB_BYTES: usize = 5 * 64;
    let bit4 = _mm512_set1_epi8(0x10);
    // Eight lanes per token, as candle's 256-bit accumulator has.
    let mut acc = [[_mm512_setzero_ps(); 8]; T];
    let mut summs = [_mm512_setzero_ps(); T];
    let mut c = Cursor::new(tile, scales_offset, qs_offset, acts);
    for _ in 0..kb {
        // SAFETY: as in `q6k_avx512`; the d section holds d then dmin per block.
        unsafe {
            let dw = _mm512_cvtph_ps(_mm256_load_si256(c.d.cast()));
            let dminw = _mm512_cvtph_ps(_mm256_load_si256(c.d.wrapping_add(TILE * 2).cast()));
            let code = |j: usize| _mm512_cvtepu8_epi32(_mm_load_si128(c.sc.wrapping_add(j * TILE).cast()));
            let mut lanes = [[_mm512_setzero_si512(); 8]; T];
            for s in 0..8 {
                let v = c.q.wrapping_add(s * SUB_BYTES);
                super::x86::prefetch_lines::<{ SUB_BYTES / 64 }>(v);
                let mut w = nibble_groups(v);
                // Group g's fifth bits sit at bit g of each byte: move them to bit 4.
                let high = _mm512_load_si512(v.wrapping_add(256).cast());
                let fifth = [
                    _mm512_slli_epi16::<4>(high),
                    _mm512_slli_epi16::<3>(high),
                    _mm512_slli_epi16::<2>(high),
                    _mm512_slli_epi16::<1>(high),
                    high,
                    _mm512_srli_epi16::<1>(high),
                    _mm512_srli_epi16::<2>(high),
                    _mm512_srli_epi16::<3>(high),
                ];
                for (wg, f) in w.iter_mut().zip(fifth) {
                    *wg = _mm512_or_si512(*wg, _mm512_and_si512(f, bit4));
                }
                let scale = code(s);
                for (lanes, a) in lanes.iter_mut().zip(c.a) {
                    let at = a.cast::<u8>().wrapping_add(s * 32);
                    for (g, wg) in w.iter().enumerate() {
                        let part = _mm512_dpbusd_epi32(_mm512_setzero_si512(), *wg, act_word(at, g));
                        lanes[g] = _mm512_add_epi32(lanes[g], _mm512_mullo_epi32(scale, part));
                    }
                }
            }
            for t in 0..T {
                let act = &*c.a[t];
                let dt = _mm512_mul_ps(_mm512_set1_ps(act.d), dw);
                for (acc, lane) in acc[t].iter_mut().zip(lanes[t]) {
                    *acc = _mm512_fmadd_ps(dt, _mm512_cvtepi32_ps(lane), *acc);
                }
                // Σ min·bsum is an integer below 2²⁴: exact in f32, as candle's i32.
                let mut mins = _mm512_setzero_ps();
                for s in 0..8 {
                    let bsum = (act.bsums[2 * s] as i32 + act.bsums[2 * s + 1] as i32) as f32;
                    mins = _mm512_fmadd_ps(_mm512_cvtepi32_ps(code(8 + s)), _mm512_set1_ps(bsum), mins);
                }
                let dmin = _mm512_mul_ps(_mm512_set1_ps(-act.d), dminw);
                summs[t] = _mm512_add_ps(summs[t], _mm512_mul_ps(dmin, mins));
            }
        }
        c.next(FORMAT);
    }
    let rows: [__m512; T] = std::array::from_fn(|t| _mm512_add_ps(super::x86::hsum_groups512(&acc[t]), summs[t]));
    // SAFETY: `out` has T rows.
    unsafe { store_rows(out, rows) };
}

/// # Safety
/// As `q6k_avx512`, for a Q8_0 tile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q8_0_avx512<const T: usize>(
    tile: *const u8,
    kb: usize,
    scales_offset: usize,
    qs_offset: usize,
    acts: [*const SuperAct; T],
    out: *mut [f32; TILE],
) {
    use std::arch::x86_64::*;
    const FORMAT: KFormat = KFormat::Q8_0;
    const BLOCK_BYTES: usize = 8 * 64;
    let mut acc = [_mm512_setzero_ps(); T];
    let mut c = Cursor::new(tile, scales_offset, qs_offset, acts);
    for _ in 0..kb {
        // SAFETY: as in `q6k_avx512`; the d section holds the eight blocks' scales.
        unsafe {
            for blk in 0..8 {
                let v = c.q.wrapping_add(blk * BLOCK_BYTES);
                super::x86::prefetch_lines::<{ BLOCK_BYTES / 64 }>(v);
                let dw = _mm512_cvtph_ps(_mm256_load_si256(c.d.wrapping_add(blk * TILE * 2).cast()));
                let mut w = [_mm512_setzero_si512(); 8];
                for (g, wg) in w.iter_mut().enumerate() {
                    *wg = _mm512_load_si512(v.wrapping_add(g * 64).cast());
                }
                for (acc, a) in acc.iter_mut().zip(c.a) {
                    let at = a.cast::<u8>().wrapping_add(blk * 32);
                    let mut isum = _mm512_setzero_si512();
                    for (g, wg) in w.iter().enumerate() {
                        isum = _mm512_dpbusd_epi32(isum, *wg, act_word(at, g));
                    }
                    let act = &*a;
                    let bsum = (act.bsums[2 * blk] as i32 + act.bsums[2 * blk + 1] as i32) as f32;
                    let f = _mm512_sub_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(128.0 * bsum));
                    *acc = _mm512_fmadd_ps(f, _mm512_mul_ps(dw, _mm512_set1_ps(act.d)), *acc);
                }
            }
        }
        c.next(FORMAT);
    }
    // SAFETY: `out` has T rows.
    unsafe { store_rows(out, acc) };
}

/// Tokens per AVX2 kernel call: a token's accumulators for both tile halves beside
/// the eight unpacked weight vectors of a half fill the 16 ymm registers at four.
const AVX2_MAX_TOKENS: usize = 4;

/// The formats with an AVX2 kernel here: those candle repacks on AVX2 (see
/// [`PackedKQuant::serves`]).
fn has_avx2_kernel(format: KFormat) -> bool {
    matches!(format, KFormat::Q4K | KFormat::Q6K)
}

/// As [`act_word`], for 256-bit vectors.
///
/// # Safety
/// `at` plus `4·word + 4` bytes must be readable; AVX2 present.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn act_word256(at: *const u8, word: usize) -> std::arch::x86_64::__m256i {
    // SAFETY: per the contract; `[u8; 4]` needs no alignment.
    unsafe { std::arch::x86_64::_mm256_set1_epi32(i32::from_le_bytes(*at.wrapping_add(4 * word).cast::<[u8; 4]>())) }
}

/// The eight bytes of tile half `half` (rows `8·half..`) of a 16-row byte vector at
/// `at`, widened to eight f32: unsigned codes, or signed ones where `signed`.
///
/// # Safety
/// `at` points at 16 readable, 16-byte aligned bytes; AVX2 present.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn half_codes(at: *const u8, half: usize, signed: bool) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // SAFETY: per the contract.
    let all = unsafe { _mm_load_si128(at.cast()) };
    let bytes = if half == 0 { all } else { _mm_unpackhi_epi64(all, all) };
    let wide = if signed { _mm256_cvtepi8_epi32(bytes) } else { _mm256_cvtepu8_epi32(bytes) };
    _mm256_cvtepi32_ps(wide)
}

/// Eight f16 values of tile half `half` from the 16 at `at`, as f32.
///
/// # Safety
/// `at` points at 32 readable, 32-byte aligned bytes; AVX2 and F16C present.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn half_f16s(at: *const u8, half: usize) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // SAFETY: per the contract; half 1 starts 16 bytes in, still 16-byte aligned.
    unsafe { _mm256_cvtph_ps(_mm_load_si128(at.wrapping_add(half * 16).cast())) }
}

/// Stores a tile's results for T token rows, both halves.
///
/// # Safety
/// `out` has T rows of 16 floats; AVX present.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn store_halves<const T: usize>(out: *mut [f32; TILE], rows: [[std::arch::x86_64::__m256; 2]; T]) {
    for (t, row) in rows.into_iter().enumerate() {
        for (half, values) in row.into_iter().enumerate() {
            // SAFETY: per the contract; half·8 + 8 ≤ 16.
            unsafe { std::arch::x86_64::_mm256_storeu_ps(out.wrapping_add(t).cast::<f32>().wrapping_add(half * 8), values) };
        }
    }
}

/// Q4_K on AVX2: `q4k_avx512`'s float steps lane by lane (candle's `q4k_tile_avx2`),
/// a tile as two halves of 8 rows, both computed from each sub-block as it streams
/// by. `vpmaddubsw` + `vpmaddwd` stand in for `vpdpbusd`: a pair of 4-bit codes times
/// activation bytes is at most 2·15·128 = 3840, so the eight groups of a sub-block
/// sum in i16 (≤ 30720) before one `vpmaddwd` widens them; integer sums are exact in
/// any order.
///
/// # Safety
/// AVX2 + FMA + F16C present; otherwise as `q4k_avx512`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_avx2<const T: usize>(
    tile: *const u8,
    kb: usize,
    scales_offset: usize,
    qs_offset: usize,
    acts: [*const SuperAct; T],
    out: *mut [f32; TILE],
) {
    use std::arch::x86_64::*;
    const FORMAT: KFormat = KFormat::Q4K;
    const SUB_BYTES: usize = 4 * 64;
    let low4 = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); 2]; T];
    let mut c = Cursor::new(tile, scales_offset, qs_offset, acts);
    for _ in 0..kb {
        // SAFETY: as in `q4k_avx512`; a half's bytes are the second 32 of each
        // 64-byte vector, its scales and codes the second 8 of each 16.
        unsafe {
            // The superblock's d and dmin, per half, once for its eight sub-blocks.
            let dw = [half_f16s(c.d, 0), half_f16s(c.d, 1)];
            let dminw = [half_f16s(c.d.wrapping_add(TILE * 2), 0), half_f16s(c.d.wrapping_add(TILE * 2), 1)];
            for s in 0..8 {
                let v = c.q.wrapping_add(s * SUB_BYTES);
                super::x86::prefetch_lines::<{ SUB_BYTES / 64 }>(v);
                for half in 0..2 {
                    let scale = _mm256_mul_ps(dw[half], half_codes(c.sc.wrapping_add(s * TILE), half, false));
                    let min = _mm256_mul_ps(dminw[half], half_codes(c.sc.wrapping_add((8 + s) * TILE), half, false));
                    let mut w = [_mm256_setzero_si256(); 8];
                    for p in 0..4 {
                        let packed = _mm256_load_si256(v.wrapping_add(p * 64 + half * 32).cast());
                        w[p] = _mm256_and_si256(packed, low4);
                        w[p + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), low4);
                    }
                    for (acc, a) in acc.iter_mut().zip(c.a) {
                        let at = a.cast::<u8>().wrapping_add(s * 32);
                        let part = |g: usize| _mm256_maddubs_epi16(w[g], act_word256(at, g));
                        let sum16 = _mm256_add_epi16(
                            _mm256_add_epi16(_mm256_add_epi16(part(0), part(1)), _mm256_add_epi16(part(2), part(3))),
                            _mm256_add_epi16(_mm256_add_epi16(part(4), part(5)), _mm256_add_epi16(part(6), part(7))),
                        );
                        let isum = _mm256_madd_epi16(sum16, ones);
                        let act = &*a;
                        acc[half] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(isum),
                            _mm256_mul_ps(scale, _mm256_set1_ps(act.d)),
                            acc[half],
                        );
                        let bsum = (act.bsums[2 * s] as i32 + act.bsums[2 * s + 1] as i32) as f32;
                        acc[half] = _mm256_fnmadd_ps(min, _mm256_set1_ps(act.d * bsum), acc[half]);
                    }
                }
            }
        }
        c.next(FORMAT);
    }
    // SAFETY: `out` has T rows.
    unsafe { store_halves(out, acc) };
}

/// Q6_K on AVX2: `q6k_avx512`'s float steps lane by lane (candle's `q6k_tile_avx2`),
/// both tile halves from each sub-block. A pair of 6-bit codes times activation
/// bytes is at most 2·63·128 = 16128, so two groups sum in i16 (≤ 32256) before
/// `vpmaddwd` widens them.
///
/// # Safety
/// AVX2 + FMA + F16C present; otherwise as `q6k_avx512`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k_avx2<const T: usize>(
    tile: *const u8,
    kb: usize,
    scales_offset: usize,
    qs_offset: usize,
    acts: [*const SuperAct; T],
    out: *mut [f32; TILE],
) {
    use std::arch::x86_64::*;
    const FORMAT: KFormat = KFormat::Q6K;
    const SUB_BYTES: usize = 3 * 64;
    let low4 = _mm256_set1_epi8(0x0F);
    let high2 = _mm256_set1_epi8(0x30);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); 2]; T];
    let mut c = Cursor::new(tile, scales_offset, qs_offset, acts);
    for _ in 0..kb {
        // SAFETY: as in `q6k_avx512`, and the halves as in `q4k_avx2`.
        unsafe {
            // The superblock's d, per half, once for its sixteen sub-blocks.
            let dw = [half_f16s(c.d, 0), half_f16s(c.d, 1)];
            for s in 0..16 {
                let v = c.q.wrapping_add(s * SUB_BYTES);
                super::x86::prefetch_lines::<{ SUB_BYTES / 64 }>(v);
                for half in 0..2 {
                    let lo01 = _mm256_load_si256(v.wrapping_add(half * 32).cast());
                    let lo23 = _mm256_load_si256(v.wrapping_add(64 + half * 32).cast());
                    let hi = _mm256_load_si256(v.wrapping_add(128 + half * 32).cast());
                    let w = [
                        _mm256_or_si256(_mm256_and_si256(lo01, low4), _mm256_and_si256(_mm256_slli_epi16::<4>(hi), high2)),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16::<4>(lo01), low4),
                            _mm256_and_si256(_mm256_slli_epi16::<2>(hi), high2),
                        ),
                        _mm256_or_si256(_mm256_and_si256(lo23, low4), _mm256_and_si256(hi, high2)),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16::<4>(lo23), low4),
                            _mm256_and_si256(_mm256_srli_epi16::<2>(hi), high2),
                        ),
                    ];
                    let scale = _mm256_mul_ps(dw[half], half_codes(c.sc.wrapping_add(s * TILE), half, true));
                    for (acc, a) in acc.iter_mut().zip(c.a) {
                        let at = a.cast::<u8>().wrapping_add(s * 16);
                        let part = |g: usize| _mm256_maddubs_epi16(w[g], act_word256(at, g));
                        let isum = _mm256_add_epi32(
                            _mm256_madd_epi16(_mm256_add_epi16(part(0), part(1)), ones),
                            _mm256_madd_epi16(_mm256_add_epi16(part(2), part(3)), ones),
                        );
                        let act = &*a;
                        let f = _mm256_sub_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(32.0 * act.bsums[s] as f32));
                        acc[half] = _mm256_fmadd_ps(f, _mm256_mul_ps(scale, _mm256_set1_ps(act.d)), acc[half]);
                    }
                }
            }
        }
        c.next(FORMAT);
    }
    // SAFETY: `out` has T rows.
    unsafe { store_halves(out, acc) };
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Our Q8_K blocks hold exactly candle's bytes (`d`, `qs`, `bsums`, repr(C)).
    #[test]
    fn q8k_quantization_matches_candle() {
        let mut x = values(4 * QK_K, 3);
        x[5] = 9.0; // a block whose extreme is positive
        x[QK_K + 7] = -9.0; // and one whose extreme is negative
        x[2 * QK_K..3 * QK_K].fill(0.0); // and an all-zero block
        let t = Tensor::from_slice(&x, (1, x.len()), &Device::Cpu).unwrap();
        let want = QTensor::quantize(&t, GgmlDType::Q8K).unwrap().data().unwrap().to_vec();
        let mut ours = vec![SuperAct::default(); 4];
        quantize_row_q8k(&x, &mut ours);
        for (b, blk) in ours.iter().enumerate() {
            let w = &want[b * 292..(b + 1) * 292];
            assert_eq!(blk.d.to_le_bytes(), w[0..4], "block {b}: d");
            assert!(blk.qs.iter().zip(&w[4..260]).all(|(&q, &c)| q as u8 == c), "block {b}: qs");
            let bsums: Vec<u8> = blk.bsums.iter().flat_map(|s| s.to_le_bytes()).collect();
            assert_eq!(bsums, w[260..292], "block {b}: bsums");
        }
    }

    /// The SIMD quantizer gives the scalar one's bits on edge cases: ties at ½, NaN and
    /// infinities, a block of zeros, ±extremes of one magnitude (the first one wins),
    /// tiny and huge values.
    #[test]
    fn q8k_simd_quantization_equals_scalar() {
        let mut x = values(8 * QK_K, 5);
        for (i, v) in x[..QK_K].iter_mut().enumerate() {
            *v = (i as f32 - 128.0) * 0.5; // iscale·v lands on halves
        }
        x[QK_K + 3] = f32::NAN;
        x[QK_K + 9] = -4.0;
        x[QK_K + 200] = 4.0;
        x[2 * QK_K..3 * QK_K].fill(0.0);
        x[3 * QK_K + 17] = f32::INFINITY;
        x[4 * QK_K..5 * QK_K].iter_mut().for_each(|v| *v *= 1e-30);
        x[5 * QK_K..6 * QK_K].iter_mut().for_each(|v| *v *= 3e38);
        x[6 * QK_K..7 * QK_K].fill(f32::NAN);
        x[7 * QK_K + 255] = -7.0;
        let mut scalar = vec![SuperAct::default(); 8];
        quantize_row_q8k_scalar(&x, &mut scalar);
        let mut dispatched = vec![SuperAct::default(); 8];
        quantize_row_q8k(&x, &mut dispatched);
        for (b, (s, d)) in scalar.iter().zip(&dispatched).enumerate() {
            assert_eq!((s.qs, s.bsums, s.d.to_bits()), (d.qs, d.bsums, d.d.to_bits()), "block {b}");
        }
    }

    /// Repacking then reading rows back gives ggml's blocks, scales and mins included.
    #[test]
    fn rows_read_back_as_ggml_blocks() {
        for format in [KFormat::Q4K, KFormat::Q5K, KFormat::Q6K, KFormat::Q8_0] {
            let (rows, cols) = (32, 512);
            let w = Tensor::from_vec(values(rows * cols, 9), (rows, cols), &Device::Cpu).unwrap();
            let data = QTensor::quantize(&w, format.dtype()).unwrap().data().unwrap().to_vec();
            let packed = PackedKQuant::from_ggml(format, rows, cols, &data).unwrap();
            let all: Vec<u32> = (0..rows as u32).collect();
            assert_eq!(packed.ggml_rows(&all).unwrap(), data, "{format:?}");
            assert!(packed.ggml_rows(&[rows as u32]).is_err());
            assert!(PackedKQuant::from_ggml(format, rows, cols, &data[1..]).is_err());
            assert!(PackedKQuant::from_ggml(format, rows, 100, &data).is_err());
        }
    }
}
