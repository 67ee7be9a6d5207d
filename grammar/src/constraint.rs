//! One sequence's constraint: the parser that masks its logits before each sample.

use std::sync::Arc;

use llguidance::Matcher;
use strata_model::Sampler;

use crate::GrammarError;

/// The parser of one sequence's output, kept on the stage that samples it.
pub struct Constraint {
    matcher: Matcher,
    /// The parser before any token (its vocabulary's, shared): a restart clones it
    /// rather than compiling the grammar again.
    fresh: Arc<Matcher>,
    end_tokens: Arc<[u32]>,
    /// Tokens before this position are the prompt, which the grammar does not see.
    prompt_tokens: usize,
    /// The generated tokens the parser has consumed.
    consumed: Vec<u32>,
    vocab_size: usize,
}

impl Constraint {
    /// `fresh`: the grammar's parser before any token, which this one starts from.
    pub(crate) fn new(fresh: Arc<Matcher>, end_tokens: Arc<[u32]>, prompt_tokens: usize, vocab_size: usize) -> Self {
        Self { matcher: fresh.deep_clone(), fresh, end_tokens, prompt_tokens, consumed: Vec::new(), vocab_size }
    }

    /// Sets to -inf the logit of every token the grammar forbids after `history`
    /// (the prompt and every generated token, as the stage holds it). Where the
    /// grammar may end, every end-of-generation token is allowed; once it must end,
    /// only they are.
    pub fn mask(&mut self, history: &[u32], logits: &mut [f32]) -> Result<(), GrammarError> {
        // A fault in the parser fails this sequence, not the stage's compute thread.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.mask_unguarded(history, logits)))
            .unwrap_or_else(|_| Err(GrammarError::Parser("the parser panicked".into())))
    }

    fn mask_unguarded(&mut self, history: &[u32], logits: &mut [f32]) -> Result<(), GrammarError> {
        self.catch_up(history)?;
        let allowed = self.matcher.compute_mask_or_eos().map_err(parser_error)?;
        let may_end = self.end_tokens.iter().any(|&t| allowed.is_allowed(t));
        let mut any = false;
        for (id, logit) in logits.iter_mut().enumerate() {
            let id32 = id as u32;
            let ok = id < self.vocab_size && (allowed.is_allowed(id32) || (may_end && self.end_tokens.contains(&id32)));
            if ok {
                any = true;
            } else {
                *logit = f32::NEG_INFINITY;
            }
        }
        if !any {
            return Err(GrammarError::Parser("the grammar allows no token here".into()));
        }
        Ok(())
    }

    /// Feeds the parser the generated tokens it has not seen. A history that no
    /// longer starts with what it consumed (a replay, or a move that restarted the
    /// sequence) restarts the parser: the same tokens give the same state.
    fn catch_up(&mut self, history: &[u32]) -> Result<(), GrammarError> {
        let generated = history.get(self.prompt_tokens..).unwrap_or_default();
        let common = self.consumed.iter().zip(generated).take_while(|(a, b)| a == b).count();
        if common < self.consumed.len() {
            self.matcher = self.fresh.deep_clone();
            self.consumed.clear();
        }
        let unseen = &generated[self.consumed.len()..];
        if !unseen.is_empty() {
            self.matcher.consume_tokens(unseen).map_err(parser_error)?;
            self.consumed.extend_from_slice(unseen);
        }
        Ok(())
    }
}

/// The token after `history` (every token so far, prompt included) as `sampler` picks
/// it from `logits`, among the tokens `constraint` allows when there is one. The mask
/// goes on a copy: `logits` stay the model's, and so do the logprobs reported from
/// them.
pub fn sample(
    sampler: &Sampler,
    constraint: Option<&mut Constraint>,
    logits: &[f32],
    history: &[u32],
) -> Result<u32, GrammarError> {
    let position = history.len();
    match constraint {
        Some(constraint) => {
            let mut masked = logits.to_vec();
            constraint.mask(history, &mut masked)?;
            sampler.sample_owned(masked, history, position)
        }
        None => sampler.sample(logits, history, position),
    }
    .map_err(GrammarError::Sampling)
}

