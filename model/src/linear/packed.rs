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
//! h:  [kb][8] u64                       Q5_0 only: the fifth bits, as byte masks
//! (zero padding to 64 bytes)
//! qs: [kb][groups][16 rows][4 bytes]    groups = 4 (Q4_*, Q5_0) or 8 (Q8_0)
//! ```
//!
//! For Q4_* and Q5_0 group `g` holds a row's packed bytes `4g..4g+4`: low nibbles are
//! block elements `4g..4g+4`, high nibbles elements `16+4g..16+4g+4` (ggml's nibble
//! order). Q5_0's fifth bits (ggml's `qh`, bit `j` for element `j`) are regrouped so
//! that mask `s` of a block covers the bytes of one unpacked weight vector: its bit
//! `4·row + k` is bit `4s + k` of that row's `qh` (s < 4: the low nibbles of group s,
//! s ≥ 4: the high nibbles of group s − 4). An AVX-512 kernel adds the fifth bit with
//! one masked byte add; the size is still ggml's (4 bytes per row and block).
//! Q8_0 group `g` holds elements `4g..4g+4` stored as `q + 128` (u8), because VNNI's
//! `vpdpbusd` wants one unsigned operand; the offset is removed exactly, per 4-element
//! group, with the activations' `GroupOffsets` (Q4_0's +8 likewise). Q4_0/Q8_0 need
//! each group's sum separately anyway: candle's AVX2 dot products, which we reproduce
//! bit for bit, keep one float accumulator per group (see `x86.rs`).

use std::mem::MaybeUninit;
use std::ops::Range;

use candle_core::quantized::GgmlDType;

use super::act::{group_offsets, quantize_row, ActBlock, GroupOffsets, GROUPS, QK};
use super::lines::Lines;
use crate::cpu_buffer::{write_slice, written, SharedOut};
use crate::error::{Error, Result};

pub(crate) const TILE: usize = 16;

/// Token rows a kernel call handles at most: the tile's weights are unpacked once and
/// reused across them (the kernels take them a few at a time). AVX2 Q5_0 unpacks the
/// tile once per call (see `x86::q5_0_avx2_unpacked`), so it takes this many; the
/// others take `CALL_TOKENS`.
const MAX_TOKENS: usize = 128;

/// Token rows of a kernel call but AVX2 Q5_0's. At `MAX_TOKENS` SmolLM2's Q4_1
/// prefill was 1% slower (4 of 6 alternating pairs, AVX2, 2026-12-07), while Gemma 3's
/// Q5_0 prefill was 3% faster with its tiles unpacked a quarter as often (6 of 6).
const CALL_TOKENS: usize = 32;

/// Token rows up to which a call builds its row lists at this length, not
/// `MAX_TOKENS` (see `PackedWeights::matmul`).
const FEW_TOKENS: usize = 4;

/// Below this many row·block·token units a matmul runs on the calling thread: a
/// 192×576 decode matvec (3456 units) takes ~2 µs, about what waking the pool and
/// moving the weights between cores' caches cost.
const PARALLEL_MIN_WORK: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    Q4_0,
    Q4_1,
    Q5_0,
    Q8_0,
}

impl Format {
    pub(crate) fn dtype(self) -> GgmlDType {
        match self {
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q5_0 => GgmlDType::Q5_0,
            Self::Q8_0 => GgmlDType::Q8_0,
        }
    }

    pub(crate) fn from_dtype(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q5_0 => Some(Self::Q5_0),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            _ => None,
        }
    }

    /// Bytes of one block in ggml's layout.
    fn ggml_block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q8_0 => 34,
        }
    }

    /// Quant bytes of one row's block.
    pub(crate) fn qs_bytes(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 => 16,
            Self::Q8_0 => 32,
        }
    }

    /// Bytes per row and block of the section between the scales and the quants:
    /// Q4_1's minimums (f16) or Q5_0's fifth-bit masks.
    pub(crate) fn side_bytes(self) -> usize {
        match self {
            Self::Q4_1 => 2,
            Self::Q5_0 => 4,
            Self::Q4_0 | Self::Q8_0 => 0,
        }
    }

    /// The offset the SIMD kernels see on stored weights (Q8_0 kept as `q + 128` for
    /// `vpdpbusd`'s unsigned operand, Q4_0 nibbles being `q + 8`), removed exactly with
    /// `GroupOffsets`. `None`: the kernels need none.
    fn group_offset(self) -> Option<i32> {
        match self {
            Self::Q4_0 => Some(8),
            Self::Q8_0 => Some(128),
            // Q5_0's `q + 16` needs one offset per block, `-16·Σy`: `ActBlock::sum`.
            Self::Q4_1 | Self::Q5_0 => None,
        }
    }
}

