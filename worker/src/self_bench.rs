//! A short benchmark at start: how many bytes of weights per second this worker's
//! device reads through our own linear layer, one token at a time.
//!
//! Decoding reads every weight once per token with a matrix-vector product, so
//! this is what the planner calls a device's memory bandwidth (decode time ≈ weight
//! bytes ÷ it). It is measured rather than looked up because on a CPU the kernels,
//! the thread count and the quantization type decide it as much as the memory does.
//!
//! The weights are in the model's own type: the type most layer tensors of the
//! first `--model` have, else [`DEFAULT_DTYPE`]. They are several matrices that
//! together are far larger than the L2 caches, read in turn, so each product starts
//! cold. Results are cached per device, type, thread count and strata version in
//! `self-bench.json` in the worker's cache folder, so a restart costs nothing.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use serde::{Deserialize, Serialize};
use strata_model::linear::Linear;
use strata_model::{Device, ModelFile, Tensor};

/// The type benchmarked when no model is given. Models served across several
/// machines are nearly always 4-bit; Q4_0 is the plain 4-bit type, which our
/// packed CPU kernels and candle's CUDA kernels both run, and on a CPU 4-bit
/// weights cost more arithmetic per byte than 8-bit ones, so the figure errs low
/// rather than promise a speed a 4-bit model would not reach.
pub const DEFAULT_DTYPE: GgmlDType = GgmlDType::Q4_0;

/// The cache file, in the worker's cache folder.
pub const CACHE_FILE: &str = "self-bench.json";

/// Whether to measure at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BenchMode {
    /// Use the cached figure if there is one, else measure (the default).
    #[default]
    Cached,
    /// Measure even if a figure is cached (`--rebench`).
    Rerun,
    /// Do not measure; the bandwidth is reported as 0, unknown (`--no-bench`).
    Skip,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Model(#[from] strata_model::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("the benchmark measured nothing")]
    Empty,
}

/// The size of a run: `matrices` matrices of about `matrix_bytes` each, with
/// `cols` inputs, read in turn for at least `duration`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BenchSize {
    pub matrices: usize,
    pub matrix_bytes: usize,
    pub cols: usize,
    pub duration: Duration,
}

impl BenchSize {
    /// What a start-up run uses: 4 × 32 MiB on a CPU, four times a desktop CPU's L3
    /// (16 to 36 MB), and about half a second with the set-up (repacking is the
    /// slow part); 4 × 64 MiB on a GPU, past even an H100's 50 MB L2. 4096 inputs
    /// divide into every quantized block. A server with a very large L3 reads part
    /// of 128 MiB from it: the 2-core Xeon VM strata is developed on (480 MiB L3
    /// reported) measured 39 GB/s with 2 threads at 4 × 32 MiB, 24 GB/s at 4 × 64
    /// and 4 × 128 MiB, whose set-up takes twice and four times as long.
    pub fn for_device(device: &Device) -> Self {
        let matrix_bytes = if device.is_cpu() { 32 << 20 } else { 64 << 20 };
        Self {
            matrices: 4,
            matrix_bytes,
            cols: 4096,
            duration: Duration::from_millis(100),
        }
    }
}

/// One measurement.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    /// Bytes of weights (as stored in the GGUF type) read per second, best pass.
    pub bytes_per_second: f64,
    /// Weight bytes one pass reads.
    pub pass_bytes: u64,
    pub passes: usize,
}

/// Runs the benchmark on `device`. The compute pool must already be sized
/// (`CANDLE_NUM_THREADS`), as it is for the worker's own compute.
pub fn measure(
    device: &Device,
    dtype: GgmlDType,
    size: BenchSize,
) -> Result<Measurement, BenchError> {
    let setup = Instant::now();
    let block = dtype.block_size();
    let cols = size.cols.div_ceil(block) * block;
    let row_bytes = cols / block * dtype.type_size();
    // Rows come in tiles of 64: one quantized tile, repeated. Quantizing the whole
    // matrix would take longer than the measurement.
    const TILE: usize = 64;
    let rows = (size.matrix_bytes / row_bytes).div_ceil(TILE).max(1) * TILE;
    let tile = QTensor::quantize(
        &Tensor::randn(0f32, 1f32, (TILE, cols), &Device::Cpu)?,
        dtype,
    )?;
    let tile = tile.data()?;
    let mut bytes = Vec::with_capacity(tile.len() * rows / TILE);
    for _ in 0..rows / TILE {
        bytes.extend_from_slice(&tile);
    }
    let mut layers = Vec::with_capacity(size.matrices);
    for _ in 0..size.matrices {
        let storage = QStorage::from_data(Cow::Borrowed(&bytes), device, dtype)?;
        layers.push(Linear::new(QTensor::new(storage, (rows, cols))?, None)?);
    }
    drop(bytes);
    let pass_bytes = (size.matrices * rows * row_bytes) as u64;
    // Made on the CPU and copied: a GPU's own randn would need cuRAND.
    let x = Tensor::randn(0f32, 1f32, (1, cols), &Device::Cpu)?.to_device(device)?;
    let pass = || -> Result<f64, BenchError> {
        let start = Instant::now();
        for layer in &layers {
            drop(layer.forward(&x)?);
        }
        device.synchronize()?;
        Ok(start.elapsed().as_secs_f64())
    };
    let setup = setup.elapsed();
    pass()?; // Warm-up: first touches, the pool's threads waking.
    let (started, mut best, mut passes) = (Instant::now(), f64::INFINITY, 0);
    // The best pass: a shared machine only ever slows a pass down.
    while passes < 3 || started.elapsed() < size.duration {
        best = best.min(pass()?);
        passes += 1;
    }
    let bytes_per_second = pass_bytes as f64 / best;
    if !(bytes_per_second.is_finite() && bytes_per_second > 0.0) {
        return Err(BenchError::Empty);
    }
    tracing::debug!(?setup, passes, best_pass = ?Duration::from_secs_f64(best), pass_bytes, "self-benchmark");
    Ok(Measurement {
        bytes_per_second,
        pass_bytes,
        passes,
    })
}

