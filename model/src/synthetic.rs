//! Tiny random-weight GGUF models that tests write for themselves, and where the
//! tests that need the real model find it.
//!
//! They have the real file layout (names, metadata keys, quantized types, a byte-level
//! BPE vocabulary and a chat template), so every code path that reads a real model
//! runs on them in milliseconds.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

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
    /// Type of the big matrices; norms stay f32 as in real files.
    pub dtype: GgmlDType,
    /// Write an `output.weight` instead of tying the head to the embedding.
    pub untied_head: bool,
    /// Add q/k/v biases (what `qwen2` files have).
    pub qkv_bias: bool,
    /// Write a `rope_freqs.weight` tensor (Llama 3.1 style scaling).
    pub rope_freqs: bool,
    pub seed: u64,
}

/// Extra merges on top of the 256 byte tokens, so BPE has something to merge.
const MERGES: &[(&str, &str)] = &[("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r")];
const SPECIAL_TOKENS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

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
            dtype: GgmlDType::Q8_0,
            untied_head: false,
            qkv_bias: false,
            rope_freqs: false,
            seed: 7,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// The vocabulary: GPT-2 byte symbols, then merges, then special tokens.
    pub fn vocabulary() -> Vec<String> {
        let mut tokens: Vec<String> = byte_symbols().into_iter().map(String::from).collect();
        tokens.extend(MERGES.iter().map(|(a, b)| format!("{a}{b}")));
        tokens.extend(SPECIAL_TOKENS.iter().map(|s| s.to_string()));
        tokens
    }

    pub fn vocab_size() -> usize {
        Self::vocabulary().len()
    }

    /// Writes `model.gguf` into `dir` and returns its path.
    pub fn write_to(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join(format!("synthetic-{}-{}.gguf", self.architecture, self.seed));
        self.write(&path)?;
        Ok(path)
    }

    pub fn write(&self, path: &Path) -> Result<()> {
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
        let tokens = Self::vocabulary();
        let special_start = tokens.len() - SPECIAL_TOKENS.len();
        let token_types: Vec<Value> =
            (0..tokens.len()).map(|i| Value::I32(if i >= special_start { 3 } else { 1 })).collect();
        let u32v = |x: usize| Value::U32(x as u32);
        vec![
            ("general.architecture".into(), Value::String(a.clone())),
            ("general.name".into(), Value::String("synthetic".into())),
            (format!("{a}.block_count"), u32v(self.layers)),
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
        ]
    }

    fn tensors(&self) -> Result<Vec<(String, QTensor)>> {
        let mut rng = StdRng::seed_from_u64(self.seed);
        let dev = Device::Cpu;
        let vocab = Self::vocab_size();
        let (h, kv) = (self.hidden, self.kv_heads * self.head_dim());
        let mut out = Vec::new();
        let mut matrix = |rng: &mut StdRng, name: String, rows: usize, cols: usize, dtype: GgmlDType| -> Result<()> {
            let scale = 1.0 / (cols as f32).sqrt();
            let data: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-scale..scale) * 1.7).collect();
            let t = Tensor::from_vec(data, (rows, cols), &dev)?;
            out.push((name, QTensor::quantize(&t, dtype)?));
            Ok(())
        };
        matrix(&mut rng, "token_embd.weight".into(), vocab, h, self.dtype)?;
        for l in 0..self.layers {
            let p = format!("blk.{l}");
            matrix(&mut rng, format!("{p}.attn_q.weight"), h, h, self.dtype)?;
            matrix(&mut rng, format!("{p}.attn_k.weight"), kv, h, self.dtype)?;
            matrix(&mut rng, format!("{p}.attn_v.weight"), kv, h, self.dtype)?;
            matrix(&mut rng, format!("{p}.attn_output.weight"), h, h, self.dtype)?;
            matrix(&mut rng, format!("{p}.ffn_gate.weight"), self.feed_forward, h, self.dtype)?;
            matrix(&mut rng, format!("{p}.ffn_up.weight"), self.feed_forward, h, self.dtype)?;
            matrix(&mut rng, format!("{p}.ffn_down.weight"), h, self.feed_forward, self.dtype)?;
        }
        if self.untied_head {
            matrix(&mut rng, "output.weight".into(), vocab, h, self.dtype)?;
        }
        let mut vector = |name: String, len: usize, base: f32, spread: f32| -> Result<()> {
            let data: Vec<f32> = (0..len).map(|_| base + rng.random_range(-spread..=spread)).collect();
            let t = Tensor::from_vec(data, len, &dev)?;
            out.push((name, QTensor::quantize(&t, GgmlDType::F32)?));
            Ok(())
        };
        for l in 0..self.layers {
            vector(format!("blk.{l}.attn_norm.weight"), h, 1.0, 0.1)?;
            vector(format!("blk.{l}.ffn_norm.weight"), h, 1.0, 0.1)?;
            if self.qkv_bias {
                vector(format!("blk.{l}.attn_q.bias"), h, 0.0, 0.1)?;
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
