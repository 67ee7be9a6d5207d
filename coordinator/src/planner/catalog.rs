//! Built-in tables for what-if planning: accelerators (memory and bandwidth) and
//! well-known models (shapes, from which byte sizes are derived per quantization).
//!
//! Memory sizes are the marketed ones in GiB (an "8 GB" card has 8 GiB); bandwidths
//! are the vendors' peak figures, so predictions made from them are upper bounds on
//! speed. Model shapes are copied from each model's published `config.json`, named
//! next to every entry.

use super::model::ModelSpec;

const GIB: u64 = 1 << 30;
const GB_S: f64 = 1e9;

/// A device type from the table.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceModel {
    /// Canonical name, e.g. `rtx4090` or `m2-max-64gb`.
    pub name: String,
    pub memory: u64,
    /// Peak memory bandwidth in bytes per second.
    pub bandwidth: f64,
    /// Memory kept back by default: macOS lets the GPU wire only about three
    /// quarters of unified memory (`recommendedMaxWorkingSetSize`), and the rest is
    /// the system's anyway.
    pub default_reserve: u64,
}

/// Discrete GPUs: (name, GiB, GB/s). Sources: NVIDIA product pages and datasheets;
/// H100 is the SXM part (the PCIe card has 2000 GB/s).
const GPUS: &[(&str, u64, f64)] = &[
    ("rtx3070", 8, 448.0),
    ("rtx3090", 24, 936.0),
    ("rtx4090", 24, 1008.0),
    ("rtx5090", 32, 1792.0),
    ("a6000", 48, 768.0),
    ("l40s", 48, 864.0),
    ("a100-80gb", 80, 2039.0),
    ("h100", 80, 3350.0),
];

/// Apple silicon: (chip, GB/s, unified memory sizes in GB). Source: Apple's
/// technical specifications per chip; the binned M3 Max and M4 Max have their own
/// bandwidth and sizes.
const APPLE: &[(&str, f64, &[u64])] = &[
    ("m1", 68.25, &[8, 16]),
    ("m1-pro", 200.0, &[16, 32]),
    ("m1-max", 400.0, &[32, 64]),
    ("m1-ultra", 800.0, &[64, 128]),
    ("m2", 100.0, &[8, 16, 24]),
    ("m2-pro", 200.0, &[16, 32]),
    ("m2-max", 400.0, &[32, 64, 96]),
    ("m2-ultra", 800.0, &[64, 128, 192]),
    ("m3", 100.0, &[8, 16, 24]),
    ("m3-pro", 150.0, &[18, 36]),
    ("m3-max", 300.0, &[36, 96]),
    ("m3-max", 400.0, &[48, 64, 128]),
    ("m3-ultra", 819.0, &[96, 256, 512]),
    ("m4", 120.0, &[16, 24, 32]),
    ("m4-pro", 273.0, &[24, 48, 64]),
    ("m4-max", 410.0, &[36]),
    ("m4-max", 546.0, &[48, 64, 128]),
];

/// Every device in the table.
pub fn devices() -> Vec<DeviceModel> {
    let gpus = GPUS.iter().map(|&(name, gib, bw)| DeviceModel {
        name: name.to_string(),
        memory: gib * GIB,
        bandwidth: bw * GB_S,
        default_reserve: 0,
    });
    let apple = APPLE.iter().flat_map(|&(chip, bw, sizes)| {
        sizes.iter().map(move |&gb| DeviceModel {
            name: format!("{chip}-{gb}gb"),
            memory: gb * GIB,
            bandwidth: bw * GB_S,
            default_reserve: gb * GIB / 4,
        })
    });
    gpus.chain(apple).collect()
}

/// Looks a device up by name, ignoring case, spaces, dashes and underscores
/// (`RTX 4090`, `rtx-4090` and `rtx4090` are one card).
pub fn device(name: &str) -> Option<DeviceModel> {
    let wanted = normalize(name);
    devices().into_iter().find(|d| normalize(&d.name) == wanted || (d.name == "a100-80gb" && wanted == "a100"))
}

