//! The K/V cache of one sequence in one layer.
//!
//! Storage grows in whole blocks and new positions are written in place, so a decode
//! step costs O(new tokens) copies instead of re-concatenating the whole history.
//!
//! A sliding-window layer keeps only the positions its window can still reach (and a
//! little slack), so its cache stays the window's size however long the sequence
//! grows: older positions are dropped when the storage would otherwise have to grow.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Positions are added in blocks of this many, trading a little memory for far fewer
/// reallocations.
const GROWTH_BLOCK: usize = 128;

/// What a windowed cache may hold beyond its window: dropping old positions moves the
/// kept ones, and this slack lets that happen once per this many steps.
const WINDOW_SLACK: usize = GROWTH_BLOCK;

/// The most positions a layer's cache holds for a sequence of `context` tokens: all
/// of them, or for a sliding-window layer about its window (what a planner sizes).
pub fn held_positions(window: Option<usize>, context: usize) -> usize {
    match window {
        Some(w) => context.min(w + WINDOW_SLACK + 2 * GROWTH_BLOCK),
        None => context,
    }
}

#[derive(Debug)]
pub(crate) struct LayerCache {
    /// `[kv_heads, capacity, head_dim]`, or None before the first token. Slot 0
    /// holds position `start`.
    k: Option<Tensor>,
    v: Option<Tensor>,
    /// The positions the sequence has, `[0, len)`; those held are `[start, len)`.
    len: usize,
    start: usize,
    /// The attention window of this layer, if it slides.
    window: Option<usize>,
}

/// The history attention sees after an append: K and V (`[kv_heads, n, head_dim]`)
/// of the positions `[first, first + n)`.
pub(crate) struct History {
    pub k: Tensor,
    pub v: Tensor,
    pub first: usize,
}

