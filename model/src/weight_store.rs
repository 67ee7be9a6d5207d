//! Weights shared between the stages of one process.
//!
//! A re-plan loads a pipeline's new stage beside the old one and drops the old one
//! only once requests have switched (make before break). The two usually overlap in
//! most of their layers: a [`WeightStore`] lets the new stage take the layers, the
//! embedding and the head the old one already holds instead of loading them again,
//! so a switch costs the memory of the layers it adds, not of a second copy.
//!
//! Parts are keyed by the model's content hash (which fixes every tensor's bytes and
//! type, hence how it is packed), the device location, and the part. The store keeps
//! only weak references: a part's memory is freed when the last stage using it is
//! dropped, and the store then forgets it. KV caches are never shared: they belong to
//! a stage (a pipeline) and its sequences.

use std::any::Any;
use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::sync::{Arc, Mutex, Weak};

use candle_core::{Device, DeviceLocation};

use crate::gguf::ModelInfo;
use crate::tokenizer::Tokenizer;

/// One shareable piece of a stage's weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Part {
    /// `token_embd.weight` as the first stage's lookup table.
    Embedding,
    /// Every `blk.N.*` tensor of layer N.
    Layer(usize),
    /// The final norm and the output head (the token embedding when tied).
    Head,
    /// The RoPE parameters, with `rope_freqs.weight` where the model has it.
    Rope,
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Embedding => f.write_str("the token embedding"),
            Self::Layer(i) => write!(f, "layer {i}"),
            Self::Head => f.write_str("the output head"),
            Self::Rope => f.write_str("the rope parameters"),
        }
    }
}

/// The parts a stage over `layers` holds, in load order.
pub(crate) fn stage_parts(info: &ModelInfo, layers: Range<usize>) -> Vec<Part> {
    let first = layers.start == 0;
    let last = layers.end == info.layers;
    let mut parts = Vec::with_capacity(layers.len() + 3);
    // A stage that is both first and last with a tied head embeds through its head,
    // so the matrix is held once.
    if first && !(last && info.tied_embedding) {
        parts.push(Part::Embedding);
    }
    parts.extend(layers.map(Part::Layer));
    if last {
        parts.push(Part::Head);
    }
    parts.push(Part::Rope);
    parts
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    model: String,
    device: DeviceLocation,
    part: Part,
}

struct Entry {
    value: Weak<dyn Any + Send + Sync>,
    bytes: u64,
}

#[derive(Default)]
struct Inner {
    parts: HashMap<Key, Entry>,
    /// The first device opened at each location. candle tells CUDA devices apart by
    /// the handle, not the ordinal: tensors of two handles on one GPU cannot meet in
    /// an op, so every stage on a location computes on the same handle.
    devices: HashMap<DeviceLocation, Device>,
    /// Each model's hyper-parameters, so a stage whose parts are all here needs no
    /// file to read them from.
    infos: HashMap<String, ModelInfo>,
    /// Each model's tokenizer, read by a last stage from a file: a last stage whose
    /// parts are all here constrains its sampling with it too.
    tokenizers: HashMap<String, Arc<Tokenizer>>,
}

impl Inner {
    /// Forgets the parts no stage holds any more, and the models left with none.
    fn prune(&mut self) {
        self.parts.retain(|_, e| e.value.strong_count() > 0);
        let parts = &self.parts;
        self.infos.retain(|model, _| parts.keys().any(|k| &k.model == model));
        self.tokenizers.retain(|model, _| parts.keys().any(|k| &k.model == model));
    }
}

/// The weights the stages of this process hold, by model, device and part.
#[derive(Default)]
pub struct WeightStore {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for WeightStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightStore").field("resident_bytes", &self.resident_bytes()).finish()
    }
}