/// The smallest discrete GPU with at least `memory` bytes, for "what would help".
pub fn smallest_gpu_with(memory: u64) -> Option<DeviceModel> {
    devices()
        .into_iter()
        .filter(|d| d.default_reserve == 0 && d.memory >= memory)
        .min_by(|a, b| a.memory.cmp(&b.memory).then(b.bandwidth.total_cmp(&a.bandwidth)))
}

/// A quantization: the average bits per weight of its files.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quantization {
    pub name: &'static str,
    pub bits_per_weight: f64,
}

/// FP16 stores 16 bits; Q8_0 blocks of 32 weights carry an f16 scale (8.5 bits);
/// Q4_K_M mixes Q4_K with Q6_K for some tensors, about 4.85 bits on Llama models.
pub const QUANTIZATIONS: &[Quantization] = &[
    Quantization { name: "fp16", bits_per_weight: 16.0 },
    Quantization { name: "q8_0", bits_per_weight: 8.5 },
    Quantization { name: "q4_k_m", bits_per_weight: 4.85 },
];

/// The smallest quantization in the table, offered when a model does not fit.
pub const SMALLEST_QUANTIZATION: Quantization = Quantization { name: "q4_k_m", bits_per_weight: 4.85 };

/// The shape of a catalog model.
#[derive(Debug, Clone, Copy)]
enum Shape {
    /// A Llama-style dense decoder with grouped-query attention.
    Dense {
        layers: usize,
        hidden: usize,
        feed_forward: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        vocab: usize,
        context: usize,
        qkv_bias: bool,
        /// Sliding-window attention: (window, period); the last layer of each period
        /// is global (Gemma 3).
        sliding: Option<(usize, usize)>,
    },
    /// A mixture-of-experts decoder: `dense_layers` ordinary layers first, then
    /// layers whose FFN is `experts` routed experts (of which `active` run per
    /// token) and `shared` always-on ones, every one resident.
    Moe {
        layers: usize,
        dense_layers: usize,
        hidden: usize,
        dense_feed_forward: usize,
        expert_feed_forward: usize,
        experts: usize,
        active: usize,
        shared: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        vocab: usize,
        context: usize,
        qkv_bias: bool,
    },
    /// DeepSeek V3: multi-head latent attention, three dense layers, then
    /// mixture-of-experts layers with every expert resident.
    DeepSeekV3,
}

