//! Q6_K weights in 16-row tiles at ggml's size, and their matmul, bit-identical to
//! candle 0.11.1's repacked x86 Q6_K kernels (`repack_x86::q6k_tile` and its 256-bit
//! twins, which all do the same float steps).
//!
//! Why our own: candle repacks Q6_K into a second copy of the weights that is 1.5× the
//! file's size (one byte per 6-bit value, f32 scales) and keeps the original beside it,
//! and it sends a lone activation row down a different kernel (AVX2 `vec_dot_q6k_q8k`,
//! another summation order) than a batch. Here every row count runs one kernel over
//! one copy of ggml's bytes.
//!
//! The arithmetic, per 16-value sub-block `s` of a 256-value superblock, as candle's:
//! activations are Q8_K (`d`, 256 `qs`, `bsums` of 16), the integer sum `Σ u·y` over
//! the raw unsigned 6-bit values `u` is exact, `f = f32(isum) − 32·bsum[s]` (exact,
//! both integers far below 2²⁴), and `acc = fma(f, (d_w·scale_s)·d_y, acc)` per row,
//! sub-blocks and superblocks in order. `d_w·scale_s` (an f16 times an i8) is exact in
//! f32, so computing it here instead of storing it changes nothing.
//!
//! Tile layout (`kb` superblocks per row):
//!
//! ```text
//! d:      [kb][16 rows] f16
//! (zero padding to 64 bytes)
//! scales: [kb][16 subs][16 rows] i8
//! qs:     [kb][16 subs][3 vectors][16 rows][4 bytes]
//! ```
//!
//! Sub-block `s` holds values `16s..16s+16` of each row as four groups of four
//! (`g = 0..4`: values `16s+4g..16s+4g+4`). Vector 0 holds groups 0 (low nibbles) and 1
//! (high nibbles), vector 1 groups 2 and 3, both as each value's low four bits; vector 2
//! holds the two high bits of all four groups, group `g` at bits `2g..2g+2`.

use std::ops::Range;

use half::f16;

use super::packed::{round_up, Level, Line, SharedOut, TILE};
use crate::error::{Error, Result};

/// Values per superblock (ggml's QK_K).
pub(crate) const QK_K: usize = 256;
const SUBS: usize = QK_K / 16;
/// ggml's `block_q6_K`: ql[128], qh[64], scales[16] (i8), d (f16).
const GGML_BLOCK_BYTES: usize = 210;
/// Quant bytes of one superblock of one tile: 16 subs × 3 vectors × 64 bytes.
const QS_BLOCK_BYTES: usize = SUBS * 3 * 64;
/// Token rows one kernel call handles (candle's `MAX_MT` is 4; any count gives the
/// same per-row arithmetic).
const MAX_TOKENS: usize = 4;
/// Below this many row·superblock·token units a matmul stays on the calling thread.
const PARALLEL_MIN_WORK: usize = 512;

/// One Q8_K activation block, as candle's `BlockQ8K::from_float` computes it.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C, align(64))]
pub(crate) struct SuperAct {
    pub(crate) qs: [i8; QK_K],
    pub(crate) bsums: [i16; SUBS],
    pub(crate) d: f32,
}

impl Default for SuperAct {
    fn default() -> Self {
        Self {
            qs: [0; QK_K],
            bsums: [0; SUBS],
            d: 0.0,
        }
    }
}

/// candle's (and ggml's reference) `quantize_row_q8k`: the value of largest magnitude
/// maps to −127 (`iscale = −127/max`), each value to `round(iscale·x)` clamped to i8,
/// `d = 1/iscale`; an all-zero block is all zeros.
pub(crate) fn quantize_row_q8k(x: &[f32], out: &mut [SuperAct]) {
    assert_eq!(x.len(), out.len() * QK_K, "activation row / block count mismatch");
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
        for (s, qs) in blk.bsums.iter_mut().zip(blk.qs.chunks_exact(16)) {
            *s = qs.iter().map(|&q| q as i16).sum();
        }
        blk.d = 1.0 / iscale;
    }
}

pub(crate) struct PackedQ6K {
    rows: usize,
    cols: usize,
    kb: usize,
    n_tiles: usize,
    scales_offset: usize,
    qs_offset: usize,
    tile_stride: usize,
    buf: Vec<Line>,
}

impl std::fmt::Debug for PackedQ6K {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedQ6K")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish_non_exhaustive()
    }
}

