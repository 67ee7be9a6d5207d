//! Computing a shared prompt start once: the choices of one request (`n` > 1) and the
//! turns of one conversation begin with the same tokens, and a new sequence can open
//! with a copy of another's KV for them (`OpenSequence.prefix`) instead of computing
//! them again.
//!
//! A stage computes a frame's rows the same however it is batched, but a row computed
//! in a longer or shorter frame sums attention in another order. So a copy is taken
//! only where the two prompts are cut into the same frames up to the copy's end: then
//! the copied KV is bit-for-bit what the new sequence would have computed itself, and
//! a request gives the same result whether it found a prefix to copy or not (and
//! when it is replayed, which sends every frame).
//!
//! Frames are cut from the start in chunks of the same size, so a conversation's next
//! turn shares its previous prompt's whole chunks. The choices of one request cut
//! their last prompt token into a frame of its own (see [`PromptFrames::new`]), so all
//! of the prompt but that token is computed once.

use std::collections::VecDeque;
use std::ops::Range;

use strata_proto::{PipelineId, SeqId};

/// How a prompt is cut into frames: where each frame ends, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PromptFrames {
    ends: Vec<usize>,
}

impl PromptFrames {
    /// Frames of `chunk` tokens from the start (the last one shorter) of a prompt of
    /// `len` tokens. `last_alone`: the last token gets a frame of its own, so that
    /// sequences sampling from the same prompt can share all of it but that token.
    pub fn new(len: usize, chunk: usize, last_alone: bool) -> Self {
        let chunk = chunk.max(1);
        let cut = if last_alone { len.saturating_sub(1) } else { len };
        let mut ends: Vec<usize> = (1..=cut.div_ceil(chunk)).map(|i| (i * chunk).min(cut)).collect();
        if cut < len {
            ends.push(len);
        }
        Self { ends }
    }

    /// The frames, as position ranges.
    pub fn frames(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        std::iter::once(0).chain(self.ends.iter().copied()).zip(&self.ends).map(|(start, &end)| start..end)
    }

    /// Whether `[0, at)` is cut into the same frames in both.
    fn alike_until(&self, other: &Self, at: usize) -> bool {
        let before = |f: &Self| f.ends.iter().copied().take_while(|&e| e <= at).collect::<Vec<_>>();
        let mine = before(self);
        mine.last() == Some(&at) && mine == before(other)
    }
}

/// A sequence open on the stages whose prompt's KV another may start from: every
/// frame of that prompt has been sent to stage 0 (the stages apply an opening after
/// the frames sent before it).
#[derive(Debug, Clone, Copy)]
pub(super) struct PrefixSource<'a> {
    pub seq: SeqId,
    pub prompt: &'a [u32],
    pub frames: &'a PromptFrames,
}

/// The most positions of `prompt` (cut as `frames`) whose KV `source` holds exactly
/// as `prompt` would compute it: a whole number of frames cut alike, over tokens
/// alike, and never the whole prompt (its last frame computes what is sampled).
pub(super) fn shared_positions(prompt: &[u32], frames: &PromptFrames, source: &PrefixSource<'_>) -> usize {
    let same = prompt.iter().zip(source.prompt).take_while(|(a, b)| a == b).count().min(prompt.len().saturating_sub(1));
    frames.ends.iter().copied().filter(|&end| end <= same && frames.alike_until(source.frames, end)).max().unwrap_or(0)
}

/// The best of `sources` for `prompt`: the one sharing the most positions, if any does.
pub(super) fn best_prefix<'a>(
    prompt: &[u32],
    frames: &PromptFrames,
    sources: impl Iterator<Item = PrefixSource<'a>>,
) -> Option<(SeqId, usize)> {
    sources
        .map(|s| (s.seq, shared_positions(prompt, frames, &s)))
        .filter(|&(_, positions)| positions > 0)
        .max_by_key(|&(_, positions)| positions)
}

/// A copy of a finished request's prompt positions, kept open on a pipeline's
/// stages as a prefix source.
#[derive(Debug)]
pub(super) struct Retained {
    pub pipeline: PipelineId,
    pub seq: SeqId,
    pub prompt: Vec<u32>,
    pub frames: PromptFrames,
}

impl Retained {
    pub fn source(&self) -> PrefixSource<'_> {
        PrefixSource { seq: self.seq, prompt: &self.prompt, frames: &self.frames }
    }
}

/// Finished requests' prompts kept for the next turn of their conversation, oldest
/// first. They hold planned sequences that no request is using: the scheduler gives
/// the oldest back whenever a request needs its room.
#[derive(Debug, Default)]
pub(super) struct RetainedSequences {
    entries: VecDeque<Retained>,
}

impl RetainedSequences {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Those kept on `pipeline`.
    pub fn on(&self, pipeline: PipelineId) -> impl Iterator<Item = &Retained> {
        self.entries.iter().filter(move |e| e.pipeline == pipeline)
    }

    pub fn keep(&mut self, entry: Retained) {
        self.entries.push_back(entry);
    }

