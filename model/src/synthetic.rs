//! Tiny random-weight GGUF models that tests write for themselves, and where the
//! tests that need the real model find it.
//!
//! They have the real file layout (names, metadata keys, quantized types, a byte-level
//! BPE vocabulary and a chat template), so every code path that reads a real model
//! runs on them in milliseconds.
//!
//! [`SyntheticModel::seventy_b_shaped`] makes the other extreme: a few layers of a
//! Llama-70B-sized model (gigabytes), for tests of what size alone changes (pulls over
//! a real link, the planner's figures). Its matrices are drawn as quantized blocks
//! ([`WeightFill::Blocks`]), never as f32: one f32 copy of its embedding alone would
//! be 4 GB.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use crate::error::{Error, Result};
use crate::gguf::Architecture;

/// The real model for end-to-end checks: `STRATA_TEST_MODEL`, else the cached SmolLM2
/// file. `None`, with a visible message, when it is absent, so such tests say they
/// were skipped rather than pass silently.
pub fn real_test_model() -> Option<PathBuf> {
    let path = std::env::var_os("STRATA_TEST_MODEL").map(PathBuf::from).or_else(|| {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/strata/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    })?;
    if path.is_file() {
        Some(path)
    } else {
        eprintln!("SKIPPED: the real model is not at {} (set STRATA_TEST_MODEL)", path.display());
        None
    }
}

/// The real Gemma 3 model (`strata model fetch gemma3-270m`): `STRATA_GEMMA_MODEL`,
/// else the cached file; `None`, with a visible message, when it is absent.
pub fn real_gemma_model() -> Option<PathBuf> {
    let path = std::env::var_os("STRATA_GEMMA_MODEL").map(PathBuf::from).or_else(|| {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/strata/models/gemma-3-270m-q4_k_m.gguf"))
    })?;
    if path.is_file() {
        Some(path)
    } else {
        eprintln!("SKIPPED: the real Gemma 3 model is not at {} (set STRATA_GEMMA_MODEL)", path.display());
        None
    }
}

/// The shape and contents of a synthetic model.
#[derive(Debug, Clone)]
pub struct SyntheticModel {
    pub architecture: String,
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub feed_forward: usize,
    pub context_length: usize,
    /// Tokens in the vocabulary (the rows of the embedding and the head): the byte
    /// symbols, merges and special tokens, then filler tokens up to this size. At
    /// least [`BASE_VOCAB_SIZE`].
    pub vocab_size: usize,
    /// Type of the big matrices; norms stay f32 as in real files.
    pub dtype: GgmlDType,
    /// Types that differ from `dtype` by the matrix's role (`attn_v`, `ffn_down`,
    /// `token_embd`, `output`), as real files mix them (Q4_K_M keeps some in 6 or
    /// 8 bits).
    pub matrix_types: Vec<(&'static str, GgmlDType)>,
    /// How the big matrices' values are made.
    pub fill: WeightFill,
    /// Write an `output.weight` instead of tying the head to the embedding.
    pub untied_head: bool,
    /// Add q/k/v biases (what `qwen2` files have).
    pub qkv_bias: bool,
    /// Write a `rope_freqs.weight` tensor (Llama 3.1 style scaling).
    pub rope_freqs: bool,
    /// The head size, when it is not `hidden / heads` (`attention.key_length`).
    pub key_length: Option<usize>,
    /// `attention.sliding_window`; which layers slide is the family's rule.
    pub sliding_window: Option<usize>,
    /// `final_logit_softcapping`.
    pub final_logit_softcap: Option<f32>,
    /// `rope.dimension_count`: RoPE over the first dimensions of each head only.
    pub rope_dims: Option<usize>,
    /// Mixture-of-experts FFNs (for `qwen3moe` and `glm4moe`).
    pub moe: Option<SyntheticMoe>,
    pub seed: u64,
}

/// The experts of a synthetic MoE model.
#[derive(Debug, Clone)]
pub struct SyntheticMoe {
    pub experts: usize,
    pub used: usize,
    pub expert_feed_forward: usize,
    /// A shared expert of this feed-forward size.
    pub shared_feed_forward: Option<usize>,
    pub leading_dense: usize,
    /// Sigmoid gating (`expert_gating_func` 2) instead of softmax.
    pub sigmoid: bool,
    /// An `exp_probs_b.bias` selection bias per MoE layer.
    pub selection_bias: bool,
    /// (`expert_group_count`, `expert_group_used_count`).
    pub groups: (usize, usize),
    pub weights_scale: f32,
    /// Multi-token-prediction layers written after the others (to be skipped).
    pub nextn_layers: usize,
}

/// How a synthetic model's big matrices get their values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFill {
    /// f32 values uniform in ±1.7/√cols, quantized to `dtype` by candle: the small
    /// models' files, which the tests' expectations were made with.
    #[default]
    Quantized,
    /// Blocks written directly (Q4_0, Q8_0 or Q4_K): random codes under one fixed
    /// scale per matrix, so a matrix costs its quantized bytes and no f32 copy.
    /// The values are symmetric around 0 (each type's one code without a
    /// negative twin is avoided), so a product over many of them has no common
    /// bias; the scale makes their spread that of [`WeightFill::Quantized`], so
    /// activations stay as tame.
    Blocks,
}

