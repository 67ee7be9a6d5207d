//! Chat templates from `tokenizer.chat_template`, rendered as Hugging Face renders them.
//!
//! GGUF files carry the Jinja template of the original model. Those templates are
//! written against Hugging Face's `apply_chat_template`: Jinja2 with `trim_blocks` and
//! `lstrip_blocks`, the loop-control extension, a `raise_exception` helper, a
//! `tojson` that writes Python's `json.dumps` style, `strftime_now`, and Python's
//! string methods (`.strip()`, `.split()`, ...). The minijinja environment here
//! provides the same, the string methods through `minijinja-contrib`'s pycompat.
//!
//! The variables a template sees are `messages` (a list of `{role, content}`),
//! `add_generation_prompt`, and `bos_token` / `eos_token` (the texts of those tokens).
//! When the tokenizer adds a BOS itself, a BOS the template wrote at the start is cut
//! off again, as llama.cpp does, so the prompt does not start with two.

use std::collections::HashMap;
use std::io;
use std::time::{SystemTime, UNIX_EPOCH};

use candle_core::quantized::gguf_file::Value;
use minijinja::value::{Kwargs, Value as JinjaValue};
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::tokenizer::TemplateTokens;

/// The metadata key holding the template.
pub const CHAT_TEMPLATE_KEY: &str = "tokenizer.chat_template";

/// What files without a template get: ChatML, the format most small chat models use.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// What files without a template get when their vocabulary has Gemma's turn markers
/// (`<start_of_turn>`, `<end_of_turn>`): Gemma's turns, the assistant called
/// `model`, a system message put in front of the first user turn.
pub const GEMMA_TEMPLATE: &str = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\n\n' %}{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}{{ '<start_of_turn>' + role + '\n' + (system if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}";

const TEMPLATE_NAME: &str = "chat_template";

#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("chat template is invalid: {0}")]
    Invalid(String),
    #[error("chat template failed to render: {0}")]
    Render(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
    /// An assistant turn's calls, as Hugging Face templates read them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// A tool turn: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self { role, content: content.into(), tool_calls: Vec::new(), tool_call_id: None }
    }
}

/// One call an assistant turn made, in the shape templates expect:
/// `{"id", "type": "function", "function": {"name", "arguments"}}`, the arguments an
/// object (templates write them with `tojson`), not OpenAI's JSON string.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: serde_json::Value,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
    /// The tokenizer adds these itself, so the rendered text must not carry them.
    strip_leading_bos: bool,
    strip_trailing_eos: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("strip_leading_bos", &self.strip_leading_bos)
            .field("strip_trailing_eos", &self.strip_trailing_eos)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// The file's template; when the file has none, Gemma's turns for a vocabulary
    /// that has their markers, else ChatML.
    pub fn from_gguf(metadata: &HashMap<String, Value>) -> Result<Self, ChatTemplateError> {
        let source = match metadata.get(CHAT_TEMPLATE_KEY) {
            None if has_gemma_turns(metadata) => GEMMA_TEMPLATE.to_owned(),
            None => CHATML_TEMPLATE.to_owned(),
            Some(Value::String(source)) => source.clone(),
            Some(_) => return Err(ChatTemplateError::Invalid(format!("`{CHAT_TEMPLATE_KEY}` is not a string"))),
        };
        let tokens = TemplateTokens::from_gguf(metadata);
        let mut template = Self::new(
            source,
            tokens.bos_text.as_deref().unwrap_or_default(),
            tokens.eos_text.as_deref().unwrap_or_default(),
        )?;
        template.strip_leading_bos = tokens.add_bos;
        template.strip_trailing_eos = tokens.add_eos;
        Ok(template)
    }

    /// A template from its source, with the texts `bos_token` and `eos_token` stand
    /// for. Nothing is cut from what it renders.
    pub fn new(
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self, ChatTemplateError> {
        let source = source.into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| ChatTemplateError::Invalid(describe(&e)))?;
        Ok(Self {
            env,
            source,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
            strip_leading_bos: false,
            strip_trailing_eos: false,
        })
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, ChatTemplateError> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// Whether the template formats a `tools` list itself (Hermes/Qwen, Llama 3.x,
    /// Mistral templates do); others never see one.
    pub fn takes_tools(&self) -> bool {
        self.source.contains("tools")
    }

    /// As [`ChatTemplate::render`], with the request's `tools` (OpenAI's list of
    /// `{"type": "function", "function": {...}}`) passed to the template as `tools`.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        let template = self.env.get_template(TEMPLATE_NAME).map_err(|e| ChatTemplateError::Invalid(describe(&e)))?;
        let context = minijinja::context! {
            messages => JinjaValue::from_serialize(messages),
            tools => tools.map(JinjaValue::from_serialize),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        let mut text = template.render(context).map_err(|e| ChatTemplateError::Render(describe(&e)))?;
        if self.strip_leading_bos && !self.bos_token.is_empty() && text.starts_with(&self.bos_token) {
            text.drain(..self.bos_token.len());
        }
        if self.strip_trailing_eos && !self.eos_token.is_empty() && text.ends_with(&self.eos_token) {
            text.truncate(text.len() - self.eos_token.len());
        }
        Ok(text)
    }
}

