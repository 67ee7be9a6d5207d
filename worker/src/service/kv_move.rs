//! Moving a sequence between pipelines: the worker's half of ImportSequence and
//! ExportKv (the flow is in the proto file's header).
//!
//! A stage of the new pipeline pulls the KV of its layers straight from every old
//! stage that holds some of them — over gRPC from another worker, or by asking its
//! own other shard's compute thread when the old holder is this worker — and hands
//! the whole cache to its compute thread, which opens the sequence with it. The
//! compute threads only copy tensors; turning them into wire bytes and back happens
//! on blocking threads and in small chunks, off the compute thread and the reactor.

use std::collections::HashMap;
use std::ops::Range;
use std::pin::Pin;
use std::time::Instant;

use futures::future::try_join_all;
use futures::Stream;
use strata_model::stage::LayerKv;
use strata_model::{Device, Tensor};
use strata_proto::kv_wire::{encode_kv_layer, KvAssembler};
use strata_proto::v1::worker_client::WorkerClient;
use strata_proto::v1;
use strata_proto::{WorkerError, KV_CHUNK_BYTES, MAX_MESSAGE_BYTES};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Status;

use super::{Loaded, WorkerService};
use crate::compute::{KvJob, KvShape};
use crate::events::lock;
use crate::forwarder;

/// Longest an import may take, pulls included: an old holder that stops answering
/// fails the import (the coordinator then replays the request) instead of hanging it.
pub use strata_proto::timing::KV_IMPORT_TIMEOUT as IMPORT_TIMEOUT;

/// Chunks of an export waiting to be sent; bounds the memory a slow receiver costs.
const EXPORT_QUEUE: usize = 8;

pub(super) type KvStream = Pin<Box<dyn Stream<Item = Result<v1::KvChunk, Status>> + Send>>;

/// Channels to the peers KV was pulled from, one per address (HTTP/2 multiplexes
/// the pulls of many sequences over it).
#[derive(Default)]
pub(super) struct Peers(std::sync::Mutex<HashMap<String, Channel>>);

/// Tensors of one layer as plain f32 values, on the host.
fn host_values(t: &Tensor) -> Result<Vec<f32>, WorkerError> {
    t.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(|e| WorkerError::Internal(format!("reading KV: {e}")))
}

fn bytes_of(layers: &[LayerKv]) -> u64 {
    layers.iter().map(|l| ((l.k.elem_count() + l.v.elem_count()) * 4) as u64).sum()
}

impl WorkerService {
    /// Runs `f` on this worker's shard of `pipeline`.
    fn with_shard<T>(
        &self,
        pipeline: u64,
        f: impl FnOnce(&Loaded) -> Result<T, WorkerError>,
    ) -> Result<T, WorkerError> {
        let slot = lock(&self.shared.slot);
        let (_, loaded) =
            slot.shards.iter().find(|(id, _)| *id == pipeline).ok_or(WorkerError::UnknownPipeline(pipeline))?;
        f(loaded)
    }

    /// Copies of the KV of `layers`, positions `[0, positions)`, of sequence `seq` on
    /// this worker's shard of `pipeline`, and the shape of a position.
    async fn export_here(
        &self,
        pipeline: u64,
        seq: u64,
        layers: Range<usize>,
        positions: usize,
    ) -> Result<(Vec<LayerKv>, KvShape), WorkerError> {
        let (reply, answer) = oneshot::channel();
        let shape = self.with_shard(pipeline, |l| {
            let held = &l.compute.layers;
            if layers.start >= layers.end || layers.start < held.start || layers.end > held.end {
                return Err(WorkerError::KvUnavailable(format!(
                    "layers {}..{} are not all held by this worker's shard of pipeline {pipeline} (it holds {}..{})",
                    layers.start, layers.end, held.start, held.end
                )));
            }
            l.compute.kv_job(KvJob::Export { seq, layers: layers.clone(), positions, reply })?;
            Ok(l.compute.kv_shape)
        })?;
        let layers =
            answer.await.map_err(|_| WorkerError::Internal("the stage's compute thread stopped".into()))??;
        Ok((layers, shape))
    }

