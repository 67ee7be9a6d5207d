//! `strata serve-local`: the OpenAI-compatible API over a model run in this one
//! process, no workers involved.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use super::ModelArgs;
use crate::engine::local::LocalEngine;

#[derive(Debug, Args)]
pub struct ServeLocalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Where the HTTP API listens; port 0 picks a free port (printed once ready).
    #[arg(long, env = "STRATA_HTTP_LISTEN", default_value = "127.0.0.1:8000")]
    pub http_listen: SocketAddr,
    /// The model id clients send as `"model"`; by default the model's name, or the
    /// file name without `.gguf`.
    #[arg(long)]
    pub model_id: Option<String>,
    #[command(flatten)]
    pub keys: super::ApiKeyArgs,
}

pub fn run(args: ServeLocalArgs) -> anyhow::Result<()> {
    let keys = args.keys.keys()?;
    args.keys.warn_if_open(&keys, args.http_listen);
    let (file, device) = args.model.open()?;
    let model_id = args.model_id.clone().unwrap_or_else(|| default_model_id(&args.model.model));
    let engine = LocalEngine::start(&file, &device, model_id.clone())
        .with_context(|| format!("cannot start the model {}", args.model.model))?;
    drop(file);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.http_listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.http_listen))?;
        let addr = listener.local_addr()?;
        // Scripts and tests wait for this line; it must arrive whole and at once.
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening http={addr}")?;
        stdout.flush()?;
        drop(stdout);
        tracing::info!(%addr, model = %model_id, "serving the api");
        crate::api::serve(listener, Arc::new(engine), None, keys, shutdown_signal()).await?;
        Ok(())
    })
}

/// The id a model is served under when none is given: a known name as it is, a
/// path by its file name.
pub(crate) fn default_model_id(spec: &str) -> String {
    if crate::model_store::known(spec).is_some() {
        return spec.to_owned();
    }
    Path::new(spec).file_stem().and_then(|s| s.to_str()).unwrap_or(spec).to_owned()
}

/// Completes when the process is asked to stop (see [`strata_platform::stop`]).
pub async fn shutdown_signal() {
    strata_platform::stop::requested().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_are_served_under_their_name() {
        assert_eq!(default_model_id("smollm2-135m"), "smollm2-135m");
        assert_eq!(default_model_id("/models/Qwen2.5-0.5B-Instruct-Q4_K_M.gguf"), "Qwen2.5-0.5B-Instruct-Q4_K_M");
        assert_eq!(default_model_id("model"), "model");
    }
}
