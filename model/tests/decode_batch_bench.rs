//! How a decode step's time grows with the sequences batched into it, on the real
//! SmolLM2-135M model (`STRATA_TEST_MODEL`): the weights are read once per step
//! whatever the batch, so what grows is the per-sequence work (attention and the
//! tensor operations around it). A benchmark: it prints, and asserts nothing.
//!
//! `cargo test --release -p strata-model --test decode_batch_bench -- --ignored --nocapture`
//! (`STRATA_BENCH_BATCHES=1,16`, `STRATA_BENCH_STEPS=24` to choose).

use std::time::Instant;

use strata_model::stage::StageOptions;
use strata_model::{Device, ModelFile, Stage, StageInput, StageStep};

#[test]
#[ignore = "benchmark; run explicitly with --ignored --nocapture"]
fn decode_step_time_by_batch() {
    let Some(path) = strata_model::synthetic::real_test_model() else { return };
    let file = ModelFile::open(&path).unwrap();
    let mut stage = Stage::load(&file, 0..file.info().layers, &Device::Cpu, StageOptions::default()).unwrap();
    // `STRATA_BENCH_BATCHES=16 STRATA_BENCH_STEPS=200` profiles one batch size.
    let var = |name: &str| std::env::var(name).ok();
    let batches: Vec<usize> = var("STRATA_BENCH_BATCHES")
        .map_or(vec![1, 4, 16], |v| v.split(',').filter_map(|b| b.trim().parse().ok()).collect());
    let steps = var("STRATA_BENCH_STEPS").and_then(|v| v.parse().ok()).unwrap_or(24usize);
    let prompt = 64usize;
    println!();
    for batch in batches {
        let seqs: Vec<u64> = (0..batch as u64).map(|i| 1000 * batch as u64 + i).collect();
        for (i, &seq) in seqs.iter().enumerate() {
            let tokens = (0..prompt).map(|t| (100 + 7 * t + i) as u32).collect();
            stage.forward(&[StageStep { seq, position: 0, input: StageInput::Tokens(tokens) }]).unwrap();
        }
        let mut times = Vec::new();
        for s in 0..steps {
            let step: Vec<StageStep> = seqs
                .iter()
                .map(|&seq| StageStep { seq, position: prompt + s, input: StageInput::Tokens(vec![300 + s as u32]) })
                .collect();
            let t0 = Instant::now();
            stage.forward(&step).unwrap();
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!(
            "batch {batch:2}: decode step {median:6.2} ms (median of {steps}), {:6.1} tokens/s in all",
            batch as f64 * 1e3 / median
        );
        for seq in seqs {
            stage.release(seq);
        }
    }
}
