//! Typed identities on the wire. The generated messages carry bare integers; these
//! give them a meaning in code, so a pipeline id is never mistaken for a sequence
//! id, and "every shard" is said as such rather than as a zero.

use crate::v1;

/// A pipeline: one plan loaded on the workers. Never 0 (the wire's "none").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PipelineId(u64);

impl PipelineId {
    pub const FIRST: Self = Self(1);

    /// `None` for 0, which the wire uses for "no pipeline".
    pub fn new(id: u64) -> Option<Self> {
        (id != 0).then_some(Self(id))
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for PipelineId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A sequence on a pipeline's stages: one run of one request. A request moved
/// or replayed runs under a new one, so late tokens of the old are told apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(u64);

impl SeqId {
    pub const fn new(id: u64) -> Self {
        Self(id)
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for SeqId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A worker, across restarts and address changes: the id it keeps on disk. A
/// worker that gives none is told apart by its address instead.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(String);

impl NodeId {
    /// `None` for the empty string, which the wire uses for "no id".
    pub fn new(id: &str) -> Option<Self> {
        (!id.is_empty()).then(|| Self(id.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id a worker derives from a digest of what identifies it: lowercase hex
    /// (a DNS label, so it can name the worker in its certificate).
    pub fn from_digest(digest: &[u8; 8]) -> Self {
        Self(crate::content_hash::hex(digest))
    }
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl v1::WorkerDescription {
    /// The worker's node id, if it gave one.
    pub fn node(&self) -> Option<NodeId> {
        NodeId::new(&self.node_id)
    }
}

/// Which shards an UnloadShard call drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardSelection {
    /// Every shard the worker holds (a worker taken back after it was cut off).
    All,
    /// The shard of one pipeline.
    Pipeline(PipelineId),
}

impl v1::UnloadShardRequest {
    /// A request that drops every shard.
    pub fn all() -> Self {
        Self { pipeline_id: 0 }
    }

    /// A request that drops the shard of `pipeline`.
    pub fn of(pipeline: PipelineId) -> Self {
        Self { pipeline_id: pipeline.get() }
    }

    /// What the request selects (on the wire, pipeline 0 means every shard).
    pub fn selection(&self) -> ShardSelection {
        PipelineId::new(self.pipeline_id).map_or(ShardSelection::All, ShardSelection::Pipeline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shard_is_said_as_such_and_travels_as_the_wires_zero() {
        assert_eq!(v1::UnloadShardRequest::all().selection(), ShardSelection::All);
        assert_eq!(v1::UnloadShardRequest::all().pipeline_id, 0);
        let p = PipelineId::new(42).expect("42 is a pipeline");
        assert_eq!(v1::UnloadShardRequest::of(p).selection(), ShardSelection::Pipeline(p));
        assert_eq!(PipelineId::new(0), None);
    }

    #[test]
    fn an_empty_node_id_is_no_id() {
        let d = v1::WorkerDescription { node_id: "n1".into(), ..Default::default() };
        assert_eq!(d.node().map(|n| n.to_string()), Some("n1".to_string()));
        assert_eq!(v1::WorkerDescription::default().node(), None);
    }
}
