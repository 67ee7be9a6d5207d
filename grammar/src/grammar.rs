//! What a request constrains its output to, in the form it travels to the last stage.

use llguidance::api::TopLevelGrammar;
use serde_json::{json, Value};

use crate::GrammarError;

/// A grammar the generated tokens must follow: llguidance's `TopLevelGrammar`, kept
/// as the JSON text that travels in `OpenSequence.constraint`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grammar(String);

impl Grammar {
    /// Output that validates against `schema` (a JSON Schema object).
    ///
    /// JSON comes out compact unless the schema says otherwise (llguidance's
    /// `x-guidance` options): with free whitespace a model can spend its whole
    /// budget on blank lines and end with a document cut in half.
    pub fn json_schema(schema: &Value) -> Result<Self, GrammarError> {
        let Value::Object(object) = schema else {
            return Err(GrammarError::Invalid("a JSON schema must be an object".into()));
        };
        let mut object = object.clone();
        object.entry("x-guidance").or_insert_with(|| json!({ "whitespace_flexible": false }));
        Self::of(TopLevelGrammar::from_json_schema(Value::Object(object)))
    }

    /// Output that is one JSON object, any object (OpenAI's `json_object` mode).
    pub fn json_object() -> Self {
        // A fixed schema: cannot fail.
        Self::json_schema(&json!({ "type": "object" })).unwrap_or_else(|_| Self(String::new()))
    }

    /// The grammar as it came over the wire; [`crate::Vocabulary::constrain`] checks it.
    pub fn from_wire(text: String) -> Self {
        Self(text)
    }

    pub fn as_wire(&self) -> &str {
        &self.0
    }

    fn of(grammar: TopLevelGrammar) -> Result<Self, GrammarError> {
        serde_json::to_string(&grammar).map(Self).map_err(|e| GrammarError::Invalid(e.to_string()))
    }

    pub(crate) fn top_level(&self) -> Result<TopLevelGrammar, GrammarError> {
        serde_json::from_str(&self.0).map_err(|e| GrammarError::Invalid(format!("not a grammar: {e}")))
    }
}
