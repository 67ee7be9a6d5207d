//! Request parameters, read field by field from the JSON body and checked once, at
//! the edge, into typed values.
//!
//! Fields are read one at a time rather than through one derived struct so that every
//! mistake names the field at fault (`param` in the error body), which serde's
//! derive cannot do for values nested inside a request.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};
use strata_grammar::Grammar;
use strata_model::SamplingParams;

use super::errors::ApiError;
use crate::engine::{Limits, ModelCard};

/// A request body: a JSON object.
pub struct Fields(Map<String, Value>);

impl Fields {
    pub fn new(map: Map<String, Value>) -> Self {
        Self(map)
    }

    /// The field's value; absent and `null` are both `None`.
    pub fn get<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, ApiError> {
        match self.raw(name) {
            None => Ok(None),
            Some(value) => {
                T::deserialize(value).map(Some).map_err(|e| ApiError::invalid(name, format!("invalid `{name}`: {e}")))
            }
        }
    }

    pub fn require<T: DeserializeOwned>(&self, name: &str) -> Result<T, ApiError> {
        self.get(name)?.ok_or_else(|| ApiError::invalid(name, format!("missing required parameter `{name}`")))
    }

    /// The field as it came, unless absent or `null`.
    pub fn raw(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }
}

/// The request must name the served model.
pub fn check_model(fields: &Fields, card: &ModelCard) -> Result<(), ApiError> {
    let model: String = fields.require("model")?;
    if model != card.id {
        return Err(ApiError::model_not_found(&model));
    }
    Ok(())
}

/// What both completion endpoints accept beyond the prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    pub sampling: SamplingParams,
    /// Generation ends before the first of these; empty strings are dropped.
    pub stop: Vec<String>,
    pub stream: bool,
    /// Streams end with a chunk carrying the usage.
    pub include_usage: bool,
    /// The grammar the output follows (`response_format`), not yet checked against
    /// the model's vocabulary (see `api::begin`).
    pub constraint: Option<Grammar>,
    /// Choices to generate (`n`), each its own sequence; choice `i` samples with
    /// seed `seed + i`.
    pub choices: usize,
}

/// Choices one request may ask for (`n`).
pub const MAX_CHOICES: usize = 16;

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// OpenAI's default temperature.
const DEFAULT_TEMPERATURE: f64 = 1.0;

