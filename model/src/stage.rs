//! A pipeline stage: the layers `[start, end)` of a model, plus the token embedding
//! when it is the first stage and the final norm and output head when it is the last.
//!
//! A stage serves many sequences at once. Each has its own KV cache, created when the
//! sequence's first step (position 0) arrives and dropped on [`Stage::release`]. One
//! call to [`Stage::forward`] runs the steps of several sequences as one batch.
//!
//! The weights are shared: [`Stage::load_from`] takes the parts (layers, embedding,
//! head) that other stages of the process already hold from a [`WeightStore`], so
//! two pipelines' stages on one worker hold their common layers once.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::gguf::{ModelFile, ModelInfo, RopeScaling};
use crate::kv_cache::LayerCache;
use crate::layer::{BatchRopes, Layer, Span};
use crate::norm::RmsNorm;
use crate::rope::Ropes;
use crate::linear::Linear;
use crate::weight_store::{stage_parts, Part, WeightStore};

/// Identifies a sequence across every stage of a pipeline.
pub type SeqId = u64;

/// What a step feeds into a stage.
#[derive(Debug, Clone)]
pub enum StageInput {
    /// Token ids: only the first stage takes these.
    Tokens(Vec<u32>),
    /// `[tokens, hidden]` f32 hidden states from the previous stage.
    Hidden(Tensor),
}

impl StageInput {
    pub fn len(&self) -> Result<usize> {
        Ok(match self {
            Self::Tokens(t) => t.len(),
            Self::Hidden(h) => h.dim(0)?,
        })
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }
}

/// One sequence's new tokens, starting at `position` in its history.
#[derive(Debug, Clone)]
pub struct StageStep {
    pub seq: SeqId,
    pub position: usize,
    pub input: StageInput,
}

/// What a step produced.
#[derive(Debug, Clone)]
pub enum StageOutput {
    /// `[tokens, hidden]` f32 hidden states for the next stage.
    Hidden(Tensor),
    /// `[vocab]` f32 logits of the step's last token (last stage only).
    Logits(Tensor),
}

/// Tunables of a stage.
#[derive(Debug, Clone)]
pub struct StageOptions {
    /// Longest run of one sequence's tokens computed in one forward; longer prompts
    /// are processed in chunks of this size to bound scratch memory.
    pub prefill_chunk: usize,
}

impl Default for StageOptions {
    fn default() -> Self {
        Self { prefill_chunk: 512 }
    }
}

#[derive(Debug)]
struct SequenceCache {
    layers: Vec<LayerCache>,
}

impl SequenceCache {
    fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerCache::len)
    }
}

#[derive(Debug)]
struct Head {
    norm: RmsNorm,
    output: Linear,
}

/// Where a stage's weights come from when it may share them with other stages.
#[derive(Debug, Clone, Copy)]
pub struct WeightSources<'a> {
    /// The process's shared weights: parts found here are taken, parts loaded are
    /// put here.
    pub store: &'a WeightStore,
    /// The model's content hash: only stages of the same model share parts.
    pub model: &'a str,
    /// Files to read the other parts from, whole models or shard files of this
    /// model; each part comes from the first file that has it. Empty is fine when
    /// the store holds every part.
    pub files: &'a [&'a ModelFile],
}

pub struct Stage {
    info: ModelInfo,
    layer_range: Range<usize>,
    // Weights are shared with the other stages of this process that hold the same
    // parts (see `weight_store`); only the KV caches below are this stage's own.
    embedding: Option<Arc<QTensor>>,
    layers: Vec<Arc<Layer>>,
    head: Option<Arc<Head>>,
    rope: Arc<Ropes>,
    device: Device,
    options: StageOptions,
    weight_bytes: u64,
    loaded_bytes: u64,
    sequences: HashMap<SeqId, SequenceCache>,
}

impl Stage {
    /// Loads the tensors of `layers` (and the embedding / head where this stage is
    /// first / last) from `file` onto `device`. Nothing else is read, and nothing is
    /// shared with other stages.
    pub fn load(file: &ModelFile, layers: Range<usize>, device: &Device, options: StageOptions) -> Result<Self> {
        let store = WeightStore::new();
        Self::load_from(WeightSources { store: &store, model: "", files: &[file] }, layers, device, options)
    }

