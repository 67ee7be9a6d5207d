//! The coordinator's gRPC service: workers join, pull shard files (resuming a cut
//! pull where it stopped), and check health.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use strata_proto::v1::coordinator_server::Coordinator;
use strata_proto::v1::{self, weight_chunk, WeightChunk};
use strata_proto::CoordinatorError;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use strata_trust::Allow;
use tonic::{Request, Response, Status};

use super::membership::Membership;
use super::model::ServedModel;

mod weight_stream;

pub use weight_stream::PULL_PACE_ENV;

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
        // Anyone may announce a worker: with mutual TLS the coordinator then dials it
        // and takes it only if it proves it holds the join token (or was enrolled).
        let peer = strata_trust::remote_addr(&request).map(|a| a.ip());
        let worker = request
            .into_inner()
            .worker
            .ok_or_else(|| CoordinatorError::BadRequest("the join request has no worker description".into()))?;
        self.membership.join(worker, peer).await?;
        Ok(Response::new(v1::JoinResponse { coordinator_id: self.id.clone() }))
    }

    type FetchWeightsStream = ChunkStream;

    async fn fetch_weights(&self, request: Request<v1::FetchWeightsRequest>) -> Result<Response<ChunkStream>, Status> {
        strata_trust::authorize(strata_trust::transport(), &request, &[Allow::Workers], "FetchWeights")?;
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
        // A resumed pull asks for the rest of the file only; the manifest still names
        // the whole file, which the worker checks once it holds all of it.
        if r.offset > shard.total_bytes {
            return Err(CoordinatorError::OffsetPastEnd { offset: r.offset, total: shard.total_bytes }.into());
        }
        let pace = weight_stream::pace_from(&|k| std::env::var(k).ok())
            .map_err(|e| CoordinatorError::Internal(e.to_string()))?;
        tracing::info!(
            layers = ?(r.layer_start..r.layer_end),
            bytes = shard.total_bytes,
            offset = r.offset,
            pace,
            "serving weights"
        );
        let manifest = WeightChunk {
            kind: Some(weight_chunk::Kind::Manifest(v1::WeightManifest {
                total_bytes: shard.total_bytes,
                sha256: shard.sha256.clone(),
                tensor_names: shard.tensor_names.clone(),
                offset: r.offset,
            })),
        };
        // The bounded channel paces the reads to the network.
        let (tx, rx) = mpsc::channel(4);
        let membership = self.membership.clone();
        tokio::spawn(async move {
            if tx.send(Ok(manifest)).await.is_ok() {
                let counted = move |bytes| membership.count_weights_served(bytes);
                weight_stream::send_file(shard.path, r.offset, pace, tx, counted).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn health(&self, _: Request<v1::HealthRequest>) -> Result<Response<v1::HealthResponse>, Status> {
        Ok(Response::new(v1::HealthResponse { state: v1::WorkerState::Serving as i32 }))
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use strata_model::synthetic::SyntheticModel;
    use tonic::Code;

    use super::*;

    fn service(dir: &std::path::Path) -> CoordinatorService {
        let path = SyntheticModel::tiny().write_to(dir).unwrap();
        let model = Arc::new(ServedModel::open(&path, "synthetic".into()).unwrap());
        CoordinatorService { id: "test".into(), model, membership: Arc::default() }
    }

    fn request(service: &CoordinatorService, offset: u64) -> Request<v1::FetchWeightsRequest> {
        Request::new(v1::FetchWeightsRequest {
            model: Some(v1::ModelRef {
                model_id: "synthetic".into(),
                content_hash: service.model.content_hash.clone(),
            }),
            layer_start: 0,
            layer_end: 2,
            offset,
        })
    }

    /// The manifest, and the data bytes after it.
    async fn fetch(service: &CoordinatorService, offset: u64) -> Result<(v1::WeightManifest, Vec<u8>), Status> {
        let mut stream = service.fetch_weights(request(service, offset)).await?.into_inner();
        let Some(Ok(WeightChunk { kind: Some(weight_chunk::Kind::Manifest(manifest)) })) = stream.next().await else {
            panic!("the stream does not start with a manifest");
        };
        let mut data = Vec::new();
        while let Some(chunk) = stream.next().await {
            match chunk?.kind {
                Some(weight_chunk::Kind::Data(d)) => data.extend(d),
                other => panic!("unexpected {other:?}"),
            }
        }
        Ok((manifest, data))
    }

    #[tokio::test]
    async fn a_resumed_pull_gets_the_rest_of_the_file_and_an_offset_past_its_end_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let service = service(dir.path());
        let (whole, bytes) = fetch(&service, 0).await.unwrap();
        assert_eq!((whole.offset, bytes.len() as u64), (0, whole.total_bytes));
        let k = bytes.len() as u64 / 3;
        let (rest, tail) = fetch(&service, k).await.unwrap();
        // The manifest still names the whole file.
        assert_eq!((rest.total_bytes, &rest.sha256, rest.offset), (whole.total_bytes, &whole.sha256, k));
        assert_eq!(tail, bytes[k as usize..]);
        assert!(fetch(&service, whole.total_bytes).await.unwrap().1.is_empty());
        let refused = fetch(&service, whole.total_bytes + 1).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().contains("past the end"), "{}", refused.message());
    }
}
