//! Issue 12's `strata gpu-check`, rehearsed where there is no GPU: the whole check
//! on the CPU (the worker's devices, a random model in a Q4_K_M file's types, its
//! logits against the CPU's, speed, two workers with one drained under a request,
//! the MoE and sliding-window blocks) on the small shape; and, asked for a GPU on
//! a machine without one, a clear refusal after the device list.

use std::process::{Command, Output};

use strata_tests::binary;

fn gpu_check(args: &[&str]) -> Output {
    let strata = binary("strata").expect("the strata binary");
    let output = Command::new(strata)
        .args(["--threads", "1", "gpu-check", "--shape", "small"])
        .args(args)
        .env("STRATA_LOG", "warn")
        .output()
        .expect("strata gpu-check runs");
    println!("{}", String::from_utf8_lossy(&output.stdout));
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    output
}

#[test]
fn the_check_rehearsed_on_the_cpu_passes_every_part() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().display().to_string();
    let out = gpu_check(&["--device", "cpu", "--prompt-tokens", "64", "--decode-tokens", "8", "--work-dir", &work]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the check failed");
    for part in [
        "== devices, as the worker finds them",
        "cpu ",
        "worker   on cpu",
        "PASS  operations: each agrees with the CPU",
        "PASS  layers: hidden states within",
        "PASS  dense model: mean KL divergence below 0.001",
        "PASS  speed: prefill and decode ran",
        "PASS  pipeline: the same tokens before, through and after a drain",
        "PASS  pipeline: the drained worker's memory is freed",
        "PASS  Qwen3-MoE routing",
        "PASS  GLM-4.5-Air routing",
        "PASS  Gemma 3 (sliding window",
    ] {
        assert!(stdout.contains(part), "no `{part}` in the report");
    }
    assert!(!stdout.contains("FAIL"));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the random models are removed");
}

#[test]
fn asking_for_a_gpu_where_there_is_none_says_so_after_the_devices() {
    let out = gpu_check(&["--device", "cuda:0", "--no-pipeline"]);
    if out.status.success() {
        eprintln!("SKIPPED: this machine has a GPU; the check ran on it instead of refusing");
        return;
    }
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("== devices") && stdout.contains("cpu "), "the devices come first");
    assert!(stderr.contains("cuda:0") && stderr.contains("--device cpu"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line says why");
}
