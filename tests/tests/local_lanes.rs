//! Frames between the workers of one machine over local lanes (Unix sockets, past
//! both workers' gRPC stacks), and the workers' events to the coordinator: the
//! cluster reports each such link as a local lane, and the tokens are those of the
//! same cluster with everything over gRPC (`--no-local-lanes`), under mutual TLS and
//! on an `--insecure` cluster.

use serde_json::Value;
use strata_model::synthetic::SyntheticModel;
use strata_tests::admin::wait_for_status;
use strata_tests::{complete, ClusterOptions, TestCluster};

/// Worker `from`'s reported link to worker `to`, once it has carried frames.
fn link<'a>(status: &'a Value, from: &str, to: &str) -> Option<&'a Value> {
    let node = status["nodes"].as_array()?.iter().find(|n| n["name"] == from)?;
    node["links"].as_array()?.iter().find(|l| l["to"] == to && l["bytes_sent"].as_u64().is_some_and(|b| b > 0))
}

#[tokio::test]
async fn a_pipeline_on_one_machine_streams_over_local_lanes_and_gives_the_tokens_grpc_gives() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = SyntheticModel { layers: 6, ..SyntheticModel::tiny() }.write_to(dir.path())?;
    let mut completions = Vec::new();
    for (lanes, insecure) in [(true, false), (false, false), (true, true)] {
        let worker_args = if lanes { Vec::new() } else { vec![vec!["--no-local-lanes".to_string()]; 3] };
        let options = ClusterOptions { worker_args, insecure, ..ClusterOptions::default() };
        let cluster = TestCluster::start(&model, &options).await?;
        let addr = cluster.http().to_string();
        let completion = complete(&addr, &[1, 2, 3, 4], 24).await?;
        // Stage to stage, and the last stage's tokens straight back to stage 0.
        let hops = [("worker-0", "worker-1"), ("worker-1", "worker-2"), ("worker-2", "worker-0")];
        let status = wait_for_status(&addr, "every hop's link reported", |s| {
            hops.iter().all(|(from, to)| link(s, from, to).is_some())
        })
        .await?;
        for (from, to) in hops {
            let reported = link(&status, from, to).map(|l| l["local_lane"].clone());
            assert_eq!(
                reported,
                Some(Value::Bool(lanes)),
                "{from} -> {to}, lanes {lanes}, insecure {insecure}: {status}"
            );
        }
        // The coordinator, on the same machine, takes every worker's tokens and
        // errors over a lane of its own.
        for node in status["nodes"].as_array().into_iter().flatten() {
            assert_eq!(node["events_local_lane"], Value::Bool(lanes), "lanes {lanes}, insecure {insecure}: {node}");
        }
        completions.push(completion);
        cluster.stop().await;
    }
    assert!(completions[0].1 > 0, "{completions:?}");
    assert!(
        completions.iter().all(|c| *c == completions[0]),
        "the same tokens over lanes and over gRPC: {completions:?}"
    );
    Ok(())
}