/// Value `v` (0..256) of a ggml Q6_K block as its unsigned 6-bit code.
fn ggml_value(blk: &[u8], v: usize) -> u8 {
    let (ql, qh) = (&blk[..128], &blk[128..192]);
    let (half, j) = (v / 128, v % 128);
    let (quarter, l) = (j / 32, j % 32);
    let low = ql[half * 64 + (quarter % 2) * 32 + l];
    let low = if quarter < 2 { low & 0x0F } else { low >> 4 };
    let high = (qh[half * 32 + l] >> (2 * quarter)) & 3;
    low | (high << 4)
}

/// Where value `v` of row `lane` sits in a superblock's qs: the byte holding its low
/// four bits and their shift, then the byte holding its two high bits and their shift.
fn qs_position(v: usize, lane: usize) -> (usize, usize, usize, usize) {
    let (s, within) = (v / 16, v % 16);
    let (g, k) = (within / 4, within % 4);
    let byte = lane * 4 + k;
    let low_at = s * 192 + (g / 2) * 64 + byte;
    let high_at = s * 192 + 128 + byte;
    (low_at, 4 * (g % 2), high_at, 2 * g)
}

impl PackedQ6K {
    /// Whether this kernel serves a `rows × cols` Q6_K weight here: the shapes candle
    /// itself runs through its repacked kernels (whose arithmetic this reproduces), on
    /// machines with AVX-512 VNNI.
    pub(crate) fn serves(rows: usize, cols: usize) -> bool {
        Level::detect() == Level::Avx512Vnni
            && rows.is_multiple_of(TILE)
            && cols != 0
            && cols.is_multiple_of(QK_K)
    }

    pub(crate) fn from_ggml(rows: usize, cols: usize, data: &[u8]) -> Result<Self> {
        if cols == 0 || !cols.is_multiple_of(QK_K) {
            return Err(Error::BadInput(format!(
                "Q6K weight with {cols} columns: not a positive multiple of {QK_K}"
            )));
        }
        let kb = cols / QK_K;
        let expected = rows.checked_mul(kb).and_then(|n| n.checked_mul(GGML_BLOCK_BYTES));
        if expected != Some(data.len()) {
            return Err(Error::BadInput(format!(
                "Q6K weight {rows}x{cols} should be {expected:?} bytes, got {}",
                data.len()
            )));
        }
        let n_tiles = rows.div_ceil(TILE);
        let scales_offset = round_up(kb * TILE * 2, 64);
        let qs_offset = scales_offset + kb * SUBS * TILE;
        let tile_stride = qs_offset + kb * QS_BLOCK_BYTES;
        let total = n_tiles
            .checked_mul(tile_stride)
            .ok_or_else(|| Error::BadInput(format!("Q6K weight {rows}x{cols} is too large")))?;
        let mut packed = Self {
            rows,
            cols,
            kb,
            n_tiles,
            scales_offset,
            qs_offset,
            tile_stride,
            buf: vec![Line([0; 64]); total / 64],
        };
        let bytes = Line::bytes_mut(&mut packed.buf);
        for (r, row) in data.chunks_exact(kb * GGML_BLOCK_BYTES).enumerate() {
            let tile = (r / TILE) * tile_stride;
            let lane = r % TILE;
            for (b, blk) in row.chunks_exact(GGML_BLOCK_BYTES).enumerate() {
                let d_at = tile + (b * TILE + lane) * 2;
                bytes[d_at..d_at + 2].copy_from_slice(&blk[208..210]);
                for s in 0..SUBS {
                    bytes[tile + scales_offset + (b * SUBS + s) * TILE + lane] = blk[192 + s];
                }
                let qs = tile + qs_offset + b * QS_BLOCK_BYTES;
                for v in 0..QK_K {
                    let u = ggml_value(blk, v);
                    let (low_at, low_shift, high_at, high_shift) = qs_position(v, lane);
                    bytes[qs + low_at] |= (u & 0x0F) << low_shift;
                    bytes[qs + high_at] |= (u >> 4) << high_shift;
                }
            }
        }
        Ok(packed)
    }

