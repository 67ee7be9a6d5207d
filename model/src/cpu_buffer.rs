//! A CPU tensor's memory as plain slices: its values borrowed for reading, and an
//! output buffer that the compute pool's threads fill in disjoint pieces. The CPU paths of
//! the kernels, norms, activations and attention share these.

use std::mem::MaybeUninit;

use candle_core::{DType, Layout, Storage, Tensor};

use crate::error::{Error, Result};

/// Whether `t` is f32 in CPU memory: what the one-pass CPU paths (norms, activation,
/// rotation, residual) read directly; anything else takes candle's operations.
pub(crate) fn is_cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// The `n` f32 values of a contiguous CPU tensor, borrowed from its storage (held by
/// the caller's `storage_and_layout` guard); `what` names the input in errors.
pub(crate) fn f32_values<'a>(storage: &'a Storage, layout: &Layout, n: usize, what: &str) -> Result<&'a [f32]> {
    let Storage::Cpu(cpu) = storage else {
        return Err(Error::BadInput(format!("{what} is not in CPU memory")));
    };
    let start = layout.start_offset();
    cpu.as_slice::<f32>()?
        .get(start..start + n)
        .ok_or_else(|| Error::BadInput(format!("{what} storage is shorter than its shape")))
}

/// The rows of a 2-D CPU f32 tensor whose rows are each contiguous, borrowed: row `i`
/// is `width` values from `i * stride`. A `narrow` on the columns of a wider tensor (one
/// product of a stacked one) is such a view, read in place instead of copied out.
pub(crate) struct Rows<'a> {
    values: &'a [f32],
    width: usize,
    stride: usize,
}

impl<'a> Rows<'a> {
    /// `None` when `layout` is not 2-D with unit column stride (a transposed view,
    /// say); the caller then makes the tensor contiguous. Errors as `f32_values`.
    pub(crate) fn of(storage: &'a Storage, layout: &Layout, what: &str) -> Result<Option<Self>> {
        let (&[rows, width], &[stride, col_stride]) = (layout.dims(), layout.stride()) else {
            return Ok(None);
        };
        if col_stride != 1 && width > 1 || stride < width && rows > 1 {
            return Ok(None);
        }
        let span = if rows == 0 { 0 } else { (rows - 1) * stride + width };
        let values = f32_values(storage, layout, span, what)?;
        Ok(Some(Self { values, width, stride }))
    }

    pub(crate) fn row(&self, i: usize) -> &'a [f32] {
        &self.values[i * self.stride..i * self.stride + self.width]
    }
}

/// `t` as a matrix of its last dimension's rows: itself when it has two dimensions
/// (a view stays a view, for `Rows::of`), else made contiguous and reshaped.
pub(crate) fn as_matrix(t: &Tensor) -> Result<Tensor> {
    if t.rank() == 2 {
        return Ok(t.clone());
    }
    let width = t.dim(candle_core::D::Minus1)?;
    Ok(t.contiguous()?.reshape(((), width))?)
}

/// Calls `f` with `t`'s values as f32 in row-major order: borrowed from its storage
/// when `t` is a contiguous f32 tensor in CPU memory, else copied out once (from a
/// GPU, or another type). A stage's output goes onto the wire this way with one copy.
pub fn with_f32_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    if t.dtype() == DType::F32 && t.is_contiguous() && t.device().is_cpu() {
        let (storage, layout) = t.storage_and_layout();
        return Ok(f(f32_values(&storage, layout, t.elem_count(), "tensor")?));
    }
    Ok(f(&t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?))
}

/// A vector of `n` f32 whose every element `fill` writes through the buffer it is
/// handed (in disjoint segments, from any of the pool's threads), made without zeroing
/// its memory first. Why: a prefill's outputs are megabytes a layer, and zeroing them
/// was a second pass of memory traffic as large as the writing; while another load on
/// the machine shared its memory bandwidth, glibc's `memset` of them took 12% of a
/// Gemma 3 prefill, on the calling thread while the pool's waited.
///
/// # Safety
/// `fill` must write every one of the `n` elements (`write_slice`, `zeroed`) before it
/// returns.
pub(crate) unsafe fn written(n: usize, fill: impl FnOnce(&SharedOut<'_, MaybeUninit<f32>>)) -> Vec<f32> {
    let mut buf: Vec<MaybeUninit<f32>> = Vec::with_capacity(n);
    // SAFETY: `MaybeUninit` values need no initialization, and the capacity is `n`.
    unsafe { buf.set_len(n) };
    fill(&SharedOut::new(&mut buf));
    let mut buf = std::mem::ManuallyDrop::new(buf);
    // SAFETY: `fill` initialized all `n` values (the caller's contract), and
    // `MaybeUninit<f32>` has `f32`'s size and alignment, so the allocation is a valid
    // `Vec<f32>` of the same length and capacity.
    unsafe { Vec::from_raw_parts(buf.as_mut_ptr().cast::<f32>(), buf.len(), buf.capacity()) }
}

/// Copies `src` into `dst` (the same length), which is then initialized.
pub(crate) fn write_slice(dst: &mut [MaybeUninit<f32>], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "write_slice lengths differ");
    for (d, &s) in dst.iter_mut().zip(src) {
        d.write(s);
    }
}

/// `dst` set to zeros, as the initialized slice it then is: room for a kernel that
/// accumulates into its output, made while that piece is about to be used (in cache).
pub(crate) fn zeroed(dst: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    for d in dst.iter_mut() {
        d.write(0.0);
    }
    // SAFETY: every element was just written, and `MaybeUninit<f32>` has `f32`'s layout.
    unsafe { &mut *(dst as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// A mutable buffer that pool workers fill in disjoint segments.
///
/// The compute pool hands out index ranges dynamically, so the disjoint `&mut` pieces
/// cannot be split off up front; each worker instead carves its own from this.
pub(crate) struct SharedOut<'a, T> {
    ptr: *mut T,
    len: usize,
    /// Holds the exclusive borrow of the buffer for as long as segments can be made.
    _buf: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: access goes through `segment`, whose callers guarantee disjointness, so
// sharing the pointer between threads only ever moves `T` values (hence `T: Send`).
unsafe impl<T: Send> Sync for SharedOut<'_, T> {}

impl<'a, T> SharedOut<'a, T> {
    pub(crate) fn new(buf: &'a mut [T]) -> Self {
        Self { ptr: buf.as_mut_ptr(), len: buf.len(), _buf: std::marker::PhantomData }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// # Safety
    /// No other live reference may overlap `start..start + len` while the returned
    /// slice lives.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn segment(&self, start: usize, len: usize) -> &mut [T] {
        assert!(start <= self.len && len <= self.len - start, "segment out of bounds");
        // SAFETY: in bounds (asserted); exclusivity is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}