/// Extra merges on top of the 256 byte tokens, so BPE has something to merge.
const MERGES: &[(&str, &str)] = &[("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r")];
const SPECIAL_TOKENS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// The vocabulary without filler tokens: byte symbols, merges, special tokens.
pub const BASE_VOCAB_SIZE: usize = 256 + MERGES.len() + SPECIAL_TOKENS.len();

const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

impl SyntheticModel {
    /// Four layers, hidden 64, GQA with 4 query and 2 KV heads, Q8_0 weights.
    pub fn tiny() -> Self {
        Self {
            architecture: "llama".into(),
            layers: 4,
            hidden: 64,
            heads: 4,
            kv_heads: 2,
            feed_forward: 128,
            context_length: 256,
            vocab_size: BASE_VOCAB_SIZE,
            dtype: GgmlDType::Q8_0,
            matrix_types: Vec::new(),
            fill: WeightFill::Quantized,
            untied_head: false,
            qkv_bias: false,
            rope_freqs: false,
            key_length: None,
            sliding_window: None,
            final_logit_softcap: None,
            rope_dims: None,
            moe: None,
            seed: 7,
        }
    }

    /// [`Self::tiny`] as Qwen3: Q/K norms, NeoX RoPE, a head size (32) that is not
    /// hidden / heads.
    pub fn qwen3_tiny() -> Self {
        Self { architecture: "qwen3".into(), key_length: Some(32), seed: 8, ..Self::tiny() }
    }

    /// Six layers of Qwen3-MoE: 8 experts of feed-forward 32, 2 used per token,
    /// softmax routing renormalised.
    pub fn qwen3_moe_tiny() -> Self {
        Self {
            architecture: "qwen3moe".into(),
            layers: 6,
            key_length: Some(32),
            moe: Some(SyntheticMoe {
                experts: 8,
                used: 2,
                expert_feed_forward: 32,
                shared_feed_forward: None,
                leading_dense: 0,
                sigmoid: false,
                selection_bias: false,
                groups: (1, 1),
                weights_scale: 1.0,
                nextn_layers: 0,
            }),
            seed: 10,
            ..Self::tiny()
        }
    }

    /// Six layers of GLM-4.5: q/k/v biases, RoPE over half of each head, one dense
    /// layer first, then 8 experts (2 used) in 4 groups of which 2 are chosen from,
    /// a sigmoid router with a selection bias, weights scaled by 2.5, a shared
    /// expert; and a multi-token-prediction layer at the end, to be skipped.
    pub fn glm4_moe_tiny() -> Self {
        Self {
            architecture: "glm4moe".into(),
            layers: 6,
            key_length: Some(32),
            qkv_bias: true,
            rope_dims: Some(16),
            moe: Some(SyntheticMoe {
                experts: 8,
                used: 2,
                expert_feed_forward: 32,
                shared_feed_forward: Some(32),
                leading_dense: 1,
                sigmoid: true,
                selection_bias: true,
                groups: (4, 2),
                weights_scale: 2.5,
                nextn_layers: 1,
            }),
            seed: 11,
            ..Self::tiny()
        }
    }

    /// Qwen3-30B-A3B's routing (128 experts, 8 per token, softmax) on tiny widths.
    pub fn qwen3_30b_a3b_shaped() -> Self {
        let base = Self::qwen3_moe_tiny();
        Self {
            moe: base.moe.clone().map(|m| SyntheticMoe { experts: 128, used: 8, expert_feed_forward: 32, ..m }),
            seed: 12,
            ..base
        }
    }