/// Whether candle 0.11.1's `QMatMul` sends an f32 matmul by this `rows × cols` weight
/// to its repacked x86 kernels (`repack_x86::select` with `repack_x86::level()`): for
/// Q8_0 it does on AVX-512 VNNI or AVX-VNNI machines when `cols` is a multiple of 256
/// and `rows` of 16. Those kernels use Q8_K activations and another order, which these
/// 32-value tiles do not reproduce: such weights go to `kquant.rs` (which does) or stay
/// on candle. Q4_0/Q4_1 never go there.
pub(crate) fn candle_repacks(format: Format, rows: usize, cols: usize) -> bool {
    if format != Format::Q8_0 || cols == 0 || !cols.is_multiple_of(256) || !rows.is_multiple_of(16)
    {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // candle's `repack_x86::level()`, environment overrides included; Q8_0 is
        // repacked at its VNNI levels only (plain AVX2 `maddubs` would overflow).
        let env_is_1 = |name: &str| std::env::var(name).as_deref() == Ok("1");
        let force_avx2 = env_is_1("MISTRALRS_FORCE_AVX2");
        let force_vnni = env_is_1("MISTRALRS_FORCE_AVXVNNI");
        let avx512_vnni = !force_avx2
            && !force_vnni
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vnni");
        let avx_vnni = !force_avx2
            && (force_vnni || is_x86_feature_detected!("avxvnni"))
            && is_x86_feature_detected!("avx2");
        avx512_vnni || avx_vnni
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether candle 0.11.1 runs its AVX2 Q4_0/Q8_0 dot products on this machine (its
/// `has_avx2_fma()`: AVX2 and FMA, F16C not required); otherwise it runs
/// `vec_dot_unopt`. The two sum in different orders, and the scalar kernel must
/// reproduce whichever candle uses.
pub(crate) fn candle_uses_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
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
pub(crate) struct Line(pub(crate) [u8; 64]);

impl Line {
    pub(crate) fn bytes(buf: &[Line]) -> &[u8] {
        // SAFETY: `Line` is a plain `[u8; 64]` whose size equals its alignment, so the
        // buffer is `len * 64` initialised bytes with no padding.
        unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), buf.len() * 64) }
    }

    pub(crate) fn bytes_mut(buf: &mut [Line]) -> &mut [u8] {
        // SAFETY: as in `bytes`; the exclusive borrow makes the view unique.
        unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), buf.len() * 64) }
    }
}

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
    buf: Lines,
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

/// Checks that `data` holds exactly `rows` rows of `row_bytes` (a whole tensor).
pub(crate) fn check_whole(what: &str, rows: usize, row_bytes: usize, data: &[u8]) -> Result<()> {
    if rows.checked_mul(row_bytes) != Some(data.len()) {
        return Err(Error::BadInput(format!(
            "{what} should be {} bytes, got {}",
            rows.saturating_mul(row_bytes),
            data.len()
        )));
    }
    Ok(())
}

pub(crate) fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

