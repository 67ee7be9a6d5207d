//! x86-64 tile kernels (see `packed.rs` for the tile layout).
//!
//! AVX-512 VNNI: one `vpdpbusd` multiplies 4 weight bytes by 4 activation bytes in each
//! of 16 lanes (= the tile's 16 rows) and accumulates into i32, so a 32-value block is
//! 8 instructions per 16 rows; Q4 nibbles are already unsigned and Q8_0 weights are
//! stored +128 for it. AVX2: `vpmaddubsw` + `vpmaddwd` do the same on 8 rows per
//! 256-bit vector, processing a tile as two halves. For Q4_1 all eight i16 partial
//! sums of a block fit without overflow (8 · 2 · 15 · 128 < 2¹⁵), so one `vpmaddwd` per
//! block finishes them; Q4_0/Q8_0 need a `vpmaddwd` per group anyway (see below), and
//! Q8_0 the sign trick (|w| · sign(y, w)) because its i16 pair sums can reach
//! 2 · 128 · 127.
//!
//! Per block the integer sums are exact, and the float steps repeat candle 0.11.1's
//! exactly, because activations are re-quantized to 8 bits at every layer and a
//! last-bit difference can change the generated tokens:
//! - Q4_1 (candle's scalar `vec_dot_unopt`): `acc += isum·d_w·d_y + m_w·s_y`.
//! - Q4_0/Q8_0 (candle's AVX2 `vec_dot_q4_0_q8_0` / `vec_dot_q8_0_q8_0`): candle's
//!   `vpmaddubsw` + `vpmaddwd` leave one i32 per 4-element group `g` of a block, and
//!   each group keeps its own f32 accumulator, `acc_g = fma(d_w·d_y, f32(isum_g),
//!   acc_g)`, reduced at the end by `hsum_float_8` as
//!   `((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7))`. The kernels below keep those 8
//!   accumulators per token, each vectorised across the tile's rows. The stored-weight
//!   offsets (Q8_0's +128, Q4_0's +8) are removed per group with the activations'
//!   `GroupOffsets`, which start each group's `vpdpbusd` sum; AVX2 Q8_0 uses candle's
//!   own sign trick instead.

// The kernels index several per-token arrays (accumulators, activation pointers) in
// lockstep, which reads better as `for t in 0..T` than as zipped iterators.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::act::{ActBlock, GroupOffsets, GROUPS};
use super::packed::{Format, Level, TILE};

/// Tokens per Q4_1 or Q5_0 AVX2 kernel call: 16 ymm registers hold 8 unpacked weight vectors
/// and at most 2·4 accumulators.
const AVX2_MAX_TOKENS: usize = 4;
const AVX512_MAX_TOKENS: usize = 8;
/// Tokens per Q4_0/Q8_0 kernel call: each token needs 8 accumulators (one per group),
/// so 3 tokens fill 24 of the 32 zmm registers and 1 token 8 of the 16 ymm ones.
const AVX2_Q0_MAX_TOKENS: usize = 1;
const AVX512_Q0_MAX_TOKENS: usize = 3;
// `tile_dot` instantiates the Q4_0/Q8_0 kernels for 1..=3 tokens only.
const _: () = assert!(AVX512_Q0_MAX_TOKENS <= 3 && AVX2_Q0_MAX_TOKENS <= 3);

const Q4_0: u8 = 0;
const Q8_0: u8 = 2;

/// Whether this file has kernels for `level`: every format at both SIMD tiers; the
/// scalar tier never comes here (the portable kernel in `packed.rs` runs it).
pub(crate) fn has_kernel(level: Level) -> bool {
    level != Level::Scalar
}

