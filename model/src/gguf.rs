//! Reading a GGUF file's header: the architecture, its hyper-parameters and the byte
//! size of every tensor, without loading any weights.
//!
//! Planners size stages from [`TensorSizes`]; a [`crate::Stage`] later seeks to just
//! the tensors of its layers.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;

use crate::error::{Error, Result};

/// The model families this runtime computes. Mistral and SmolLM files say `llama`.
///
/// They share one transformer block (`layer.rs`); what differs between them is
/// answered by the methods below, so a family is a handful of answers rather than a
/// copy of the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    /// Llama with biases on the q/k/v projections and NeoX-style (half-split) RoPE.
    Qwen2,
    /// Qwen2 without the biases, with an RMS norm on each query and key head.
    Qwen3,
    /// Gemma 3: scaled embeddings, norms after attention and the FFN as well as
    /// before, Q/K norms, a GELU FFN, and sliding-window attention on most layers.
    Gemma3,
    /// Qwen3 whose FFNs are mixtures of experts (softmax router, top-k renormalised).
    Qwen3Moe,
    /// GLM-4.5: q/k/v biases, partial RoPE, leading dense layers, then mixtures of
    /// experts with a sigmoid router, a selection bias and a shared expert; the
    /// multi-token-prediction layers at the end are skipped.
    Glm4Moe,
}

/// The nonlinearity of the gated feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU: `silu(gate) * up`.
    Silu,
    /// GeGLU with GELU's tanh approximation: `gelu(gate) * up`.
    GeluTanh,
}

impl Architecture {
    pub(crate) fn parse(name: &str) -> Result<Self> {
        match name {
            "llama" => Ok(Self::Llama),
            "qwen2" => Ok(Self::Qwen2),
            "qwen3" => Ok(Self::Qwen3),
            "gemma3" => Ok(Self::Gemma3),
            "qwen3moe" => Ok(Self::Qwen3Moe),
            "glm4moe" => Ok(Self::Glm4Moe),
            other => Err(Error::UnsupportedArchitecture(other.to_string())),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Gemma3 => "gemma3",
            Self::Qwen3Moe => "qwen3moe",
            Self::Glm4Moe => "glm4moe",
        }
    }

    /// The q/k/v projections carry biases.
    pub fn has_qkv_bias(self) -> bool {
        matches!(self, Self::Qwen2 | Self::Glm4Moe)
    }

    /// RoPE rotates adjacent pairs of dimensions: llama.cpp's converter permutes
    /// Llama's q/k weights so. The others pair dimension `i` with `i + d/2` (NeoX).
    pub fn rope_pairs_adjacent(self) -> bool {
        self == Self::Llama
    }

    /// Every query and key head is RMS-normed (`attn_q_norm`, `attn_k_norm`) before RoPE.
    pub fn has_qk_norm(self) -> bool {
        matches!(self, Self::Qwen3 | Self::Gemma3 | Self::Qwen3Moe)
    }

    /// The attention and FFN outputs are RMS-normed again before the residual add
    /// (`post_attention_norm`, `post_ffw_norm`).
    pub fn has_post_norms(self) -> bool {
        self == Self::Gemma3
    }

    /// The tensor of the norm before the FFN: GLM-4.5 files call it
    /// `post_attention_norm` (it follows attention), the others `ffn_norm`.
    pub fn ffn_norm_name(self) -> &'static str {
        match self {
            Self::Glm4Moe => "post_attention_norm",
            _ => "ffn_norm",
        }
    }

    pub fn activation(self) -> Activation {
        match self {
            Self::Gemma3 => Activation::GeluTanh,
            _ => Activation::Silu,
        }
    }

    /// Token embeddings are multiplied by √hidden before the first layer.
    pub fn scales_embedding(self) -> bool {
        self == Self::Gemma3
    }
}

/// Sliding-window attention: the layers it applies to see only the last `size`
/// positions (their own included) and rotate with their own RoPE base.
#[derive(Debug, Clone, PartialEq)]
pub struct SlidingWindow {
    pub size: usize,
    pub rope_base: f32,
    /// One entry per layer: whether that layer slides.
    pub layers: Vec<bool>,
}

/// How a mixture-of-experts router turns its logits into expert weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gating {
    Softmax,
    Sigmoid,
}

