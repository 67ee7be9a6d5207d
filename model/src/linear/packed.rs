//! Quantized weights repacked into 16-row tiles, and the matmul driver over them.
//!
//! ggml stores each output row as a run of 32-value blocks. Dotting one row at a time
//! leaves each block's partial sums spread over SIMD lanes, so every block then needs
//! a horizontal reduction plus scalar f16 scale conversions. Interleaving 16 rows
//! instead puts one *row* in each 32-bit lane: a broadcast of 4 activation bytes
//! against one vector of weights advances 16 (AVX-512) or 8 (AVX2) row dot products at
//! once, the block sums come out already reduced per row, and the 16 rows' f16 scales
//! convert with a single instruction. The repacked size equals ggml's, so weight
//! bandwidth — what bounds decode — is unchanged.
//!
//! Tile layout (`kb` = blocks per row, every offset a multiple of 64 bytes):
//!
//! ```text
//! d:  [kb][16] f16                      block scales
//! m:  [kb][16] f16                      Q4_1 only: block minimums
//! (zero padding to 64 bytes)
//! qs: [kb][groups][16 rows][4 bytes]    groups = 4 (Q4_*) or 8 (Q8_0)
//! ```
//!
//! For Q4_* group `g` holds a row's packed bytes `4g..4g+4`: low nibbles are block
//! elements `4g..4g+4`, high nibbles elements `16+4g..16+4g+4` (ggml's nibble order).
//! Q8_0 group `g` holds elements `4g..4g+4` stored as `q + 128` (u8), because VNNI's
//! `vpdpbusd` wants one unsigned operand; the offset is removed exactly with the
//! activation block sums.

use std::ops::Range;

use candle_core::quantized::GgmlDType;

use super::act::{quantize_row, ActBlock, QK};
use crate::error::{Error, Result};

pub(crate) const TILE: usize = 16;

/// Token rows a kernel call handles at most: the tile's weights are unpacked once and
/// reused across them.
const MAX_TOKENS: usize = 8;

/// Below this many row·block·token units a matmul runs on the calling thread: a
/// 192×576 decode matvec (3456 units) takes ~2 µs, about what waking the pool and
/// moving the weights between cores' caches cost.
const PARALLEL_MIN_WORK: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl Format {
    pub(crate) fn from_dtype(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            _ => None,
        }
    }

    /// Bytes of one block in ggml's layout.
    fn ggml_block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }

    /// Quant bytes of one row's block.
    pub(crate) fn qs_bytes(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q4_1 => 16,
            Self::Q8_0 => 32,
        }
    }

    fn has_min(self) -> bool {
        self == Self::Q4_1
    }
}

/// SIMD tier, detected once; tests may force a lower one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Level {
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 F/BW/VNNI on top of `Avx2`.
    Avx512Vnni,
}

impl Level {
    pub(crate) fn detect() -> Self {
        static LEVEL: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
        *LEVEL.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                let avx2 = is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c");
                let avx512 = avx2
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni");
                if avx512 {
                    return Level::Avx512Vnni;
                }
                if avx2 {
                    return Level::Avx2;
                }
            }
            Level::Scalar
        })
    }

    /// Every tier this machine can run, best last.
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Self> {
        let best = Self::detect();
        [Self::Scalar, Self::Avx2, Self::Avx512Vnni]
            .into_iter()
            .filter(|l| *l as u8 <= best as u8)
            .collect()
    }
}

/// A 64-byte-aligned chunk, so that tiles (all multiples of 64 bytes) start on cache
/// lines and full-width vector loads never straddle two.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

pub(crate) struct PackedWeights {
    format: Format,
    rows: usize,
    cols: usize,
    /// Blocks per row.
    kb: usize,
    n_tiles: usize,
    /// Byte offset of the qs section inside a tile.
    qs_offset: usize,
    tile_stride: usize,
    buf: Vec<Line>,
}

