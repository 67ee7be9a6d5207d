//! Finding the weights for a shard: a local GGUF with the same content hash, a shard
//! pulled earlier (cached on disk by hash and range), or a fresh pull from the
//! coordinator's FetchWeights stream, checked against the SHA-256 in its manifest.
//!
//! A worker that already holds some of the shard's layers for another pipeline (a
//! re-plan loads the new pipeline beside the old) pulls only the layer ranges it
//! lacks, one FetchWeights call each.
//!
//! * [`pull`]: the FetchWeights client, which resumes a cut pull;
//! * [`partial`]: the partial file a pull writes, and who may write it;
//! * [`progress`]: the pulls under way, for progress events and heartbeats.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

pub use strata_proto::content_hash::{hex, sha256_file};
use strata_proto::v1::ModelRef;
use strata_proto::WorkerError;
use tokio::sync::Mutex;

pub mod partial;
pub mod progress;
pub mod pull;
pub mod stream_order;

pub use partial::partial_path;
pub use progress::Pulls;
pub use pull::{pull, Pulled};

/// A file to read a shard's weights from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightFile {
    pub path: PathBuf,
    /// For a pulled shard file, the layers it was cut for (which its origin keys must
    /// say); `None` for a whole model file.
    pub pulled: Option<Range<usize>>,
}

/// Where a shard's weights were found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// The files holding whatever the worker does not hold yet: none when it holds
    /// every part already.
    pub files: Vec<WeightFile>,
    /// A whole model file of this machine, rather than pulled shards.
    pub local: bool,
}

/// Content hashes of the worker's `--model` files, computed once each.
#[derive(Debug, Default)]
pub struct LocalModels {
    paths: Vec<PathBuf>,
    hashes: Mutex<HashMap<PathBuf, String>>,
}

impl LocalModels {
    pub fn new(paths: Vec<PathBuf>) -> Self {
        Self { paths, hashes: Mutex::default() }
    }

    /// Every local model with its hash; hashing runs off the async threads.
    pub async fn hashes(&self) -> Result<Vec<(PathBuf, String)>, WorkerError> {
        let mut memo = self.hashes.lock().await;
        let mut out = Vec::new();
        for path in &self.paths {
            if let Some(h) = memo.get(path) {
                out.push((path.clone(), h.clone()));
                continue;
            }
            let p = path.clone();
            let hash = tokio::task::spawn_blocking(move || sha256_file(&p))
                .await
                .map_err(|e| WorkerError::Internal(e.to_string()))?
                .map_err(|e| WorkerError::ModelUnavailable(format!("{}: {e}", path.display())))?;
            memo.insert(path.clone(), hash.clone());
            out.push((path.clone(), hash));
        }
        Ok(out)
    }
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The cache file of a shard: `<cache>/<hash>/layers-<start>-<end>.gguf` (and
/// [`partial_path`] while it is pulled).
pub fn cache_path(cache_dir: &Path, hash: &str, layers: &Range<usize>) -> PathBuf {
    cache_dir.join(hash).join(format!("layers-{}-{}.gguf", layers.start, layers.end))
}

/// Finds or fetches the weights of `layers` of `model`, of which the worker lacks
/// only what the shard files of `missing` hold (see `WeightStore::ranges_to_fetch`).
pub async fn locate(
    local: &LocalModels,
    cache_dir: &Path,
    model: &ModelRef,
    layers: &Range<usize>,
    missing: &[Range<usize>],
    weights_source: &str,
    pulls: &Pulls,
) -> Result<Located, WorkerError> {
    // The hash names a folder below: refuse anything but hex so it cannot escape it.
    if !is_sha256_hex(&model.content_hash) {
        return Err(WorkerError::InvalidShard(format!(
            "model content hash {:?} is not a lowercase hex SHA-256",
            model.content_hash
        )));
    }
    let locals = local.hashes().await?;
    if let Some((path, _)) = locals.iter().find(|(_, h)| *h == model.content_hash) {
        return Ok(Located { files: vec![WeightFile { path: path.clone(), pulled: None }], local: true });
    }
    // A whole shard pulled earlier holds everything; no need to pull parts of it.
    let whole = cache_path(cache_dir, &model.content_hash, layers);
    if whole.is_file() && !missing.is_empty() {
        tracing::info!(path = %whole.display(), "using the cached shard");
        return Ok(Located { files: vec![WeightFile { path: whole, pulled: Some(layers.clone()) }], local: false });
    }
    let mut files = Vec::with_capacity(missing.len());
    for range in missing {
        let cached = cache_path(cache_dir, &model.content_hash, range);
        if cached.is_file() {
            tracing::info!(path = %cached.display(), "using the cached shard");
        } else if weights_source.is_empty() {
            return Err(match locals.first() {
                Some((path, got)) => WorkerError::ModelHashMismatch {
                    expected: format!("{} ({})", model.content_hash, model.model_id),
                    got: format!("{got} ({}), and no weights source was given to pull from", path.display()),
                },
                None => WorkerError::ModelUnavailable(format!(
                    "{} ({}) is not on this worker and no weights source was given",
                    model.model_id, model.content_hash
                )),
            });
        } else {
            pull(weights_source, model, range, &cached, pulls).await?;
        }
        files.push(WeightFile { path: cached, pulled: Some(range.clone()) });
    }
    Ok(Located { files, local: false })
}