    /// ExportKv: the asked KV as a stream of chunks.
    pub(super) async fn export_kv_chunks(&self, request: v1::ExportKvRequest) -> Result<KvStream, WorkerError> {
        let layers = request.layer_start as usize..request.layer_end as usize;
        let (layers, shape) =
            self.export_here(request.pipeline_id, request.seq_id, layers, request.positions as usize).await?;
        let (tx, rx) = mpsc::channel(EXPORT_QUEUE);
        tokio::task::spawn_blocking(move || {
            for l in layers {
                let values = host_values(&l.k).and_then(|k| Ok((k, host_values(&l.v)?)));
                let (k, v) = match values {
                    Ok(x) => x,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(Status::from(e)));
                        return;
                    }
                };
                for chunk in encode_kv_layer(l.layer, l.first, &k, &v, shape.kv_heads, shape.head_dim, KV_CHUNK_BYTES) {
                    if tx.blocking_send(Ok(chunk)).is_err() {
                        // The puller went away.
                        return;
                    }
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    async fn peer(&self, address: &str) -> Result<WorkerClient<Channel>, WorkerError> {
        let known = lock(&self.shared.peers.0).get(address).cloned();
        let channel = match known {
            Some(c) => c,
            None => {
                let c = forwarder::connect(address.to_string(), strata_trust::Dial::Worker)
                    .await
                    .map_err(|message| WorkerError::Peer {
                        address: address.to_string(),
                        code: tonic::Code::Unavailable,
                        message,
                    })?;
                lock(&self.shared.peers.0).insert(address.to_string(), c.clone());
                c
            }
        };
        Ok(WorkerClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    /// The KV `source` names, positions `[0, positions)`, pulled from its worker.
    async fn pull(&self, source: &v1::KvSource, positions: usize, shape: KvShape) -> Result<Vec<LayerKv>, WorkerError> {
        let address = source.address.clone();
        let peer =
            |s: Status| WorkerError::Peer { address: address.clone(), code: s.code(), message: s.message().into() };
        let mut client = self.peer(&source.address).await?;
        let request = v1::ExportKvRequest {
            pipeline_id: source.pipeline_id,
            seq_id: source.seq_id,
            layer_start: source.layer_start,
            layer_end: source.layer_end,
            positions: positions as u32,
            grant: source.grant.clone(),
        };
        let mut stream = client.export_kv(request).await.map_err(peer)?.into_inner();
        let (start, end) = (source.layer_start as usize, source.layer_end as usize);
        let mut assembler = KvAssembler::new(start, end, positions, shape.kv_heads, shape.head_dim);
        while let Some(chunk) = stream.message().await.map_err(peer)? {
            assembler
                .add(&chunk)
                .map_err(|e| WorkerError::BadKv(format!("from {}: {e}", source.address)))?;
        }
        let layers = assembler.finish().map_err(|e| WorkerError::BadKv(format!("from {}: {e}", source.address)))?;
        let tensor = |values, first: usize| {
            Tensor::from_vec(values, (shape.kv_heads, positions - first, shape.head_dim), &Device::Cpu)
                .map_err(|e| WorkerError::Internal(e.to_string()))
        };
        layers
            .into_iter()
            .map(|l| Ok(LayerKv { layer: l.layer, first: l.first, k: tensor(l.k, l.first)?, v: tensor(l.v, l.first)? }))
            .collect()
    }

    /// ImportSequence: pulls the sequence's KV from its old holders and opens it on
    /// this worker's shard of the new pipeline.
    pub(super) async fn import_kv_sequence(
        &self,
        request: v1::ImportSequenceRequest,
    ) -> Result<v1::ImportSequenceResponse, WorkerError> {
        let started = Instant::now();
        let open = request
            .open
            .ok_or_else(|| WorkerError::BadKv("the import request names no sequence to open".into()))?;
        let seq = open.seq_id;
        let positions = request.positions as usize;
        if positions == 0 {
            return Err(WorkerError::BadKv(format!("sequence {seq}: an import needs at least one position")));
        }
        if request.tokens.len() != positions {
            return Err(WorkerError::BadKv(format!(
                "sequence {seq}: {} token ids for {positions} positions",
                request.tokens.len()
            )));
        }
        let pipeline = request.pipeline_id;
        let (held, shape) = self.with_shard(pipeline, |l| Ok((l.compute.layers.clone(), l.compute.kv_shape)))?;
        // Before anything is pulled (and assembled) for it.
        if positions > shape.context {
            return Err(WorkerError::BadKv(format!(
                "sequence {seq}: {positions} positions, beyond the model's context of {}",
                shape.context
            )));
        }
        let mut sources = request.sources;
        sources.sort_by_key(|s| s.layer_start);
        let covered = sources.iter().all(|s| s.layer_start < s.layer_end)
            && sources.first().is_some_and(|s| s.layer_start as usize == held.start)
            && sources.last().is_some_and(|s| s.layer_end as usize == held.end)
            && sources.windows(2).all(|w| w[0].layer_end == w[1].layer_start);
        if !covered {
            let given: Vec<String> = sources.iter().map(|s| format!("{}..{}", s.layer_start, s.layer_end)).collect();
            return Err(WorkerError::BadKv(format!(
                "sequence {seq}: the sources cover layers [{}], this worker's shard of pipeline {pipeline} \
                 holds {}..{}",
                given.join(", "),
                held.start,
                held.end
            )));
        }
        let here = self.shared.address.clone();
        let pulls = sources.iter().map(|s| {
            let here = &here;
            async move {
                if s.address == *here {
                    let range = s.layer_start as usize..s.layer_end as usize;
                    let (layers, _) = self.export_here(s.pipeline_id, s.seq_id, range, positions).await?;
                    Ok::<_, WorkerError>((layers, true))
                } else {
                    Ok((self.pull(s, positions, shape).await?, false))
                }
            }
        });
        let pulled = tokio::time::timeout(IMPORT_TIMEOUT, try_join_all(pulls))
            .await
            .map_err(|_| WorkerError::Internal(format!("sequence {seq}: the KV pull took over {IMPORT_TIMEOUT:?}")))??;
        let (mut bytes_pulled, mut bytes_local) = (0, 0);
        let mut layers = Vec::new();
        for (part, local) in pulled {
            *(if local { &mut bytes_local } else { &mut bytes_pulled }) += bytes_of(&part);
            layers.extend(part);
        }
        let (reply, answer) = oneshot::channel();
        let job = KvJob::Import { open, tokens: request.tokens, layers, reply };
        self.with_shard(pipeline, |l| l.compute.kv_job(job))?;
        answer.await.map_err(|_| WorkerError::Internal("the stage's compute thread stopped".into()))??;
        let seconds = started.elapsed().as_secs_f64();
        tracing::debug!(seq, pipeline, positions, bytes_pulled, bytes_local, seconds, "sequence imported");
        Ok(v1::ImportSequenceResponse { bytes_pulled, bytes_local, seconds })
    }
}