    /// Loads a stage over `layers`, taking every part `sources.store` already holds
    /// for the model on `device` and reading only the others (which then join the
    /// store). A shared part is the very object another stage computes with, so the
    /// outputs are those of a stage loaded alone.
    pub fn load_from(
        sources: WeightSources<'_>,
        layers: Range<usize>,
        device: &Device,
        options: StageOptions,
    ) -> Result<Self> {
        let WeightSources { store, model, files } = sources;
        let info = match (files.first(), store.model_info(model)) {
            (Some(file), _) => file.info().clone(),
            (None, Some(info)) => info,
            (None, None) => {
                return Err(Error::InvalidModel("no weights file, and no stage holds any part of the model".into()))
            }
        };
        if let Some(other) = files.iter().find(|f| *f.info() != info) {
            return Err(Error::InvalidModel(format!(
                "{} does not describe the same model as the other weight files",
                other.path().display()
            )));
        }
        if layers.start >= layers.end || layers.end > info.layers {
            return Err(Error::LayerRange { start: layers.start, end: layers.end, layers: info.layers });
        }
        let _span = tracing::info_span!("stage_load", layers = %format_args!("{}..{}", layers.start, layers.end)).entered();
        // Every stage on this location must compute on the handle its shared parts live on.
        let device = store.device(device);
        if !files.is_empty() {
            store.remember_info(model, &info);
        }
        let mut reader = PartReader { files, readers: files.iter().map(|_| None).collect(), device: &device };
        let mut counts = Counts::default();
        let mut shelf = Shelf { store, model, device: &device, counts: &mut counts };
        let mut embedding = None;
        let mut loaded = Vec::with_capacity(layers.len());
        let mut head = None;
        let mut rope = None;
        for part in stage_parts(&info, layers.clone()) {
            match part {
                Part::Embedding => {
                    embedding = Some(shelf.take(part, || {
                        reader.read(part, |file, r, d| file.load_tensor(r, "token_embd.weight", d))
                    })?)
                }
                Part::Layer(i) => {
                    loaded.push(shelf.take(part, || reader.read(part, |file, r, d| Layer::load(file, r, i, d)))?)
                }
                Part::Head => {
                    head = Some(shelf.take(part, || {
                        reader.read(part, |file, r, d| {
                            let name = if file.info().tied_embedding { "token_embd.weight" } else { "output.weight" };
                            Ok(Head {
                                norm: RmsNorm::load(file, r, "output_norm.weight", d)?,
                                output: Linear::load(file, r, name, None, d)?,
                            })
                        })
                    })?)
                }
                Part::Rope => rope = Some(shelf.take(part, || reader.read(part, load_rope))?),
            }
        }
        let rope = rope.ok_or_else(|| Error::InvalidModel("the stage has no rope parameters".into()))?;
        Ok(Self {
            info,
            layer_range: layers,
            embedding,
            layers: loaded,
            head,
            rope,
            device,
            options,
            weight_bytes: counts.weight_bytes,
            loaded_bytes: counts.loaded_bytes,
            sequences: HashMap::new(),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn layers(&self) -> Range<usize> {
        self.layer_range.clone()
    }

    pub fn is_first(&self) -> bool {
        self.layer_range.start == 0
    }

    pub fn is_last(&self) -> bool {
        self.layer_range.end == self.info.layers
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes of weights this stage computes with, shared or not.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// Bytes of weights this stage read when it loaded: [`Self::weight_bytes`] less
    /// what it took from stages already loaded.
    pub fn loaded_weight_bytes(&self) -> u64 {
        self.loaded_bytes
    }

    /// Bytes held by the KV caches of all sequences.
    pub fn cache_bytes(&self) -> u64 {
        self.sequences.values().flat_map(|s| &s.layers).map(|c| c.bytes() as u64).sum()
    }

    /// Sequences holding a cache here.
    pub fn sequence_count(&self) -> usize {
        self.sequences.len()
    }

    /// The number of positions cached for `seq`, if it is known.
    pub fn sequence_len(&self, seq: SeqId) -> Option<usize> {
        self.sequences.get(&seq).map(SequenceCache::len)
    }

    /// Drops the KV cache of `seq`; returns whether it existed.
    pub fn release(&mut self, seq: SeqId) -> bool {
        self.sequences.remove(&seq).is_some()
    }

    /// Checks a step against this stage without running it, so a caller can reject a
    /// bad step and go on with the rest of its batch.
    pub fn check(&self, step: &StageStep) -> Result<()> {
        let len = step.input.len()?;
        if len == 0 {
            return Err(Error::BadInput(format!("sequence {}: empty step", step.seq)));
        }
        match (&step.input, self.is_first()) {
            (StageInput::Tokens(ids), true) => {
                if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.info.vocab_size) {
                    return Err(Error::BadInput(format!(
                        "sequence {}: token id {bad} is outside the vocabulary of {}",
                        step.seq, self.info.vocab_size
                    )));
                }
            }
            (StageInput::Hidden(h), false) => {
                let dims = h.dims();
                if dims.len() != 2 || dims[1] != self.info.hidden || h.dtype() != DType::F32 {
                    return Err(Error::BadInput(format!(
                        "sequence {}: hidden states must be f32 [tokens, {}], got {:?} {:?}",
                        step.seq,
                        self.info.hidden,
                        h.dtype(),
                        dims
                    )));
                }
            }
            (StageInput::Tokens(_), false) => {
                return Err(Error::BadInput("token ids sent to a stage that expects hidden states".into()))
            }
            (StageInput::Hidden(_), true) => {
                return Err(Error::BadInput("hidden states sent to the first stage, which expects token ids".into()))
            }
        }
        let expected = match self.sequences.get(&step.seq) {
            // Position 0 restarts a sequence: that is how a replay begins.
            _ if step.position == 0 => 0,
            Some(cache) => cache.len(),
            None => return Err(Error::UnknownSequence(step.seq)),
        };
        if step.position != expected {
            return Err(Error::PositionMismatch { seq: step.seq, expected, got: step.position });
        }
        if step.position + len > self.info.context_length {
            return Err(Error::ContextOverflow {
                seq: step.seq,
                tokens: step.position + len,
                context: self.info.context_length,
            });
        }
        Ok(())
    }

    /// Runs `steps` (at most one per sequence) as one batch and returns one output per
    /// step, in order. Every step is checked first; nothing runs if one is bad.
    pub fn forward(&mut self, steps: &[StageStep]) -> Result<Vec<StageOutput>> {
        self.forward_with(steps, &vec![LogitRows::Last; steps.len()])
    }

    /// As [`Self::forward`], choosing per step which rows the last stage returns logits
    /// for: `LogitRows::Every` gives that step `[len, vocab]` (scoring a prompt), and
    /// `Last` its last row as `forward` does. The arithmetic of a row does not depend
    /// on the choice.
    pub fn forward_rows(&mut self, steps: &[StageStep], rows: &[LogitRows]) -> Result<Vec<StageOutput>> {
        if rows.len() != steps.len() {
            return Err(Error::BadInput(format!("{} logit choices for {} steps", rows.len(), steps.len())));
        }
        if !self.is_last() && rows.contains(&LogitRows::Every) {
            return Err(Error::BadInput("only the last stage has logits".into()));
        }
        self.forward_with(steps, rows)
    }

    /// Runs one step on the last stage and returns the logits of every one of its
    /// positions, `[len, vocab]`: what scoring a text needs (perplexity). The same
    /// arithmetic as [`Self::forward`], whose logits are the last row of these.
    pub fn forward_every_position(&mut self, step: &StageStep) -> Result<Tensor> {
        if !self.is_last() {
            return Err(Error::BadInput("only the last stage has logits".into()));
        }
        match self.forward_with(std::slice::from_ref(step), &[LogitRows::Every])?.pop() {
            Some(StageOutput::Logits(logits)) => Ok(logits),
            _ => Err(Error::BadInput("the step produced no logits".into())),
        }
    }

    fn forward_with(&mut self, steps: &[StageStep], logits: &[LogitRows]) -> Result<Vec<StageOutput>> {
        for (i, step) in steps.iter().enumerate() {
            self.check(step)?;
            if steps[..i].iter().any(|s| s.seq == step.seq) {
                return Err(Error::BadInput(format!("sequence {} appears twice in one batch", step.seq)));
            }
        }
        for step in steps {
            if step.position == 0 {
                let layers = self.layer_range.clone().map(|l| LayerCache::new(self.info.window_of(l))).collect();
                self.sequences.insert(step.seq, SequenceCache { layers });
            }
        }
        // Long prompts are cut into chunks; each round takes the next chunk of every
        // step that still has tokens, so short steps finish in the first round.
        let chunk = self.options.prefill_chunk.max(1);
        let mut pieces: Vec<Vec<Tensor>> = vec![Vec::new(); steps.len()];
        let mut done = 0;
        loop {
            let mut round = Vec::new();
            for (i, step) in steps.iter().enumerate() {
                let len = step.input.len()?;
                if done < len {
                    round.push((i, done, chunk.min(len - done)));
                }
            }
            if round.is_empty() {
                break;
            }
            let outputs = self.forward_round(steps, &round, logits)?;
            for ((i, _, _), out) in round.iter().zip(outputs) {
                pieces[*i].push(out);
            }
            done += chunk;
        }
        let mut results = Vec::with_capacity(steps.len());
        for (parts, rows) in pieces.into_iter().zip(logits) {
            let last = parts.last().cloned().ok_or_else(|| Error::BadInput("empty step".into()))?;
            results.push(if self.is_last() && (*rows == LogitRows::Last || parts.len() == 1) {
                StageOutput::Logits(last)
            } else if self.is_last() {
                StageOutput::Logits(Tensor::cat(&parts, 0)?)
            } else if parts.len() == 1 {
                StageOutput::Hidden(last)
            } else {
                StageOutput::Hidden(Tensor::cat(&parts, 0)?)
            });
        }
        Ok(results)
    }

    /// One batched forward over `(step index, offset, len)` slices of the steps.
    /// Returns per slice the hidden states, or on the last stage the logits of the rows
    /// `logits[step index]` asks for.
    fn forward_round(
        &mut self,
        steps: &[StageStep],
        round: &[(usize, usize, usize)],
        logits: &[LogitRows],
    ) -> Result<Vec<Tensor>> {
        let mut inputs = Vec::with_capacity(round.len());
        let mut spans = Vec::with_capacity(round.len());
        let mut ropes = BatchRopes { ropes: &self.rope, global: Vec::with_capacity(round.len()), local: Vec::new() };
        let mut offset = 0;
        for &(i, from, len) in round {
            let step = &steps[i];
            let x = match &step.input {
                StageInput::Tokens(ids) => {
                    let ids = Tensor::new(&ids[from..from + len], &self.device)?;
                    let x = match (&self.embedding, &self.head) {
                        (Some(e), _) => e.embedding(&ids)?,
                        (None, Some(head)) if self.is_first() => head.output.embedding(&ids)?,
                        _ => return Err(Error::BadInput("this stage has no embedding".into())),
                    };
                    if self.info.architecture.scales_embedding() {
                        // In f32, as llama.cpp scales by sqrtf(n_embd).
                        (x * f64::from((self.info.hidden as f32).sqrt()))?
                    } else {
                        x
                    }
                }
                StageInput::Hidden(h) => h.narrow(0, from, len)?.to_device(&self.device)?,
            };
            inputs.push(x);
            let position = step.position + from;
            spans.push(Span { offset, len, position });
            ropes.global.push(self.rope.global.tables(position, len, &self.device)?);
            if let Some(local) = &self.rope.local {
                ropes.local.push(local.tables(position, len, &self.device)?);
            }
            offset += len;
        }
        let mut x = if inputs.len() == 1 { inputs.swap_remove(0) } else { Tensor::cat(&inputs, 0)? };
        let mut seq_caches = caches_in_order(&mut self.sequences, round.iter().map(|&(i, _, _)| steps[i].seq))?;
        for (l, layer) in self.layers.iter().enumerate() {
            let _span = tracing::trace_span!("layer", index = self.layer_range.start + l).entered();
            let mut caches: Vec<&mut LayerCache> = seq_caches.iter_mut().map(|c| &mut c.layers[l]).collect();
            x = layer.forward(&x, &spans, &mut caches, &ropes)?;
        }
        match &self.head {
            None => spans.iter().map(|s| Ok(x.narrow(0, s.offset, s.len)?)).collect(),
            Some(head) => {
                let rows = |x: &Tensor| -> Result<Tensor> {
                    let logits = head.output.forward(&head.norm.forward(x)?)?;
                    Ok(match self.info.final_logit_softcap {
                        Some(cap) => ((logits / f64::from(cap))?.tanh()? * f64::from(cap))?,
                        None => logits,
                    })
                };
                // Every row the round needs goes through the head in one batch (its
                // rows are computed independently of each other, see `Linear`).
                let every: Vec<bool> = round.iter().map(|&(i, _, _)| logits[i] == LogitRows::Every).collect();
                let picked: Vec<Tensor> = spans
                    .iter()
                    .zip(&every)
                    .map(|(s, &all)| if all { x.narrow(0, s.offset, s.len) } else { x.narrow(0, s.offset + s.len - 1, 1) })
                    .collect::<candle_core::Result<_>>()?;
                let out = rows(&if picked.len() == 1 { picked[0].clone() } else { Tensor::cat(&picked, 0)? })?;
                let mut at = 0;
                spans
                    .iter()
                    .zip(&every)
                    .map(|(s, &all)| {
                        let t = if all { out.narrow(0, at, s.len)? } else { out.get(at)? };
                        at += if all { s.len } else { 1 };
                        Ok(t)
                    })
                    .collect()
            }
        }
    }
}

/// Which positions of a step the last stage computes logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitRows {
    /// The last position only (`[vocab]`): what sampling needs.
    Last,
    /// Every position (`[len, vocab]`): what scoring a prompt needs.
    Every,
}

/// Bytes of the parts a stage holds, and of those it read itself.
#[derive(Default)]
struct Counts {
    weight_bytes: u64,
    loaded_bytes: u64,
}

/// A loading stage's view of the store: one model on one device.
struct Shelf<'a> {
    store: &'a WeightStore,
    model: &'a str,
    device: &'a Device,
    counts: &'a mut Counts,
}

impl Shelf<'_> {
    /// The part from the store, or else loaded (with its bytes) and shared.
    fn take<T>(&mut self, part: Part, load: impl FnOnce() -> Result<(T, u64)>) -> Result<Arc<T>>
    where
        T: Send + Sync + 'static,
    {
        if let Some((value, bytes)) = self.store.get::<T>(self.model, self.device, part) {
            self.counts.weight_bytes += bytes;
            return Ok(value);
        }
        let (value, bytes) = load()?;
        let (value, kept) = self.store.insert(self.model, self.device, part, value, bytes);
        self.counts.weight_bytes += bytes;
        if kept {
            self.counts.loaded_bytes += bytes;
        }
        Ok(value)
    }
}