/// Dots one packed tile against `acts.len()` activation rows; for Q4_0/Q8_0 `offs`
/// holds the rows' group offsets (see `Format::group_offset`), otherwise it is unused.
///
/// # Safety
/// The CPU must support `level`'s features (AVX2+FMA+F16C, plus AVX-512 F/BW/VNNI for
/// `Avx512Vnni`). Everything else is checked here.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn tile_dot(
    level: Level,
    format: Format,
    tile: &[u8],
    kb: usize,
    qs_offset: usize,
    acts: &[&[ActBlock]],
    offs: &[&[GroupOffsets]],
    out: &mut [[f32; TILE]],
) {
    // The kernels read through raw pointers with aligned loads; these make every
    // access in range and aligned (the packer lays tiles out on 64-byte boundaries).
    assert!(has_kernel(level), "no kernels at {level:?}");
    assert!((tile.as_ptr() as usize).is_multiple_of(64) && qs_offset.is_multiple_of(64));
    assert!(qs_offset >= kb * TILE * (2 + format.side_bytes()));
    assert!(tile.len() >= qs_offset + kb * TILE * format.qs_bytes());
    assert!(acts.iter().all(|a| a.len() >= kb));
    assert_eq!(acts.len(), out.len());
    let q0 = matches!(format, Format::Q4_0 | Format::Q8_0);
    if q0 {
        assert_eq!(
            offs.len(),
            acts.len(),
            "Q4_0/Q8_0 kernels need group offsets"
        );
        assert!(offs.iter().all(|o| o.len() >= kb));
    }

    let max = match (level, format) {
        (Level::Avx512Vnni, Format::Q4_1 | Format::Q5_0) => AVX512_MAX_TOKENS,
        (_, Format::Q4_1 | Format::Q5_0) => AVX2_MAX_TOKENS,
        (Level::Avx512Vnni, _) => AVX512_Q0_MAX_TOKENS,
        (_, _) => AVX2_Q0_MAX_TOKENS,
    };
    let t = tile.as_ptr();
    // A prompt's Q5_0 tile is unpacked once on AVX2, for all its tokens (see
    // `q5_0_avx2_unpacked`).
    if level == Level::Avx2 && format == Format::Q5_0 && acts.len() > max {
        UNPACKED_Q5_0.with_borrow_mut(|buf| {
            // SAFETY: AVX2 + FMA + F16C are present (the caller's contract); `buf`
            // gets room for the whole tile, which spans what the unpacking reads
            // (asserted above); every row of `acts` has `kb` blocks and `out` as many
            // rows (asserted above).
            unsafe {
                buf.resize(kb * 2 * UNPACKED_HALF, _mm256_setzero_si256());
                unpack_q5_0_avx2(t, kb, qs_offset, buf.as_mut_ptr());
                q5_0_avx2_unpacked(kb, buf.as_ptr(), acts, out);
            }
        });
        return;
    }
    for (i, (a, o)) in acts.chunks(max).zip(out.chunks_mut(max)).enumerate() {
        // SAFETY: forwarded contract (CPU features) plus the bounds asserted above.
        // Only the token counts each format can get are instantiated.
        unsafe {
            if format == Format::Q5_0 {
                match a.len() {
                    1 => run_q5_0::<1>(level, t, kb, qs_offset, a, o),
                    2 => run_q5_0::<2>(level, t, kb, qs_offset, a, o),
                    3 => run_q5_0::<3>(level, t, kb, qs_offset, a, o),
                    4 => run_q5_0::<4>(level, t, kb, qs_offset, a, o),
                    5 => run_q5_0::<5>(level, t, kb, qs_offset, a, o),
                    6 => run_q5_0::<6>(level, t, kb, qs_offset, a, o),
                    7 => run_q5_0::<7>(level, t, kb, qs_offset, a, o),
                    8 => run_q5_0::<8>(level, t, kb, qs_offset, a, o),
                    _ => unreachable!("chunks are 1..=8 long"),
                }
            } else if q0 {
                let offs = &offs[i * max..i * max + a.len()];
                match a.len() {
                    1 => run_q0::<1>(level, format, t, kb, qs_offset, a, offs, o),
                    2 => run_q0::<2>(level, format, t, kb, qs_offset, a, offs, o),
                    3 => run_q0::<3>(level, format, t, kb, qs_offset, a, offs, o),
                    _ => unreachable!("Q4_0/Q8_0 chunks are 1..=3 long"),
                }
            } else {
                match a.len() {
                    1 => run_q4_1::<1>(level, t, kb, qs_offset, a, o),
                    2 => run_q4_1::<2>(level, t, kb, qs_offset, a, o),
                    3 => run_q4_1::<3>(level, t, kb, qs_offset, a, o),
                    4 => run_q4_1::<4>(level, t, kb, qs_offset, a, o),
                    5 => run_q4_1::<5>(level, t, kb, qs_offset, a, o),
                    6 => run_q4_1::<6>(level, t, kb, qs_offset, a, o),
                    7 => run_q4_1::<7>(level, t, kb, qs_offset, a, o),
                    8 => run_q4_1::<8>(level, t, kb, qs_offset, a, o),
                    _ => unreachable!("chunks are 1..=8 long"),
                }
            }
        }
    }
}

/// # Safety
/// As `tile_dot` for Q4_1, with its bounds already checked and
/// `acts.len() == out.len() == T`.
unsafe fn run_q4_1<const T: usize>(
    level: Level,
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
        match level {
            Level::Avx512Vnni => q4_1_avx512::<T>(tile, kb, qs_offset, a, o),
            Level::Avx2 => q4_1_avx2::<T>(tile, kb, qs_offset, a, o),
            Level::Scalar => unreachable!("the scalar tier never reaches the x86 kernels"),
        }
    }
}

/// # Safety
/// As `tile_dot` for Q4_0/Q8_0, with its bounds already checked and
/// `acts.len() == offs.len() == out.len() == T`.
#[allow(clippy::too_many_arguments)]
unsafe fn run_q0<const T: usize>(
    level: Level,
    format: Format,
    tile: *const u8,
    kb: usize,
    qs_offset: usize,
    acts: &[&[ActBlock]],
    offs: &[&[GroupOffsets]],
    out: &mut [[f32; TILE]],
) {
    assert!(acts.len() == T && offs.len() == T && out.len() == T);
    let a: [*const ActBlock; T] = std::array::from_fn(|i| acts[i].as_ptr());
    let g: [*const GroupOffsets; T] = std::array::from_fn(|i| offs[i].as_ptr());
    let o = out.as_mut_ptr();
    // SAFETY: forwarded from `tile_dot`: features present, `tile` spans the scale
    // section and `kb` qs blocks, each `a[i]` and `g[i]` has `kb` blocks, `o` has T
    // rows.
    unsafe {
        match (level, format) {
            (Level::Avx512Vnni, Format::Q4_0) => q0_avx512::<Q4_0, T>(tile, kb, qs_offset, a, g, o),
            (Level::Avx512Vnni, Format::Q8_0) => q0_avx512::<Q8_0, T>(tile, kb, qs_offset, a, g, o),
            (Level::Avx2, Format::Q4_0) => q4_0_avx2::<T>(tile, kb, qs_offset, a, g, o),
            (Level::Avx2, Format::Q8_0) => q8_0_avx2::<T>(tile, kb, qs_offset, a, o),
            (_, Format::Q4_1) => unreachable!("Q4_1 runs through `run_q4_1`"),
            (_, Format::Q5_0) => unreachable!("Q5_0 runs through `run_q5_0`"),
            (Level::Scalar, _) => unreachable!("the scalar tier never reaches the x86 kernels"),
        }
    }
}

