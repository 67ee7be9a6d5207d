//! Causal attention on the CPU, one query row at a time in a fixed order, so that a
//! row's result does not depend on how many rows share its step.
//!
//! Why not candle's matmuls: `q·kᵀ` and `p·v` as batched matmuls go through gemm,
//! whose blocking — and so its summation order — changes with the number of query rows.
//! A prompt prefilled in one frame then differed from the same prompt in frames of 8,
//! or decoded token by token (logits apart by up to 1 on SmolLM2, 7 on Gemma 3, once
//! the 8-bit activations amplified the last-bit differences): a replay or a split cut
//! differently was not exact. Here every query row sees exactly its visible keys, and
//! every sum runs in one order:
//! - a score is `Σ_d q[d]·k[d]` over eight lanes (`d mod 8`), each summed in order of
//!   `d`, then added as `((l0+l4)+(l2+l6))+((l1+l5)+(l3+l7))`, times the scale;
//! - the weights are `exp(s − max)` (a pure-Rust `expf`, the same on every platform),
//!   summed in key order;
//! - the output is `Σ_j w_j·v_j` in key order, divided by that sum.
//!
//! Plain multiplies and adds, never fused, so any CPU computes the same bits (the
//! compiler may vectorise across `d` lanes but not reorder a lane's sum).

#[cfg(target_arch = "x86_64")]
mod head_pair;
mod softmax;

use std::mem::MaybeUninit;

use candle_core::{Device, Storage, Tensor};

use crate::cpu_buffer::{written, zeroed, SharedOut};
use crate::error::{Error, Result};

/// Below this many multiply-adds a call stays on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 16;

/// What one call attends: queries `[heads, len, d]` at positions `position..+len`
/// over keys and values `[kv_heads, n, d]` at positions `first..first + n`.
pub(crate) struct Attend<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub first: usize,
    pub position: usize,
    pub window: Option<usize>,
    pub scale: f32,
}

/// `[len, heads * d]`: every query row attends to keys at or before its own position
/// and, with a window, fewer than `window` back. (The layers call `attend_all`.)
#[cfg(test)]
pub(crate) fn attend(a: &Attend<'_>) -> Result<Tensor> {
    attend_all(std::slice::from_ref(a))
}

