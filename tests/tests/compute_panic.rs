//! A stage whose compute thread panics (a bug) loses no request and does not leave
//! the cluster broken: the sequences in flight fail as the pipeline's trouble, the
//! worker stops claiming the shard, and the coordinator re-plans and replays them.
//! The workers panic on cue (`STRATA_TEST_PANIC_AT`, once per process).

use strata_tests::admin::pipeline_id;
use strata_tests::streams::{synthetic_model, Streams};
use strata_tests::{complete, reference_completion, ClusterOptions, TestCluster};

/// Eleven prompt tokens: the decode frames start at position 11, so the panic comes
/// at the request's third token.
const PROMPT: [u32; 11] = [5, 9, 14, 3, 27, 8, 61, 2, 33, 17, 4];
const MAX_TOKENS: usize = 16;

/// A cluster of three workers whose stage `stage` panics at the first frame at
/// `position`.
async fn panicking_at(model: &std::path::Path, stage: u32, position: usize) -> anyhow::Result<TestCluster> {
    let cue = format!("{stage}:{position}");
    TestCluster::start(model, &ClusterOptions { env: vec![("STRATA_TEST_PANIC_AT", cue)], ..ClusterOptions::default() })
        .await
}

#[tokio::test]
async fn a_panicking_stage_is_replaced_and_its_request_completes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = synthetic_model(dir.path())?;
    let (expected, expected_tokens) = reference_completion(&model, &PROMPT, MAX_TOKENS)?;
    anyhow::ensure!(expected_tokens > 3, "the reference ends before the panic's position ({expected_tokens} tokens)");

    let cluster = panicking_at(&model, 1, 12).await?;
    let addr = cluster.http().to_string();
    let before = pipeline_id(&addr).await?;

    // Stage 1 panics computing this request's frame at position 12.
    let (text, tokens) = complete(&addr, &PROMPT, MAX_TOKENS).await?;
    assert_eq!((text.as_str(), tokens), (expected.as_str(), expected_tokens), "the request came back whole");
    assert_ne!(before, pipeline_id(&addr).await?, "the coordinator re-planned around the stage that stopped");

    // And the cluster serves on (the cue fires once per process).
    let (again, _) = complete(&addr, &PROMPT, MAX_TOKENS).await?;
    assert_eq!(again, expected);
    cluster.stop().await;
    Ok(())
}

/// Eight streams in flight, batched together, when the last stage panics: every one
/// completes with exactly the tokens of an undisturbed run, and no client sees an error.
#[tokio::test]
async fn eight_streams_through_a_panicking_stage_all_complete() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = synthetic_model(dir.path())?;
    let cluster = panicking_at(&model, 2, 40).await?;
    let addr = cluster.http().to_string();
    let before = pipeline_id(&addr).await?;
    Streams::start(&addr).check(&model).await?;
    assert_ne!(before, pipeline_id(&addr).await?, "the coordinator re-planned around the stage that stopped");
    cluster.stop().await;
    Ok(())
}
