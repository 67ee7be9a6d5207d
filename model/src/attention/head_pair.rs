//! Two query heads that read the same keys (grouped-query attention), side by side in
//! AVX-512 registers: head a's eight lanes in the low half, head b's in the high half.
//!
//! Each lane does exactly the multiplies and adds its head's lane does in
//! `attend_row` (see the module note of `attention.rs`), in the same order, never
//! fused, so the two heads come out the same bits as two `attend_row` calls on any
//! CPU. What changes is the work per instruction: a key or value row is loaded once
//! for both heads, and every multiply and add covers sixteen lanes instead of eight.
//! On a Gemma 3 prefill (four query heads over one KV head) attention took about a
//! tenth of the time, nearly all of it these multiplies and adds.

use std::arch::x86_64::*;

/// Lanes of one head's partial sums (`d mod 8`), as in `attention.rs`.
const LANES: usize = 8;
/// Output chunks of eight held in registers while the keys stream past: 8 of the 32
/// zmm registers, so the values are read once per 64 dimensions rather than once per
/// chunk with the outputs loaded and stored around each key.
const OUT_BLOCK: usize = 8;
/// Keys scored together.
const KEYS_AT_ONCE: usize = 8;

/// One thread's scratch room, kept across rows.
#[derive(Default)]
pub(super) struct PairScratch {
    /// `[d / 8][16]`: head a's dimensions `8c..8c+8`, then head b's.
    queries: Vec<f32>,
    /// Head a's scores of every key, then head b's.
    scores: Vec<f32>,
    /// `[n][16]`: key j's softmax weight of head a eight times, then head b's.
    weights: Vec<f32>,
}

impl PairScratch {
    /// Floats held.
    pub(super) fn capacity(&self) -> usize {
        self.queries.capacity() + self.scores.capacity() + self.weights.capacity()
    }
}

/// Whether this CPU runs `attend_pair` for heads of `d` dimensions.
pub(super) fn available(d: usize) -> bool {
    d.is_multiple_of(LANES) && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512dq")
}

/// Heads a and b (`q_a`, `q_b`, each `d` long) over the same visible keys and values
/// (`n` rows of `d`, `n ≥ 1`), into `out`: head a's `d` results, then head b's.
///
/// # Safety
/// `available(d)` was true.
#[target_feature(enable = "avx512f,avx512dq")]
pub(super) unsafe fn attend_pair(
    q_a: &[f32],
    q_b: &[f32],
    keys: &[f32],
    values: &[f32],
    scale: f32,
    scratch: &mut PairScratch,
    out: &mut [f32],
) {
    let d = q_a.len();
    let n = keys.len() / d;
    assert!(d.is_multiple_of(LANES) && d > 0 && q_b.len() == d, "query lengths {d} and {}", q_b.len());
    assert!(n > 0 && keys.len() == n * d && values.len() == n * d && out.len() == 2 * d, "attend_pair shapes");
    let chunks = d / LANES;

    let queries = &mut scratch.queries;
    queries.clear();
    for c in 0..chunks {
        queries.extend_from_slice(&q_a[c * LANES..(c + 1) * LANES]);
        queries.extend_from_slice(&q_b[c * LANES..(c + 1) * LANES]);
    }

    // Scores, eight keys at a time: eight chains of adds in flight, where fewer wait on
    // the adds' latency. (A key's sums do not depend on its neighbours.)
    let scores = &mut scratch.scores;
    scores.clear();
    scores.resize(2 * n, 0.0);
    let key = |j: usize| &keys[j * d..(j + 1) * d];
    let mut j = 0;
    while j + KEYS_AT_ONCE <= n {
        let group: [&[f32]; KEYS_AT_ONCE] = std::array::from_fn(|t| key(j + t));
        // SAFETY: AVX-512 F/DQ (this function's features); lengths checked above.
        let dots = unsafe { dots_pair(queries, group) };
        for (t, (a, b)) in dots.into_iter().enumerate() {
            scores[j + t] = a * scale;
            scores[n + j + t] = b * scale;
        }
        j += KEYS_AT_ONCE;
    }
    for j in j..n {
        // SAFETY: as above.
        let [(a, b)] = unsafe { dots_pair(queries, [key(j)]) };
        scores[j] = a * scale;
        scores[n + j] = b * scale;
    }

    // Softmax weights, each head's exactly as `attend_row_portable` makes them.
    let (scores_a, scores_b) = scores.split_at_mut(n);
    let sum_a = super::softmax::exp_weights(scores_a);
    let sum_b = super::softmax::exp_weights(scores_b);
    let weights = &mut scratch.weights;
    weights.clear();
    for (&a, &b) in scores_a.iter().zip(scores_b.iter()) {
        weights.extend_from_slice(&[a; LANES]);
        weights.extend_from_slice(&[b; LANES]);
    }

    let sums = _mm512_insertf32x8::<1>(_mm512_set1_ps(sum_a), _mm256_set1_ps(sum_b));
    let mut c = 0;
    while c + OUT_BLOCK <= chunks {
        // SAFETY: as above; chunks c..c + OUT_BLOCK are within d.
        unsafe { weighted_values::<OUT_BLOCK>(weights, values, d, c, sums, out) };
        c += OUT_BLOCK;
    }
    for c in c..chunks {
        // SAFETY: as above.
        unsafe { weighted_values::<1>(weights, values, d, c, sums, out) };
    }
}