/// The mixture-of-experts FFN of a model's MoE layers.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub experts: usize,
    /// Experts each token runs through.
    pub experts_used: usize,
    pub expert_feed_forward: usize,
    pub gating: Gating,
    /// The chosen experts' weights are divided by their sum.
    pub normalize_weights: bool,
    /// And then multiplied by this.
    pub weights_scale: f32,
    /// Group-limited routing: experts fall in `groups` equal groups, and only the
    /// `groups_used` groups with the best two scores each are chosen from.
    pub groups: usize,
    pub groups_used: usize,
    /// Layers before the first MoE layer that have an ordinary FFN.
    pub leading_dense: usize,
}

/// Gemma 3 files before llama.cpp wrote the pattern: 5 sliding layers, then a global one.
const GEMMA3_SLIDING_PERIOD: usize = 6;
/// Gemma 3 files before llama.cpp wrote `rope.freq_base_swa`.
const GEMMA3_LOCAL_ROPE_BASE: f32 = 10_000.0;

/// How positions are stretched beyond the training context.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by a factor (`rope.scaling.type = linear`).
    Linear(f32),
    /// Per-frequency divisors stored in the `rope_freqs.weight` tensor (Llama 3.1).
    FreqFactors,
}

/// The validated hyper-parameters of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    pub architecture: Architecture,
    pub name: Option<String>,
    pub layers: usize,
    pub hidden: usize,
    pub feed_forward: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rope_base: f32,
    pub rope_scaling: RopeScaling,
    pub norm_eps: f64,
    pub context_length: usize,
    pub vocab_size: usize,
    /// The file has no `output.weight`: the head reuses the token embedding.
    pub tied_embedding: bool,
    /// What attention scores are multiplied by: 1/√head_dim for most models.
    pub attention_scale: f32,
    /// Sliding-window attention, when some layers have it.
    pub sliding_window: Option<SlidingWindow>,
    /// Logits are squashed to `cap * tanh(logit / cap)`.
    pub final_logit_softcap: Option<f32>,
    /// Dimensions of each head that RoPE rotates (the first ones): `head_dim` unless
    /// the file says fewer (`rope.dimension_count`, GLM-4.5's partial rotary).
    pub rope_dims: usize,
    /// The mixture of experts, for MoE models.
    pub moe: Option<MoeConfig>,
    /// Multi-token-prediction layers after the `layers` (their tensors are ignored).
    pub skipped_layers: usize,
}

impl ModelInfo {
    /// Bytes of K and V cache one token takes in one layer at f32.
    pub fn kv_bytes_per_token_per_layer(&self) -> u64 {
        (2 * self.kv_heads * self.head_dim * std::mem::size_of::<f32>()) as u64
    }

    /// The window of `layer`, when it is a sliding-window layer.
    pub fn window_of(&self, layer: usize) -> Option<usize> {
        let w = self.sliding_window.as_ref()?;
        w.layers.get(layer).copied().unwrap_or(false).then_some(w.size)
    }
}

/// Byte sizes of the tensors, grouped the way stages are cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSizes {
    /// Bytes of every `blk.N.*` tensor of layer N.
    pub layers: Vec<u64>,
    pub embedding: u64,
    /// Final norm + output head (the embedding's size again when tied).
    pub head: u64,
    /// Tensors shared by every stage (`rope_freqs.weight`).
    pub shared: u64,
    /// The head is the embedding: a stage holding every layer holds it once.
    pub tied_head: bool,
    /// Of each layer's bytes, those of its routed experts (`*_exps`): all resident,
    /// but a token reads only the ones it is routed to. Zero for dense layers.
    pub layer_expert_bytes: Vec<u64>,
}

impl TensorSizes {
    /// Weight bytes a stage holding `layers` loads, counting the embedding on the
    /// first stage and the head on the last.
    pub fn stage_bytes(&self, layers: Range<usize>) -> u64 {
        let n = self.layers.len();
        let mut total: u64 = self.layers[layers.start.min(n)..layers.end.min(n)].iter().sum();
        total += self.shared;
        if layers.start == 0 {
            total += self.embedding;
        }
        if layers.end == n {
            total += self.head;
        }
        if self.tied_head && layers.start == 0 && layers.end == n {
            total -= self.embedding;
        }
        total
    }

    pub fn total(&self) -> u64 {
        self.stage_bytes(0..self.layers.len())
    }
}