/// (name, shape, source of the shape).
const MODELS: &[(&str, Shape, &str)] = &[
    (
        "llama-3.1-8b",
        Shape::Dense {
            layers: 32, hidden: 4096, feed_forward: 14336, heads: 32, kv_heads: 8,
            head_dim: 128, vocab: 128256, context: 131072, qkv_bias: false, sliding: None,
        },
        "meta-llama/Llama-3.1-8B config.json",
    ),
    (
        "llama-3.1-70b",
        Shape::Dense {
            layers: 80, hidden: 8192, feed_forward: 28672, heads: 64, kv_heads: 8,
            head_dim: 128, vocab: 128256, context: 131072, qkv_bias: false, sliding: None,
        },
        "meta-llama/Llama-3.1-70B config.json",
    ),
    (
        "llama-3.1-405b",
        Shape::Dense {
            layers: 126, hidden: 16384, feed_forward: 53248, heads: 128, kv_heads: 8,
            head_dim: 128, vocab: 128256, context: 131072, qkv_bias: false, sliding: None,
        },
        "meta-llama/Llama-3.1-405B config.json",
    ),
    (
        "qwen-2.5-32b",
        Shape::Dense {
            layers: 64, hidden: 5120, feed_forward: 27648, heads: 40, kv_heads: 8,
            head_dim: 128, vocab: 152064, context: 32768, qkv_bias: true, sliding: None,
        },
        "Qwen/Qwen2.5-32B-Instruct config.json",
    ),
    (
        "qwen-2.5-72b",
        Shape::Dense {
            layers: 80, hidden: 8192, feed_forward: 29568, heads: 64, kv_heads: 8,
            head_dim: 128, vocab: 152064, context: 32768, qkv_bias: true, sliding: None,
        },
        "Qwen/Qwen2.5-72B-Instruct config.json",
    ),
    (
        "qwen3-32b",
        Shape::Dense {
            layers: 64, hidden: 5120, feed_forward: 25600, heads: 64, kv_heads: 8,
            head_dim: 128, vocab: 151936, context: 40960, qkv_bias: false, sliding: None,
        },
        "Qwen/Qwen3-32B config.json",
    ),
    (
        "gemma-3-27b",
        Shape::Dense {
            layers: 62, hidden: 5376, feed_forward: 21504, heads: 32, kv_heads: 16,
            head_dim: 128, vocab: 262208, context: 131072, qkv_bias: false, sliding: Some((1024, 6)),
        },
        "google/gemma-3-27b-it config.json (text model)",
    ),
    (
        "qwen3-30b-a3b",
        Shape::Moe {
            layers: 48, dense_layers: 0, hidden: 2048, dense_feed_forward: 0, expert_feed_forward: 768,
            experts: 128, active: 8, shared: 0, heads: 32, kv_heads: 4, head_dim: 128, vocab: 151936,
            context: 40960, qkv_bias: false,
        },
        "Qwen/Qwen3-30B-A3B config.json",
    ),
    (
        "qwen3-235b-a22b",
        Shape::Moe {
            layers: 94, dense_layers: 0, hidden: 4096, dense_feed_forward: 0, expert_feed_forward: 1536,
            experts: 128, active: 8, shared: 0, heads: 64, kv_heads: 4, head_dim: 128, vocab: 151936,
            context: 40960, qkv_bias: false,
        },
        "Qwen/Qwen3-235B-A22B config.json",
    ),
    (
        "glm-4.5-air",
        Shape::Moe {
            layers: 46, dense_layers: 1, hidden: 4096, dense_feed_forward: 10944, expert_feed_forward: 1408,
            experts: 128, active: 8, shared: 1, heads: 96, kv_heads: 8, head_dim: 128, vocab: 151552,
            context: 131072, qkv_bias: true,
        },
        "zai-org/GLM-4.5-Air config.json (without the multi-token-prediction layer)",
    ),
    ("deepseek-v3", Shape::DeepSeekV3, "deepseek-ai/DeepSeek-V3 config.json (without the multi-token-prediction module)"),
];

/// DeepSeek V3's `config.json` values.
mod deepseek {
    pub const LAYERS: usize = 61;
    pub const DENSE_LAYERS: usize = 3;
    pub const HIDDEN: usize = 7168;
    pub const DENSE_FFN: usize = 18432;
    pub const EXPERT_FFN: usize = 2048;
    pub const ROUTED_EXPERTS: usize = 256;
    pub const SHARED_EXPERTS: usize = 1;
    pub const ACTIVE_EXPERTS: usize = 8;
    pub const HEADS: usize = 128;
    pub const Q_LORA_RANK: usize = 1536;
    pub const KV_LORA_RANK: usize = 512;
    pub const QK_NOPE_DIM: usize = 128;
    pub const QK_ROPE_DIM: usize = 64;
    pub const V_DIM: usize = 128;
    pub const VOCAB: usize = 129280;
    pub const CONTEXT: usize = 163840;
}

/// Names of every catalog model, with each quantization (`llama-3.1-70b-q4_k_m`).
pub fn model_names() -> Vec<String> {
    MODELS.iter().flat_map(|(m, _, _)| QUANTIZATIONS.iter().map(move |q| format!("{m}-{}", q.name))).collect()
}