/// Each key's two scores (head a, head b), unscaled: per lane `Σ q·k` in order of the
/// dimension, then the lanes added as `attention::lane_sum` adds them.
///
/// # Safety
/// AVX-512 F/DQ present; `queries` is `[d / 8][16]` and every key `d` long.
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn dots_pair<const N: usize>(queries: &[f32], keys: [&[f32]; N]) -> [(f32, f32); N] {
    let d = queries.len() / 2;
    assert!(keys.iter().all(|k| k.len() == d));
    let mut acc = [_mm512_setzero_ps(); N];
    for c in 0..d / LANES {
        // SAFETY: 16 floats at 16c of `queries` and 8 at 8c of each key are in bounds.
        unsafe {
            let q = _mm512_loadu_ps(queries.as_ptr().add(c * 2 * LANES));
            for (acc, k) in acc.iter_mut().zip(&keys) {
                let k = _mm512_broadcast_f32x8(_mm256_loadu_ps(k.as_ptr().add(c * LANES)));
                *acc = _mm512_add_ps(*acc, _mm512_mul_ps(q, k));
            }
        }
    }
    acc.map(|acc| {
        let mut l = [[0f32; LANES]; 2];
        // SAFETY: `l` is 16 floats; an unaligned store.
        unsafe { _mm512_storeu_ps(l.as_mut_ptr().cast(), acc) };
        (super::lane_sum(&l[0]), super::lane_sum(&l[1]))
    })
}

/// Output chunks `c0..c0 + B` of both heads: `Σ_j w_j·v_j` in key order from zero, as
/// `attend_row_portable` adds them, then divided by the head's weight sum.
///
/// # Safety
/// AVX-512 F/DQ present; `weights` is `[n][16]`, `values` `n` rows of `d`,
/// `c0 + B ≤ d / 8`, `out` `2d` long.
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn weighted_values<const B: usize>(
    weights: &[f32],
    values: &[f32],
    d: usize,
    c0: usize,
    sums: __m512,
    out: &mut [f32],
) {
    let n = weights.len() / (2 * LANES);
    assert!((c0 + B) * LANES <= d && values.len() == n * d && out.len() == 2 * d);
    let mut acc = [_mm512_setzero_ps(); B];
    for j in 0..n {
        // SAFETY: key j's 16 weights and its value row's chunks c0..c0 + B are in bounds.
        unsafe {
            let w = _mm512_loadu_ps(weights.as_ptr().add(j * 2 * LANES));
            let v = values.as_ptr().add(j * d + c0 * LANES);
            for (b, acc) in acc.iter_mut().enumerate() {
                let x = _mm512_broadcast_f32x8(_mm256_loadu_ps(v.add(b * LANES)));
                *acc = _mm512_add_ps(*acc, _mm512_mul_ps(w, x));
            }
        }
    }
    for (b, acc) in acc.into_iter().enumerate() {
        let r = _mm512_div_ps(acc, sums);
        let at = (c0 + b) * LANES;
        // SAFETY: dimensions `at..at + 8` of either head are within `out`.
        unsafe {
            _mm256_storeu_ps(out.as_mut_ptr().add(at), _mm512_castps512_ps256(r));
            _mm256_storeu_ps(out.as_mut_ptr().add(d + at), _mm512_extractf32x8_ps::<1>(r));
        }
    }
}
