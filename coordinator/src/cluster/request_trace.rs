//! The coordinator's span for one request: the root of its trace.
//!
//! `request` lasts from arrival to the last token, with one child span per phase
//! (`queue` while it waits for a sequence or a pipeline, `prefill` until its first
//! token, `decode` after), and moves between pipelines as events. Every stage's
//! span for the request is a child of `request`, through the `traceparent` the
//! sequence is opened with. No span per token: the spans end with counts and
//! durations as attributes. No prompt text goes into them.

use std::time::Instant;

use tracing::field::Empty;

use super::messages::RequestId;
use strata_proto::PipelineId;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Queue,
    Prefill,
    Decode,
}

pub(super) struct RequestTrace {
    span: tracing::Span,
    phase: Phase,
    phase_span: tracing::Span,
    started: Instant,
    first_token: Option<Instant>,
    tokens: usize,
    moves: u32,
}

impl RequestTrace {
    /// `parent`: the span the request arrived in (the API's), or none.
    pub(super) fn start(parent: &tracing::Span, id: RequestId, prompt_tokens: usize, max_tokens: usize) -> Self {
        let span = tracing::info_span!(
            parent: parent,
            "request",
            request = %id,
            // Counts as i64: OpenTelemetry has no unsigned integers (u64 values
            // would arrive as strings).
            prompt_tokens = prompt_tokens as i64,
            max_tokens = max_tokens as i64,
            generated_tokens = Empty,
            finish_reason = Empty,
            time_to_first_token_seconds = Empty,
            moves = Empty,
        );
        let phase_span = tracing::info_span!(parent: &span, "queue");
        Self { span, phase: Phase::Queue, phase_span, started: Instant::now(), first_token: None, tokens: 0, moves: 0 }
    }

    /// What the request's sequences are opened with (empty when not traced).
    pub(super) fn traceparent(&self) -> String {
        strata_telemetry::context::traceparent(&self.span).unwrap_or_default()
    }

    /// Sent to `pipeline`: the first time, prefill begins; later, it is replayed.
    pub(super) fn launched(&mut self, pipeline: PipelineId) {
        if self.phase == Phase::Queue {
            self.enter(Phase::Prefill);
        } else {
            self.moves += 1;
            tracing::info!(parent: &self.span, pipeline = %pipeline, "replayed on a new pipeline");
        }
    }

    /// Its KV cache moved to `pipeline`, in `seconds`.
    pub(super) fn transferred(&mut self, pipeline: PipelineId, bytes: u64, seconds: f64) {
        self.moves += 1;
        tracing::info!(parent: &self.span, pipeline = %pipeline, bytes = bytes as i64, seconds, "moved with its KV cache");
    }

    /// Waits again, for a pipeline (the one it ran on is gone).
    pub(super) fn waits(&self, reason: &str) {
        tracing::info!(parent: &self.span, reason, "waits for a pipeline");
    }

    pub(super) fn token(&mut self) {
        self.tokens += 1;
        if self.phase == Phase::Prefill {
            self.first_token = Some(Instant::now());
            self.enter(Phase::Decode);
        }
    }

    pub(super) fn finish(self, reason: &str) {
        self.span.record("generated_tokens", self.tokens as i64);
        self.span.record("finish_reason", reason);
        self.span.record("moves", i64::from(self.moves));
        if let Some(first) = self.first_token {
            self.span.record("time_to_first_token_seconds", (first - self.started).as_secs_f64());
        }
    }

    fn enter(&mut self, phase: Phase) {
        self.phase = phase;
        // Replacing the span ends the phase before.
        self.phase_span = match phase {
            Phase::Queue => tracing::info_span!(parent: &self.span, "queue"),
            Phase::Prefill => tracing::info_span!(parent: &self.span, "prefill"),
            Phase::Decode => tracing::info_span!(parent: &self.span, "decode"),
        };
    }
}
