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
//! setting of `/sys/kernel/mm/transparent_hugepage/enabled`), so the allocation is a
//! fresh mapping, 2 MiB-aligned, advised, and only then zeroed. Smaller buffers (a 135M
//! model's layer matrices are a few hundred KiB) are cut from shared 8 MiB slabs
//! allocated the same way, so they too sit on huge pages, one after another as the
//! model's layers do; a slab is freed when the last buffer cut from it is, and a
//! buffer freed before that gives its pages back at once. Elsewhere, or where the
//! advice is refused, the memory is ordinary.

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

/// Memory for lines, freed on drop: 2 MiB-aligned and advised for huge pages when it
/// is that large.
struct Allocation {
    ptr: NonNull<u8>,
    source: Source,
}

/// Where an [`Allocation`]'s memory came from, so that drop gives it back there.
enum Source {
    /// The global allocator, with this layout.
    Heap(Layout),
    /// A mapping of its own, of this many bytes (Linux, for 2 MiB and up).
    #[cfg(target_os = "linux")]
    Mapping(usize),
}

// SAFETY: plain bytes, owned; whoever hands out views of them keeps them disjoint.
unsafe impl Send for Allocation {}
// SAFETY: as above.
unsafe impl Sync for Allocation {}

impl Allocation {
    /// Uninitialised: callers zero what they hand out.
    fn new(bytes: usize) -> Self {
        #[cfg(target_os = "linux")]
        if bytes >= HUGE_PAGE {
            if let Some(allocation) = Self::mapped(bytes) {
                return allocation;
            }
        }
        let align = if bytes >= HUGE_PAGE { HUGE_PAGE } else { 64 };
        let layout =
            Layout::from_size_align(bytes.max(64), align).unwrap_or_else(|e| panic!("a buffer of {bytes} bytes: {e}"));
        // SAFETY: the layout's size is at least 64 bytes, never zero.
        let raw = unsafe { std::alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(raw) else { std::alloc::handle_alloc_error(layout) };
        Self { ptr, source: Source::Heap(layout) }
    }

    /// A fresh anonymous mapping, 2 MiB-aligned and advised for huge pages before
    /// anything touches it; `None` if the system refuses one. Not the global
    /// allocator: the processes keep freed buffers in glibc's heap
    /// (`strata_platform::memory::keep_freed_buffers`), whose pages earlier
    /// buffers have already faulted in 4 KiB at a time, and advice given after
    /// that does not change them. A worker's layers had landed on such pages in
    /// one stage of three (`AnonHugePages` 0 for its 21 MB of layers).
    #[cfg(target_os = "linux")]
    fn mapped(bytes: usize) -> Option<Self> {
        let len = bytes.checked_next_multiple_of(page_size()?)?;
        // Room to slide a 2 MiB-aligned start into; what is left over is unmapped.
        let span = len.checked_add(HUGE_PAGE)?;
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        // SAFETY: a new private anonymous mapping; it overlaps nothing of ours.
        let raw = unsafe { libc::mmap(std::ptr::null_mut(), span, prot, flags, -1, 0) };
        if raw == libc::MAP_FAILED {
            return None;
        }
        let (start, end) = (raw as usize, raw as usize + span);
        let aligned = start.next_multiple_of(HUGE_PAGE);
        // SAFETY: both ranges lie inside the mapping just made, outside
        // `aligned..aligned + len`, and are page multiples (mmap's start and
        // length are, and so is 2 MiB).
        unsafe {
            if aligned > start {
                libc::munmap(raw, aligned - start);
            }
            if end > aligned + len {
                libc::munmap((aligned + len) as *mut libc::c_void, end - aligned - len);
            }
        }
        // SAFETY: `aligned..aligned + len` is mapped and ours; the advice only
        // changes how its pages are backed. A refusal (no THP in this kernel)
        // leaves ordinary pages, which is correct, only slower.
        unsafe { libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
        Some(Self { ptr: NonNull::new(aligned as *mut u8)?, source: Source::Mapping(len) })
    }
}

impl Drop for Allocation {
    fn drop(&mut self) {
        match self.source {
            // SAFETY: allocated in `new` with this very layout.
            Source::Heap(layout) => unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) },
            // SAFETY: mapped in `mapped` with this start and length; nothing refers
            // to it once the allocation is dropped.
            #[cfg(target_os = "linux")]
            Source::Mapping(len) => unsafe {
                libc::munmap(self.ptr.as_ptr().cast(), len);
            },
        }
    }
}

/// The system's page size, if it says one.
#[cfg(target_os = "linux")]
fn page_size() -> Option<usize> {
    // SAFETY: sysconf has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok().filter(|&page| page > 0)
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
            let page = page_size().unwrap_or(4096);
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

    /// A large buffer sits on 2 MiB pages even where the heap's pages were faulted
    /// in before (what glibc hands back after a free).
    #[cfg(target_os = "linux")]
    #[test]
    fn large_buffers_get_huge_pages() {
        let setting = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
        if !setting.contains("[always]") && !setting.contains("[madvise]") {
            eprintln!("SKIPPED: transparent huge pages are off here ({})", setting.trim());
            return;
        }
        // The heap as the binaries set it up (`strata_platform::memory`): buffers up
        // to 64 MiB cut from it and up to 128 MiB of freed ones kept, so this one's
        // pages stay in the heap, faulted in 4 KiB at a time, for the next to reuse.
        #[cfg(target_env = "gnu")]
        // SAFETY: mallopt only sets the allocator's tunables, under its lock.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
        }
        drop(std::hint::black_box(vec![1u8; 16 * HUGE_PAGE]));
        let lines = Lines::zeroed(4 * HUGE_PAGE / 64);
        let start = lines.as_ptr() as usize;
        assert!(start.is_multiple_of(HUGE_PAGE));
        let huge_kib = anon_huge_kib_at(start).expect("the buffer's mapping is in /proc/self/smaps");
        assert!(huge_kib >= 2048, "{huge_kib} KiB of the buffer's mapping on huge pages");
    }

    /// `AnonHugePages` of the mapping holding `address`, from /proc/self/smaps.
    #[cfg(target_os = "linux")]
    fn anon_huge_kib_at(address: usize) -> Option<u64> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            let range = line.split_whitespace().next().and_then(|r| r.split_once('-'));
            // A mapping's first line starts with its range; its fields' names have no '-'.
            if let Some((from, to)) = range {
                let (from, to) = (usize::from_str_radix(from, 16), usize::from_str_radix(to, 16));
                if let (Ok(from), Ok(to)) = (from, to) {
                    inside = (from..to).contains(&address);
                    continue;
                }
            }
            if let Some(kib) = line.strip_prefix("AnonHugePages:").filter(|_| inside) {
                return kib.trim().trim_end_matches("kB").trim().parse().ok();
            }
        }
        None
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
