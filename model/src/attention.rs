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

use candle_core::{Device, Storage, Tensor};

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
/// and, with a window, fewer than `window` back.
pub(crate) fn attend(a: &Attend<'_>) -> Result<Tensor> {
    let (heads, len, d) = a.q.dims3()?;
    let (kv_heads, n, kd) = a.k.dims3()?;
    if kd != d || a.v.dims3()? != (kv_heads, n, d) || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
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
    let group = heads / kv_heads;
    let q = a.q.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let (k_storage, k_layout) = a.k.storage_and_layout();
    let k = RowView::new(a.k, &k_storage, k_layout)?;
    let (v_storage, v_layout) = a.v.storage_and_layout();
    let v = RowView::new(a.v, &v_storage, v_layout)?;
    let mut out = vec![0f32; len * heads * d];
    let unit = |u: usize, dst: &mut [f32]| {
        let (h, i) = (u / len, u % len);
        let position = a.position + i;
        let lo = a.window.map_or(0, |w| (position + 1).saturating_sub(w)).max(a.first);
        let keys = (lo - a.first)..(position + 1 - a.first);
        let kv = h / group;
        attend_row(
            &q[(h * len + i) * d..(h * len + i + 1) * d],
            keys.map(|j| (k.row(kv, j), v.row(kv, j))),
            a.scale,
            dst,
        );
    };
    let units = heads * len;
    let out_ptr = SharedRows { ptr: out.as_mut_ptr(), d };
    let run = |range: std::ops::Range<usize>| {
        for u in range {
            let (h, i) = (u / len, u % len);
            // SAFETY: unit (h, i) alone writes row i's head-h slice of the output.
            let dst = unsafe { out_ptr.row((i * heads + h) * d) };
            unit(u, dst);
        }
    };
    let work = units * (n.min(a.window.unwrap_or(n)) + 1) * d;
    if work >= PARALLEL_MIN_WORK && units > 1 {
        candle_core::utils::barrier_pool().execute_chunked(units, run);
    } else {
        run(0..units);
    }
    Ok(Tensor::from_vec(out, (len, heads * d), &Device::Cpu)?)
}

/// Disjoint `d`-long output slices handed to the pool's threads.
struct SharedRows {
    ptr: *mut f32,
    d: usize,
}

// SAFETY: every thread writes only the slices its units own (see `attend`).
unsafe impl Sync for SharedRows {}

impl SharedRows {
    /// # Safety
    /// `at..at + d` must be inside the buffer and written by no one else meanwhile.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row(&self, at: usize) -> &mut [f32] {
        // SAFETY: per the contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(at), self.d) }
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

    fn row(&self, head: usize, j: usize) -> &[f32] {
        let at = self.start + head * self.head_stride + j * self.d;
        &self.data[at..at + self.d]
    }
}

/// One query row over its visible keys (see the module's note on the order).
fn attend_row<'k>(q: &[f32], keys: impl Iterator<Item = (&'k [f32], &'k [f32])> + Clone, scale: f32, out: &mut [f32]) {
    let scores: Vec<f32> = keys.clone().map(|(k, _)| dot(q, k) * scale).collect();
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    out.fill(0.0);
    let mut sum = 0f32;
    for (s, (_, v)) in scores.iter().zip(keys) {
        // libm's expf, not the platform's: a Windows worker's C runtime rounds some
        // exponentials differently from glibc, and stages must agree to the bit.
        let w = libm::expf(s - max);
        sum += w;
        for (o, &x) in out.iter_mut().zip(v) {
            *o += w * x;
        }
    }
    for o in out.iter_mut() {
        *o /= sum;
    }
}

/// `Σ q[i]·k[i]` over eight lanes, reduced in a fixed tree.
fn dot(q: &[f32], k: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (qc, qr) = q.split_at(q.len() - q.len() % 8);
    let (kc, kr) = k.split_at(qc.len());
    for (a, b) in qc.chunks_exact(8).zip(kc.chunks_exact(8)) {
        for l in 0..8 {
            lanes[l] += a[l] * b[l];
        }
    }
    for (l, (a, b)) in qr.iter().zip(kr).enumerate() {
        lanes[l] += a * b;
    }
    ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]))
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

    #[test]
    fn bad_shapes_are_refused() {
        let t = |dims: (usize, usize, usize)| Tensor::zeros(dims, candle_core::DType::F32, &Device::Cpu).unwrap();
        let (q, k) = (t((3, 1, 8)), t((2, 4, 8)));
        assert!(attend(&Attend { q: &q, k: &k, v: &k, first: 0, position: 0, window: None, scale: 1.0 }).is_err());
        let q = t((2, 2, 8));
        assert!(attend(&Attend { q: &q, k: &k, v: &k, first: 0, position: 3, window: None, scale: 1.0 }).is_err());
    }
}
