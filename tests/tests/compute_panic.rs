//! A stage whose compute thread panics (a bug) loses no request and does not leave
//! the cluster broken: the sequences in flight fail as the pipeline's trouble, the
//! worker stops claiming the shard, and the coordinator re-plans and replays them.
//! The workers panic on cue (`STRATA_TEST_PANIC_AT`, once per process).

use anyhow::Context;
use strata_tests::admin::status;
use strata_tests::streams::synthetic_model;
use strata_tests::{complete, reference_completion, ClusterOptions, TestCluster};

/// Eleven prompt tokens: the decode frames start at position 11, so the panic comes
/// at the request's third token.
const PROMPT: [u32; 11] = [5, 9, 14, 3, 27, 8, 61, 2, 33, 17, 4];
const MAX_TOKENS: usize = 16;

#[tokio::test]
async fn a_panicking_stage_is_replaced_and_its_request_completes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = synthetic_model(dir.path())?;
    let (expected, expected_tokens) = reference_completion(&model, &PROMPT, MAX_TOKENS)?;
    anyhow::ensure!(expected_tokens > 3, "the reference ends before the panic's position ({expected_tokens} tokens)");

    let options = ClusterOptions { env: vec![("STRATA_TEST_PANIC_AT", "1:12".into())], ..ClusterOptions::default() };
    let cluster = TestCluster::start(&model, &options).await?;
    let addr = cluster.http().to_string();
    let before = status(&addr).await?["pipeline_id"].as_u64().context("no pipeline")?;

    // Stage 1 panics computing this request's frame at position 12.
    let (text, tokens) = complete(&addr, &PROMPT, MAX_TOKENS).await?;
    assert_eq!((text.as_str(), tokens), (expected.as_str(), expected_tokens), "the request came back whole");
    let after = status(&addr).await?["pipeline_id"].as_u64().context("no pipeline")?;
    assert_ne!(before, after, "the coordinator re-planned around the stage that stopped");

    // And the cluster serves on (the cue fires once per process).
    let (again, _) = complete(&addr, &PROMPT, MAX_TOKENS).await?;
    assert_eq!(again, expected);
    cluster.stop().await;
    Ok(())
}