/// An opened GGUF file: its header, parsed and validated. Weights stay on disk.
#[derive(Debug)]
pub struct ModelFile {
    path: PathBuf,
    content: Content,
    info: ModelInfo,
    sizes: TensorSizes,
}

const GGUF_MAGIC: &[u8; 4] = b"GGUF";

impl ModelFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| Error::Open { path: path.clone(), source })?;
        let file_len = file
            .metadata()
            .map_err(|source| Error::Open { path: path.clone(), source })?
            .len();
        let mut reader = BufReader::new(file);
        let mut magic = [0u8; 4];
        if reader.read_exact(&mut magic).is_err() || &magic != GGUF_MAGIC {
            return Err(Error::NotGguf { path });
        }
        let mut reader = reader.into_inner();
        std::io::Seek::rewind(&mut reader).map_err(|source| Error::Open { path: path.clone(), source })?;
        let mut reader = BufReader::new(reader);
        let content = Content::read(&mut reader).map_err(|e| header_error(&path, e))?;
        check_tensor_types(&content)?;
        // Before any size is computed from the tensor table.
        check_tensor_bounds(&path, &content, file_len)?;
        let info = read_info(&content)?;
        let sizes = tensor_sizes(&content, &info)?;
        Ok(Self { path, content, info, sizes })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn sizes(&self) -> &TensorSizes {
        &self.sizes
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.content.tensor_infos.keys().map(String::as_str)
    }

    /// Loads one tensor onto `device`, seeking straight to its bytes.
    pub fn load_tensor(&self, reader: &mut BufReader<File>, name: &str, device: &Device) -> Result<QTensor> {
        if !self.has_tensor(name) {
            return Err(Error::MissingTensor(name.to_string()));
        }
        self.content.tensor(reader, name, device).map_err(|e| Error::Corrupt {
            path: self.path.clone(),
            reason: format!("reading tensor `{name}`: {}", first_line(&e)),
        })
    }

    /// The GGUF type and shape (candle's order: `[rows, cols]` for a matrix) of a tensor.
    pub fn tensor_layout(&self, name: &str) -> Option<(GgmlDType, Vec<usize>)> {
        self.content.tensor_infos.get(name).map(|t| (t.ggml_dtype, t.shape.dims().to_vec()))
    }

    /// Hands a tensor's raw bytes to `each` in order, `chunk` bytes at a time (the
    /// last piece may be shorter), through one buffer of that size: a tensor need not
    /// be held whole to be repacked.
    pub fn stream_tensor(
        &self,
        reader: &mut BufReader<File>,
        name: &str,
        chunk: usize,
        mut each: impl FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        use std::io::{Seek, SeekFrom};
        let t = self.content.tensor_infos.get(name).ok_or_else(|| Error::MissingTensor(name.to_string()))?;
        let corrupt = |e: std::io::Error| Error::Corrupt {
            path: self.path.clone(),
            reason: format!("reading tensor `{name}`: {e}"),
        };
        let mut left = tensor_byte_len(&t.shape, t.ggml_dtype) as usize;
        reader.seek(SeekFrom::Start(self.content.tensor_data_offset + t.offset)).map_err(corrupt)?;
        let mut buf = vec![0u8; chunk.clamp(1, left.max(1))];
        while left > 0 {
            let n = buf.len().min(left);
            reader.read_exact(&mut buf[..n]).map_err(corrupt)?;
            each(&buf[..n])?;
            left -= n;
        }
        Ok(())
    }

    /// A reader positioned anywhere; [`Self::load_tensor`] seeks.
    pub fn reader(&self) -> Result<BufReader<File>> {
        let file = File::open(&self.path).map_err(|source| Error::Open { path: self.path.clone(), source })?;
        Ok(BufReader::new(file))
    }

    /// The GGUF type of a tensor, if the file has it.
    pub fn tensor_dtype(&self, name: &str) -> Option<GgmlDType> {
        self.content.tensor_infos.get(name).map(|t| t.ggml_dtype)
    }

    /// Metadata string, if present.
    pub fn metadata_str(&self, key: &str) -> Option<&str> {
        match self.content.metadata.get(key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }
}

