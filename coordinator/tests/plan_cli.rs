//! `strata plan` as a user runs it: text and JSON answers, a GGUF as the model,
//! a manual override, and clear errors for bad input.

use std::process::{Command, Output};

use strata_model::synthetic::SyntheticModel;

fn strata(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_strata")).args(args).output().expect("the strata binary runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

const HOME_LAB: &str = "rtx3070,rtx3090,2x rtx4090";

#[test]
fn text_answer_for_the_home_lab() {
    let out = strata(&["plan", "--model", "llama-3.1-70b-q4_k_m", "--nodes", HOME_LAB, "--context", "8192"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("llama-3.1-70b-q4_k_m: 80 layers, 39.8 GiB of weights; context 8192 × 1 sequence\nfits: yes\n"), "{text}");
    assert!(text.contains("rtx4090#0") && text.contains("rtx4090#1") && text.contains("rtx3090#0"), "{text}");
    assert!(text.contains("left out: rtx3070 (not needed"), "{text}");
    assert!(text.contains("tokens/s single stream"), "{text}");
    assert!(text.contains("largest context: "), "{text}");
}

#[test]
fn json_answer_for_the_home_lab() {
    let out = strata(&["plan", "-m", "llama-3.1-70b-q4_k_m", "--nodes", HOME_LAB, "--context", "8192", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["fits"], true);
    let stages = v["plan"]["stages"].as_array().unwrap();
    assert_eq!(stages.first().unwrap()["layers"]["start"], 0);
    assert_eq!(stages.last().unwrap()["layers"]["end"], 80);
    assert!(v["tokens_per_second"].as_f64().unwrap() > 10.0);
    assert!(v["plan_max_context"].as_u64().unwrap() >= 8192);
    assert!(v["nodes_max_context"].as_u64().unwrap() >= v["plan_max_context"].as_u64().unwrap());
}

#[test]
fn not_fitting_prints_the_shortfall_and_exits_1() {
    let out = strata(&["plan", "-m", "llama-3.1-70b-q4_k_m", "--nodes", "rtx3070,rtx3090"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("fits: no\n"), "{text}");
    assert!(text.contains("GiB short; what would help: another GPU offering at least"), "{text}");

    let out = strata(&["plan", "-m", "llama-3.1-405b-q4_k_m", "--nodes", HOME_LAB, "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["fits"], false);
    assert!(v["shortfall"]["short_by_bytes"].as_u64().unwrap() > 100 << 30);
    assert!(v["message"].as_str().unwrap().contains("does not fit"));
}

#[test]
fn a_gguf_file_and_a_manual_override() {
    let dir = tempfile::tempdir().unwrap();
    let model = SyntheticModel::tiny().write_to(dir.path()).unwrap();
    let model = model.to_str().unwrap();
    let out = strata(&["plan", "-m", model, "--nodes", "a=1GiB@10GB/s,b=1GiB@20GB/s", "--context", "64", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["plan"]["layers"], 4);
    assert_eq!(v["plan"]["stages"].as_array().unwrap().len(), 1, "one node holds a tiny model");

    let out = strata(&["plan", "-m", model, "--nodes", "a=1GiB@10GB/s,b=1GiB@20GB/s", "--context", "64", "--layers", "a:0-1,b:2-3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("fits: yes"), "{text}");
    assert!(text.contains(" 0-1 ") && text.contains(" 2-3 "), "{text}");

    let out = strata(&["plan", "-m", model, "--nodes", "a=1GiB@10GB/s,b=1GiB@20GB/s", "--layers", "a:0-1,c:2-3"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("unknown node `c` (nodes: a, b)"), "{}", stderr(&out));
}

#[test]
fn bad_input_gets_a_clear_error() {
    let out = strata(&["plan", "-m", "llama-3.1-70b-q4_k_m", "--nodes", "rtx3070,rtx9090"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(stderr(&out).contains("unknown device `rtx9090` (known: rtx3070"), "{}", stderr(&out));

    // Without --nodes it plans for the running cluster, and says when there is none.
    let out = strata(&["plan", "-m", "llama-3.1-70b-q4_k_m", "--coordinator", "127.0.0.1:1"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cannot reach the coordinator at 127.0.0.1:1"), "{}", stderr(&out));

    let out = strata(&["plan", "-m", "no-such-model", "--nodes", "rtx4090"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("unknown model `no-such-model`"), "{}", stderr(&out));
}