/// Where the shape of a catalog model comes from.
pub fn model_source(name: &str) -> Option<&'static str> {
    let wanted = normalize(name);
    MODELS.iter().find(|(m, _, _)| wanted.starts_with(&normalize(m))).map(|(_, _, source)| *source)
}

/// A catalog model by name, e.g. `llama-3.1-70b-q4_k_m`.
pub fn model(name: &str) -> Option<ModelSpec> {
    let wanted = normalize(name);
    for (model, shape, _) in MODELS {
        for quant in QUANTIZATIONS {
            if wanted == normalize(&format!("{model}-{}", quant.name)) {
                return Some(build(&format!("{model}-{}", quant.name), *shape, quant.bits_per_weight));
            }
        }
    }
    None
}

/// Weight counts per layer, of the embedding and of the head, and what the planner
/// needs besides; bytes follow from the bits per weight.
fn build(name: &str, shape: Shape, bits: f64) -> ModelSpec {
    let bytes = |params: usize| (params as f64 * bits / 8.0).ceil() as u64;
    match shape {
        Shape::Dense {
            layers,
            hidden,
            feed_forward,
            heads,
            kv_heads,
            head_dim,
            vocab,
            context,
            qkv_bias,
            sliding,
        } => {
            let layer = attention_params(hidden, heads, kv_heads, head_dim, qkv_bias) + 3 * hidden * feed_forward;
            ModelSpec {
                layer_windows: sliding
                    .map(|(window, period)| (0..layers).map(|l| (l % period < period - 1).then_some(window)).collect())
                    .unwrap_or_default(),
                bits_per_weight: Some(bits),
                ..decoder(name, vec![bytes(layer); layers], Vec::new(), (hidden, feed_forward, heads), (f32_kv_bytes(kv_heads * head_dim), vocab, context), &bytes)
            }
        }
        Shape::Moe {
            layers,
            dense_layers,
            hidden,
            dense_feed_forward,
            expert_feed_forward,
            experts,
            active,
            shared,
            heads,
            kv_heads,
            head_dim,
            vocab,
            context,
            qkv_bias,
        } => {
            let attention = attention_params(hidden, heads, kv_heads, head_dim, qkv_bias);
            let expert = 3 * hidden * expert_feed_forward;
            let router = hidden * experts;
            let dense = attention + 3 * hidden * dense_feed_forward;
            let moe = attention + router + (experts + shared) * expert;
            let moe_read = attention + router + (active + shared) * expert;
            let per_layer = |moe: usize| dense_then_moe(layers, dense_layers, dense, moe, &bytes);
            ModelSpec {
                bits_per_weight: Some(bits),
                ..decoder(
                    name,
                    per_layer(moe),
                    per_layer(moe_read),
                    // The widest feed-forward any single token runs through.
                    (hidden, dense_feed_forward.max((active + shared) * expert_feed_forward), heads),
                    (f32_kv_bytes(kv_heads * head_dim), vocab, context),
                    &bytes,
                )
            }
        }
        Shape::DeepSeekV3 => {
            use deepseek::*;
            let q = HIDDEN * Q_LORA_RANK + Q_LORA_RANK + Q_LORA_RANK * HEADS * (QK_NOPE_DIM + QK_ROPE_DIM);
            let kv = HIDDEN * (KV_LORA_RANK + QK_ROPE_DIM) + KV_LORA_RANK + KV_LORA_RANK * HEADS * (QK_NOPE_DIM + V_DIM);
            let attention = q + kv + HEADS * V_DIM * HIDDEN + 2 * HIDDEN;
            let expert = 3 * HIDDEN * EXPERT_FFN;
            let dense = attention + 3 * HIDDEN * DENSE_FFN;
            let moe = attention + (ROUTED_EXPERTS + SHARED_EXPERTS) * expert + ROUTED_EXPERTS * HIDDEN + ROUTED_EXPERTS;
            let moe_read = attention + (ACTIVE_EXPERTS + SHARED_EXPERTS) * expert + ROUTED_EXPERTS * HIDDEN + ROUTED_EXPERTS;
            let per_layer = |moe: usize| dense_then_moe(LAYERS, DENSE_LAYERS, dense, moe, &bytes);
            ModelSpec {
                bits_per_weight: Some(bits),
                ..decoder(
                    name,
                    per_layer(moe),
                    per_layer(moe_read),
                    // The widest feed-forward any single token runs through.
                    (HIDDEN, DENSE_FFN, HEADS),
                    // The latent cache of multi-head latent attention: the compressed KV
                    // and the shared rope key, f32 like the rest of the runtime's cache.
                    (((KV_LORA_RANK + QK_ROPE_DIM) * 4) as u64, VOCAB, CONTEXT),
                    &bytes,
                )
            }
        }
    }
}

