//! Typed identities on the wire. The generated messages carry bare integers; these
//! give them a meaning in code, so a pipeline id is never mistaken for a sequence
//! id, and "every shard" is said as such rather than as a zero.

use crate::v1;

/// A pipeline: one plan loaded on the workers. Never 0 (the wire's "none").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PipelineId(u64);

impl PipelineId {
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
}
