//! The K/V cache of one sequence in one layer.
//!
//! Storage grows in whole blocks and new positions are written in place, so a decode
//! step costs O(new tokens) copies instead of re-concatenating the whole history.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// Positions are added in blocks of this many, trading a little memory for far fewer
/// reallocations.
const GROWTH_BLOCK: usize = 128;

#[derive(Debug)]
pub(crate) struct LayerCache {
    /// `[kv_heads, capacity, head_dim]`, or None before the first token.
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
}

impl LayerCache {
    pub fn new() -> Self {
        Self { k: None, v: None, len: 0 }
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

    /// Appends `k`, `v` (`[kv_heads, new, head_dim]`) and returns views of the whole
    /// history, `[kv_heads, len, head_dim]`.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (kv_heads, new, head_dim) = k.dims3()?;
        let needed = self.len + new;
        let capacity = self.k.as_ref().map(|t| t.dim(1)).transpose()?.unwrap_or(0);
        if needed > capacity {
            let capacity = needed.div_ceil(GROWTH_BLOCK) * GROWTH_BLOCK;
            self.k = Some(grow(self.k.as_ref(), self.len, (kv_heads, capacity, head_dim), k.dtype(), k.device())?);
            self.v = Some(grow(self.v.as_ref(), self.len, (kv_heads, capacity, head_dim), v.dtype(), v.device())?);
        }
        let (ck, cv) = match (&self.k, &self.v) {
            (Some(ck), Some(cv)) => (ck, cv),
            _ => unreachable!("storage was allocated above"),
        };
        ck.slice_set(&k.contiguous()?, 1, self.len)?;
        cv.slice_set(&v.contiguous()?, 1, self.len)?;
        self.len = needed;
        Ok((ck.narrow(1, 0, self.len)?, cv.narrow(1, 0, self.len)?))
    }

    /// Copies of K and V for positions `[0, positions)`, `[kv_heads, positions, head_dim]`
    /// each, in storage of their own: later appends (which write in place) cannot change
    /// them. `positions` must be at most [`Self::len`] and not 0.
    pub fn export(&self, positions: usize) -> Result<(Tensor, Tensor)> {
        let (Some(k), Some(v)) = (&self.k, &self.v) else {
            return Err(crate::Error::BadInput("the cache holds no positions".into()));
        };
        if positions == 0 || positions > self.len {
            return Err(crate::Error::BadInput(format!("{positions} positions asked, {} cached", self.len)));
        }
        let own = |t: &Tensor| -> Result<Tensor> {
            let t = t.narrow(1, 0, positions)?;
            // `contiguous` of a view that already is contiguous shares its storage.
            Ok(if t.is_contiguous() { t.copy()? } else { t.contiguous()? })
        };
        Ok((own(k)?, own(v)?))
    }

    /// A cache holding exactly `k` and `v` (`[kv_heads, positions, head_dim]`), laid out
    /// as if they had been appended step by step: one append gives the same capacity
    /// and bytes.
    pub fn import(k: &Tensor, v: &Tensor) -> Result<Self> {
        let mut cache = Self::new();
        cache.append(k, v)?;
        Ok(cache)
    }
}

fn grow(old: Option<&Tensor>, len: usize, shape: (usize, usize, usize), dtype: DType, device: &Device) -> Result<Tensor> {
    let fresh = Tensor::zeros(shape, dtype, device)?;
    if let Some(old) = old {
        if len > 0 {
            fresh.slice_set(&old.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
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
        let mut cache = LayerCache::new();
        let mut all = Vec::new();
        for step in 0..3 {
            let n = if step == 0 { 130 } else { 1 };
            let k = Tensor::rand(0f32, 1f32, (2, n, 4), &dev).unwrap();
            all.push(k.clone());
            let (hk, hv) = cache.append(&k, &k).unwrap();
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
        let mut cache = LayerCache::new();
        let k = Tensor::rand(0f32, 1f32, (2, 5, 4), &dev).unwrap();
        let v = Tensor::rand(0f32, 1f32, (2, 5, 4), &dev).unwrap();
        cache.append(&k, &v).unwrap();
        let (ek, ev) = cache.export(3).unwrap();
        assert_eq!(ek.dims3().unwrap(), (2, 3, 4));
        let prefix = |t: &Tensor| t.narrow(1, 0, 3).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(ek.flatten_all().unwrap().to_vec1::<f32>().unwrap(), prefix(&k));
        // Appending after the export leaves the exported copy alone.
        let one = Tensor::ones((2, 1, 4), DType::F32, &dev).unwrap();
        cache.append(&one, &one).unwrap();
        assert_eq!(ev.flatten_all().unwrap().to_vec1::<f32>().unwrap(), prefix(&v));
        let restored = LayerCache::import(&ek, &ev).unwrap();
        assert_eq!(restored.len(), 3);
        assert!(cache.export(0).is_err() && cache.export(7).is_err() && LayerCache::new().export(1).is_err());
    }
}
