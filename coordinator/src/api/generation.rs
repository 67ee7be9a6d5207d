//! Turns an engine's token events into the text a client sees: decoded as it
//! streams, control tokens left out, cut before a stop string.
//!
//! Text that could be the start of a stop string is held back until the next token
//! shows whether it is, so a stream never sends text it must take back.

use std::sync::Arc;
use std::time::Instant;

use axum::http::StatusCode;
use strata_model::generate::FinishReason;
use strata_model::tokenizer::DecodeStream;
use strata_model::Tokenizer;
use tokio::sync::mpsc;

use super::errors::ApiError;
use super::metrics::{ApiMetrics, Ended};
use crate::engine::{GenerateEvent, TokenLogprob};

/// Why a choice ended, as OpenAI spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Finish {
    /// End of generation, or a stop string.
    Stop,
    /// `max_tokens`, or the context is full.
    Length,
    /// The answer is tool calls (chat only: the generation itself ends by `Stop`).
    #[serde(rename = "tool_calls")]
    ToolCalls,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::ToolCalls => "tool_calls",
        }
    }
}

/// Holds back text that may be the start of a stop string.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops, pending: String::new() }
    }

    /// Adds `text`; returns what may be sent now and whether a stop string was
    /// reached (the text returned then ends just before it).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            self.pending.truncate(at);
            return (std::mem::take(&mut self.pending), true);
        }
        let held = self.stops.iter().map(|s| partial_match(&self.pending, s)).max().unwrap_or(0);
        let rest = self.pending.split_off(self.pending.len() - held);
        (std::mem::replace(&mut self.pending, rest), false)
    }

    /// What is still held back, once no more text will come.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// The length of the longest end of `text` that begins `stop` without being all of it.
fn partial_match(text: &str, stop: &str) -> usize {
    (1..stop.len().min(text.len() + 1))
        .rev()
        .find(|&k| stop.is_char_boundary(k) && text.ends_with(&stop[..k]))
        .unwrap_or(0)
}

/// The next thing a client is told.
#[derive(Debug, PartialEq)]
pub enum Piece {
    /// Text, and the log-probabilities of the tokens it completes (when asked).
    Text {
        text: String,
        logprobs: Vec<SampledLogprob>,
    },
    /// The last text, and why the choice ended.
    End {
        text: String,
        finish: Finish,
        logprobs: Vec<SampledLogprob>,
    },
    Failed(ApiError),
}

/// A generated token and its log-probability, with the most likely tokens at its
/// position (requests with `logprobs`).
#[derive(Debug, Clone, PartialEq)]
pub struct SampledLogprob {
    pub token: u32,
    pub logprob: TokenLogprob,
}

/// A whole choice, for a response that is not streamed.
pub struct Collected {
    pub text: String,
    pub finish: Finish,
    pub logprobs: Vec<SampledLogprob>,
}

/// One request's generation as the API follows it. Dropping it drops the engine's
/// receiver, which cancels the request.
pub struct Generation {
    events: mpsc::Receiver<GenerateEvent>,
    tokenizer: Arc<Tokenizer>,
    decode: DecodeStream,
    stop: StopMatcher,
    /// Logged with the outcome: the handler's span is gone by then when streaming.
    request_id: String,
    model: String,
    prompt_tokens: usize,
    completion_tokens: usize,
    /// The first event, read by [`Self::admitted`] and not yet handled.
    early: Option<GenerateEvent>,
    /// The prompt's scores, once the engine reported them (requests with
    /// `prompt_logprobs`).
    prompt_logprobs: Option<Vec<TokenLogprob>>,
    /// Log-probabilities of tokens whose text has not gone out yet (part of a
    /// character, or held back by a stop sequence that may match).
    pending_logprobs: Vec<SampledLogprob>,
    done: bool,
    metrics: Arc<ApiMetrics>,
    started: Instant,
    /// When the last token came; none before the first.
    last_token: Option<Instant>,
    /// Whether the engine took it (it holds a sequence): it counts as running.
    admitted: bool,
}

