//! The search for the fastest plan that fits.
//!
//! A node's cost for a layer range is the best split of the range over its own
//! devices (a small DP over the devices in their given order, paying an intra-node
//! hop between two used devices). Across nodes the pipeline is a ring: the last
//! stage hands the token back to the first, so every node in a plan of two or more
//! sends once per token and the network latency depends only on *which* nodes are
//! used, not on their order. Order matters only at the ends, where the first node
//! holds the embedding and the last holds (and reads) the head, and through packing
//! when layers differ in size. So the search tries every (first, last) pair and,
//! for each, a DP over (middle node, layer boundary) with the middle nodes in their
//! given order, each taking a range or being left out. That is exact when the
//! layers are of one size (every catalog model but DeepSeek V3's three dense
//! layers) and O(N³·L²) with small constants: well under a second for 16 nodes and
//! 200 layers.

use std::ops::Range;

use super::{ModelSpec, NodeSpec, PlanOptions};

const INF: f64 = f64::INFINITY;

/// Nodes and the layers each holds, in pipeline order.
type Chain = Vec<(usize, Range<usize>)>;

/// One stage of a found plan: a device of a node and its layers.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Placement {
    pub node: usize,
    pub device: usize,
    pub layers: Range<usize>,
}

/// A model, the nodes and the options, with what every range query needs.
pub(super) struct Problem<'a> {
    pub model: &'a ModelSpec,
    pub nodes: &'a [NodeSpec],
    pub options: &'a PlanOptions,
    layers: usize,
    /// KV bytes of layers `[0, i)` at index `i`.
    kv_prefix: Vec<u64>,
    scratch: u64,
}

impl<'a> Problem<'a> {
    pub fn new(model: &'a ModelSpec, nodes: &'a [NodeSpec], options: &'a PlanOptions) -> Self {
        Self {
            model,
            nodes,
            options,
            layers: model.layers(),
            kv_prefix: std::iter::once(0)
                .chain((0..model.layers()).scan(0, |sum, l| {
                    *sum += model.kv_bytes_of_layer(l, options.context, options.sequences);
                    Some(*sum)
                }))
                .collect(),
            scratch: model.scratch_bytes(options.context, options.sequences, options.prefill_chunk),
        }
    }

    /// Bytes of weights, KV cache, scratch and headroom a device holding `layers` needs.
    pub fn need(&self, layers: Range<usize>) -> u64 {
        self.model.resident_bytes(layers.clone())
            + self.kv_bytes(&layers)
            + self.scratch
            + self.options.headroom
    }

    pub fn kv_bytes(&self, layers: &Range<usize>) -> u64 {
        self.kv_prefix[layers.end] - self.kv_prefix[layers.start]
    }

    pub fn scratch_bytes(&self) -> u64 {
        self.scratch
    }

    fn fits(&self, node: usize, device: usize, layers: Range<usize>) -> bool {
        self.need(layers) <= self.nodes[node].devices[device].memory
    }

    /// Seconds a device spends on its layers per token: bytes read over bandwidth.
    pub fn device_seconds(&self, node: usize, device: usize, layers: Range<usize>) -> f64 {
        self.model.read_bytes(layers) as f64 / self.nodes[node].devices[device].bandwidth
    }

    /// Latency of the hops between the given nodes' stages, per token.
    pub fn network_seconds(&self, nodes: &[usize]) -> f64 {
        if nodes.len() < 2 {
            return 0.0;
        }
        nodes.iter().map(|&n| self.nodes[n].link_latency).sum()
    }

    /// For ranges starting at `start` on `node`: the best cost of covering
    /// `start..end` with its devices, for every `end`, and the choices made.
    fn inner(&self, node: usize, start: usize) -> Inner {
        let devices = self.nodes[node].devices.len();
        let width = self.layers + 1;
        let mut cost = vec![INF; (devices + 1) * width];
        let mut from = vec![usize::MAX; (devices + 1) * width];
        cost[start] = 0.0;
        for d in 0..devices {
            let (prev, next) = cost.split_at_mut((d + 1) * width);
            let prev = &prev[d * width..];
            next[..width].copy_from_slice(prev);
            for (c, &so_far) in prev.iter().enumerate().take(self.layers).skip(start) {
                if so_far == INF {
                    continue;
                }
                let hop = if c > start { self.options.intra_node_latency } else { 0.0 };
                for end in c + 1..=self.layers {
                    // Memory needed only grows with the range, so the first miss ends it.
                    if !self.fits(node, d, c..end) {
                        break;
                    }
                    let candidate = so_far + hop + self.device_seconds(node, d, c..end);
                    if candidate < next[end] {
                        next[end] = candidate;
                        from[(d + 1) * width + end] = c;
                    }
                }
            }
        }
        Inner { cost, from, width, devices }
    }