impl LayerCache {
    pub fn new(window: Option<usize>) -> Self {
        Self { k: None, v: None, len: 0, start: 0, window }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Bytes held, including unused capacity.
    pub fn bytes(&self) -> usize {
        [&self.k, &self.v]
            .iter()
            .filter_map(|t| t.as_ref())
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// The first position a query at `position` may look at.
    fn first_needed(&self, position: usize) -> usize {
        self.window.map_or(0, |w| (position + 1).saturating_sub(w))
    }

    /// Appends `k`, `v` (`[kv_heads, new, head_dim]`) for positions `[len, len + new)`
    /// and returns the history they attend over.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<History> {
        let (kv_heads, new, head_dim) = k.dims3()?;
        let capacity = self.k.as_ref().map(|t| t.dim(1)).transpose()?.unwrap_or(0);
        if self.len + new - self.start > capacity {
            // Out of room: drop what no query from here on can see, keeping some slack
            // so that the next drop is a while away, then grow if still needed.
            let keep_from = self
                .window
                .map_or(0, |w| (self.len + 1).saturating_sub(w + WINDOW_SLACK))
                .max(self.start);
            let kept = self.len - keep_from;
            // A windowed cache keeps a block of room beyond what it holds, so that the
            // next drop (and its copy) is a block of steps away, whatever the window.
            let room = if self.window.is_some() { GROWTH_BLOCK } else { 0 };
            let capacity = (kept + new + room).div_ceil(GROWTH_BLOCK) * GROWTH_BLOCK;
            let shape = (kv_heads, capacity, head_dim);
            let from = keep_from - self.start;
            self.k = Some(regrow(self.k.as_ref(), from, kept, shape, k.dtype(), k.device())?);
            self.v = Some(regrow(self.v.as_ref(), from, kept, shape, v.dtype(), v.device())?);
            self.start = keep_from;
        }
        let (ck, cv) = match (&self.k, &self.v) {
            (Some(ck), Some(cv)) => (ck, cv),
            _ => unreachable!("storage was allocated above"),
        };
        let at = self.len - self.start;
        ck.slice_set(&k.contiguous()?, 1, at)?;
        cv.slice_set(&v.contiguous()?, 1, at)?;
        self.len += new;
        Ok(History { k: ck.narrow(1, 0, self.len - self.start)?, v: cv.narrow(1, 0, self.len - self.start)?, first: self.start })
    }

    /// Copies of K and V for what a sequence continued at `positions` needs: the
    /// positions `[first, positions)`, from 0 for a global layer and from the window's
    /// start for a sliding one, `[kv_heads, positions - first, head_dim]` each, in
    /// storage of their own (later appends, which write in place, cannot change them).
    /// `positions` must be at most [`Self::len`] and not 0.
    pub fn export(&self, positions: usize) -> Result<(usize, Tensor, Tensor)> {
        let (Some(k), Some(v)) = (&self.k, &self.v) else {
            return Err(Error::BadInput("the cache holds no positions".into()));
        };
        if positions == 0 || positions > self.len {
            return Err(Error::BadInput(format!("{positions} positions asked, {} cached", self.len)));
        }
        let first = self.first_needed(positions);
        if first < self.start {
            return Err(Error::BadInput(format!(
                "positions from {first} asked, but this sliding layer keeps them from {} only",
                self.start
            )));
        }
        let own = |t: &Tensor| -> Result<Tensor> {
            let t = t.narrow(1, first - self.start, positions - first)?;
            // `contiguous` of a view that already is contiguous shares its storage.
            Ok(if t.is_contiguous() { t.copy()? } else { t.contiguous()? })
        };
        Ok((first, own(k)?, own(v)?))
    }

    /// A cache holding exactly `k` and `v` (`[kv_heads, n, head_dim]`) for the
    /// positions `[first, first + n)`, which must be all that a query at `first + n`
    /// looks at in this layer. Laid out as if appended step by step.
    pub fn import(first: usize, k: &Tensor, v: &Tensor, window: Option<usize>) -> Result<Self> {
        let mut cache = Self::new(window);
        let positions = first + k.dim(1)?;
        if first > cache.first_needed(positions) {
            return Err(Error::KvShape(format!(
                "positions from {first} given, but a query at {positions} looks from {}",
                cache.first_needed(positions)
            )));
        }
        cache.len = first;
        cache.start = first;
        cache.append(k, v)?;
        Ok(cache)
    }
}

/// New storage of `shape` holding `kept` positions of `old` from slot `from`, at its start.
fn regrow(
    old: Option<&Tensor>,
    from: usize,
    kept: usize,
    shape: (usize, usize, usize),
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let fresh = Tensor::zeros(shape, dtype, device)?;
    if let Some(old) = old {
        if kept > 0 {
            fresh.slice_set(&old.narrow(1, from, kept)?.contiguous()?, 1, 0)?;
        }
    }
    Ok(fresh)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_across_growth_and_keeps_history() {
        let dev = Device::Cpu;
        let mut cache = LayerCache::new(None);
        let mut all = Vec::new();
        for step in 0..3 {
            let n = if step == 0 { 130 } else { 1 };
            let k = Tensor::rand(0f32, 1f32, (2, n, 4), &dev).unwrap();
            all.push(k.clone());
            let History { k: hk, v: hv, first } = cache.append(&k, &k).unwrap();
            assert_eq!(first, 0);
            let expected = Tensor::cat(&all, 1).unwrap();
            assert_eq!(hk.dims3().unwrap(), expected.dims3().unwrap());
            let diff = (hk - &expected).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(diff, 0.0);
            assert_eq!(hv.dim(1).unwrap(), cache.len());
        }
        assert_eq!(cache.len(), 132);
        assert_eq!(cache.bytes(), 2 * 2 * 256 * 4 * 4);
    }

    #[test]
    fn export_copies_a_prefix_and_import_restores_it() {
        let dev = Device::Cpu;
        let mut cache = LayerCache::new(None);
        let k = Tensor::rand(0f32, 1f32, (2, 5, 4), &dev).unwrap();
        let v = Tensor::rand(0f32, 1f32, (2, 5, 4), &dev).unwrap();
        cache.append(&k, &v).unwrap();
        let (first, ek, ev) = cache.export(3).unwrap();
        assert_eq!(first, 0);
        assert_eq!(ek.dims3().unwrap(), (2, 3, 4));
        let prefix = |t: &Tensor| t.narrow(1, 0, 3).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(ek.flatten_all().unwrap().to_vec1::<f32>().unwrap(), prefix(&k));
        // Appending after the export leaves the exported copy alone.
        let one = Tensor::ones((2, 1, 4), DType::F32, &dev).unwrap();
        cache.append(&one, &one).unwrap();
        assert_eq!(ev.flatten_all().unwrap().to_vec1::<f32>().unwrap(), prefix(&v));
        let restored = LayerCache::import(0, &ek, &ev, None).unwrap();
        assert_eq!(restored.len(), 3);
        assert!(cache.export(0).is_err() && cache.export(7).is_err() && LayerCache::new(None).export(1).is_err());
    }

    #[test]
    fn a_sliding_layer_keeps_about_its_window_and_exports_what_a_query_needs() {
        let dev = Device::Cpu;
        let window = 4;
        let mut cache = LayerCache::new(Some(window));
        let mut all = Vec::new();
        for position in 0..600usize {
            let k = Tensor::full(position as f32, (1, 1, 2), &dev).unwrap();
            all.push(position as f32);
            let history = cache.append(&k, &k).unwrap();
            // Everything the next query needs is there, and it is what was appended.
            let held: Vec<f32> = history.k.narrow(2, 0, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(held, all[history.first..]);
            assert!(history.first <= (position + 1).saturating_sub(window));
        }
        // The storage stays near the window, not the 600 positions.
        assert!(cache.bytes() <= 2 * 2 * 4 * held_positions(Some(window), 600), "{}", cache.bytes());
        let (first, k, _) = cache.export(600).unwrap();
        assert_eq!((first, k.dim(1).unwrap()), (597, 3));
        assert!(cache.export(100).is_err(), "dropped positions cannot be exported");
        // Imported, it goes on as the original does.
        let mut copy = LayerCache::import(first, &k, &k, Some(window)).unwrap();
        let next = Tensor::full(600f32, (1, 1, 2), &dev).unwrap();
        let (a, b) = (cache.append(&next, &next).unwrap(), copy.append(&next, &next).unwrap());
        let tail = |h: &History| h.k.narrow(1, 601 - window - h.first, window).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(tail(&a), tail(&b));
        // An import missing positions its next query looks at is refused.
        assert!(LayerCache::import(598, &k.narrow(1, 1, 2).unwrap(), &k.narrow(1, 1, 2).unwrap(), Some(window)).is_err());
        assert!(LayerCache::import(1, &k, &k, None).is_err());
    }

    #[test]
    fn a_window_of_whole_blocks_regrows_once_a_block_not_every_step() {
        let dev = Device::Cpu;
        let mut cache = LayerCache::new(Some(GROWTH_BLOCK));
        // Every drop moves the kept positions to new storage: count the drops.
        let mut drops = 0;
        let mut start = 0;
        for position in 0..2000 {
            let k = Tensor::full(position as f32, (1, 1, 2), &dev).unwrap();
            cache.append(&k, &k).unwrap();
            if cache.start != start {
                drops += 1;
                start = cache.start;
            }
        }
        assert!(drops <= 2000 / GROWTH_BLOCK + 2, "positions dropped {drops} times in 2000 steps");
    }
}