/// # Safety
/// As `tile_dot` for Q5_0, with its bounds already checked and
/// `acts.len() == out.len() == T`.
unsafe fn run_q5_0<const T: usize>(
    level: Level,
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
    // and mask sections and `kb` qs blocks, each `a[i]` has `kb` blocks, `o` has T
    // rows.
    unsafe {
        match level {
            Level::Avx512Vnni => q5_0_avx512::<T>(tile, kb, qs_offset, a, o),
            Level::Avx2 => q5_0_avx2::<T>(tile, kb, qs_offset, a, o),
            Level::Scalar => unreachable!("the scalar tier never reaches the x86 kernels"),
        }
    }
}

// Hot loops avoid everything that debug assertions instrument, because the project
// runs its dev profile (debug assertions and overflow checks on) for real work: index
// arithmetic is `wrapping_add` pointer steps, and loads are *aligned* intrinsics or
// plain aligned derefs (the unaligned `loadu` intrinsics are `ptr::read_unaligned`,
// whose precondition checks and stack round trip doubled the kernel's time). Every
// address is in bounds and aligned: see each `# Safety` and the asserts in `tile_dot`.

/// How far past the weights being read to prefetch, in bytes. Decode streams ~100 MB
/// of weights per token, far more than the caches hold, and one core's demand misses
/// alone leave most of the memory bandwidth unused. The prefetches go to L2
/// (`prefetcht1`), not L1: with the kernel's arithmetic between the loads, prefetches
/// into L1 held the L1 miss buffers and capped one core at ~12 GB/s, while prefetches
/// to L2 let far more lines be in flight. Measured on Gemma 3's 178 MB Q8_0 head
/// (`bench_matvec`, AMD EPYC Zen 4): 15.4 → 8.3 ms on one thread, 7.0 → 4.3 ms on two,
/// and SmolLM2's cold decode pass (`bench_decode_pass`, one thread) 7.0 → 5.4 ms. 8 KiB
/// ahead beat 3, 4, 6, 12 and 16 KiB.
const PREFETCH_BYTES: usize = 8192;

/// Prefetches into L2 the `N` cache lines that start `PREFETCH_BYTES` past `at`: the
/// weights a kernel reads a few blocks later. Prefetches never fault, so running past
/// the end of the weights is harmless.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn prefetch_lines<const N: usize>(at: *const u8) {
    for i in 0..N {
        // A prefetch is only a hint: any address is allowed.
        _mm_prefetch::<_MM_HINT_T1>(at.wrapping_add(PREFETCH_BYTES + i * 64).cast());
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
const OFFS_STRIDE: usize = std::mem::size_of::<GroupOffsets>();

/// Runs `$body` once per listed group with `$g` bound to a constant. The dev profile's
/// opt-level 2 does not unroll the group loop on its own, and then the per-group
/// accumulators live on the stack (a load and a store around every FMA); constant
/// indices let them stay in registers.
macro_rules! unroll {
    ($g:ident in [$($v:literal),*] $body:block) => {
        $({
            const $g: usize = $v;
            $body
        })*
    };
}

/// # Safety
/// AVX-512 F/BW/VNNI + F16C present; `tile` holds `kb` blocks of scales and mins from
/// offset 0 and `kb` 256-byte qs blocks from `qs_offset`; each `acts[t]` has `kb`
/// blocks; `out` has `T` rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q4_1_avx512<const T: usize>(
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
            let mw = _mm512_cvtph_ps(_mm256_load_si256(m.cast()));
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
                let isum = _mm512_add_epi32(lo, _mm512_srai_epi32::<4>(hi));
                // candle's exact order, without FMA: sum += isum·d_w·d_a + m_w·s_a.
                let dot = _mm512_mul_ps(
                    _mm512_mul_ps(_mm512_cvtepi32_ps(isum), dw),
                    bcast512_f32(at, ACT_D),
                );
                let min = _mm512_mul_ps(mw, bcast512_f32(at, ACT_S));
                acc[t] = _mm512_add_ps(acc[t], _mm512_add_ps(dot, min));
            }
        }
        q = q.wrapping_add(TILE * 16);
        d = d.wrapping_add(TILE * 2);
        m = m.wrapping_add(TILE * 2);
        a = a.map(|p| p.wrapping_add(ACT_STRIDE));
    }
    for t in 0..T {
        // SAFETY: `out` has T rows of 16 floats.
        unsafe { _mm512_storeu_ps(out.wrapping_add(t).cast::<f32>(), acc[t]) };
    }
}

