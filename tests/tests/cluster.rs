//! A coordinator and three worker processes on loopback: greedy generations through
//! the pipeline equal one process token for token, concurrent requests all come back
//! right, workers that join pull their shards, and KV caches are released.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use strata_coordinator::cli::http;
use strata_coordinator::cluster::{
    self, Cluster, ClusterConfig, CoordinatorService, Membership, PlacementPolicy, ReturnPath, ServedModel,
};
use strata_coordinator::engine::local::LocalEngine;
use strata_coordinator::engine::{Engine, GenerateEvent, GenerateRequest, TokenLogprob};
use strata_model::generate::FinishReason;
use strata_model::synthetic::SyntheticModel;
use strata_model::{Device, ModelFile, SamplingParams, Tokenizer};
use strata_proto::v1::WireDtype;
use strata_tests::admin::wait_until_no_sequences;
use strata_tests::{complete, reference_completion, reference_tokens, ClusterOptions, TestCluster};

/// Six layers, so three workers hold two each.
fn synthetic(dir: &Path) -> PathBuf {
    SyntheticModel { layers: 6, ..SyntheticModel::tiny() }.write_to(dir).unwrap()
}

fn tokenizer(model: &Path) -> Tokenizer {
    Tokenizer::from_gguf(ModelFile::open(model).unwrap().metadata()).unwrap()
}

const PROMPTS: [&[u32]; 4] =
    [&[5, 80, 120, 33], &[17], &[200, 3, 3, 3, 9, 41, 250, 8], &[100, 101, 102, 103, 104, 105]];

async fn expected(model: &Path, prompt: &[u32], max_tokens: usize) -> anyhow::Result<(String, u64)> {
    reference_completion(model, prompt, max_tokens)
}

