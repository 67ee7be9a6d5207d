//! Pulling a shard file from the coordinator's FetchWeights stream into the cache,
//! resuming from the bytes an earlier, cut pull left.
//!
//! A pull claims the shard's partial file ([`super::partial`]), asks for the file
//! from the byte the partial ends at, appends what comes (re-hashing what was kept,
//! so the check covers the whole file), and renames the file into the cache once
//! its length and SHA-256 match the manifest. A pull that fails on the way (the link
//! cut, the coordinator gone) keeps the partial file for the next one. A partial
//! file that turns out wrong (the coordinator refuses its offset, the finished
//! file's hash does not match) is dropped and the pull starts over from byte 0,
//! once; a fresh pull that fails its check deletes the file and fails.

use std::ops::Range;
use std::path::Path;
use std::time::{Duration, Instant};

use strata_proto::v1::coordinator_client::CoordinatorClient;
use strata_proto::v1::{FetchWeightsRequest, ModelRef, WeightChunk};
use strata_proto::{WorkerError, MAX_MESSAGE_BYTES};
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

use super::partial::{self, partial_path, Partial};
use super::progress::{PullEntry, Pulls};
use super::stream_order::{Broken, WeightStream};

/// How often a pull waiting for another pull of the same shard looks again.
const CLAIM_POLL: Duration = Duration::from_millis(200);

/// What a pull took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pulled {
    /// Bytes received from the coordinator, over every attempt.
    pub fetched_bytes: u64,
    /// Bytes kept from an earlier pull that the cached file starts with.
    pub resumed_bytes: u64,
}

/// Streams the shard file of `layers` from the coordinator at `source` into `dest`
/// (both figures 0 when another pull of it finished it meanwhile).
pub async fn pull(
    source: &str,
    model: &ModelRef,
    layers: &Range<usize>,
    dest: &Path,
    pulls: &Pulls,
) -> Result<Pulled, WorkerError> {
    let dir = dest.parent().ok_or_else(|| WorkerError::Internal("cache path has no folder".into()))?;
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| WorkerError::Internal(format!("creating {}: {e}", dir.display())))?;
    let Some((partial, entry)) = claim(dest, layers, pulls).await? else {
        tracing::info!(path = %dest.display(), "another pull cached the shard meanwhile");
        return Ok(Pulled::default());
    };
    let channel = crate::forwarder::connect(source.to_string(), strata_trust::Dial::Coordinator).await.map_err(|e| unavailable(source, e))?;
    let mut client = CoordinatorClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let mut pulled = Pulled::default();
    let mut resume = true;
    loop {
        // Starting over needs no truncation here: the writer cuts the file to where
        // the data starts (on its blocking thread; that of a large file takes a while).
        let kept = if resume {
            partial.held_bytes().map_err(|e| WorkerError::Internal(format!("{}: {e}", partial.path().display())))?
        } else {
            0
        };
        let attempt = Attempt { client: &mut client, source, model, layers, partial: &partial, entry: &entry };
        match attempt.run(kept, &mut pulled.fetched_bytes).await {
            Ok(resumed) => {
                partial.finish(dest).map_err(|e| WorkerError::Internal(format!("saving {}: {e}", dest.display())))?;
                pulled.resumed_bytes = resumed;
                tracing::info!(path = %dest.display(), resumed_bytes = resumed, "shard cached");
                return Ok(pulled);
            }
            Err(Failed { error, fate: Fate::Keep }) => {
                let kept = partial.held_bytes().unwrap_or(0);
                tracing::warn!(%error, kept_bytes = kept, "pull failed; the next pull of the shard resumes");
                return Err(error);
            }
            Err(Failed { error, fate: Fate::StartOver }) if resume => {
                // The file stays, locked: deleting it would let another pull create
                // and lock a new one at its path while this one still writes.
                tracing::warn!(%error, "dropping the bytes kept from an earlier pull, pulling from the start");
                resume = false;
            }
            Err(Failed { error, .. }) => {
                let path = partial.path().to_path_buf();
                if let Err(e) = partial.remove() {
                    tracing::warn!("deleting {}: {e}", path.display());
                }
                return Err(error);
            }
        }
    }
}

/// Waits until this pull may write the shard's partial file, and takes it; `None`
/// when the shard is in the cache by then (another pull finished it).
async fn claim<'a>(
    dest: &Path,
    layers: &Range<usize>,
    pulls: &'a Pulls,
) -> Result<Option<(Partial, PullEntry<'a>)>, WorkerError> {
    let path = partial_path(dest);
    let mut waiting = false;
    loop {
        if dest.is_file() {
            return Ok(None);
        }
        if let Some(entry) = pulls.start(dest, layers.clone(), Instant::now()) {
            let p = path.clone();
            let opened = tokio::task::spawn_blocking(move || Partial::try_open(&p))
                .await
                .map_err(|e| WorkerError::Internal(e.to_string()))?
                .map_err(|e| WorkerError::Internal(format!("{}: {e}", path.display())))?;
            if let Some(partial) = opened {
                // The pull waited for may have cached the shard just before it let go.
                if dest.is_file() {
                    let _ = partial.remove();
                    return Ok(None);
                }
                return Ok(Some((partial, entry)));
            }
        }
        if !waiting {
            tracing::info!(path = %dest.display(), "another pull of this shard is under way; waiting for it");
            waiting = true;
        }
        tokio::time::sleep(CLAIM_POLL).await;
    }
}

fn unavailable(source: &str, what: impl std::fmt::Display) -> WorkerError {
    WorkerError::ModelUnavailable(format!("pulling from {source}: {what}"))
}