    /// The ggml block bytes of `rows`, one after another (the inverse of `from_ggml`).
    pub(crate) fn ggml_rows(&self, rows: &[u32]) -> Result<Vec<u8>> {
        let bytes = Line::bytes(&self.buf);
        let mut out = Vec::with_capacity(rows.len() * self.kb * GGML_BLOCK_BYTES);
        for &r in rows {
            let r = r as usize;
            if r >= self.rows {
                return Err(Error::BadInput(format!("row {r} is out of range for {} rows", self.rows)));
            }
            let tile = (r / TILE) * self.tile_stride;
            let lane = r % TILE;
            for b in 0..self.kb {
                let mut blk = [0u8; GGML_BLOCK_BYTES];
                let qs = tile + self.qs_offset + b * QS_BLOCK_BYTES;
                for v in 0..QK_K {
                    let (low_at, low_shift, high_at, high_shift) = qs_position(v, lane);
                    let low = (bytes[qs + low_at] >> low_shift) & 0x0F;
                    let high = (bytes[qs + high_at] >> high_shift) & 3;
                    let (half, j) = (v / 128, v % 128);
                    let (quarter, l) = (j / 32, j % 32);
                    let shift = if quarter < 2 { 0 } else { 4 };
                    blk[half * 64 + (quarter % 2) * 32 + l] |= low << shift;
                    blk[128 + half * 32 + l] |= high << (2 * quarter);
                }
                for s in 0..SUBS {
                    blk[192 + s] = bytes[tile + self.scales_offset + (b * SUBS + s) * TILE + lane];
                }
                let d_at = tile + (b * TILE + lane) * 2;
                blk[208..210].copy_from_slice(&bytes[d_at..d_at + 2]);
                out.extend_from_slice(&blk);
            }
        }
        Ok(out)
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
        let mut out = vec![0f32; tokens * rows];
        if tokens == 0 || rows == 0 {
            return Ok(out);
        }
        let mut acts = vec![SuperAct::default(); tokens * kb];
        for (xs, dst) in x.chunks_exact(cols).zip(acts.chunks_exact_mut(kb)) {
            quantize_row_q8k(xs, dst);
        }
        let acts = &acts[..];
        let y = SharedOut::new(&mut out);
        let work = |range: Range<usize>| {
            for tile in range {
                let row0 = tile * TILE;
                let valid = TILE.min(rows - row0);
                for t0 in (0..tokens).step_by(MAX_TOKENS) {
                    let n = MAX_TOKENS.min(tokens - t0);
                    let mut res = [[0f32; TILE]; MAX_TOKENS];
                    let act_rows: [&[SuperAct]; MAX_TOKENS] = std::array::from_fn(|i| {
                        if i < n {
                            &acts[(t0 + i) * kb..(t0 + i + 1) * kb]
                        } else {
                            &[][..]
                        }
                    });
                    self.tile_dot(level, tile, &act_rows[..n], &mut res[..n]);
                    for (i, r) in res[..n].iter_mut().enumerate() {
                        if let Some(b) = bias {
                            for (v, bv) in r.iter_mut().zip(&b[row0..row0 + valid]) {
                                *v += bv;
                            }
                        }
                        // SAFETY: this tile owns columns row0..row0+valid of every
                        // output row, and each tile goes to exactly one worker.
                        let dst = unsafe { y.segment((t0 + i) * rows + row0, valid) };
                        dst.copy_from_slice(&r[..valid]);
                    }
                }
            }
        };
        if rows * kb * tokens >= PARALLEL_MIN_WORK && self.n_tiles > 1 {
            candle_core::utils::barrier_pool().execute_chunked(self.n_tiles, work);
        } else {
            work(0..self.n_tiles);
        }
        Ok(out)
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
            // SAFETY: the tier is at most the detected one (asserted in `matmul`), so
            // AVX-512 F/BW/VNNI are present; the tile spans its three sections (laid
            // out by `from_ggml`, 64-byte aligned) and each activation row has `kb`
            // blocks.
            unsafe {
                let t = bytes.as_ptr();
                let (so, qo, kb) = (self.scales_offset, self.qs_offset, self.kb);
                let o = out.as_mut_ptr();
                match n {
                    1 => q6k_avx512::<1>(t, kb, so, qo, [acts[0]], o),
                    2 => q6k_avx512::<2>(t, kb, so, qo, [acts[0], acts[1]], o),
                    3 => q6k_avx512::<3>(t, kb, so, qo, [acts[0], acts[1], acts[2]], o),
                    4 => q6k_avx512::<4>(t, kb, so, qo, acts, o),
                    _ => unreachable!("chunks are 1..=4 long"),
                }
            }
            return;
        }
        let _ = level;
        for (a, o) in acts.iter().zip(out.iter_mut()) {
            tile_dot_scalar(bytes, self.kb, self.scales_offset, self.qs_offset, a, o);
        }
    }
}

