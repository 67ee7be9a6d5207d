//! What a stranger on the LAN sees: hosts made of network namespaces
//! (`strata_tests::netns`), the coordinator in host 1 and two workers in hosts 2 and
//! 3 that pull their layers from it; every frame through host 2's bridge port is
//! recorded while a prompt is answered. With mutual TLS the recording holds no
//! token id of the prompt and no byte of the weights; the same run with
//! `--insecure` shows both (which proves the search finds them).
//!
//! Needs root (prints `SKIPPED: ...` and passes otherwise).

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use serde_json::json;
use strata_coordinator::cli::children::Process;
use strata_coordinator::cli::http;
use strata_tests::netns::{log_level, Hosts};
use strata_tests::{binary, real_model, until_serving};

const GRPC_PORT: u16 = 7070;
/// "The capital of France is" in the test model's tokens.
const PROMPT: [u32; 5] = [504, 3575, 282, 4649, 314];
/// Pieces of the model file looked for in the recording.
const WEIGHT_SAMPLES: usize = 64;
const SAMPLE_BYTES: usize = 32;

/// What the recording of one run showed.
#[derive(Debug)]
struct Seen {
    captured_bytes: usize,
    prompt_tokens: bool,
    weight_samples: usize,
}

/// The prompt's token ids as the wire carries them (a packed protobuf field:
/// varints one after another).
fn packed_varints(values: &[u32]) -> Vec<u8> {
    let mut out = Vec::new();
    for &v in values {
        let mut v = v;
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    out
}

/// Evenly spread pieces of the model file's second half (tensor data: the
/// metadata and the tokenizer sit at its start).
fn weight_samples(model: &Path) -> anyhow::Result<Vec<Vec<u8>>> {
    let bytes = std::fs::read(model)?;
    let start = bytes.len() / 2;
    let step = (bytes.len() - start) / WEIGHT_SAMPLES;
    Ok((0..WEIGHT_SAMPLES).map(|i| bytes[start + i * step..start + i * step + SAMPLE_BYTES].to_vec()).collect())
}

/// Which of `needles` (each at least 8 bytes) occur in `haystack`: one pass, keyed
/// by each needle's first 8 bytes.
fn found(haystack: &[u8], needles: &[Vec<u8>]) -> Vec<bool> {
    let mut by_prefix: HashMap<[u8; 8], Vec<usize>> = HashMap::new();
    for (i, n) in needles.iter().enumerate() {
        by_prefix.entry(n[..8].try_into().unwrap_or_default()).or_default().push(i);
    }
    let mut seen = vec![false; needles.len()];
    for at in 0..haystack.len().saturating_sub(8) {
        let Some(candidates) = by_prefix.get(&haystack[at..at + 8]) else { continue };
        for &i in candidates {
            seen[i] |= haystack[at..].starts_with(&needles[i]);
        }
    }
    seen
}

async fn run(hosts: &Hosts, model: &Path, insecure: bool) -> anyhow::Result<Seen> {
    let cache = tempfile::tempdir()?;
    let trust = if insecure { vec!["--insecure".to_string()] } else { hosts.trust_args() };
    let recording = hosts.capture(2)?;
    let mut workers = Vec::new();
    for (host, name) in [(2, "w2"), (3, "w3")] {
        let mut args = vec!["--listen".into(), format!("{}:{GRPC_PORT}", hosts.address(host)), "--no-mdns".into()];
        if insecure {
            args.push("--insecure".into());
        }
        workers.push(hosts.start_worker(host, name, cache.path(), &args).await?);
    }
    let mut serve: Vec<String> =
        ["--threads", "1", "serve", "--model", &model.display().to_string()].into_iter().map(String::from).collect();
    serve.extend(["--model-id".into(), "test-model".into(), "--placement".into(), "spread".into(), "--no-mdns".into()]);
    serve.extend(["--grpc-listen".into(), format!("{}:7100", hosts.address(1))]);
    serve.extend(["--http-listen".into(), format!("{}:8000", hosts.address(1))]);
    for host in [2, 3] {
        serve.extend(["--worker".into(), format!("{}:{GRPC_PORT}", hosts.address(host))]);
    }
    serve.extend(trust);
    let mut coordinator = hosts.spawn(1, "coordinator", &binary("strata")?, &serve, &[("STRATA_LOG", log_level())])?;
    let (ready, stages) = until_serving(&mut coordinator).await?;
    coordinator.drain_output();
    anyhow::ensure!(stages.len() == 2, "one stage a worker: {stages:?}");
    let http = Process::field(&ready, "http").context("no http= in the coordinator's line")?;
    let body = json!({"model": "test-model", "prompt": PROMPT, "max_tokens": 16, "temperature": 0});
    let reply = tokio::task::block_in_place(|| {
        hosts.block_on(1, http::request(&http, "POST", "/v1/completions", Some(&body)))
    })??;
    anyhow::ensure!(reply.status == 200, "HTTP {}: {}", reply.status, reply.body);
    coordinator.stop(std::time::Duration::from_secs(10)).await;
    for w in workers {
        w.stop(std::time::Duration::from_secs(10)).await;
    }
    let captured = recording.finish()?;
    let mut needles = vec![packed_varints(&PROMPT)];
    needles.extend(weight_samples(model)?);
    let seen = found(&captured, &needles);
    Ok(Seen {
        captured_bytes: captured.len(),
        prompt_tokens: seen[0],
        weight_samples: seen[1..].iter().filter(|s| **s).count(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capture_on_the_bridge_shows_no_token_ids_and_no_weights() -> anyhow::Result<()> {
    let test = "a_capture_on_the_bridge_shows_no_token_ids_and_no_weights";
    let Some(model) = real_model() else { return Ok(()) };
    let Some(hosts) = Hosts::for_test(test, 3)? else { return Ok(()) };
    let plain = run(&hosts, &model, true).await?;
    eprintln!("--insecure: {plain:?}");
    anyhow::ensure!(plain.captured_bytes > 1 << 20, "the recording missed the traffic: {plain:?}");
    anyhow::ensure!(plain.prompt_tokens, "the search did not find the prompt in plain TCP: {plain:?}");
    anyhow::ensure!(plain.weight_samples > 0, "the search did not find weights in plain TCP: {plain:?}");
    let hosts = Hosts::create(3)?;
    let secure = run(&hosts, &model, false).await?;
    eprintln!("mutual TLS: {secure:?}");
    anyhow::ensure!(secure.captured_bytes > 1 << 20, "the recording missed the traffic: {secure:?}");
    assert!(!secure.prompt_tokens, "the prompt's token ids crossed the network in the clear: {secure:?}");
    assert_eq!(secure.weight_samples, 0, "weights crossed the network in the clear: {secure:?}");
    Ok(())
}
