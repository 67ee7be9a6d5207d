//! Whether a worker can hold its stage of a new pipeline beside its stage of the old
//! one while the requests switch over.
//!
//! Shards of one worker share their weights (the worker's `WeightStore`), so what a
//! worker holds during a switch is the *union* of its old and new layers (with the
//! embedding and head once, if either stage has them), not their sum. KV caches are
//! never shared: both stages keep theirs until the old one is unloaded. A re-plan
//! that shifts a range (old 10..20, new 15..30) needs more than either plan alone,
//! and the planner, which sees one plan at a time, checks neither.

use std::collections::BTreeSet;
use std::ops::Range;

use crate::planner::{ModelSpec, PlanOptions};

/// What a worker needs while both its stages are loaded, against what it offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwitchMemory {
    /// The union of the old and new stages' weights.
    pub weight_bytes: u64,
    /// The KV caches of every stage, old and new, at the planned context.
    pub kv_bytes: u64,
    /// The new stage's scratch and the planner's headroom.
    pub overhead_bytes: u64,
    pub offered_bytes: u64,
}

impl SwitchMemory {
    pub fn needed_bytes(&self) -> u64 {
        self.weight_bytes + self.kv_bytes + self.overhead_bytes
    }

    pub fn fits(&self) -> bool {
        self.needed_bytes() <= self.offered_bytes
    }
}

/// The memory a worker offering `offered` bytes needs to hold `new` beside the
/// stages of the old pipeline it holds (`old`, empty when it holds none), under the
/// budget the planner uses for one stage.
pub fn during_switch(
    model: &ModelSpec,
    options: &PlanOptions,
    old: &[Range<usize>],
    new: &Range<usize>,
    offered: u64,
) -> SwitchMemory {
    let n = model.layers();
    let clamp = |r: &Range<usize>| r.start.min(n)..r.end.min(n);
    let stages: Vec<Range<usize>> = old.iter().chain(std::iter::once(new)).map(clamp).collect();
    let layers: BTreeSet<usize> = stages.iter().flat_map(Clone::clone).collect();
    let mut weight_bytes: u64 = layers.iter().map(|&l| model.layer_bytes[l]).sum::<u64>() + model.shared_bytes;
    // Counted as the planner counts a stage (embedding and head apart even when
    // tied), so a stage that fits the plan is judged by the same figures here.
    if stages.iter().any(|r| r.start == 0 && !r.is_empty()) {
        weight_bytes += model.embedding_bytes;
    }
    if stages.iter().any(|r| r.end == n && !r.is_empty()) {
        weight_bytes += model.head_bytes;
    }
    // Conservatively the old stages' caches at the full planned context: their
    // sequences may have grown them that far before the switch.
    let kv_bytes = stages.iter().map(|r| model.kv_bytes(r.clone(), options.context, options.sequences)).sum();
    // Scratch once: the new stage computes only after the requests have left the
    // old one, and the worker runs one step at a time per stage.
    let overhead_bytes =
        model.scratch_bytes(options.context, options.sequences, options.prefill_chunk) + options.headroom;
    SwitchMemory { weight_bytes, kv_bytes, overhead_bytes, offered_bytes: offered }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 40 layers of 100 bytes, embedding 1000, head 2000, shared 1; KV 2 bytes per
    /// token per layer.
    fn model() -> ModelSpec {
        ModelSpec { embedding_bytes: 1000, head_bytes: 2000, ..ModelSpec::uniform(40, 100) }
    }

    /// 10 tokens of one sequence: 20 bytes of KV per layer; no headroom.
    fn options() -> PlanOptions {
        PlanOptions { context: 10, sequences: 1, prefill_chunk: 4, headroom: 0, ..PlanOptions::default() }
    }

    /// The old stages of a worker holding one.
    fn one(r: Range<usize>) -> [Range<usize>; 1] {
        [r]
    }

    fn scratch() -> u64 {
        model().scratch_bytes(10, 1, 4)
    }

    #[test]
    fn shared_layers_count_once() {
        let m = during_switch(&model(), &options(), &one(10..20), &(10..25), u64::MAX);
        // Layers 10..25 once, not 10..20 and 10..25 both.
        assert_eq!(m.weight_bytes, 15 * 100 + 1);
        assert_eq!(m.kv_bytes, (10 + 15) * 20);
        assert_eq!(m.overhead_bytes, scratch());
        assert!(m.needed_bytes() < (10 + 15) * 100 + 2 + m.kv_bytes + m.overhead_bytes);
        assert!(m.fits());
    }

    #[test]
    fn a_shifted_range_needs_more_than_either_plan_and_may_not_fit() {
        let model = model();
        let old = model.resident_bytes(10..20) + 10 * 20 + scratch();
        let new = model.resident_bytes(15..30) + 15 * 20 + scratch();
        let offered = old.max(new);
        let m = during_switch(&model, &options(), &one(10..20), &(15..30), offered);
        assert_eq!(m.weight_bytes, 20 * 100 + 1);
        assert!(m.needed_bytes() > offered);
        assert!(!m.fits());
        // With room for the union it does.
        let needed = m.needed_bytes();
        assert!(during_switch(&model, &options(), &one(10..20), &(15..30), needed).fits());
    }

    #[test]
    fn embedding_and_head_count_once_if_either_stage_has_them() {
        let m = during_switch(&model(), &options(), &one(0..10), &(0..20), u64::MAX);
        assert_eq!(m.weight_bytes, 20 * 100 + 1 + 1000);
        let m = during_switch(&model(), &options(), &one(0..10), &(5..40), u64::MAX);
        assert_eq!(m.weight_bytes, 40 * 100 + 1 + 1000 + 2000);
    }

    #[test]
    fn a_worker_without_an_old_stage_fits_when_its_new_stage_does() {
        let model = model();
        let stage = model.resident_bytes(30..40) + 10 * 20 + scratch();
        assert!(during_switch(&model, &options(), &[], &(30..40), stage).fits());
        assert!(!during_switch(&model, &options(), &[], &(30..40), stage - 1).fits());
        assert_eq!(during_switch(&model, &options(), &[], &(30..40), stage).needed_bytes(), stage);
    }

    #[test]
    fn ranges_past_the_model_are_clamped_not_a_panic() {
        let m = during_switch(&model(), &options(), &one(35..50), &(0..5), u64::MAX);
        assert_eq!(m.weight_bytes, 10 * 100 + 1 + 1000 + 2000);
    }
}
