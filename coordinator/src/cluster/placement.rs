//! From the workers that may hold layers to the stages of a pipeline, through the
//! planner: what each worker offers (memory, measured speed) becomes a
//! [`NodeSpec`]; the plan's stages are mapped back to workers.

use std::ops::Range;

use strata_proto::v1::WorkerDescription;

use super::membership::Member;
use crate::planner::{self, DeviceSpec, ModelSpec, NodeSpec, PlanError, PlanOptions};

/// Bandwidth assumed for a worker that has not measured its own (bytes per second):
/// a modest desktop CPU. Only the ratio between workers matters for the split.
const UNKNOWN_BANDWIDTH: f64 = 20e9;

/// Latency assumed for a hop between two workers (a LAN).
const LINK_LATENCY: f64 = 200e-6;

/// How layers are spread over the workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlacementPolicy {
    /// The planner's fastest plan for one stream: workers that would only slow the
    /// pipeline down hold nothing.
    Fastest,
    /// Every worker holds layers, in proportion to its measured speed (within what
    /// its memory holds). Throughput over many streams, and the demo.
    Spread,
    /// `NAME:START-END,...` by worker name, as `strata plan --layers` takes it.
    Manual(String),
}

/// One stage of a chosen plan.
#[derive(Debug, Clone, PartialEq)]
pub struct StagePlan {
    pub address: String,
    pub name: String,
    pub layers: Range<usize>,
    /// The planner's prediction of this stage's compute per token of one stream.
    pub predicted_seconds_per_token: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error("no worker may hold layers")]
    NoWorkers,
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Override(#[from] planner::OverrideError),
    #[error("the manual plan does not fit: {0}")]
    ManualDoesNotFit(String),
}

/// What a worker offers the planner; named by the worker's name (its address when
/// two share one).
pub fn node_spec(member: &Member, unique_name: String) -> NodeSpec {
    let d: &WorkerDescription = &member.description;
    let device = d.devices.first();
    let memory = offered_memory(member);
    let device_name = device.map_or_else(|| "unknown".to_string(), |d| d.name.clone());
    let bandwidth = device.map_or(0.0, |d| d.memory_bandwidth_bytes_per_second);
    one_device_node(unique_name, device_name, memory, bandwidth)
}

/// The memory a worker offers for layers: what it says it offers, else what its
/// device has.
pub fn offered_memory(member: &Member) -> u64 {
    let d: &WorkerDescription = &member.description;
    if d.memory_offered_bytes > 0 {
        d.memory_offered_bytes
    } else {
        d.devices.first().map_or(0, |d| d.free_memory_bytes.max(d.total_memory_bytes))
    }
}

/// A node of one device, as every worker is (it computes on its `--device`); an
/// unmeasured bandwidth is assumed.
pub fn one_device_node(name: String, device: String, memory: u64, bandwidth: f64) -> NodeSpec {
    NodeSpec {
        name,
        devices: vec![DeviceSpec {
            name: device,
            memory,
            bandwidth: if bandwidth.is_finite() && bandwidth > 0.0 { bandwidth } else { UNKNOWN_BANDWIDTH },
        }],
        link_latency: LINK_LATENCY,
    }
}

/// Planner names for the members: their names, made unique with the address.
fn unique_names(members: &[Member]) -> Vec<String> {
    members
        .iter()
        .map(|m| {
            let shared = members.iter().filter(|o| o.name() == m.name()).count() > 1;
            if shared || m.name().is_empty() {
                format!("{}@{}", m.name(), m.address)
            } else {
                m.name().to_string()
            }
        })
        .collect()
}