/// candle's `hsum_float_8` applied to 8 per-group accumulators, one row per lane:
/// `((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7))`.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn hsum_groups512(a: &[__m512; GROUPS]) -> __m512 {
    _mm512_add_ps(
        _mm512_add_ps(_mm512_add_ps(a[0], a[4]), _mm512_add_ps(a[2], a[6])),
        _mm512_add_ps(_mm512_add_ps(a[1], a[5]), _mm512_add_ps(a[3], a[7])),
    )
}

#[inline]
#[target_feature(enable = "avx2")]
fn hsum_groups256(a: &[__m256; GROUPS]) -> __m256 {
    _mm256_add_ps(
        _mm256_add_ps(_mm256_add_ps(a[0], a[4]), _mm256_add_ps(a[2], a[6])),
        _mm256_add_ps(_mm256_add_ps(a[1], a[5]), _mm256_add_ps(a[3], a[7])),
    )
}

/// Q4_0 (`F == Q4_0`) or Q8_0 (`F == Q8_0`), one zmm lane per tile row and one
/// accumulator per (token, group): candle's AVX2 arithmetic for 16 rows at once.
///
/// # Safety
/// AVX-512 F/BW/VNNI + F16C present; `tile` holds `kb` blocks of scales from offset 0
/// and `kb` qs blocks (256 bytes for Q4_0, 512 for Q8_0) from `qs_offset`; each
/// `acts[t]` and `offs[t]` has `kb` blocks; `out` has `T` rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q0_avx512<const F: u8, const T: usize>(
    tile: *const u8,
    kb: usize,
    qs_offset: usize,
    acts: [*const ActBlock; T],
    offs: [*const GroupOffsets; T],
    out: *mut [f32; TILE],
) {
    let mask = _mm512_set1_epi8(0x0F);
    let mut acc = [[_mm512_setzero_ps(); GROUPS]; T];
    let mut q = tile.wrapping_add(qs_offset);
    let mut d = tile;
    let mut a = act_bytes(acts);
    let mut o = offs.map(|p| p.cast::<u8>());
    let q_stride = if F == Q8_0 { TILE * 32 } else { TILE * 16 };
    for _ in 0..kb {
        // SAFETY: `q`, `d`, `a[t]` and `o[t]` point at block b of their sections, all
        // in bounds and aligned per the caller's contract.
        unsafe {
            if F == Q8_0 {
                prefetch_lines::<8>(q);
            } else {
                prefetch_lines::<4>(q);
            }
            // candle: `d = f32(x.d) · f32(y.d)`, one f32 product per block.
            let dw = _mm512_cvtph_ps(_mm256_load_si256(d.cast()));
            let scale: [__m512; T] =
                std::array::from_fn(|t| _mm512_mul_ps(dw, bcast512_f32(a[t], ACT_D)));
            // One group: its exact i32 sum per row (the offset as the starting value
            // removes the stored +128 / +8 exactly), then candle's per-lane FMA.
            macro_rules! group {
                ($g:expr, $w:expr) => {
                    let w = $w;
                    for t in 0..T {
                        let init = _mm512_broadcastd_epi32(load_word(o[t].wrapping_add($g * 4)));
                        let s = _mm512_dpbusd_epi32(init, w, bcast512(a[t], $g));
                        acc[t][$g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale[t], acc[t][$g]);
                    }
                };
            }
            if F == Q8_0 {
                unroll!(G in [0, 1, 2, 3, 4, 5, 6, 7] {
                    group!(G, _mm512_load_si512(q.wrapping_add(G * 64).cast()));
                });
            } else {
                // Packed group g: low nibbles are block group g, high nibbles group 4+g.
                unroll!(G in [0, 1, 2, 3] {
                    let w = _mm512_load_si512(q.wrapping_add(G * 64).cast());
                    group!(G, _mm512_and_si512(w, mask));
                    group!(G + 4, _mm512_and_si512(_mm512_srli_epi16::<4>(w), mask));
                });
            }
        }
        q = q.wrapping_add(q_stride);
        d = d.wrapping_add(TILE * 2);
        a = a.map(|p| p.wrapping_add(ACT_STRIDE));
        o = o.map(|p| p.wrapping_add(OFFS_STRIDE));
    }
    for t in 0..T {
        // SAFETY: `out` has T rows of 16 floats.
        unsafe { _mm512_storeu_ps(out.wrapping_add(t).cast::<f32>(), hsum_groups512(&acc[t])) };
    }
}

