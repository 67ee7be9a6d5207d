//! How closely a device's logits follow the CPU's for the same tokens, measured as
//! llama.cpp's `llama-perplexity --kl-divergence` measures two builds: the KL
//! divergence from the reference (stored as llama.cpp stores it, 16-bit log
//! probabilities over the top 16 nats), the share of positions with the same top
//! token, and the largest difference of any one logit.

use strata_model::logits_file::{encode_row, BaseRow};
use strata_model::perplexity::{KlDivergence, KlSummary};

/// The comparison of two runs over the same positions.
#[derive(Debug, Clone)]
pub struct Agreement {
    pub kl: KlSummary,
    pub max_abs_difference: f32,
    /// Positions where the reference's two most likely tokens are no further apart
    /// than `max_abs_difference`: where a different top token is no sign of a bug.
    pub close_calls: usize,
}

/// Compares `device`'s logits with `reference`'s, row by row; `targets[i]` is the
/// token that follows position `i` (scored for the perplexities).
pub fn compare(reference: &[Vec<f32>], device: &[Vec<f32>], targets: &[u32]) -> Agreement {
    let mut kl = KlDivergence::default();
    let mut max_abs_difference = 0f32;
    for ((base, row), &target) in reference.iter().zip(device).zip(targets) {
        let slots = encode_row(base);
        kl.add(row, &BaseRow::decode(&slots, base.len()), target);
        for (a, b) in base.iter().zip(row) {
            max_abs_difference = max_abs_difference.max((a - b).abs());
        }
    }
    let close_calls = reference.iter().filter(|row| top_two_gap(row) <= max_abs_difference).count();
    Agreement { kl: kl.summary(), max_abs_difference, close_calls }
}

/// The largest logit less the second largest.
fn top_two_gap(row: &[f32]) -> f32 {
    let (mut first, mut second) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &l in row {
        if l > first {
            (first, second) = (l, first);
        } else if l > second {
            second = l;
        }
    }
    first - second
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_logits_agree_fully() {
        let rows = vec![vec![1.0, 3.0, -2.0, 0.5], vec![0.0, 0.1, 4.0, 2.0]];
        let a = compare(&rows, &rows, &[1, 2]);
        assert_eq!(a.max_abs_difference, 0.0);
        assert_eq!(a.kl.same_top, 1.0);
        // Only the 16-bit storage of the reference's log-probabilities.
        assert!(a.kl.mean_kld.abs() < 1e-5, "{}", a.kl.mean_kld);
        assert_eq!(a.close_calls, 0);
    }

    #[test]
    fn a_flipped_top_token_and_a_shifted_distribution_are_seen() {
        let reference = vec![vec![2.0, 1.9, -1.0], vec![0.0, 3.0, 1.0]];
        let device = vec![vec![1.9, 2.0, -1.0], vec![0.0, 3.0, 1.0]];
        let a = compare(&reference, &device, &[0, 1]);
        assert_eq!(a.kl.same_top, 0.5);
        assert!((a.max_abs_difference - 0.1).abs() < 1e-6);
        assert!(a.kl.mean_kld > 0.0);
        assert_eq!(a.close_calls, 1, "the first row's top two are 0.1 apart");
        assert_eq!(top_two_gap(&[0.0, 3.0, 1.0]), 2.0);
    }
}
