//! The exponential of SiLU, in plain multiplies and adds with no branch and no call:
//! a slice of them vectorises (libm's scalar `expf` took a tenth of a 16-stream
//! decode step on SmolLM2), and every CPU rounds them alike, as the
//! stages of a pipeline must (no platform `expf`, whose Windows C runtime rounds
//! differently from glibc, and no fused multiply-add). `x = n·ln 2 + r` with
//! `|r| ≤ ln 2 / 2`, Cephes' degree-6 polynomial for `eʳ`, and `2ⁿ` built in the
//! exponent bits.

/// `eˣ` within 2 ulp for `x` in −87..=88, clamped to that range outside it (so SiLU's
/// `x / (1 + e⁻ˣ)` stays within a hair of 0 for x below −88, and is x above 87).
#[inline]
pub(crate) fn exp(x: f32) -> f32 {
    // Adding 1.5·2²³ rounds to an integer (ties to even) for |v| < 2²²; the rounded
    // value's low mantissa bits are that integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    // ln 2 in two parts, the first exact in few bits, so `x - n·C1` is exact.
    let r = (x - n * 0.693_359_4) - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // n is in −126..=127 here, so 2ⁿ is a normal float.
    let n = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    e * f32::from_bits((n.wrapping_add(127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_the_true_value() {
        let mut worst = 0f64;
        for i in 0..=2_000_000u32 {
            let x = -87.0 + 175.0 * i as f32 / 2_000_000.0;
            let (got, want) = (f64::from(exp(x)), f64::from(x).exp());
            // One ulp of the true value, as a relative error.
            let ulp = f64::from(f32::EPSILON) * 2f64.powi(want.log2().floor() as i32);
            worst = worst.max((got - want).abs() / ulp);
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NEG_INFINITY) > 0.0 && exp(f32::NEG_INFINITY) < 1e-37);
        assert!(exp(88.0).is_finite() && exp(f32::INFINITY) == exp(88.0));
        for x in [0.5f32, 1.0, 10.0, 88.0] {
            let (got, want) = (f64::from(exp(x)), f64::from(x).exp());
            assert!((got - want).abs() / want < 3e-7, "{x}: {got} vs {want}");
        }
    }
}
