//! The memory packed weights live in: zeroed cache lines, on 2 MiB pages where the
//! buffer is that large and the system gives them.
//!
//! Why huge pages: a decode step streams every weight once, and a large matrix streamed
//! from 4 KiB pages runs at the speed of a cold start every 4 KiB (the hardware
//! prefetchers stop at each page boundary, and each page costs a TLB walk). Gemma 3
//! 270M's 178 MB head, 60% of its decode step, read at 10 GB/s from 4 KiB pages on one
//! core; llama.cpp, which memory-maps the file (the page cache hands out large folios),
//! read it faster. Linux gives an anonymous mapping transparent huge pages when the
//! range is advised `MADV_HUGEPAGE` before it is first touched (the common `madvise`
//! setting of `/sys/kernel/mm/transparent_hugepage/enabled`), so the allocation is
//! 2 MiB-aligned, advised, and only then zeroed. Elsewhere, or where the advice is
//! refused, the buffer is ordinary memory.

use std::alloc::Layout;
use std::ptr::NonNull;

use super::packed::Line;

/// Buffers from this size on are aligned and advised for huge pages.
const HUGE_PAGE: usize = 2 << 20;

/// An owned, zeroed run of `len` [`Line`]s.
pub(crate) struct Lines {
    ptr: NonNull<Line>,
    len: usize,
    layout: Layout,
}

// SAFETY: `Lines` owns plain bytes exclusively, like a `Vec<Line>`.
unsafe impl Send for Lines {}
// SAFETY: shared access is read-only, like `&[Line]`.
unsafe impl Sync for Lines {}

impl Lines {
    pub(crate) fn zeroed(len: usize) -> Self {
        let bytes = len.checked_mul(64).unwrap_or_else(|| panic!("{len} lines overflow the address space"));
        let align = if bytes >= HUGE_PAGE { HUGE_PAGE } else { 64 };
        let layout =
            Layout::from_size_align(bytes.max(64), align).unwrap_or_else(|e| panic!("a buffer of {bytes} bytes: {e}"));
        // SAFETY: the layout's size is at least 64 bytes, never zero.
        let raw = unsafe { std::alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(raw.cast::<Line>()) else { std::alloc::handle_alloc_error(layout) };
        #[cfg(target_os = "linux")]
        if align == HUGE_PAGE {
            // SAFETY: `raw..raw + bytes` is this allocation, page-aligned at its start;
            // the advice only changes how its pages are backed. A refusal (no THP in
            // this kernel) leaves ordinary pages, which is correct, only slower.
            unsafe { libc::madvise(raw.cast(), bytes, libc::MADV_HUGEPAGE) };
        }
        // SAFETY: `raw` is valid for `layout.size()` bytes, which this zeroes: every
        // `Line` is then initialised.
        unsafe { std::ptr::write_bytes(raw, 0, layout.size()) };
        Self { ptr, len, layout }
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this very layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), self.layout) }
    }
}

impl std::ops::Deref for Lines {
    type Target = [Line];

    fn deref(&self) -> &[Line] {
        // SAFETY: `len` initialised lines live at `ptr` for as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for Lines {
    fn deref_mut(&mut self) -> &mut [Line] {
        // SAFETY: as in `deref`; `&mut self` makes the view unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_aligned_and_writable_at_every_size() {
        for len in [0, 1, 3, HUGE_PAGE / 64, HUGE_PAGE / 64 * 3 + 5] {
            let mut lines = Lines::zeroed(len);
            assert_eq!(lines.len(), len);
            assert!((lines.as_ptr() as usize).is_multiple_of(64));
            assert!(lines.iter().all(|l| l.0 == [0; 64]));
            if let Some(last) = lines.last_mut() {
                last.0[63] = 7;
            }
            assert_eq!(lines.last().map(|l| l.0[63]), (len > 0).then_some(7));
        }
    }
}