    /// GLM-4.5-Air's routing (128 experts, 8 per token, one shared expert, a sigmoid
    /// router with a selection bias, one leading dense layer, one prediction layer)
    /// on tiny widths.
    pub fn glm_4_5_air_shaped() -> Self {
        let base = Self::glm4_moe_tiny();
        Self {
            moe: base.moe.clone().map(|m| SyntheticMoe {
                experts: 128,
                used: 8,
                expert_feed_forward: 32,
                shared_feed_forward: Some(32),
                groups: (1, 1),
                weights_scale: 1.0,
                ..m
            }),
            seed: 13,
            ..base
        }
    }

    /// Six layers shaped like Gemma 3: one KV head of size 32, Q/K norms and
    /// post-norms, a GELU FFN, a window of 3 positions on layers 0–4 (layer 5 is
    /// global) and soft-capped logits.
    pub fn gemma3_tiny() -> Self {
        Self {
            architecture: "gemma3".into(),
            layers: 6,
            kv_heads: 1,
            key_length: Some(32),
            sliding_window: Some(3),
            final_logit_softcap: Some(30.0),
            seed: 9,
            ..Self::tiny()
        }
    }

    /// `layers` layers of a model shaped like Llama 3 70B: hidden 8192, 64 query and
    /// 8 KV heads, feed-forward 28672, a 128256-token vocabulary, an untied head, all
    /// matrices Q4_0 (drawn as blocks). About 0.48 GB a layer, plus 0.59 GB each for
    /// the embedding and the head: 2.6 GB with 3 layers.
    pub fn seventy_b_shaped(layers: usize) -> Self {
        Self {
            architecture: "llama".into(),
            layers,
            hidden: 8192,
            heads: 64,
            kv_heads: 8,
            feed_forward: 28672,
            context_length: 8192,
            vocab_size: 128_256,
            dtype: GgmlDType::Q4_0,
            matrix_types: Vec::new(),
            fill: WeightFill::Blocks,
            untied_head: true,
            qkv_bias: false,
            rope_freqs: false,
            key_length: None,
            sliding_window: None,
            final_logit_softcap: None,
            rope_dims: None,
            moe: None,
            seed: 70,
        }
    }

    /// `layers` layers shaped like Llama 3 8B (hidden 4096, 32 query and 8 KV heads,
    /// feed-forward 14336, a 128256-token vocabulary, an untied head) in the mix of
    /// types a Q4_K_M file has, drawn as blocks: Q4_K for most matrices, Q8_0 for
    /// `attn_v` and `ffn_down` (Q6_K in the real file), a Q4_0 embedding. About
    /// 154 MB a layer and 295 MB each for the embedding and the head: 1.8 GB with 8
    /// layers.
    pub fn eight_b_shaped(layers: usize) -> Self {
        Self {
            hidden: 4096,
            heads: 32,
            kv_heads: 8,
            feed_forward: 14336,
            dtype: GgmlDType::Q4K,
            matrix_types: vec![
                ("attn_v", GgmlDType::Q8_0),
                ("ffn_down", GgmlDType::Q8_0),
                ("token_embd", GgmlDType::Q4_0),
            ],
            seed: 8,
            ..Self::seventy_b_shaped(layers)
        }
    }

    /// The shape in one line, for reports: `8 layers, hidden 4096, 32 heads (8 KV),
    /// feed-forward 14336, vocabulary 128256, Q4K (Q8_0 attn_v, ...)`.
    pub fn describe(&self) -> String {
        let mixed: Vec<String> = self.matrix_types.iter().map(|(role, t)| format!("{t:?} {role}")).collect();
        format!(
            "{} layers, hidden {}, {} heads ({} KV), feed-forward {}, vocabulary {}, {:?}{}",
            self.layers,
            self.hidden,
            self.heads,
            self.kv_heads,
            self.feed_forward,
            self.vocab_size,
            self.dtype,
            if mixed.is_empty() { String::new() } else { format!(" ({})", mixed.join(", ")) }
        )
    }

    /// The type of the matrices of `role` (`attn_q`, `token_embd`, ...).
    fn type_of(&self, role: &str) -> GgmlDType {
        self.matrix_types.iter().find(|(r, _)| *r == role).map_or(self.dtype, |&(_, t)| t)
    }

    pub fn head_dim(&self) -> usize {
        self.key_length.unwrap_or(self.hidden / self.heads)
    }