/// Q5_0 against `T` activation rows, candle's scalar `vec_dot_unopt` order
/// (`sum += f32(isum)·d_w·d_y` per block, no FMA). Each packed group unpacks to two
/// vectors of 4-bit values, and one masked byte add per vector puts in the fifth bits
/// (the `h` section's masks), giving `q + 16` in 0..32 for `vpdpbusd`; the block's
/// integer sum starts from `-16·Σy` (the block's `sum`), so it is exact.
///
/// # Safety
/// AVX-512 F/BW/VNNI + F16C present; `tile` holds `kb` blocks of scales from offset 0,
/// `kb` blocks of 8 masks after them and `kb` 256-byte qs blocks from `qs_offset`; each
/// `acts[t]` has `kb` blocks; `out` has `T` rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q5_0_avx512<const T: usize>(
    tile: *const u8,
    kb: usize,
    qs_offset: usize,
    acts: [*const ActBlock; T],
    out: *mut [f32; TILE],
) {
    let lo_mask = _mm512_set1_epi8(0x0F);
    let fifth = _mm512_set1_epi8(0x10);
    let mut acc = [_mm512_setzero_ps(); T];
    let mut q = tile.wrapping_add(qs_offset);
    let mut d = tile;
    let mut h = tile.wrapping_add(kb * TILE * 2);
    let mut a = act_bytes(acts);
    for _ in 0..kb {
        // SAFETY: `q`, `d`, `h` and `a[t]` point at block b of their sections,
        // all in bounds and aligned per the caller's contract (the mask section starts
        // at a multiple of 32 bytes and holds 8-byte words).
        unsafe {
            prefetch_lines::<4>(q);
            prefetch_lines::<1>(h);
            let masks = h.cast::<u64>();
            let mut w = [_mm512_setzero_si512(); 8];
            unroll!(G in [0, 1, 2, 3] {
                let packed = _mm512_load_si512(q.wrapping_add(G * 64).cast());
                let lo = _mm512_and_si512(packed, lo_mask);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(packed), lo_mask);
                w[G] = _mm512_mask_add_epi8(lo, *masks.wrapping_add(G), lo, fifth);
                w[G + 4] = _mm512_mask_add_epi8(hi, *masks.wrapping_add(G + 4), hi, fifth);
            });
            let dw = _mm512_cvtph_ps(_mm256_load_si256(d.cast()));
            // Groups outermost, tokens inside: the T tokens' integer sums advance side
            // by side, each `vpdpbusd` waiting on its own token's previous one T
            // instructions back, not on the one just before it (a token's eight in a
            // row were one long chain of latencies). Integer sums: the order is free.
            let mut sums = [_mm512_setzero_si512(); T];
            for t in 0..T {
                // |Σy| ≤ 32·128: `-16·Σy` is far inside i32.
                sums[t] = _mm512_set1_epi32(-16 * *a[t].wrapping_add(ACT_SUM).cast::<i32>());
            }
            unroll!(G in [0, 1, 2, 3, 4, 5, 6, 7] {
                for t in 0..T {
                    sums[t] = _mm512_dpbusd_epi32(sums[t], w[G], bcast512(a[t], G));
                }
            });
            for t in 0..T {
                let dot = _mm512_mul_ps(
                    _mm512_mul_ps(_mm512_cvtepi32_ps(sums[t]), dw),
                    bcast512_f32(a[t], ACT_D),
                );
                acc[t] = _mm512_add_ps(acc[t], dot);
            }
        }
        q = q.wrapping_add(TILE * 16);
        d = d.wrapping_add(TILE * 2);
        h = h.wrapping_add(TILE * 4);
        a = a.map(|p| p.wrapping_add(ACT_STRIDE));
    }
    for t in 0..T {
        // SAFETY: `out` has T rows of 16 floats.
        unsafe { _mm512_storeu_ps(out.wrapping_add(t).cast::<f32>(), acc[t]) };
    }
}

/// Expands 32 mask bits into 32 bytes: byte `i` is `fifth` where bit `i` is set,
/// else 0 (what AVX-512's masked byte add does in one instruction).
///
/// # Safety
/// `bits` must be valid for a 4-byte read and 4-byte aligned.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn fifth_bits256(bits: *const u8, fifth: __m256i) -> __m256i {
    // Byte i takes mask byte i / 8, then keeps only bit i % 8: OR-ing in every other
    // bit leaves all ones exactly where that bit is set.
    let which_byte = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    let other_bits = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
    // SAFETY: per the function contract.
    let word = _mm256_broadcastd_epi32(unsafe { load_word(bits) });
    let spread = _mm256_or_si256(_mm256_shuffle_epi8(word, which_byte), other_bits);
    _mm256_and_si256(_mm256_cmpeq_epi8(spread, _mm256_set1_epi8(-1)), fifth)
}

/// The eight weight vectors (`q + 16` per byte) of one Q5_0 block's tile half: `q`
/// at the half's bytes of the block's first packed group, `h` at its mask word.
///
/// # Safety
/// As `q5_0_avx2`'s reads of one block half; AVX2 present.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q5_0_vectors(q: *const u8, h: *const u8) -> [__m256i; 8] {
    let lo_mask = _mm256_set1_epi8(0x0F);
    let fifth = _mm256_set1_epi8(0x10);
    let mut w = [_mm256_setzero_si256(); 8];
    // SAFETY: per the function contract.
    unsafe {
        unroll!(G in [0, 1, 2, 3] {
            let packed = _mm256_load_si256(q.wrapping_add(G * 64).cast());
            let lo = _mm256_and_si256(packed, lo_mask);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), lo_mask);
            // The values are below 16, so OR adds the fifth bit.
            w[G] = _mm256_or_si256(lo, fifth_bits256(h.wrapping_add(G * 8), fifth));
            w[G + 4] = _mm256_or_si256(hi, fifth_bits256(h.wrapping_add((G + 4) * 8), fifth));
        });
    }
    w
}

/// Vectors per block half of an unpacked Q5_0 tile: the eight weight vectors, the
/// half's `−128·Σw` per row, and its eight rows' scales as floats.
const UNPACKED_HALF: usize = 10;