/// candle appends a backtrace to some messages; users need only the first line.
fn first_line(e: &candle_core::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

/// Types that only exist as intermediates of a matmul; no stored weight may have them.
fn check_tensor_types(content: &Content) -> Result<()> {
    for (name, t) in &content.tensor_infos {
        if matches!(t.ggml_dtype, GgmlDType::Q8_1 | GgmlDType::Q8K) {
            return Err(Error::UnsupportedTensorType(format!(
                "tensor `{name}` has type {:?}, which this runtime cannot compute with",
                t.ggml_dtype
            )));
        }
    }
    Ok(())
}

fn header_error(path: &Path, e: candle_core::Error) -> Error {
    let msg = first_line(&e);
    if msg.contains("unknown dtype") {
        Error::UnsupportedTensorType(msg)
    } else if msg.contains("magic") {
        Error::NotGguf { path: path.to_path_buf() }
    } else {
        Error::Corrupt { path: path.to_path_buf(), reason: msg }
    }
}

/// A tensor's bytes in the file; 0 for a shape whose size overflows, which
/// [`check_tensor_bounds`] refuses before anything reads sizes.
fn tensor_byte_len(shape: &candle_core::Shape, dtype: GgmlDType) -> u64 {
    checked_byte_len(shape, dtype).unwrap_or(0)
}

/// Elements and bytes of a tensor, `None` when a damaged header's dimensions
/// multiply past what a u64 holds.
fn checked_elems(shape: &candle_core::Shape) -> Option<u64> {
    shape.dims().iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64))
}

fn checked_byte_len(shape: &candle_core::Shape, dtype: GgmlDType) -> Option<u64> {
    (checked_elems(shape)? / dtype.block_size() as u64).checked_mul(dtype.type_size() as u64)
}

fn check_tensor_bounds(path: &Path, content: &Content, file_len: u64) -> Result<()> {
    for (name, t) in &content.tensor_infos {
        let corrupt = |reason: String| Error::Corrupt { path: path.to_path_buf(), reason };
        let elems = checked_elems(&t.shape)
            .ok_or_else(|| corrupt(format!("tensor `{name}` has dimensions {:?} too large to hold", t.shape.dims())))?;
        if elems % t.ggml_dtype.block_size() as u64 != 0 {
            return Err(corrupt(format!("tensor `{name}` has {elems} elements, not a whole number of blocks")));
        }
        let end = checked_byte_len(&t.shape, t.ggml_dtype)
            .and_then(|len| content.tensor_data_offset.checked_add(t.offset)?.checked_add(len))
            .ok_or_else(|| corrupt(format!("tensor `{name}` lies past any file's end")))?;
        if end > file_len {
            return Err(Error::Corrupt {
                path: path.to_path_buf(),
                reason: format!("tensor `{name}` ends at byte {end} but the file has {file_len} bytes"),
            });
        }
    }
    Ok(())
}

struct Meta<'a> {
    md: &'a HashMap<String, Value>,
    arch: &'a str,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.md.get(&format!("{}.{key}", self.arch))
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.get(key)
            .and_then(value_as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| Error::Metadata { key: format!("{}.{key}", self.arch) })
    }

    fn bad(&self, key: &str) -> Error {
        Error::Metadata { key: format!("{}.{key}", self.arch) }
    }

    fn f32_or(&self, key: &str, default: f32) -> Result<f32> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => value_as_f64(v)
                .map(|v| v as f32)
                .ok_or_else(|| Error::Metadata { key: format!("{}.{key}", self.arch) }),
        }
    }
}

pub(crate) fn value_as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::U8(x) => Some(*x as u64),
        Value::U16(x) => Some(*x as u64),
        Value::U32(x) => Some(*x as u64),
        Value::U64(x) => Some(*x),
        Value::I8(x) => u64::try_from(*x).ok(),
        Value::I16(x) => u64::try_from(*x).ok(),
        Value::I32(x) => u64::try_from(*x).ok(),
        Value::I64(x) => u64::try_from(*x).ok(),
        _ => None,
    }
}

fn value_as_f64(v: &Value) -> Option<f64> {
    match v {
        Value::F32(x) => Some(*x as f64),
        Value::F64(x) => Some(*x),
        other => value_as_u64(other).map(|x| x as f64),
    }
}