    fn architecture(&self) -> Option<Architecture> {
        Architecture::parse(&self.architecture).ok()
    }

    /// The vocabulary: GPT-2 byte symbols, then merges, then special tokens, then
    /// fillers up to `vocab_size`. A filler (`<filler123>`) is an ordinary token that
    /// no merge builds, so encoding never produces one; a model that generates one
    /// shows its text.
    pub fn vocabulary(&self) -> Vec<String> {
        let mut tokens: Vec<String> = byte_symbols().into_iter().map(String::from).collect();
        tokens.extend(MERGES.iter().map(|(a, b)| format!("{a}{b}")));
        tokens.extend(SPECIAL_TOKENS.iter().map(|s| s.to_string()));
        let fillers = tokens.len()..self.vocab_size.max(tokens.len());
        tokens.extend(fillers.map(|i| format!("<filler{i}>")));
        tokens
    }

    /// Writes `model.gguf` into `dir` and returns its path.
    pub fn write_to(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join(format!("synthetic-{}-{}.gguf", self.architecture, self.seed));
        self.write(&path)?;
        Ok(path)
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        if self.vocab_size < BASE_VOCAB_SIZE {
            return Err(Error::InvalidModel(format!(
                "a synthetic vocabulary has at least {BASE_VOCAB_SIZE} tokens, not {}",
                self.vocab_size
            )));
        }
        let tensors = self.tensors()?;
        let metadata = self.metadata();
        let md_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let file = File::create(path).map_err(|source| Error::Open { path: path.to_path_buf(), source })?;
        let mut w = BufWriter::new(file);
        gguf_file::write(&mut w, &md_refs, &t_refs)?;
        Ok(())
    }

