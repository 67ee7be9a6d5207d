//! How a decode step's time grows with the sequences batched into it, on the real
//! SmolLM2-135M model (`STRATA_TEST_MODEL`): the weights are read once per step
//! whatever the batch, so what grows is the per-sequence work (attention and the
//! tensor operations around it). A benchmark: it prints, and asserts nothing.
//!
//! `cargo test --release -p strata-model --test decode_batch_bench decode_step -- --ignored --nocapture`
//! (`STRATA_BENCH_BATCHES=1,16`, `STRATA_BENCH_STEPS=24` to choose).
//!
//! Beside it, `stage_split_step_time`: the same model's decode step as three pipeline
//! stages in one process, the yardstick for what each worker of `strata bench
//! --workers 3` computes.

use std::time::Instant;

use strata_model::stage::StageOptions;
use strata_model::{Device, ModelFile, Stage, StageInput, StageOutput, StageStep, Tensor};

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

/// A decode step of the whole model against the same step through three stages of
/// a third of the layers each, in this one process, the hidden states copied out and
/// back between them as a pipeline's wire does: what each stage of `strata bench
/// --workers 3` would compute if the other processes cost it nothing.
///
/// `cargo test --release -p strata-model --test decode_batch_bench stage_split -- --ignored --nocapture`
#[test]
#[ignore = "benchmark; run explicitly with --ignored --nocapture"]
fn stage_split_step_time() {
    let Some(path) = strata_model::synthetic::real_test_model() else { return };
    let file = ModelFile::open(&path).unwrap();
    let n = file.info().layers;
    let load = |layers| Stage::load(&file, layers, &Device::Cpu, StageOptions::default()).unwrap();
    let mut whole = load(0..n);
    let mut stages: Vec<Stage> = (0..3).map(|i| load(i * n / 3..(i + 1) * n / 3)).collect();
    let (prompt, steps) = (64usize, 200usize);
    let prompt_tokens: Vec<u32> = (0..prompt).map(|t| (100 + 7 * t) as u32).collect();
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!();
    for round in 0..3u64 {
        let step = |position: usize, input: StageInput| StageStep { seq: round, position, input };
        whole.forward(&[step(0, StageInput::Tokens(prompt_tokens.clone()))]).unwrap();
        let mut whole_ms = Vec::new();
        for s in 0..steps {
            let t0 = Instant::now();
            whole.forward(&[step(prompt + s, StageInput::Tokens(vec![300 + s as u32]))]).unwrap();
            whole_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        whole.release(round);
        let mut stage_ms = vec![Vec::new(); stages.len()];
        for s in 0..=steps {
            // Step 0 is the prompt, not timed.
            let (position, first) = if s == 0 { (0, prompt_tokens.clone()) } else { (prompt + s - 1, vec![300 + s as u32 - 1]) };
            let mut input = StageInput::Tokens(first);
            for (i, stage) in stages.iter_mut().enumerate() {
                let t0 = Instant::now();
                let output = stage.forward(&[step(position, input)]).unwrap().pop().unwrap();
                input = match output {
                    StageOutput::Hidden(h) => {
                        let values = h.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                        StageInput::Hidden(Tensor::from_vec(values, h.shape(), &Device::Cpu).unwrap())
                    }
                    StageOutput::Logits(_) => StageInput::Tokens(Vec::new()),
                };
                if s > 0 {
                    stage_ms[i].push(t0.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        for stage in &mut stages {
            stage.release(round);
        }
        let each: Vec<f64> = stage_ms.into_iter().map(median).collect();
        println!(
            "round {round}: whole model {:.2} ms a step; stages {:.2} / {:.2} / {:.2} ms, {:.2} in all",
            median(whole_ms),
            each[0],
            each[1],
            each[2],
            each.iter().sum::<f64>()
        );
    }
}
