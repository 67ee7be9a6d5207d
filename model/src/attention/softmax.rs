//! A row's softmax weights: `exp(s − max)` for every score, by libm's `expf` to the
//! bit, and their sum in key order.
//!
//! libm's `expf` (FreeBSD's, in `f32`) is what every stage uses, so that a Windows
//! worker and a Linux one agree; called once per score it took a quarter of a Gemma 3
//! prefill's attention. Where the CPU has AVX-512, sixteen scores at a time go through
//! the same algorithm written out for a register: the same multiplies, adds and one
//! division in the same order, never fused, each branch of the scalar code a lane
//! mask, so every lane is the scalar function's bits (a test compares them over the
//! whole input range these weights see, `x ≤ 0`). Lanes the vector copy does not
//! cover (positive or NaN, which a score minus the row's maximum never is unless a
//! score is NaN) send their sixteen to the scalar function.

/// Replaces each score by `exp(score − max)` and returns the sum of those weights,
/// added in order.
pub(super) fn exp_weights(scores: &mut [f32]) -> f32 {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    #[cfg(target_arch = "x86_64")]
    let done = if is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512 F was just detected.
        unsafe { x16::exp_shifted(scores, max) }
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    for w in &mut scores[done..] {
        *w = libm::expf(*w - max);
    }
    let mut sum = 0f32;
    for &w in scores.iter() {
        sum += w;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod x16 {
    use std::arch::x86_64::*;

    // libm's constants (`src/math/expf.rs`, from FreeBSD's `e_expf.c`), by their bits:
    // a decimal literal off by one digit is one ulp off (1.4426951 is not INV_LN2).
    const LN2_HI: f32 = f32::from_bits(0x3f31_7200);
    const LN2_LO: f32 = f32::from_bits(0x35bf_be8e);
    const INV_LN2: f32 = f32::from_bits(0x3fb8_aa3b);
    const P1: f32 = f32::from_bits(0x3e2a_aa8f);
    const P2: f32 = f32::from_bits(0xbb35_5215);

    /// `exp(s − max)` in place for whole groups of sixteen from the start; returns how
    /// many it did (the rest, fewer than sixteen, are the caller's).
    ///
    /// # Safety
    /// AVX-512 F present.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_shifted(scores: &mut [f32], max: f32) -> usize {
        let max = _mm512_set1_ps(max);
        let whole = scores.len() - scores.len() % 16;
        for group in scores[..whole].chunks_exact_mut(16) {
            // SAFETY: `group` is 16 floats; unaligned load and store.
            unsafe {
                let x = _mm512_sub_ps(_mm512_loadu_ps(group.as_ptr()), max);
                match expf(x) {
                    Some(e) => _mm512_storeu_ps(group.as_mut_ptr(), e),
                    None => {
                        _mm512_storeu_ps(group.as_mut_ptr(), x);
                        for w in group.iter_mut() {
                            *w = libm::expf(*w);
                        }
                    }
                }
            }
        }
        whole
    }

    /// libm's `expf` in every lane, for lanes that are `≤ 0` (either zero, any
    /// negative, −∞) or of magnitude at most 2⁻¹⁴; `None` if a lane is anything else.
    ///
    /// # Safety
    /// AVX-512 F present.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn expf(x: __m512) -> Option<__m512> {
        let int = _mm512_set1_epi32;
        let float = _mm512_set1_ps;
        let bits = _mm512_castps_si512(x);
        let hx = _mm512_and_si512(bits, int(0x7fff_ffff));
        let negative = _mm512_cmplt_epi32_mask(bits, _mm512_setzero_si512());
        // The scalar code's branches, one mask each (`hx` compares as the scalar's u32).
        let tiny = _mm512_cmple_epi32_mask(hx, int(0x3900_0000)); // |x| ≤ 2⁻¹⁴: 1 + x
        let nan = _mm512_cmpgt_epi32_mask(hx, int(0x7f80_0000));
        if (negative | tiny) & !nan != 0xffff {
            return None;
        }
        let underflow = _mm512_cmpge_epi32_mask(hx, int(0x42cf_f1b5)); // x ≤ −103.97: 0
        let reduce = _mm512_cmpgt_epi32_mask(hx, int(0x3eb1_7218)); // |x| > ln 2 / 2
        let far = _mm512_cmpgt_epi32_mask(hx, int(0x3f85_1592)); // |x| > 1.5 ln 2

        // k: `(INV_LN2·x + (−½)) as i32` far out, −1 between ½ ln 2 and 1.5 ln 2, else 0.
        let k_far = _mm512_cvttps_epi32(_mm512_add_ps(_mm512_mul_ps(float(INV_LN2), x), float(-0.5)));
        let k = _mm512_maskz_mov_epi32(reduce, _mm512_mask_blend_epi32(far, int(-1), k_far));
        let kf = _mm512_cvtepi32_ps(k);
        let hi_reduced = _mm512_sub_ps(x, _mm512_mul_ps(kf, float(LN2_HI)));
        let lo_reduced = _mm512_mul_ps(kf, float(LN2_LO));
        let hi = _mm512_mask_blend_ps(reduce, x, hi_reduced);
        let lo = _mm512_maskz_mov_ps(reduce, lo_reduced);
        let r = _mm512_mask_blend_ps(reduce, x, _mm512_sub_ps(hi_reduced, lo_reduced));

        // y = 1 + (r·c / (2 − c) − lo + hi), c = r − r²·(P1 + r²·P2).
        let rr = _mm512_mul_ps(r, r);
        let c = _mm512_sub_ps(r, _mm512_mul_ps(rr, _mm512_add_ps(float(P1), _mm512_mul_ps(rr, float(P2)))));
        let quotient = _mm512_div_ps(_mm512_mul_ps(r, c), _mm512_sub_ps(float(2.0), c));
        let y = _mm512_add_ps(float(1.0), _mm512_add_ps(_mm512_sub_ps(quotient, lo), hi));

        // scalbn(y, k): below 2⁻¹²⁶ first times 2⁻¹⁰², then the rest (k = 0: times 1).
        let subnormal = _mm512_cmplt_epi32_mask(k, int(-126));
        let y = _mm512_mask_mul_ps(y, subnormal, y, float(f32::from_bits(0x0c80_0000)));
        let k = _mm512_mask_add_epi32(k, subnormal, k, int(102));
        let scale = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(k, int(127))));
        let y = _mm512_mul_ps(y, scale);

        let y = _mm512_mask_blend_ps(tiny, y, _mm512_add_ps(float(1.0), x));
        Some(_mm512_maskz_mov_ps(!underflow, y))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Every lane against libm over `x ≤ 0` (a stride through all negative floats,
        /// and every bit pattern around each branch's threshold), plus tiny positives.
        /// (With a stride of 1, every negative float, it passed too: 40 s in release.)
        #[test]
        fn lanes_are_libms_bits() {
            if !is_x86_feature_detected!("avx512f") {
                eprintln!("SKIPPED: no AVX-512 on this CPU; the scalar libm expf runs instead");
                return;
            }
            let mut inputs: Vec<u32> = (0x8000_0000u32..=0xff80_0000).step_by(4099).collect();
            for edge in [0x3900_0000u32, 0x3eb1_7218, 0x3f85_1592, 0x42ae_ac50, 0x42cf_f1b5, 0x42b1_7218] {
                inputs.extend((edge - 300..edge + 300).map(|b| b | 0x8000_0000));
            }
            inputs.extend([0x8000_0000, 0xff80_0000, 0x8000_0001, 0x807f_ffff, 0, 1, 0x3900_0000, 0x3800_0000]);
            for group in inputs.chunks(16) {
                let mut lanes = [0f32; 16];
                for (l, &b) in lanes.iter_mut().zip(group.iter().cycle()) {
                    *l = f32::from_bits(b);
                }
                // SAFETY: AVX-512 F detected above.
                let got = unsafe { expf(_mm512_loadu_ps(lanes.as_ptr())) }.expect("all lanes in range");
                let mut out = [0f32; 16];
                // SAFETY: 16 floats.
                unsafe { _mm512_storeu_ps(out.as_mut_ptr(), got) };
                for (x, e) in lanes.iter().zip(out) {
                    assert_eq!(e.to_bits(), libm::expf(*x).to_bits(), "expf({x:e}) (bits {:#x})", x.to_bits());
                }
            }
        }

        #[test]
        fn positive_and_nan_lanes_are_left_to_libm() {
            if !is_x86_feature_detected!("avx512f") {
                eprintln!("SKIPPED: no AVX-512 on this CPU; the scalar libm expf runs instead");
                return;
            }
            for odd in [1.0f32, f32::NAN, 0.5, f32::INFINITY] {
                let mut lanes = [-1f32; 16];
                lanes[7] = odd;
                // SAFETY: AVX-512 F detected above.
                assert!(unsafe { expf(_mm512_loadu_ps(lanes.as_ptr())) }.is_none(), "{odd}");
            }
            let mut scores: Vec<f32> = (0..37).map(|i| i as f32 * 0.37 - 5.0).collect();
            scores[20] = f32::NAN;
            let want: Vec<u32> = {
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                scores.iter().map(|s| libm::expf(s - max).to_bits()).collect()
            };
            super::super::exp_weights(&mut scores);
            assert_eq!(scores.iter().map(|w| w.to_bits()).collect::<Vec<_>>(), want);
        }
    }
}