/// Reads parts from the first of several files that holds them, opening each file
/// once, when first needed.
struct PartReader<'a> {
    files: &'a [&'a ModelFile],
    readers: Vec<Option<BufReader<File>>>,
    device: &'a Device,
}

impl PartReader<'_> {
    /// Loads `part` with `load`, and says how many bytes of tensors it is.
    fn read<T>(
        &mut self,
        part: Part,
        load: impl FnOnce(&ModelFile, &mut BufReader<File>, &Device) -> Result<T>,
    ) -> Result<(T, u64)> {
        let i = self.files.iter().position(|f| holds_part(f, part)).ok_or(Error::MissingPart(part))?;
        let file = self.files[i];
        let reader = match &mut self.readers[i] {
            Some(r) => r,
            slot => slot.insert(file.reader()?),
        };
        let value = load(file, reader, self.device)?;
        let sizes = file.sizes();
        let bytes = match part {
            Part::Embedding => sizes.embedding,
            Part::Layer(l) => sizes.layers.get(l).copied().unwrap_or(0),
            Part::Head => sizes.head,
            Part::Rope => sizes.shared,
        };
        Ok((value, bytes))
    }
}

/// Whether `file` (a whole model or a shard file of it) has the tensors of `part`.
fn holds_part(file: &ModelFile, part: Part) -> bool {
    let info = file.info();
    match part {
        Part::Embedding => file.has_tensor("token_embd.weight"),
        // Every layer has its attention norm; a shard file holds a layer whole or not at all.
        Part::Layer(i) => file.has_tensor(&format!("blk.{i}.attn_norm.weight")),
        Part::Head => {
            file.has_tensor("output_norm.weight")
                && file.has_tensor(if info.tied_embedding { "token_embd.weight" } else { "output.weight" })
        }
        Part::Rope => info.rope_scaling != RopeScaling::FreqFactors || file.has_tensor("rope_freqs.weight"),
    }
}