/// Why an attempt failed, and what becomes of the partial file.
struct Failed {
    error: WorkerError,
    fate: Fate,
}

enum Fate {
    /// Its bytes are right as far as they go: the next pull resumes from them.
    Keep,
    /// Its bytes may be what is wrong: start over from byte 0.
    StartOver,
    /// Its bytes are wrong: delete it.
    Delete,
}

impl Failed {
    fn keep(error: WorkerError) -> Self {
        Self { error, fate: Fate::Keep }
    }

    /// A failure that bytes kept from an earlier pull, from `start` on, may explain.
    fn bad_bytes(error: WorkerError, start: u64) -> Self {
        Self { error, fate: if start > 0 { Fate::StartOver } else { Fate::Delete } }
    }
}

/// One FetchWeights call of a pull.
struct Attempt<'a, 'b> {
    client: &'a mut CoordinatorClient<Channel>,
    source: &'a str,
    model: &'a ModelRef,
    layers: &'a Range<usize>,
    partial: &'a Partial,
    entry: &'a PullEntry<'b>,
}

impl Attempt<'_, '_> {
    /// Asks for the file from byte `kept` and appends it to the partial file; the
    /// bytes kept that the file starts with. Adds what arrives to `fetched`.
    async fn run(self, kept: u64, fetched: &mut u64) -> Result<u64, Failed> {
        let source = self.source;
        let request = FetchWeightsRequest {
            model: Some(self.model.clone()),
            layer_start: self.layers.start as u32,
            layer_end: self.layers.end as u32,
            offset: kept,
        };
        let mut stream = match self.client.fetch_weights(request).await {
            Ok(r) => r.into_inner(),
            // A resumed request may be refused for its offset: the partial file is
            // longer than the shard (cut for another version of the coordinator).
            Err(s) if kept > 0 && s.code() == Code::InvalidArgument => {
                return Err(Failed::bad_bytes(unavailable(source, s.message()), kept))
            }
            Err(s) => return Err(Failed::keep(unavailable(source, format!("{:?}: {}", s.code(), s.message())))),
        };
        let first = stream.message().await.map_err(|s| Failed::keep(unavailable(source, s.message())))?;
        let (manifest, order) = WeightStream::start(first, kept).map_err(|b| self.broken(b, kept))?;
        let (start, total) = (manifest.offset, manifest.total_bytes);
        // What the manifest announces is written to disk: refused before a byte is,
        // if the disk cannot hold it (a full disk mid-pull fails later and worse).
        let folder = self.partial.path().parent().unwrap_or(self.partial.path());
        if let Ok(free) = strata_platform::files::free_space(folder) {
            if total - start > free {
                let path = folder.display().to_string();
                return Err(Failed::keep(WorkerError::NoSpace { path, needed: total - start, free }));
            }
        }
        self.entry.begin(start, total, Instant::now());
        tracing::info!(
            model = %self.model.model_id,
            layers = ?self.layers,
            bytes = total,
            resumed_from = start,
            "pulling weights from {source}"
        );
        let file = self
            .partial
            .writer()
            .map_err(|e| Failed::keep(WorkerError::Internal(format!("{}: {e}", self.partial.path().display()))))?;
        // Hashing what was kept and writing run on a blocking thread, fed chunk by chunk.
        let (tx, rx) = mpsc::channel::<Vec<u8>>(8);
        let writer = tokio::task::spawn_blocking(move || partial::append(file, start, rx));
        let received = self.receive(&mut stream, order, tx, fetched).await;
        let written = writer.await.map_err(|e| Failed::keep(WorkerError::Internal(e.to_string())))?;
        // The writer's failure first: it explains the receiver's ("the writer stopped").
        let (len, sha) = written.map_err(|e| {
            Failed::keep(WorkerError::Internal(format!("writing {}: {e}", self.partial.path().display())))
        })?;
        received?;
        if len < total {
            return Err(Failed::keep(unavailable(source, format!("the stream ended after {len} of {total} bytes"))));
        }
        if sha != manifest.sha256 {
            let got = format!("{sha} (pulled shard{})", if start > 0 { ", resumed" } else { "" });
            return Err(Failed::bad_bytes(WorkerError::ModelHashMismatch { expected: manifest.sha256, got }, start));
        }
        Ok(start)
    }

    /// A stream that broke its rules, from byte `start`: kept bytes it contradicts
    /// are dropped.
    fn broken(&self, broken: Broken, start: u64) -> Failed {
        let error = unavailable(self.source, broken.why);
        if broken.blames_kept_bytes {
            Failed::bad_bytes(error, start)
        } else {
            Failed::keep(error)
        }
    }

    /// Feeds the data chunks to the writer until the stream ends.
    async fn receive(
        &self,
        stream: &mut Streaming<WeightChunk>,
        mut order: WeightStream,
        tx: mpsc::Sender<Vec<u8>>,
        fetched: &mut u64,
    ) -> Result<(), Failed> {
        let source = self.source;
        let (start, total) = (order.done(), order.total());
        let mut next_log = start;
        loop {
            let chunk = match stream.message().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => return Ok(()),
                Err(s) => return Err(Failed::keep(unavailable(source, s.message()))),
            };
            let data = order.data(chunk).map_err(|b| self.broken(b, start))?;
            let n = data.len() as u64;
            if tx.send(data).await.is_err() {
                return Err(Failed::keep(WorkerError::Internal("the shard writer stopped".into())));
            }
            let done = order.done();
            *fetched += n;
            self.entry.advance(n, Instant::now());
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
    }
}
