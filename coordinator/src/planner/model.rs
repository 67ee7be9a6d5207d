//! What the planner needs to know about a model: bytes per layer, embedding and
//! head, KV cache bytes per token, and enough shape to estimate scratch memory.
//!
//! Built either from a GGUF header ([`ModelSpec::from_gguf`]) or from an
//! architecture in the built-in catalog (`catalog::model`).

use std::ops::Range;

use serde::Serialize;
use strata_model::ModelFile;

/// A model as the planner sees it. Only sizes: no weights, no file handle.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelSpec {
    pub name: String,
    /// Weight bytes of every transformer layer, in order.
    pub layer_bytes: Vec<u64>,
    /// Of those, the bytes one token reads, per layer, where that is less than the
    /// whole layer: a mixture-of-experts layer runs a few of its experts for each
    /// token. Empty for a dense model.
    pub active_layer_bytes: Vec<u64>,
    /// Token embedding bytes; resident on the first stage.
    pub embedding_bytes: u64,
    /// Final norm and output head bytes; resident on (and read every token by) the
    /// last stage. The embedding's size again when the two are tied.
    pub head_bytes: u64,
    /// Tensors every stage loads (`rope_freqs.weight`).
    pub shared_bytes: u64,
    /// K and V bytes one token takes in one layer, in the runtime's cache type (f32).
    pub kv_bytes_per_token_per_layer: u64,
    /// Per layer, its attention window when it slides (its cache then holds about
    /// the window, not the context); empty when no layer slides.
    pub layer_windows: Vec<Option<usize>>,
    /// The longest context the model was trained for.
    pub max_context: usize,
    pub hidden: usize,
    pub feed_forward: usize,
    pub heads: usize,
    pub vocab_size: usize,
    /// Average bits per weight, when known: lets the planner say what a smaller
    /// quantization would save.
    pub bits_per_weight: Option<f64>,
}

impl ModelSpec {
    /// Sizes read from an opened GGUF header.
    pub fn from_gguf(name: impl Into<String>, file: &ModelFile) -> Self {
        let info = file.info();
        let sizes = file.sizes();
        let params = dense_params(info.layers, info.hidden, info.feed_forward, info.heads, info.kv_heads, info.head_dim, info.vocab_size);
        let bits_per_weight = (params > 0).then(|| sizes.total() as f64 * 8.0 / params as f64);
        Self {
            name: name.into(),
            layer_bytes: sizes.layers.clone(),
            // A token reads the experts it is routed to, not all of them.
            active_layer_bytes: match &info.moe {
                Some(moe) => sizes
                    .layers
                    .iter()
                    .zip(&sizes.layer_expert_bytes)
                    .map(|(&all, &experts)| all - experts + experts * moe.experts_used as u64 / moe.experts as u64)
                    .collect(),
                None => Vec::new(),
            },
            embedding_bytes: sizes.embedding,
            head_bytes: sizes.head,
            shared_bytes: sizes.shared,
            kv_bytes_per_token_per_layer: info.kv_bytes_per_token_per_layer(),
            layer_windows: match &info.sliding_window {
                Some(_) => (0..info.layers).map(|l| info.window_of(l)).collect(),
                None => Vec::new(),
            },
            max_context: info.context_length,
            hidden: info.hidden,
            feed_forward: info.feed_forward,
            heads: info.heads,
            vocab_size: info.vocab_size,
            bits_per_weight,
        }
    }

    pub fn layers(&self) -> usize {
        self.layer_bytes.len()
    }

    /// Bytes of every weight, counting the embedding and head once each.
    pub fn total_bytes(&self) -> u64 {
        self.layer_bytes.iter().sum::<u64>() + self.embedding_bytes + self.head_bytes + self.shared_bytes
    }

    /// Weight bytes a stage holding `layers` keeps resident.
    pub fn resident_bytes(&self, layers: Range<usize>) -> u64 {
        let mut total = self.stage_bytes(&self.layer_bytes, layers.clone());
        if layers.start == 0 {
            total += self.embedding_bytes;
        }
        total
    }