fn load_rope(file: &ModelFile, reader: &mut BufReader<File>, device: &Device) -> Result<Ropes> {
    let info = file.info();
    let freq_factors = match info.rope_scaling {
        RopeScaling::FreqFactors => {
            let t = file.load_tensor(reader, "rope_freqs.weight", device)?.dequantize(&Device::Cpu)?;
            let factors = t.flatten_all()?.to_vec1::<f32>()?;
            if factors.len() != info.rope_dims / 2 {
                return Err(Error::InvalidModel(format!(
                    "rope_freqs.weight has {} entries, expected {}",
                    factors.len(),
                    info.rope_dims / 2
                )));
            }
            Some(factors)
        }
        _ => None,
    };
    Ok(Ropes::new(info, freq_factors))
}

/// K and V of one layer of one sequence, `[kv_heads, positions, head_dim]` each: what
/// moves when a sequence's cache is carried to another stage.
#[derive(Debug, Clone)]
pub struct LayerKv {
    /// The layer's index in the model (not in the stage).
    pub layer: usize,
    /// The first position given: 0, or for a sliding-window layer the first one its
    /// window still reaches.
    pub first: usize,
    pub k: Tensor,
    pub v: Tensor,
}

/// Moving a sequence's KV cache between stages. The copies are exact, so a sequence
/// continued on the stage it was imported into computes what it would have computed
/// where it came from, bit for bit.
impl Stage {
    /// The dtype of every KV cache: K and V are computed from f32 hidden states and
    /// kept as they are.
    pub const KV_DTYPE: DType = DType::F32;

    /// Copies of the K and V of `layers` (model indices, within this stage's range) for
    /// the positions `[0, positions)` of `seq` (sliding-window layers: the positions
    /// of those their window still reaches). The stage may hold more positions; only
    /// the first `positions` are taken.
    pub fn export_kv(&self, seq: SeqId, layers: Range<usize>, positions: usize) -> Result<Vec<LayerKv>> {
        if layers.start >= layers.end || layers.start < self.layer_range.start || layers.end > self.layer_range.end {
            return Err(Error::KvLayers {
                start: layers.start,
                end: layers.end,
                held_start: self.layer_range.start,
                held_end: self.layer_range.end,
            });
        }
        let cache = self.sequences.get(&seq).ok_or(Error::UnknownSequence(seq))?;
        if positions == 0 || positions > cache.len() {
            return Err(Error::KvPositions { seq, asked: positions, cached: cache.len() });
        }
        layers
            .map(|layer| {
                let (first, k, v) = cache.layers[layer - self.layer_range.start].export(positions)?;
                Ok(LayerKv { layer, first, k, v })
            })
            .collect()
    }

    /// Makes `layers` — one entry for every layer of this stage, each
    /// `[kv_heads, positions - first, head_dim]` of [`Self::KV_DTYPE`], the same
    /// `positions` for all, `first` 0 or (sliding layers) no later than the first
    /// position the window reaches — the KV cache of `seq`, replacing any it had. The sequence goes on at
    /// position `positions`. Nothing changes when the data is refused.
    pub fn import_kv(&mut self, seq: SeqId, mut layers: Vec<LayerKv>) -> Result<()> {
        layers.sort_by_key(|l| l.layer);
        let held = self.layer_range.clone();
        let indices: Vec<usize> = layers.iter().map(|l| l.layer).collect();
        if !indices.iter().copied().eq(held.clone()) {
            let start = indices.first().copied().unwrap_or(0);
            let end = indices.last().map_or(0, |l| l + 1);
            let detail = if let Some(w) = indices.windows(2).find(|w| w[0] == w[1]) {
                format!("layer {} is given twice", w[0])
            } else {
                format!("layers {start}..{end} ({} entries) given", indices.len())
            };
            return Err(Error::KvShape(format!(
                "an import must cover exactly this stage's layers {}..{}: {detail}",
                held.start, held.end
            )));
        }
        let given = |l: &LayerKv| l.first + l.k.dims().get(1).copied().unwrap_or(0);
        let positions = layers.first().map_or(0, given);
        if positions == 0 {
            return Err(Error::KvShape("an import needs at least one position".into()));
        }
        if positions > self.info.context_length {
            return Err(Error::ContextOverflow { seq, tokens: positions, context: self.info.context_length });
        }
        let mut caches = Vec::with_capacity(layers.len());
        for l in &layers {
            if given(l) != positions {
                return Err(Error::KvShape(format!(
                    "layer {} ends at position {}, layer {} at {positions}",
                    l.layer,
                    given(l),
                    layers[0].layer
                )));
            }
            let expected = [self.info.kv_heads, positions - l.first, self.info.head_dim];
            for (name, t) in [("K", &l.k), ("V", &l.v)] {
                if t.dims() != expected || t.dtype() != Self::KV_DTYPE {
                    return Err(Error::KvShape(format!(
                        "layer {} {name}: expected {:?} {expected:?}, got {:?} {:?}",
                        l.layer,
                        Self::KV_DTYPE,
                        t.dtype(),
                        t.dims()
                    )));
                }
            }
            let k = l.k.to_device(&self.device)?;
            let v = l.v.to_device(&self.device)?;
            let cache = LayerCache::import(l.first, &k, &v, self.info.window_of(l.layer))
                .map_err(|e| Error::KvShape(format!("layer {}: {e}", l.layer)))?;
            caches.push(cache);
        }
        self.sequences.insert(seq, SequenceCache { layers: caches });
        Ok(())
    }

    /// Opens `into` with a copy of the first `positions` positions of `from`'s cache
    /// (which goes on unchanged): the next step of `into` is at `positions`. A prompt
    /// shared by several sequences is computed once this way. Continued with the
    /// steps `from` was computed with after them, `into` computes what `from` did,
    /// bit for bit (the copy is exact, as a carried cache is).
    pub fn fork(&mut self, from: SeqId, into: SeqId, positions: usize) -> Result<()> {
        let layers = self.export_kv(from, self.layers(), positions)?;
        self.import_kv(into, layers)
    }
}