/// Blocks of an unpacked tile one pass over the tokens reads (`q5_0_avx2_unpacked`):
/// 16 · 640 bytes, so the pass's weights stay in L1 while every token reads them.
const UNPACKED_CHUNK: usize = 16;

/// Unpacks a whole Q5_0 tile for `q5_0_avx2_unpacked`, block by block and half by
/// half (`UNPACKED_HALF` vectors each): the weights as signed bytes `q − 16`, so the
/// kernel's `vpmaddubsw` reads them from memory as its signed operand; each row's
/// `−128·Σ(q − 16)`, which takes back the `+128` that makes the activations its
/// unsigned operand; and the rows' scales converted from f16 once.
///
/// # Safety
/// As `q5_0_avx2` for the tile; `into` is valid for `kb · 2 · UNPACKED_HALF` aligned
/// writes.
#[target_feature(enable = "avx2,f16c")]
unsafe fn unpack_q5_0_avx2(tile: *const u8, kb: usize, qs_offset: usize, into: *mut __m256i) {
    let sixteen = _mm256_set1_epi8(16);
    let byte_ones = _mm256_set1_epi8(1);
    let ones = _mm256_set1_epi16(1);
    for b in 0..kb {
        for hf in 0..2 {
            let q = tile.wrapping_add(qs_offset + b * TILE * 16 + hf * 32);
            let h = tile.wrapping_add(kb * TILE * 2 + b * TILE * 4 + hf * 4);
            let d = tile.wrapping_add(b * TILE * 2 + hf * 16);
            let at = into.wrapping_add((b * 2 + hf) * UNPACKED_HALF);
            // SAFETY: per the function contract.
            unsafe {
                let mut row_sums = _mm256_setzero_si256();
                for (g, w) in q5_0_vectors(q, h).into_iter().enumerate() {
                    let signed = _mm256_sub_epi8(w, sixteen);
                    _mm256_store_si256(at.wrapping_add(g), signed);
                    // Each row's four bytes of this group, summed (|Σ| ≤ 4·16).
                    let pairs = _mm256_maddubs_epi16(byte_ones, signed);
                    row_sums = _mm256_add_epi32(row_sums, _mm256_madd_epi16(pairs, ones));
                }
                let correction = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32::<7>(row_sums));
                _mm256_store_si256(at.wrapping_add(8), correction);
                let dw = _mm256_cvtph_ps(_mm_load_si128(d.cast()));
                _mm256_store_si256(at.wrapping_add(9), _mm256_castps_si256(dw));
            }
        }
    }
}

/// Q5_0 on AVX2 for a prompt's many tokens, from a tile `unpack_q5_0_avx2` unpacked:
/// the same integers and float steps as `q5_0_avx2`, computed the other way round.
/// The weights are the signed operand of `vpmaddubsw`, read straight from memory, and
/// the activations `y + 128` the unsigned one, so one broadcast of a token's four
/// bytes serves both halves of the tile; `Σ(y + 128)(q − 16) − 128·Σ(q − 16)` is
/// `Σ y·(q − 16)`, the integer `q5_0_avx2` gets as `Σ y·q − 16·Σ y`. Pairs of
/// products reach 2·255·16 = 8160, so four sum in i16 without saturating. A token
/// runs through `UNPACKED_CHUNK` blocks at a time, all tokens per chunk, its sums kept
/// in `out` between chunks: the same additions in the same order.
///
/// # Safety
/// AVX2 + FMA + F16C present; `unpacked` holds a tile of `kb` blocks unpacked by
/// `unpack_q5_0_avx2`; each of `acts` has `kb` blocks; `acts.len() == out.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_0_avx2_unpacked(kb: usize, unpacked: *const __m256i, acts: &[&[ActBlock]], out: &mut [[f32; TILE]]) {
    let flip = _mm256_set1_epi8(-128);
    let ones = _mm256_set1_epi16(1);
    for first in (0..kb).step_by(UNPACKED_CHUNK) {
        let blocks = UNPACKED_CHUNK.min(kb - first);
        for (a_row, o) in acts.iter().zip(out.iter_mut()) {
            let o = o.as_mut_ptr();
            // SAFETY: `o` is 16 floats; `a` and `u` stay in the row's and the tile's
            // blocks `first..first + blocks` (the contract).
            unsafe {
                let mut acc = if first == 0 {
                    [_mm256_setzero_ps(); 2]
                } else {
                    [_mm256_loadu_ps(o), _mm256_loadu_ps(o.wrapping_add(8))]
                };
                let mut a = a_row.as_ptr().wrapping_add(first).cast::<u8>();
                let mut u = unpacked.wrapping_add(first * 2 * UNPACKED_HALF);
                for _ in 0..blocks {
                    let y: [__m256i; 8] = std::array::from_fn(|g| _mm256_xor_si256(bcast256(a, g), flip));
                    let da = bcast256_f32(a, ACT_D);
                    for (hf, acc) in acc.iter_mut().enumerate() {
                        let w = u.wrapping_add(hf * UNPACKED_HALF);
                        let p = |g: usize| _mm256_maddubs_epi16(y[g], _mm256_load_si256(w.wrapping_add(g)));
                        let low = _mm256_add_epi16(_mm256_add_epi16(p(0), p(1)), _mm256_add_epi16(p(2), p(3)));
                        let high = _mm256_add_epi16(_mm256_add_epi16(p(4), p(5)), _mm256_add_epi16(p(6), p(7)));
                        let isum = _mm256_add_epi32(
                            _mm256_add_epi32(_mm256_madd_epi16(low, ones), _mm256_madd_epi16(high, ones)),
                            _mm256_load_si256(w.wrapping_add(8)),
                        );
                        let dw = _mm256_castsi256_ps(_mm256_load_si256(w.wrapping_add(9)));
                        *acc = _mm256_add_ps(*acc, _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(isum), dw), da));
                    }
                    a = a.wrapping_add(ACT_STRIDE);
                    u = u.wrapping_add(2 * UNPACKED_HALF);
                }
                _mm256_storeu_ps(o, acc[0]);
                _mm256_storeu_ps(o.wrapping_add(8), acc[1]);
            }
        }
    }
}

