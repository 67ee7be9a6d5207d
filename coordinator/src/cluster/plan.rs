//! Cutting a model's layers into contiguous stages.
//!
//! For now every stage gets an even share of the layers; the real planner, which
//! weighs memory and speed of each worker, comes with discovery.

use std::ops::Range;

/// `workers` contiguous, non-empty ranges covering `0..layers` as evenly as
/// possible (fewer when there are more workers than layers).
pub fn plan_even(layers: usize, workers: usize) -> Vec<Range<usize>> {
    let parts = workers.min(layers);
    (0..parts).map(|i| i * layers / parts..(i + 1) * layers / parts).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_contiguous_even_and_cover_every_layer() {
        assert_eq!(plan_even(30, 3), vec![0..10, 10..20, 20..30]);
        assert_eq!(plan_even(4, 3), vec![0..1, 1..2, 2..4]);
        assert_eq!(plan_even(2, 5), vec![0..1, 1..2]);
        assert!(plan_even(7, 0).is_empty());
        for layers in 1..40 {
            for workers in 1..10 {
                let plan = plan_even(layers, workers);
                assert_eq!(plan.first().map(|r| r.start), Some(0));
                assert_eq!(plan.last().map(|r| r.end), Some(layers));
                assert!(plan.windows(2).all(|w| w[0].end == w[1].start));
                let sizes: Vec<usize> = plan.iter().map(|r| r.len()).collect();
                assert!(sizes.iter().all(|&s| s >= 1));
                assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1, "{sizes:?}");
            }
        }
    }
}
