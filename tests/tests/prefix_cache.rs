//! A prompt's KV computed once, on every stage of a 3-worker pipeline: the choices
//! of one request (`n`) copy all of their prompt but its last token from the first
//! choice's sequence, and a conversation's next turn copies the whole frames of its
//! previous prompt from that turn's sequence, kept after it ended (the prefix
//! cache). What comes back is, token for token, what a coordinator that computes
//! every prompt whole gives.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use strata_coordinator::cli::http;
use strata_coordinator::cluster::ServedModel;
use strata_coordinator::planner::PlanOptions;
use strata_model::synthetic::SyntheticModel;
use strata_tests::in_process::{serve_config, InProcessCoordinator};
use strata_tests::{ClusterOptions, TestCluster};

/// Prompt tokens per frame: short prompts span several, as long ones do with the
/// default of 512.
const FRAME_TOKENS: usize = 8;

/// `len` token ids from `seed`.
fn tokens(seed: u32, len: u32) -> Vec<u32> {
    (0..len).map(|i| (seed * 13 + i * 7) % 250 + 1).collect()
}

/// What a coordinator answered, and the prompt positions it copied.
#[derive(Debug)]
struct Answers {
    choices: Vec<String>,
    turns: Vec<String>,
    prefix_positions: u64,
}

/// Three seeded choices of one prompt, then a five-turn conversation (each turn's
/// prompt the previous one and 13 tokens more), through a coordinator planning
/// `sequences` sequences, with or without the prefix cache.
async fn answers(model: &Path, prefix_cache: bool, sequences: usize) -> anyhow::Result<Answers> {
    let options = ClusterOptions { insecure: true, ..ClusterOptions::default() };
    let workers = TestCluster::workers(model, &options).await?;
    let served = Arc::new(ServedModel::open(model, "test-model".into())?);
    let mut config = serve_config(served, workers.workers.clone());
    config.prefix_cache = prefix_cache;
    config.plan = PlanOptions { context: 256, sequences, prefill_chunk: FRAME_TOKENS, ..PlanOptions::default() };
    let coordinator = InProcessCoordinator::start(config).await?;
    let complete = |body: serde_json::Value| {
        let addr = coordinator.http.clone();
        async move {
            let reply = http::request(&addr, "POST", "/v1/completions", Some(&body)).await?;
            anyhow::ensure!(reply.status == 200, "HTTP {}: {}", reply.status, reply.body);
            let texts: Vec<String> = reply.json()?["choices"]
                .as_array()
                .map(|c| c.iter().map(|c| c["text"].as_str().unwrap_or_default().to_owned()).collect())
                .unwrap_or_default();
            anyhow::Ok(texts)
        }
    };
    let choices = complete(json!({
        "model": "test-model", "prompt": tokens(1, 19), "max_tokens": 8, "temperature": 1, "seed": 7, "n": 3,
    }))
    .await?;
    let mut turns = Vec::new();
    let mut prompt = tokens(2, 20);
    for turn in 0..5 {
        let body = json!({"model": "test-model", "prompt": prompt, "max_tokens": 8, "temperature": 0});
        turns.extend(complete(body).await?);
        prompt.extend(tokens(3 + turn, 13));
    }
    let prefix_positions = coordinator.status().await?["prefix_positions"].as_u64().unwrap_or_default();
    coordinator.stop(Duration::from_secs(10)).await?;
    workers.stop().await;
    Ok(Answers { choices, turns, prefix_positions })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_prompt_starts_are_copied_and_change_no_token() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = SyntheticModel { layers: 6, context_length: 256, ..SyntheticModel::tiny() }.write_to(dir.path())?;
    let shared = answers(&model, true, 4).await?;
    // One planned sequence and no prefix cache: every prompt is computed whole.
    let whole = answers(&model, false, 1).await?;
    assert_eq!(shared.choices.len(), 3, "{shared:?}");
    assert_eq!((&shared.choices, &shared.turns), (&whole.choices, &whole.turns));
    // The choices copy 18 of 19 positions twice; turns 2 to 5 their predecessors'
    // whole frames: 16, 32, 40 and 56 positions.
    assert_eq!((shared.prefix_positions, whole.prefix_positions), (2 * 18 + 16 + 32 + 40 + 56, 0));
    Ok(())
}
