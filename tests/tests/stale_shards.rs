//! A live worker holding a shard of a pipeline that is no longer served (cut off
//! mid-switch, or back through a Join before it was cleaned) has it unloaded by the
//! coordinator within seconds, and the cluster keeps serving.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use strata_coordinator::cli::http;
use strata_proto::v1::{self, DescribeRequest};
use strata_tests::admin::{pipeline_id, pipelines_held};
use strata_tests::streams::synthetic_model;
use strata_tests::{ClusterOptions, TestCluster};

#[tokio::test]
async fn a_stale_shard_on_a_live_worker_is_unloaded() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = synthetic_model(dir.path())?;
    let cluster = TestCluster::start(&model, &ClusterOptions::default()).await?;
    let addr = cluster.http().to_string();
    let current = pipeline_id(&addr).await?;
    let worker = cluster.workers[0].clone();

    // A shard of another pipeline, loaded beside the current one behind the
    // coordinator's back.
    let mut client = cluster.worker_client(&worker).await?;
    let mut stale = client.describe(DescribeRequest {}).await?.into_inner().shard.context("worker-0 holds no shard")?;
    stale.pipeline_id = current.wrapping_add(1000);
    client.load_shard(v1::LoadShardRequest { shard: Some(stale), keep_other_pipelines: true }).await?;

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let held = pipelines_held(cluster.transport(), &worker).await?;
        if held == [current] {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "{worker} still holds {held:?}; the current pipeline is {current}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let body = json!({"model": "test-model", "prompt": [1, 2, 3], "max_tokens": 8, "temperature": 0});
    let reply = http::request(&addr, "POST", "/v1/completions", Some(&body)).await?;
    assert_eq!(reply.status, 200, "{}", reply.body);
    cluster.stop().await;
    Ok(())
}