impl WeightStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The maps stay consistent if a thread panicked while holding the lock: every
        // change is a single insert or retain.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Bytes of the weights some stage holds, each shared part counted once. Sizes
    /// are the parts' GGUF tensor bytes, as [`crate::TensorSizes`] counts them.
    pub fn resident_bytes(&self) -> u64 {
        let mut inner = self.lock();
        inner.prune();
        inner.parts.values().map(|e| e.bytes).sum()
    }

    /// The device stages at `device`'s location compute on (the first one seen).
    pub(crate) fn device(&self, device: &Device) -> Device {
        self.lock().devices.entry(device.location()).or_insert_with(|| device.clone()).clone()
    }

    /// The hyper-parameters of `model`, while some stage holds a part of it.
    pub fn model_info(&self, model: &str) -> Option<ModelInfo> {
        let mut inner = self.lock();
        inner.prune();
        inner.infos.get(model).cloned()
    }

    pub(crate) fn remember_info(&self, model: &str, info: &ModelInfo) {
        self.lock().infos.entry(model.to_string()).or_insert_with(|| info.clone());
    }

    /// The tokenizer of `model` a stage remembered, while some stage holds a part of it.
    pub fn tokenizer(&self, model: &str) -> Option<Arc<Tokenizer>> {
        let mut inner = self.lock();
        inner.prune();
        inner.tokenizers.get(model).cloned()
    }

    /// Keeps `tokenizer` for the next stage of `model` that loads without a file;
    /// call it once the stage holds its parts.
    pub fn remember_tokenizer(&self, model: &str, tokenizer: Arc<Tokenizer>) {
        self.lock().tokenizers.entry(model.to_string()).or_insert(tokenizer);
    }

    /// Whether some stage holds `part` of `model` on `device`'s location.
    pub fn holds(&self, model: &str, device: &Device, part: Part) -> bool {
        let key = Key { model: model.to_string(), device: device.location(), part };
        self.lock().parts.get(&key).is_some_and(|e| e.value.strong_count() > 0)
    }

    /// The part, if some stage holds it; with its bytes.
    pub(crate) fn get<T: Send + Sync + 'static>(
        &self,
        model: &str,
        device: &Device,
        part: Part,
    ) -> Option<(Arc<T>, u64)> {
        let key = Key { model: model.to_string(), device: device.location(), part };
        let inner = self.lock();
        let entry = inner.parts.get(&key)?;
        let value = entry.value.upgrade()?.downcast::<T>().ok()?;
        Some((value, entry.bytes))
    }

    /// Shares a freshly loaded part. Should another stage have put the same part in
    /// meanwhile, that one is returned (and `value` dropped) so the part is held once;
    /// the flag says whether `value` was kept.
    pub(crate) fn insert<T: Send + Sync + 'static>(
        &self,
        model: &str,
        device: &Device,
        part: Part,
        value: T,
        bytes: u64,
    ) -> (Arc<T>, bool) {
        let key = Key { model: model.to_string(), device: device.location(), part };
        let mut inner = self.lock();
        if let Some(existing) = inner.parts.get(&key).and_then(|e| e.value.upgrade()?.downcast::<T>().ok()) {
            return (existing, false);
        }
        let value = Arc::new(value);
        let any: Arc<dyn Any + Send + Sync> = value.clone();
        inner.parts.insert(key, Entry { value: Arc::downgrade(&any), bytes });
        (value, true)
    }

    /// The layer ranges to fetch as shard files (whose layout [`crate::shard_file`]
    /// fixes) so that every part a stage over `layers` of `model` needs is either held
    /// here or in one of them. Contiguous missing layers make one range; the range
    /// of a missing embedding starts at layer 0, that of a missing head ends at the
    /// last layer, which may mean fetching a layer already held. A model the store
    /// knows nothing of needs the whole range.
    pub fn ranges_to_fetch(&self, model: &str, device: &Device, layers: Range<usize>) -> Vec<Range<usize>> {
        let Some(info) = self.model_info(model) else {
            return vec![layers];
        };
        if layers.start >= layers.end || layers.end > info.layers {
            return vec![layers];
        }
        let mut wanted = BTreeSet::new();
        let mut rope_missing = false;
        for part in stage_parts(&info, layers.clone()) {
            if self.holds(model, device, part) {
                continue;
            }
            let layer = match part {
                Part::Layer(i) => i,
                Part::Embedding => 0,
                Part::Head => info.layers - 1,
                Part::Rope => {
                    rope_missing = true;
                    continue;
                }
            };
            wanted.insert(layer);
        }
        // Every shard file carries the shared tensors.
        if rope_missing && wanted.is_empty() {
            wanted.insert(layers.start);
        }
        let mut ranges: Vec<Range<usize>> = Vec::new();
        for i in wanted {
            match ranges.last_mut() {
                Some(r) if r.end == i => r.end = i + 1,
                _ => ranges.push(i..i + 1),
            }
        }
        ranges
    }
}