thread_local! {
    /// A Q5_0 tile unpacked once for all the tokens of one call (see `tile_dot`).
    static UNPACKED_Q5_0: std::cell::RefCell<Vec<__m256i>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Q5_0 on AVX2, per tile half (8 rows): the arithmetic of `q5_0_avx512` (candle's
/// scalar `vec_dot_unopt` order, `sum += f32(isum)·d_w·d_y` per block, no FMA). The
/// fifth bits come from the same masks, expanded to bytes (`fifth_bits256`), so the
/// values are `q + 16` in 0..32 as there. `vpmaddubsw` pairs reach 2·31·128 = 7936,
/// so four of them sum in i16 without overflow, and the two halves of a block
/// (groups 0..4 and 4..8) are widened to i32 before they are added.
///
/// Expanding the fifth bits costs about as much as a token's products, so a prompt's
/// many tokens read the tile unpacked once instead (`q5_0_avx2_unpacked`); this serves
/// a decode step's few.
///
/// # Safety
/// AVX2 + FMA + F16C present; otherwise as `q5_0_avx512`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_0_avx2<const T: usize>(
    tile: *const u8,
    kb: usize,
    qs_offset: usize,
    acts: [*const ActBlock; T],
    out: *mut [f32; TILE],
) {
    let ones = _mm256_set1_epi16(1);
    for hf in 0..2 {
        let mut acc = [_mm256_setzero_ps(); T];
        let mut q = tile.wrapping_add(qs_offset + hf * 32);
        let mut d = tile.wrapping_add(hf * 16);
        let mut h = tile.wrapping_add(kb * TILE * 2 + hf * 4);
        let mut a = act_bytes(acts);
        for _ in 0..kb {
            // SAFETY: as in `q5_0_avx512`; the half offset stays inside each section
            // (rows 8·hf.. are bytes 32·hf.. of each group and bits 32·hf.. of each
            // mask, a 4-byte-aligned word).
            unsafe {
                if hf == 0 {
                    prefetch_lines::<4>(q);
                    prefetch_lines::<1>(h);
                }
                let w = q5_0_vectors(q, h);
                let dw = _mm256_cvtph_ps(_mm_load_si128(d.cast()));
                for t in 0..T {
                    let at = a[t];
                    let p = |g: usize| _mm256_maddubs_epi16(w[g], bcast256(at, g));
                    let low = _mm256_add_epi16(_mm256_add_epi16(p(0), p(1)), _mm256_add_epi16(p(2), p(3)));
                    let high = _mm256_add_epi16(_mm256_add_epi16(p(4), p(5)), _mm256_add_epi16(p(6), p(7)));
                    // |Σy| ≤ 32·128: `-16·Σy` is far inside i32.
                    let offset = _mm256_set1_epi32(-16 * *at.wrapping_add(ACT_SUM).cast::<i32>());
                    let isum = _mm256_add_epi32(
                        _mm256_add_epi32(_mm256_madd_epi16(low, ones), _mm256_madd_epi16(high, ones)),
                        offset,
                    );
                    let dot = _mm256_mul_ps(
                        _mm256_mul_ps(_mm256_cvtepi32_ps(isum), dw),
                        bcast256_f32(at, ACT_D),
                    );
                    acc[t] = _mm256_add_ps(acc[t], dot);
                }
            }
            q = q.wrapping_add(TILE * 16);
            d = d.wrapping_add(TILE * 2);
            h = h.wrapping_add(TILE * 4);
            a = a.map(|p| p.wrapping_add(ACT_STRIDE));
        }
        for t in 0..T {
            // SAFETY: `out` has T rows of 16 floats; hf·8 + 8 ≤ 16.
            unsafe {
                _mm256_storeu_ps(out.wrapping_add(t).cast::<f32>().wrapping_add(hf * 8), acc[t])
            };
        }
    }
}

/// # Safety
/// AVX2 + FMA + F16C present; otherwise as `q4_1_avx512`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1_avx2<const T: usize>(
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
            // SAFETY: as in `q4_1_avx512`; the half offset stays inside each section.
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
                let mw = _mm256_cvtph_ps(_mm_load_si128(m.cast()));
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
                    let isum = _mm256_madd_epi16(p, ones);
                    // candle's exact order, without FMA (see `q4_1_avx512`).
                    let dot = _mm256_mul_ps(
                        _mm256_mul_ps(_mm256_cvtepi32_ps(isum), dw),
                        bcast256_f32(at, ACT_D),
                    );
                    let min = _mm256_mul_ps(mw, bcast256_f32(at, ACT_S));
                    acc[t] = _mm256_add_ps(acc[t], _mm256_add_ps(dot, min));
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
                _mm256_storeu_ps(
                    out.wrapping_add(t).cast::<f32>().wrapping_add(h * 8),
                    acc[t],
                )
            };
        }
    }
}