/// minijinja's message plus the detail it keeps apart (the text given to
/// `raise_exception`, the name of an unknown filter).
fn has_gemma_turns(metadata: &HashMap<String, Value>) -> bool {
    let Some(Value::Array(tokens)) = metadata.get("tokenizer.ggml.tokens") else { return false };
    let has = |marker: &str| tokens.iter().any(|t| matches!(t, Value::String(s) if s == marker));
    has("<start_of_turn>") && has("<end_of_turn>")
}

fn describe(error: &minijinja::Error) -> String {
    match error.detail() {
        Some(detail) if !error.to_string().contains(detail) => format!("{error}: {detail}"),
        _ => error.to_string(),
    }
}

/// Templates call this to refuse a conversation they cannot format.
fn raise_exception(message: String) -> Result<JinjaValue, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the current UTC time, for templates that date their
/// system prompt (Llama 3.x).
fn strftime_now(format: String) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format_time(i64::try_from(now).unwrap_or(0), &format)
}

/// `tojson` as Hugging Face defines it: `json.dumps(value, ensure_ascii=False,
/// indent=indent)`, so `", "` and `": "` separators and no HTML escaping, unlike
/// minijinja's own. Other keyword arguments (`sort_keys`, ...) are accepted and
/// ignored.
fn tojson(value: &JinjaValue, indent: Option<JinjaValue>, kwargs: Kwargs) -> Result<JinjaValue, minijinja::Error> {
    let indent = match indent {
        Some(indent) => Some(indent),
        None => kwargs.get::<Option<JinjaValue>>("indent")?,
    };
    let indent = match indent {
        Some(v) if !v.is_none() && !v.is_undefined() => Some(v.as_usize().ok_or_else(|| {
            minijinja::Error::new(ErrorKind::InvalidOperation, "tojson indent must be a non-negative integer")
        })?),
        _ => None,
    };
    let mut out = Vec::new();
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, PythonJsonFormatter::new(indent));
    value
        .serialize(&mut serializer)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("cannot write json: {e}")))?;
    let text = String::from_utf8(out)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("cannot write json: {e}")))?;
    Ok(JinjaValue::from_safe_string(text))
}

/// Writes JSON the way Python's `json.dumps` lays it out.
struct PythonJsonFormatter {
    indent: Option<usize>,
    depth: usize,
    has_value: bool,
}

impl PythonJsonFormatter {
    fn new(indent: Option<usize>) -> Self {
        Self { indent, depth: 0, has_value: false }
    }

    fn new_line<W: ?Sized + io::Write>(&self, writer: &mut W) -> io::Result<()> {
        if let Some(width) = self.indent {
            writer.write_all(b"\n")?;
            for _ in 0..self.depth * width {
                writer.write_all(b" ")?;
            }
        }
        Ok(())
    }

    fn open<W: ?Sized + io::Write>(&mut self, writer: &mut W, bracket: &[u8]) -> io::Result<()> {
        self.depth += 1;
        self.has_value = false;
        writer.write_all(bracket)
    }

    fn close<W: ?Sized + io::Write>(&mut self, writer: &mut W, bracket: &[u8]) -> io::Result<()> {
        self.depth -= 1;
        if self.has_value {
            self.new_line(writer)?;
        }
        writer.write_all(bracket)
    }