    fn metadata(&self) -> Vec<(String, Value)> {
        let a = &self.architecture;
        let tokens = self.vocabulary();
        let special_start = BASE_VOCAB_SIZE - SPECIAL_TOKENS.len();
        let specials = special_start..BASE_VOCAB_SIZE;
        let token_types: Vec<Value> =
            (0..tokens.len()).map(|i| Value::I32(if specials.contains(&i) { 3 } else { 1 })).collect();
        let u32v = |x: usize| Value::U32(x as u32);
        let mut optional = Vec::new();
        if let Some(k) = self.key_length {
            optional.push((format!("{a}.attention.key_length"), u32v(k)));
            optional.push((format!("{a}.attention.value_length"), u32v(k)));
        }
        if let Some(w) = self.sliding_window {
            optional.push((format!("{a}.attention.sliding_window"), u32v(w)));
        }
        if let Some(cap) = self.final_logit_softcap {
            optional.push((format!("{a}.final_logit_softcapping"), Value::F32(cap)));
        }
        if let Some(d) = self.rope_dims {
            optional.push((format!("{a}.rope.dimension_count"), u32v(d)));
        }
        if let Some(m) = &self.moe {
            optional.extend([
                (format!("{a}.expert_count"), u32v(m.experts)),
                (format!("{a}.expert_used_count"), u32v(m.used)),
                (format!("{a}.expert_feed_forward_length"), u32v(m.expert_feed_forward)),
                (format!("{a}.expert_gating_func"), u32v(if m.sigmoid { 2 } else { 1 })),
                (format!("{a}.expert_weights_norm"), Value::Bool(true)),
                (format!("{a}.expert_weights_scale"), Value::F32(m.weights_scale)),
                (format!("{a}.expert_group_count"), u32v(m.groups.0)),
                (format!("{a}.expert_group_used_count"), u32v(m.groups.1)),
                (format!("{a}.leading_dense_block_count"), u32v(m.leading_dense)),
                (format!("{a}.nextn_predict_layers"), u32v(m.nextn_layers)),
            ]);
            if let Some(ff) = m.shared_feed_forward {
                optional.push((format!("{a}.expert_shared_count"), u32v(1)));
                optional.push((format!("{a}.expert_shared_feed_forward_length"), u32v(ff)));
            }
        }
        let mut metadata = vec![
            ("general.architecture".into(), Value::String(a.clone())),
            ("general.name".into(), Value::String("synthetic".into())),
            (format!("{a}.block_count"), u32v(self.layers + self.moe.as_ref().map_or(0, |m| m.nextn_layers))),
            (format!("{a}.embedding_length"), u32v(self.hidden)),
            (format!("{a}.feed_forward_length"), u32v(self.feed_forward)),
            (format!("{a}.attention.head_count"), u32v(self.heads)),
            (format!("{a}.attention.head_count_kv"), u32v(self.kv_heads)),
            (format!("{a}.rope.freq_base"), Value::F32(10_000.0)),
            (format!("{a}.attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
            (format!("{a}.context_length"), u32v(self.context_length)),
            ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
            ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
            ("tokenizer.ggml.tokens".into(), Value::Array(tokens.into_iter().map(Value::String).collect())),
            ("tokenizer.ggml.token_type".into(), Value::Array(token_types)),
            (
                "tokenizer.ggml.merges".into(),
                Value::Array(MERGES.iter().map(|(x, y)| Value::String(format!("{x} {y}"))).collect()),
            ),
            ("tokenizer.ggml.bos_token_id".into(), u32v(special_start + 1)),
            ("tokenizer.ggml.eos_token_id".into(), u32v(special_start + 2)),
            ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
            ("tokenizer.chat_template".into(), Value::String(CHATML_TEMPLATE.into())),
        ];
        metadata.extend(optional);
        metadata
    }

    fn tensors(&self) -> Result<Vec<(String, QTensor)>> {
        let mut rng = StdRng::seed_from_u64(self.seed);
        let dev = Device::Cpu;
        let vocab = self.vocab_size;
        let (h, q, kv) = (self.hidden, self.heads * self.head_dim(), self.kv_heads * self.head_dim());
        let fill = self.fill;
        let mut out = Vec::new();
        let mut matrix = |rng: &mut StdRng, name: String, rows: usize, cols: usize, dtype: GgmlDType| -> Result<()> {
            let t = match fill {
                WeightFill::Quantized => {
                    let scale = 1.0 / (cols as f32).sqrt();
                    let data: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-scale..scale) * 1.7).collect();
                    QTensor::quantize(&Tensor::from_vec(data, (rows, cols), &dev)?, dtype)?
                }
                WeightFill::Blocks => random_blocks(rng, rows, cols, dtype)?,
            };
            out.push((name, t));
            Ok(())
        };
        matrix(&mut rng, "token_embd.weight".into(), vocab, h, self.type_of("token_embd"))?;
        let all_layers = self.layers + self.moe.as_ref().map_or(0, |m| m.nextn_layers);
        let mut expert_tensors = Vec::new();
        for l in 0..all_layers {
            let p = format!("blk.{l}");
            matrix(&mut rng, format!("{p}.attn_q.weight"), q, h, self.type_of("attn_q"))?;
            matrix(&mut rng, format!("{p}.attn_k.weight"), kv, h, self.type_of("attn_k"))?;
            matrix(&mut rng, format!("{p}.attn_v.weight"), kv, h, self.type_of("attn_v"))?;
            matrix(&mut rng, format!("{p}.attn_output.weight"), h, q, self.type_of("attn_output"))?;
            match &self.moe {
                Some(m) if l >= m.leading_dense => {
                    let ff = m.expert_feed_forward;
                    // Experts stacked: [experts, rows, cols].
                    let mut experts = |rng: &mut StdRng, name: String, rows: usize, cols: usize| -> Result<()> {
                        let scale = 1.0 / (cols as f32).sqrt();
                        let data: Vec<f32> =
                            (0..m.experts * rows * cols).map(|_| rng.random_range(-scale..scale) * 1.7).collect();
                        let t = Tensor::from_vec(data, (m.experts, rows, cols), &dev)?;
                        expert_tensors.push((name, QTensor::quantize(&t, self.dtype)?));
                        Ok(())
                    };
                    experts(&mut rng, format!("{p}.ffn_gate_exps.weight"), ff, h)?;
                    experts(&mut rng, format!("{p}.ffn_up_exps.weight"), ff, h)?;
                    experts(&mut rng, format!("{p}.ffn_down_exps.weight"), h, ff)?;
                    // Routers stay f32 in real files.
                    let router: Vec<f32> = (0..m.experts * h).map(|_| rng.random_range(-1.0..1.0f32)).collect();
                    let router = Tensor::from_vec(router, (m.experts, h), &dev)?;
                    expert_tensors
                        .push((format!("{p}.ffn_gate_inp.weight"), QTensor::quantize(&router, GgmlDType::F32)?));
                    if let Some(sff) = m.shared_feed_forward {
                        matrix(&mut rng, format!("{p}.ffn_gate_shexp.weight"), sff, h, self.dtype)?;
                        matrix(&mut rng, format!("{p}.ffn_up_shexp.weight"), sff, h, self.dtype)?;
                        matrix(&mut rng, format!("{p}.ffn_down_shexp.weight"), h, sff, self.dtype)?;
                    }
                }
                _ => {
                    let ff = self.feed_forward;
                    matrix(&mut rng, format!("{p}.ffn_gate.weight"), ff, h, self.type_of("ffn_gate"))?;
                    matrix(&mut rng, format!("{p}.ffn_up.weight"), ff, h, self.type_of("ffn_up"))?;
                    matrix(&mut rng, format!("{p}.ffn_down.weight"), h, ff, self.type_of("ffn_down"))?;
                }
            }
        }
        if self.untied_head {
            matrix(&mut rng, "output.weight".into(), vocab, h, self.type_of("output"))?;
        }
        out.extend(expert_tensors);
        let mut vector = |name: String, len: usize, base: f32, spread: f32| -> Result<()> {
            let data: Vec<f32> = (0..len).map(|_| base + rng.random_range(-spread..=spread)).collect();
            let t = Tensor::from_vec(data, len, &dev)?;
            out.push((name, QTensor::quantize(&t, GgmlDType::F32)?));
            Ok(())
        };
        for l in 0..all_layers {
            if let Some(m) = self.moe.as_ref().filter(|m| m.selection_bias && l >= m.leading_dense) {
                vector(format!("blk.{l}.exp_probs_b.bias"), m.experts, 0.0, 0.3)?;
            }
            vector(format!("blk.{l}.attn_norm.weight"), h, 1.0, 0.1)?;
            let ffn_norm = self.architecture().map_or("ffn_norm", Architecture::ffn_norm_name);
            vector(format!("blk.{l}.{ffn_norm}.weight"), h, 1.0, 0.1)?;
            let arch = self.architecture();
            if arch.is_some_and(Architecture::has_qk_norm) {
                vector(format!("blk.{l}.attn_q_norm.weight"), self.head_dim(), 1.0, 0.1)?;
                vector(format!("blk.{l}.attn_k_norm.weight"), self.head_dim(), 1.0, 0.1)?;
            }
            if arch.is_some_and(Architecture::has_post_norms) {
                vector(format!("blk.{l}.post_attention_norm.weight"), h, 1.0, 0.1)?;
                vector(format!("blk.{l}.post_ffw_norm.weight"), h, 1.0, 0.1)?;
            }
            if self.qkv_bias {
                vector(format!("blk.{l}.attn_q.bias"), q, 0.0, 0.1)?;
                vector(format!("blk.{l}.attn_k.bias"), kv, 0.0, 0.1)?;
                vector(format!("blk.{l}.attn_v.bias"), kv, 0.0, 0.1)?;
            }
        }
        vector("output_norm.weight".into(), h, 1.0, 0.1)?;
        if self.rope_freqs {
            vector("rope_freqs.weight".into(), self.head_dim() / 2, 2.0, 1.0)?;
        }
        Ok(out)
    }
}

