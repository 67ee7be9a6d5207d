//! The residual stream's update after attention and after the FFN: `x + post(y)`,
//! with `post` the block's output norm where the family has one (Gemma 3), and, where
//! the next step starts with a norm, that norm of the sum too.

use std::mem::MaybeUninit;

use candle_core::{Device, Tensor};

use crate::cpu_buffer::{is_cpu_f32, written, zeroed, Rows, SharedOut};
use crate::error::{Error, Result};
use crate::norm::{write_normed, RmsNorm, LANES};

/// Below this many values the CPU pass stays on the calling thread.
const PARALLEL_MIN_VALUES: usize = 1 << 15;

/// `x + post(y)` (`[tokens, hidden]` each): the update after the FFN.
pub(crate) fn add(x: &Tensor, y: &Tensor, post: Option<&RmsNorm>) -> Result<Tensor> {
    Ok(add_and_norm(x, y, post, None)?.0)
}

/// `x + post(y)` and `next` of it: the update after attention, and the FFN's input.
pub(crate) fn add_then_norm(
    x: &Tensor,
    y: &Tensor,
    post: Option<&RmsNorm>,
    next: &RmsNorm,
) -> Result<(Tensor, Tensor)> {
    let (sum, normed) = add_and_norm(x, y, post, Some(next))?;
    Ok((sum, normed.ok_or_else(|| Error::BadInput("the norm of the residual sum is missing".into()))?))
}

/// `x + post(y)` (`[tokens, hidden]` each) and, when `next` is given, `next` of that
/// sum.
///
/// On the CPU one pass over the rows on the compute pool, with the arithmetic of the
/// three operations it replaces: `post`'s and `next`'s as `RmsNorm::forward`, the sum
/// as candle's f32 add. Why: as three operations they were three passes over memory,
/// the add on the calling thread alone while the pool waited; on a Gemma 3 prefill
/// they cost 3–7 ms.
fn add_and_norm(
    x: &Tensor,
    y: &Tensor,
    post: Option<&RmsNorm>,
    next: Option<&RmsNorm>,
) -> Result<(Tensor, Option<Tensor>)> {
    if x.dims() != y.dims() {
        return Err(Error::BadInput(format!("residual {:?} and update {:?} differ in shape", x.dims(), y.dims())));
    }
    let on_cpu_f32 = |t: &Tensor| is_cpu_f32(t) && t.rank() == 2;
    let hidden = x.dim(candle_core::D::Minus1)?;
    // A norm with its weight values where the one pass can use them (`None` inside:
    // no norm); `None`: the pass cannot run.
    fn weights(norm: Option<&RmsNorm>, hidden: usize) -> Option<Option<(&RmsNorm, &[f32])>> {
        match norm {
            None => Some(None),
            Some(n) => n.cpu_weight().filter(|w| w.len() == hidden).map(|w| Some((n, w))),
        }
    }
    let (Some(post_weight), Some(next_weight)) = (weights(post, hidden), weights(next, hidden)) else {
        return add_and_norm_ops(x, y, post, next);
    };
    if !on_cpu_f32(x) || !on_cpu_f32(y) || hidden == 0 {
        return add_and_norm_ops(x, y, post, next);
    }
    let (x, y) = (x.contiguous()?, y.contiguous()?);
    let tokens = x.dim(0)?;
    let n = tokens * hidden;
    let (x_storage, x_layout) = x.storage_and_layout();
    let (y_storage, y_layout) = y.storage_and_layout();
    let (Some(xs), Some(ys)) =
        (Rows::of(&x_storage, x_layout, "residual")?, Rows::of(&y_storage, y_layout, "residual update")?)
    else {
        return Err(Error::BadInput("contiguous rows expected".into()));
    };
    let mut normed = None;
    let fill_sum = |sums: &SharedOut<'_, MaybeUninit<f32>>| {
        let fill_both = |hs: Option<&SharedOut<'_, MaybeUninit<f32>>>| {
            // A unit is `LANES` rows (the last one fewer), so that their norms' sums
            // of squares run side by side (see `RmsNorm::scales`).
            let run = |units: std::ops::Range<usize>| {
                for unit in units {
                    let first = unit * LANES;
                    let count = LANES.min(tokens - first);
                    // SAFETY: each unit goes to exactly one thread, so its rows are disjoint.
                    let sum = zeroed(unsafe { sums.segment(first * hidden, count * hidden) });
                    let row = |l: usize| first + l.min(count - 1);
                    let x_rows: [&[f32]; LANES] = std::array::from_fn(|l| xs.row(row(l)));
                    let y_rows: [&[f32]; LANES] = std::array::from_fn(|l| ys.row(row(l)));
                    match post_weight {
                        Some((norm, weight)) => {
                            let scales = norm.scales(y_rows);
                            for (l, out) in sum.chunks_exact_mut(hidden).enumerate() {
                                for (((o, &a), &b), &w) in out.iter_mut().zip(x_rows[l]).zip(y_rows[l]).zip(weight) {
                                    *o = a + b * scales[l] * w;
                                }
                            }
                        }
                        None => {
                            for (l, out) in sum.chunks_exact_mut(hidden).enumerate() {
                                for ((o, &a), &b) in out.iter_mut().zip(x_rows[l]).zip(y_rows[l]) {
                                    *o = a + b;
                                }
                            }
                        }
                    }
                    let (Some(hs), Some((norm, weight))) = (hs, next_weight) else {
                        continue;
                    };
                    // SAFETY: as the sum's rows above.
                    let h = unsafe { hs.segment(first * hidden, count * hidden) };
                    let sum_rows: [&[f32]; LANES] =
                        std::array::from_fn(|l| &sum[l.min(count - 1) * hidden..][..hidden]);
                    let scales = norm.scales(sum_rows);
                    for (l, out) in h.chunks_exact_mut(hidden).enumerate() {
                        write_normed(out, sum_rows[l], scales[l], weight);
                    }
                }
            };
            crate::parallel::run_chunks(tokens.div_ceil(LANES), n >= PARALLEL_MIN_VALUES, run);
        };
        match next {
            // SAFETY: the units cover every row, and each writes its rows of both.
            Some(_) => normed = Some(unsafe { written(n, |hs| fill_both(Some(hs))) }),
            None => fill_both(None),
        }
    };
    // SAFETY: the units cover every row, and each writes its rows of the sum.
    let sum = unsafe { written(n, fill_sum) };
    drop((x_storage, y_storage));
    let shape = (tokens, hidden);
    Ok((
        Tensor::from_vec(sum, shape, &Device::Cpu)?,
        normed.map(|h| Tensor::from_vec(h, shape, &Device::Cpu)).transpose()?,
    ))
}