/// Several sequences' attention in one call, `[Σ len, heads * d]` with each one's rows
/// in the order given: one pass of the thread pool over every (sequence, head, row),
/// rather than one per sequence, which left threads idle on a batch of decode steps
/// (a handful of heads each) and paid a pool round trip per sequence and layer. A
/// row's arithmetic depends on that row alone, so a sequence's result is the same bits
/// alone or in any batch.
pub(crate) fn attend_all(items: &[Attend<'_>]) -> Result<Tensor> {
    let Some(first) = items.first() else {
        return Err(Error::BadInput("attention over no sequences".into()));
    };
    let (heads, _, d) = first.q.dims3()?;
    let kv_heads = first.k.dim(0)?;
    let mut rows = 0;
    for a in items {
        let (h, len, qd) = a.q.dims3()?;
        let (kvh, n, kd) = a.k.dims3()?;
        if h != heads
            || qd != d
            || kvh != kv_heads
            || kd != d
            || a.v.dims3()? != (kv_heads, n, d)
            || kv_heads == 0
            || !heads.is_multiple_of(kv_heads)
        {
            return Err(Error::BadInput(format!(
                "attention shapes: q {:?}, k {:?}, v {:?}",
                a.q.dims(),
                a.k.dims(),
                a.v.dims()
            )));
        }
        if a.position + len > a.first + n {
            return Err(Error::BadInput(format!(
                "queries up to position {} but keys only up to {}",
                a.position + len,
                a.first + n
            )));
        }
        rows += len;
    }
    // The storage guards first, then the row views borrowing from them. (A copy of
    // the queries, on the calling thread while the pool waited, took a few percent of
    // a Gemma 3 prefill with its fresh pages.)
    let q_storage: Vec<_> = items.iter().map(|a| a.q.storage_and_layout()).collect();
    let queries = items.iter().zip(&q_storage).map(|(a, (s, l))| RowView::new(a.q, s, l)).collect::<Result<Vec<_>>>()?;
    let k_storage: Vec<_> = items.iter().map(|a| a.k.storage_and_layout()).collect();
    let v_storage: Vec<_> = items.iter().map(|a| a.v.storage_and_layout()).collect();
    let keys = items.iter().zip(&k_storage).map(|(a, (s, l))| RowView::new(a.k, s, l)).collect::<Result<Vec<_>>>()?;
    let values = items.iter().zip(&v_storage).map(|(a, (s, l))| RowView::new(a.v, s, l)).collect::<Result<Vec<_>>>()?;
    let head_sets = HeadSet::all(heads, kv_heads, d);
    // Unit u of item `it` (from `first_unit[it]`) is head set `u % sets`, row from the
    // end `u / sets`.
    let mut first_unit = Vec::with_capacity(items.len());
    let mut first_row = Vec::with_capacity(items.len());
    let mut lens = Vec::with_capacity(items.len());
    let (mut units, mut row, mut work) = (0, 0, 0);
    for a in items {
        let (len, n) = (a.q.dim(1)?, a.k.dim(1)?);
        lens.push(len);
        first_unit.push(units);
        first_row.push(row);
        units += head_sets.len() * len;
        row += len;
        work += heads * len * (n.min(a.window.unwrap_or(n)) + 1) * d;
    }
    let fill = |out_rows: &SharedOut<'_, MaybeUninit<f32>>| {
        let run = |range: std::ops::Range<usize>| SCRATCH.with_borrow_mut(|scratch| {
            for u in range {
                let it = first_unit.partition_point(|&f| f <= u) - 1;
                let a = &items[it];
                let len = lens[it];
                // A row's heads one after another (under grouped-query attention they read
                // the same keys, still in cache), and the last rows first: they see the
                // most keys, and the pool's last pieces of work should be the short ones.
                let sets = head_sets.len();
                let (set, i) = (head_sets[(u - first_unit[it]) % sets], len - 1 - (u - first_unit[it]) / sets);
                let position = a.position + i;
                let lo = a.window.map_or(0, |w| (position + 1).saturating_sub(w)).max(a.first);
                let visible = (lo - a.first)..(position + 1 - a.first);
                // SAFETY: unit (item, set, i) alone writes its row's slices of the set's heads.
                let dst = unsafe { out_rows.segment(((first_row[it] + i) * heads + set.first()) * d, set.heads() * d) };
                set.attend(
                    |h| queries[it].rows(h, i..i + 1),
                    keys[it].rows(set.kv(), visible.clone()),
                    values[it].rows(set.kv(), visible),
                    a.scale,
                    scratch,
                    dst,
                );
            }
            scratch.trim();
        });
        crate::parallel::run_chunks(units, work >= PARALLEL_MIN_WORK, run);
    };
    // SAFETY: the units cover every head of every row, and each writes its `dst`.
    let out = unsafe { written(rows * heads * d, fill) };
    Ok(Tensor::from_vec(out, (rows, heads * d), &Device::Cpu)?)
}

/// The query heads one unit of work attends: one head, or two that read the same keys
/// where the CPU has `head_pair`'s kernel.
#[derive(Clone, Copy, Debug, PartialEq)]
enum HeadSet {
    One { head: usize, kv: usize },
    Pair { first: usize, kv: usize },
}