impl Generation {
    pub fn new(
        events: mpsc::Receiver<GenerateEvent>,
        tokenizer: Arc<Tokenizer>,
        stops: Vec<String>,
        request_id: String,
        model: String,
        prompt_tokens: usize,
        metrics: Arc<ApiMetrics>,
    ) -> Self {
        metrics.started(prompt_tokens);
        Self {
            events,
            tokenizer,
            decode: DecodeStream::new(),
            stop: StopMatcher::new(stops),
            request_id,
            model,
            prompt_tokens,
            completion_tokens: 0,
            early: None,
            prompt_logprobs: None,
            pending_logprobs: Vec::new(),
            done: false,
            metrics,
            started: Instant::now(),
            last_token: None,
            admitted: false,
        }
    }

    /// The engine took the request, or produced something (which it does only
    /// for a request it took).
    fn mark_admitted(&mut self) {
        if !self.admitted {
            self.admitted = true;
            self.metrics.admitted();
        }
    }

    fn record_end(&self, how: Ended) {
        self.metrics.ended(how, self.admitted, self.started.elapsed());
    }

    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    pub fn completion_tokens(&self) -> usize {
        self.completion_tokens
    }

    /// The prompt's scores, when the request asked for them and they have arrived.
    pub fn take_prompt_logprobs(&mut self) -> Option<Vec<TokenLogprob>> {
        self.prompt_logprobs.take()
    }

    /// The whole text, why it ended and the tokens' log-probabilities (when asked),
    /// for a non-streaming response.
    pub async fn collect(&mut self) -> Result<Collected, ApiError> {
        let mut text = String::new();
        let mut logprobs = Vec::new();
        loop {
            match self.next().await {
                Some(Piece::Text { text: piece, logprobs: more }) => {
                    text.push_str(&piece);
                    logprobs.extend(more);
                }
                Some(Piece::End { text: piece, finish, logprobs: more }) => {
                    text.push_str(&piece);
                    logprobs.extend(more);
                    return Ok(Collected { text, finish, logprobs });
                }
                Some(Piece::Failed(error)) => return Err(error),
                None => return Err(ApiError::internal("the generation ended without a result")),
            }
        }
    }

    /// Waits until the engine has admitted the request (or has produced anything at
    /// all), so that a stream's headers go out only once no refusal can follow: a
    /// request that timed out in the queue is answered with its status (429), not
    /// with an error event inside a 200.
    pub async fn admitted(&mut self) -> Result<(), ApiError> {
        match self.events.recv().await {
            Some(GenerateEvent::Admitted) => {
                self.mark_admitted();
                Ok(())
            }
            Some(GenerateEvent::Failed(e)) => Err(self.failed(e.into())),
            Some(event) => {
                self.early = Some(event);
                Ok(())
            }
            None => Err(self.failed(ApiError::internal("the engine stopped without finishing the request"))),
        }
    }

    /// The next piece; `None` after the end or a failure.
    pub async fn next(&mut self) -> Option<Piece> {
        if self.done {
            return None;
        }
        loop {
            let event = match self.early.take() {
                Some(event) => Some(event),
                None => self.events.recv().await,
            };
            match event {
                Some(GenerateEvent::Admitted) => {
                    self.mark_admitted();
                    continue;
                }
                Some(GenerateEvent::PromptLogprobs(scores)) => {
                    self.prompt_logprobs = Some(scores);
                    continue;
                }
                Some(GenerateEvent::Token(id, logprob)) => {
                    self.completion_tokens += 1;
                    self.mark_admitted();
                    let now = Instant::now();
                    let since = now - self.last_token.unwrap_or(self.started);
                    self.metrics.token(self.last_token.is_none(), since);
                    self.last_token = Some(now);
                    // Chat markers the model writes are not part of the answer.
                    if self.tokenizer.is_control(id) {
                        continue;
                    }
                    if let Some(logprob) = logprob {
                        self.pending_logprobs.push(SampledLogprob { token: id, logprob });
                    }
                    let text = match self.tokenizer.decode_next(&mut self.decode, id) {
                        Ok(Some(text)) => text,
                        Ok(None) => continue,
                        Err(e) => return Some(self.fail(ApiError::internal(format!("cannot decode the output: {e}")))),
                    };
                    let (text, stopped) = self.stop.push(&text);
                    if stopped {
                        // Nothing more is wanted: the engine sees the closed channel.
                        self.events.close();
                        return Some(self.end(text, Finish::Stop));
                    }
                    if !text.is_empty() {
                        return Some(Piece::Text { text, logprobs: std::mem::take(&mut self.pending_logprobs) });
                    }
                }
                Some(GenerateEvent::Finished(reason)) => {
                    let tail = self.decode.flush().unwrap_or_default();
                    let (mut text, stopped) = self.stop.push(&tail);
                    let finish = match reason {
                        _ if stopped => Finish::Stop,
                        FinishReason::Length => Finish::Length,
                        FinishReason::Stop | FinishReason::Cancelled => Finish::Stop,
                    };
                    if !stopped {
                        text.push_str(&self.stop.finish());
                    }
                    return Some(self.end(text, finish));
                }
                Some(GenerateEvent::Failed(e)) => return Some(self.fail(e.into())),
                None => return Some(self.fail(ApiError::internal("the engine stopped without finishing the request"))),
            }
        }
    }

