//! x86-64 tile kernels (see `packed.rs` for the tile layout).
//!
//! AVX-512 VNNI: one `vpdpbusd` multiplies 4 weight bytes by 4 activation bytes in each
//! of 16 lanes (= the tile's 16 rows) and accumulates into i32, so a 32-value block is
//! 8 instructions per 16 rows; Q4 nibbles are already unsigned and Q8_0 weights are
//! stored +128 for it. AVX2: `vpmaddubsw` + `vpmaddwd` do the same on 8 rows per
//! 256-bit vector, processing a tile as two halves. For Q4 all eight i16 partial sums
//! of a block fit without overflow (8 · 2 · 15 · 128 < 2¹⁵), so one `vpmaddwd` per
//! block finishes them; Q8_0 needs the sign trick (|w| · sign(y, w)) and a `vpmaddwd`
//! per group because its i16 pair sums can reach 2 · 128 · 127.
//!
//! Per block the integer sums are exact; the float epilogue is
//! `acc += f32(isum) · (d_w · d_y)` (+ `m_w · s_y` accumulated separately for Q4_1).

// The kernels index several per-token arrays (accumulators, activation pointers) in
// lockstep, which reads better as `for t in 0..T` than as zipped iterators.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::act::ActBlock;
use super::packed::{Format, Level, TILE};

/// Tokens per AVX2 kernel call: 16 ymm registers hold 8 unpacked weight vectors and
/// at most 2·4 accumulators.
const AVX2_MAX_TOKENS: usize = 4;
const AVX512_MAX_TOKENS: usize = 8;

const Q4_0: u8 = 0;
const Q4_1: u8 = 1;

/// Dots one packed tile against `acts.len()` activation rows.
///
/// # Safety
/// The CPU must support `level`'s features (AVX2+FMA+F16C, plus AVX-512 F/BW/VNNI for
/// `Avx512Vnni`). Everything else is checked here.
pub(crate) unsafe fn tile_dot(
    level: Level,
    format: Format,
    tile: &[u8],
    kb: usize,
    qs_offset: usize,
    acts: &[&[ActBlock]],
    out: &mut [[f32; TILE]],
) {
    // The kernels read through raw pointers with aligned loads; these make every
    // access in range and aligned (the packer lays tiles out on 64-byte boundaries).
    assert!((tile.as_ptr() as usize).is_multiple_of(64) && qs_offset.is_multiple_of(64));
    let scale_bytes = if format == Format::Q4_1 {
        2 * kb * TILE * 2
    } else {
        kb * TILE * 2
    };
    assert!(qs_offset >= scale_bytes);
    assert!(tile.len() >= qs_offset + kb * TILE * format.qs_bytes());
    assert!(acts.iter().all(|a| a.len() >= kb));
    assert_eq!(acts.len(), out.len());

    let max = if level == Level::Avx512Vnni {
        AVX512_MAX_TOKENS
    } else {
        AVX2_MAX_TOKENS
    };
    for (a, o) in acts.chunks(max).zip(out.chunks_mut(max)) {
        // SAFETY: forwarded contract (CPU features) plus the bounds asserted above.
        unsafe {
            match a.len() {
                1 => run::<1>(level, format, tile.as_ptr(), kb, qs_offset, a, o),
                2 => run::<2>(level, format, tile.as_ptr(), kb, qs_offset, a, o),
                3 => run::<3>(level, format, tile.as_ptr(), kb, qs_offset, a, o),
                4 => run::<4>(level, format, tile.as_ptr(), kb, qs_offset, a, o),
                5 => run::<5>(level, format, tile.as_ptr(), kb, qs_offset, a, o),
                6 => run::<6>(level, format, tile.as_ptr(), kb, qs_offset, a, o),
                7 => run::<7>(level, format, tile.as_ptr(), kb, qs_offset, a, o),
                8 => run::<8>(level, format, tile.as_ptr(), kb, qs_offset, a, o),
                _ => unreachable!("chunks are 1..=8 long"),
            }
        }
    }
}