#[cfg(test)]
// The lists of ranges below are meant to hold one range.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use crate::gguf::ModelFile;
    use crate::synthetic::SyntheticModel;

    #[test]
    fn a_part_lives_while_a_holder_does_and_is_counted_once() {
        let store = WeightStore::new();
        let cpu = Device::Cpu;
        let (a, kept) = store.insert("m", &cpu, Part::Layer(3), vec![1u8; 10], 10);
        assert!(kept);
        let (b, kept) = store.insert("m", &cpu, Part::Layer(3), vec![2u8; 10], 10);
        assert!(!kept, "a second copy of a held part is dropped");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(store.resident_bytes(), 10);
        // Another model, or another part, is another entry.
        let (_c, _) = store.insert("n", &cpu, Part::Layer(3), vec![0u8; 4], 4);
        assert_eq!(store.resident_bytes(), 14);
        assert!(store.get::<Vec<u8>>("m", &cpu, Part::Layer(4)).is_none());
        assert!(store.get::<String>("m", &cpu, Part::Layer(3)).is_none(), "a part of another type");
        drop(a);
        assert_eq!(store.get::<Vec<u8>>("m", &cpu, Part::Layer(3)).map(|(v, n)| (v[0], n)), Some((1, 10)));
        drop(b);
        assert!(!store.holds("m", &cpu, Part::Layer(3)));
        assert_eq!(store.resident_bytes(), 4);
    }

    #[test]
    fn only_the_missing_parts_are_fetched() {
        let dir = tempfile::tempdir().unwrap();
        let file = ModelFile::open(SyntheticModel { layers: 8, ..SyntheticModel::tiny() }.write_to(dir.path()).unwrap())
            .unwrap();
        let info = file.info();
        let store = WeightStore::new();
        let cpu = Device::Cpu;
        assert_eq!(store.ranges_to_fetch("m", &cpu, 2..8), [2..8], "an unknown model is fetched whole");
        store.remember_info("m", info);
        let mut held = Vec::new();
        for part in stage_parts(info, 2..6) {
            held.push(store.insert("m", &cpu, part, (), 1).0);
        }
        assert_eq!(store.ranges_to_fetch("m", &cpu, 2..8), [6..8]);
        assert_eq!(store.ranges_to_fetch("m", &cpu, 3..5), Vec::<Range<usize>>::new());
        // The embedding comes with a shard that starts at layer 0.
        assert_eq!(store.ranges_to_fetch("m", &cpu, 0..4), [0..2]);
        held.push(store.insert("m", &cpu, Part::Layer(7), (), 1).0);
        assert_eq!(store.ranges_to_fetch("m", &cpu, 1..8), [1..2, 6..8]);
        // The head comes with a shard that ends at the last layer.
        assert_eq!(store.ranges_to_fetch("m", &cpu, 4..8), [6..8]);
        drop(held);
        assert_eq!(store.ranges_to_fetch("m", &cpu, 3..5), [3..5], "nothing held: the model is forgotten");
    }
}
