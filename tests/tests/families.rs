//! The families beyond Llama through a real cluster: Qwen3, Gemma 3, Qwen3-MoE and
//! GLM-4.5 synthetic models (the MoE ones also with the real models' 128 experts and
//! 8 per token) served by three workers that pull their shards give one process's
//! tokens; a Gemma 3 drain mid-generation moves the caches of its
//! sliding-window layers and loses nothing; and the real Gemma 3 270M does both.

use std::path::Path;

use serde_json::json;
use strata_model::synthetic::SyntheticModel;
use strata_model::{ModelFile, Tokenizer};
use strata_tests::admin::admin;
use strata_tests::streams::{StreamSpec, Streams};
use strata_tests::{complete, reference_completion, start_moving, ClusterOptions, TestCluster};

/// Eight streams as `spec` says; the middle worker drained while they run; every
/// stream must equal one process's greedy output.
async fn drain_mid_generation(cluster: &TestCluster, model: &Path, spec: StreamSpec) -> anyhow::Result<()> {
    let streams = Streams::start_with(cluster.http(), spec);
    streams.wait_until_running().await?;
    let (code, report) = admin(cluster.http(), "/admin/drain", json!({"node": "worker-1", "wait": true})).await?;
    anyhow::ensure!(code == 200 && report["finished"] == true, "{report}");
    eprintln!("drain: {}", report["message"]);
    streams.check(model).await?;
    Ok(())
}

#[tokio::test]
async fn every_family_through_three_workers_matches_one_process() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for spec in [
        SyntheticModel { layers: 6, ..SyntheticModel::qwen3_tiny() },
        SyntheticModel::gemma3_tiny(),
        SyntheticModel::qwen3_moe_tiny(),
        SyntheticModel::glm4_moe_tiny(),
        SyntheticModel::qwen3_30b_a3b_shaped(),
        SyntheticModel::glm_4_5_air_shaped(),
    ] {
        let model = spec.write_to(dir.path())?;
        let options = ClusterOptions { workers_have_model: false, ..ClusterOptions::default() };
        let cluster = TestCluster::start_joined(&model, &options).await?;
        anyhow::ensure!(cluster.stage_lines.len() == 3, "{:?}", cluster.stage_lines);
        // Longer than the Gemma model's window of 3, and generating well past it.
        for prompt in [&[5u32, 80, 120, 33, 7, 250, 2, 9][..], &[17]] {
            let want = reference_completion(&model, prompt, 16)?;
            assert_eq!(complete(cluster.http(), prompt, 16).await?, want, "{} {prompt:?}", spec.architecture);
        }
        cluster.stop().await;
    }
    Ok(())
}

#[tokio::test]
async fn a_gemma3_drain_mid_generation_moves_sliding_caches_and_loses_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // Wide enough that the streams are still running when the drain comes.
    let spec = SyntheticModel { hidden: 256, feed_forward: 1024, context_length: 512, ..SyntheticModel::gemma3_tiny() };
    let model = spec.write_to(dir.path())?;
    let cluster = start_moving(&model, "transfer").await?;
    drain_mid_generation(&cluster, &model, StreamSpec::default()).await?;
    cluster.stop().await;
    Ok(())
}

#[tokio::test]
async fn the_real_gemma3_through_three_workers_and_a_drain_matches_one_process() -> anyhow::Result<()> {
    let Some(model) = strata_tests::real_gemma_model() else {
        return Ok(());
    };
    let tokenizer = Tokenizer::from_gguf(ModelFile::open(&model)?.metadata())?;
    let prompt = tokenizer.encode("The capital of France is")?;
    // <bos> first: Gemma's vocabulary asks for it.
    assert_eq!(prompt, [2, 818, 5279, 529, 7001, 563]);
    let cluster = start_moving(&model, "transfer").await?;
    let got = complete(cluster.http(), &prompt, 32).await?;
    assert_eq!(got, reference_completion(&model, &prompt, 32)?);
    eprintln!("Gemma 3 through the cluster: {:?}", got.0);
    drain_mid_generation(&cluster, &model, StreamSpec { max_tokens: 48, ..StreamSpec::default() }).await?;
    cluster.stop().await;
    Ok(())
}