/// `accepted`: parameters of the refused kind (see `refuse_unsupported`) that the
/// endpoint handles itself.
pub fn options(fields: &Fields, accepted: &[&str]) -> Result<Options, ApiError> {
    refuse_unsupported(fields, accepted)?;
    let choices = match fields.get::<i64>("n")? {
        None => 1,
        Some(n) if (1..=MAX_CHOICES as i64).contains(&n) => n as usize,
        Some(n) => return Err(ApiError::invalid("n", format!("n must be between 1 and {MAX_CHOICES}, got {n}"))),
    };
    let temperature = fields.get::<f64>("temperature")?.unwrap_or(DEFAULT_TEMPERATURE);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "temperature",
            format!("temperature must be between 0 and 2, got {temperature}"),
        ));
    }
    let top_p = match fields.get::<f64>("top_p")? {
        Some(p) if !(p > 0.0 && p <= 1.0) => {
            return Err(ApiError::invalid("top_p", format!("top_p must be greater than 0 and at most 1, got {p}")))
        }
        // 1 keeps every token: no filter at all.
        Some(p) if p < 1.0 => Some(p as f32),
        _ => None,
    };
    // -1 and 0 mean no limit, as in vLLM.
    let top_k = match fields.get::<i64>("top_k")? {
        Some(k) if k < -1 => {
            return Err(ApiError::invalid("top_k", format!("top_k must be -1 (no limit) or at least 1, got {k}")))
        }
        Some(k) if k >= 1 => Some(usize::try_from(k).unwrap_or(usize::MAX)),
        _ => None,
    };
    let min_p = match fields.get::<f64>("min_p")? {
        Some(p) if !(0.0..=1.0).contains(&p) => {
            return Err(ApiError::invalid("min_p", format!("min_p must be between 0 and 1, got {p}")))
        }
        Some(p) if p > 0.0 => Some(p as f32),
        _ => None,
    };
    let repetition_penalty = fields.get::<f64>("repetition_penalty")?.unwrap_or(1.0);
    if !(repetition_penalty.is_finite() && repetition_penalty > 0.0 && repetition_penalty <= 10.0) {
        return Err(ApiError::invalid(
            "repetition_penalty",
            format!("repetition_penalty must be greater than 0 and at most 10, got {repetition_penalty}"),
        ));
    }
    for name in ["frequency_penalty", "presence_penalty"] {
        let value = fields.get::<f64>(name)?.unwrap_or(0.0);
        if value != 0.0 {
            return Err(ApiError::unsupported(
                name,
                format!("{name} is not supported (only 0); use repetition_penalty instead"),
            ));
        }
    }
    // Without a seed every request draws differently, as OpenAI's do.
    let seed = match fields.get::<i64>("seed")? {
        Some(seed) => seed as u64,
        None => rand::random(),
    };
    let sampling = SamplingParams {
        temperature: temperature as f32,
        top_k,
        top_p,
        min_p,
        repetition_penalty: repetition_penalty as f32,
        seed,
        ..SamplingParams::greedy()
    };
    let stream = fields.get::<bool>("stream")?.unwrap_or(false);
    let include_usage = fields.get::<StreamOptions>("stream_options")?.unwrap_or_default().include_usage;
    let constraint = response_format(fields)?;
    Ok(Options { sampling, stop: stop_strings(fields)?, stream, include_usage, constraint, choices })
}

/// `response_format`: free text, any JSON object, or JSON valid under a schema (as
/// OpenAI's `json_schema.schema`, or as llama.cpp's `json_object` with a `schema`).
/// Output follows a schema whether or not it says `strict`.
fn response_format(fields: &Fields) -> Result<Option<Grammar>, ApiError> {
    const PARAM: &str = "response_format";
    let Some(format) = fields.raw(PARAM) else {
        return Ok(None);
    };
    let schema = |schema: &Value| {
        Grammar::json_schema(schema)
            .map(Some)
            .map_err(|e| ApiError::invalid(PARAM, format!("invalid {PARAM} schema: {e}")))
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => match format.get("schema") {
            Some(s) => schema(s),
            None => Ok(Some(Grammar::json_object())),
        },
        Some("json_schema") => match format.get("json_schema").and_then(|j| j.get("schema")) {
            Some(s) => schema(s),
            None => Err(ApiError::invalid(PARAM, format!("a {PARAM} of type json_schema needs json_schema.schema"))),
        },
        Some(other) => Err(ApiError::unsupported(
            PARAM,
            format!("{PARAM} type `{other}` is not supported (text, json_object or json_schema)"),
        )),
        None => Err(ApiError::invalid(PARAM, format!("{PARAM} must be an object with a `type`"))),
    }
}

fn stop_strings(fields: &Fields) -> Result<Vec<String>, ApiError> {
    let stops = match fields.raw("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(s.clone()),
                _ => Err(ApiError::invalid("stop", "stop must be a string or an array of strings")),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(ApiError::invalid("stop", "stop must be a string or an array of strings")),
    };
    Ok(stops.into_iter().filter(|s| !s.is_empty()).collect())
}

/// Parameters we accept but cannot honour: refused rather than silently ignored.
fn refuse_unsupported(fields: &Fields, accepted: &[&str]) -> Result<(), ApiError> {
    let set = |name: &str| match fields.raw(name) {
        None | Some(Value::Bool(false)) => false,
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(_) => true,
    };
    for name in ["logprobs", "top_logprobs", "echo", "suffix", "logit_bias", "tools", "functions"] {
        if set(name) && !accepted.contains(&name) {
            return Err(ApiError::unsupported(name, format!("`{name}` is not supported")));
        }
    }
    if fields.get::<i64>("best_of")?.is_some_and(|b| b != 1) {
        return Err(ApiError::unsupported("best_of", "only best_of = 1 is supported"));
    }
    Ok(())
}

