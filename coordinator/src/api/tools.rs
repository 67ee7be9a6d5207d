//! Tool calling on `/v1/chat/completions`: the request's `tools`, `tool_choice` and
//! `parallel_tool_calls`, how the conversation tells the model about them, the
//! grammar its answer follows, and the answer read back into `tool_calls`.
//!
//! Two ways to talk to a model about tools:
//! - **Native**: the model's own template formats `tools` (Hermes/Qwen
//!   `<tool_call>` tags, Llama 3.x JSON calls, Mistral `[TOOL_CALLS]`), and with
//!   `tool_choice: auto` the model answers in its own format, read back here.
//! - **Strata's JSON protocol**, for templates that know no tools (and for
//!   `required` or a named function on any model): a system message lists the
//!   tools and asks for `{"tool_calls": [{"name", "arguments"}]}` or `{"response":
//!   text}`, and the answer is *constrained* to exactly that (a JSON schema built
//!   from the tools' parameters), so even a small model always gives a call that
//!   parses and whose arguments match the function's schema.

use std::collections::HashSet;

use serde_json::{json, Map, Value};
use strata_grammar::Grammar;
use strata_model::chat_template::Role;
use strata_model::{ChatMessage, ChatTemplate};

use super::errors::ApiError;
use super::params::Fields;

/// A function the request offers.
#[derive(Debug, Clone, PartialEq)]
pub struct Function {
    pub name: String,
    pub description: String,
    /// Its arguments' JSON schema (an object schema).
    pub parameters: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    /// The model decides: a call or an answer.
    Auto,
    /// At least one call.
    Required,
    /// A call of this function.
    Named(String),
}

/// The tools of a request that offers any (`tool_choice: "none"` offers none).
#[derive(Debug, Clone, PartialEq)]
pub struct Tools {
    /// OpenAI's list as it came: a native template gets it as is.
    pub list: Value,
    pub functions: Vec<Function>,
    pub choice: ToolChoice,
    /// Several calls in one answer (`parallel_tool_calls`, default true).
    pub parallel: bool,
}

/// How calls are written in the model's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallFormat {
    /// `<tool_call>{"name", "arguments"}</tool_call>`, one tag a call.
    Hermes,
    /// `{"name", "parameters"}` (after `<|python_tag|>` at times).
    Llama3,
    /// `[TOOL_CALLS][{"name", "arguments"}, ...]`.
    Mistral,
    /// Strata's: `{"tool_calls": [...]}` or `{"response": text}`, constrained.
    Json,
}

impl CallFormat {
    /// The format for a request: the template's own when it has one and the model
    /// may choose, strata's constrained JSON otherwise.
    pub fn of(template: &ChatTemplate, choice: &ToolChoice) -> Self {
        let source = template.source();
        if !template.takes_tools() || *choice != ToolChoice::Auto {
            return Self::Json;
        }
        if source.contains("<tool_call>") {
            Self::Hermes
        } else if source.contains("[TOOL_CALLS]") {
            Self::Mistral
        } else if source.contains("<|python_tag|>") || source.contains("ipython") {
            Self::Llama3
        } else {
            Self::Json
        }
    }
}

/// A call read back from the answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCall {
    pub name: String,
    /// The arguments as a JSON text (OpenAI's `function.arguments`).
    pub arguments: String,
}

/// What the answer was: text, calls, or both (text before native calls).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Answer {
    pub content: Option<String>,
    pub calls: Vec<ParsedCall>,
}