impl HeadSet {
    /// Every head of a row once, in order: within each KV head's group, pairs while
    /// two are left (where `head_pair` runs for heads of `d`), then a single.
    fn all(heads: usize, kv_heads: usize, d: usize) -> Vec<HeadSet> {
        #[cfg(target_arch = "x86_64")]
        let pairs = head_pair::available(d);
        #[cfg(not(target_arch = "x86_64"))]
        let pairs = {
            let _ = d;
            false
        };
        let group = heads / kv_heads;
        let mut sets = Vec::with_capacity(heads);
        for kv in 0..kv_heads {
            let mut head = kv * group;
            while head < (kv + 1) * group {
                if pairs && head + 2 <= (kv + 1) * group {
                    sets.push(HeadSet::Pair { first: head, kv });
                    head += 2;
                } else {
                    sets.push(HeadSet::One { head, kv });
                    head += 1;
                }
            }
        }
        sets
    }

    fn first(self) -> usize {
        match self {
            HeadSet::One { head, .. } => head,
            HeadSet::Pair { first, .. } => first,
        }
    }

    fn heads(self) -> usize {
        match self {
            HeadSet::One { .. } => 1,
            HeadSet::Pair { .. } => 2,
        }
    }

    fn kv(self) -> usize {
        match self {
            HeadSet::One { kv, .. } | HeadSet::Pair { kv, .. } => kv,
        }
    }

    /// The set's heads (queries by head) over the visible `keys` and `values` into
    /// `dst`, the heads' slices of the row one after another.
    fn attend<'q>(
        self,
        query: impl Fn(usize) -> &'q [f32],
        keys: &[f32],
        values: &[f32],
        scale: f32,
        scratch: &mut Scratch,
        dst: &mut [MaybeUninit<f32>],
    ) {
        match self {
            HeadSet::One { head, .. } => {
                attend_row(query(head), keys, values, scale, &mut scratch.weights, zeroed(dst))
            }
            #[cfg(target_arch = "x86_64")]
            HeadSet::Pair { first, .. } => {
                // SAFETY: a pair exists only where `head_pair::available(d)` was true.
                let (a, b) = (query(first), query(first + 1));
                unsafe { head_pair::attend_pair(a, b, keys, values, scale, &mut scratch.pair, zeroed(dst)) }
            }
            #[cfg(not(target_arch = "x86_64"))]
            HeadSet::Pair { .. } => unreachable!("pairs are made only on x86_64"),
        }
    }
}

thread_local! {
    /// Each compute thread's scratch room, kept from one operation to the next. Made
    /// afresh for each piece of work, it was allocated and freed a few times a layer on
    /// every thread at once, and the threads waited on the allocator's lock for each
    /// other, each wait a sleep and a wake-up: 3 workers on a 2-core VM (2026-12-06)
    /// had a pool thread asleep on it about 300 times a second.
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// One thread's scratch room, kept across its units and operations.
#[derive(Default)]
struct Scratch {
    weights: Vec<f32>,
    #[cfg(target_arch = "x86_64")]
    pair: head_pair::PairScratch,
}

impl Scratch {
    /// Floats kept from one operation to the next (4 MiB): rows over very long
    /// contexts need more, made for them and let go after.
    const KEPT_FLOATS: usize = 1 << 20;

    fn trim(&mut self) {
        #[cfg(target_arch = "x86_64")]
        let held = self.weights.capacity() + self.pair.capacity();
        #[cfg(not(target_arch = "x86_64"))]
        let held = self.weights.capacity();
        if held > Self::KEPT_FLOATS {
            *self = Self::default();
        }
    }
}

/// The rows of a CPU tensor `[heads, n, d]`: borrowed where each row is contiguous
/// (a KV cache's view), else copied.
struct RowView<'a> {
    data: std::borrow::Cow<'a, [f32]>,
    start: usize,
    head_stride: usize,
    d: usize,
}

impl<'a> RowView<'a> {
    fn new(t: &Tensor, storage: &'a Storage, layout: &candle_core::Layout) -> Result<Self> {
        let (_, n, d) = t.dims3()?;
        if let (Storage::Cpu(cpu), [s0, s1, 1]) = (storage, layout.stride()) {
            if *s1 == d {
                let data = std::borrow::Cow::Borrowed(cpu.as_slice::<f32>()?);
                return Ok(Self { data, start: layout.start_offset(), head_stride: *s0, d });
            }
        }
        let data = std::borrow::Cow::Owned(t.contiguous()?.flatten_all()?.to_vec1::<f32>()?);
        Ok(Self { data, start: 0, head_stride: n * d, d })
    }