/// A `[rows, cols]` matrix of random blocks (see [`WeightFill::Blocks`]) whose
/// values have the spread of [`WeightFill::Quantized`]'s, 0.98/√cols.
fn random_blocks(rng: &mut StdRng, rows: usize, cols: usize, dtype: GgmlDType) -> Result<QTensor> {
    let layout = RandomBlock::of(dtype).filter(|b| cols.is_multiple_of(b.values)).ok_or_else(|| {
        Error::InvalidModel(format!(
            "block-filled synthetic weights are Q4_0, Q8_0 or Q4_K with whole blocks in a row, not {dtype:?} with {cols} columns"
        ))
    })?;
    let header = layout.header(1.7 / 3f32.sqrt() / (cols as f32).sqrt());
    // StdRng (ChaCha) makes a few hundred MB/s here; SplitMix64, seeded from it,
    // makes the 2.6 GB of a 3-layer 70B shape in about a second.
    let mut codes = SplitMix64(rng.next_u64());
    let mut data = vec![0u8; rows * cols / layout.values * layout.bytes];
    for block in data.chunks_exact_mut(layout.bytes) {
        block[..header.len()].copy_from_slice(&header);
        for word in block[header.len()..].chunks_exact_mut(8) {
            word.copy_from_slice(&(layout.symmetric)(codes.next()).to_le_bytes());
        }
    }
    let storage = QStorage::from_data(std::borrow::Cow::Owned(data), &Device::Cpu, dtype)?;
    Ok(QTensor::new(storage, (rows, cols))?)
}