/// Bytes of `layers` layers: `dense` weights each for the first `dense_layers`, `moe`
/// for the rest.
fn dense_then_moe(layers: usize, dense_layers: usize, dense: usize, moe: usize, bytes: &dyn Fn(usize) -> u64) -> Vec<u64> {
    (0..layers).map(|i| bytes(if i < dense_layers { dense } else { moe })).collect()
}

/// K and V of `kv_dim` values each, f32: what strata's runtime caches per token and layer.
fn f32_kv_bytes(kv_dim: usize) -> u64 {
    (2 * kv_dim * 4) as u64
}

/// Weights of one attention block and the layer's norms: q and o of `heads`, k and v
/// of `kv_heads`, the biases when there are any.
fn attention_params(hidden: usize, heads: usize, kv_heads: usize, head_dim: usize, qkv_bias: bool) -> usize {
    let kv_dim = kv_heads * head_dim;
    let bias = if qkv_bias { heads * head_dim + 2 * kv_dim } else { 0 };
    2 * hidden * heads * head_dim + 2 * hidden * kv_dim + bias + 2 * hidden
}

/// The parts every decoder here shares: an embedding, and a head (a tied head is the
/// embedding's bytes again: the last stage holds that matrix as its head).
fn decoder(
    name: &str,
    layer_bytes: Vec<u64>,
    active_layer_bytes: Vec<u64>,
    (hidden, feed_forward, heads): (usize, usize, usize),
    (kv_bytes_per_token_per_layer, vocab, context): (u64, usize, usize),
    bytes: &dyn Fn(usize) -> u64,
) -> ModelSpec {
    ModelSpec {
        name: name.to_string(),
        layer_bytes,
        active_layer_bytes,
        embedding_bytes: bytes(vocab * hidden),
        head_bytes: bytes(vocab * hidden + hidden),
        shared_bytes: 0,
        kv_bytes_per_token_per_layer,
        layer_windows: Vec::new(),
        max_context: context,
        hidden,
        feed_forward,
        heads,
        vocab_size: vocab,
        bits_per_weight: None,
    }
}