/// Mutable caches for `ids`, in that order. Ids must be distinct (checked by forward).
fn caches_in_order(
    sequences: &mut HashMap<SeqId, SequenceCache>,
    ids: impl Iterator<Item = SeqId> + Clone,
) -> Result<Vec<&mut SequenceCache>> {
    let mut wanted: HashMap<SeqId, &mut SequenceCache> =
        sequences.iter_mut().filter(|(id, _)| ids.clone().any(|w| w == **id)).map(|(id, c)| (*id, c)).collect();
    ids.map(|id| wanted.remove(&id).ok_or(Error::UnknownSequence(id))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::SyntheticModel;

    fn model(spec: &SyntheticModel) -> (tempfile::TempDir, ModelFile) {
        let dir = tempfile::tempdir().unwrap();
        let path = spec.write_to(dir.path()).unwrap();
        let file = ModelFile::open(path).unwrap();
        (dir, file)
    }

    fn stage(file: &ModelFile, layers: Range<usize>) -> Stage {
        Stage::load(file, layers, &Device::Cpu, StageOptions::default()).unwrap()
    }

    fn tokens(seq: SeqId, position: usize, ids: &[u32]) -> StageStep {
        StageStep { seq, position, input: StageInput::Tokens(ids.to_vec()) }
    }

    /// Runs one step through a chain of stages and returns the final logits.
    fn through(stages: &mut [Stage], step: StageStep) -> Vec<f32> {
        let mut step = step;
        for stage in stages.iter_mut() {
            match stage.forward(std::slice::from_ref(&step)).unwrap().pop().unwrap() {
                StageOutput::Hidden(h) => step.input = StageInput::Hidden(h),
                StageOutput::Logits(l) => return l.to_vec1().unwrap(),
            }
        }
        panic!("no stage returned logits")
    }

    #[test]
    fn three_chained_stages_give_bit_identical_logits() {
        let (_dir, file) = model(&SyntheticModel { layers: 6, ..SyntheticModel::tiny() });
        let mut whole = [stage(&file, 0..6)];
        let mut chain = [stage(&file, 0..2), stage(&file, 2..5), stage(&file, 5..6)];
        let prompt = [5, 80, 120, 33, 7, 250, 2];
        let a = through(&mut whole, tokens(1, 0, &prompt));
        let b = through(&mut chain, tokens(1, 0, &prompt));
        assert_eq!(a, b);
        for (i, t) in [17u32, 99, 3].iter().enumerate() {
            let a = through(&mut whole, tokens(1, prompt.len() + i, &[*t]));
            let b = through(&mut chain, tokens(1, prompt.len() + i, &[*t]));
            assert_eq!(a, b, "decode step {i}");
        }
    }

    #[test]
    fn every_family_splits_over_three_stages_bit_identically() {
        let six = |spec: SyntheticModel| SyntheticModel { layers: 6, ..spec };
        for spec in [
            six(SyntheticModel::qwen3_tiny()),
            SyntheticModel::gemma3_tiny(),
            SyntheticModel::qwen3_moe_tiny(),
            SyntheticModel::glm4_moe_tiny(),
        ] {
            let (_dir, file) = model(&spec);
            let mut whole = [stage(&file, 0..6)];
            let mut chain = [stage(&file, 0..2), stage(&file, 2..5), stage(&file, 5..6)];
            // Longer than Gemma's window of 3, and decoding on past it.
            let prompt = [5, 80, 120, 33, 7, 250, 2];
            let a = through(&mut whole, tokens(1, 0, &prompt));
            assert!(a.iter().all(|x| x.is_finite()), "{spec:?}");
            assert_eq!(a, through(&mut chain, tokens(1, 0, &prompt)), "{}", spec.architecture);
            for (i, t) in [17u32, 99, 3, 64].iter().enumerate() {
                let a = through(&mut whole, tokens(1, prompt.len() + i, &[*t]));
                let b = through(&mut chain, tokens(1, prompt.len() + i, &[*t]));
                assert_eq!(a, b, "{} decode step {i}", spec.architecture);
            }
        }
    }

    #[test]
    fn a_batch_of_moe_sequences_equals_each_run_alone() {
        // Tokens of different sequences share experts in a batch: each must still
        // get exactly what it gets alone.
        for spec in [SyntheticModel::qwen3_moe_tiny(), SyntheticModel::glm4_moe_tiny()] {
            let (_dir, file) = model(&spec);
            let mut batched = stage(&file, 0..6);
            let mut alone = stage(&file, 0..6);
            let steps = [tokens(1, 0, &[1, 2, 3]), tokens(2, 0, &[9, 8, 7, 6, 5]), tokens(3, 0, &[42])];
            for (step, out) in steps.iter().zip(batched.forward(&steps).unwrap()) {
                let (StageOutput::Logits(b), StageOutput::Logits(a)) =
                    (out, alone.forward(std::slice::from_ref(step)).unwrap().pop().unwrap())
                else {
                    panic!("logits")
                };
                assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap(), "{}", spec.architecture);
            }
        }
    }

    #[test]
    fn bad_moe_files_are_refused_at_load_naming_the_tensor_or_key() {
        let dir = tempfile::tempdir().unwrap();
        // An expert tensor of the wrong shape: experts wider than the metadata says.
        let spec = SyntheticModel::qwen3_moe_tiny();
        let wide = SyntheticModel {
            moe: spec.moe.clone().map(|m| crate::synthetic::SyntheticMoe { expert_feed_forward: 64, ..m }),
            ..spec
        };
        let wrong = wide.write_to(dir.path()).unwrap();
        let bytes = std::fs::read(&wrong).unwrap();
        // Patch the metadata value 64 back to 32: the tensors stay 64 wide.
        let key = b"qwen3moe.expert_feed_forward_length";
        let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len();
        let mut patched = bytes.clone();
        // key, then the value type (u32), then the value.
        patched[at + 4..at + 8].copy_from_slice(&32u32.to_le_bytes());
        std::fs::write(&wrong, &patched).unwrap();
        let file = ModelFile::open(&wrong).unwrap();
        let Err(err) = Stage::load(&file, 0..6, &Device::Cpu, StageOptions::default()) else { panic!("loaded") };
        let err = err.to_string();
        assert!(err.contains("blk.0.ffn_gate_exps.weight") && err.contains("expected [8, 32, 64]"), "{err}");
        // An unknown gating function.
        let key = b"qwen3moe.expert_gating_func";
        let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len();
        let mut patched = bytes.clone();
        patched[at + 4..at + 8].copy_from_slice(&7u32.to_le_bytes());
        std::fs::write(&wrong, &patched).unwrap();
        let err = ModelFile::open(&wrong).unwrap_err().to_string();
        assert!(err.contains("expert_gating_func") && err.contains('7'), "{err}");
    }

    #[test]
    fn a_sliding_window_forgets_what_lies_beyond_it_and_only_that() {
        let windowed = SyntheticModel::gemma3_tiny();
        let unbounded = SyntheticModel { sliding_window: Some(1000), ..windowed.clone() };
        let (_a, windowed) = model(&windowed);
        let (_b, unbounded) = model(&unbounded);
        let logits = |file: &ModelFile, prompt: &[u32]| through(&mut [stage(file, 0..6)], tokens(1, 0, prompt));
        // Within the window the two agree; past it they part.
        assert_eq!(logits(&windowed, &[5, 80, 120]), logits(&unbounded, &[5, 80, 120]));
        assert_ne!(logits(&windowed, &[5, 80, 120, 33, 7]), logits(&unbounded, &[5, 80, 120, 33, 7]));
        // The window slides the same in chunks of a prompt as in decode steps.
        let prompt: Vec<u32> = (0..11).map(|i| (i * 37 % 250) as u32).collect();
        let mut one = stage(&windowed, 0..6);
        let mut chunked = Stage::load(&windowed, 0..6, &Device::Cpu, StageOptions { prefill_chunk: 2 }).unwrap();
        let mut stepped = stage(&windowed, 0..6);
        let a = through(std::slice::from_mut(&mut one), tokens(1, 0, &prompt));
        let b = through(std::slice::from_mut(&mut chunked), tokens(1, 0, &prompt));
        let mut c = Vec::new();
        for (i, t) in prompt.iter().enumerate() {
            c = through(std::slice::from_mut(&mut stepped), tokens(1, i, &[*t]));
        }
        for other in [&b, &c] {
            let max_diff = a.iter().zip(other).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
            assert!(max_diff < 1e-4, "differs by {max_diff}");
        }
    }

    #[test]
    fn every_positions_logits_end_with_those_of_the_last_position() {
        let (_dir, file) = model(&SyntheticModel::gemma3_tiny());
        let prompt = [5, 80, 120, 33, 7];
        let last = through(&mut [stage(&file, 0..6)], tokens(1, 0, &prompt));
        let mut chunked = Stage::load(&file, 0..6, &Device::Cpu, StageOptions { prefill_chunk: 2 }).unwrap();
        let all = chunked.forward_every_position(&tokens(1, 0, &prompt)).unwrap();
        assert_eq!(all.dims(), [5, file.info().vocab_size]);
        let row = all.get(4).unwrap().to_vec1::<f32>().unwrap();
        let max_diff = row.iter().zip(&last).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(max_diff < 1e-4, "{max_diff}");
        // Each row is the logits a prompt ending there gets.
        let third = through(&mut [stage(&file, 0..6)], tokens(1, 0, &prompt[..3]));
        let max_diff = all.get(2).unwrap().to_vec1::<f32>().unwrap().iter().zip(&third).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(max_diff < 1e-4, "{max_diff}");
        assert!(stage(&file, 0..3).forward_every_position(&tokens(2, 0, &prompt)).is_err());
    }

    #[test]
    fn a_batch_equals_its_sequences_run_alone() {
        let (_dir, file) = model(&SyntheticModel::tiny());
        let mut batched = stage(&file, 0..4);
        let mut alone = stage(&file, 0..4);
        let steps = [tokens(1, 0, &[1, 2, 3]), tokens(2, 0, &[9, 8, 7, 6, 5]), tokens(3, 0, &[42])];
        let outs = batched.forward(&steps).unwrap();
        for (step, out) in steps.iter().zip(outs) {
            let StageOutput::Logits(b) = out else { panic!("last stage returns logits") };
            let StageOutput::Logits(a) = alone.forward(std::slice::from_ref(step)).unwrap().pop().unwrap() else {
                panic!()
            };
            assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap(), "sequence {}", step.seq);
        }
        // Then a batched decode step of sequences at different positions.
        let decode = [tokens(1, 3, &[4]), tokens(2, 5, &[4]), tokens(3, 1, &[4])];
        let outs = batched.forward(&decode).unwrap();
        for (step, out) in decode.iter().zip(outs) {
            let (StageOutput::Logits(b), StageOutput::Logits(a)) =
                (out, alone.forward(std::slice::from_ref(step)).unwrap().pop().unwrap())
            else {
                panic!()
            };
            assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
        }
        assert_eq!(batched.sequence_count(), 3);
        assert!(batched.release(2));
        assert!(!batched.release(2));
        assert_eq!(batched.sequence_count(), 2);
    }

    #[test]
    fn chunked_prefill_matches_one_pass() {
        let (_dir, file) = model(&SyntheticModel::tiny());
        let mut one = stage(&file, 0..4);
        let mut chunked = Stage::load(&file, 0..4, &Device::Cpu, StageOptions { prefill_chunk: 4 }).unwrap();
        let prompt: Vec<u32> = (0..11).map(|i| (i * 37 % 250) as u32).collect();
        let a = through(std::slice::from_mut(&mut one), tokens(1, 0, &prompt));
        let b = through(std::slice::from_mut(&mut chunked), tokens(1, 0, &prompt));
        assert_eq!(chunked.sequence_len(1), Some(11));
        let max_diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        assert!(max_diff < 1e-4, "chunked prefill differs by {max_diff}");
    }

    #[test]
    fn hidden_states_of_a_middle_stage_have_the_prompt_shape() {
        let (_dir, file) = model(&SyntheticModel::tiny());
        let mut first = stage(&file, 0..2);
        let StageOutput::Hidden(h) = first.forward(&[tokens(1, 0, &[1, 2, 3])]).unwrap().pop().unwrap() else {
            panic!("a first stage returns hidden states")
        };
        assert_eq!(h.dims(), &[3, 64]);
        assert!(first.is_first() && !first.is_last());
    }

    #[test]
    fn variant_architectures_load_and_run() {
        for spec in [
            SyntheticModel { architecture: "qwen2".into(), qkv_bias: true, ..SyntheticModel::tiny() },
            SyntheticModel { rope_freqs: true, untied_head: true, ..SyntheticModel::tiny() },
            SyntheticModel { dtype: candle_core::quantized::GgmlDType::Q4_1, ..SyntheticModel::tiny() },
            SyntheticModel { dtype: candle_core::quantized::GgmlDType::F16, ..SyntheticModel::tiny() },
            SyntheticModel::qwen3_tiny(),
            SyntheticModel { layers: 4, ..SyntheticModel::gemma3_tiny() },
        ] {
            let (_dir, file) = model(&spec);
            let mut whole = [stage(&file, 0..4)];
            let mut split = [stage(&file, 0..1), stage(&file, 1..4)];
            let a = through(&mut whole, tokens(1, 0, &[3, 1, 4, 1, 5]));
            let b = through(&mut split, tokens(1, 0, &[3, 1, 4, 1, 5]));
            assert!(a.iter().all(|x| x.is_finite()), "{spec:?}");
            assert_eq!(a, b, "{spec:?}");
        }
    }

    #[test]
    fn every_tensor_type_candle_reads_loads_and_runs() {
        use candle_core::quantized::GgmlDType::*;
        for dtype in [F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2K, Q3K, Q4K, Q5K, Q6K] {
            // K-quants pack 256 values a block, so rows must be that wide.
            let wide = matches!(dtype, Q2K | Q3K | Q4K | Q5K | Q6K);
            let spec = SyntheticModel {
                dtype,
                layers: 2,
                hidden: if wide { 256 } else { 64 },
                feed_forward: if wide { 512 } else { 128 },
                ..SyntheticModel::tiny()
            };
            let (_dir, file) = model(&spec);
            let mut whole = [stage(&file, 0..2)];
            let logits = through(&mut whole, tokens(1, 0, &[3, 1, 4]));
            assert_eq!(logits.len(), file.info().vocab_size, "{dtype:?}");
            assert!(logits.iter().all(|x| x.is_finite()), "{dtype:?}");
        }
    }

    #[test]
    fn a_stage_holds_only_its_share_of_the_weights() {
        let (_dir, file) = model(&SyntheticModel { layers: 6, ..SyntheticModel::tiny() });
        let sizes = file.sizes();
        let middle = stage(&file, 2..4);
        assert_eq!(middle.weight_bytes(), sizes.layers[2] + sizes.layers[3]);
        let whole = stage(&file, 0..6);
        assert_eq!(whole.weight_bytes(), sizes.total());
    }

    /// Hidden states (or logits) of `stage` for a prompt and one decode step, fed
    /// `input` made by `feed` (token ids for a first stage, else hidden states).
    fn outputs(stage: &mut Stage, feed: &mut Stage) -> Vec<Vec<f32>> {
        let prompt = [5u32, 80, 120, 33, 7];
        let mut out = Vec::new();
        for (position, ids) in [(0, &prompt[..]), (prompt.len(), &[17u32][..])] {
            let mut step = tokens(1, position, ids);
            if !stage.is_first() {
                let StageOutput::Hidden(h) = feed.forward(&[step.clone()]).unwrap().pop().unwrap() else { panic!() };
                step.input = StageInput::Hidden(h);
            }
            out.push(match stage.forward(&[step]).unwrap().pop().unwrap() {
                StageOutput::Hidden(h) => h.flatten_all().unwrap().to_vec1().unwrap(),
                StageOutput::Logits(l) => l.to_vec1().unwrap(),
            });
        }
        out
    }

    /// A re-plan's new stage beside the old one: 0..6 then 2..8 on one store.
    #[test]
    fn stages_share_the_layers_they_both_hold() {
        use candle_core::quantized::GgmlDType;
        // Q8_0 runs candle's kernels or ours depending on the CPU; Q4_1 always ours.
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1] {
            let (_dir, file) = model(&SyntheticModel { layers: 8, dtype, ..SyntheticModel::tiny() });
            let sizes = file.sizes().clone();
            let store = WeightStore::new();
            let sources = WeightSources { store: &store, model: "hash", files: &[&file] };
            let load = |layers: Range<usize>| Stage::load_from(sources, layers, &Device::Cpu, StageOptions::default());
            let mut old = load(0..6).unwrap();
            assert_eq!(old.weight_bytes(), sizes.stage_bytes(0..6));
            assert_eq!(old.loaded_weight_bytes(), old.weight_bytes());
            assert_eq!(store.resident_bytes(), sizes.stage_bytes(0..6));

            let mut new = load(2..8).unwrap();
            let added = sizes.layers[6] + sizes.layers[7] + sizes.head;
            assert_eq!(new.weight_bytes(), sizes.stage_bytes(2..8));
            assert_eq!(new.loaded_weight_bytes(), added, "{dtype:?}: only layers 6..8 and the head are read");
            assert_eq!(store.resident_bytes(), sizes.stage_bytes(0..6) + added);

            // Both compute exactly what stages loaded alone compute.
            let mut front = stage(&file, 0..2);
            assert_eq!(outputs(&mut old, &mut front), outputs(&mut stage(&file, 0..6), &mut front), "{dtype:?}");
            let mut fresh = stage(&file, 2..8);
            assert_eq!(outputs(&mut new, &mut front), outputs(&mut fresh, &mut front), "{dtype:?}");

            // The old stage's own parts go with it: the embedding and layers 0..2.
            drop(old);
            assert_eq!(store.resident_bytes(), sizes.stage_bytes(2..8));
            assert!(!store.holds("hash", &Device::Cpu, Part::Layer(1)));
            assert!(store.holds("hash", &Device::Cpu, Part::Layer(2)));
            assert_eq!(outputs(&mut new, &mut front), outputs(&mut fresh, &mut front), "{dtype:?} after the drop");
            drop(new);
            assert_eq!(store.resident_bytes(), 0);
            assert_eq!(store.model_info("hash"), None);
        }
    }

    /// A worker that pulls its weights reads the missing parts from the shard files
    /// of just those layers, or from no file at all.
    #[test]
    #[allow(clippy::single_range_in_vec_init)] // one range to fetch is meant
    fn a_stage_loads_what_it_lacks_from_shard_files_of_those_layers() {
        let dir = tempfile::tempdir().unwrap();
        let whole = ModelFile::open(SyntheticModel { layers: 8, ..SyntheticModel::tiny() }.write_to(dir.path()).unwrap())
            .unwrap();
        let shard = |layers: Range<usize>| {
            let path = dir.path().join(format!("layers-{}-{}.gguf", layers.start, layers.end));
            let mut out = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
            crate::shard_file::write_shard(&whole, layers, "hash", &mut out).unwrap();
            drop(out);
            ModelFile::open(path).unwrap()
        };
        let store = WeightStore::new();
        let cpu = Device::Cpu;
        let load = |files: &[&ModelFile], layers: Range<usize>| {
            Stage::load_from(WeightSources { store: &store, model: "hash", files }, layers, &cpu, StageOptions::default())
        };
        let first = shard(0..6);
        let old = load(&[&first], 0..6).unwrap();
        assert_eq!(store.ranges_to_fetch("hash", &cpu, 2..8), [6..8]);
        // Layers 6..8 and the head are not in the old shard file.
        assert!(matches!(load(&[&first], 2..8), Err(Error::MissingPart(Part::Layer(6)))));
        let rest = shard(6..8);
        let mut new = load(&[&rest], 2..8).unwrap();
        assert_eq!(new.loaded_weight_bytes(), whole.sizes().stage_bytes(6..8) - whole.sizes().shared);
        // Everything a middle stage needs is held: no file at all.
        let mut middle = load(&[], 3..5).unwrap();
        assert_eq!(middle.loaded_weight_bytes(), 0);
        drop(old);
        let mut front = stage(&whole, 0..2);
        assert_eq!(outputs(&mut new, &mut front), outputs(&mut stage(&whole, 2..8), &mut front));
        let mut front = stage(&whole, 0..3);
        assert_eq!(outputs(&mut middle, &mut front), outputs(&mut stage(&whole, 3..5), &mut front));
        drop((new, middle));
        assert!(matches!(load(&[], 3..5), Err(Error::InvalidModel(_))), "nothing held, no file");
    }

    #[test]
    fn bad_steps_are_refused_with_a_reason() {
        let (_dir, file) = model(&SyntheticModel::tiny());
        assert!(matches!(
            Stage::load(&file, 2..9, &Device::Cpu, StageOptions::default()),
            Err(Error::LayerRange { end: 9, .. })
        ));
        assert!(matches!(Stage::load(&file, 2..2, &Device::Cpu, StageOptions::default()), Err(Error::LayerRange { .. })));
        let mut first = stage(&file, 0..2);
        let mut second = stage(&file, 2..4);
        let vocab = first.info().vocab_size as u32;
        let hidden = |rows: usize, cols: usize| StageInput::Hidden(Tensor::zeros((rows, cols), DType::F32, &Device::Cpu).unwrap());
        let cases = [
            (true, tokens(1, 0, &[vocab]), "outside the vocabulary"),
            (true, tokens(1, 3, &[1]), "unknown"),
            (true, tokens(1, 0, &[]), "empty"),
            (true, tokens(1, 0, &[1; 300]), "context"),
            (false, StageStep { seq: 1, position: 0, input: hidden(2, 63) }, "hidden states must be"),
            (false, tokens(1, 0, &[1]), "expects hidden states"),
        ];
        for (to_first, step, expected) in cases {
            let stage = if to_first { &mut first } else { &mut second };
            let err = stage.forward(&[step]).unwrap_err().to_string();
            assert!(err.contains(expected), "{err} should mention {expected}");
        }
        first.forward(&[tokens(1, 0, &[1, 2])]).unwrap();
        let err = first.forward(&[tokens(1, 5, &[3])]).unwrap_err();
        assert!(matches!(err, Error::PositionMismatch { expected: 2, got: 5, .. }), "{err}");
        let err = first.forward(&[tokens(1, 2, &[3]), tokens(1, 2, &[3])]).unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
        // A refused batch leaves the sequence where it was.
        assert_eq!(first.sequence_len(1), Some(2));
    }

    /// Runs `prompt` then one-token steps `decode` on a chain of stages; returns the
    /// logits after each step.
    fn run_steps(chain: &mut [Stage], seq: SeqId, start: usize, steps: &[&[u32]]) -> Vec<Vec<f32>> {
        let mut position = start;
        let mut out = Vec::new();
        for ids in steps {
            out.push(through(chain, tokens(seq, position, ids)));
            position += ids.len();
        }
        out
    }

    /// The KV of `seq`'s first `positions` positions, from the `old` chain into a fresh
    /// `new` chain of other ranges, each new stage taking the layers it holds from
    /// every old stage that has some of them.
    fn carry(old: &[Stage], new: &mut [Stage], seq: SeqId, into: SeqId, positions: usize) {
        for stage in new.iter_mut() {
            let want = stage.layers();
            let mut layers = Vec::new();
            for source in old {
                let held = source.layers();
                let (start, end) = (want.start.max(held.start), want.end.min(held.end));
                if start < end {
                    layers.extend(source.export_kv(seq, start..end, positions).unwrap());
                }
            }
            stage.import_kv(into, layers).unwrap();
            assert_eq!(stage.sequence_len(into), Some(positions));
        }
    }

    #[test]
    fn a_carried_kv_cache_continues_bit_identically_on_any_split() {
        // Gemma's sliding layers carry only the positions their window of 3 reaches.
        for spec in [SyntheticModel { layers: 6, ..SyntheticModel::tiny() }, SyntheticModel::gemma3_tiny()] {
            carried_kv_continues(&spec);
        }
    }

    fn carried_kv_continues(spec: &SyntheticModel) {
        let (_dir, file) = model(spec);
        let prompt: &[u32] = &[5, 80, 120, 33, 7, 250, 2];
        let decode: [&[u32]; 5] = [&[17], &[99], &[3], &[42], &[8]];
        let mut whole = [stage(&file, 0..6)];
        let mut steps = vec![prompt];
        steps.extend(decode);
        let reference = run_steps(&mut whole, 1, 0, &steps);
        // (old split, new split): the new stages take their layers from one or more old ones.
        // One stage of all six layers (a list of one range is meant here).
        #[allow(clippy::single_range_in_vec_init)]
        let whole = vec![0..6];
        let splits = [
            (vec![0..3, 3..6], whole.clone()),
            (vec![0..2, 2..6], whole),
            (vec![0..3, 3..6], vec![0..2, 2..4, 4..6]),
        ];
        for (from, to) in splits {
            let mut old: Vec<Stage> = from.iter().map(|r| stage(&file, r.clone())).collect();
            // The old chain runs the prompt and three steps; the KV of the prompt and the
            // first step (positions 0..8) moves, although the old stages hold 10.
            let ran = run_steps(&mut old, 1, 0, &steps[..4]);
            assert_eq!(ran, reference[..4], "{from:?}");
            let n = prompt.len() + 1;
            let mut new: Vec<Stage> = to.iter().map(|r| stage(&file, r.clone())).collect();
            carry(&old, &mut new, 1, 9, n);
            let resumed = run_steps(&mut new, 9, n, &steps[2..]);
            assert_eq!(resumed, reference[2..], "{} {from:?} -> {to:?}", spec.architecture);
        }
        if let Some(window) = file.info().window_of(0) {
            let old = stage(&file, 0..6);
            let mut old = [old];
            run_steps(&mut old, 1, 0, &steps);
            let kv = old[0].export_kv(1, 0..6, 10).unwrap();
            let firsts: Vec<usize> = kv.iter().map(|l| l.first).collect();
            let w = 10 + 1 - window;
            assert_eq!(firsts, [w, w, w, w, w, 0], "sliding layers send their window only; layer 5 is global");
        }
    }

    #[test]
    fn a_forked_sequence_continues_as_its_source_on_every_family() {
        // Gemma's sliding layers copy only what their window of 3 reaches.
        for spec in [SyntheticModel { layers: 6, ..SyntheticModel::tiny() }, SyntheticModel::gemma3_tiny()] {
            let (_dir, file) = model(&spec);
            let prefix: &[u32] = &[5, 80, 120, 33, 7, 250];
            let steps: [&[u32]; 4] = [prefix, &[2], &[17], &[99]];
            let mut chain = [stage(&file, 0..3), stage(&file, 3..6)];
            let reference = run_steps(&mut chain, 1, 0, &steps);
            // The source has gone three positions past the fork point.
            for s in chain.iter_mut() {
                s.fork(1, 2, prefix.len()).unwrap();
                assert_eq!((s.sequence_len(1), s.sequence_len(2)), (Some(9), Some(6)));
            }
            assert_eq!(run_steps(&mut chain, 2, prefix.len(), &steps[1..]), reference[1..], "{}", spec.architecture);
            let s = &mut chain[0];
            assert!(matches!(s.fork(7, 3, 2), Err(Error::UnknownSequence(7))));
            assert!(matches!(s.fork(1, 3, 10), Err(Error::KvPositions { asked: 10, .. })));
            assert_eq!(s.sequence_len(3), None, "a refused fork opens nothing");
        }
    }

    #[test]
    fn bad_kv_moves_are_refused_with_a_reason() {
        let (_dir, file) = model(&SyntheticModel { layers: 6, ..SyntheticModel::tiny() });
        let mut a = stage(&file, 0..3);
        a.forward(&[tokens(1, 0, &[1, 2, 3, 4])]).unwrap();
        assert!(matches!(a.export_kv(2, 0..3, 2), Err(Error::UnknownSequence(2))));
        assert!(matches!(a.export_kv(1, 0..3, 5), Err(Error::KvPositions { asked: 5, cached: 4, .. })));
        assert!(matches!(a.export_kv(1, 0..3, 0), Err(Error::KvPositions { asked: 0, .. })));
        assert!(matches!(a.export_kv(1, 2..4, 2), Err(Error::KvLayers { held_end: 3, .. })));
        let kv = a.export_kv(1, 0..3, 4).unwrap();
        assert_eq!(kv.len(), 3);
        let mut c = stage(&file, 0..3);
        let err = c.import_kv(1, kv[..2].to_vec()).unwrap_err();
        assert!(err.to_string().contains("exactly this stage's layers 0..3"), "{err}");
        let twice = vec![kv[0].clone(), kv[1].clone(), kv[1].clone()];
        assert!(c.import_kv(1, twice).unwrap_err().to_string().contains("twice"));
        let mut narrow = kv.clone();
        narrow[1].v = narrow[1].v.narrow(2, 0, 4).unwrap();
        assert!(c.import_kv(1, narrow).unwrap_err().to_string().contains("layer 1 V"));
        let mut half = kv.clone();
        half[2].k = half[2].k.to_dtype(DType::F16).unwrap();
        assert!(matches!(c.import_kv(1, half), Err(Error::KvShape(_))));
        assert_eq!(c.sequence_count(), 0, "a refused import leaves nothing behind");
        let mut other = stage(&file, 3..6);
        assert!(other.import_kv(1, kv.clone()).is_err());
        c.import_kv(1, kv).unwrap();
        assert_eq!(c.sequence_len(1), Some(4));
    }
}
