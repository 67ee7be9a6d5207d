//! `strata generate` as a user runs it: the binary, its JSON output, and its errors.

use std::path::PathBuf;
use std::process::{Command, Output};

use strata_model::synthetic::SyntheticModel;

fn strata(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_strata")).args(args).output().expect("the strata binary runs")
}

fn real_model() -> Option<PathBuf> {
    strata_model::synthetic::real_test_model()
}

#[test]
fn json_output_matches_llama_cpp_on_the_real_model() {
    let Some(model) = real_model() else { return };
    let out = strata(&["generate", "--model", model.to_str().unwrap(), "-n", "32", "--temperature", "0", "--json", "The capital of France is"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["prompt_tokens"], serde_json::json!([504, 3575, 282, 4649, 314]));
    assert_eq!(
        v["tokens"],
        serde_json::json!([
            7042, 30, 198, 198, 504, 1797, 1918, 553, 253, 2155, 282, 4723, 216, 35, 33, 33, 2215, 701, 30, 198, 198,
            504, 1797, 1918, 553, 253, 2155, 282, 4723, 216, 35, 33
        ])
    );
    assert_eq!(
        v["text"],
        " Paris.\n\nThe United States has a population of approximately 311 million people.\n\nThe United States has a population of approximately 31"
    );
}

#[test]
fn streams_text_from_a_synthetic_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = SyntheticModel::tiny().write_to(dir.path()).unwrap();
    let out = strata(&["generate", "--model", model.to_str().unwrap(), "-n", "5", "hello"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("hello"));
}

/// Each bad input exits non-zero with a message naming the problem, never a panic.
#[test]
fn bad_input_gets_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = SyntheticModel::tiny().write_to(dir.path()).unwrap();
    let not_gguf = dir.path().join("notes.txt");
    std::fs::write(&not_gguf, "just text").unwrap();
    let truncated = dir.path().join("truncated.gguf");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let mut mamba = SyntheticModel::tiny();
    mamba.architecture = "mamba".into();
    let mamba = mamba.write_to(dir.path()).unwrap();
    let long_prompt = "a ".repeat(400);
    let m = model.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["generate", "--model", "/no/such/file.gguf", "x"], "neither a file nor a known model"),
        (vec!["generate", "--model", not_gguf.to_str().unwrap(), "x"], "not a GGUF file"),
        (vec!["generate", "--model", truncated.to_str().unwrap(), "x"], "truncated or corrupt"),
        (vec!["generate", "--model", mamba.to_str().unwrap(), "x"], "unsupported architecture `mamba`"),
        (vec!["generate", "--model", m, &long_prompt], "exceed the context length"),
        (vec!["generate", "--model", m, "--temperature=-1", "x"], "temperature"),
        (vec!["generate", "--model", m, "--device", "tpu", "x"], "unknown device"),
    ];
    for (args, expected) in cases {
        let out = strata(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// `strata model info` names what the runtime will do with a file: the family, the
/// experts of an MoE model, the window of a sliding-window one.
#[test]
fn model_info_shows_experts_and_windows() {
    let dir = tempfile::tempdir().unwrap();
    for (spec, says) in [
        (SyntheticModel::glm4_moe_tiny(), "experts        2 of 8 per token (feed-forward 32), Sigmoid router"),
        (SyntheticModel::gemma3_tiny(), "sliding window 3 positions on 5 of 6 layers"),
    ] {
        let model = spec.write_to(dir.path()).unwrap();
        let out = strata(&["model", "info", model.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains(says), "{text}{}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains(&format!("architecture   {}", spec.architecture)), "{text}");
    }
}