    /// Rows `range` of `head`, one after another.
    fn rows(&self, head: usize, range: std::ops::Range<usize>) -> &[f32] {
        let at = self.start + head * self.head_stride;
        &self.data[at + range.start * self.d..at + range.end * self.d]
    }
}

/// One query row over its visible keys and values (rows of `q.len()` values one after
/// another; see the module's note on the order) into `out`, which must be zeros.
/// `weights` is scratch room. Compiled a second time for AVX2 where the CPU has it:
/// plain multiplies and adds either way, so both copies give the same bits, the AVX2
/// one eight lanes to a register.
fn attend_row(q: &[f32], keys: &[f32], values: &[f32], scale: f32, weights: &mut Vec<f32>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was just detected (a cached load).
        return unsafe { attend_row_avx2(q, keys, values, scale, weights, out) };
    }
    attend_row_portable::<false>(q, keys, values, scale, weights, out);
}

/// # Safety
/// AVX2 present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn attend_row_avx2(q: &[f32], keys: &[f32], values: &[f32], scale: f32, weights: &mut Vec<f32>, out: &mut [f32]) {
    attend_row_portable::<true>(q, keys, values, scale, weights, out);
}

/// `AVX2`: scores through `dots_avx2` (only ever inlined into `attend_row_avx2`).
#[inline(always)]
fn attend_row_portable<const AVX2: bool>(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    scale: f32,
    weights: &mut Vec<f32>,
    out: &mut [f32],
) {
    let d = q.len();
    weights.clear();
    scores::<AVX2>(q, keys.chunks_exact(d), scale, weights);
    // libm's expf, not the platform's: a Windows worker's C runtime rounds some
    // exponentials differently from glibc, and stages must agree to the bit.
    // (`exp.rs`'s faster one saved only 3% of a 16-stream decode step here, and
    // moved Gemma 3's top-token agreement with llama.cpp from 95.3% to 94.8%.)
    let sum = softmax::exp_weights(weights);
    // Two values rows per pass over `out` (each element still adds them in key order,
    // `(o + w₁v₁) + w₂v₂`): half the loads and stores of `out`.
    let mut pairs = weights.iter().zip(values.chunks_exact(d));
    while let Some((&w1, v1)) = pairs.next() {
        match pairs.next() {
            Some((&w2, v2)) => {
                for ((o, &x1), &x2) in out.iter_mut().zip(v1).zip(v2) {
                    *o = (*o + w1 * x1) + w2 * x2;
                }
            }
            None => {
                for (o, &x) in out.iter_mut().zip(v1) {
                    *o += w1 * x;
                }
            }
        }
    }
    for o in out.iter_mut() {
        *o /= sum;
    }
}

/// Pushes each key's score, its `dots` times `scale`, onto `out`, four keys at a time:
/// four independent sums in flight where one alone waits on each of its additions.
/// Each key's arithmetic is exactly `dots` of that key alone.
#[inline(always)]
fn scores<'k, const AVX2: bool>(q: &[f32], keys: impl Iterator<Item = &'k [f32]>, scale: f32, out: &mut Vec<f32>) {
    fn run<const N: usize, const AVX2: bool>(q: &[f32], keys: [&[f32]; N]) -> [f32; N] {
        #[cfg(target_arch = "x86_64")]
        if AVX2 {
            // SAFETY: `AVX2` is true only inside `attend_row_avx2`, which runs where
            // AVX2 was detected.
            return unsafe { dots_avx2(q, keys) };
        }
        dots(q, keys)
    }
    let mut four: [&[f32]; 4] = [&[]; 4];
    let mut held = 0;
    for k in keys {
        four[held] = k;
        held += 1;
        if held == 4 {
            out.extend(run::<4, AVX2>(q, four).map(|s| s * scale));
            held = 0;
        }
    }
    for k in &four[..held] {
        out.push(run::<1, AVX2>(q, [*k])[0] * scale);
    }
}

