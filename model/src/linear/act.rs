//! Activation quantization to Q8_1, bit-for-bit as candle's `BlockQ8_1::from_float`
//! computes it (its `qs` and `d` also match llama.cpp's `quantize_row_q8_1`; candle
//! rounds `s` through f16 once more), but stored in a layout the tile kernels can
//! broadcast from directly.
//!
//! Exactness matters here: with the same 8-bit activations the integer part of every
//! block dot product equals candle's, and the kernels then repeat candle's float steps.
//! Q8_0 activations (what candle pairs with Q4_0/Q8_0 weights: `BlockQ8_0::from_float`,
//! `d = amax/127`, `round(x/d)`, `d` stored as f16) have the same `qs` and `d` as Q8_1
//! (`quantization_matches_candle_q8_0` checks it), so one quantization serves every
//! weight format; the Q4_0/Q8_0 kernels additionally take `GroupOffsets`.

use half::f16;

/// Elements per quantization block (QK8_1 = QK8_0 = QK4_0 = QK4_1).
pub(crate) const QK: usize = 32;

/// One Q8_1 block of one activation row.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(C, align(16))]
pub(crate) struct ActBlock {
    pub(crate) qs: [i8; QK],
    /// The block scale, already rounded through f16 as ggml stores it.
    pub(crate) d: f32,
    /// Q8_1's `s = d * Σqs`, rounded through f16 exactly as candle does.
    pub(crate) s: f32,
    /// `Σqs`, exact: Q5_0's kernel starts each block's integer sum from `-16·Σqs`.
    /// (It fills what was padding: the block is 48 bytes either way.)
    pub(crate) sum: i32,
}

/// Elements per group: candle's AVX2 Q4_0/Q8_0 dot products keep one f32 accumulator
/// per 4-element group of a block (a `vpmaddubsw` + `vpmaddwd` lane), so our kernels
/// need the exact integer sum of each group separately.
pub(crate) const GROUP: usize = 4;
pub(crate) const GROUPS: usize = QK / GROUP;

/// `-mul · Σ qs[4g..4g+4]` for each group `g` of one activation block: the exact
/// correction for weights stored with a `+mul` offset (Q8_0 as `q + 128`, Q4_0's
/// nibbles being `q + 8`), used as the starting value of each group's integer sum.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(C, align(32))]
pub(crate) struct GroupOffsets(pub(crate) [i32; GROUPS]);

/// Fills `out[b]` with block `b`'s group offsets for a weight offset of `mul`.
pub(crate) fn group_offsets(acts: &[ActBlock], mul: i32, out: &mut [GroupOffsets]) {
    assert_eq!(
        acts.len(),
        out.len(),
        "activation / offset block count mismatch"
    );
    for (a, o) in acts.iter().zip(out.iter_mut()) {
        for (off, qs) in o.0.iter_mut().zip(a.qs.chunks_exact(GROUP)) {
            // |Σ| ≤ 4·128 and mul ≤ 128: far inside i32, so plain arithmetic is exact.
            let sum: i32 = qs.iter().map(|&v| v as i32).sum();
            *off = -mul * sum;
        }
    }
}

/// The per-block tail shared by both quantizers: scale and sum rounding through f16.
#[inline]
fn finish_block(d: f32, sum: i32, out: &mut ActBlock) {
    let d16 = f16::from_f32(d);
    // candle: `ys.s = f16::from_f32(sum as f32) * ys.d` — an f16 product, i.e. both
    // operands widened, multiplied in f32 and rounded back to f16.
    let s16 = f16::from_f32(sum as f32) * d16;
    out.d = d16.to_f32();
    out.s = s16.to_f32();
    out.sum = sum;
}

/// Portable quantizer; the reference the SIMD one is tested against.
pub(crate) fn quantize_row_scalar(x: &[f32], out: &mut [ActBlock]) {
    debug_assert_eq!(x.len(), out.len() * QK);
    for (xs, blk) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let mut amax = 0f32;
        for &v in xs {
            amax = amax.max(v.abs());
        }
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in blk.qs.iter_mut().zip(xs) {
            *q = f32::round(v * id) as i8;
            sum += *q as i32;
        }
        finish_block(d, sum, blk);
    }
}

/// Quantizes one activation row; `x.len()` must equal `out.len() * QK`. `simd` asks
/// for the AVX2 version (same results, used where the CPU has it).
pub(crate) fn quantize_row(x: &[f32], out: &mut [ActBlock], simd: bool) {
    assert_eq!(
        x.len(),
        out.len() * QK,
        "activation row / block count mismatch"
    );
    #[cfg(target_arch = "x86_64")]
    if simd && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the features were just detected (a cached load), and the lengths
        // were checked above.
        unsafe { quantize_row_avx2(x, out) };
        return;
    }
    let _ = simd;
    quantize_row_scalar(x, out);
}