/// The type most of the model's layer tensors have (`blk.N.*`, by count: a
/// layer's matrices outnumber its norms), or `None` if it has no layers.
pub fn model_dtype(model: &ModelFile) -> Option<GgmlDType> {
    let mut counts: Vec<(GgmlDType, usize)> = Vec::new();
    for name in model.tensor_names().filter(|n| n.starts_with("blk.")) {
        let Some(dtype) = model.tensor_dtype(name) else {
            continue;
        };
        match counts.iter_mut().find(|(d, _)| *d == dtype) {
            Some((_, n)) => *n += 1,
            None => counts.push((dtype, 1)),
        }
    }
    counts.into_iter().max_by_key(|&(_, n)| n).map(|(d, _)| d)
}

/// What a cached figure was measured for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BenchKey {
    /// `cpu Intel(R) Xeon(R) ...`, `cuda:0 NVIDIA H100 ...`: the device and what it is,
    /// so a cache folder copied to another machine is not believed.
    pub device: String,
    /// `Q4_0`.
    pub dtype: String,
    /// The compute threads (0 for a GPU, where they do not matter).
    pub threads: usize,
    /// The strata version: kernels change between versions.
    pub version: String,
}

impl BenchKey {
    pub fn new(device: String, dtype: GgmlDType, threads: usize) -> Self {
        Self {
            device,
            dtype: format!("{dtype:?}"),
            threads,
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct CacheFile {
    entries: Vec<CacheEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct CacheEntry {
    #[serde(flatten)]
    key: BenchKey,
    bytes_per_second: f64,
}

/// The figures measured before, in `<cache dir>/self-bench.json`.
#[derive(Debug, Clone)]
pub struct BenchCache {
    path: PathBuf,
}

impl BenchCache {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            path: dir.join(CACHE_FILE),
        }
    }

    /// The cached figure for `key`; `None` when there is none or the file is unreadable.
    pub fn get(&self, key: &BenchKey) -> Option<f64> {
        self.read()
            .entries
            .into_iter()
            .find(|e| e.key == *key)
            .map(|e| e.bytes_per_second)
    }

    /// Stores (or replaces) the figure for `key`; written whole and renamed into
    /// place, so a worker starting beside this one never reads half a file.
    pub fn put(&self, key: &BenchKey, bytes_per_second: f64) -> std::io::Result<()> {
        let mut file = self.read();
        file.entries.retain(|e| e.key != *key);
        file.entries.push(CacheEntry {
            key: key.clone(),
            bytes_per_second,
        });
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self
            .path
            .with_extension(format!("json.{}.tmp", std::process::id()));
        std::fs::write(&tmp, serde_json::to_vec_pretty(&file)?)?;
        std::fs::rename(&tmp, &self.path)
    }

    fn read(&self) -> CacheFile {
        std::fs::read(&self.path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }
}

/// Where a start-up figure came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BenchSource {
    Cached,
    Measured,
    /// `--no-bench`.
    Skipped,
    /// The benchmark failed; the reason.
    Failed(String),
}

/// The bandwidth for `key` by `mode`: from the cache, or by running `run` and
/// caching its figure. 0 (unknown) when skipped or failed.
pub fn bandwidth(
    mode: BenchMode,
    cache: &BenchCache,
    key: &BenchKey,
    run: impl FnOnce() -> Result<Measurement, BenchError>,
) -> (f64, BenchSource) {
    if mode == BenchMode::Skip {
        return (0.0, BenchSource::Skipped);
    }
    if mode == BenchMode::Cached {
        if let Some(bps) = cache.get(key) {
            return (bps, BenchSource::Cached);
        }
    }
    match run() {
        Ok(m) => {
            if let Err(e) = cache.put(key, m.bytes_per_second) {
                tracing::warn!(error = %e, "cannot cache the self-benchmark's result");
            }
            (m.bytes_per_second, BenchSource::Measured)
        }
        // candle appends a backtrace to some messages; the first line says it.
        Err(e) => (
            0.0,
            BenchSource::Failed(e.to_string().lines().next().unwrap_or_default().to_string()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use strata_model::synthetic::SyntheticModel;

    use super::*;

    fn tiny() -> BenchSize {
        BenchSize {
            matrices: 2,
            matrix_bytes: 64 << 10,
            cols: 256,
            duration: Duration::from_millis(5),
        }
    }

    #[test]
    fn a_tiny_run_gives_a_positive_finite_figure() {
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::F16,
        ] {
            let m = measure(&Device::Cpu, dtype, tiny()).unwrap();
            assert!(
                m.bytes_per_second.is_finite() && m.bytes_per_second > 0.0,
                "{dtype:?}: {m:?}"
            );
            assert!(m.passes >= 3);
            // 2 matrices of 64 KiB each, give or take one 64-row tile.
            assert!(
                m.pass_bytes >= 2 * (64 << 10) && m.pass_bytes < 4 * (64 << 10),
                "{dtype:?}: {m:?}"
            );
        }
    }

    #[test]
    fn the_model_dtype_is_that_of_most_layer_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let model = SyntheticModel {
            dtype: GgmlDType::Q4_1,
            ..SyntheticModel::tiny()
        };
        let file = ModelFile::open(model.write_to(dir.path()).unwrap()).unwrap();
        assert_eq!(
            model_dtype(&file),
            Some(GgmlDType::Q4_1),
            "the norms are F32 but fewer"
        );
    }

    #[test]
    fn the_cache_round_trips_and_keys_on_dtype_threads_and_device() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BenchCache::in_dir(&dir.path().join("nested"));
        let key = BenchKey::new("cpu test".into(), GgmlDType::Q4_0, 2);
        assert_eq!(cache.get(&key), None);
        cache.put(&key, 1.5e10).unwrap();
        assert_eq!(cache.get(&key), Some(1.5e10));
        let others = [
            BenchKey::new("cpu test".into(), GgmlDType::Q4_1, 2),
            BenchKey::new("cpu test".into(), GgmlDType::Q4_0, 1),
            BenchKey::new("cpu other".into(), GgmlDType::Q4_0, 2),
        ];
        for other in &others {
            assert_eq!(cache.get(other), None, "{other:?}");
        }
        cache.put(&others[0], 7e9).unwrap();
        cache.put(&key, 2e10).unwrap();
        assert_eq!(
            (cache.get(&key), cache.get(&others[0])),
            (Some(2e10), Some(7e9)),
            "replaced, not duplicated"
        );
        std::fs::write(dir.path().join("nested").join(CACHE_FILE), "not json").unwrap();
        assert_eq!(cache.get(&key), None, "a damaged file is a miss");
        cache.put(&key, 3e10).unwrap();
        assert_eq!(cache.get(&key), Some(3e10), "and is rewritten");
    }

    #[test]
    fn modes_decide_between_cache_and_measuring() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BenchCache::in_dir(dir.path());
        let key = BenchKey::new("cpu test".into(), GgmlDType::Q4_0, 1);
        let runs = Cell::new(0);
        let run = |bps: f64| {
            let runs = &runs;
            move || {
                runs.set(runs.get() + 1);
                Ok(Measurement {
                    bytes_per_second: bps,
                    pass_bytes: 1,
                    passes: 3,
                })
            }
        };
        // (mode, what a run would measure, the figure and source expected), in order.
        let steps = [
            (BenchMode::Skip, 1.0, (0.0, BenchSource::Skipped)),
            (BenchMode::Cached, 5.0, (5.0, BenchSource::Measured)),
            (BenchMode::Cached, 6.0, (5.0, BenchSource::Cached)),
            (BenchMode::Rerun, 7.0, (7.0, BenchSource::Measured)),
            (BenchMode::Cached, 8.0, (7.0, BenchSource::Cached)),
        ];
        for (i, (mode, measured, expected)) in steps.into_iter().enumerate() {
            assert_eq!(
                bandwidth(mode, &cache, &key, run(measured)),
                expected,
                "step {i}"
            );
        }
        assert_eq!(runs.get(), 2);
        let (bps, source) = bandwidth(BenchMode::Rerun, &cache, &key, || Err(BenchError::Empty));
        assert_eq!(
            (bps, source),
            (
                0.0,
                BenchSource::Failed("the benchmark measured nothing".into())
            )
        );
        assert_eq!(
            cache.get(&key),
            Some(7.0),
            "a failure leaves the cached figure alone"
        );
    }
}
