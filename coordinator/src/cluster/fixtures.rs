//! Workers and a model for the cluster's unit tests: a model of eight 100 MiB
//! layers and CPU workers that offer a given memory, named `NAME` at `NAME:7070`.

use strata_proto::v1;

use super::membership::Member;
use crate::planner::ModelSpec;

pub const GIB: u64 = 1 << 30;

pub fn description(name: &str, node_id: &str, memory: u64) -> v1::WorkerDescription {
    v1::WorkerDescription {
        name: name.into(),
        node_id: node_id.into(),
        memory_offered_bytes: memory,
        devices: vec![v1::Device { name: "cpu".into(), memory_bandwidth_bytes_per_second: 50e9, ..Default::default() }],
        ..Default::default()
    }
}

pub fn member(name: &str, memory: u64) -> Member {
    Member::new(format!("{name}:7070"), description(name, name, memory))
}

pub fn model() -> ModelSpec {
    ModelSpec {
        name: "m".into(),
        layer_bytes: vec![100 << 20; 8],
        active_layer_bytes: Vec::new(),
        embedding_bytes: 50 << 20,
        head_bytes: 50 << 20,
        shared_bytes: 0,
        kv_bytes_per_token_per_layer: 1024,
        layer_windows: Vec::new(),
        max_context: 1024,
        hidden: 64,
        feed_forward: 128,
        heads: 4,
        vocab_size: 100,
        bits_per_weight: None,
    }
}