#[tokio::test]
async fn greedy_completions_through_three_workers_match_one_process() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = synthetic(dir.path());
    let cluster = TestCluster::start(&model, &ClusterOptions::default()).await?;
    assert_eq!(cluster.stage_lines.len(), 3, "{:?}", cluster.stage_lines);
    assert!(cluster.stage_lines[1].contains("layers 2..4"), "{:?}", cluster.stage_lines);
    for prompt in PROMPTS {
        assert_eq!(
            complete(cluster.http(), prompt, 16).await?,
            expected(&model, prompt, 16).await?,
            "prompt {prompt:?}"
        );
    }
    // Streamed, the pieces add up to the same text.
    let body = json!({"model": "test-model", "prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0, "stream": true});
    let mut text = String::new();
    http::post_events(cluster.http(), "/v1/completions", &body, |e| {
        text.push_str(e["choices"][0]["text"].as_str().unwrap_or(""));
    })
    .await?;
    assert_eq!(text, expected(&model, PROMPTS[0], 16).await?.0);

    // Each generated token's logprobs, computed on the last stage, equal one
    // process's to the bit.
    let (n, top) = (8, 5);
    let body = json!({
        "model": "test-model", "prompt": PROMPTS[0], "max_tokens": n, "temperature": 0, "logprobs": top,
        "return_tokens_as_token_ids": true,
    });
    let reply = http::request(cluster.http(), "POST", "/v1/completions", Some(&body)).await?.json()?;
    let got = &reply["choices"][0]["logprobs"];
    // Control tokens (chat markers) are not part of the text, nor of its logprobs.
    let vocab = tokenizer(&model);
    let mut want = local_logprobs(&model, PROMPTS[0], n, top).await?;
    want.retain(|(id, _)| !vocab.is_control(*id));
    anyhow::ensure!(!want.is_empty(), "nothing to compare");
    let name = |id: u32| format!("token_id:{id}");
    assert_eq!(got["tokens"], json!(want.iter().map(|(id, _)| name(*id)).collect::<Vec<_>>()), "{reply}");
    assert_eq!(got["token_logprobs"], json!(want.iter().map(|(_, s)| s.logprob).collect::<Vec<_>>()), "{reply}");
    let tops: Vec<serde_json::Map<String, serde_json::Value>> =
        want.iter().map(|(_, s)| s.top.iter().take(top).map(|&(id, lp)| (name(id), json!(lp))).collect()).collect();
    assert_eq!(got["top_logprobs"], json!(tops), "{reply}");
    cluster.stop().await;
    Ok(())
}

/// Greedy tokens of `prompt` in one process (the local engine), with their logprobs.
async fn local_logprobs(
    model: &Path,
    prompt: &[u32],
    n: usize,
    top: usize,
) -> anyhow::Result<Vec<(u32, TokenLogprob)>> {
    let file = ModelFile::open(model)?;
    let engine = LocalEngine::start(&file, &Device::Cpu, "test-model".into())?;
    let sampling = SamplingParams::greedy();
    let request = GenerateRequest {
        prompt_tokens: prompt.to_vec(),
        max_tokens: n,
        sampling,
        prompt_logprobs: None,
        logprobs: Some(top),
        constraint: None,
            shared_prompt: false,
    };
    let mut events = engine.generate(request)?;
    let mut tokens = Vec::new();
    while let Some(event) = events.recv().await {
        match event {
            GenerateEvent::Token(id, Some(logprob)) => tokens.push((id, logprob)),
            GenerateEvent::Token(_, None) => anyhow::bail!("a token came without its logprob"),
            GenerateEvent::Finished(_) => return Ok(tokens),
            GenerateEvent::Failed(e) => anyhow::bail!("{e}"),
            _ => {}
        }
    }
    anyhow::bail!("the engine stopped without finishing")
}

#[tokio::test]
async fn eight_concurrent_requests_all_come_back_right() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = synthetic(dir.path());
    let cluster = TestCluster::start(&model, &ClusterOptions::default()).await?;
    let prompts: Vec<Vec<u32>> =
        (0..8u32).map(|i| (0..(3 + i)).map(|j| (i * 31 + j * 7) % 250 + 1).collect()).collect();
    let addr = cluster.http().to_string();
    let replies = futures::future::join_all(prompts.iter().map(|p| complete(&addr, p, 20))).await;
    for (prompt, reply) in prompts.iter().zip(replies) {
        assert_eq!(reply?, expected(&model, prompt, 20).await?, "prompt {prompt:?}");
    }
    cluster.stop().await;
    Ok(())
}

#[tokio::test]
async fn workers_that_join_pull_their_shards_and_serve() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = synthetic(dir.path());
    let options = ClusterOptions { workers_have_model: false, ..ClusterOptions::default() };
    let cluster = TestCluster::start_joined(&model, &options).await?;
    assert_eq!(cluster.stage_lines.len(), 3);
    assert!(cluster.stage_lines.iter().all(|l| l.contains("weights pulled")), "{:?}", cluster.stage_lines);
    assert_eq!(complete(cluster.http(), PROMPTS[2], 12).await?, expected(&model, PROMPTS[2], 12).await?);
    cluster.stop().await;
    Ok(())
}

/// Tokens of one request through an in-process engine.
async fn run(engine: &cluster::ClusterEngine, prompt: &[u32], n: usize, path: ReturnPath) -> anyhow::Result<Vec<u32>> {
    let request = GenerateRequest { prompt_tokens: prompt.to_vec(), max_tokens: n, sampling: SamplingParams::greedy(), prompt_logprobs: None, logprobs: None, constraint: None, shared_prompt: false };
    let mut rx = engine.generate_via(request, path)?;
    let mut tokens = Vec::new();
    while let Some(event) = tokio::time::timeout(Duration::from_secs(60), rx.recv()).await? {
        match event {
            GenerateEvent::Admitted | GenerateEvent::PromptLogprobs(_) => {}
            GenerateEvent::Token(t, _) => tokens.push(t),
            GenerateEvent::Finished(FinishReason::Stop | FinishReason::Length) => return Ok(tokens),
            other => anyhow::bail!("unexpected {other:?}"),
        }
    }
    anyhow::bail!("the event stream ended without a finish")
}

