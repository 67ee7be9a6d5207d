//! Exactness against llama.cpp on the real SmolLM2-135M model.
//!
//! The model is fetched by `.ci/run` (or `strata model fetch smollm2-135m`); set
//! `STRATA_TEST_MODEL` to its path. Without it these tests say so and pass.

use std::path::PathBuf;

use strata_model::sampling::{Sampler, SamplingParams};
use strata_model::stage::StageOptions;
use strata_model::{Device, ModelFile, Stage, StageInput, StageOutput, StageStep};

fn model_path() -> Option<PathBuf> {
    let path = std::env::var_os("STRATA_TEST_MODEL").map(PathBuf::from).or_else(|| {
        let home = std::env::var_os("HOME")?;
        Some(PathBuf::from(home).join(".cache/strata/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    })?;
    if path.exists() {
        Some(path)
    } else {
        eprintln!("skipping: real model not found at {} (set STRATA_TEST_MODEL)", path.display());
        None
    }
}

/// Greedy decode through a chain of stages, feeding each stage's output to the next.
fn greedy(stages: &mut [Stage], prompt: &[u32], n: usize) -> Vec<u32> {
    let sampler = Sampler::new(&SamplingParams::greedy()).unwrap();
    let mut history = prompt.to_vec();
    let mut input = prompt.to_vec();
    let mut position = 0;
    let mut out = Vec::new();
    for _ in 0..n {
        let mut x = StageInput::Tokens(input.clone());
        let mut logits = None;
        for stage in stages.iter_mut() {
            let step = StageStep { seq: 1, position, input: x.clone() };
            match stage.forward(&[step]).unwrap().pop().unwrap() {
                StageOutput::Hidden(h) => x = StageInput::Hidden(h),
                StageOutput::Logits(l) => logits = Some(l.to_vec1::<f32>().unwrap()),
            }
        }
        position += input.len();
        let next = sampler.sample(&logits.unwrap(), &history, history.len()).unwrap();
        out.push(next);
        history.push(next);
        input = vec![next];
    }
    out
}

#[test]
fn capital_of_france_matches_llama_cpp() {
    let Some(path) = model_path() else { return };
    let file = ModelFile::open(&path).unwrap();
    let mut stage = Stage::load(&file, 0..file.info().layers, &Device::Cpu, StageOptions::default()).unwrap();
    let tokens = greedy(std::slice::from_mut(&mut stage), &[504, 3575, 282, 4649, 314], 32);
    assert_eq!(
        tokens,
        [
            7042, 30, 198, 198, 504, 1797, 1918, 553, 253, 2155, 282, 4723, 216, 35, 33, 33, 2215, 701, 30, 198, 198,
            504, 1797, 1918, 553, 253, 2155, 282, 4723, 216, 35, 33
        ]
    );
}
