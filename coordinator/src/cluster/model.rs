//! The model a coordinator serves: its header, content hash and tokenizer, and the
//! shard files it cuts for workers that pull their weights.

use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use strata_model::{ChatTemplate, ModelFile, Tokenizer};
pub use strata_proto::content_hash::sha256_file;
use tokio::sync::OnceCell;

use super::ClusterError;
use crate::engine::ModelCard;

/// A cut shard, ready to stream.
#[derive(Debug, Clone)]
pub struct BuiltShard {
    pub path: PathBuf,
    pub total_bytes: u64,
    pub sha256: String,
    pub tensor_names: Vec<String>,
}

/// Shard files by layer range, each cut once however many workers ask at once.
type ShardCells = Mutex<HashMap<(usize, usize), Arc<OnceCell<BuiltShard>>>>;

pub struct ServedModel {
    pub file: ModelFile,
    pub content_hash: String,
    pub card: ModelCard,
    shard_dir: tempfile::TempDir,
    shards: ShardCells,
}

impl ServedModel {
    /// Opens the model and hashes it (blocking: reads the whole file).
    pub fn open(path: &Path, model_id: String) -> Result<Self, ClusterError> {
        let file = ModelFile::open(path)?;
        let content_hash = sha256_file(path).map_err(|source| ClusterError::Io { path: path.to_path_buf(), source })?;
        let tokenizer = Arc::new(Tokenizer::from_gguf(file.metadata()).map_err(strata_model::Error::from)?);
        let chat_template = Arc::new(ChatTemplate::from_gguf(file.metadata()).map_err(strata_model::Error::from)?);
        let card = ModelCard::new(model_id, file.info().context_length, tokenizer, chat_template);
        let shard_dir = tempfile::Builder::new()
            .prefix("strata-shards-")
            .tempdir()
            .map_err(|source| ClusterError::Io { path: std::env::temp_dir(), source })?;
        Ok(Self { file, content_hash, card, shard_dir, shards: Mutex::default() })
    }

    pub fn layers(&self) -> usize {
        self.file.info().layers
    }

    /// The shard file for `layers`, cut on first request and kept for later ones.
    pub async fn shard(self: &Arc<Self>, layers: Range<usize>) -> Result<BuiltShard, ClusterError> {
        let cell = {
            let mut shards = self.shards.lock().unwrap_or_else(|p| p.into_inner());
            shards.entry((layers.start, layers.end)).or_default().clone()
        };
        let me = self.clone();
        cell.get_or_try_init(|| async move {
            tokio::task::spawn_blocking(move || me.cut(layers))
                .await
                .map_err(|e| ClusterError::Internal(format!("cutting a shard: {e}")))?
        })
        .await
        .cloned()
    }

    fn cut(&self, layers: Range<usize>) -> Result<BuiltShard, ClusterError> {
        let path = self.shard_dir.path().join(format!("layers-{}-{}.gguf", layers.start, layers.end));
        let io = |source| ClusterError::Io { path: path.clone(), source };
        let mut out = BufWriter::new(std::fs::File::create(&path).map_err(io)?);
        let tensor_names =
            strata_model::shard_file::write_shard(&self.file, layers.clone(), &self.content_hash, &mut out)?;
        out.flush().map_err(io)?;
        drop(out);
        let total_bytes = std::fs::metadata(&path).map_err(io)?.len();
        let sha256 = sha256_file(&path).map_err(io)?;
        tracing::info!(?layers, bytes = total_bytes, "cut a shard for pulling workers");
        Ok(BuiltShard { path, total_bytes, sha256, tensor_names })
    }
}