/// # Safety
/// As `tile_dot`, with its bounds already checked and `acts.len() == out.len() == T`.
unsafe fn run<const T: usize>(
    level: Level,
    format: Format,
    tile: *const u8,
    kb: usize,
    qs_offset: usize,
    acts: &[&[ActBlock]],
    out: &mut [[f32; TILE]],
) {
    assert!(acts.len() == T && out.len() == T);
    let a: [*const ActBlock; T] = std::array::from_fn(|i| acts[i].as_ptr());
    let o = out.as_mut_ptr();
    // SAFETY: forwarded from `tile_dot`: features present, `tile` spans the scale
    // sections and `kb` qs blocks, each `a[i]` has `kb` blocks, `o` has T rows.
    unsafe {
        match (level, format) {
            (Level::Avx512Vnni, Format::Q4_0) => q4_avx512::<Q4_0, T>(tile, kb, qs_offset, a, o),
            (Level::Avx512Vnni, Format::Q4_1) => q4_avx512::<Q4_1, T>(tile, kb, qs_offset, a, o),
            (Level::Avx512Vnni, Format::Q8_0) => q8_avx512::<T>(tile, kb, qs_offset, a, o),
            (Level::Avx2, Format::Q4_0) => q4_avx2::<Q4_0, T>(tile, kb, qs_offset, a, o),
            (Level::Avx2, Format::Q4_1) => q4_avx2::<Q4_1, T>(tile, kb, qs_offset, a, o),
            (Level::Avx2, Format::Q8_0) => q8_avx2::<T>(tile, kb, qs_offset, a, o),
            (Level::Scalar, _) => unreachable!("the scalar tier never reaches the x86 kernels"),
        }
    }
}

// Hot loops avoid everything that debug assertions instrument, because the project
// runs its dev profile (debug assertions and overflow checks on) for real work: index
// arithmetic is `wrapping_add` pointer steps, and loads are *aligned* intrinsics or
// plain aligned derefs (the unaligned `loadu` intrinsics are `ptr::read_unaligned`,
// whose precondition checks and stack round trip doubled the kernel's time). Every
// address is in bounds and aligned: see each `# Safety` and the asserts in `tile_dot`.

/// How many blocks ahead of the qs stream to prefetch. Decode streams ~100 MB of
/// weights per token, far more than the caches hold, and one core's demand misses
/// alone leave most of the memory bandwidth unused: prefetching cut the cold-cache
/// decode pass (`bench_decode_pass`, one thread) from ~8 ms to ~4-5 ms.
const PREFETCH_BLOCKS: usize = 12;

/// Prefetches the `N` cache lines (one block's qs for 16 rows) `PREFETCH_BLOCKS`
/// blocks ahead of `q`. Prefetches never fault, so running past the end of the
/// weights is harmless.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn prefetch_lines<const N: usize>(q: *const u8) {
    for i in 0..N {
        // A prefetch is only a hint: any address is allowed.
        _mm_prefetch::<_MM_HINT_T0>(q.wrapping_add((PREFETCH_BLOCKS * N + i) * 64).cast());
    }
}

const ACT_D: usize = std::mem::offset_of!(ActBlock, d);
const ACT_S: usize = std::mem::offset_of!(ActBlock, s);
const ACT_SUM: usize = std::mem::offset_of!(ActBlock, sum);

/// Loads 4 bytes into lane 0 as a bit copy. `movss` rather than `_mm_loadu_si32`
/// because the latter is a checked `read_unaligned` in debug builds; a raw deref
/// would get null/alignment checks instead.
///
/// # Safety
/// `p` must be valid for a 4-byte read and 4-byte aligned.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn load_word(p: *const u8) -> __m128i {
    // SAFETY: per the function contract.
    unsafe { _mm_castps_si128(_mm_load_ss(p.cast())) }
}