    fn item<W: ?Sized + io::Write>(&mut self, writer: &mut W, first: bool) -> io::Result<()> {
        if !first {
            // With an indent Python ends lines after the comma instead of spacing.
            writer.write_all(if self.indent.is_some() { b"," } else { b", " })?;
        }
        self.new_line(writer)
    }
}

impl serde_json::ser::Formatter for PythonJsonFormatter {
    fn begin_array<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.open(writer, b"[")
    }

    fn end_array<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.close(writer, b"]")
    }

    fn begin_array_value<W: ?Sized + io::Write>(&mut self, writer: &mut W, first: bool) -> io::Result<()> {
        self.item(writer, first)
    }

    fn end_array_value<W: ?Sized + io::Write>(&mut self, _writer: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }

    fn begin_object<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.open(writer, b"{")
    }

    fn end_object<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.close(writer, b"}")
    }

    fn begin_object_key<W: ?Sized + io::Write>(&mut self, writer: &mut W, first: bool) -> io::Result<()> {
        self.item(writer, first)
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(b": ")
    }

    fn end_object_value<W: ?Sized + io::Write>(&mut self, _writer: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }
}

const WEEKDAYS: [&str; 7] = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// Days since 1970-01-01 → (year, month 1-12, day 1-31), proleptic Gregorian.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// (year, month 1-12, day 1-31) → days since 1970-01-01; the inverse of
/// [`civil_from_days`].
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let mp = i64::from((month + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The C `strftime` conversions templates use, for a UTC Unix time. Conversions it
/// does not know are written out unchanged.
fn format_time(unix_seconds: i64, format: &str) -> String {
    let days = unix_seconds.div_euclid(86_400);
    let secs = unix_seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let weekday = WEEKDAYS[days.wrapping_add(4).rem_euclid(7) as usize];
    let month_name = MONTHS[(month - 1) as usize];
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:2}")),
            Some('B') => out.push_str(month_name),
            Some('b') | Some('h') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str(weekday),
            Some('a') => out.push_str(&weekday[..3]),
            Some('H') => out.push_str(&format!("{hour:02}")),
            Some('I') => out.push_str(&format!("{hour12:02}")),
            Some('M') => out.push_str(&format!("{minute:02}")),
            Some('S') => out.push_str(&format!("{second:02}")),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('j') => out.push_str(&format!("{day_of_year:03}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A template in the Hermes/Qwen manner: the tools in the system turn, calls as
    /// `<tool_call>` tags with their arguments written by `tojson`.
    #[test]
    fn tools_and_calls_reach_a_template_that_takes_them() {
        let source = "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>{% endif %}\
            {% for m in messages %}[{{ m.role }}]{{ m.content }}{% for c in m.tool_calls %}<tool_call>{{ c.function.name }} \
            {{ c.function.arguments | tojson }}</tool_call>{% endfor %}{% if m.tool_call_id %}({{ m.tool_call_id }}){% endif %}\
            {% endfor %}";
        let template = ChatTemplate::new(source, "", "").unwrap();
        assert!(template.takes_tools() && !ChatTemplate::new(CHATML_TEMPLATE, "", "").unwrap().takes_tools());
        let call = ToolCall {
            id: "c1".into(),
            kind: "function".into(),
            function: FunctionCall { name: "add".into(), arguments: serde_json::json!({"a": 1}) },
        };
        let messages = [
            ChatMessage::new(Role::User, "sum"),
            ChatMessage { tool_calls: vec![call], ..ChatMessage::new(Role::Assistant, "") },
            ChatMessage { tool_call_id: Some("c1".into()), ..ChatMessage::new(Role::Tool, "1") },
        ];
        let tools = serde_json::json!([{"type": "function", "function": {"name": "add"}}]);
        let text = template.render_with_tools(&messages, Some(&tools), false).unwrap();
        assert_eq!(text, "<tools>add;</tools>[user]sum[assistant]<tool_call>add {\"a\": 1}</tool_call>[tool]1(c1)");
        assert_eq!(template.render(&messages[..1], false).unwrap(), "[user]sum");
    }

    fn conversation() -> Vec<ChatMessage> {
        vec![
            ChatMessage::new(Role::System, "You are a helpful assistant."),
            ChatMessage::new(Role::User, "What is the capital of France?"),
        ]
    }

    #[test]
    fn template_can_be_shared_between_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<ChatTemplate>();
    }

    #[test]
    fn chatml_is_the_default() {
        let template = ChatTemplate::from_gguf(&HashMap::new()).unwrap();
        assert_eq!(template.source(), CHATML_TEMPLATE);
        let text = template.render(&conversation(), true).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\nWhat is the capital of France?<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        let text = template.render(&conversation(), false).unwrap();
        assert!(text.ends_with("France?<|im_end|>\n"));
    }

    #[test]
    fn a_gemma_vocabulary_without_a_template_gets_gemma_turns() {
        let mut md = HashMap::new();
        let tokens = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"];
        md.insert("tokenizer.ggml.tokens".to_string(), Value::Array(tokens.map(|t| Value::String(t.into())).to_vec()));
        md.insert("tokenizer.ggml.bos_token_id".to_string(), Value::U32(2));
        md.insert("tokenizer.ggml.eos_token_id".to_string(), Value::U32(1));
        let template = ChatTemplate::from_gguf(&md).unwrap();
        assert_eq!(template.source(), GEMMA_TEMPLATE);
        let chat = [
            ChatMessage::new(Role::System, "You are terse."),
            ChatMessage::new(Role::User, "Hi"),
            ChatMessage::new(Role::Assistant, "Hello! "),
            ChatMessage::new(Role::User, "How are you?"),
        ];
        // The tokenizer adds <bos> itself (add_bos_token defaults on for these vocabularies).
        assert_eq!(
            template.render(&chat, true).unwrap(),
            "<start_of_turn>user\nYou are terse.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n<start_of_turn>user\nHow are you?<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn smollm2_template_renders_a_conversation() {
        let Some(md) = crate::tokenizer::tests::smollm2_metadata() else { return };
        let template = ChatTemplate::from_gguf(&md).unwrap();
        let text = template.render(&conversation(), true).unwrap();
        assert!(
            text.starts_with("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"),
            "{text:?}"
        );
        assert!(text.contains("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"), "{text:?}");
        assert!(text.ends_with("<|im_start|>assistant\n"), "{text:?}");
        // The tokenizer adds no BOS, and the prompt starts with exactly one marker.
        let tokenizer = crate::tokenizer::Tokenizer::from_gguf(&md).unwrap();
        let ids = tokenizer.encode(&text).unwrap();
        assert_eq!(&ids[..1], &[1]);
        assert_ne!(ids[1], 1);
    }

    #[test]
    fn synthetic_model_template_renders() {
        let dir = tempfile::tempdir().unwrap();
        let path = crate::synthetic::SyntheticModel::tiny().write_to(dir.path()).unwrap();
        let mut file = std::fs::File::open(&path).unwrap();
        let md = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap().metadata;
        let template = ChatTemplate::from_gguf(&md).unwrap();
        let text = template.render(&[ChatMessage::new(Role::User, "hi")], true).unwrap();
        assert_eq!(text, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }

    const LLAMA2_STYLE: &str = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'].strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

    #[test]
    fn hugging_face_helpers_work() {
        let template = ChatTemplate::new(LLAMA2_STYLE, "<s>", "</s>").unwrap();
        let messages = [
            ChatMessage::new(Role::User, "  Hi  "),
            ChatMessage::new(Role::Assistant, "Hello"),
            ChatMessage::new(Role::User, "Bye"),
        ];
        assert_eq!(template.render(&messages, true).unwrap(), "<s>[INST] Hi [/INST] Hello </s>[INST] Bye [/INST]");
        let err = template.render(&messages[1..], true).unwrap_err();
        assert!(matches!(&err, ChatTemplateError::Render(m) if m.contains("must alternate")), "{err}");
    }

    #[test]
    fn blocks_are_trimmed_like_hugging_face() {
        let source = "{% for m in messages %}\n    {% if m.role == 'user' %}\n    {{ m.role }}: {{ m.content }}\n    {% endif %}\n{% endfor %}\n";
        let template = ChatTemplate::new(source, "", "").unwrap();
        let messages = [ChatMessage::new(Role::User, "a"), ChatMessage::new(Role::User, "b")];
        assert_eq!(template.render(&messages, false).unwrap(), "    user: a\n    user: b\n");
    }

    #[test]
    fn python_string_methods_and_loop_controls() {
        let source = "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}[{{ m.content.strip() }}|{{ m.content.split(',') | length }}|{{ m.content.upper().startswith(' A') }}]{% endfor %}";
        let template = ChatTemplate::new(source, "", "").unwrap();
        let messages = [
            ChatMessage::new(Role::User, " a,b "),
            ChatMessage::new(Role::Assistant, "c"),
            ChatMessage::new(Role::User, "never shown"),
        ];
        assert_eq!(template.render(&messages, false).unwrap(), "[a,b|2|True][c|1|False]");
    }

    #[test]
    fn tojson_writes_python_style() {
        let template = ChatTemplate::new(
            "{{ {'a': 1, 'b': [1, 2], 'c': 'é<>'} | tojson }}|{{ [1, {'x': []}] | tojson(indent=2) }}",
            "",
            "",
        )
        .unwrap();
        assert_eq!(
            template.render(&[], false).unwrap(),
            "{\"a\": 1, \"b\": [1, 2], \"c\": \"é<>\"}|[\n  1,\n  {\n    \"x\": []\n  }\n]"
        );
    }

    #[test]
    fn messages_expose_lowercase_roles() {
        let template = ChatTemplate::new("{% for m in messages %}{{ m.role }} {% endfor %}", "", "").unwrap();
        let messages = [
            ChatMessage::new(Role::System, ""),
            ChatMessage::new(Role::User, ""),
            ChatMessage::new(Role::Assistant, ""),
            ChatMessage::new(Role::Tool, ""),
        ];
        assert_eq!(template.render(&messages, false).unwrap(), "system user assistant tool ");
    }

    fn sentencepiece_metadata(add_bos: Option<bool>) -> HashMap<String, Value> {
        let mut md = HashMap::new();
        md.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
        let tokens = ["<unk>", "<s>", "</s>", "a"];
        md.insert(
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().map(|t| Value::String((*t).into())).collect()),
        );
        if let Some(add_bos) = add_bos {
            md.insert("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos));
        }
        md.insert(
            CHAT_TEMPLATE_KEY.into(),
            Value::String("{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}".into()),
        );
        md
    }

    #[test]
    fn a_bos_the_tokenizer_adds_is_not_rendered_twice() {
        let messages = [ChatMessage::new(Role::User, "hi")];
        // SentencePiece files add a BOS unless they say otherwise.
        let template = ChatTemplate::from_gguf(&sentencepiece_metadata(None)).unwrap();
        assert_eq!(template.render(&messages, true).unwrap(), "hi</s>");
        let template = ChatTemplate::from_gguf(&sentencepiece_metadata(Some(false))).unwrap();
        assert_eq!(template.render(&messages, true).unwrap(), "<s>hi</s>");
    }

    #[test]
    fn bad_templates_are_errors() {
        assert!(matches!(ChatTemplate::new("{% for %}", "", ""), Err(ChatTemplateError::Invalid(_))));
        let mut md = HashMap::new();
        md.insert(CHAT_TEMPLATE_KEY.to_owned(), Value::U32(1));
        assert!(matches!(ChatTemplate::from_gguf(&md), Err(ChatTemplateError::Invalid(_))));
        let template = ChatTemplate::new("{{ messages | no_such_filter }}", "", "").unwrap();
        assert!(matches!(template.render(&[], false), Err(ChatTemplateError::Render(_))));
        // Broken tokenizer metadata only loses the token texts.
        let mut md = HashMap::new();
        md.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
        md.insert("tokenizer.ggml.tokens".into(), Value::U8(0));
        md.insert(CHAT_TEMPLATE_KEY.into(), Value::String("[{{ bos_token }}]".into()));
        assert_eq!(ChatTemplate::from_gguf(&md).unwrap().render(&[], false).unwrap(), "[]");
    }

    #[test]
    fn strftime_formats_utc_times() {
        assert_eq!(format_time(1_721_952_000, "%d %b %Y"), "26 Jul 2024");
        assert_eq!(
            format_time(951_829_509, "%Y-%m-%d %H:%M:%S %A %a %b %B %j %y %I %p %% %Q"),
            "2000-02-29 13:05:09 Tuesday Tue Feb February 060 00 01 PM % %Q"
        );
        assert_eq!(format_time(0, "%A %e %j"), "Thursday  1 001");
        let template = ChatTemplate::new("{{ strftime_now('%Y') }}", "", "").unwrap();
        let year: i64 = template.render(&[], false).unwrap().parse().unwrap();
        assert!(year >= 2024);
    }
}
