//! Finding the weights for a shard: a local GGUF with the same content hash, a shard
//! pulled earlier (cached on disk by hash and range), or a fresh pull from the
//! coordinator's FetchWeights stream, checked against the SHA-256 in its manifest.
//!
//! A worker that already holds some of the shard's layers for another pipeline (a
//! re-plan loads the new pipeline beside the old) pulls only the layer ranges it
//! lacks, one FetchWeights call each.

use std::collections::HashMap;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use strata_proto::v1::coordinator_client::CoordinatorClient;
use strata_proto::v1::{weight_chunk, worker_event, FetchWeightsRequest, LoadProgress, ModelRef};
pub use strata_proto::content_hash::{hex, sha256_file};
use strata_proto::{WorkerError, MAX_MESSAGE_BYTES};
use tokio::sync::{mpsc, Mutex};

use crate::events::EventHub;

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

/// The cache file of a shard: `<cache>/<hash>/layers-<start>-<end>.gguf`.
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
    hub: &Arc<EventHub>,
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
            pull(weights_source, model, range, &cached, hub).await?;
        }
        files.push(WeightFile { path: cached, pulled: Some(range.clone()) });
    }
    Ok(Located { files, local: false })
}

/// Streams the shard from the coordinator into `dest`, checking its length and hash
/// before it is renamed into place.
async fn pull(
    source: &str,
    model: &ModelRef,
    layers: &Range<usize>,
    dest: &Path,
    hub: &Arc<EventHub>,
) -> Result<(), WorkerError> {
    let unavailable = |what: String| WorkerError::ModelUnavailable(format!("pulling from {source}: {what}"));
    let channel = crate::forwarder::connect(source.to_string()).await.map_err(unavailable)?;
    let mut client = CoordinatorClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let request = FetchWeightsRequest {
        model: Some(model.clone()),
        layer_start: layers.start as u32,
        layer_end: layers.end as u32,
    };
    let mut stream = client
        .fetch_weights(request)
        .await
        .map_err(|s| unavailable(format!("{:?}: {}", s.code(), s.message())))?
        .into_inner();
    let manifest = match stream.message().await {
        Ok(Some(chunk)) => match chunk.kind {
            Some(weight_chunk::Kind::Manifest(m)) => m,
            _ => return Err(unavailable("the stream did not start with a manifest".into())),
        },
        Ok(None) => return Err(unavailable("the stream ended before the manifest".into())),
        Err(s) => return Err(unavailable(s.message().to_string())),
    };
    let dir = dest.parent().ok_or_else(|| WorkerError::Internal("cache path has no folder".into()))?;
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| WorkerError::Internal(format!("creating {}: {e}", dir.display())))?;
    let partial = dest.with_extension(format!("partial-{}", std::process::id()));
    tracing::info!(model = %model.model_id, ?layers, bytes = manifest.total_bytes, "pulling weights from {source}");

    // Writing and hashing run on a blocking thread, fed chunk by chunk.
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(8);
    let writer_path = partial.clone();
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<(u64, String)> {
        let mut file = std::io::BufWriter::new(std::fs::File::create(&writer_path)?);
        let mut hasher = Sha256::new();
        let mut written = 0u64;
        while let Some(chunk) = rx.blocking_recv() {
            hasher.update(&chunk);
            file.write_all(&chunk)?;
            written += chunk.len() as u64;
        }
        file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok((written, hex(&hasher.finalize())))
    });
    let total = manifest.total_bytes;
    let mut done = 0u64;
    let mut next_log = 0u64;
    let received: Result<(), WorkerError> = async {
        loop {
            let chunk = match stream.message().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(s) => return Err(unavailable(s.message().to_string())),
            };
            let Some(weight_chunk::Kind::Data(data)) = chunk.kind else {
                return Err(unavailable("a second manifest in the stream".into()));
            };
            done += data.len() as u64;
            if done > total {
                return Err(unavailable(format!("more than the {total} bytes the manifest announced")));
            }
            tx.send(data).await.map_err(|_| WorkerError::Internal("the shard writer stopped".into()))?;
            hub.emit(worker_event::Kind::LoadProgress(LoadProgress { bytes_done: done, bytes_total: total }));
            if done >= next_log {
                tracing::info!(
                    "pulled {:.1} of {:.1} MiB ({:.0}%)",
                    done as f64 / 1048576.0,
                    total as f64 / 1048576.0,
                    100.0 * done as f64 / total.max(1) as f64
                );
                next_log = done + total / 10;
            }
        }
        Ok(())
    }
    .await;
    drop(tx);
    let written = writer.await.map_err(|e| WorkerError::Internal(e.to_string()))?;
    let cleanup = || {
        let _ = std::fs::remove_file(&partial);
    };
    if let Err(e) = received {
        cleanup();
        return Err(e);
    }
    let (bytes, sha) = match written {
        Ok(x) => x,
        Err(e) => {
            cleanup();
            return Err(WorkerError::Internal(format!("writing {}: {e}", partial.display())));
        }
    };
    if bytes != total {
        cleanup();
        return Err(unavailable(format!("got {bytes} bytes, the manifest announced {total}")));
    }
    if sha != manifest.sha256 {
        cleanup();
        return Err(WorkerError::ModelHashMismatch { expected: manifest.sha256, got: format!("{sha} (pulled shard)") });
    }
    std::fs::rename(&partial, dest).map_err(|e| WorkerError::Internal(format!("saving {}: {e}", dest.display())))?;
    tracing::info!(path = %dest.display(), "shard cached");
    Ok(())
}