/// How [`random_blocks`] fills the blocks of one type: a header that scales the
/// codes, then random code bytes.
struct RandomBlock {
    dtype: GgmlDType,
    /// Values and bytes in a block.
    values: usize,
    bytes: usize,
    /// Root mean square of the values the codes stand for, before the scale.
    code_rms: f32,
    /// Makes 8 random code bytes symmetric around 0.
    symmetric: fn(u64) -> u64,
}

impl RandomBlock {
    fn of(dtype: GgmlDType) -> Option<Self> {
        let (values, bytes, code_rms, symmetric): (usize, usize, f32, fn(u64) -> u64) = match dtype {
            // Codes −7..=7 stored +8, 0 twice as likely: √(2·(1²+…+7²)/16).
            GgmlDType::Q4_0 => (32, 18, 4.1833, no_zero_nibble),
            // −127..=127, 0 twice as likely: √(2·(1²+…+127²)/256).
            GgmlDType::Q8_0 => (32, 34, 73.468, no_minus_128),
            // 4-bit codes q under sub-block scale 2 and min 15 with dmin = d: the
            // value is d·(2q − 15), odd numbers −15..=15: 2·√((16² − 1)/12).
            GgmlDType::Q4K => (256, 144, 9.2195, |x| x),
            _ => return None,
        };
        Some(Self { dtype, values, bytes, code_rms, symmetric })
    }

    /// The bytes before the codes, for values of root mean square `rms`.
    fn header(&self, rms: f32) -> Vec<u8> {
        let d = half::f16::from_f32(rms / self.code_rms).to_le_bytes();
        match self.dtype {
            // d, dmin = d, then eight 6-bit scales and mins packed as ggml's
            // `get_scale_min_k4` reads them: sub-blocks 0–3 in bytes 0–7, 4–7 in
            // the low and high nibbles of bytes 8–11.
            GgmlDType::Q4K => [&d[..], &d[..], &[2u8, 2, 2, 2, 15, 15, 15, 15, 0xf2, 0xf2, 0xf2, 0xf2][..]].concat(),
            _ => d.to_vec(),
        }
    }
}

/// `x` with every 0x80 byte (the code −128) made 0.
fn no_minus_128(x: u64) -> u64 {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    // Bytes of `y` are 0 exactly where `x` has 0x80; the high bit of `zero` marks them.
    let y = x ^ 0x8080_8080_8080_8080;
    let zero = !(((y & LOW7) + LOW7) | y | LOW7);
    x & !zero
}

/// `x` with every 0 nibble (the code −8) made 8 (the code 0).
fn no_zero_nibble(x: u64) -> u64 {
    let z = !x;
    // Bit 0 of each nibble is set where all four of its bits are 0 in `x`.
    let zero = z & (z >> 1) & (z >> 2) & (z >> 3) & 0x1111_1111_1111_1111;
    x | (zero << 3)
}

