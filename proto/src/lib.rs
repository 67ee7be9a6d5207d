//! The gRPC contract between the strata coordinator and its workers.
//!
//! Generated code lives in OUT_DIR (not committed): `proto/strata.proto` is the one
//! source of truth, and the generated types are re-exported from [`v1`]. Besides the
//! generated code, this crate holds the limits both sides must agree on, the
//! conversion of hidden-state tensors and KV caches to and from wire bytes, the
//! [`units`] both sides read sizes in, and the [`address`] parser every flag naming
//! a coordinator or worker goes through.

pub mod v1 {
    tonic::include_proto!("strata.v1");
}

pub mod address;
pub mod content_hash;
mod error;
#[cfg(test)]
mod hostile_wire;
pub mod ids;
pub mod kv_wire;
pub mod local_lane;
mod tensor_wire;
pub mod timing;
pub mod transport;
pub mod units;

pub use ids::{NodeId, PipelineId, SeqId, ShardSelection};
pub use error::{CallError, CoordinatorError, FailureKind, WorkerError};
pub use tensor_wire::{decode_hidden, encode_hidden, WireError};

/// Bumped on any incompatible change to `strata.proto`.
pub const PROTOCOL_VERSION: u32 = 2;

/// gRPC metadata key on a Forward call naming the pipeline its messages belong to:
/// during a re-plan a worker holds a shard of the old pipeline and one of the new.
pub const PIPELINE_HEADER: &str = "strata-pipeline-id";

/// Tags a Forward call with its pipeline.
pub fn with_pipeline<T>(message: T, pipeline_id: u64) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(PIPELINE_HEADER, tonic::metadata::MetadataValue::from(pipeline_id));
    request
}

/// The pipeline a Forward call names, if it names one.
pub fn pipeline_of<T>(request: &tonic::Request<T>) -> Option<u64> {
    request.metadata().get(PIPELINE_HEADER)?.to_str().ok()?.parse().ok()
}

/// Largest gRPC message either side accepts or sends. Frames are chunked to stay
/// well under it; tonic's default of 4 MiB would break a long prefill of a large model.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Hidden-state bytes per activation frame before the sender cuts a prompt into
/// several frames.
pub const FRAME_TARGET_BYTES: usize = 8 * 1024 * 1024;

/// Bytes per chunk of a weight transfer.
pub const WEIGHT_CHUNK_BYTES: usize = 1024 * 1024;

/// K and V bytes per chunk of a KV cache transfer: small enough that decoding one
/// never holds up an async runtime for long.
pub const KV_CHUNK_BYTES: usize = 1024 * 1024;

/// Most likely tokens a scored prompt position reports at most
/// (`ActivationFrame.score_top`; OpenAI's `top_logprobs` limit).
pub const MAX_SCORE_TOP: u32 = 20;