    /// How `node` best splits `layers` over its devices, if it can hold them.
    pub fn split(&self, node: usize, layers: Range<usize>) -> Option<(f64, Vec<Placement>)> {
        let inner = self.inner(node, layers.start);
        let cost = inner.cost[inner.devices * inner.width + layers.end];
        if cost == INF || layers.is_empty() {
            return None;
        }
        let mut placements = Vec::new();
        let mut end = layers.end;
        for d in (0..inner.devices).rev() {
            let c = inner.from[(d + 1) * inner.width + end];
            if c != usize::MAX {
                placements.push(Placement { node, device: d, layers: c..end });
                end = c;
            }
        }
        placements.reverse();
        Some((cost, placements))
    }

    /// Whether `node` could hold a single middle layer anywhere.
    pub fn can_hold_a_layer(&self, node: usize) -> bool {
        (0..self.nodes[node].devices.len()).any(|d| (0..self.layers).any(|l| self.fits(node, d, l..l + 1)))
    }

    pub fn can_hold_a_layer_on(&self, node: usize, device: usize) -> bool {
        (0..self.layers).any(|l| self.fits(node, device, l..l + 1))
    }

    /// The fastest plan that fits, as placements in pipeline order, with its time.
    pub fn search(&self) -> Option<(f64, Vec<Placement>)> {
        let n = self.nodes.len();
        let width = self.layers + 1;
        // table[node][start][end]: the node's best cost for start..end.
        let mut table = vec![INF; n * width * width];
        for node in 0..n {
            for start in 0..self.layers {
                let inner = self.inner(node, start);
                let row = &inner.cost[inner.devices * width..];
                let base = (node * width + start) * width;
                table[base + start + 1..base + width].copy_from_slice(&row[start + 1..width]);
            }
        }
        let cost = |node: usize, range: Range<usize>| table[(node * width + range.start) * width + range.end];

        let mut best: Option<(f64, Chain)> = None;
        let mut consider = |total: f64, chain: Chain| {
            if total < INF && best.as_ref().is_none_or(|(b, _)| total < *b) {
                best = Some((total, chain));
            }
        };
        for node in 0..n {
            consider(cost(node, 0..self.layers), vec![(node, 0..self.layers)]);
        }
        for first in 0..n {
            for last in 0..n {
                if first == last {
                    continue;
                }
                let middle: Vec<usize> = (0..n).filter(|&m| m != first && m != last).collect();
                if let Some((total, chain)) = self.chain(first, &middle, last, &cost) {
                    consider(total, chain);
                }
            }
        }
        let (total, chain) = best?;
        let mut placements = Vec::new();
        for (node, layers) in chain {
            // The table says the split exists; recompute it to learn what it is.
            let (_, split) = self.split(node, layers)?;
            placements.extend(split);
        }
        Some((total, placements))
    }

    /// The best chain `first`, some of `middle` in order, `last`.
    fn chain(
        &self,
        first: usize,
        middle: &[usize],
        last: usize,
        cost: &impl Fn(usize, Range<usize>) -> f64,
    ) -> Option<(f64, Chain)> {
        let width = self.layers + 1;
        let latency = |node: usize| self.nodes[node].link_latency;
        // best[i][a]: cheapest way to cover 0..a with `first` and some of middle[..i].
        let mut best = vec![INF; (middle.len() + 1) * width];
        let mut from = vec![usize::MAX; (middle.len() + 1) * width];
        for (a, slot) in best.iter_mut().enumerate().take(self.layers).skip(1) {
            *slot = cost(first, 0..a) + latency(first);
        }
        for (i, &node) in middle.iter().enumerate() {
            let (prev, next) = best.split_at_mut((i + 1) * width);
            let prev = &prev[i * width..];
            next[..width].copy_from_slice(prev);
            for (a, &so_far) in prev.iter().enumerate().take(self.layers).skip(1) {
                if so_far == INF {
                    continue;
                }
                for b in a + 1..self.layers {
                    let stage = cost(node, a..b);
                    // A node that cannot hold a..b cannot hold more either.
                    if stage == INF {
                        break;
                    }
                    let candidate = so_far + stage + latency(node);
                    if candidate < next[b] {
                        next[b] = candidate;
                        from[(i + 1) * width + b] = a;
                    }
                }
            }
        }
        let row = &best[middle.len() * width..];
        let (total, start) = (1..self.layers)
            .map(|a| (row[a] + cost(last, a..self.layers) + latency(last), a))
            .min_by(|x, y| x.0.total_cmp(&y.0))?;
        if total == INF {
            return None;
        }
        let mut chain = vec![(last, start..self.layers)];
        let mut end = start;
        for i in (0..middle.len()).rev() {
            let a = from[(i + 1) * width + end];
            if a != usize::MAX {
                chain.push((middle[i], a..end));
                end = a;
            }
        }
        chain.push((first, 0..end));
        chain.reverse();
        Some((total, chain))
    }
}

/// Per-device DP table of [`Problem::inner`]: row d is "using devices 0..d".
struct Inner {
    cost: Vec<f64>,
    from: Vec<usize>,
    width: usize,
    devices: usize,
}