/// Steele, Lea and Flood's SplitMix64: fast, and the same numbers on every platform
/// and `rand` version.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// The 256 printable symbols GPT-2's byte-level BPE uses for raw bytes.
fn byte_symbols() -> Vec<char> {
    let mut printable: Vec<u32> = ('!' as u32..='~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut symbols: Vec<u32> = printable.clone();
    let mut extra = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            symbols.push(256 + extra);
            extra += 1;
        }
    }
    let mut pairs: Vec<(u32, u32)> = printable.into_iter().zip(symbols).collect();
    pairs.sort_unstable();
    pairs.into_iter().filter_map(|(_, s)| char::from_u32(s)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage::{StageInput, StageOptions, StageOutput, StageStep};
    use crate::{Generator, ModelFile, SamplingParams, Stage, Tokenizer};

    fn write(spec: &SyntheticModel) -> (tempfile::TempDir, ModelFile) {
        let dir = tempfile::tempdir().unwrap();
        let file = ModelFile::open(spec.write_to(dir.path()).unwrap()).unwrap();
        (dir, file)
    }

    #[test]
    fn a_padded_vocabulary_tokenizes_as_the_small_one_and_decodes_its_fillers() {
        let (_dir, small) = write(&SyntheticModel::tiny());
        let (_dir2, padded) = write(&SyntheticModel { vocab_size: 1000, ..SyntheticModel::tiny() });
        let small = Tokenizer::from_gguf(small.metadata()).unwrap();
        let tok = Tokenizer::from_gguf(padded.metadata()).unwrap();
        assert_eq!(tok.vocab_size(), 1000);
        assert_eq!(padded.info().vocab_size, 1000);
        // Fillers come after the special tokens, so every id below them is unchanged,
        // and no merge builds a filler: encoding never produces one.
        for text in ["The capital of France is", "<|im_start|>user\nin the winter<|im_end|>", "<filler500>"] {
            assert_eq!(tok.encode(text).unwrap(), small.encode(text).unwrap(), "{text}");
        }
        assert_eq!(tok.decode(&[500]).unwrap(), "<filler500>");
        assert!(!tok.is_control(500));
        assert_eq!(tok.eos_tokens(), small.eos_tokens());
    }

    #[test]
    fn a_vocabulary_smaller_than_the_base_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let spec = SyntheticModel { vocab_size: BASE_VOCAB_SIZE - 1, ..SyntheticModel::tiny() };
        assert!(spec.write_to(dir.path()).is_err());
    }

    #[test]
    fn block_filled_weights_are_centred_with_the_spread_of_quantized_ones() {
        let cols = 8192;
        let mut rng = StdRng::seed_from_u64(1);
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q8_0, GgmlDType::Q4K] {
            let t = random_blocks(&mut rng, 16, cols, dtype).unwrap();
            let values: Vec<f32> = t.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let n = values.len() as f64;
            let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
            let rms = (values.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n).sqrt();
            let want = 1.7 / 3f64.sqrt() / (cols as f64).sqrt();
            assert!((rms / want - 1.0).abs() < 0.02, "{dtype:?}: rms {rms}, want {want}");
            assert!(mean.abs() < 0.01 * want, "{dtype:?}: mean {mean}");
        }
        assert!(random_blocks(&mut rng, 16, cols, GgmlDType::Q6K).is_err());
        assert!(random_blocks(&mut rng, 16, 4096 + 32, GgmlDType::Q4K).is_err(), "not whole superblocks");
    }

    #[test]
    fn the_code_minus_128_becomes_0_and_others_stay() {
        for x in [0u64, u64::MAX, 0x8080_8080_8080_8080, 0x7f80_0181_80ff_0080] {
            let y = no_minus_128(x);
            for i in 0..8 {
                let (a, b) = ((x >> (8 * i)) & 0xff, (y >> (8 * i)) & 0xff);
                assert_eq!(b, if a == 0x80 { 0 } else { a }, "{x:#x} byte {i}");
            }
        }
    }

    #[test]
    fn zero_nibbles_become_eight_and_others_stay() {
        for x in [0u64, u64::MAX, 0x0123_4567_89ab_cdef, 0xf0f0_0f0f_1000_0001] {
            let y = no_zero_nibble(x);
            for i in 0..16 {
                let (a, b) = ((x >> (4 * i)) & 0xf, (y >> (4 * i)) & 0xf);
                assert_eq!(b, if a == 0 { 8 } else { a }, "{x:#x} nibble {i}");
            }
        }
    }

    #[test]
    fn a_block_filled_model_generates_from_finite_logits() {
        // The type mix of the 8B shape, on tiny widths (Q4_K needs rows of 256).
        let spec =
            SyntheticModel { hidden: 256, feed_forward: 512, vocab_size: 2000, ..SyntheticModel::eight_b_shaped(2) };
        let (_dir, file) = write(&spec);
        let mut stage = Stage::load(&file, 0..spec.layers, &Device::Cpu, StageOptions::default()).unwrap();
        let step = StageStep { seq: 1, position: 0, input: StageInput::Tokens(vec![5, 80, 120, 33]) };
        let Some(StageOutput::Logits(logits)) = stage.forward(&[step]).unwrap().pop() else { panic!("no logits") };
        let logits: Vec<f32> = logits.to_vec1().unwrap();
        assert_eq!(logits.len(), 2000);
        assert!(logits.iter().all(|l| l.is_finite()), "{logits:?}");
        let mut generator = Generator::load(&file, &Device::Cpu, StageOptions::default()).unwrap();
        let tokens = generator.generate(&[5, 80, 120, 33], 8, &SamplingParams::greedy(), |_, _| true).unwrap().tokens;
        assert!(!tokens.is_empty() && tokens.iter().all(|&t| (t as usize) < 2000), "{tokens:?}");
    }
}