/// `tools`, `tool_choice` and `parallel_tool_calls`, checked. `None`: no tools
/// (none given, or `tool_choice: "none"`).
pub fn tools(fields: &Fields) -> Result<Option<Tools>, ApiError> {
    let choice = fields.raw("tool_choice");
    let list = match fields.raw("tools") {
        None => Vec::new(),
        Some(Value::Array(list)) => list.clone(),
        Some(_) => return Err(ApiError::invalid("tools", "tools must be an array of functions")),
    };
    if list.is_empty() {
        return match choice {
            None => Ok(None),
            Some(c) if c == "none" || c == "auto" => Ok(None),
            Some(_) => Err(ApiError::invalid("tool_choice", "tool_choice needs `tools`")),
        };
    }
    let functions = list.iter().enumerate().map(|(i, tool)| function(i, tool)).collect::<Result<Vec<_>, _>>()?;
    let mut names = HashSet::new();
    if let Some(twice) = functions.iter().find(|f| !names.insert(f.name.as_str())) {
        return Err(ApiError::invalid("tools", format!("the function `{}` is named twice", twice.name)));
    }
    let choice = match choice {
        None => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => return Ok(None),
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!("unknown tool_choice `{other}` (none, auto, required, or a function)"),
                ))
            }
        },
        Some(named) => {
            let name = named.get("function").and_then(|f| f.get("name")).and_then(Value::as_str).ok_or_else(|| {
                ApiError::invalid(
                    "tool_choice",
                    "tool_choice must be a string or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                )
            })?;
            if !functions.iter().any(|f| f.name == name) {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!("tool_choice names `{name}`, which is not among the tools"),
                ));
            }
            ToolChoice::Named(name.to_owned())
        }
    };
    let parallel = fields.get::<bool>("parallel_tool_calls")?.unwrap_or(true);
    Ok(Some(Tools { list: Value::Array(list), functions, choice, parallel }))
}

fn function(i: usize, tool: &Value) -> Result<Function, ApiError> {
    let param = format!("tools[{i}]");
    let bad = |message: &str| ApiError::invalid(&param, format!("{param}: {message}"));
    if tool.get("type").and_then(Value::as_str) != Some("function") {
        return Err(bad("only tools of type `function` are supported"));
    }
    let function = tool.get("function").ok_or_else(|| bad("a tool needs `function`"))?;
    let name = function.get("name").and_then(Value::as_str).unwrap_or_default();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.') {
        return Err(bad("a function needs a `name` of letters, digits, `_`, `-` or `.`"));
    }
    let parameters = match function.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
        Some(Value::Object(p)) => {
            // A call's arguments are the named ones only (as OpenAI's strict mode
            // requires) unless the schema says otherwise: small models otherwise
            // keep inventing arguments until max_tokens.
            let mut p = p.clone();
            if p.get("type").is_some_and(|t| t == "object") {
                p.entry("additionalProperties").or_insert(Value::Bool(false));
            }
            Value::Object(p)
        }
        Some(_) => return Err(bad("`parameters` must be a JSON schema object")),
    };
    let description = function.get("description").and_then(Value::as_str).unwrap_or_default().to_owned();
    Ok(Function { name: name.to_owned(), description, parameters })
}