impl PackedWeights {
    /// Repacks `rows × cols` weights given as ggml blocks (`QTensor::data()` bytes).
    #[cfg(test)]
    pub(crate) fn from_ggml(format: Format, rows: usize, cols: usize, data: &[u8]) -> Result<Self> {
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
    pub(crate) fn zeroed(format: Format, rows: usize, cols: usize) -> Result<Self> {
        if cols == 0 || !cols.is_multiple_of(QK) {
            return Err(Error::BadInput(format!(
                "{format:?} weight with {cols} columns: not a positive multiple of {QK}"
            )));
        }
        let kb = cols / QK;
        let n_tiles = rows.div_ceil(TILE);
        let qs_offset = round_up(kb * TILE * (2 + format.side_bytes()), 64);
        let tile_stride = qs_offset + kb * TILE * format.qs_bytes();
        let total = n_tiles.checked_mul(tile_stride).ok_or_else(|| {
            Error::BadInput(format!("{format:?} weight {rows}x{cols} is too large"))
        })?;
        // Padding rows of the last tile keep all-zero bytes: d = 0 zeroes their sums,
        // and their outputs are never written out anyway.
        Ok(Self {
            format,
            rows,
            cols,
            kb,
            n_tiles,
            qs_offset,
            tile_stride,
            buf: Lines::zeroed(total / 64),
        })
    }

    /// Packs whole rows from `first` on, given as ggml blocks (a load streams a tensor
    /// through here a few rows at a time, so it is never held twice).
    pub(crate) fn fill_rows(&mut self, first: usize, data: &[u8]) -> Result<()> {
        let (format, kb, qs_offset, tile_stride) = (self.format, self.kb, self.qs_offset, self.tile_stride);
        let bb = format.ggml_block_bytes();
        let row_bytes = self.ggml_row_bytes();
        if !data.len().is_multiple_of(row_bytes) || first + data.len() / row_bytes > self.rows {
            return Err(Error::BadInput(format!(
                "{} bytes from row {first} are not whole rows of a {format:?} weight with {} rows",
                data.len(),
                self.rows
            )));
        }
        let side = kb * TILE * 2;
        let bytes = self.bytes_mut();
        for (r, row) in data.chunks_exact(row_bytes).enumerate() {
            let r = first + r;
            let tile = (r / TILE) * tile_stride;
            let lane = r % TILE;
            for (b, blk) in row.chunks_exact(bb).enumerate() {
                let d_at = tile + (b * TILE + lane) * 2;
                bytes[d_at..d_at + 2].copy_from_slice(&blk[0..2]);
                let qs = match format {
                    Format::Q4_1 => {
                        let m_at = tile + side + (b * TILE + lane) * 2;
                        bytes[m_at..m_at + 2].copy_from_slice(&blk[2..4]);
                        &blk[4..]
                    }
                    Format::Q5_0 => {
                        let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                        let masks = tile + side + b * TILE * 4;
                        for bit in 0..32 {
                            if qh >> bit & 1 == 1 {
                                let (s, k) = (bit / 4, bit % 4);
                                let at = 4 * lane + k;
                                bytes[masks + s * 8 + at / 8] |= 1 << (at % 8);
                            }
                        }
                        &blk[6..]
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
        Ok(())
    }

    /// The ggml block bytes of `rows`, one after another: the inverse of
    /// [`Self::from_ggml`], so a tied head can also serve embedding lookups.
    pub(crate) fn ggml_rows(&self, rows: &[u32]) -> Result<Vec<u8>> {
        let bb = self.format.ggml_block_bytes();
        let qsb = self.format.qs_bytes();
        let side = self.kb * TILE * 2;
        let bytes = self.bytes();
        let mut out = Vec::with_capacity(rows.len() * self.kb * bb);
        for &r in rows {
            let r = r as usize;
            if r >= self.rows {
                return Err(Error::BadInput(format!("row {r} is out of range for {} rows", self.rows)));
            }
            let tile = (r / TILE) * self.tile_stride;
            let lane = r % TILE;
            for b in 0..self.kb {
                let d_at = tile + (b * TILE + lane) * 2;
                out.extend_from_slice(&bytes[d_at..d_at + 2]);
                match self.format {
                    Format::Q4_1 => {
                        let m_at = tile + side + (b * TILE + lane) * 2;
                        out.extend_from_slice(&bytes[m_at..m_at + 2]);
                    }
                    Format::Q5_0 => {
                        let masks = tile + side + b * TILE * 4;
                        let mut qh = 0u32;
                        for bit in 0..32 {
                            let (s, k) = (bit / 4, bit % 4);
                            let at = 4 * lane + k;
                            if bytes[masks + s * 8 + at / 8] >> (at % 8) & 1 == 1 {
                                qh |= 1 << bit;
                            }
                        }
                        out.extend_from_slice(&qh.to_le_bytes());
                    }
                    Format::Q4_0 | Format::Q8_0 => {}
                }
                let qs_block = tile + self.qs_offset + b * TILE * qsb;
                for j in 0..qsb {
                    let q = bytes[qs_block + (j / 4) * TILE * 4 + lane * 4 + j % 4];
                    out.push(if self.format == Format::Q8_0 { q ^ 0x80 } else { q });
                }
            }
        }
        Ok(out)
    }

    pub(crate) fn format(&self) -> Format {
        self.format
    }

    fn bytes(&self) -> &[u8] {
        Line::bytes(&self.buf)
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        Line::bytes_mut(&mut self.buf)
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
        if tokens == 0 || rows == 0 {
            return Ok(Vec::new());
        }
        let pool = crate::compute_pool::compute_pool();
        let parallel = rows * kb * tokens >= PARALLEL_MIN_WORK && self.n_tiles > 1;
        let simd = level != Level::Scalar;

        // Group offsets only feed the SIMD Q4_0/Q8_0 kernels; the scalar one works on
        // the signed values directly.
        let offset = self.format.group_offset().filter(|_| simd);
        let mut acts = vec![ActBlock::default(); tokens * kb];
        let mut offs =
            vec![GroupOffsets::default(); if offset.is_some() { tokens * kb } else { 0 }];
        let quantize = |xs: &[f32], dst: &mut [ActBlock], off: &mut [GroupOffsets]| {
            quantize_row(xs, dst, simd);
            if let Some(mul) = offset {
                group_offsets(dst, mul, off);
            }
        };
        if parallel && tokens >= 4 {
            let acts_out = SharedOut::new(&mut acts);
            let offs_len = offs.len();
            let offs_out = SharedOut::new(&mut offs);
            pool.run_chunks(tokens, |range: Range<usize>| {
                for t in range {
                    // SAFETY: every token index is handed to exactly one worker, so the
                    // `kb`-block segments written here are disjoint (and empty offset
                    // segments when there are no offsets).
                    let (dst, off) = unsafe {
                        (
                            acts_out.segment(t * kb, kb),
                            if offs_len == 0 {
                                offs_out.segment(0, 0)
                            } else {
                                offs_out.segment(t * kb, kb)
                            },
                        )
                    };
                    quantize(&x[t * cols..(t + 1) * cols], dst, off);
                }
            });
        } else {
            for (t, (xs, dst)) in x
                .chunks_exact(cols)
                .zip(acts.chunks_exact_mut(kb))
                .enumerate()
            {
                let off = if offs.is_empty() {
                    &mut [][..]
                } else {
                    &mut offs[t * kb..(t + 1) * kb]
                };
                quantize(xs, dst, off);
            }
        }

        // `offs` is empty or, like `acts`, `tokens × kb` blocks.
        let (acts, offs) = (&acts[..], &offs[..]);
        let per_call = if level == Level::Avx2 && self.format == Format::Q5_0 { MAX_TOKENS } else { CALL_TOKENS };
        let products = |out: &SharedOut<'_, MaybeUninit<f32>>| {
            for_each_tile(rows, tokens, per_call, bias, parallel, out, |tile, ts, res| {
                // A decode step's few rows fill a short array: with lists of all
                // MAX_TOKENS slices built for every tile, Gemma 3's decode step was
                // a few percent slower (7 of 8 alternating pairs, AVX2, 2026-12-07).
                if ts.len() <= FEW_TOKENS {
                    self.dot_rows::<FEW_TOKENS>(level, tile, ts, acts, offs, res);
                } else if ts.len() <= CALL_TOKENS {
                    self.dot_rows::<CALL_TOKENS>(level, tile, ts, acts, offs, res);
                } else {
                    self.dot_rows::<MAX_TOKENS>(level, tile, ts, acts, offs, res);
                }
            });
        };
        // SAFETY: `for_each_tile` writes all `tokens × rows` outputs.
        Ok(unsafe { written(tokens * rows, products) })
    }

    /// `tile_dot` for token rows `ts` (at most `N`) of `acts` and `offs` (each
    /// `tokens × kb` blocks; `offs` empty where the format has none).
    fn dot_rows<const N: usize>(
        &self,
        level: Level,
        tile: usize,
        ts: Range<usize>,
        acts: &[ActBlock],
        offs: &[GroupOffsets],
        res: &mut [[f32; TILE]],
    ) {
        let kb = self.kb;
        let act_rows: [&[ActBlock]; N] = std::array::from_fn(|i| {
            if i < ts.len() {
                &acts[(ts.start + i) * kb..(ts.start + i + 1) * kb]
            } else {
                &[][..]
            }
        });
        let off_rows: [&[GroupOffsets]; N] = std::array::from_fn(|i| {
            if i < ts.len() && !offs.is_empty() {
                &offs[(ts.start + i) * kb..(ts.start + i + 1) * kb]
            } else {
                &[][..]
            }
        });
        let off_rows = if offs.is_empty() { &[][..] } else { &off_rows[..ts.len()] };
        self.tile_dot(level, tile, &act_rows[..ts.len()], off_rows, res);
    }

    /// Dot products of tile `tile` against `acts.len()` (1..=MAX_TOKENS) activation rows;
    /// `offs` holds their group offsets where the SIMD kernels need them.
    fn tile_dot(
        &self,
        level: Level,
        tile: usize,
        acts: &[&[ActBlock]],
        offs: &[&[GroupOffsets]],
        out: &mut [[f32; TILE]],
    ) {
        let tile_bytes = self.tile(tile);
        // The SIMD kernels' safety rests on this: never run a tier above the detected one.
        assert!(
            level as u8 <= Level::detect() as u8,
            "{level:?} is not supported here"
        );
        assert!(acts.len() == out.len() && !acts.is_empty() && acts.len() <= MAX_TOKENS);
        assert!(acts.iter().all(|a| a.len() == self.kb));
        #[cfg(target_arch = "x86_64")]
        if super::x86::has_kernel(level) {
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
                    offs,
                    out,
                );
            }
            return;
        }
        let _ = (level, offs);
        let candle_avx2 = candle_uses_avx2();
        for (a, o) in acts.iter().zip(out.iter_mut()) {
            tile_dot_scalar(
                self.format,
                tile_bytes,
                self.kb,
                self.qs_offset,
                a,
                candle_avx2,
                o,
            );
        }
    }
}

/// Runs `dot(tile, token rows, results)` for every 16-row tile and every run of at most
/// `max_tokens` (≤ [`MAX_TOKENS`]) token rows, adds the bias and writes the results
/// into `y` (`tokens × rows`, every value), tiles spread over the compute pool when
/// `parallel`.
/// The driver every tile format shares.
pub(crate) fn for_each_tile(
    rows: usize,
    tokens: usize,
    max_tokens: usize,
    bias: Option<&[f32]>,
    parallel: bool,
    y: &SharedOut<'_, MaybeUninit<f32>>,
    dot: impl Fn(usize, Range<usize>, &mut [[f32; TILE]]) + Sync,
) {
    assert!((1..=MAX_TOKENS).contains(&max_tokens) && y.len() == rows * tokens);
    let n_tiles = rows.div_ceil(TILE);
    let work = |range: Range<usize>| {
        // Zeroed once per worker, not per run: every kernel stores whole result rows.
        // (Zeroing it per run and copying rows out with a slice copy were two calls to
        // glibc per run, 5% of a Gemma 3 prefill.)
        let mut res = [[0f32; TILE]; MAX_TOKENS];
        for tile in range {
            let row0 = tile * TILE;
            let valid = TILE.min(rows - row0);
            for t0 in (0..tokens).step_by(max_tokens) {
                let n = max_tokens.min(tokens - t0);
                dot(tile, t0..t0 + n, &mut res[..n]);
                for (i, r) in res[..n].iter_mut().enumerate() {
                    if let Some(b) = bias {
                        for (v, bv) in r.iter_mut().zip(&b[row0..row0 + valid]) {
                            *v += bv;
                        }
                    }
                    // SAFETY: this tile owns columns row0..row0+valid of every output
                    // row, and each tile goes to exactly one worker.
                    let dst = unsafe { y.segment((t0 + i) * rows + row0, valid) };
                    match <&mut [MaybeUninit<f32>; TILE]>::try_from(&mut *dst) {
                        // A whole tile's row: a fixed-size copy, two vector moves.
                        Ok(whole) => {
                            for (d, &v) in whole.iter_mut().zip(r.iter()) {
                                d.write(v);
                            }
                        }
                        Err(_) => write_slice(dst, &r[..valid]),
                    }
                }
            }
        }
    };
    crate::parallel::run_chunks(n_tiles, parallel, work);
}

/// candle's AVX2 horizontal sum (`hsum_float_8`): 128-bit halves added lane-wise, then
/// `movehl`, then `movehdup`, i.e. `((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7))`.
#[inline]
pub(crate) fn candle_hsum8(a: &[f32; GROUPS]) -> f32 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

/// Portable kernel over the same tile layout (one activation row), reproducing
/// candle's float order bit for bit: for Q4_1 its scalar `vec_dot_unopt`
/// (`sum += isum·d_w·d_y + m_w·s_y`); for Q4_0/Q8_0 either its AVX2 dot product (one
/// FMA chain per 4-element group, `acc_g = fma(d_w·d_y, f32(isum_g), acc_g)`, then
/// `candle_hsum8`) when `candle_avx2`, else `vec_dot_unopt` (`sum += isum·d_w·d_y`).
/// See `candle_uses_avx2`.
///
/// The integer arithmetic is `wrapping_*` only to keep dev-profile overflow checks out
/// of the inner loop; the sums are bounded far below `i32::MAX`.
fn tile_dot_scalar(
    format: Format,
    tile: &[u8],
    kb: usize,
    qs_offset: usize,
    act: &[ActBlock],
    candle_avx2: bool,
    out: &mut [f32; TILE],
) {
    let qsb = format.qs_bytes();
    let (scales, rest) = tile.split_at(qs_offset);
    let (d_sec, m_sec) = scales.split_at(kb * TILE * 2);
    let per_group = matches!(format, Format::Q4_0 | Format::Q8_0) && candle_avx2;
    // Q4_0's nibbles are q + 8, Q5_0's 5-bit values q + 16.
    let bias = match format {
        Format::Q4_0 => 8,
        Format::Q5_0 => 16,
        Format::Q4_1 | Format::Q8_0 => 0,
    };
    let mut acc = [0f32; TILE];
    let mut group_acc = [[0f32; GROUPS]; TILE];
    for (b, (a, qs)) in act.iter().zip(rest.chunks_exact(TILE * qsb)).enumerate() {
        // Exact per-row, per-group integer sums; group g always pairs with activation
        // elements 4g..4g+4 (for Q4 the high nibbles of packed group g are elements
        // 16+4g.., i.e. group 4+g).
        let mut isum = [[0i32; GROUPS]; TILE];
        // Q5_0's fifth bit of byte `k` of row `lane` in unpacked vector `s` (see the
        // tile layout), as the value 16 it adds.
        let fifth = |s: usize, lane: usize, k: usize| {
            if format != Format::Q5_0 {
                return 0;
            }
            let at = 4 * lane + k;
            (((m_sec[b * TILE * 4 + s * 8 + at / 8] >> (at % 8)) & 1) as i32) << 4
        };
        for (g, group) in qs.chunks_exact(TILE * 4).enumerate() {
            let y = |k: usize| a.qs[k] as i32;
            for (lane, (s, w)) in isum.iter_mut().zip(group.chunks_exact(4)).enumerate() {
                for (j, &wj) in w.iter().enumerate() {
                    match format {
                        Format::Q4_0 | Format::Q4_1 | Format::Q5_0 => {
                            let lo = ((wj & 0x0F) as i32 | fifth(g, lane, j)).wrapping_sub(bias);
                            let hi = ((wj >> 4) as i32 | fifth(4 + g, lane, j)).wrapping_sub(bias);
                            s[g] = s[g].wrapping_add(lo.wrapping_mul(y(4 * g + j)));
                            s[4 + g] = s[4 + g].wrapping_add(hi.wrapping_mul(y(16 + 4 * g + j)));
                        }
                        Format::Q8_0 => {
                            let v = (wj ^ 0x80) as i8 as i32;
                            s[g] = s[g].wrapping_add(v.wrapping_mul(y(4 * g + j)));
                        }
                    }
                }
            }
        }
        let f16_at = |sec: &[u8], r: usize| {
            let at = (b * TILE + r) * 2;
            half::f16::from_le_bytes([sec[at], sec[at + 1]]).to_f32()
        };
        for (r, (s, (acc_r, gacc))) in isum
            .iter()
            .zip(acc.iter_mut().zip(group_acc.iter_mut()))
            .enumerate()
        {
            let dw = f16_at(d_sec, r);
            if per_group {
                let d = dw * a.d;
                for (ga, &sg) in gacc.iter_mut().zip(s) {
                    *ga = d.mul_add(sg as f32, *ga);
                }
                continue;
            }
            let total = s.iter().fold(0i32, |t, &v| t.wrapping_add(v));
            if format == Format::Q4_1 {
                *acc_r += total as f32 * dw * a.d + f16_at(m_sec, r) * a.s;
            } else {
                *acc_r += total as f32 * dw * a.d;
            }
        }
    }
    if per_group {
        for (o, g) in out.iter_mut().zip(&group_acc) {
            *o = candle_hsum8(g);
        }
    } else {
        *out = acc;
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::k_quants::{BlockQ4_0, BlockQ5_0, BlockQ8_0};
    use candle_core::quantized::{GgmlType, QTensor};
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::linear::act::quantize_row_scalar;

    /// The scalar kernel's other order: where candle has no AVX2+FMA it runs
    /// `vec_dot_unopt`, which this machine's `QMatMul` never shows, so compare with
    /// that very function on candle's own blocks.
    fn check_unopt<B: GgmlType<VecDotType = BlockQ8_0>>(
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
    ) {
        let kb = cols / QK;
        let mut seed = 0x1234_5678_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let w: Vec<f32> = (0..rows * cols).map(|_| next()).collect();
        let x: Vec<f32> = (0..cols).map(|_| next() * 3.0).collect();

        let mut w_blocks = vec![B::zeros(); rows * kb];
        B::from_float(&w, &mut w_blocks);
        let mut x_blocks = vec![BlockQ8_0::zeros(); kb];
        BlockQ8_0::from_float(&x, &mut x_blocks);

        let wt = Tensor::from_slice(&w, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&wt, dtype).unwrap();
        let format = Format::from_dtype(dtype).unwrap();
        let packed = PackedWeights::from_ggml(format, rows, cols, &q.data().unwrap()).unwrap();
        let mut acts = vec![ActBlock::default(); kb];
        quantize_row_scalar(&x, &mut acts);

        for tile in 0..packed.n_tiles {
            let mut got = [0f32; TILE];
            tile_dot_scalar(
                format,
                packed.tile(tile),
                kb,
                packed.qs_offset,
                &acts,
                false,
                &mut got,
            );
            for (lane, g) in got.iter().enumerate().take(rows - tile * TILE) {
                let r = tile * TILE + lane;
                let want = B::vec_dot_unopt(cols, &w_blocks[r * kb..(r + 1) * kb], &x_blocks);
                assert_eq!(
                    g.to_bits(),
                    want.to_bits(),
                    "{dtype:?} row {r}: {g} vs {want}"
                );
            }
        }
    }

    #[test]
    fn scalar_reproduces_candle_unopt() {
        check_unopt::<BlockQ8_0>(GgmlDType::Q8_0, 100, 576);
        check_unopt::<BlockQ4_0>(GgmlDType::Q4_0, 100, 576);
        check_unopt::<BlockQ5_0>(GgmlDType::Q5_0, 100, 640);
    }

    /// The fifth-bit masks hold exactly ggml's `qh`: repacking and reading rows back
    /// gives the original blocks.
    #[test]
    fn q5_0_rows_read_back_as_ggml_blocks() {
        let (rows, cols) = (37, 96);
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919) % 61) as f32 / 30.0 - 1.0).collect();
        let wt = Tensor::from_slice(&w, (rows, cols), &Device::Cpu).unwrap();
        let data = QTensor::quantize(&wt, GgmlDType::Q5_0).unwrap().data().unwrap().to_vec();
        let packed = PackedWeights::from_ggml(Format::Q5_0, rows, cols, &data).unwrap();
        let all: Vec<u32> = (0..rows as u32).collect();
        assert_eq!(packed.ggml_rows(&all).unwrap(), data);
    }
}