/// `add_and_norm` as candle's operations: other devices, other types.
fn add_and_norm_ops(
    x: &Tensor,
    y: &Tensor,
    post: Option<&RmsNorm>,
    next: Option<&RmsNorm>,
) -> Result<(Tensor, Option<Tensor>)> {
    let y = match post {
        Some(norm) => norm.forward(y)?,
        None => y.clone(),
    };
    let sum = (x + y)?;
    let normed = next.map(|norm| norm.forward(&sum)).transpose()?;
    Ok((sum, normed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 - 1001.0) * 0.0173).collect()
    }

    /// The one pass gives the bits of the operations it replaces, with and without
    /// each norm, for row counts around the side-by-side groups.
    #[test]
    fn equals_the_separate_operations() {
        let hidden = 96;
        let norm = |seed| RmsNorm::new(Tensor::from_vec(values(hidden, seed), hidden, &Device::Cpu).unwrap(), 1e-6);
        let (post, next) = (norm(7), norm(8));
        let bits = |t: &Tensor| {
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        for tokens in [1, 3, 4, 5, 400] {
            let x = Tensor::from_vec(values(tokens * hidden, 1), (tokens, hidden), &Device::Cpu).unwrap();
            let y = Tensor::from_vec(values(tokens * hidden, 2), (tokens, hidden), &Device::Cpu).unwrap();
            for (p, q) in [(None, None), (Some(&post), None), (None, Some(&next)), (Some(&post), Some(&next))] {
                let want_sum = (&x + &p.map_or(y.clone(), |p: &RmsNorm| p.forward(&y).unwrap())).unwrap();
                let (sum, normed) = add_and_norm(&x, &y, p, q).unwrap();
                assert_eq!(bits(&sum), bits(&want_sum), "{tokens} tokens, post {}", p.is_some());
                assert_eq!(normed.is_some(), q.is_some());
                if let (Some(h), Some(q)) = (normed, q) {
                    assert_eq!(bits(&h), bits(&q.forward(&want_sum).unwrap()), "{tokens} tokens, post {}", p.is_some());
                }
            }
        }
        let other = Tensor::zeros((2, hidden + 1), DType::F32, &Device::Cpu).unwrap();
        assert!(add(&other, &Tensor::zeros((2, hidden), DType::F32, &Device::Cpu).unwrap(), None).is_err());
    }
}

#[cfg(test)]
mod bench {
    use super::*;

    /// A Gemma 3 270M prefill's update after attention (128 tokens of 640), as one pass
    /// and as the three operations it replaces.
    /// `cargo test --release -p strata-model --lib bench_residual -- --ignored --nocapture`
    #[test]
    #[ignore = "benchmark; run explicitly with --ignored --nocapture"]
    fn bench_residual() {
        let (tokens, hidden) = (128, 640);
        let v = |n: usize, s: usize| (0..n).map(|i| ((i * 7919 + s) % 2003) as f32 * 0.001 - 1.0).collect::<Vec<_>>();
        let norm = |s| RmsNorm::new(Tensor::from_vec(v(hidden, s), hidden, &Device::Cpu).unwrap(), 1e-6);
        let (post, next) = (norm(1), norm(2));
        let x = Tensor::from_vec(v(tokens * hidden, 3), (tokens, hidden), &Device::Cpu).unwrap();
        let y = Tensor::from_vec(v(tokens * hidden, 4), (tokens, hidden), &Device::Cpu).unwrap();
        let time = |f: &dyn Fn()| {
            (0..5)
                .map(|_| {
                    let start = std::time::Instant::now();
                    for _ in 0..200 {
                        f();
                    }
                    start.elapsed().as_secs_f64() / 200.0 * 1e6
                })
                .fold(f64::INFINITY, f64::min)
        };
        for _ in 0..3 {
            let one = time(&|| drop(add_then_norm(&x, &y, Some(&post), &next).unwrap()));
            let three = time(&|| {
                let s = (&x + post.forward(&y).unwrap()).unwrap();
                drop(next.forward(&s).unwrap());
            });
            println!("one pass {one:.1} µs, three operations {three:.1} µs");
        }
    }
}