/// Broadcasts activation bytes `4·word..4·word+4` of block `a` to every 32-bit lane.
/// (`ActBlock` is 16-byte aligned with `qs` first, so the word reads are aligned.)
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn bcast512(a: *const u8, word: usize) -> __m512i {
    // SAFETY: `a` points at a live block; word < 8 stays inside its 32 `qs` bytes.
    unsafe { _mm512_broadcastd_epi32(load_word(a.wrapping_add(word * 4))) }
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn bcast256(a: *const u8, word: usize) -> __m256i {
    // SAFETY: as in `bcast512`.
    unsafe { _mm256_broadcastd_epi32(load_word(a.wrapping_add(word * 4))) }
}

/// Broadcasts the f32 at byte offset `off` of block `a`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn bcast512_f32(a: *const u8, off: usize) -> __m512 {
    // SAFETY: `off` is a field offset inside the live block `a`.
    unsafe { _mm512_broadcastss_ps(_mm_load_ss(a.wrapping_add(off).cast())) }
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn bcast256_f32(a: *const u8, off: usize) -> __m256 {
    // SAFETY: as in `bcast512_f32`.
    unsafe { _mm256_broadcastss_ps(_mm_load_ss(a.wrapping_add(off).cast())) }
}

/// `T` activation row pointers as bytes, advanced one block per step.
#[inline]
fn act_bytes<const T: usize>(acts: [*const ActBlock; T]) -> [*const u8; T] {
    acts.map(|a| a.cast::<u8>())
}

const ACT_STRIDE: usize = std::mem::size_of::<ActBlock>();

/// # Safety
/// AVX-512 F/BW/VNNI + F16C present; `tile` holds `kb` blocks of scales (and mins for
/// Q4_1) from offset 0 and `kb` 256-byte qs blocks from `qs_offset`; each `acts[t]`
/// has `kb` blocks; `out` has `T` rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q4_avx512<const F: u8, const T: usize>(
    tile: *const u8,
    kb: usize,
    qs_offset: usize,
    acts: [*const ActBlock; T],
    out: *mut [f32; TILE],
) {
    let lo_mask = _mm512_set1_epi8(0x0F);
    let hi_mask = _mm512_set1_epi8(0xF0_u8 as i8);
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm512_setzero_ps(); T];
    let mut q = tile.wrapping_add(qs_offset);
    let mut d = tile;
    let mut m = tile.wrapping_add(kb * TILE * 2);
    let mut a = act_bytes(acts);
    for _ in 0..kb {
        // SAFETY: `q`, `d`, `m` and `a[t]` point at block b of their sections, all in
        // bounds and aligned per the caller's contract.
        unsafe {
            prefetch_lines::<4>(q);
            let w0 = _mm512_load_si512(q.cast());
            let w1 = _mm512_load_si512(q.wrapping_add(64).cast());
            let w2 = _mm512_load_si512(q.wrapping_add(128).cast());
            let w3 = _mm512_load_si512(q.wrapping_add(192).cast());
            let l0 = _mm512_and_si512(w0, lo_mask);
            let l1 = _mm512_and_si512(w1, lo_mask);
            let l2 = _mm512_and_si512(w2, lo_mask);
            let l3 = _mm512_and_si512(w3, lo_mask);
            // High nibbles are used in place as 16·q: vpdpbusd's i32 sums cannot
            // overflow (4·240·128 per step), and the total is shifted back exactly
            // below, which is cheaper than shifting every weight vector.
            let h0 = _mm512_and_si512(w0, hi_mask);
            let h1 = _mm512_and_si512(w1, hi_mask);
            let h2 = _mm512_and_si512(w2, hi_mask);
            let h3 = _mm512_and_si512(w3, hi_mask);
            let dw = _mm512_cvtph_ps(_mm256_load_si256(d.cast()));
            let mw = if F == Q4_1 {
                _mm512_cvtph_ps(_mm256_load_si256(m.cast()))
            } else {
                _mm512_setzero_ps()
            };
            for t in 0..T {
                let at = a[t];
                let mut lo = _mm512_dpbusd_epi32(zero, l0, bcast512(at, 0));
                let mut hi = _mm512_dpbusd_epi32(zero, h0, bcast512(at, 4));
                lo = _mm512_dpbusd_epi32(lo, l1, bcast512(at, 1));
                hi = _mm512_dpbusd_epi32(hi, h1, bcast512(at, 5));
                lo = _mm512_dpbusd_epi32(lo, l2, bcast512(at, 2));
                hi = _mm512_dpbusd_epi32(hi, h2, bcast512(at, 6));
                lo = _mm512_dpbusd_epi32(lo, l3, bcast512(at, 3));
                hi = _mm512_dpbusd_epi32(hi, h3, bcast512(at, 7));
                // `hi` is a sum of multiples of 16, so the arithmetic shift is exact.
                let mut isum = _mm512_add_epi32(lo, _mm512_srai_epi32::<4>(hi));
                if F == Q4_0 {
                    // Q4_0 values are q − 8: Σ(q − 8)·y = Σq·y − 8·Σy.
                    let sum = _mm512_broadcastd_epi32(load_word(at.wrapping_add(ACT_SUM)));
                    isum = _mm512_sub_epi32(isum, _mm512_slli_epi32::<3>(sum));
                }
                if F == Q4_1 {
                    // candle's (and so our reference's) exact order, without FMA:
                    // sum += isum·d_w·d_a + m_w·s_a. Activations are re-quantized to 8
                    // bits at every layer, so a last-bit difference here can flip a
                    // rounding and change the generated tokens.
                    let dot = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(isum), dw), bcast512_f32(at, ACT_D));
                    let min = _mm512_mul_ps(mw, bcast512_f32(at, ACT_S));
                    acc[t] = _mm512_add_ps(acc[t], _mm512_add_ps(dot, min));
                } else {
                    let scale = _mm512_mul_ps(dw, bcast512_f32(at, ACT_D));
                    acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, acc[t]);
                }
            }
        }
        q = q.wrapping_add(TILE * 16);
        d = d.wrapping_add(TILE * 2);
        m = m.wrapping_add(TILE * 2);
        a = a.map(|p| p.wrapping_add(ACT_STRIDE));
    }
    for t in 0..T {
        // SAFETY: `out` has T rows of 16 floats.
        unsafe {
            _mm512_storeu_ps(out.wrapping_add(t).cast::<f32>(), acc[t])
        };
    }
}

