//! Generation in one process: one stage holding every layer, driven token by token.
//!
//! This is the reference a pipeline must reproduce exactly, and the single-process
//! baseline the benchmarks compare against.

use candle_core::Device;

use crate::error::{Error, Result};
use crate::gguf::ModelFile;
use crate::sampling::{Sampler, SamplingParams};
use crate::stage::{Stage, StageInput, StageOptions, StageOutput, StageStep};
use crate::tokenizer::Tokenizer;

pub struct Generator {
    stage: Stage,
    tokenizer: Tokenizer,
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-generation token.
    Stop,
    /// `max_tokens` were produced, or the context is full.
    Length,
    /// The caller's callback asked to stop.
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
}

/// The sequence id a generator uses on its private stage.
const SEQ: u64 = 0;

impl Generator {
    pub fn load(file: &ModelFile, device: &Device, options: StageOptions) -> Result<Self> {
        let tokenizer = Tokenizer::from_gguf(file.metadata())?;
        let stage = Stage::load(file, 0..file.info().layers, device, options)?;
        Ok(Self { stage, tokenizer })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn stage(&self) -> &Stage {
        &self.stage
    }

    /// Generates up to `max_tokens` after `prompt`. `on_token` sees each new token (with
    /// the tokenizer, to decode it as it comes) and returns false to stop early. End-of-generation tokens end the run and are not
    /// returned.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        params: &SamplingParams,
        mut on_token: impl FnMut(&Tokenizer, u32) -> bool,
    ) -> Result<Generation> {
        let sampler = Sampler::new(params)?;
        let context = self.stage.info().context_length;
        if prompt.is_empty() {
            return Err(Error::BadInput("the prompt has no tokens".into()));
        }
        if prompt.len() >= context {
            return Err(Error::ContextOverflow { seq: SEQ, tokens: prompt.len(), context });
        }
        let mut history = prompt.to_vec();
        let mut tokens = Vec::new();
        let mut input = prompt.to_vec();
        let mut position = 0;
        let result = loop {
            if tokens.len() >= max_tokens || history.len() >= context {
                break FinishReason::Length;
            }
            let step = StageStep { seq: SEQ, position, input: StageInput::Tokens(input.clone()) };
            let logits = match self.stage.forward(std::slice::from_ref(&step))?.pop() {
                Some(StageOutput::Logits(l)) => l.to_vec1::<f32>()?,
                _ => return Err(Error::InvalidModel("a full stage must return logits".into())),
            };
            position += input.len();
            let next = sampler.sample(&logits, &history, history.len())?;
            if self.tokenizer.is_eos(next) {
                break FinishReason::Stop;
            }
            tokens.push(next);
            history.push(next);
            if !on_token(&self.tokenizer, next) {
                break FinishReason::Cancelled;
            }
            input = vec![next];
        };
        self.stage.release(SEQ);
        Ok(Generation { tokens, finish: result })
    }
}
