//! One pipeline: its stages loaded on workers under a pipeline id, and the Forward
//! stream into stage 0. A re-plan builds a new pipeline beside the old one, then
//! switches the requests over and unloads the old.

use std::ops::Range;
use std::sync::Arc;

use futures::future::join_all;
use strata_proto::v1::{self, ModelRef, ShardSpec, StageMessage, WireDtype};
use strata_proto::PipelineId;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::model::ServedModel;
use super::messages::{Control, PipelineLink, Placement};
use super::moves::LinkStage;
use super::placement::StagePlan;
use super::{ClusterError, WeightsSource, WorkerClient};

/// A loaded pipeline.
pub struct Pipeline {
    pub id: PipelineId,
    pub placements: Vec<Placement>,
    pub link: PipelineLink,
    forward: JoinHandle<()>,
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.forward.abort();
    }
}

/// A load that failed, and on which worker.
pub struct BuildError {
    pub address: String,
    pub error: ClusterError,
}

impl BuildError {
    /// What the failed LoadShard call says to do.
    pub fn kind(&self) -> strata_proto::FailureKind {
        match &self.error {
            ClusterError::Load { error, .. } => error.kind(),
            _ => strata_proto::FailureKind::Fault,
        }
    }
}

/// What building needs besides the stages.
pub struct BuildSpec<'a> {
    pub id: PipelineId,
    pub model: &'a Arc<ServedModel>,
    pub wire_dtype: WireDtype,
    /// Where each worker pulls the layers it lacks.
    pub weights_source: &'a WeightsSource,
    /// For each stage: its worker keeps its other shards while this one loads (the
    /// old pipeline serves meanwhile, or its weights are shared rather than read
    /// again). A stage past the end drops them.
    pub keep_others: &'a [bool],
}

/// The node at `address` (empty when unknown: --insecure).
fn node_at(address: &str) -> String {
    strata_trust::transport().node_at(address).map(|n| n.to_string()).unwrap_or_default()
}

/// The stages that send stage `i` frames: the one before it, and for stage 0 the
/// last (the sampled tokens it returns).
fn frame_senders(stages: &[StagePlan], i: usize) -> Vec<&StagePlan> {
    match i {
        0 if stages.len() > 1 => stages.last().into_iter().collect(),
        0 => Vec::new(),
        _ => vec![&stages[i - 1]],
    }
}

/// Loads every stage at once (a stage connects to its already-serving next stage
/// while it loads) and opens the stream into stage 0.
pub(super) async fn build(
    spec: BuildSpec<'_>,
    stages: &[StagePlan],
    clients: &[WorkerClient],
    control: mpsc::UnboundedSender<Control>,
) -> Result<Pipeline, BuildError> {
    let layers = spec.model.layers();
    let sources = join_all(stages.iter().map(|s| spec.weights_source.for_worker(&s.address))).await;
    let shard = |i: usize, r: &Range<usize>| ShardSpec {
        model: Some(ModelRef { model_id: spec.model.card.id.clone(), content_hash: spec.model.content_hash.clone() }),
        layer_start: r.start as u32,
        layer_end: r.end as u32,
        total_layers: layers as u32,
        wire_dtype: spec.wire_dtype as i32,
        next_stage_address: stages.get(i + 1).map(|s| s.address.clone()).unwrap_or_default(),
        weights_source: sources[i].clone(),
        stage_index: i as u32,
        pipeline_id: spec.id.get(),
        first_stage_address: if i + 1 == stages.len() { stages[0].address.clone() } else { String::new() },
        next_stage_node_id: stages.get(i + 1).map(|s| node_at(&s.address)).unwrap_or_default(),
        first_stage_node_id: if i + 1 == stages.len() { node_at(&stages[0].address) } else { String::new() },
        frame_sender_node_ids: frame_senders(stages, i).iter().map(|s| node_at(&s.address)).collect(),
    };
    let loads = join_all(stages.iter().zip(clients).enumerate().map(|(i, (stage, client))| {
        let mut client = client.clone();
        let keep_other_pipelines = spec.keep_others.get(i).copied().unwrap_or(false);
        let request = v1::LoadShardRequest { shard: Some(shard(i, &stage.layers)), keep_other_pipelines };
        async move { client.load_shard(request).await }
    }))
    .await;
    let mut placements = Vec::new();
    for (i, result) in loads.into_iter().enumerate() {
        let stage = &stages[i];
        let response = result.map_err(|s| BuildError {
            address: stage.address.clone(),
            error: ClusterError::Load {
                stage: i,
                start: stage.layers.start,
                end: stage.layers.end,
                address: stage.address.clone(),
                error: s.into(),
            },
        })?;
        let response = response.into_inner();
        placements.push(Placement {
            stage: i,
            layers: stage.layers.clone(),
            address: stage.address.clone(),
            name: stage.name.clone(),
            weights_were_local: response.weights_were_local,
            load_seconds: response.load_seconds,
        });
    }
    let (stage0, frames) = mpsc::unbounded_channel::<StageMessage>();
    let mut first = clients[0].clone();
    let id = spec.id;
    let forward = tokio::spawn(async move {
        let request = strata_proto::with_pipeline(UnboundedReceiverStream::new(frames), id.get());
        let reason = match first.forward(request).await {
            Ok(_) => "the stream to stage 0 closed".to_string(),
            Err(s) => format!("the stream to stage 0 broke: {}", s.message()),
        };
        let _ = control.send(Control::Trouble { reason });
    });
    let stages = stages
        .iter()
        .zip(clients)
        .map(|(s, c)| LinkStage { address: s.address.clone(), layers: s.layers.clone(), client: c.clone() })
        .collect();
    Ok(Pipeline { id, placements, link: PipelineLink { id, stage0, stages: Arc::new(stages) }, forward })
}
