//! Constrained sampling: generation that must follow a JSON schema or a grammar.
//!
//! A [`Grammar`] is what a request asks for, checked and put in the form it travels
//! in (llguidance's grammar as JSON, in `OpenSequence.constraint`). A [`Vocabulary`]
//! is the model's tokens as llguidance sees them, built once per model on the last
//! stage (and on the coordinator, which compiles each grammar once to refuse a bad
//! one with a 400). A [`Constraint`] is one sequence's parser: before each token is
//! sampled it masks the logits of every token the grammar forbids.
//!
//! The constraint is a pure function of the tokens generated so far: it catches up
//! on whatever history the stage holds, so a sequence replayed on a new pipeline or
//! moved with its KV cache gets exactly the masks it had, and samples exactly the
//! tokens it would have.

mod constraint;
mod grammar;
mod vocabulary;

pub use constraint::{sample, Constraint};
pub use grammar::Grammar;
pub use vocabulary::{LazyVocabulary, Vocabulary};

#[derive(Debug, thiserror::Error)]
pub enum GrammarError {
    /// The grammar or schema does not compile; the message says why.
    #[error("{0}")]
    Invalid(String),
    #[error("constrained sampling cannot use this model's vocabulary: {0}")]
    Vocabulary(String),
    /// The parser refused a token or failed to compute a mask.
    #[error("the output constraint failed: {0}")]
    Parser(String),
    #[error(transparent)]
    Sampling(strata_model::Error),
}
