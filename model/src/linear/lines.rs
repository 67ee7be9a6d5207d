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
//! 2 MiB-aligned, advised, and only then zeroed. Smaller buffers (a 135M model's layer
//! matrices are a few hundred KiB) are cut from shared 8 MiB slabs allocated the same
//! way, so they too sit on huge pages, one after another as the model's layers do; a
//! slab is freed when the last buffer cut from it is, and a buffer freed before that
//! gives its pages back at once. Elsewhere, or where the advice is refused, the memory
//! is ordinary.

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, Weak};

use super::packed::Line;

/// Buffers from this size on get an allocation of their own, aligned and advised for
/// huge pages; smaller ones are cut from slabs.
const HUGE_PAGE: usize = 2 << 20;
/// The size of a slab small buffers are cut from: at most this much stays allocated
/// beyond what live buffers use (a slab's free tail, or freed buffers in a slab
/// another buffer keeps).
const SLAB: usize = 4 * HUGE_PAGE;

/// Memory from the global allocator, 2 MiB-aligned and advised for huge pages when
/// it is that large, freed on drop.
struct Allocation {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: plain bytes, owned; whoever hands out views of them keeps them disjoint.
unsafe impl Send for Allocation {}
// SAFETY: as above.
unsafe impl Sync for Allocation {}

impl Allocation {
    /// Uninitialised: callers zero what they hand out.
    fn new(bytes: usize) -> Self {
        let align = if bytes >= HUGE_PAGE { HUGE_PAGE } else { 64 };
        let layout =
            Layout::from_size_align(bytes.max(64), align).unwrap_or_else(|e| panic!("a buffer of {bytes} bytes: {e}"));
        // SAFETY: the layout's size is at least 64 bytes, never zero.
        let raw = unsafe { std::alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(raw) else { std::alloc::handle_alloc_error(layout) };
        #[cfg(target_os = "linux")]
        if align == HUGE_PAGE {
            // SAFETY: `raw..raw + bytes` is this allocation, page-aligned at its start;
            // the advice only changes how its pages are backed. A refusal (no THP in
            // this kernel) leaves ordinary pages, which is correct, only slower.
            unsafe { libc::madvise(raw.cast(), bytes, libc::MADV_HUGEPAGE) };
        }
        Self { ptr, layout }
    }
}

impl Drop for Allocation {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this very layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// The slab small buffers are being cut from, and the bytes of it already cut. Held
/// weakly: a slab whose buffers are all gone is freed, not kept for the next one.
static CURRENT_SLAB: Mutex<Option<(Weak<Allocation>, usize)>> = Mutex::new(None);

/// An owned, zeroed run of `len` [`Line`]s.
pub(crate) struct Lines {
    ptr: NonNull<Line>,
    len: usize,
    /// The allocation the lines are in: theirs alone, or a slab shared with others.
    /// Read only on Linux (to give pages back early); elsewhere it only keeps the
    /// allocation alive.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    memory: Arc<Allocation>,
}

// SAFETY: `Lines` owns its lines exclusively (no other `Lines` overlaps them), like a
// `Vec<Line>`; the shared slab is only kept alive through the `Arc`.
unsafe impl Send for Lines {}
// SAFETY: shared access is read-only, like `&[Line]`.
unsafe impl Sync for Lines {}

impl Lines {
    pub(crate) fn zeroed(len: usize) -> Self {
        let bytes = len.checked_mul(64).unwrap_or_else(|| panic!("{len} lines overflow the address space"));
        let (memory, offset) = if bytes >= HUGE_PAGE || bytes == 0 {
            (Arc::new(Allocation::new(bytes)), 0)
        } else {
            let mut slab = CURRENT_SLAB.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let current = slab.as_mut().and_then(|(memory, used)| Some((memory.upgrade()?, used)));
            match current {
                Some((memory, used)) if *used + bytes <= SLAB => {
                    *used += bytes;
                    (memory, *used - bytes)
                }
                _ => {
                    let memory = Arc::new(Allocation::new(SLAB));
                    *slab = Some((Arc::downgrade(&memory), bytes));
                    (memory, 0)
                }
            }
        };
        // SAFETY: `offset..offset + bytes` lies inside the allocation (slabs hand out
        // each range once, 64-byte multiples from a 64-byte-aligned start) and is
        // zeroed here, so every `Line` in it is initialised and aligned.
        let ptr = unsafe {
            let start = memory.ptr.as_ptr().add(offset);
            std::ptr::write_bytes(start, 0, bytes);
            NonNull::new_unchecked(start.cast::<Line>())
        };
        Self { ptr, len, memory }
    }
}

impl Drop for Lines {
    /// Lines in a slab that other buffers keep alive give their whole pages back now,
    /// so that memory freed (a drained or rebalanced stage's layers) leaves the
    /// process's resident set, as it does when a slab or an own allocation is freed.
    /// Slabs never hand a range out twice, so nothing reads these pages again.
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if Arc::strong_count(&self.memory) > 1 {
            // SAFETY: sysconf has no preconditions.
            let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(1);
            let start = self.ptr.as_ptr() as usize;
            let (from, to) = (start.div_ceil(page) * page, (start + self.len * 64) / page * page);
            if to > from {
                // SAFETY: `from..to` lies inside these lines, which this buffer alone
                // owns and no one reads after this drop; the slab stays allocated
                // (another buffer holds it), so the range is still mapped.
                unsafe { libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_DONTNEED) };
            }
        }
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

    /// Small buffers cut from one slab never overlap, and each keeps its own bytes.
    #[test]
    fn buffers_from_a_slab_are_disjoint() {
        let mut all: Vec<Lines> = (1..200).map(|i| Lines::zeroed(i * 37)).collect();
        for (i, lines) in all.iter_mut().enumerate() {
            lines.iter_mut().for_each(|l| l.0 = [i as u8; 64]);
        }
        all.truncate(150);
        let more = Lines::zeroed(1000);
        assert!(more.iter().all(|l| l.0 == [0; 64]));
        for (i, lines) in all.iter().enumerate() {
            assert!(lines.iter().all(|l| l.0 == [i as u8; 64]), "buffer {i}");
        }
    }
}