/// `dots` with each key's eight lanes in one AVX register: the same multiplies and
/// adds in the same order, so the same bits.
///
/// # Safety
/// AVX2 present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn dots_avx2<const N: usize>(q: &[f32], keys: [&[f32]; N]) -> [f32; N] {
    use std::arch::x86_64::*;
    assert!(keys.iter().all(|k| k.len() == q.len()), "a key's length differs from the query's");
    let whole = q.len() - q.len() % 8;
    // `lddqu`: an unaligned load without `loadu_ps`'s debug-build precondition checks.
    // SAFETY (every call): c + 8 ≤ whole ≤ the length of q and of every key.
    let load = |p: &[f32], c: usize| unsafe { _mm256_castsi256_ps(_mm256_lddqu_si256(p.as_ptr().add(c).cast())) };
    let mut acc = [_mm256_setzero_ps(); N];
    for c in (0..whole).step_by(8) {
        let a = load(q, c);
        for (acc, k) in acc.iter_mut().zip(&keys) {
            *acc = _mm256_add_ps(*acc, _mm256_mul_ps(a, load(k, c)));
        }
    }
    let mut lanes = [[0f32; 8]; N];
    for (lane, acc) in lanes.iter_mut().zip(&acc) {
        // SAFETY: `lane` is 8 floats; an unaligned store.
        unsafe { _mm256_storeu_ps(lane.as_mut_ptr(), *acc) };
    }
    finish_lanes(lanes, q, &keys, whole)
}

/// `Σ q[i]·k[i]` for each of `N` keys, over eight lanes (`i mod 8`, each summed in
/// order of `i`), reduced in a fixed tree.
#[inline(always)]
fn dots<const N: usize>(q: &[f32], keys: [&[f32]; N]) -> [f32; N] {
    assert!(keys.iter().all(|k| k.len() == q.len()), "a key's length differs from the query's");
    let mut lanes = [[0f32; 8]; N];
    let whole = q.len() - q.len() % 8;
    for c in (0..whole).step_by(8) {
        let a = &q[c..c + 8];
        for (lane, k) in lanes.iter_mut().zip(&keys) {
            let b = &k[c..c + 8];
            for l in 0..8 {
                lane[l] += a[l] * b[l];
            }
        }
    }
    finish_lanes(lanes, q, &keys, whole)
}

/// The end of `dots` (either copy): the values past the last whole group of eight into
/// lanes 0.., then each key's lanes reduced in the fixed tree.
#[inline(always)]
fn finish_lanes<const N: usize>(mut lanes: [[f32; 8]; N], q: &[f32], keys: &[&[f32]; N], whole: usize) -> [f32; N] {
    for (lane, k) in lanes.iter_mut().zip(keys) {
        for (l, (a, b)) in q[whole..].iter().zip(&k[whole..]).enumerate() {
            lane[l] += a * b;
        }
    }
    lanes.map(|l| lane_sum(&l))
}