/// # Safety
/// As `q4_avx512`, with 512-byte qs blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q8_avx512<const T: usize>(
    tile: *const u8,
    kb: usize,
    qs_offset: usize,
    acts: [*const ActBlock; T],
    out: *mut [f32; TILE],
) {
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm512_setzero_ps(); T];
    let mut q = tile.wrapping_add(qs_offset);
    let mut d = tile;
    let mut a = act_bytes(acts);
    for _ in 0..kb {
        // SAFETY: as in `q4_avx512`.
        unsafe {
            prefetch_lines::<8>(q);
            let w: [__m512i; 8] = [
                _mm512_load_si512(q.cast()),
                _mm512_load_si512(q.wrapping_add(64).cast()),
                _mm512_load_si512(q.wrapping_add(128).cast()),
                _mm512_load_si512(q.wrapping_add(192).cast()),
                _mm512_load_si512(q.wrapping_add(256).cast()),
                _mm512_load_si512(q.wrapping_add(320).cast()),
                _mm512_load_si512(q.wrapping_add(384).cast()),
                _mm512_load_si512(q.wrapping_add(448).cast()),
            ];
            let dw = _mm512_cvtph_ps(_mm256_load_si256(d.cast()));
            for t in 0..T {
                let at = a[t];
                let mut s0 = _mm512_dpbusd_epi32(zero, w[0], bcast512(at, 0));
                let mut s1 = _mm512_dpbusd_epi32(zero, w[1], bcast512(at, 1));
                s0 = _mm512_dpbusd_epi32(s0, w[2], bcast512(at, 2));
                s1 = _mm512_dpbusd_epi32(s1, w[3], bcast512(at, 3));
                s0 = _mm512_dpbusd_epi32(s0, w[4], bcast512(at, 4));
                s1 = _mm512_dpbusd_epi32(s1, w[5], bcast512(at, 5));
                s0 = _mm512_dpbusd_epi32(s0, w[6], bcast512(at, 6));
                s1 = _mm512_dpbusd_epi32(s1, w[7], bcast512(at, 7));
                // Weights are stored as q + 128: Σ(q + 128)·y − 128·Σy = Σq·y exactly.
                let sum = _mm512_broadcastd_epi32(load_word(at.wrapping_add(ACT_SUM)));
                let isum = _mm512_sub_epi32(_mm512_add_epi32(s0, s1), _mm512_slli_epi32::<7>(sum));
                let scale = _mm512_mul_ps(dw, bcast512_f32(at, ACT_D));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, acc[t]);
            }
        }
        q = q.wrapping_add(TILE * 32);
        d = d.wrapping_add(TILE * 2);
        a = a.map(|p| p.wrapping_add(ACT_STRIDE));
    }
    for t in 0..T {
        // SAFETY: `out` has T rows of 16 floats.
        unsafe { _mm512_storeu_ps(out.wrapping_add(t).cast::<f32>(), acc[t]) };
    }
}