fn read_info(content: &Content) -> Result<ModelInfo> {
    let md = &content.metadata;
    let arch_name = match md.get("general.architecture") {
        Some(Value::String(s)) => s.as_str(),
        _ => return Err(Error::Metadata { key: "general.architecture".into() }),
    };
    let architecture = Architecture::parse(arch_name)?;
    let m = Meta { md, arch: arch_name };
    // Multi-token-prediction layers (GLM-4.5) are counted in `block_count` but are
    // not part of generating the next token: they are left out.
    let nextn = m.get("nextn_predict_layers").and_then(value_as_u64).unwrap_or(0) as usize;
    let block_count = m.usize("block_count")?;
    // Every layer holds tensors of its own, so a count beyond the file's tensors is
    // damage; per-layer tables are sized from it (a damaged count of 4·10⁹ asked for
    // 33 GB and aborted the process).
    if block_count > content.tensor_infos.len() {
        return Err(Error::InvalidModel(format!(
            "{block_count} layers, but the file holds only {} tensors",
            content.tensor_infos.len()
        )));
    }
    let layers = block_count.saturating_sub(nextn);
    let hidden = m.usize("embedding_length")?;
    let heads = m.usize("attention.head_count")?;
    let kv_heads = match m.get("attention.head_count_kv") {
        Some(v) => value_as_u64(v).ok_or_else(|| Error::Metadata { key: format!("{arch_name}.attention.head_count_kv") })? as usize,
        None => heads,
    };
    if layers == 0 || hidden == 0 || heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
        return Err(Error::InvalidModel(format!(
            "inconsistent shape: {layers} layers, hidden {hidden}, {heads} heads, {kv_heads} kv heads"
        )));
    }
    let head_dim = match m.get("attention.key_length") {
        Some(v) => value_as_u64(v).map(|v| v as usize).unwrap_or(hidden / heads),
        None => hidden / heads,
    };
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(Error::InvalidModel(format!("head dimension {head_dim} must be even and positive")));
    }
    let feed_forward = m.usize("feed_forward_length")?;
    let rope_base = m.f32_or("rope.freq_base", 10_000.0)?;
    let norm_eps = m.f32_or("attention.layer_norm_rms_epsilon", 1e-5)? as f64;
    let context_length = m.usize("context_length").unwrap_or(4096);
    let rope_scaling = if content.tensor_infos.contains_key("rope_freqs.weight") {
        RopeScaling::FreqFactors
    } else {
        match (m.get("rope.scaling.type"), m.f32_or("rope.scaling.factor", 1.0)?) {
            (Some(Value::String(t)), f) if t == "linear" && f > 0.0 && f != 1.0 => RopeScaling::Linear(f),
            _ => RopeScaling::None,
        }
    };
    let vocab_size = vocab_size(content, hidden)?;
    let attention_scale = match architecture {
        // Gemma 3 27B scales by its hidden size per head (5376 / 32 = 168), not by its
        // head size (128), as Google's reference code does; llama.cpp tells it by its
        // 62 layers.
        Architecture::Gemma3 if layers == 62 => 1.0 / ((hidden / heads) as f32).sqrt(),
        _ => 1.0 / (head_dim as f32).sqrt(),
    };
    let sliding_window = sliding_window(&m, architecture, layers)?;
    let final_logit_softcap = match m.f32_or("final_logit_softcapping", 0.0)? {
        cap if cap > 0.0 => Some(cap),
        _ => None,
    };
    let rope_dims = match m.get("rope.dimension_count") {
        Some(v) => value_as_u64(v).ok_or_else(|| m.bad("rope.dimension_count"))? as usize,
        None => head_dim,
    };
    if rope_dims == 0 || rope_dims > head_dim || rope_dims % 2 != 0 {
        return Err(Error::InvalidModel(format!("RoPE over {rope_dims} of {head_dim} head dimensions")));
    }
    let moe = moe_config(&m, architecture, layers)?;
    let name = match md.get("general.name") {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    Ok(ModelInfo {
        architecture,
        name,
        layers,
        hidden,
        feed_forward,
        heads,
        kv_heads,
        head_dim,
        rope_base,
        rope_scaling,
        norm_eps,
        context_length,
        vocab_size,
        tied_embedding: !content.tensor_infos.contains_key("output.weight"),
        attention_scale,
        sliding_window,
        final_logit_softcap,
        rope_dims,
        moe,
        skipped_layers: nextn,
    })
}