fn parser_error(e: impl std::fmt::Display) -> GrammarError {
    GrammarError::Parser(e.to_string())
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};
    use strata_model::synthetic::SyntheticModel;
    use strata_model::{ModelFile, Tokenizer};

    use crate::{Grammar, GrammarError, Vocabulary};

    fn tokenizer() -> Tokenizer {
        let dir = tempfile::tempdir().unwrap();
        let path = SyntheticModel::tiny().write_to(dir.path()).unwrap();
        Tokenizer::from_gguf(ModelFile::open(path).unwrap().metadata()).unwrap()
    }

    /// Random logits, a SplitMix stream: any model, as far as the grammar knows.
    fn noise(state: &mut u64, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let z = (*state ^ (*state >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                (z >> 40) as f32 / (1u64 << 24) as f32 * 8.0
            })
            .collect()
    }

    fn argmax(logits: &[f32]) -> u32 {
        (0..logits.len()).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap() as u32
    }

    /// Generates under `grammar` from noise until an end token: the generated tokens.
    fn generate(tokenizer: &Tokenizer, grammar: &Grammar, prompt: &[u32], seed: u64) -> Vec<u32> {
        let vocabulary = Vocabulary::new(tokenizer).unwrap();
        let mut constraint = vocabulary.constrain(grammar, prompt.len()).unwrap();
        let mut history = prompt.to_vec();
        let mut state = seed;
        for _ in 0..400 {
            let mut logits = noise(&mut state, tokenizer.vocab_size() + 7);
            constraint.mask(&history, &mut logits).unwrap();
            let token = argmax(&logits);
            if tokenizer.is_eos(token) {
                return history[prompt.len()..].to_vec();
            }
            history.push(token);
        }
        panic!("no end after 400 tokens: {:?}", tokenizer.decode(&history[prompt.len()..]));
    }

    fn schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "name": { "type": "string", "maxLength": 12 },
                "age": { "type": "integer", "minimum": 0, "maximum": 150 },
                "tags": { "type": "array", "items": { "enum": ["a", "b"] }, "maxItems": 3 }
            },
            "required": ["name", "age", "tags"],
            "additionalProperties": false
        })
    }

    #[test]
    fn noise_under_a_schema_is_a_valid_document() {
        let tokenizer = tokenizer();
        let grammar = Grammar::json_schema(&schema()).unwrap();
        for seed in 0..5 {
            let text = tokenizer.decode(&generate(&tokenizer, &grammar, &[1, 2, 3], seed)).unwrap();
            let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            let age = value["age"].as_i64().unwrap();
            assert!((0..=150).contains(&age), "{text}");
            assert!(value["name"].as_str().unwrap().chars().count() <= 12, "{text}");
            assert!(value["tags"].as_array().unwrap().len() <= 3, "{text}");
            assert_eq!(value.as_object().unwrap().len(), 3, "{text}");
            assert_eq!(serde_json::to_string(&value).unwrap(), text, "compact JSON");
        }
    }

    #[test]
    fn json_object_mode_gives_an_object() {
        let tokenizer = tokenizer();
        let text = tokenizer.decode(&generate(&tokenizer, &Grammar::json_object(), &[5], 9)).unwrap();
        assert!(serde_json::from_str::<Value>(&text).unwrap_or_else(|e| panic!("{text:?}: {e}")).is_object());
    }

    #[test]
    fn a_restarted_history_gets_the_masks_it_had() {
        let tokenizer = tokenizer();
        let vocabulary = Vocabulary::new(&tokenizer).unwrap();
        let grammar = Grammar::json_schema(&schema()).unwrap();
        let generated = generate(&tokenizer, &grammar, &[7, 8], 3);
        let prompt = [7, 8];
        let history: Vec<u32> = prompt.iter().chain(&generated).copied().collect();
        let masks = |constraint: &mut crate::Constraint, upto: usize| {
            let mut logits = vec![0.0; tokenizer.vocab_size()];
            constraint.mask(&history[..upto], &mut logits).unwrap();
            logits
        };
        // One parser that went all the way, then back to the middle (a replay);
        // one that starts in the middle (a move): both equal a fresh one.
        let mut replayed = vocabulary.constrain(&grammar, 2).unwrap();
        masks(&mut replayed, history.len());
        let middle = 2 + generated.len() / 2;
        let mut moved = vocabulary.constrain(&grammar, 2).unwrap();
        let mut fresh = vocabulary.constrain(&grammar, 2).unwrap();
        for upto in 2..middle {
            masks(&mut fresh, upto);
        }
        let expected = masks(&mut fresh, middle);
        assert_eq!(masks(&mut replayed, middle), expected);
        assert_eq!(masks(&mut moved, middle), expected);
    }

    #[test]
    fn a_grammar_is_compiled_once_and_each_constraint_parses_on_its_own() {
        let tokenizer = tokenizer();
        let vocabulary = Vocabulary::new(&tokenizer).unwrap();
        let grammar = Grammar::json_schema(&schema()).unwrap();
        vocabulary.check(&grammar).unwrap();
        let mut first = vocabulary.constrain(&grammar, 0).unwrap();
        let mut second = vocabulary.constrain(&grammar, 0).unwrap();
        assert_eq!(vocabulary.kept(), std::slice::from_ref(&grammar), "compiled once, by the check");
        // The first parses a whole document; the second, from the same compiled
        // parser, still starts where one compiled elsewhere does, and so does the
        // first once its history restarts.
        let document = generate(&tokenizer, &grammar, &[], 4);
        first.mask(&document, &mut vec![0.0; tokenizer.vocab_size()]).unwrap();
        let start = |constraint: &mut crate::Constraint| {
            let mut logits = vec![0.0; tokenizer.vocab_size()];
            constraint.mask(&[], &mut logits).unwrap();
            logits
        };
        let expected = start(&mut Vocabulary::new(&tokenizer).unwrap().constrain(&grammar, 0).unwrap());
        assert_ne!(expected, vec![0.0; tokenizer.vocab_size()], "the grammar masks something at the start");
        assert_eq!(start(&mut second), expected);
        assert_eq!(start(&mut first), expected);
    }

    #[test]
    fn the_sixteen_grammars_used_last_are_kept() {
        let vocabulary = Vocabulary::new(&tokenizer()).unwrap();
        let integer = |maximum: u32| Grammar::json_schema(&json!({ "type": "integer", "maximum": maximum })).unwrap();
        for maximum in 0..16 {
            vocabulary.check(&integer(maximum)).unwrap();
        }
        vocabulary.check(&integer(0)).unwrap();
        vocabulary.check(&integer(16)).unwrap();
        let kept = vocabulary.kept();
        assert_eq!(kept.len(), 16);
        assert_eq!(kept[..2], [integer(16), integer(0)], "most recent first");
        assert!(!kept.contains(&integer(1)), "the one used longest ago went");
    }

    #[test]
    fn bad_schemas_are_refused_with_the_reason() {
        let vocabulary = Vocabulary::new(&tokenizer()).unwrap();
        assert!(matches!(Grammar::json_schema(&json!("object")), Err(GrammarError::Invalid(_))));
        for bad in [json!({ "type": "no such type" }), json!({ "type": "integer", "minimum": 5, "maximum": 1 })] {
            let grammar = Grammar::json_schema(&bad).unwrap();
            match vocabulary.check(&grammar) {
                Err(GrammarError::Invalid(message)) => assert!(!message.is_empty()),
                other => panic!("{bad}: {:?}", other.map(|_| ())),
            }
        }
        assert!(matches!(vocabulary.check(&Grammar::from_wire("{".into())), Err(GrammarError::Invalid(_))));
    }
}
