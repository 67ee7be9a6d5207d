//! `strata perplexity` as a user runs it: llama-perplexity's output lines, a saved
//! base file that the same model diverges from by nothing, and clear errors.

use std::process::{Command, Output};

use strata_model::synthetic::SyntheticModel;

fn strata(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_strata")).args(args).output().expect("the strata binary runs")
}

fn stdout(out: &Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_saved_base_scores_the_same_model_with_no_divergence() {
    let dir = tempfile::tempdir().unwrap();
    let model = SyntheticModel::gemma3_tiny().write_to(dir.path()).unwrap();
    let model = model.to_str().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, "the winter in the hills is the time the rivers run ".repeat(40)).unwrap();
    let base = dir.path().join("base.bin");
    let (text, base) = (text.to_str().unwrap(), base.to_str().unwrap());
    let out = stdout(&strata(&["perplexity", "-m", model, "-f", text, "-c", "64", "--save-logits", base]));
    assert!(out.starts_with("[1]"), "{out}");
    let ppl: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("Final estimate: PPL = "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no final estimate in {out}"));
    assert!(ppl > 1.0 && ppl.is_finite(), "{ppl}");
    let out = stdout(&strata(&["perplexity", "-m", model, "--kl-divergence-base", base]));
    let field = |name: &str| -> f64 {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|l| l.trim_start_matches([' ', ':']).split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no `{name}` in {out}"))
    };
    assert!(field("Mean    KLD:") < 1e-4, "{out}");
    assert_eq!(field("Same top p:"), 100.0, "{out}");
    assert!((field("PPL(Q)/PPL(base)") - 1.0).abs() < 1e-3, "{out}");
}

#[test]
fn bad_input_gets_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = SyntheticModel::tiny().write_to(dir.path()).unwrap();
    let model = model.to_str().unwrap();
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "too short").unwrap();
    let junk = dir.path().join("junk.bin");
    std::fs::write(&junk, "not logits at all").unwrap();
    for (args, says) in [
        (vec!["perplexity", "-m", model, "-f", short.to_str().unwrap()], "needs at least 1024"),
        (vec!["perplexity", "-m", model, "--kl-divergence-base", junk.to_str().unwrap()], "magic"),
        (vec!["perplexity", "-m", model, "-f", "/no/such/text.txt"], "reading /no/such/text.txt"),
        (vec!["perplexity", "-m", model], "--file"),
    ] {
        let out = strata(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
