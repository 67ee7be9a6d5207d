//! The coordinator's admin API as the tests use it: `GET /admin/status`, the drain
//! and undrain commands, and waiting (with a deadline) until the status says
//! something; and what a worker's own heartbeat says it holds.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::Value;
use strata_coordinator::cli::http;
use strata_proto::v1::worker_client::WorkerClient;
use strata_proto::v1::{self, worker_event};
use strata_trust::{Dial, Transport};

/// POSTs an admin command; its status code and JSON reply.
pub async fn admin(addr: &str, path: &str, body: Value) -> anyhow::Result<(u16, Value)> {
    let reply = http::request(addr, "POST", path, Some(&body)).await?;
    Ok((reply.status, reply.json()?))
}

/// `GET /admin/status`.
pub async fn status(addr: &str) -> anyhow::Result<Value> {
    let reply = http::request(addr, "GET", "/admin/status", None).await?;
    anyhow::ensure!(reply.status == 200, "status: HTTP {}: {}", reply.status, reply.body);
    Ok(reply.json()?)
}

/// The id of the pipeline the coordinator at `addr` serves now (an error if none).
pub async fn pipeline_id(addr: &str) -> anyhow::Result<u64> {
    status(addr).await?["pipeline_id"].as_u64().context("no pipeline")
}

/// The node `name` in a status.
pub fn node<'a>(status: &'a Value, name: &str) -> anyhow::Result<&'a Value> {
    status["nodes"].as_array().context("no nodes")?.iter().find(|n| n["name"] == name).context("node not listed")
}

/// The names of the nodes in a status, in its order.
pub fn node_names(status: &Value) -> Vec<String> {
    let nodes = status["nodes"].as_array().into_iter().flatten();
    nodes.filter_map(|n| n["name"].as_str().map(str::to_string)).collect()
}

/// The names of the nodes that hold layers in a status.
pub fn layer_holders(status: &Value) -> Vec<&str> {
    let nodes = status["nodes"].as_array().into_iter().flatten();
    nodes.filter(|n| !n["layers"].is_null()).filter_map(|n| n["name"].as_str()).collect()
}

/// Polls the status until `check` holds for it (60 s at most: the machine running
/// the tests may be busy with others).
pub async fn wait_for_status(addr: &str, what: &str, check: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = status(addr).await?;
        if check(&s) {
            return Ok(s);
        }
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether the node `name` holds layers of the current pipeline.
pub fn holds_layers(s: &Value, name: &str) -> bool {
    node(s, name).is_ok_and(|n| !n["layers"].is_null())
}

/// The pipelines whose shards the worker at `address` holds, from its next heartbeat.
pub async fn pipelines_held(transport: &Transport, address: &str) -> anyhow::Result<Vec<u64>> {
    let channel = transport.connect(address, Dial::Worker).await?;
    let mut events = WorkerClient::new(channel).events(v1::EventsRequest::default()).await?.into_inner();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(5), events.message())
            .await
            .context("no heartbeat within 5 s")??
            .context("the event stream ended")?;
        if let Some(worker_event::Kind::Heartbeat(h)) = event.kind {
            return Ok(h.pipelines);
        }
    }
}

/// Waits until every worker's heartbeat reports no sequences held (no KV cache left
/// behind by a request that ended).
pub async fn wait_until_no_sequences(transport: &Transport, workers: &[String]) -> anyhow::Result<()> {
    wait_until_sequences_at_most(transport, workers, 0).await
}

/// Waits until every worker's heartbeat reports at most `most` sequences held.
pub async fn wait_until_sequences_at_most(transport: &Transport, workers: &[String], most: u32) -> anyhow::Result<()> {
    for w in workers {
        let channel = transport.connect(w, Dial::Worker).await?;
        let mut events = WorkerClient::new(channel).events(v1::EventsRequest::default()).await?.into_inner();
        loop {
            let event = events.message().await?.context("events ended")?;
            if let Some(worker_event::Kind::Heartbeat(h)) = event.kind {
                if h.sequences <= most {
                    break;
                }
            }
        }
    }
    Ok(())
}