    /// Weight bytes a stage holding `layers` reads for every token: each layer's
    /// active part. The embedding is not among them: a token looks up one row of it,
    /// not the whole matrix.
    pub fn read_bytes(&self, layers: Range<usize>) -> u64 {
        let read = if self.active_layer_bytes.is_empty() { &self.layer_bytes } else { &self.active_layer_bytes };
        self.stage_bytes(read, layers)
    }

    /// `per_layer` over `layers`, the shared tensors, and the head on the last stage.
    fn stage_bytes(&self, per_layer: &[u64], layers: Range<usize>) -> u64 {
        let mut total: u64 = per_layer[layers.clone()].iter().sum::<u64>() + self.shared_bytes;
        if layers.end == self.layers() {
            total += self.head_bytes;
        }
        total
    }

    /// KV cache bytes of `layer` for `context` tokens of each of `sequences`.
    pub fn kv_bytes_of_layer(&self, layer: usize, context: usize, sequences: usize) -> u64 {
        let window = self.layer_windows.get(layer).copied().flatten();
        self.kv_bytes_per_token_per_layer * strata_model::held_positions(window, context) as u64 * sequences as u64
    }

    /// KV cache bytes of `layers` for `context` tokens of each of `sequences`.
    pub fn kv_bytes(&self, layers: Range<usize>, context: usize, sequences: usize) -> u64 {
        layers.map(|l| self.kv_bytes_of_layer(l, context, sequences)).sum()
    }

    /// Working memory a stage needs besides weights and cache, as the runtime
    /// computes today: a prefill chunk of every sequence at once, whose attention
    /// scores and probabilities (heads × chunk × context f32, twice) dominate, plus
    /// the chunk's hidden and feed-forward activations and one row of logits.
    pub fn scratch_bytes(&self, context: usize, sequences: usize, prefill_chunk: usize) -> u64 {
        let chunk = prefill_chunk.min(context).max(1) as u64;
        let seqs = sequences as u64;
        let scores = 2 * self.heads as u64 * chunk * context as u64 * 4;
        let activations = chunk * (4 * self.hidden as u64 + 3 * self.feed_forward as u64) * 4;
        let logits = self.vocab_size as u64 * 4;
        seqs * (scores + activations + logits)
    }
}

/// Parameters of a Llama-style dense decoder (no biases, norms included), counting
/// the head apart from the embedding even when tied, as the byte sizes do.
fn dense_params(
    layers: usize,
    hidden: usize,
    feed_forward: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab: usize,
) -> u64 {
    let attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2;
    let ffn = 3 * hidden * feed_forward;
    let per_layer = (attention + ffn + 2 * hidden) as u64;
    let embedding = (vocab * hidden) as u64;
    per_layer * layers as u64 + 2 * embedding + hidden as u64
}

#[cfg(test)]
impl ModelSpec {
    /// A test model: `layers` layers of `layer_bytes` each, small everything else.
    pub(crate) fn uniform(layers: usize, layer_bytes: u64) -> ModelSpec {
        ModelSpec {
            name: "uniform".into(),
            layer_bytes: vec![layer_bytes; layers],
            active_layer_bytes: Vec::new(),
            embedding_bytes: 10,
            head_bytes: 20,
            shared_bytes: 1,
            kv_bytes_per_token_per_layer: 2,
            layer_windows: Vec::new(),
            max_context: 1024,
            hidden: 8,
            feed_forward: 16,
            heads: 2,
            vocab_size: 32,
            bits_per_weight: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_stage_holds_the_embedding_and_the_last_reads_the_head() {
        let m = ModelSpec::uniform(4, 100);
        assert_eq!(m.resident_bytes(0..2), 200 + 1 + 10);
        assert_eq!(m.read_bytes(0..2), 200 + 1);
        assert_eq!(m.resident_bytes(2..4), 200 + 1 + 20);
        assert_eq!(m.read_bytes(2..4), 200 + 1 + 20);
        assert_eq!(m.total_bytes(), 400 + 10 + 20 + 1);
        assert_eq!(m.kv_bytes(0..1, 100, 3), 600);
    }
}