/// # Safety
/// AVX2 + FMA + F16C present; otherwise as `q4_avx512`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_avx2<const F: u8, const T: usize>(
    tile: *const u8,
    kb: usize,
    qs_offset: usize,
    acts: [*const ActBlock; T],
    out: *mut [f32; TILE],
) {
    let mask = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    // Rows 0..8 of the tile, then 8..16: both halves at once would need twice the
    // accumulators and spill.
    for h in 0..2 {
        let mut acc = [_mm256_setzero_ps(); T];
        let mut q = tile.wrapping_add(qs_offset + h * 32);
        let mut d = tile.wrapping_add(h * 16);
        let mut m = tile.wrapping_add(kb * TILE * 2 + h * 16);
        let mut a = act_bytes(acts);
        for _ in 0..kb {
            // SAFETY: as in `q4_avx512`; the half offset stays inside each section.
            unsafe {
                if h == 0 {
                    prefetch_lines::<4>(q);
                }
                let w0 = _mm256_load_si256(q.cast());
                let w1 = _mm256_load_si256(q.wrapping_add(64).cast());
                let w2 = _mm256_load_si256(q.wrapping_add(128).cast());
                let w3 = _mm256_load_si256(q.wrapping_add(192).cast());
                let l0 = _mm256_and_si256(w0, mask);
                let l1 = _mm256_and_si256(w1, mask);
                let l2 = _mm256_and_si256(w2, mask);
                let l3 = _mm256_and_si256(w3, mask);
                let h0 = _mm256_and_si256(_mm256_srli_epi16::<4>(w0), mask);
                let h1 = _mm256_and_si256(_mm256_srli_epi16::<4>(w1), mask);
                let h2 = _mm256_and_si256(_mm256_srli_epi16::<4>(w2), mask);
                let h3 = _mm256_and_si256(_mm256_srli_epi16::<4>(w3), mask);
                let dw = _mm256_cvtph_ps(_mm_load_si128(d.cast()));
                let mw = if F == Q4_1 {
                    _mm256_cvtph_ps(_mm_load_si128(m.cast()))
                } else {
                    _mm256_setzero_ps()
                };
                for t in 0..T {
                    let at = a[t];
                    // Each maddubs lane pair is at most 2·15·128 = 3840; eight of
                    // them stay below i16::MAX.
                    let p0 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(l0, bcast256(at, 0)),
                        _mm256_maddubs_epi16(l1, bcast256(at, 1)),
                    );
                    let p1 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(l2, bcast256(at, 2)),
                        _mm256_maddubs_epi16(l3, bcast256(at, 3)),
                    );
                    let p2 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(h0, bcast256(at, 4)),
                        _mm256_maddubs_epi16(h1, bcast256(at, 5)),
                    );
                    let p3 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(h2, bcast256(at, 6)),
                        _mm256_maddubs_epi16(h3, bcast256(at, 7)),
                    );
                    let p = _mm256_add_epi16(_mm256_add_epi16(p0, p1), _mm256_add_epi16(p2, p3));
                    let mut isum = _mm256_madd_epi16(p, ones);
                    if F == Q4_0 {
                        let sum = _mm256_broadcastd_epi32(load_word(at.wrapping_add(ACT_SUM)));
                        isum = _mm256_sub_epi32(isum, _mm256_slli_epi32::<3>(sum));
                    }
                    if F == Q4_1 {
                        // candle's exact order, without FMA (see `q4_avx512`).
                        let dot =
                            _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(isum), dw), bcast256_f32(at, ACT_D));
                        let min = _mm256_mul_ps(mw, bcast256_f32(at, ACT_S));
                        acc[t] = _mm256_add_ps(acc[t], _mm256_add_ps(dot, min));
                    } else {
                        let scale = _mm256_mul_ps(dw, bcast256_f32(at, ACT_D));
                        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, acc[t]);
                    }
                }
            }
            q = q.wrapping_add(TILE * 16);
            d = d.wrapping_add(TILE * 2);
            m = m.wrapping_add(TILE * 2);
            a = a.map(|p| p.wrapping_add(ACT_STRIDE));
        }
        for t in 0..T {
            // SAFETY: `out` has T rows of 16 floats; h·8 + 8 ≤ 16.
            unsafe {
                _mm256_storeu_ps(out.wrapping_add(t).cast::<f32>().wrapping_add(h * 8), acc[t])
            };
        }
    }
}