#[tokio::test]
async fn the_engine_gives_exact_tokens_on_both_return_paths_and_frees_caches() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model_path = synthetic(dir.path());
    // Workers without the model: they pull their shards from this in-process
    // coordinator, which (in a test process running others side by side) has no
    // identity of its own: plain TCP.
    let options = ClusterOptions { workers_have_model: false, insecure: true, ..ClusterOptions::default() };
    let workers = TestCluster::workers(&model_path, &options).await?;
    let model = Arc::new(
        tokio::task::spawn_blocking({
            let p = model_path.clone();
            move || ServedModel::open(&p, "test-model".into())
        })
        .await??,
    );
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let grpc_addr = grpc.local_addr()?.to_string();
    let membership = Arc::new(Membership::default());
    let service = CoordinatorService { id: "test".into(), model: model.clone(), membership: membership.clone() };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(cluster::serve_grpc(grpc, service, async {
        let _ = stopped.await;
    }));
    let config = ClusterConfig {
        workers: workers.workers.clone(),
        min_workers: 3,
        worker_wait: Duration::from_secs(30),
        wire_dtype: WireDtype::F32,
        return_path: ReturnPath::Direct,
        weights_source: strata_coordinator::cluster::WeightsSource::Fixed(grpc_addr),
        placement: PlacementPolicy::Spread,
        plan: strata_coordinator::planner::PlanOptions::default(),
        queue_timeout: Duration::from_secs(30),
        move_sequences: Default::default(),
        // Every sequence is released when its request ends (the prefix cache would
        // keep them), which this test checks.
        prefix_cache: false,
    };
    let cluster = Cluster::start(&config, model, membership).await?.loaded().await?;
    assert!(cluster.placements.iter().all(|p| !p.weights_were_local));
    for prompt in PROMPTS {
        let expected = reference_tokens(&model_path, prompt, 24)?;
        assert_eq!(run(&cluster.engine, prompt, 24, ReturnPath::Coordinator).await?, expected, "{prompt:?}");
        assert_eq!(run(&cluster.engine, prompt, 24, ReturnPath::Direct).await?, expected, "{prompt:?}");
    }
    // A request whose client goes away mid-generation is released too.
    let request =
        GenerateRequest { prompt_tokens: PROMPTS[3].to_vec(), max_tokens: 200, sampling: SamplingParams::greedy(), prompt_logprobs: None, logprobs: None, constraint: None, shared_prompt: false };
    let mut rx = cluster.engine.generate_via(request, ReturnPath::Direct)?;
    rx.recv().await.context("no first event")?;
    drop(rx);
    tokio::time::timeout(Duration::from_secs(20), wait_until_no_sequences(workers.transport(), &workers.workers))
        .await
        .context("workers still hold sequences")??;
    let stats = cluster.stats(true).await?;
    assert_eq!(stats.len(), 3);
    assert!(stats.iter().all(|s| s.frames > 0 && !s.hop_micros.is_empty()));
    cluster.shutdown().await;
    let _ = stop.send(());
    server.await??;
    workers.stop().await;
    Ok(())
}

#[tokio::test]
async fn the_real_model_through_three_workers_matches_one_process() -> anyhow::Result<()> {
    let Some(model) = strata_tests::real_model() else {
        return Ok(());
    };
    let cluster = TestCluster::start(&model, &ClusterOptions::default()).await?;
    let prompt = tokenizer(&model).encode("The capital of France is")?;
    assert_eq!(prompt, [504, 3575, 282, 4649, 314]);
    let got = complete(cluster.http(), &prompt, 24).await?;
    let want = expected(&model, &prompt, 24).await?;
    assert_eq!(got, want);
    eprintln!("real model through the cluster: {:?}", got.0);
    cluster.stop().await;
    Ok(())
}