    /// Moves `seq` to the back of the line: it was just used.
    pub fn touch(&mut self, seq: SeqId) {
        if let Some(i) = self.entries.iter().position(|e| e.seq == seq) {
            if let Some(entry) = self.entries.remove(i) {
                self.entries.push_back(entry);
            }
        }
    }

    /// The oldest, to release: where it is and its id.
    pub fn pop_oldest(&mut self) -> Option<(PipelineId, SeqId)> {
        self.entries.pop_front().map(|e| (e.pipeline, e.seq))
    }

    /// Every one, to release.
    pub fn take_all(&mut self) -> Vec<(PipelineId, SeqId)> {
        self.entries.drain(..).map(|e| (e.pipeline, e.seq)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(f: &PromptFrames) -> Vec<Range<usize>> {
        f.frames().collect()
    }

    #[test]
    fn prompts_are_cut_in_chunks_from_the_start_with_the_last_token_alone_when_asked() {
        assert_eq!(ranges(&PromptFrames::new(5, 2, false)), [0..2, 2..4, 4..5]);
        assert_eq!(ranges(&PromptFrames::new(4, 2, false)), [0..2, 2..4]);
        assert_eq!(ranges(&PromptFrames::new(5, 2, true)), [0..2, 2..4, 4..5]);
        assert_eq!(ranges(&PromptFrames::new(4, 2, true)), [0..2, 2..3, 3..4]);
        assert_eq!(ranges(&PromptFrames::new(1, 8, true)), [0..1]);
        assert_eq!(ranges(&PromptFrames::new(3, 8, true)), [0..2, 2..3]);
    }

    fn shared(prompt: &[u32], frames: &PromptFrames, other: &[u32], other_frames: &PromptFrames) -> usize {
        shared_positions(prompt, frames, &PrefixSource { seq: SeqId::new(1), prompt: other, frames: other_frames })
    }

    #[test]
    fn only_whole_frames_cut_alike_are_shared_and_never_the_last() {
        let prompt: Vec<u32> = (0..10).collect();
        let choices = PromptFrames::new(10, 4, true);
        // Choices of one prompt share all but its last token.
        assert_eq!(shared(&prompt, &choices, &prompt, &choices), 9);
        // A prompt cut the usual way shares its whole chunks only...
        let plain = PromptFrames::new(10, 4, false);
        assert_eq!(shared(&prompt, &plain, &prompt, &plain), 8);
        assert_eq!(shared(&prompt, &plain, &prompt, &choices), 8);
        // ... and a longer prompt (the next turn) the whole chunks of the shorter one.
        let next: Vec<u32> = (0..20).collect();
        let next_frames = PromptFrames::new(20, 4, false);
        assert_eq!(shared(&next, &next_frames, &prompt, &plain), 8);
        // The first difference ends what is shared, rounded down to a frame.
        let mut edited = next.clone();
        edited[7] = 99;
        assert_eq!(shared(&edited, &next_frames, &prompt, &plain), 4);
        // Cut differently from the start: nothing.
        assert_eq!(shared(&next, &next_frames, &prompt, &PromptFrames::new(10, 3, false)), 0);
        assert_eq!(shared(&[1], &PromptFrames::new(1, 4, false), &[1], &PromptFrames::new(1, 4, false)), 0);
    }

    #[test]
    fn the_source_sharing_most_is_chosen() {
        let prompt: Vec<u32> = (0..12).collect();
        let frames = PromptFrames::new(12, 4, false);
        let short = PromptFrames::new(6, 4, false);
        let long = PromptFrames::new(11, 4, false);
        let sources = [
            PrefixSource { seq: SeqId::new(1), prompt: &prompt[..6], frames: &short },
            PrefixSource { seq: SeqId::new(2), prompt: &prompt[..11], frames: &long },
            PrefixSource { seq: SeqId::new(3), prompt: &[7, 7], frames: &short },
        ];
        assert_eq!(best_prefix(&prompt, &frames, sources.into_iter()), Some((SeqId::new(2), 8)));
        assert_eq!(best_prefix(&prompt, &frames, sources[2..].iter().copied()), None);
    }

    #[test]
    fn retained_sequences_are_found_by_pipeline_and_leave_oldest_first() {
        let p = |id| PipelineId::new(id).expect("not 0");
        let entry = |pipeline, seq| Retained {
            pipeline: p(pipeline),
            seq: SeqId::new(seq),
            prompt: vec![1, 2],
            frames: PromptFrames::new(2, 4, false),
        };
        let mut kept = RetainedSequences::default();
        kept.keep(entry(1, 1));
        kept.keep(entry(1, 2));
        kept.touch(SeqId::new(1));
        assert_eq!(kept.on(p(1)).map(|e| e.seq.get()).collect::<Vec<_>>(), [2, 1]);
        assert_eq!(kept.on(p(2)).count(), 0);
        assert_eq!(kept.pop_oldest(), Some((p(1), SeqId::new(2))));
        kept.keep(entry(2, 3));
        assert_eq!(kept.len(), 2);
        assert_eq!(kept.take_all(), [(p(1), SeqId::new(1)), (p(2), SeqId::new(3))]);
    }
}