/// The expert metadata of an MoE architecture (`expert_*`, `leading_dense_block_count`).
fn moe_config(m: &Meta<'_>, architecture: Architecture, layers: usize) -> Result<Option<MoeConfig>> {
    if !matches!(architecture, Architecture::Qwen3Moe | Architecture::Glm4Moe) {
        return Ok(None);
    }
    let optional = |key: &str| m.get(key).and_then(value_as_u64).map(|v| v as usize);
    let experts = m.usize("expert_count")?;
    let experts_used = m.usize("expert_used_count")?;
    let expert_feed_forward = m.usize("expert_feed_forward_length")?;
    let gating = match optional("expert_gating_func") {
        // llama.cpp's defaults when the key is missing: GLM-4.5 routes by sigmoid.
        None if architecture == Architecture::Glm4Moe => Gating::Sigmoid,
        None | Some(1) => Gating::Softmax,
        Some(2) => Gating::Sigmoid,
        Some(other) => {
            return Err(Error::InvalidModel(format!(
                "`{}.expert_gating_func` is {other}: this runtime knows softmax (1) and sigmoid (2)",
                m.arch
            )))
        }
    };
    let normalize_weights = match m.get("expert_weights_norm") {
        Some(Value::Bool(b)) => *b,
        // Qwen3-MoE always renormalises the chosen experts' weights.
        _ => architecture == Architecture::Qwen3Moe,
    };
    let groups = optional("expert_group_count").unwrap_or(1).max(1);
    let groups_used = optional("expert_group_used_count").unwrap_or(groups).max(1);
    let leading_dense = optional("leading_dense_block_count").unwrap_or(0);
    if experts == 0
        || experts_used == 0
        || experts_used > experts
        || expert_feed_forward == 0
        || experts % groups != 0
        || groups_used > groups
        || leading_dense > layers
    {
        return Err(Error::InvalidModel(format!(
            "inconsistent experts: {experts_used} of {experts} used, feed-forward {expert_feed_forward}, \
             {groups_used} of {groups} groups, {leading_dense} leading dense layers of {layers}"
        )));
    }
    Ok(Some(MoeConfig {
        experts,
        experts_used,
        expert_feed_forward,
        gating,
        normalize_weights,
        weights_scale: m.f32_or("expert_weights_scale", 1.0)?,
        groups,
        groups_used,
        leading_dense,
    }))
}

/// The sliding window from `{arch}.attention.sliding_window`, and which layers use
/// it: `attention.sliding_window_pattern` when the file has it (a period, the last
/// layer of each being global, or one flag per layer), else Gemma 3's fixed period
/// of 6. The local RoPE base is `rope.freq_base_swa`, else Gemma 3's 10000.
fn sliding_window(m: &Meta<'_>, architecture: Architecture, layers: usize) -> Result<Option<SlidingWindow>> {
    let size = match m.get("attention.sliding_window") {
        None => return Ok(None),
        Some(v) => value_as_u64(v).ok_or_else(|| m.bad("attention.sliding_window"))? as usize,
    };
    if size == 0 {
        return Ok(None);
    }
    let periodic = |period: usize| (0..layers).map(|l| l % period < period - 1).collect::<Vec<bool>>();
    let flags = match m.get("attention.sliding_window_pattern") {
        Some(Value::Array(flags)) => {
            let flags: Option<Vec<bool>> =
                flags.iter().map(|f| if let Value::Bool(b) = f { Some(*b) } else { None }).collect();
            match flags {
                Some(flags) if flags.len() == layers => flags,
                _ => return Err(m.bad("attention.sliding_window_pattern")),
            }
        }
        Some(v) => match value_as_u64(v) {
            Some(period) if period > 0 => periodic(period as usize),
            _ => return Err(m.bad("attention.sliding_window_pattern")),
        },
        None if architecture == Architecture::Gemma3 => periodic(GEMMA3_SLIDING_PERIOD),
        // A window with no pattern and no family rule: every layer slides.
        None => vec![true; layers],
    };
    let rope_base = m.f32_or("rope.freq_base_swa", GEMMA3_LOCAL_ROPE_BASE)?;
    Ok(Some(SlidingWindow { size, rope_base, layers: flags }))
}