/// # Safety
/// As `q4_avx2`, with 512-byte qs blocks.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_avx2<const T: usize>(
    tile: *const u8,
    kb: usize,
    qs_offset: usize,
    acts: [*const ActBlock; T],
    out: *mut [f32; TILE],
) {
    let flip = _mm256_set1_epi8(-128);
    let ones = _mm256_set1_epi16(1);
    for h in 0..2 {
        let mut acc = [_mm256_setzero_ps(); T];
        let mut q = tile.wrapping_add(qs_offset + h * 32);
        let mut d = tile.wrapping_add(h * 16);
        let mut a = act_bytes(acts);
        for _ in 0..kb {
            // SAFETY: as in `q4_avx2`.
            unsafe {
                if h == 0 {
                    prefetch_lines::<8>(q);
                }
                let dw = _mm256_cvtph_ps(_mm_load_si128(d.cast()));
                for t in 0..T {
                    let at = a[t];
                    let mut isum = _mm256_setzero_si256();
                    for g in 0..8 {
                        // Undo the +128 storage offset, then |w| · sign(y, w) keeps
                        // maddubs' unsigned operand non-negative.
                        let w = _mm256_xor_si256(
                            _mm256_load_si256(q.wrapping_add(g * 64).cast()),
                            flip,
                        );
                        let p = _mm256_maddubs_epi16(
                            _mm256_sign_epi8(w, w),
                            _mm256_sign_epi8(bcast256(at, g), w),
                        );
                        isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p, ones));
                    }
                    let scale = _mm256_mul_ps(dw, bcast256_f32(at, ACT_D));
                    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, acc[t]);
                }
            }
            q = q.wrapping_add(TILE * 32);
            d = d.wrapping_add(TILE * 2);
            a = a.map(|p| p.wrapping_add(ACT_STRIDE));
        }
        for t in 0..T {
            // SAFETY: `out` has T rows of 16 floats; h·8 + 8 ≤ 16.
            unsafe {
                _mm256_storeu_ps(
                    out.wrapping_add(t).cast::<f32>().wrapping_add(h * 8),
                    acc[t],
                )
            };
        }
    }
}
