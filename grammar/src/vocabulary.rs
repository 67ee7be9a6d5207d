//! The model's vocabulary as llguidance sees it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use llguidance::toktrie::{ApproximateTokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use strata_model::Tokenizer;

use crate::{Constraint, Grammar, GrammarError};

/// Every token's bytes in llguidance's token trie, and the parser factory over it.
/// Building it takes a while (tens of milliseconds on a 50k vocabulary): once per
/// model per process.
pub struct Vocabulary {
    factory: Arc<ParserFactory>,
    /// Tokens that end a generation: allowed wherever the grammar may end.
    end_tokens: Arc<[u32]>,
    size: usize,
    /// The grammars compiled last, most recent first, as fresh parsers. A request's
    /// schema is compiled where the API checks it and again where its sequences
    /// start (once per choice), and clients send the same schema request after
    /// request: a clone of the compiled parser is a fraction of the work.
    compiled: Mutex<VecDeque<(Grammar, Arc<Matcher>)>>,
}

// A kept parser is shared by the constraints cloned from it (their `fresh`), on any
// thread: only ever cloned, never run.
const _: fn() = || {
    fn shared_across_threads<T: Send + Sync>() {}
    shared_across_threads::<Matcher>();
};

/// How many compiled grammars a [`Vocabulary`] keeps.
const COMPILED_KEPT: usize = 16;

/// Marks a control token's bytes in the trie: llguidance never matches it as text.
const SPECIAL: u8 = TokTrie::SPECIAL_TOKEN_MARKER;

impl Vocabulary {
    pub fn new(tokenizer: &Tokenizer) -> Result<Self, GrammarError> {
        let size = tokenizer.vocab_size();
        let end_tokens: Arc<[u32]> = tokenizer.eos_tokens().into();
        let Some(&eos) = end_tokens.first() else {
            return Err(GrammarError::Vocabulary("the model names no end-of-generation token".into()));
        };
        let words: Vec<Vec<u8>> = (0..size as u32)
            .map(|id| {
                let bytes = tokenizer.token_bytes(id).unwrap_or_default();
                if tokenizer.is_control(id) || bytes.is_empty() {
                    let name = tokenizer.vocab_entry(id).unwrap_or_default();
                    std::iter::once(SPECIAL).chain(name.bytes()).collect()
                } else {
                    bytes.to_vec()
                }
            })
            .collect();
        let info = TokRxInfo {
            vocab_size: size as u32,
            tok_eos: eos,
            tok_bos: tokenizer.bos_token(),
            tok_pad: None,
            tok_unk: None,
            tok_end_of_turn: None,
        };
        let env = Arc::new(ApproximateTokEnv::new(TokTrie::from(&info, &words)));
        let mut factory = ParserFactory::new_simple(&(env as llguidance::toktrie::TokEnv))
            .map_err(|e| GrammarError::Vocabulary(e.to_string()))?;
        // Its warnings would go to stderr: a grammar's problems come back as errors.
        factory.quiet();
        Ok(Self { factory: Arc::new(factory), end_tokens, size, compiled: Mutex::new(VecDeque::new()) })
    }

    /// Compiles `grammar` (or finds it compiled): the check that refuses a bad grammar.
    pub fn check(&self, grammar: &Grammar) -> Result<(), GrammarError> {
        self.matcher(grammar).map(drop)
    }

    /// The constraint of a sequence whose first `prompt_tokens` tokens are its prompt.
    pub fn constrain(&self, grammar: &Grammar, prompt_tokens: usize) -> Result<Constraint, GrammarError> {
        let fresh = self.matcher(grammar)?;
        Ok(Constraint::new(fresh, self.end_tokens.clone(), prompt_tokens, self.size))
    }

    /// The fresh parser of `grammar`: the one kept, or compiled now (outside the
    /// lock: other grammars need not wait) and kept.
    fn matcher(&self, grammar: &Grammar) -> Result<Arc<Matcher>, GrammarError> {
        {
            let mut compiled = self.lock_compiled();
            if let Some(entry) = compiled.iter().position(|(g, _)| g == grammar).and_then(|i| compiled.remove(i)) {
                let matcher = entry.1.clone();
                compiled.push_front(entry);
                return Ok(matcher);
            }
        }
        let matcher = Arc::new(new_matcher(&self.factory, grammar)?);
        let mut compiled = self.lock_compiled();
        // Compiled meanwhile by another thread too: one copy is kept.
        compiled.retain(|(g, _)| g != grammar);
        compiled.push_front((grammar.clone(), matcher.clone()));
        compiled.truncate(COMPILED_KEPT);
        Ok(matcher)
    }

    fn lock_compiled(&self) -> std::sync::MutexGuard<'_, VecDeque<(Grammar, Arc<Matcher>)>> {
        self.compiled.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The grammars kept compiled, most recent first (for the tests).
    #[cfg(test)]
    pub(crate) fn kept(&self) -> Vec<Grammar> {
        self.lock_compiled().iter().map(|(g, _)| g.clone()).collect()
    }
}

fn new_matcher(factory: &ParserFactory, grammar: &Grammar) -> Result<Matcher, GrammarError> {
    let top_level = grammar.top_level()?;
    // A grammar the compiler chokes on is refused like one it rejects.
    let parser = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| factory.create_parser(top_level)))
        .map_err(|_| GrammarError::Invalid("the grammar compiler panicked on it".into()))?
        .map_err(|e| GrammarError::Invalid(e.to_string()))?;
    let matcher = Matcher::new(Ok(parser));
    match matcher.get_error() {
        Some(e) => Err(GrammarError::Invalid(e)),
        None => Ok(matcher),
    }
}

/// A model's [`Vocabulary`], built the first time a constraint needs it: a process
/// that never sees a constrained request never pays for it.
pub struct LazyVocabulary {
    tokenizer: Option<Arc<Tokenizer>>,
    built: OnceLock<Result<Vocabulary, String>>,
}

impl LazyVocabulary {
    /// `None`: the model's tokenizer could not be had, and every constraint fails,
    /// saying so.
    pub fn new(tokenizer: Option<Arc<Tokenizer>>) -> Self {
        Self { tokenizer, built: OnceLock::new() }
    }

    pub fn get(&self) -> Result<&Vocabulary, GrammarError> {
        let built = self.built.get_or_init(|| match &self.tokenizer {
            Some(tokenizer) => Vocabulary::new(tokenizer).map_err(|e| e.to_string()),
            None => Err("the model's tokenizer is not available here".into()),
        });
        built.as_ref().map_err(|e| GrammarError::Vocabulary(e.clone()))
    }
}

impl std::fmt::Debug for LazyVocabulary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyVocabulary").field("built", &self.built.get().map(|b| b.is_ok())).finish()
    }
}
