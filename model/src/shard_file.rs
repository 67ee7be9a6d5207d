//! Writing a GGUF file that holds only what one pipeline stage needs: the whole
//! metadata, the tensors of its layer range, and the shared tensors.
//!
//! A worker without a local copy of the model pulls such a file from the coordinator
//! instead of the whole model, and loads it with the ordinary [`Stage::load`]: the
//! metadata still describes the whole model (layer count, shapes, tokenizer), so the
//! stage knows where it sits in the pipeline.
//!
//! `token_embd.weight` goes only to the stages that read it: the first, and the last
//! when the head is tied to the embedding.
//!
//! [`Stage::load`]: crate::Stage::load

use std::io::{Seek, Write};
use std::ops::Range;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::QTensor;
use candle_core::Device;

use crate::error::{Error, Result};
use crate::gguf::{layer_of, ModelFile};

/// Metadata key holding the content hash of the whole model a shard was cut from.
pub const SOURCE_HASH_KEY: &str = "strata.shard.source_hash";
/// Metadata keys holding the layer range a shard carries.
pub const LAYER_START_KEY: &str = "strata.shard.layer_start";
pub const LAYER_END_KEY: &str = "strata.shard.layer_end";

/// What a shard file records about where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardOrigin {
    pub source_hash: String,
    pub layers: Range<usize>,
}

impl ShardOrigin {
    /// Reads the origin keys of a shard file; `None` for a whole model file.
    pub fn of(file: &ModelFile) -> Option<Self> {
        let md = file.metadata();
        let source_hash = match md.get(SOURCE_HASH_KEY) {
            Some(Value::String(s)) => s.clone(),
            _ => return None,
        };
        let get = |key: &str| match md.get(key) {
            Some(Value::U32(v)) => Some(*v as usize),
            _ => None,
        };
        Some(Self { source_hash, layers: get(LAYER_START_KEY)?..get(LAYER_END_KEY)? })
    }
}

/// The tensors a stage over `layers` reads, in the order they sit in `file`.
pub fn stage_tensor_names(file: &ModelFile, layers: Range<usize>) -> Result<Vec<String>> {
    let n = file.info().layers;
    if layers.start >= layers.end || layers.end > n {
        return Err(Error::LayerRange { start: layers.start, end: layers.end, layers: n });
    }
    let first = layers.start == 0;
    let last = layers.end == n;
    let tied = file.info().tied_embedding;
    let mut names: Vec<String> = file
        .tensor_names()
        .filter(|name| match layer_of(name) {
            Some(layer) => layers.contains(&layer),
            None if name.starts_with("output") => last,
            None if *name == "token_embd.weight" => first || (last && tied),
            // Shared tensors (`rope_freqs.weight`).
            None => true,
        })
        .map(str::to_string)
        .collect();
    // Sorted, so the same range always gives the same bytes.
    names.sort();
    Ok(names)
}

/// Writes the shard of `file` for `layers` to `out`: the whole metadata plus the
/// origin keys, and the tensors [`stage_tensor_names`] lists. Returns those names.
pub fn write_shard<W: Write + Seek>(
    file: &ModelFile,
    layers: Range<usize>,
    source_hash: &str,
    out: &mut W,
) -> Result<Vec<String>> {
    let names = stage_tensor_names(file, layers.clone())?;
    let mut reader = file.reader()?;
    let tensors: Vec<(String, QTensor)> = names
        .iter()
        .map(|name| Ok((name.clone(), file.load_tensor(&mut reader, name, &Device::Cpu)?)))
        .collect::<Result<_>>()?;
    let mut metadata: Vec<(String, Value)> = file
        .metadata()
        .iter()
        .filter(|(k, _)| !k.starts_with("strata.shard."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata.push((SOURCE_HASH_KEY.into(), Value::String(source_hash.to_string())));
    metadata.push((LAYER_START_KEY.into(), Value::U32(layers.start as u32)));
    metadata.push((LAYER_END_KEY.into(), Value::U32(layers.end as u32)));
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    let md_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(out, &md_refs, &t_refs)?;
    Ok(names)
}

#[cfg(test)]
mod tests {
    use std::io::BufWriter;

    use super::*;
    use crate::stage::{StageInput, StageOptions, StageOutput, StageStep};
    use crate::synthetic::SyntheticModel;
    use crate::Stage;

    fn write_shard_to(file: &ModelFile, layers: Range<usize>, path: &std::path::Path) -> Vec<String> {
        let mut out = BufWriter::new(std::fs::File::create(path).unwrap());
        let names = write_shard(file, layers, "abc123", &mut out).unwrap();
        out.flush().unwrap();
        names
    }

    #[test]
    fn a_stage_from_its_shard_computes_what_it_computes_from_the_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let spec = SyntheticModel { layers: 6, ..SyntheticModel::tiny() };
        let whole = ModelFile::open(spec.write_to(dir.path()).unwrap()).unwrap();
        let ranges = [0..2, 2..5, 5..6];
        let mut from_whole = Vec::new();
        let mut from_shards = Vec::new();
        for (i, r) in ranges.iter().enumerate() {
            let path = dir.path().join(format!("shard-{i}.gguf"));
            let names = write_shard_to(&whole, r.clone(), &path);
            assert!(names.iter().all(|n| layer_of(n).is_none_or(|l| r.contains(&l))), "{names:?}");
            // Only stages that read the embedding carry it (the last uses it as its tied head).
            assert_eq!(names.iter().any(|n| n == "token_embd.weight"), i != 1, "{names:?}");
            let shard = ModelFile::open(&path).unwrap();
            assert_eq!(shard.info(), whole.info());
            assert_eq!(ShardOrigin::of(&shard), Some(ShardOrigin { source_hash: "abc123".into(), layers: r.clone() }));
            assert_eq!(ShardOrigin::of(&whole), None);
            assert!(std::fs::metadata(&path).unwrap().len() < std::fs::metadata(whole.path()).unwrap().len());
            from_whole.push(Stage::load(&whole, r.clone(), &Device::Cpu, StageOptions::default()).unwrap());
            from_shards.push(Stage::load(&shard, r.clone(), &Device::Cpu, StageOptions::default()).unwrap());
            // A shard holds its range and nothing more.
            assert!(Stage::load(&shard, 0..6, &Device::Cpu, StageOptions::default()).is_err());
        }
        let run = |stages: &mut [Stage], position: usize, tokens: &[u32]| -> Vec<f32> {
            let mut step = StageStep { seq: 1, position, input: StageInput::Tokens(tokens.to_vec()) };
            for stage in stages.iter_mut() {
                match stage.forward(std::slice::from_ref(&step)).unwrap().pop().unwrap() {
                    StageOutput::Hidden(h) => step.input = StageInput::Hidden(h),
                    StageOutput::Logits(l) => return l.to_vec1().unwrap(),
                }
            }
            panic!("no logits")
        };
        assert_eq!(run(&mut from_whole, 0, &[3, 14, 15, 92]), run(&mut from_shards, 0, &[3, 14, 15, 92]));
        assert_eq!(run(&mut from_whole, 4, &[65]), run(&mut from_shards, 4, &[65]));
    }

    #[test]
    fn the_same_range_always_gives_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let whole = ModelFile::open(SyntheticModel::tiny().write_to(dir.path()).unwrap()).unwrap();
        let (a, b) = (dir.path().join("a.gguf"), dir.path().join("b.gguf"));
        write_shard_to(&whole, 1..3, &a);
        write_shard_to(&whole, 1..3, &b);
        assert_eq!(std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
        assert!(matches!(stage_tensor_names(&whole, 3..9), Err(Error::LayerRange { .. })));
    }
}
