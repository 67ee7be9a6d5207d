//! Work split over the compute pool when it is large enough to pay for waking it.

use std::ops::Range;

/// Runs `work` over the chunk indices `0..chunks`: on the compute pool, each thread taking
/// ranges of indices as it frees up, when `parallel`; otherwise on the calling thread
/// in one call. A decode step's small pieces are done before the pool would wake, so
/// each caller decides by its own measure of size.
pub(crate) fn run_chunks(chunks: usize, parallel: bool, work: impl Fn(Range<usize>) + Sync) {
    if parallel && chunks > 1 {
        crate::compute_pool::compute_pool().run_chunks(chunks, work);
    } else if chunks > 0 {
        work(0..chunks);
    }
}