/// A score's eight lane sums added in the module note's fixed tree (`head_pair` adds
/// its two heads' lanes with it too).
#[inline(always)]
fn lane_sum(l: &[f32; 8]) -> f32 {
    ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / (1u32 << 24) as f32 - 0.5).collect()
    }

    /// Straight from the definition, in f64.
    fn reference(q: &[f32], k: &[f32], v: &[f32], dims: (usize, usize, usize, usize), position: usize, window: Option<usize>) -> Vec<f64> {
        let (heads, kv_heads, len, d) = dims;
        let n = position + len;
        let mut out = vec![0f64; len * heads * d];
        for h in 0..heads {
            let kv = h / (heads / kv_heads);
            for i in 0..len {
                let p = position + i;
                let lo = window.map_or(0, |w| (p + 1).saturating_sub(w));
                let s: Vec<f64> = (lo..=p)
                    .map(|j| (0..d).map(|x| f64::from(q[(h * len + i) * d + x]) * f64::from(k[(kv * n + j) * d + x])).sum::<f64>() * 0.125)
                    .collect();
                let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = w.iter().sum();
                for (wj, j) in w.iter().zip(lo..=p) {
                    for x in 0..d {
                        out[(i * heads + h) * d + x] += wj / sum * f64::from(v[(kv * n + j) * d + x]);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn matches_the_definition_and_is_the_same_row_by_row() {
        let (heads, kv_heads, d, n) = (4, 2, 20, 30);
        let k = Tensor::from_vec(values(kv_heads * n * d, 1), (kv_heads, n, d), &Device::Cpu).unwrap();
        let v = Tensor::from_vec(values(kv_heads * n * d, 2), (kv_heads, n, d), &Device::Cpu).unwrap();
        for window in [None, Some(5)] {
            let (position, len) = (n - 12, 12);
            let qv = values(heads * len * d, 3);
            let q = Tensor::from_vec(qv.clone(), (heads, len, d), &Device::Cpu).unwrap();
            let a = Attend { q: &q, k: &k, v: &v, first: 0, position, window, scale: 0.125 };
            let got = attend(&a).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want = reference(&qv, &k.flatten_all().unwrap().to_vec1().unwrap(), &v.flatten_all().unwrap().to_vec1().unwrap(), (heads, kv_heads, len, d), position, window);
            for (g, w) in got.iter().zip(&want) {
                assert!((f64::from(*g) - w).abs() < 1e-5, "{window:?}: {g} vs {w}");
            }
            // Each row alone, over only the keys up to it: the same bits.
            for i in 0..len {
                let qi = q.narrow(1, i, 1).unwrap();
                let (ki, vi) = (k.narrow(1, 0, position + i + 1).unwrap(), v.narrow(1, 0, position + i + 1).unwrap());
                let alone = attend(&Attend { q: &qi, k: &ki, v: &vi, first: 0, position: position + i, window, scale: 0.125 }).unwrap();
                let alone = alone.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(alone[..], got[i * heads * d..(i + 1) * heads * d], "{window:?}: row {i}");
            }
        }
    }

    /// Heads attended two at a time (`head_pair`, where the CPU has AVX-512) give the
    /// bits of `attend_row` one head at a time: groups of 1, 2 and 3 heads per KV head,
    /// dimensions in whole blocks of 64 and not, a window and none.
    #[test]
    fn head_pairs_are_the_bits_of_single_heads() {
        #[cfg(target_arch = "x86_64")]
        let pairs = head_pair::available(72);
        #[cfg(not(target_arch = "x86_64"))]
        let pairs = false;
        if !pairs {
            eprintln!("SKIPPED: no AVX-512 on this CPU, so no head pairs to compare (single heads only)");
        }
        for (heads, kv_heads, d) in [(6, 2, 72), (4, 1, 256), (8, 4, 24), (3, 3, 16)] {
            let (n, len) = (41, 10);
            let position = n - len;
            let k = values(kv_heads * n * d, 1);
            let v = values(kv_heads * n * d, 2);
            let qv = values(heads * len * d, 3);
            let kt = Tensor::from_vec(k.clone(), (kv_heads, n, d), &Device::Cpu).unwrap();
            let vt = Tensor::from_vec(v.clone(), (kv_heads, n, d), &Device::Cpu).unwrap();
            let qt = Tensor::from_vec(qv.clone(), (heads, len, d), &Device::Cpu).unwrap();
            for window in [None, Some(7)] {
                let a = Attend { q: &qt, k: &kt, v: &vt, first: 0, position, window, scale: 0.125 };
                let got = attend(&a).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let mut weights = Vec::new();
                for i in 0..len {
                    let p = position + i;
                    let lo = window.map_or(0, |w| (p + 1).saturating_sub(w));
                    for h in 0..heads {
                        let kv = h / (heads / kv_heads);
                        let rows = (kv * n + lo) * d..(kv * n + p + 1) * d;
                        let mut want = vec![0f32; d];
                        let q = &qv[(h * len + i) * d..(h * len + i + 1) * d];
                        attend_row(q, &k[rows.clone()], &v[rows], 0.125, &mut weights, &mut want);
                        let at = (i * heads + h) * d;
                        let what = format!("heads {heads}/{kv_heads}, d {d}, {window:?}: row {i} head {h}");
                        assert_eq!(got[at..at + d], want[..], "{what}");
                    }
                }
            }
        }
    }

    #[test]
    fn sequences_batched_equal_each_alone() {
        let (heads, kv_heads, d) = (4, 2, 16);
        let mut tensors = Vec::new();
        for (seed, (n, len)) in [(30usize, 1usize), (7, 3), (12, 12), (1, 1)].into_iter().enumerate() {
            let seed = seed as u32 * 10;
            let k = Tensor::from_vec(values(kv_heads * n * d, seed + 1), (kv_heads, n, d), &Device::Cpu).unwrap();
            let v = Tensor::from_vec(values(kv_heads * n * d, seed + 2), (kv_heads, n, d), &Device::Cpu).unwrap();
            let q = Tensor::from_vec(values(heads * len * d, seed + 3), (heads, len, d), &Device::Cpu).unwrap();
            tensors.push((q, k, v, n - len));
        }
        let items: Vec<Attend> = tensors
            .iter()
            .enumerate()
            .map(|(i, (q, k, v, position))| Attend { q, k, v, first: 0, position: *position, window: (i == 2).then_some(5), scale: 0.25 })
            .collect();
        let all = attend_all(&items).unwrap().to_vec2::<f32>().unwrap();
        let alone: Vec<Vec<f32>> = items.iter().flat_map(|a| attend(a).unwrap().to_vec2::<f32>().unwrap()).collect();
        assert_eq!(all, alone);
    }

    /// A Gemma 3 270M layer's prefill attention: 4 query heads over one KV head of
    /// 256, 128 tokens.
    /// `cargo test --release -p strata-model --lib bench_prefill_attention -- --ignored --nocapture`
    #[test]
    #[ignore = "benchmark; run explicitly with --ignored --nocapture"]
    fn bench_prefill_attention() {
        let (heads, kv_heads, d, len) = (4, 1, 256, 128);
        let k = Tensor::from_vec(values(kv_heads * len * d, 1), (kv_heads, len, d), &Device::Cpu).unwrap();
        let v = Tensor::from_vec(values(kv_heads * len * d, 2), (kv_heads, len, d), &Device::Cpu).unwrap();
        let q = Tensor::from_vec(values(heads * len * d, 3), (heads, len, d), &Device::Cpu).unwrap();
        let a = Attend { q: &q, k: &k, v: &v, first: 0, position: 0, window: None, scale: 0.0625 };
        let best = (0..5)
            .map(|_| {
                let start = std::time::Instant::now();
                for _ in 0..20 {
                    drop(attend(&a).unwrap());
                }
                start.elapsed().as_secs_f64() / 20.0
            })
            .fold(f64::INFINITY, f64::min);
        println!("prefill attention, {heads} heads of {d}, {len} tokens: {:.0} µs", best * 1e6);
    }

    #[test]
    fn bad_shapes_are_refused() {
        let t = |dims: (usize, usize, usize)| Tensor::zeros(dims, candle_core::DType::F32, &Device::Cpu).unwrap();
        let (q, k) = (t((3, 1, 8)), t((2, 4, 8)));
        assert!(attend(&Attend { q: &q, k: &k, v: &k, first: 0, position: 0, window: None, scale: 1.0 }).is_err());
        let q = t((2, 2, 8));
        assert!(attend(&Attend { q: &q, k: &k, v: &k, first: 0, position: 3, window: None, scale: 1.0 }).is_err());
    }
}