/// Portable kernel over the same layout (one activation row): the reference the
/// AVX-512 one is tested against, candle's float steps in candle's order.
fn tile_dot_scalar(
    tile: &[u8],
    kb: usize,
    scales_offset: usize,
    qs_offset: usize,
    act: &[SuperAct],
    out: &mut [f32; TILE],
) {
    let mut acc = [0f32; TILE];
    for (b, a) in act.iter().enumerate().take(kb) {
        let qs = &tile[qs_offset + b * QS_BLOCK_BYTES..];
        for s in 0..SUBS {
            for (lane, acc) in acc.iter_mut().enumerate() {
                let mut isum = 0i32;
                for within in 0..16 {
                    let v = s * 16 + within;
                    let (low_at, low_shift, high_at, high_shift) = qs_position(v, lane);
                    let u = ((qs[low_at] >> low_shift) & 0x0F) | (((qs[high_at] >> high_shift) & 3) << 4);
                    isum += u as i32 * a.qs[v] as i32;
                }
                let f = isum as f32 - 32.0 * a.bsums[s] as f32;
                let d_at = (b * TILE + lane) * 2;
                let d = f16::from_le_bytes([tile[d_at], tile[d_at + 1]]).to_f32();
                let scale = tile[scales_offset + (b * SUBS + s) * TILE + lane] as i8;
                *acc = f.mul_add((d * scale as f32) * a.d, *acc);
            }
        }
    }
    *out = acc;
}

/// # Safety
/// AVX-512 F/BW/VNNI + F16C present; `tile` is a tile of `kb` superblocks laid out as
/// `PackedQ6K::from_ggml` does (64-byte aligned); each `acts[t]` has `kb` blocks;
/// `out` has `T` rows.
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
    let low4 = _mm512_set1_epi8(0x0F);
    let high2 = _mm512_set1_epi8(0x30);
    let mut acc = [_mm512_setzero_ps(); T];
    let mut d = tile;
    let mut sc = tile.wrapping_add(scales_offset);
    let mut q = tile.wrapping_add(qs_offset);
    let mut a = acts;
    for _ in 0..kb {
        // SAFETY: `d`, `sc`, `q` and `a[t]` point at superblock b of their sections,
        // in bounds and aligned (64 for the qs vectors, 16 for each sub's scales).
        unsafe {
            let dw = _mm512_cvtph_ps(_mm256_load_si256(d.cast()));
            for s in 0..SUBS {
                let v = q.wrapping_add(s * 192);
                _mm_prefetch::<_MM_HINT_T0>(v.wrapping_add(12 * 192).cast());
                _mm_prefetch::<_MM_HINT_T0>(v.wrapping_add(12 * 192 + 64).cast());
                _mm_prefetch::<_MM_HINT_T0>(v.wrapping_add(12 * 192 + 128).cast());
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
                let scale_i8 = _mm_load_si128(sc.wrapping_add(s * TILE).cast());
                let scale = _mm512_mul_ps(dw, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(scale_i8)));
                for t in 0..T {
                    let at = a[t].cast::<u8>().wrapping_add(s * 16);
                    let word = |g: usize| {
                        _mm512_set1_epi32(i32::from_le_bytes(*at.wrapping_add(4 * g).cast::<[u8; 4]>()))
                    };
                    let mut isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w0, word(0));
                    isum = _mm512_dpbusd_epi32(isum, w1, word(1));
                    isum = _mm512_dpbusd_epi32(isum, w2, word(2));
                    isum = _mm512_dpbusd_epi32(isum, w3, word(3));
                    let act = &*a[t];
                    let f = _mm512_sub_ps(
                        _mm512_cvtepi32_ps(isum),
                        _mm512_set1_ps(32.0 * act.bsums[s] as f32),
                    );
                    acc[t] = _mm512_fmadd_ps(f, _mm512_mul_ps(scale, _mm512_set1_ps(act.d)), acc[t]);
                }
            }
        }
        d = d.wrapping_add(TILE * 2);
        sc = sc.wrapping_add(SUBS * TILE);
        q = q.wrapping_add(QS_BLOCK_BYTES);
        a = a.map(|p| p.wrapping_add(1));
    }
    for t in 0..T {
        // SAFETY: `out` has T rows of 16 floats.
        unsafe { _mm512_storeu_ps(out.wrapping_add(t).cast::<f32>(), acc[t]) };
    }
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

    /// Repacking then reading rows back gives ggml's blocks.
    #[test]
    fn rows_read_back_as_ggml_blocks() {
        let (rows, cols) = (32, 512);
        let w = Tensor::from_vec(values(rows * cols, 9), (rows, cols), &Device::Cpu).unwrap();
        let data = QTensor::quantize(&w, GgmlDType::Q6K).unwrap().data().unwrap().to_vec();
        let packed = PackedQ6K::from_ggml(rows, cols, &data).unwrap();
        let all: Vec<u32> = (0..rows as u32).collect();
        assert_eq!(packed.ggml_rows(&all).unwrap(), data);
        assert!(packed.ggml_rows(&[rows as u32]).is_err());
        assert!(PackedQ6K::from_ggml(rows, cols, &data[1..]).is_err());
        assert!(PackedQ6K::from_ggml(rows, 100, &data).is_err());
    }
}
