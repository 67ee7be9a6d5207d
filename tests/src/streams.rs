//! Eight streaming greedy requests kept in flight while a test disturbs the cluster
//! (a drain, a killed worker, a cut link), and the undisturbed output each must
//! still equal. Every stream counts its events, so a test can act mid-generation,
//! and records the longest gap between two of its events (the pause its client saw)
//! and any error event the server sent. [`stream_completion`] is one such request
//! on its own (the load test runs many of them in a loop).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use strata_coordinator::cli::http;
use strata_model::synthetic::SyntheticModel;

use crate::reference_completion;

/// Tokens each request generates.
pub const MAX_TOKENS: usize = 160;

/// A synthetic model wide enough that a few hundred tokens take a while, so the
/// requests are still running when the cluster is disturbed.
pub fn synthetic_model(dir: &Path) -> anyhow::Result<PathBuf> {
    Ok(SyntheticModel { layers: 6, hidden: 256, feed_forward: 1024, context_length: 512, ..SyntheticModel::tiny() }
        .write_to(dir)?)
}

/// The eight prompts, of different lengths.
pub fn prompts() -> Vec<Vec<u32>> {
    (0..8u32).map(|i| (0..(3 + i)).map(|j| (i * 31 + j * 7) % 250 + 1).collect()).collect()
}

/// What the client of one streaming completion saw.
#[derive(Debug, Clone, Default)]
pub struct Streamed {
    pub text: String,
    /// The longest time between two events.
    pub longest_gap: Duration,
    /// The error events the server sent.
    pub errors: Vec<String>,
    /// The completion tokens the usage chunk counted (asked for with
    /// `stream_options.include_usage`).
    pub completion_tokens: Option<u64>,
}

/// A streaming completion of `prompt`: greedy, or as `spec` says with `seed`.
pub fn completion_body(prompt: &[u32], spec: &StreamSpec, seed: usize) -> serde_json::Value {
    let mut body = json!({"model": "test-model", "prompt": prompt, "max_tokens": spec.max_tokens, "temperature": 0, "stream": true});
    if let Some(t) = spec.temperature {
        body["temperature"] = json!(t);
        body["seed"] = json!(seed);
    }
    if let Some(p) = spec.repetition_penalty {
        body["repetition_penalty"] = json!(p);
    }
    if let Some(format) = spec.response_format {
        body["response_format"] = serde_json::from_str(format).expect("a response_format in JSON");
    }
    body
}

/// POSTs a streaming completion `body` and reads its events to the end, calling
/// `on_event` after each. A status other than 200 (a 429 after waiting in line) is
/// [`http::HttpError::Status`].
pub async fn stream_completion(
    addr: &str,
    body: &serde_json::Value,
    mut on_event: impl FnMut(),
) -> Result<Streamed, http::HttpError> {
    let mut seen = Streamed::default();
    let mut last = Instant::now();
    http::post_events(addr, "/v1/completions", body, |e| {
        let now = Instant::now();
        seen.longest_gap = seen.longest_gap.max(now - last);
        last = now;
        if !e["error"].is_null() {
            seen.errors.push(e["error"].to_string());
        }
        seen.text.push_str(e["choices"][0]["text"].as_str().unwrap_or(""));
        if let Some(n) = e["usage"]["completion_tokens"].as_u64() {
            seen.completion_tokens = Some(n);
        }
        on_event();
    })
    .await?;
    Ok(seen)
}

/// What [`Streams::finish`] found besides the texts.
#[derive(Debug, Clone)]
pub struct Finished {
    /// Each stream's text, in prompt order.
    pub texts: Vec<String>,
    /// The longest pause any client saw between two events.
    pub longest_pause: Duration,
}

/// What [`Streams::check`] found besides the (asserted) texts.
#[derive(Debug, Clone, Copy)]
pub struct Checked {
    /// The longest pause any client saw between two events.
    pub longest_pause: Duration,
}

/// What the eight requests ask for.
#[derive(Debug, Clone, Copy)]
pub struct StreamSpec {
    pub max_tokens: usize,
    /// `None`: greedy. `Some(t)`: sampled at temperature `t`, each request with its
    /// own seed (its index), so its output is one fixed draw.
    pub temperature: Option<f32>,
    pub repetition_penalty: Option<f32>,
    /// The request's `response_format`, as JSON text.
    pub response_format: Option<&'static str>,
}

impl StreamSpec {
    /// Greedy, [`MAX_TOKENS`] each, free text (usable in a `const`).
    pub const DEFAULT: Self =
        Self { max_tokens: MAX_TOKENS, temperature: None, repetition_penalty: None, response_format: None };
}

impl Default for StreamSpec {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Eight streaming requests, each counting the events it has received.
pub struct Streams {
    spec: StreamSpec,
    received: Vec<Arc<AtomicUsize>>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<Streamed>>>,
}

impl Streams {
    /// Starts eight greedy requests on the current runtime (its network namespace
    /// is the one the connections are made in).
    pub fn start(addr: &str) -> Self {
        Self::start_with(addr, StreamSpec::default())
    }

    pub fn start_with(addr: &str, spec: StreamSpec) -> Self {
        let mut received = Vec::new();
        let mut tasks = Vec::new();
        for (i, prompt) in prompts().into_iter().enumerate() {
            let count = Arc::new(AtomicUsize::new(0));
            received.push(count.clone());
            let addr = addr.to_string();
            let body = completion_body(&prompt, &spec, i);
            tasks.push(tokio::spawn(async move {
                Ok(stream_completion(&addr, &body, || {
                    count.fetch_add(1, Ordering::Relaxed);
                })
                .await?)
            }));
        }
        Self { spec, received, tasks }
    }

    /// Waits until every stream has had a few events (or ended).
    pub async fn wait_until_running(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.received.iter().zip(&self.tasks).any(|(c, t)| c.load(Ordering::Relaxed) < 3 && !t.is_finished()) {
            anyhow::ensure!(Instant::now() < deadline, "the streams did not start");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// How many requests are still running.
    pub fn running(&self) -> usize {
        self.tasks.iter().filter(|t| !t.is_finished()).count()
    }

    /// Waits for every stream, each of which must end without an error event.
    pub async fn finish(self) -> anyhow::Result<Finished> {
        let mut texts = Vec::new();
        let mut longest_pause = Duration::ZERO;
        for (prompt, task) in prompts().iter().zip(self.tasks) {
            let seen = tokio::time::timeout(Duration::from_secs(120), task).await.context("a stream hung")???;
            assert!(seen.errors.is_empty(), "prompt {prompt:?}: the client saw errors: {:?}", seen.errors);
            longest_pause = longest_pause.max(seen.longest_gap);
            texts.push(seen.text);
        }
        Ok(Finished { texts, longest_pause })
    }

    /// Every stream ended without an error event, its text equal to the undisturbed
    /// greedy run's.
    pub async fn check(self, model: &Path) -> anyhow::Result<Checked> {
        anyhow::ensure!(self.spec.temperature.is_none(), "sampled streams are checked against an undisturbed run");
        let max_tokens = self.spec.max_tokens;
        // Every stream is awaited before the references are computed: computing one
        // blocks this thread, and a stream still running here would count that as
        // a pause.
        let finished = self.finish().await?;
        for (prompt, text) in prompts().iter().zip(&finished.texts) {
            assert_eq!(*text, reference_completion(model, prompt, max_tokens)?.0, "prompt {prompt:?}");
        }
        Ok(Checked { longest_pause: finished.longest_pause })
    }
}