/// Checks the calls and answers in the history: every tool message answers a call
/// an earlier assistant turn made.
pub fn check_history(messages: &[ChatMessage]) -> Result<(), ApiError> {
    let mut called: HashSet<&str> = HashSet::new();
    for (i, m) in messages.iter().enumerate() {
        called.extend(m.tool_calls.iter().map(|c| c.id.as_str()));
        if m.role == Role::Tool {
            let param = format!("messages[{i}].tool_call_id");
            match m.tool_call_id.as_deref() {
                None => return Err(ApiError::invalid(&param, format!("a tool message needs {param}"))),
                Some(id) if !called.contains(id) => {
                    return Err(ApiError::invalid(
                        &param,
                        format!("{param} `{id}` answers no call an earlier assistant message made"),
                    ))
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

/// The conversation as strata's JSON protocol shows it to a template that knows
/// no tools: the tools described in the system message, earlier calls as the JSON
/// the model wrote, tool results as user turns (templates that know no `tool` role
/// often refuse it).
pub fn json_protocol_messages(messages: &[ChatMessage], tools: &Tools) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    let instructions = instructions(tools);
    match messages.first() {
        Some(first) if first.role == Role::System => {
            out.push(ChatMessage::new(Role::System, format!("{}\n\n{instructions}", first.content)))
        }
        _ => out.push(ChatMessage::new(Role::System, instructions)),
    }
    let rest = messages.iter().skip(usize::from(messages.first().is_some_and(|m| m.role == Role::System)));
    for m in rest {
        match m.role {
            Role::Assistant if !m.tool_calls.is_empty() => {
                let calls: Vec<Value> = m
                    .tool_calls
                    .iter()
                    .map(|c| json!({"name": c.function.name, "arguments": c.function.arguments}))
                    .collect();
                out.push(ChatMessage::new(Role::Assistant, json!({ "tool_calls": calls }).to_string()));
            }
            Role::Assistant => {
                out.push(ChatMessage::new(Role::Assistant, json!({ "response": m.content }).to_string()))
            }
            Role::Tool => {
                let id = m.tool_call_id.as_deref().unwrap_or_default();
                let result = format!("The result of tool call {id}: {}", m.content);
                // Results of parallel calls make one turn.
                match out.last_mut() {
                    Some(last) if last.role == Role::User && last.content.starts_with("The result of tool call") => {
                        last.content.push('\n');
                        last.content.push_str(&result);
                    }
                    _ => out.push(ChatMessage::new(Role::User, result)),
                }
            }
            _ => out.push(m.clone()),
        }
    }
    out
}

fn instructions(tools: &Tools) -> String {
    let listed: Vec<Value> = tools
        .functions
        .iter()
        .map(|f| json!({"name": f.name, "description": f.description, "parameters": f.parameters}))
        .collect();
    let ask = match &tools.choice {
        ToolChoice::Auto => {
            "Reply with JSON only: {\"tool_calls\": [{\"name\": ..., \"arguments\": {...}}]} to call tools, or \
             {\"response\": \"...\"} to answer the user."
                .to_owned()
        }
        ToolChoice::Required => {
            "Reply with JSON only: {\"tool_calls\": [{\"name\": ..., \"arguments\": {...}}]}.".to_owned()
        }
        ToolChoice::Named(name) => {
            format!("Call the tool `{name}`. Reply with JSON only: {{\"tool_calls\": [{{\"name\": \"{name}\", \"arguments\": {{...}}}}]}}.")
        }
    };
    format!("You can call these tools:\n{}\n{ask}", Value::Array(listed))
}

/// Calls one answer makes at most: a model that keeps adding calls stops at this
/// many rather than at `max_tokens` with a document cut in half.
pub const MAX_PARALLEL_CALLS: usize = 4;

/// The grammar of an answer in strata's JSON protocol, from the tools' schemas.
pub fn json_protocol_grammar(tools: &Tools) -> Result<Grammar, ApiError> {
    let callable: Vec<&Function> = match &tools.choice {
        ToolChoice::Named(name) => tools.functions.iter().filter(|f| &f.name == name).collect(),
        _ => tools.functions.iter().collect(),
    };
    let call_schemas: Vec<Value> = callable
        .iter()
        .map(|f| {
            json!({
                "type": "object",
                "properties": {"name": {"const": f.name}, "arguments": f.parameters},
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        })
        .collect();
    let most = if tools.parallel { MAX_PARALLEL_CALLS } else { 1 };
    let calls = json!({"type": "array", "items": {"anyOf": call_schemas}, "minItems": 1, "maxItems": most});
    let calling = json!({"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"], "additionalProperties": false});
    let schema = match tools.choice {
        ToolChoice::Auto => json!({"anyOf": [calling, {
            "type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"],
            "additionalProperties": false,
        }]}),
        _ => calling,
    };
    Grammar::json_schema(&schema)
        .map_err(|e| ApiError::invalid("tools", format!("cannot build the tools' grammar: {e}")))
}

/// The answer `text`, read in `format`. Text that holds no well-formed call is
/// content, as it came.
pub fn parse(format: CallFormat, text: &str) -> Answer {
    let content = |t: &str| {
        let t = t.trim();
        (!t.is_empty()).then(|| t.to_owned())
    };
    let parsed = match format {
        CallFormat::Json => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(o)) => match (o.get("tool_calls"), o.get("response")) {
                (Some(Value::Array(calls)), _) => {
                    calls_of(calls, "arguments").map(|calls| Answer { content: None, calls })
                }
                (None, Some(Value::String(r))) => Some(Answer { content: Some(r.clone()), calls: Vec::new() }),
                _ => None,
            },
            _ => None,
        },
        CallFormat::Hermes => {
            let mut calls = Vec::new();
            let mut rest = text;
            let before = text.find("<tool_call>").map(|i| &text[..i]);
            while let Some(start) = rest.find("<tool_call>") {
                let body = &rest[start + "<tool_call>".len()..];
                let end = body.find("</tool_call>").unwrap_or(body.len());
                match serde_json::from_str::<Value>(body[..end].trim()) {
                    Ok(call) => calls.push(call),
                    Err(_) => break,
                }
                rest = body.get(end + "</tool_call>".len()..).unwrap_or_default();
            }
            calls_of(&calls, "arguments")
                .filter(|c| !c.is_empty())
                .map(|calls| Answer { content: before.and_then(content), calls })
        }
        CallFormat::Mistral => text.find("[TOOL_CALLS]").and_then(|i| {
            let body = text[i + "[TOOL_CALLS]".len()..].trim();
            match serde_json::from_str::<Value>(body) {
                Ok(Value::Array(calls)) => {
                    calls_of(&calls, "arguments").map(|calls| Answer { content: content(&text[..i]), calls })
                }
                _ => None,
            }
        }),
        CallFormat::Llama3 => {
            let body = text.trim().trim_start_matches("<|python_tag|>").trim();
            match serde_json::from_str::<Value>(body) {
                Ok(call @ Value::Object(_)) if call.get("name").is_some() => {
                    calls_of(&[call], "parameters").map(|calls| Answer { content: None, calls })
                }
                _ => None,
            }
        }
    };
    parsed.unwrap_or_else(|| Answer { content: Some(text.to_owned()), calls: Vec::new() })
}

/// Calls as `{"name", ARGUMENTS_KEY (or "arguments")}` objects; `None` if one is not.
fn calls_of(calls: &[Value], arguments_key: &str) -> Option<Vec<ParsedCall>> {
    calls
        .iter()
        .map(|call| {
            let name = call.get("name")?.as_str()?.to_owned();
            let arguments = call.get(arguments_key).or_else(|| call.get("arguments")).cloned().unwrap_or(json!({}));
            // Some models write the arguments as a JSON string already.
            let arguments = match arguments {
                Value::String(s) => s,
                other => other.to_string(),
            };
            Some(ParsedCall { name, arguments })
        })
        .collect()
}

/// An assistant message's `tool_calls` as OpenAI sends them back, read into the
/// history's form (arguments parsed into an object for the template).
pub fn history_calls(i: usize, value: &Value) -> Result<Vec<strata_model::chat_template::ToolCall>, ApiError> {
    let param = format!("messages[{i}].tool_calls");
    let Value::Array(calls) = value else {
        return Err(ApiError::invalid(&param, format!("{param} must be an array")));
    };
    calls
        .iter()
        .enumerate()
        .map(|(j, call)| {
            let at = format!("{param}[{j}]");
            let bad = |m: &str| ApiError::invalid(&at, format!("{at}: {m}"));
            let id = call.get("id").and_then(Value::as_str).ok_or_else(|| bad("a call needs an `id`"))?;
            let function = call.get("function").ok_or_else(|| bad("a call needs `function`"))?;
            let name =
                function.get("name").and_then(Value::as_str).ok_or_else(|| bad("a call needs `function.name`"))?;
            let arguments = match function.get("arguments") {
                None | Some(Value::Null) => Value::Object(Map::new()),
                Some(Value::String(s)) => {
                    serde_json::from_str(s).map_err(|e| bad(&format!("`function.arguments` is not JSON: {e}")))?
                }
                Some(other) => other.clone(),
            };
            Ok(strata_model::chat_template::ToolCall {
                id: id.to_owned(),
                kind: "function".into(),
                function: strata_model::chat_template::FunctionCall { name: name.to_owned(), arguments },
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(value: Value) -> Fields {
        match value {
            Value::Object(map) => Fields::new(map),
            _ => unreachable!(),
        }
    }

    fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
    }

    #[test]
    fn choices_are_read_and_bad_ones_name_their_parameter() {
        let t = tools(&fields(json!({"tools": weather()}))).unwrap().unwrap();
        assert_eq!(
            (t.choice.clone(), t.parallel, t.functions[0].name.as_str()),
            (ToolChoice::Auto, true, "get_weather")
        );
        let named = json!({"tools": weather(), "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "parallel_tool_calls": false});
        let t = tools(&fields(named)).unwrap().unwrap();
        assert_eq!((t.choice, t.parallel), (ToolChoice::Named("get_weather".into()), false));
        assert_eq!(tools(&fields(json!({"tools": weather(), "tool_choice": "none"}))).unwrap(), None);
        assert_eq!(tools(&fields(json!({}))).unwrap(), None);
        for (body, param) in [
            (
                json!({"tools": weather(), "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
                "tool_choice",
            ),
            (json!({"tools": weather(), "tool_choice": "sometimes"}), "tool_choice"),
            (json!({"tool_choice": "required"}), "tool_choice"),
            (json!({"tools": {"a": 1}}), "tools"),
            (json!({"tools": [{"type": "code_interpreter"}]}), "tools[0]"),
            (json!({"tools": [{"type": "function", "function": {"name": ""}}]}), "tools[0]"),
            (json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]}), "tools[0]"),
            (json!({"tools": [weather()[0].clone(), weather()[0].clone()]}), "tools"),
        ] {
            let err = tools(&fields(body.clone())).unwrap_err();
            assert_eq!(err.param.as_deref(), Some(param), "{body}: {err:?}");
        }
    }

    #[test]
    fn each_format_is_read_back_into_calls() {
        let call = |name: &str, args: &str| ParsedCall { name: name.into(), arguments: args.into() };
        let json_calls = r#"{"tool_calls": [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]}"#;
        assert_eq!(parse(CallFormat::Json, json_calls).calls, [call("a", r#"{"x":1}"#), call("b", "{}")]);
        assert_eq!(
            parse(CallFormat::Json, r#"{"response": "hi"}"#),
            Answer { content: Some("hi".into()), calls: vec![] }
        );
        let hermes = "Let me look.\n<tool_call>\n{\"name\": \"a\", \"arguments\": {\"x\": 1}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": \"{}\"}\n</tool_call>";
        let got = parse(CallFormat::Hermes, hermes);
        assert_eq!(
            (got.content.as_deref(), got.calls),
            (Some("Let me look."), vec![call("a", r#"{"x":1}"#), call("b", "{}")])
        );
        let mistral = r#"[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}}]"#;
        assert_eq!(parse(CallFormat::Mistral, mistral).calls, [call("a", r#"{"x":1}"#)]);
        let llama = r#"<|python_tag|>{"name": "a", "parameters": {"x": 1}}"#;
        assert_eq!(parse(CallFormat::Llama3, llama).calls, [call("a", r#"{"x":1}"#)]);
        // Text with no well-formed call stays text.
        for format in [CallFormat::Json, CallFormat::Hermes, CallFormat::Mistral, CallFormat::Llama3] {
            let got = parse(format, "Paris is the capital. <tool_call>{broken");
            assert_eq!(
                (got.content.as_deref(), got.calls.len()),
                (Some("Paris is the capital. <tool_call>{broken"), 0)
            );
        }
    }

    #[test]
    fn a_tool_message_must_answer_an_earlier_call() {
        let call = history_calls(
            1,
            &json!([{"id": "c1", "type": "function", "function": {"name": "a", "arguments": "{\"x\": 1}"}}]),
        )
        .unwrap();
        assert_eq!(call[0].function.arguments, json!({"x": 1}));
        let assistant = ChatMessage { tool_calls: call, ..ChatMessage::new(Role::Assistant, "") };
        let answer = |id: &str| ChatMessage { tool_call_id: Some(id.into()), ..ChatMessage::new(Role::Tool, "42") };
        let user = ChatMessage::new(Role::User, "hi");
        assert!(check_history(&[user.clone(), assistant.clone(), answer("c1")]).is_ok());
        let err = check_history(&[user.clone(), assistant, answer("c2")]).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("messages[2].tool_call_id"));
        let err = check_history(&[user, ChatMessage::new(Role::Tool, "42")]).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("messages[1].tool_call_id"));
        assert!(history_calls(1, &json!([{"id": "c", "function": {"name": "a", "arguments": "{"}}])).is_err());
    }
}