fn normalize(name: &str) -> String {
    name.chars().filter(|c| !matches!(c, ' ' | '-' | '_' | '.' | ':')).flat_map(char::to_lowercase).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(m: &ModelSpec) -> f64 {
        m.total_bytes() as f64 * 8.0 / m.bits_per_weight.unwrap() / 1e9
    }

    /// The derived sizes land on the parameter counts the model cards state.
    #[test]
    fn parameter_counts_match_the_model_cards() {
        for (name, billions) in [
            ("llama-3.1-8b-fp16", 8.03),
            ("llama-3.1-70b-fp16", 70.6),
            ("llama-3.1-405b-fp16", 405.9),
            ("qwen-2.5-32b-fp16", 32.8),
            ("qwen-2.5-72b-fp16", 72.7),
            ("deepseek-v3-fp16", 671.0),
            ("qwen3-32b-fp16", 32.8),
            // 27.0B, and its 1.4B embedding counted again as the tied head.
            ("gemma-3-27b-fp16", 28.4),
            ("qwen3-30b-a3b-fp16", 30.5),
            ("qwen3-235b-a22b-fp16", 235.1),
            ("glm-4.5-air-fp16", 106.8),
        ] {
            let m = model(name).unwrap();
            let got = params(&m);
            assert!((got - billions).abs() / billions < 0.01, "{name}: {got:.2}B, expected {billions}B");
        }
    }

    #[test]
    fn quantizations_scale_the_bytes() {
        let fp16 = model("llama-3.1-70b-fp16").unwrap().total_bytes() as f64;
        let q4 = model("Llama-3.1-70B-Q4_K_M").unwrap().total_bytes() as f64;
        assert!((fp16 / q4 - 16.0 / 4.85).abs() < 0.001);
        // A 70B Q4_K_M GGUF is about 42.5 GB.
        assert!((q4 / 1e9 - 42.8).abs() < 0.5, "{}", q4 / 1e9);
        let ds = model("deepseek-v3-q8_0").unwrap();
        assert_eq!(ds.layers(), 61);
        assert!(ds.layer_bytes[3] > 10 * ds.layer_bytes[0], "expert layers dwarf the dense ones");
        assert!(model("llama-3.1-70b-q2_k").is_none());
        assert_eq!(model_names().len(), 33);
    }

    /// A token reads its active experts only: what the model cards say (A3B, A22B, 37B
    /// for DeepSeek V3; Z.ai's 12B for GLM-4.5-Air leaves out the 1.2B of embedding
    /// and head, counted here).
    #[test]
    fn mixture_of_experts_models_read_their_active_experts_only() {
        for (name, active) in
            [("qwen3-30b-a3b-fp16", 3.3), ("qwen3-235b-a22b-fp16", 22.1), ("glm-4.5-air-fp16", 13.4), ("deepseek-v3-fp16", 37.5)]
        {
            let m = model(name).unwrap();
            let read = (m.read_bytes(0..m.layers()) + m.embedding_bytes) as f64 * 8.0 / 16.0 / 1e9;
            assert!((read - active).abs() / active < 0.03, "{name}: {read:.2}B read, expected {active}B");
        }
        // Every expert is resident all the same.
        let m = model("qwen3-235b-a22b-fp16").unwrap();
        assert!((m.resident_bytes(0..m.layers()) as f64 * 8.0 / 16.0 / 1e9 - 234.5).abs() < 1.0);
        let gemma = model("gemma-3-27b-q4_k_m").unwrap();
        let global: Vec<usize> = (0..gemma.layers()).filter(|&l| gemma.layer_windows[l].is_none()).collect();
        assert_eq!(global, [5, 11, 17, 23, 29, 35, 41, 47, 53, 59]);
        // At 128K tokens its sliding layers hold about their window of 1024.
        let (sliding, full) = (gemma.kv_bytes(0..1, 131072, 1), gemma.kv_bytes(5..6, 131072, 1));
        assert!(sliding * 50 < full, "{sliding} vs {full}");
    }

    #[test]
    fn devices_are_found_by_loose_names() {
        assert_eq!(device("RTX 4090").unwrap().bandwidth, 1008e9);
        assert_eq!(device("rtx-3070").unwrap().memory, 8 * GIB);
        assert_eq!(device("a100").unwrap().name, "a100-80gb");
        let m = device("m2-max-96gb").unwrap();
        assert_eq!((m.memory, m.bandwidth, m.default_reserve), (96 * GIB, 400e9, 24 * GIB));
        assert_eq!(device("m4-max-36gb").unwrap().bandwidth, 410e9);
        assert!(device("m4-max-96gb").is_none());
        assert_eq!(smallest_gpu_with(20 * GIB).unwrap().name, "rtx4090");
        assert_eq!(smallest_gpu_with(30 * GIB).unwrap().name, "rtx5090");
        assert!(smallest_gpu_with(100 * GIB).is_none());
    }
}
