//! Streaming responses: a request's generations (its choices) framed as server-sent
//! events, `data: {chunk}` per piece of text and a final `data: [DONE]`.
//!
//! Each endpoint shapes its own chunks through [`Chunks`]; the order of events is
//! decided here once. When the client disconnects, the response body and with it
//! the [`Generation`] are dropped, which cancels the request in the engine.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Serialize;

use super::errors::ApiError;
use super::generation::{Finish, Generation, Piece, SampledLogprob};

/// Token counts, as OpenAI reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn of(generation: &Generation) -> Self {
        Self::of_all(std::slice::from_ref(generation))
    }

    /// Of the choices of one request: the prompt counted once.
    pub fn of_all(generations: &[Generation]) -> Self {
        let prompt_tokens = generations.first().map_or(0, Generation::prompt_tokens);
        let completion_tokens = generations.iter().map(Generation::completion_tokens).sum();
        Self { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens }
    }
}

/// The chunks of one endpoint's stream, each a JSON object.
pub trait Chunks: Send + 'static {
    /// Sent before any text (chat announces the role).
    fn opening(&self) -> Option<String>;
    /// Text, with the log-probabilities of its tokens when the request asked.
    fn text(&self, text: &str, logprobs: &[SampledLogprob]) -> String;
    /// The last chunk of the choice: its remaining text and why it ended.
    fn finish(&self, text: &str, finish: Finish, logprobs: &[SampledLogprob]) -> String;
    /// The chunk that carries the usage when the client asked for it.
    fn usage(&self, usage: Usage) -> String;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    Usage,
    Done,
    Over,
}

fn data(chunk: String) -> Event {
    Event::default().data(chunk)
}

/// The stream of a request's choices, once the engine has admitted each (headers
/// wait for admission: a refusal then still gets its own status); `chunks_of(i)`
/// shapes choice `i`'s chunks.
pub async fn choices_response<C: Chunks>(
    mut generations: Vec<Generation>,
    chunks_of: impl Fn(u32) -> C,
    include_usage: bool,
) -> Result<Response, ApiError> {
    for generation in &mut generations {
        generation.admitted().await?;
    }
    let chunks = (0..generations.len() as u32).map(chunks_of).collect();
    Ok(response(generations, chunks, include_usage))
}

/// The choices' generations streamed at once: every choice's opening, then each
/// choice's chunks (shaped by its own [`Chunks`], which carry its index) as they
/// come, the usage of them all (the prompt counted once), then `[DONE]`. A choice
/// that fails ends the stream with its error (headers are long gone: the error
/// travels as an event, the way OpenAI's client libraries look for it); the others
/// are cancelled, as all are when the client goes away.
fn response<C: Chunks>(generations: Vec<Generation>, chunks: Vec<C>, include_usage: bool) -> Response {
    let prompt_tokens = generations.first().map_or(0, Generation::prompt_tokens);
    let openings: Vec<String> = chunks.iter().filter_map(Chunks::opening).collect();
    let counts = vec![0; generations.len()];
    // Each choice's pieces with its index and its token count so far; a choice's
    // stream ends after its last piece.
    let pieces = futures::stream::select_all(generations.into_iter().enumerate().map(|(i, generation)| {
        Box::pin(futures::stream::unfold(Some(generation), move |generation| async move {
            let mut generation = generation?;
            let piece = generation.next().await?;
            let tokens = generation.completion_tokens();
            let more = matches!(piece, Piece::Text { .. }).then_some(generation);
            Some(((i, piece, tokens), more))
        }))
    }));
    let state = (pieces, chunks, counts, Phase::Running);
    let rest = futures::stream::unfold(state, move |(mut pieces, chunks, mut counts, mut phase)| async move {
        loop {
            let event = match phase {
                Phase::Running => match pieces.next().await {
                    Some((i, Piece::Text { text, logprobs }, tokens)) => {
                        counts[i] = tokens;
                        data(chunks[i].text(&text, &logprobs))
                    }
                    Some((i, Piece::End { text, finish, logprobs }, tokens)) => {
                        counts[i] = tokens;
                        data(chunks[i].finish(&text, finish, &logprobs))
                    }
                    Some((_, Piece::Failed(error), _)) => {
                        phase = Phase::Done;
                        data(error.body())
                    }
                    None => {
                        phase = if include_usage { Phase::Usage } else { Phase::Done };
                        continue;
                    }
                },
                Phase::Usage => {
                    phase = Phase::Done;
                    let completion_tokens: usize = counts.iter().sum();
                    let usage =
                        Usage { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens };
                    match chunks.first() {
                        Some(c) => data(c.usage(usage)),
                        None => continue,
                    }
                }
                Phase::Done => {
                    phase = Phase::Over;
                    data("[DONE]".to_owned())
                }
                Phase::Over => return None,
            };
            return Some((Ok::<_, Infallible>(event), (pieces, chunks, counts, phase)));
        }
    });
    let events = futures::stream::iter(openings.into_iter().map(|o| Ok(data(o)))).chain(rest);
    // Comments now and then keep proxies from closing a stream that waits on a long
    // prompt; clients skip them.
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}

/// A streaming response of chunks made already (an answer that had to be read
/// whole before its first chunk could be written: tool calls), then `[DONE]`.
pub fn prepared(chunks: Vec<String>) -> Response {
    let events = chunks.into_iter().chain(["[DONE]".to_owned()]).map(|c| Ok::<_, Infallible>(data(c)));
    Sse::new(futures::stream::iter(events)).into_response()
}