/// The stages for `members` (in the order they became known), under `policy`.
pub fn place(
    model: &ModelSpec,
    members: &[Member],
    policy: &PlacementPolicy,
    options: &PlanOptions,
) -> Result<(Vec<StagePlan>, planner::Plan), PlacementError> {
    if members.is_empty() {
        return Err(PlacementError::NoWorkers);
    }
    let names = unique_names(members);
    let nodes: Vec<NodeSpec> = members.iter().zip(&names).map(|(m, n)| node_spec(m, n.clone())).collect();
    let plan = match policy {
        PlacementPolicy::Fastest => planner::plan(model, &nodes, options)?,
        PlacementPolicy::Spread => spread(model, &nodes, options)?,
        PlacementPolicy::Manual(text) => {
            let known: Vec<&str> = names.iter().map(String::as_str).collect();
            let assignment = planner::parse_layers(text, &known, model.layers())?;
            let plan = planner::evaluate(model, &nodes, &assignment, options)?;
            if !plan.fits() {
                return Err(PlacementError::ManualDoesNotFit(text.clone()));
            }
            plan
        }
    };
    let stages = plan
        .stages
        .iter()
        .filter_map(|s| {
            let i = names.iter().position(|n| *n == s.node)?;
            Some(StagePlan {
                address: members[i].address.clone(),
                name: members[i].name().to_string(),
                layers: s.layers.clone(),
                predicted_seconds_per_token: s.seconds_per_token,
            })
        })
        .collect();
    Ok((stages, plan))
}

/// Every node holds layers, as many as its share of the total bandwidth (largest
/// remainders, at least one each), in the given order; the fastest plan when that
/// does not fit.
fn spread(model: &ModelSpec, nodes: &[NodeSpec], options: &PlanOptions) -> Result<planner::Plan, PlanError> {
    let layers = model.layers();
    let used = nodes.len().min(layers);
    let speeds: Vec<f64> = nodes[..used].iter().map(|n| n.devices.iter().map(|d| d.bandwidth).sum()).collect();
    let counts = proportional(layers, &speeds);
    let mut start = 0;
    let assignment: Vec<(usize, Range<usize>)> = counts
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            let r = start..start + c;
            start += c;
            (i, r)
        })
        .collect();
    let plan = planner::evaluate(model, nodes, &assignment, options)?;
    if plan.fits() {
        Ok(plan)
    } else {
        planner::plan(model, nodes, options)
    }
}