/// The vocabulary size: the rows of the embedding, or of the output head, or the
/// tokenizer's vocabulary. A pipeline shard for a middle stage has neither matrix.
fn vocab_size(content: &Content, hidden: usize) -> Result<usize> {
    for name in ["token_embd.weight", "output.weight"] {
        if let Some(t) = content.tensor_infos.get(name) {
            let (rows, width) =
                t.shape.dims2().map_err(|_| Error::InvalidModel(format!("{name} is not a matrix")))?;
            if width != hidden {
                return Err(Error::InvalidModel(format!("{name} has width {width}, the metadata says hidden {hidden}")));
            }
            return Ok(rows);
        }
    }
    match content.metadata.get("tokenizer.ggml.tokens") {
        Some(Value::Array(tokens)) if !tokens.is_empty() => Ok(tokens.len()),
        _ => Err(Error::MissingTensor("token_embd.weight".into())),
    }
}

/// The layer a tensor belongs to, from its `blk.N.` prefix.
pub(crate) fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

fn tensor_sizes(content: &Content, info: &ModelInfo) -> Result<TensorSizes> {
    let mut sizes =
        TensorSizes {
            layers: vec![0; info.layers],
            embedding: 0,
            head: 0,
            shared: 0,
            tied_head: info.tied_embedding,
            layer_expert_bytes: vec![0; info.layers],
        };
    for (name, t) in &content.tensor_infos {
        let bytes = tensor_byte_len(&t.shape, t.ggml_dtype);
        match (layer_of(name), name.as_str()) {
            // A multi-token-prediction layer: never loaded.
            (Some(layer), _) if layer >= info.layers && layer < info.layers + info.skipped_layers => {}
            (Some(layer), _) => {
                let slot = sizes.layers.get_mut(layer).ok_or_else(|| {
                    Error::InvalidModel(format!("tensor `{name}` names a layer beyond the {} layers", info.layers))
                })?;
                *slot += bytes;
                if name.contains("_exps.") {
                    sizes.layer_expert_bytes[layer] += bytes;
                }
            }
            (None, "token_embd.weight") => sizes.embedding += bytes,
            (None, "output.weight" | "output_norm.weight") => sizes.head += bytes,
            (None, "rope_freqs.weight") => sizes.shared += bytes,
            _ => {}
        }
    }
    if info.tied_embedding {
        sizes.head += sizes.embedding;
    }
    Ok(sizes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::SyntheticModel;

    #[test]
    fn reads_the_shape_of_a_synthetic_model() {
        let dir = tempfile::tempdir().unwrap();
        let spec = SyntheticModel::tiny();
        let path = spec.write_to(dir.path()).unwrap();
        let file = ModelFile::open(&path).unwrap();
        let info = file.info();
        assert_eq!(info.architecture, Architecture::Llama);
        assert_eq!(info.layers, spec.layers);
        assert_eq!(info.hidden, spec.hidden);
        assert_eq!(info.kv_heads, spec.kv_heads);
        assert!(info.tied_embedding);
        let sizes = file.sizes();
        assert_eq!(sizes.layers.len(), spec.layers);
        assert!(sizes.layers.iter().all(|&b| b > 0 && b == sizes.layers[0]));
        // Split, the tied embedding is held twice (to embed, and as the head); whole, once.
        let split = sizes.stage_bytes(0..2) + sizes.stage_bytes(2..spec.layers) - sizes.shared;
        assert_eq!(split, sizes.total() + sizes.embedding);
    }

    #[test]
    fn reads_the_families_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let qwen3 = ModelFile::open(SyntheticModel::qwen3_tiny().write_to(dir.path()).unwrap()).unwrap();
        let info = qwen3.info();
        assert_eq!((info.architecture, info.head_dim, info.sliding_window.clone()), (Architecture::Qwen3, 32, None));
        assert_eq!(info.attention_scale, 1.0 / 32f32.sqrt());
        let gemma = ModelFile::open(SyntheticModel::gemma3_tiny().write_to(dir.path()).unwrap()).unwrap();
        let info = gemma.info();
        assert_eq!(info.architecture, Architecture::Gemma3);
        // Gemma 3's rule when the file carries no pattern: every sixth layer is global.
        let window = info.sliding_window.clone().unwrap();
        assert_eq!((window.size, window.rope_base), (3, 10_000.0));
        assert_eq!(window.layers, [true, true, true, true, true, false]);
        assert_eq!((info.window_of(0), info.window_of(5)), (Some(3), None));
        assert_eq!(info.final_logit_softcap, Some(30.0));
    }

    #[test]
    fn a_sliding_window_pattern_in_the_file_wins() {
        let md = |pattern: Option<Value>| {
            let mut md = HashMap::new();
            md.insert("gemma3.attention.sliding_window".to_string(), Value::U32(512));
            md.insert("gemma3.rope.freq_base_swa".to_string(), Value::F32(5000.0));
            if let Some(p) = pattern {
                md.insert("gemma3.attention.sliding_window_pattern".to_string(), p);
            }
            md
        };
        let read = |md: &HashMap<String, Value>| sliding_window(&Meta { md, arch: "gemma3" }, Architecture::Gemma3, 4);
        let w = read(&md(Some(Value::U32(2)))).unwrap().unwrap();
        assert_eq!((w.layers, w.rope_base), (vec![true, false, true, false], 5000.0));
        let flags = Value::Array([false, true, true, false].map(Value::Bool).to_vec());
        assert_eq!(read(&md(Some(flags))).unwrap().unwrap().layers, [false, true, true, false]);
        assert_eq!(read(&md(None)).unwrap().unwrap().layers, [true, true, true, true]);
        for bad in [Value::U32(0), Value::Array(vec![Value::Bool(true)]), Value::String("x".into())] {
            assert!(matches!(read(&md(Some(bad))), Err(Error::Metadata { .. })));
        }
    }

    #[test]
    fn rejects_what_is_not_gguf() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.gguf");
        std::fs::write(&path, b"not a model at all").unwrap();
        assert!(matches!(ModelFile::open(&path), Err(Error::NotGguf { .. })));
        let empty = dir.path().join("empty.gguf");
        std::fs::write(&empty, b"").unwrap();
        assert!(matches!(ModelFile::open(&empty), Err(Error::NotGguf { .. })));
        assert!(matches!(ModelFile::open(dir.path().join("missing.gguf")), Err(Error::Open { .. })));
    }

    #[test]
    fn rejects_a_truncated_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = SyntheticModel::tiny().write_to(dir.path()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        for cut in [bytes.len() - 10, bytes.len() / 2, 40] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            match ModelFile::open(&path) {
                Err(Error::Corrupt { .. }) => {}
                other => panic!("cut at {cut}: expected a corrupt-file error, got {other:?}"),
            }
        }
    }

    #[test]
    fn rejects_tensor_types_it_cannot_compute_with() {
        let dir = tempfile::tempdir().unwrap();
        let spec = SyntheticModel { dtype: GgmlDType::Q8K, hidden: 256, feed_forward: 256, ..SyntheticModel::tiny() };
        let path = spec.write_to(dir.path()).unwrap();
        let err = ModelFile::open(&path).unwrap_err();
        assert!(matches!(&err, Error::UnsupportedTensorType(m) if m.contains("Q8K")), "{err}");
        // A type id no GGUF reader knows.
        let good = SyntheticModel::tiny().write_to(dir.path()).unwrap();
        let bytes = std::fs::read(&good).unwrap();
        let name = b"token_embd.weight";
        let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
        // name, then n_dims (u32), two u64 dims, then the type id (u32).
        let type_at = at + 4 + 16;
        let mut patched = bytes.clone();
        patched[type_at..type_at + 4].copy_from_slice(&99u32.to_le_bytes());
        std::fs::write(&good, &patched).unwrap();
        let err = ModelFile::open(&good).unwrap_err();
        assert!(matches!(err, Error::UnsupportedTensorType(_)), "{err}");
    }

    /// A layer count beyond what the file's tensors can hold is refused, not allocated.
    #[test]
    fn rejects_a_layer_count_beyond_the_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let path = SyntheticModel::tiny().write_to(dir.path()).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let key = b".block_count";
        let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len();
        // The key, then the value's type (u32) and the value (u32).
        assert_eq!(bytes[at..at + 4], 4u32.to_le_bytes(), "block_count is a u32");
        bytes[at + 4..at + 8].copy_from_slice(&0xF000_0000u32.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let err = ModelFile::open(&path).unwrap_err();
        assert!(matches!(&err, Error::InvalidModel(m) if m.contains("layers")), "{err}");
    }

    #[test]
    fn rejects_an_unsupported_architecture() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = SyntheticModel::tiny();
        spec.architecture = "mamba".into();
        let path = spec.write_to(dir.path()).unwrap();
        assert!(matches!(ModelFile::open(&path), Err(Error::UnsupportedArchitecture(a)) if a == "mamba"));
    }
}