/// Q4_0 on AVX2: per tile half (8 rows), one accumulator per (token, group). Nibbles
/// are unsigned, so `vpmaddubsw` takes them directly (pair sums ≤ 2·15·128, no
/// saturation) and the +8 comes off with the group offset.
///
/// # Safety
/// AVX2 + FMA + F16C present; otherwise as `q0_avx512` for Q4_0.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_0_avx2<const T: usize>(
    tile: *const u8,
    kb: usize,
    qs_offset: usize,
    acts: [*const ActBlock; T],
    offs: [*const GroupOffsets; T],
    out: *mut [f32; TILE],
) {
    let mask = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    for h in 0..2 {
        let mut acc = [[_mm256_setzero_ps(); GROUPS]; T];
        let mut q = tile.wrapping_add(qs_offset + h * 32);
        let mut d = tile.wrapping_add(h * 16);
        let mut a = act_bytes(acts);
        let mut o = offs.map(|p| p.cast::<u8>());
        for _ in 0..kb {
            // SAFETY: as in `q0_avx512`; the half offset stays inside each section.
            unsafe {
                if h == 0 {
                    prefetch_lines::<4>(q);
                }
                let dw = _mm256_cvtph_ps(_mm_load_si128(d.cast()));
                let scale: [__m256; T] =
                    std::array::from_fn(|t| _mm256_mul_ps(dw, bcast256_f32(a[t], ACT_D)));
                macro_rules! group {
                    ($g:expr, $w:expr) => {
                        let w = $w;
                        for t in 0..T {
                            let off = _mm256_broadcastd_epi32(load_word(o[t].wrapping_add($g * 4)));
                            let p = _mm256_maddubs_epi16(w, bcast256(a[t], $g));
                            let s = _mm256_add_epi32(_mm256_madd_epi16(p, ones), off);
                            acc[t][$g] =
                                _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale[t], acc[t][$g]);
                        }
                    };
                }
                unroll!(G in [0, 1, 2, 3] {
                    let w = _mm256_load_si256(q.wrapping_add(G * 64).cast());
                    group!(G, _mm256_and_si256(w, mask));
                    group!(G + 4, _mm256_and_si256(_mm256_srli_epi16::<4>(w), mask));
                });
            }
            q = q.wrapping_add(TILE * 16);
            d = d.wrapping_add(TILE * 2);
            a = a.map(|p| p.wrapping_add(ACT_STRIDE));
            o = o.map(|p| p.wrapping_add(OFFS_STRIDE));
        }
        for t in 0..T {
            // SAFETY: `out` has T rows of 16 floats; h·8 + 8 ≤ 16.
            unsafe {
                _mm256_storeu_ps(
                    out.wrapping_add(t).cast::<f32>().wrapping_add(h * 8),
                    hsum_groups256(&acc[t]),
                )
            };
        }
    }
}

/// Q8_0 on AVX2: per tile half (8 rows), one accumulator per (token, group), with
/// candle's own `|w| · sign(y, w)` trick so `vpmaddubsw` sees the same byte pairs as
/// candle's (pair sums ≤ 2·128·127, no saturation).
///
/// # Safety
/// AVX2 + FMA + F16C present; otherwise as `q0_avx512` for Q8_0.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_avx2<const T: usize>(
    tile: *const u8,
    kb: usize,
    qs_offset: usize,
    acts: [*const ActBlock; T],
    out: *mut [f32; TILE],
) {
    let flip = _mm256_set1_epi8(-128);
    let ones = _mm256_set1_epi16(1);
    for h in 0..2 {
        let mut acc = [[_mm256_setzero_ps(); GROUPS]; T];
        let mut q = tile.wrapping_add(qs_offset + h * 32);
        let mut d = tile.wrapping_add(h * 16);
        let mut a = act_bytes(acts);
        for _ in 0..kb {
            // SAFETY: as in `q0_avx512`; the half offset stays inside each section.
            unsafe {
                if h == 0 {
                    prefetch_lines::<8>(q);
                }
                let dw = _mm256_cvtph_ps(_mm_load_si128(d.cast()));
                let scale: [__m256; T] =
                    std::array::from_fn(|t| _mm256_mul_ps(dw, bcast256_f32(a[t], ACT_D)));
                unroll!(G in [0, 1, 2, 3, 4, 5, 6, 7] {
                    // Undo the +128 storage offset.
                    let w = _mm256_xor_si256(_mm256_load_si256(q.wrapping_add(G * 64).cast()), flip);
                    let aw = _mm256_sign_epi8(w, w);
                    for t in 0..T {
                        let p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(bcast256(a[t], G), w));
                        let s = _mm256_madd_epi16(p, ones);
                        acc[t][G] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale[t], acc[t][G]);
                    }
                });
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
                    hsum_groups256(&acc[t]),
                )
            };
        }
    }
}