/// `total` split in proportion to `weights`, every part at least 1 (needs
/// `total >= weights.len()`).
fn proportional(total: usize, weights: &[f64]) -> Vec<usize> {
    let n = weights.len();
    let spare = total - n;
    let sum: f64 = weights.iter().sum();
    let shares: Vec<f64> =
        weights.iter().map(|w| if sum > 0.0 { w / sum * spare as f64 } else { spare as f64 / n as f64 }).collect();
    let mut counts: Vec<usize> = shares.iter().map(|s| s.floor() as usize).collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| (shares[b] - shares[b].floor()).total_cmp(&(shares[a] - shares[a].floor())));
    let mut left = spare - counts.iter().sum::<usize>();
    for i in order.into_iter().cycle().take(n * 2) {
        if left == 0 {
            break;
        }
        counts[i] += 1;
        left -= 1;
    }
    counts.iter().map(|c| c + 1).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_proto::v1;

    fn member(name: &str, address: &str, memory: u64, bandwidth: f64) -> Member {
        Member::new(
            address.into(),
            v1::WorkerDescription {
                name: name.into(),
                memory_offered_bytes: memory,
                devices: vec![v1::Device {
                    name: "cpu".into(),
                    memory_bandwidth_bytes_per_second: bandwidth,
                    ..Default::default()
                }],
                ..Default::default()
            },
        )
    }

    fn model(layers: usize) -> ModelSpec {
        ModelSpec {
            name: "m".into(),
            layer_bytes: vec![1 << 20; layers],
            active_layer_bytes: Vec::new(),
            embedding_bytes: 1 << 20,
            head_bytes: 1 << 20,
            shared_bytes: 0,
            kv_bytes_per_token_per_layer: 16,
            layer_windows: Vec::new(),
            max_context: 1024,
            hidden: 64,
            feed_forward: 128,
            heads: 4,
            vocab_size: 100,
            bits_per_weight: None,
        }
    }

    fn options() -> PlanOptions {
        PlanOptions { context: 256, sequences: 1, headroom: 0, ..PlanOptions::default() }
    }

    #[test]
    fn proportional_split_gives_every_part_one_and_sums() {
        assert_eq!(proportional(30, &[1.0, 1.0, 1.0]), vec![10, 10, 10]);
        assert_eq!(proportional(30, &[2.0, 1.0, 1.0]).iter().sum::<usize>(), 30);
        assert_eq!(proportional(3, &[100.0, 1.0, 1.0]), vec![1, 1, 1]);
        assert_eq!(proportional(10, &[0.0, 0.0]), vec![5, 5]);
        let p = proportional(30, &[3.0, 1.0]);
        assert!(p[0] > p[1] * 2, "{p:?}");
    }

    #[test]
    fn spread_uses_every_worker_in_order() {
        let members =
            [member("a", "h:1", 1 << 30, 0.0), member("b", "h:2", 1 << 30, 0.0), member("c", "h:3", 1 << 30, 0.0)];
        let (stages, _) = place(&model(30), &members, &PlacementPolicy::Spread, &options()).unwrap();
        let got: Vec<(&str, Range<usize>)> = stages.iter().map(|s| (s.name.as_str(), s.layers.clone())).collect();
        assert_eq!(got, vec![("a", 0..10), ("b", 10..20), ("c", 20..30)]);
    }

    #[test]
    fn fastest_leaves_out_a_worker_that_only_adds_hops() {
        let members = [member("a", "h:1", 1 << 30, 50e9), member("b", "h:2", 1 << 30, 50e9)];
        let (stages, plan) = place(&model(30), &members, &PlacementPolicy::Fastest, &options()).unwrap();
        assert_eq!(stages.len(), 1);
        assert_eq!(plan.left_out.len(), 1);
    }

    #[test]
    fn spread_respects_memory_and_falls_back_to_the_planner() {
        // `b` holds at most a few layers: the even split does not fit, the planner's does.
        let members = [member("a", "h:1", 40 << 20, 20e9), member("b", "h:2", 8 << 20, 20e9)];
        let (stages, _) = place(&model(30), &members, &PlacementPolicy::Spread, &options()).unwrap();
        assert_eq!(stages.iter().map(|s| s.layers.len()).sum::<usize>(), 30);
        assert!(stages.iter().all(|s| s.layers.len() <= 30));
    }

    #[test]
    fn manual_layers_name_workers_and_refuse_what_does_not_fit() {
        let members = [member("a", "h:1", 1 << 30, 0.0), member("b", "h:2", 1 << 30, 0.0)];
        let policy = PlacementPolicy::Manual("a:0-4,b:5-29".into());
        let (stages, _) = place(&model(30), &members, &policy, &options()).unwrap();
        assert_eq!(stages[0].layers, 0..5);
        assert_eq!(stages[1].address, "h:2");
        let small = [member("a", "h:1", 2 << 20, 0.0), member("b", "h:2", 1 << 30, 0.0)];
        assert!(matches!(place(&model(30), &small, &policy, &options()), Err(PlacementError::ManualDoesNotFit(_))));
        assert!(matches!(
            place(&model(30), &members, &PlacementPolicy::Manual("zz:0-29".into()), &options()),
            Err(PlacementError::Override(_))
        ));
    }

    #[test]
    fn workers_sharing_a_name_stay_apart() {
        let members = [member("w", "h:1", 1 << 30, 0.0), member("w", "h:2", 1 << 30, 0.0)];
        let (stages, _) = place(&model(30), &members, &PlacementPolicy::Spread, &options()).unwrap();
        assert_eq!(stages.iter().map(|s| s.address.as_str()).collect::<Vec<_>>(), ["h:1", "h:2"]);
    }

    #[test]
    fn no_workers_is_an_error() {
        assert!(matches!(place(&model(30), &[], &PlacementPolicy::Spread, &options()), Err(PlacementError::NoWorkers)));
    }
}
