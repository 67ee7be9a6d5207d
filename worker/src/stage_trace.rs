//! A stage's span for one sequence, a child of the coordinator's span for the
//! request (the `traceparent` the sequence was opened with). One span from open to
//! release, never one per token: it ends with the frames and tokens the stage
//! computed for the sequence, and the seconds they waited in the stage's queue and
//! in its forwards.

use std::ops::Range;
use std::time::Duration;

use tracing::field::Empty;

pub(crate) struct StageTrace {
    span: tracing::Span,
    frames: u64,
    tokens: u64,
    queued: Duration,
    computed: Duration,
}

impl StageTrace {
    /// The span for sequence `seq` opened with `traceparent`; `None` when the
    /// request is not traced or this worker exports no spans.
    pub(crate) fn open(traceparent: &str, seq: u64, stage_index: u32, layers: &Range<usize>) -> Option<Self> {
        if traceparent.is_empty() {
            return None;
        }
        let span = tracing::info_span!(
            parent: None,
            "stage",
            // Numbers as i64: OpenTelemetry has no unsigned integers (u64 values
            // would arrive as strings).
            stage = i64::from(stage_index),
            layers = %format_args!("{}..{}", layers.start, layers.end),
            seq = %seq,
            frames = Empty,
            tokens = Empty,
            queue_seconds = Empty,
            compute_seconds = Empty,
        );
        if span.is_disabled() {
            return None;
        }
        strata_telemetry::context::adopt_parent(&span, traceparent);
        Some(Self { span, frames: 0, tokens: 0, queued: Duration::ZERO, computed: Duration::ZERO })
    }

    /// One frame of `tokens` positions: how long it waited for its batch, and how
    /// long the batch's forward took.
    pub(crate) fn frame(&mut self, tokens: usize, queued: Duration, computed: Duration) {
        self.frames += 1;
        self.tokens += tokens as u64;
        self.queued += queued;
        self.computed += computed;
    }
}

impl Drop for StageTrace {
    fn drop(&mut self) {
        self.span.record("frames", self.frames as i64);
        self.span.record("tokens", self.tokens as i64);
        self.span.record("queue_seconds", self.queued.as_secs_f64());
        self.span.record("compute_seconds", self.computed.as_secs_f64());
    }
}