/// `max_tokens` as the request gives it, checked to be at least 1.
pub fn max_tokens(fields: &Fields, name: &str) -> Result<Option<usize>, ApiError> {
    max_tokens_from(fields, name, 1)
}

/// `max_tokens` as the request gives it, checked to be at least `least`.
pub fn max_tokens_from(fields: &Fields, name: &str, least: i64) -> Result<Option<usize>, ApiError> {
    match fields.get::<i64>(name)? {
        None => Ok(None),
        Some(n) if n < least => Err(ApiError::invalid(name, format!("{name} must be at least {least}, got {n}"))),
        Some(n) => Ok(Some(usize::try_from(n).unwrap_or(usize::MAX))),
    }
}

/// The number of tokens to generate: what the request asked for, which must fit in
/// the engine's context beside the prompt, or `default` cut to what fits.
pub fn fit_in_context(
    prompt_tokens: usize,
    requested: Option<(&str, usize)>,
    default: usize,
    limits: &Limits,
    prompt_param: &str,
) -> Result<usize, ApiError> {
    let context = limits.context;
    if requested.is_some_and(|(_, n)| n == 0) && prompt_tokens <= context {
        // Nothing to generate (a prompt only scored): the prompt alone must fit.
        return Ok(0);
    }
    if prompt_tokens >= context {
        return Err(ApiError::invalid(
            prompt_param,
            format!("the prompt ({prompt_tokens} tokens) leaves no room to generate in {}", limits.describe_context()),
        )
        .with_code("context_length_exceeded"));
    }
    let room = context - prompt_tokens;
    match requested {
        None => Ok(default.min(room)),
        Some((_, n)) if n <= room => Ok(n),
        Some((name, n)) => Err(ApiError::invalid(
            name,
            format!("prompt ({prompt_tokens} tokens) plus {name} ({n}) exceeds {}", limits.describe_context()),
        )
        .with_code("context_length_exceeded")),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::engine::ContextSource;

    fn fields(value: Value) -> Fields {
        match value {
            Value::Object(map) => Fields::new(map),
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn defaults_follow_openai() {
        let options = options(&fields(json!({"seed": 3})), &[]).unwrap();
        assert_eq!(options.sampling, SamplingParams { temperature: 1.0, seed: 3, ..SamplingParams::greedy() });
        assert!(options.stop.is_empty() && !options.stream && !options.include_usage);
    }

    #[test]
    fn every_parameter_is_read() {
        let options = options(&fields(json!({
            "temperature": 0.5, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1,
            "seed": -1, "stop": ["a", "", "bc"], "n": 1, "stream": true, "stream_options": {"include_usage": true},
            "frequency_penalty": 0, "presence_penalty": 0.0, "logprobs": false, "user": "someone",
            "response_format": {"type": "text"}
        })), &[])
        .unwrap();
        assert_eq!(
            options.sampling,
            SamplingParams {
                temperature: 0.5,
                top_p: Some(0.9),
                top_k: Some(40),
                min_p: Some(0.05),
                repetition_penalty: 1.1,
                seed: u64::MAX,
                ..SamplingParams::greedy()
            }
        );
        assert_eq!(options.stop, ["a", "bc"]);
        assert!(options.stream && options.include_usage);
        let options = super::options(&fields(json!({"stop": "x", "top_k": -1, "top_p": 1})), &[]).unwrap();
        assert_eq!((options.stop, options.sampling.top_k, options.sampling.top_p), (vec!["x".to_owned()], None, None));
    }

    #[test]
    fn bad_values_name_their_field() {
        for (body, param) in [
            (json!({"temperature": 2.5}), "temperature"),
            (json!({"temperature": -0.1}), "temperature"),
            (json!({"temperature": "hot"}), "temperature"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"top_p": 1.5}), "top_p"),
            (json!({"top_k": -2}), "top_k"),
            (json!({"min_p": 2}), "min_p"),
            (json!({"repetition_penalty": 0}), "repetition_penalty"),
            (json!({"frequency_penalty": 0.5}), "frequency_penalty"),
            (json!({"presence_penalty": -1}), "presence_penalty"),
            (json!({"n": 0}), "n"),
            (json!({"n": 17}), "n"),
            (json!({"stop": 5}), "stop"),
            (json!({"stop": ["a", 1]}), "stop"),
            (json!({"stream": "yes"}), "stream"),
            (json!({"logprobs": 2}), "logprobs"),
            (json!({"echo": true}), "echo"),
            (json!({"best_of": 3}), "best_of"),
            (json!({"response_format": {"type": "regex"}}), "response_format"),
            (json!({"response_format": {"type": "json_schema"}}), "response_format"),
            (json!({"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}}), "response_format"),
            (json!({"response_format": "json"}), "response_format"),
            (json!({"tools": [{"type": "function"}]}), "tools"),
        ] {
            let err = options(&fields(body.clone()), &[]).unwrap_err();
            assert_eq!(err.status, 400, "{body}");
            assert_eq!(err.param.as_deref(), Some(param), "{body}: {err:?}");
            assert!(err.message.contains(param), "{body}: {}", err.message);
        }
    }

    #[test]
    fn max_tokens_must_fit_beside_the_prompt() {
        assert_eq!(max_tokens(&fields(json!({"max_tokens": 5})), "max_tokens").unwrap(), Some(5));
        assert_eq!(max_tokens(&fields(json!({"max_tokens": null})), "max_tokens").unwrap(), None);
        for n in [0, -3] {
            let err = max_tokens(&fields(json!({"max_tokens": n})), "max_tokens").unwrap_err();
            assert_eq!(err.param.as_deref(), Some("max_tokens"));
        }
        let limits = Limits { context: 20, context_source: ContextSource::Model };
        assert_eq!(fit_in_context(10, None, 16, &limits, "prompt").unwrap(), 10);
        assert_eq!(fit_in_context(10, Some(("max_tokens", 10)), 16, &limits, "prompt").unwrap(), 10);
        let err = fit_in_context(10, Some(("max_tokens", 11)), 16, &limits, "prompt").unwrap_err();
        assert_eq!((err.param.as_deref(), err.code), (Some("max_tokens"), Some("context_length_exceeded")));
        assert_eq!(err.message, "prompt (10 tokens) plus max_tokens (11) exceeds the model's context of 20 tokens");
        let err = fit_in_context(20, None, 16, &limits, "messages").unwrap_err();
        assert_eq!((err.param.as_deref(), err.code), (Some("messages"), Some("context_length_exceeded")));
    }

    /// A cluster's limit is the context its plan sized the KV caches for, and the
    /// refusal says so, with both numbers.
    #[test]
    fn a_planned_context_is_named_in_the_refusal() {
        let limits = Limits { context: 64, context_source: ContextSource::Plan };
        let err = fit_in_context(40, Some(("max_tokens", 30)), 16, &limits, "prompt").unwrap_err();
        assert_eq!(err.status, 400);
        assert_eq!(
            err.message,
            "prompt (40 tokens) plus max_tokens (30) exceeds the context of 64 tokens this cluster was planned for (--context)"
        );
        // Without max_tokens the output is cut to what fits; only a prompt that
        // leaves no room is refused.
        assert_eq!(fit_in_context(40, None, usize::MAX, &limits, "messages").unwrap(), 24);
        let err = fit_in_context(64, None, usize::MAX, &limits, "messages").unwrap_err();
        assert!(err.message.contains("64 tokens this cluster was planned for"), "{}", err.message);
    }
}