    fn end(&mut self, text: String, finish: Finish) -> Piece {
        self.done = true;
        self.record_end(match finish {
            Finish::Length => Ended::Length,
            Finish::Stop | Finish::ToolCalls => Ended::Stop,
        });
        tracing::info!(
            request_id = %self.request_id,
            model = %self.model,
            prompt_tokens = self.prompt_tokens,
            completion_tokens = self.completion_tokens,
            finish = finish.as_str(),
            "generation finished"
        );
        Piece::End { text, finish, logprobs: std::mem::take(&mut self.pending_logprobs) }
    }

    fn fail(&mut self, error: ApiError) -> Piece {
        Piece::Failed(self.failed(error))
    }

    fn failed(&mut self, error: ApiError) -> ApiError {
        self.done = true;
        self.record_end(Ended::Failed);
        if error.status == StatusCode::TOO_MANY_REQUESTS {
            // Admission working as planned (the line did not move within the queue
            // timeout): under overload every queued request may end so, and a
            // warning each would flood the log just when it matters.
            tracing::info!(request_id = %self.request_id, model = %self.model, error = %error.message, "request refused");
        } else {
            tracing::warn!(
                request_id = %self.request_id,
                model = %self.model,
                completion_tokens = self.completion_tokens,
                error = %error.message,
                "generation failed"
            );
        }
        error
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        if !self.done {
            self.record_end(Ended::Cancelled);
            tracing::info!(
                request_id = %self.request_id,
                model = %self.model,
                completion_tokens = self.completion_tokens,
                "client went away; generation cancelled"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool) {
        let mut matcher = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        for piece in pieces {
            let (text, stopped) = matcher.push(piece);
            out.push(text);
            if stopped {
                return (out, true);
            }
        }
        out.push(matcher.finish());
        (out, false)
    }

    #[test]
    fn text_without_stops_passes_through() {
        assert_eq!(run(&[], &["ab", "c"]), (vec!["ab".into(), "c".into(), "".into()], false));
    }

    #[test]
    fn a_stop_string_is_cut_even_across_pieces() {
        assert_eq!(run(&["END"], &["abc E", "N", "Dxyz"]), (vec!["abc ".into(), "".into(), "".into()], true));
        assert_eq!(run(&["\n\n"], &["a\n", "\nb"]), (vec!["a".into(), "".into()], true));
        // The earliest of several wins.
        assert_eq!(run(&["yz", "x"], &["wxyz"]), (vec!["w".into()], true));
    }

    #[test]
    fn held_text_is_released_when_it_turns_out_not_to_stop() {
        assert_eq!(
            run(&["END"], &["abc E", "NX", "!"]),
            (vec!["abc ".into(), "ENX".into(), "!".into(), "".into()], false)
        );
        assert_eq!(run(&["END"], &["E"]), (vec!["".into(), "E".into()], false));
    }

    #[test]
    fn partial_matches_respect_characters() {
        assert_eq!(partial_match("abé", "éx"), 2);
        assert_eq!(partial_match("ab", "éx"), 0);
        assert_eq!(run(&["日本"], &["今日", "本だ"]), (vec!["今".into(), "".into()], true));
    }
}