impl std::fmt::Debug for PackedWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedWeights")
            .field("format", &self.format)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish_non_exhaustive()
    }
}

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

impl PackedWeights {
    /// Repacks `rows × cols` weights given as ggml blocks (`QTensor::data()` bytes).
    pub(crate) fn from_ggml(format: Format, rows: usize, cols: usize, data: &[u8]) -> Result<Self> {
        if cols == 0 || !cols.is_multiple_of(QK) {
            return Err(Error::BadInput(format!(
                "{format:?} weight with {cols} columns: not a positive multiple of {QK}"
            )));
        }
        let kb = cols / QK;
        let bb = format.ggml_block_bytes();
        let expected = rows.checked_mul(kb).and_then(|n| n.checked_mul(bb));
        if expected != Some(data.len()) {
            return Err(Error::BadInput(format!(
                "{format:?} weight {rows}x{cols} should be {expected:?} bytes, got {}",
                data.len()
            )));
        }
        let n_tiles = rows.div_ceil(TILE);
        let scale_sections = if format.has_min() { 2 } else { 1 };
        let qs_offset = round_up(scale_sections * kb * TILE * 2, 64);
        let tile_stride = qs_offset + kb * TILE * format.qs_bytes();
        let total = n_tiles.checked_mul(tile_stride).ok_or_else(|| {
            Error::BadInput(format!("{format:?} weight {rows}x{cols} is too large"))
        })?;
        let mut packed = Self {
            format,
            rows,
            cols,
            kb,
            n_tiles,
            qs_offset,
            tile_stride,
            buf: vec![Line([0; 64]); total / 64],
        };
        let m_offset = kb * TILE * 2;
        let tile_stride = packed.tile_stride;
        let bytes = packed.bytes_mut();
        for (r, row) in data.chunks_exact(kb * bb).enumerate() {
            let tile = (r / TILE) * tile_stride;
            let lane = r % TILE;
            for (b, blk) in row.chunks_exact(bb).enumerate() {
                let d_at = tile + (b * TILE + lane) * 2;
                bytes[d_at..d_at + 2].copy_from_slice(&blk[0..2]);
                let qs = match format {
                    Format::Q4_1 => {
                        let m_at = tile + m_offset + (b * TILE + lane) * 2;
                        bytes[m_at..m_at + 2].copy_from_slice(&blk[2..4]);
                        &blk[4..]
                    }
                    Format::Q4_0 | Format::Q8_0 => &blk[2..],
                };
                let qs_block = tile + qs_offset + b * TILE * format.qs_bytes();
                for (j, &q) in qs.iter().enumerate() {
                    let at = qs_block + (j / 4) * TILE * 4 + lane * 4 + j % 4;
                    bytes[at] = if format == Format::Q8_0 { q ^ 0x80 } else { q };
                }
            }
        }
        // Padding rows of the last tile keep all-zero bytes: d = 0 zeroes their sums,
        // and their outputs are never written out anyway.
        Ok(packed)
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `Line` is a plain `[u8; 64]` whose size equals its alignment, so the
        // Vec's buffer is `len * 64` initialised bytes with no padding.
        unsafe { std::slice::from_raw_parts(self.buf.as_ptr().cast::<u8>(), self.buf.len() * 64) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`; the exclusive borrow of `self` makes the view unique.
        unsafe {
            std::slice::from_raw_parts_mut(self.buf.as_mut_ptr().cast::<u8>(), self.buf.len() * 64)
        }
    }

    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    fn tile(&self, t: usize) -> &[u8] {
        &self.bytes()[t * self.tile_stride..(t + 1) * self.tile_stride]
    }

    /// `y[t][o] = Σ_k x[t][k]·W[o][k] (+ bias[o])` for `x` of `tokens × cols` f32,
    /// returning `tokens × rows`.
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
        if let Some(b) = bias {
            if b.len() != rows {
                return Err(Error::BadInput(format!(
                    "bias has {} values, expected {rows}",
                    b.len()
                )));
            }
        }
        let mut out = vec![0f32; tokens * rows];
        if tokens == 0 || rows == 0 {
            return Ok(out);
        }
        let pool = candle_core::utils::barrier_pool();
        let parallel = rows * kb * tokens >= PARALLEL_MIN_WORK && self.n_tiles > 1;
        let simd = level != Level::Scalar;

        let mut acts = vec![ActBlock::default(); tokens * kb];
        if parallel && tokens >= 4 {
            let acts_out = SharedOut::new(&mut acts);
            pool.execute_chunked(tokens, |range: Range<usize>| {
                for t in range {
                    // SAFETY: every token index is handed to exactly one worker, so the
                    // `kb`-block segments written here are disjoint.
                    let dst = unsafe { acts_out.segment(t * kb, kb) };
                    quantize_row(&x[t * cols..(t + 1) * cols], dst, simd);
                }
            });
        } else {
            for (xs, dst) in x.chunks_exact(cols).zip(acts.chunks_exact_mut(kb)) {
                quantize_row(xs, dst, simd);
            }
        }

        let acts = &acts[..];
        let y = SharedOut::new(&mut out);
        let work = |range: Range<usize>| {
            for tile in range {
                self.tile_all_tokens(level, tile, acts, tokens, &y, bias);
            }
        };
        if parallel {
            pool.execute_chunked(self.n_tiles, work);
        } else {
            work(0..self.n_tiles);
        }
        Ok(out)
    }

    /// All tokens against one tile, writing rows `16·tile..` of every output row.
    fn tile_all_tokens(
        &self,
        level: Level,
        tile: usize,
        acts: &[ActBlock],
        tokens: usize,
        y: &SharedOut<'_, f32>,
        bias: Option<&[f32]>,
    ) {
        let kb = self.kb;
        let row0 = tile * TILE;
        let valid = TILE.min(self.rows - row0);
        let mut t0 = 0;
        while t0 < tokens {
            let n = MAX_TOKENS.min(tokens - t0);
            let mut res = [[0f32; TILE]; MAX_TOKENS];
            let act_rows: [&[ActBlock]; MAX_TOKENS] = std::array::from_fn(|i| {
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
                // SAFETY: this tile owns columns row0..row0+valid of every output row,
                // and each tile is processed by exactly one worker.
                let dst = unsafe { y.segment((t0 + i) * self.rows + row0, valid) };
                dst.copy_from_slice(&r[..valid]);
            }
            t0 += n;
        }
    }

    /// Dot products of tile `tile` against `acts.len()` (1..=MAX_TOKENS) activation rows.
    fn tile_dot(&self, level: Level, tile: usize, acts: &[&[ActBlock]], out: &mut [[f32; TILE]]) {
        let tile_bytes = self.tile(tile);
        // The SIMD kernels' safety rests on this: never run a tier above the detected one.
        assert!(
            level as u8 <= Level::detect() as u8,
            "{level:?} is not supported here"
        );
        assert!(acts.len() == out.len() && !acts.is_empty() && acts.len() <= MAX_TOKENS);
        assert!(acts.iter().all(|a| a.len() == self.kb));
        #[cfg(target_arch = "x86_64")]
        if level != Level::Scalar {
            // SAFETY: `level` is at most the detected tier (asserted above), so the
            // kernel's target features are present; the tile and activation bounds
            // are checked inside.
            unsafe {
                super::x86::tile_dot(
                    level,
                    self.format,
                    tile_bytes,
                    self.kb,
                    self.qs_offset,
                    acts,
                    out,
                );
            }
            return;
        }
        let _ = level;
        for (a, o) in acts.iter().zip(out.iter_mut()) {
            tile_dot_scalar(self.format, tile_bytes, self.kb, self.qs_offset, a, o);
        }
    }
}

/// Portable kernel over the same tile layout (one activation row).
///
/// The integer arithmetic is `wrapping_*` only to keep dev-profile overflow checks out
/// of the inner loop; the sums are bounded far below `i32::MAX`.
fn tile_dot_scalar(
    format: Format,
    tile: &[u8],
    kb: usize,
    qs_offset: usize,
    act: &[ActBlock],
    out: &mut [f32; TILE],
) {
    let qsb = format.qs_bytes();
    let (scales, rest) = tile.split_at(qs_offset);
    let (d_sec, m_sec) = scales.split_at(kb * TILE * 2);
    let mut acc = [0f32; TILE];
    for (b, (a, qs)) in act.iter().zip(rest.chunks_exact(TILE * qsb)).enumerate() {
        let mut isum = [0i32; TILE];
        for (g, group) in qs.chunks_exact(TILE * 4).enumerate() {
            let y = |k: usize| a.qs[k] as i32;
            match format {
                Format::Q4_0 | Format::Q4_1 => {
                    let lo = [y(4 * g), y(4 * g + 1), y(4 * g + 2), y(4 * g + 3)];
                    let hi = [y(16 + 4 * g), y(17 + 4 * g), y(18 + 4 * g), y(19 + 4 * g)];
                    for (s, w) in isum.iter_mut().zip(group.chunks_exact(4)) {
                        let mut t = 0i32;
                        for j in 0..4 {
                            t = t
                                .wrapping_add(((w[j] & 0x0F) as i32).wrapping_mul(lo[j]))
                                .wrapping_add(((w[j] >> 4) as i32).wrapping_mul(hi[j]));
                        }
                        *s = s.wrapping_add(t);
                    }
                }
                Format::Q8_0 => {
                    let ys = [y(4 * g), y(4 * g + 1), y(4 * g + 2), y(4 * g + 3)];
                    for (s, w) in isum.iter_mut().zip(group.chunks_exact(4)) {
                        let mut t = 0i32;
                        for j in 0..4 {
                            t = t.wrapping_add(((w[j] ^ 0x80) as i8 as i32).wrapping_mul(ys[j]));
                        }
                        *s = s.wrapping_add(t);
                    }
                }
            }
        }
        let f16_at = |sec: &[u8], r: usize| {
            let at = (b * TILE + r) * 2;
            half::f16::from_le_bytes([sec[at], sec[at + 1]]).to_f32()
        };
        for (r, (acc_r, &s)) in acc.iter_mut().zip(&isum).enumerate() {
            let s = if format == Format::Q4_0 {
                s.wrapping_sub(8 * a.sum)
            } else {
                s
            };
            if format == Format::Q4_1 {
                // candle's exact order (see `x86::q4_avx512`).
                *acc_r += s as f32 * f16_at(d_sec, r) * a.d + f16_at(m_sec, r) * a.s;
            } else {
                *acc_r += s as f32 * (f16_at(d_sec, r) * a.d);
            }
        }
    }
    *out = acc;
}

/// A mutable buffer that pool workers fill in disjoint segments.
///
/// `execute_chunked` hands out index ranges dynamically, so the disjoint `&mut` pieces
/// cannot be split off up front; each worker instead carves its own from this.
pub(crate) struct SharedOut<'a, T> {
    ptr: *mut T,
    len: usize,
    /// Holds the exclusive borrow of the buffer for as long as segments can be made.
    _buf: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: access goes through `segment`, whose callers guarantee disjointness, so
// sharing the pointer between threads only ever moves `T` values (hence `T: Send`).
unsafe impl<T: Send> Sync for SharedOut<'_, T> {}

impl<'a, T> SharedOut<'a, T> {
    pub(crate) fn new(buf: &'a mut [T]) -> Self {
        Self {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _buf: std::marker::PhantomData,
        }
    }

    /// # Safety
    /// No other live reference may overlap `start..start + len` while the returned
    /// slice lives.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn segment(&self, start: usize, len: usize) -> &mut [T] {
        assert!(
            start <= self.len && len <= self.len - start,
            "segment out of bounds"
        );
        // SAFETY: in bounds (asserted); exclusivity is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}
