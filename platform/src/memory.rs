//! Giving memory the process freed back to the operating system.

/// Returns the heap's free pages to the system, so that the memory of a dropped
/// model shows as free at once: a drained worker on a desktop makes room for a
/// game, and `free` says so. glibc keeps freed blocks below its mmap threshold
/// (which grows up to 32 MB) in the heap; other allocators hand large blocks back
/// by themselves, and there this does nothing.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists, under its locks.
    unsafe {
        libc::malloc_trim(0);
    }
}
