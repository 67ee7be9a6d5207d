//! The coordinator's gRPC service: workers join, pull shard files, and check health.

use std::io::Read;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use strata_proto::v1::coordinator_server::Coordinator;
use strata_proto::v1::{self, weight_chunk, WeightChunk};
use strata_proto::{CoordinatorError, WEIGHT_CHUNK_BYTES};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::membership::Membership;
use super::model::ServedModel;

#[derive(Clone)]
pub struct CoordinatorService {
    pub id: String,
    pub model: Arc<ServedModel>,
    pub membership: Arc<Membership>,
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<WeightChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn join(&self, request: Request<v1::JoinRequest>) -> Result<Response<v1::JoinResponse>, Status> {
        let peer = request.remote_addr().map(|a| a.ip());
        let worker = request
            .into_inner()
            .worker
            .ok_or_else(|| CoordinatorError::BadRequest("the join request has no worker description".into()))?;
        self.membership.join(worker, peer)?;
        Ok(Response::new(v1::JoinResponse { coordinator_id: self.id.clone() }))
    }

    type FetchWeightsStream = ChunkStream;

    async fn fetch_weights(&self, request: Request<v1::FetchWeightsRequest>) -> Result<Response<ChunkStream>, Status> {
        let r = request.into_inner();
        let model = r.model.unwrap_or_default();
        if model.content_hash != self.model.content_hash {
            return Err(CoordinatorError::UnknownModel(format!(
                "{} ({}); this coordinator serves {}",
                model.model_id, model.content_hash, self.model.content_hash
            ))
            .into());
        }
        let layers = self.model.layers() as u32;
        if r.layer_start >= r.layer_end || r.layer_end > layers {
            return Err(CoordinatorError::RangeOutOfModel { start: r.layer_start, end: r.layer_end, layers }.into());
        }
        let shard = self
            .model
            .shard(r.layer_start as usize..r.layer_end as usize)
            .await
            .map_err(|e| CoordinatorError::Internal(e.to_string()))?;
        tracing::info!(layers = ?(r.layer_start..r.layer_end), bytes = shard.total_bytes, "serving weights");
        let (tx, rx) = mpsc::channel(4);
        let manifest = WeightChunk {
            kind: Some(weight_chunk::Kind::Manifest(v1::WeightManifest {
                total_bytes: shard.total_bytes,
                sha256: shard.sha256.clone(),
                tensor_names: shard.tensor_names.clone(),
            })),
        };
        // File reads run on the blocking pool; the channel paces them to the network.
        tokio::task::spawn_blocking(move || {
            if tx.blocking_send(Ok(manifest)).is_err() {
                return;
            }
            let mut file = match std::fs::File::open(&shard.path) {
                Ok(f) => f,
                Err(e) => {
                    let _ = tx.blocking_send(Err(Status::internal(format!("opening the shard: {e}"))));
                    return;
                }
            };
            loop {
                let mut buf = vec![0u8; WEIGHT_CHUNK_BYTES];
                let mut filled = 0;
                while filled < buf.len() {
                    match file.read(&mut buf[filled..]) {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) => {
                            let _ = tx.blocking_send(Err(Status::internal(format!("reading the shard: {e}"))));
                            return;
                        }
                    }
                }
                if filled == 0 {
                    return;
                }
                buf.truncate(filled);
                if tx.blocking_send(Ok(WeightChunk { kind: Some(weight_chunk::Kind::Data(buf)) })).is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn health(&self, _: Request<v1::HealthRequest>) -> Result<Response<v1::HealthResponse>, Status> {
        Ok(Response::new(v1::HealthResponse { state: v1::WorkerState::Serving as i32 }))
    }
}
