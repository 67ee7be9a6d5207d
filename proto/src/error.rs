//! One error enum per service, each mapped once to a gRPC code.
//!
//! Handlers return these; only the tonic adapters turn them into `tonic::Status`, so
//! service logic never builds statuses by hand and both ends agree on the codes.

use tonic::{Code, Status};

/// What a worker's RPCs can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkerError {
    #[error("this worker holds no shard")]
    NoShard,
    #[error("layers {start}..{end} are outside the model's {layers} layers")]
    ShardOutOfRange { start: u32, end: u32, layers: u32 },
    #[error("model content hash mismatch: expected {expected}, got {got}")]
    ModelHashMismatch { expected: String, got: String },
    #[error("model is not available: {0}")]
    ModelUnavailable(String),
    #[error("invalid shard: {0}")]
    InvalidShard(String),
    #[error("bad frame: {0}")]
    BadFrame(String),
    #[error("sequence {0} is unknown on this worker")]
    UnknownSequence(u64),
    #[error("this worker holds no shard of pipeline {0}")]
    UnknownPipeline(u64),
    #[error("KV cache not available: {0}")]
    KvUnavailable(String),
    #[error("bad KV cache data: {0}")]
    BadKv(String),
    /// A peer refused or failed a KV pull: its refusal's code passes through
    /// (Unavailable when it could not be reached).
    #[error("pulling KV cache from {address}: {message}")]
    Peer { address: String, code: Code, message: String },
    #[error("worker is draining and takes no new work")]
    Draining,
    #[error("worker is busy: {0}")]
    Busy(String),
    #[error("{path}: {needed} bytes to pull, {free} free on its disk")]
    NoSpace { path: String, needed: u64, free: u64 },
    #[error("internal error: {0}")]
    Internal(String),
}

impl WorkerError {
    pub fn code(&self) -> Code {
        match self {
            Self::NoShard | Self::Draining => Code::FailedPrecondition,
            Self::NoSpace { .. } => Code::ResourceExhausted,
            Self::ShardOutOfRange { .. } | Self::BadFrame(_) | Self::InvalidShard(_) => Code::InvalidArgument,
            Self::ModelHashMismatch { .. } => Code::FailedPrecondition,
            Self::ModelUnavailable(_) => Code::NotFound,
            Self::UnknownSequence(_) | Self::UnknownPipeline(_) => Code::NotFound,
            Self::KvUnavailable(_) => Code::OutOfRange,
            Self::BadKv(_) => Code::InvalidArgument,
            Self::Peer { code, .. } => *code,
            Self::Busy(_) => Code::ResourceExhausted,
            Self::Internal(_) => Code::Internal,
        }
    }
}

impl From<WorkerError> for Status {
    fn from(e: WorkerError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

/// What the coordinator's RPCs can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoordinatorError {
    #[error("unknown model {0}")]
    UnknownModel(String),
    #[error("layers {start}..{end} are outside the model's {layers} layers")]
    RangeOutOfModel { start: u32, end: u32, layers: u32 },
    #[error("incompatible protocol version {got} (this coordinator speaks {expected})")]
    ProtocolVersion { got: u32, expected: u32 },
    /// A resumed pull asked to start past the end of the shard file.
    #[error("offset {offset} is past the end of the {total}-byte shard file")]
    OffsetPastEnd { offset: u64, total: u64 },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// A worker that announced itself but could not show it belongs to the
    /// cluster (no join token, a revoked node, another node's name).
    #[error("not taken into the cluster: {0}")]
    NotTrusted(String),
}

impl CoordinatorError {
    pub fn code(&self) -> Code {
        match self {
            Self::UnknownModel(_) => Code::NotFound,
            Self::RangeOutOfModel { .. } | Self::OffsetPastEnd { .. } | Self::BadRequest(_) => Code::InvalidArgument,
            Self::ProtocolVersion { .. } => Code::FailedPrecondition,
            Self::Internal(_) => Code::Internal,
            Self::NotTrusted(_) => Code::PermissionDenied,
        }
    }
}

impl From<CoordinatorError> for Status {
    fn from(e: CoordinatorError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

/// What a caller does about a call that failed, decided from its gRPC code: the
/// one place where a code becomes a decision, so every caller decides alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The peer was not reached, or the call was cut on the way: the peer may be
    /// gone, which only asking it again (a health check) tells.
    Unreachable,
    /// The peer answered but cannot do this now (busy, out of memory): try it
    /// again after a while.
    Busy,
    /// The peer answered and will not do this as asked (a missing model, a wrong
    /// range, a drain, an older protocol): plan around it rather than ask again
    /// soon.
    Refused,
    /// A fault on one side: report it, and plan around the peer.
    Fault,
}

/// A failed call as the caller keeps it: the code decides, the message explains.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} ({code:?})")]
pub struct CallError {
    pub code: Code,
    pub message: String,
}

impl CallError {
    pub fn kind(&self) -> FailureKind {
        match self.code {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted | Code::Unknown => {
                FailureKind::Unreachable
            }
            Code::ResourceExhausted => FailureKind::Busy,
            Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::Unimplemented
            | Code::PermissionDenied
            | Code::Unauthenticated => FailureKind::Refused,
            Code::Ok | Code::Internal | Code::DataLoss => FailureKind::Fault,
        }
    }
}

impl From<Status> for CallError {
    fn from(s: Status) -> Self {
        Self { code: s.code(), message: s.message().to_string() }
    }
}

impl From<&Status> for CallError {
    fn from(s: &Status) -> Self {
        Self { code: s.code(), message: s.message().to_string() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_worker_error_is_decided_from_its_code_alone() {
        let kind = |e: WorkerError| CallError::from(Status::from(e)).kind();
        assert_eq!(kind(WorkerError::Busy("full".into())), FailureKind::Busy);
        assert_eq!(kind(WorkerError::ModelUnavailable("pull failed".into())), FailureKind::Refused);
        assert_eq!(kind(WorkerError::Draining), FailureKind::Refused);
        assert_eq!(kind(WorkerError::ShardOutOfRange { start: 0, end: 9, layers: 4 }), FailureKind::Refused);
        assert_eq!(kind(WorkerError::Internal("bug".into())), FailureKind::Fault);
        assert_eq!(CallError::from(Status::unavailable("connection refused")).kind(), FailureKind::Unreachable);
        assert_eq!(CallError::from(Status::deadline_exceeded("slow")).kind(), FailureKind::Unreachable);
        let e = CallError::from(Status::not_found("model is not available: x"));
        assert_eq!(e.to_string(), "model is not available: x (NotFound)");
    }

    #[test]
    fn errors_map_to_grpc_codes_with_their_message() {
        let s: Status = WorkerError::ShardOutOfRange { start: 0, end: 40, layers: 30 }.into();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("40"));
        let s: Status = CoordinatorError::UnknownModel("x".into()).into();
        assert_eq!(s.code(), Code::NotFound);
        let s: Status = CoordinatorError::OffsetPastEnd { offset: 11, total: 10 }.into();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("past the end"), "{}", s.message());
    }
}