/// `f32::round(s) as i8` for 8 lanes, as i32s: rounded half away from zero, which no
/// SSE/AVX rounding mode does (so: truncate, then step away from zero when the dropped
/// part is ≥ ½, both exact for every finite f32), saturated to −128..=127 (±inf
/// included) and NaN to 0, as `as i8` does. The quantizers of `act.rs` and
/// `kquant.rs` share it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub(super) fn round_to_i8(s: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let sign_mask = _mm256_set1_ps(-0.0);
    let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(s);
    let frac = _mm256_andnot_ps(sign_mask, _mm256_sub_ps(s, t));
    let away = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(frac, _mm256_set1_ps(0.5)), _mm256_set1_ps(1.0));
    let r = _mm256_add_ps(t, _mm256_or_ps(away, _mm256_and_ps(s, sign_mask)));
    let r = _mm256_min_ps(_mm256_max_ps(r, _mm256_set1_ps(-128.0)), _mm256_set1_ps(127.0));
    let ord = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_ORD_Q>(s, s));
    _mm256_and_si256(_mm256_cvttps_epi32(r), ord)
}

/// Four vectors of i32s in −128..=127 as 32 bytes, in order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub(super) fn pack_bytes(ints: [std::arch::x86_64::__m256i; 4]) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let p16a = _mm256_packs_epi32(ints[0], ints[1]);
    let p16b = _mm256_packs_epi32(ints[2], ints[3]);
    // packs_epi32/packs_epi16 interleave 128-bit lanes; this puts the bytes back in order.
    _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p16a, p16b), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_row_avx2(x: &[f32], out: &mut [ActBlock]) {
    use std::arch::x86_64::*;

    let sign_mask = _mm256_set1_ps(-0.0);

    for (xs, blk) in x.chunks_exact(QK).zip(out.iter_mut()) {
        // `lddqu` rather than `_mm256_loadu_ps`: the latter is a `read_unaligned` that
        // debug builds (which this project runs) wrap in precondition checks.
        let p = xs.as_ptr().cast::<__m256i>();
        // SAFETY: `xs` has exactly QK = 32 floats, i.e. four unaligned 8-float loads.
        let v: [__m256; 4] = unsafe {
            [
                _mm256_castsi256_ps(_mm256_lddqu_si256(p)),
                _mm256_castsi256_ps(_mm256_lddqu_si256(p.wrapping_add(1))),
                _mm256_castsi256_ps(_mm256_lddqu_si256(p.wrapping_add(2))),
                _mm256_castsi256_ps(_mm256_lddqu_si256(p.wrapping_add(3))),
            ]
        };
        // maxps returns its second operand when either is NaN, so NaNs are skipped just
        // like `f32::max` skips them in the scalar loop.
        let mut m = _mm256_setzero_ps();
        for &vi in &v {
            m = _mm256_max_ps(_mm256_andnot_ps(sign_mask, vi), m);
        }
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let m1 = _mm_max_ss(m2, _mm_movehdup_ps(m2));
        let amax = _mm_cvtss_f32(m1);

        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let idv = _mm256_set1_ps(id);

        let mut ints = [_mm256_setzero_si256(); 4];
        for (vi, out_i) in v.iter().zip(ints.iter_mut()) {
            *out_i = round_to_i8(_mm256_mul_ps(*vi, idv));
        }
        let sum_v = _mm256_add_epi32(
            _mm256_add_epi32(ints[0], ints[1]),
            _mm256_add_epi32(ints[2], ints[3]),
        );
        let s4 = _mm_add_epi32(
            _mm256_castsi256_si128(sum_v),
            _mm256_extracti128_si256::<1>(sum_v),
        );
        let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
        let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32::<0b01>(s2));
        let sum = _mm_cvtsi128_si32(s1);

        let p8 = pack_bytes(ints);
        let q = blk.qs.as_mut_ptr().cast::<__m128i>();
        // SAFETY: `blk.qs` is 32 bytes at the start of a 16-byte-aligned `ActBlock`, so
        // both aligned 16-byte stores are in bounds.
        unsafe {
            _mm_store_si128(q, _mm256_castsi256_si128(p8));
            _mm_store_si128(q.wrapping_add(1), _mm256_extracti128_si256::<1>(p8));
        }
        finish_block(d, sum, blk);
    }
}
