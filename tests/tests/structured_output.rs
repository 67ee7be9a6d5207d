//! Output constrained to a JSON schema, and tool calls, through a coordinator and
//! three workers: OpenAI's official Python client asks for `json_schema` (strict)
//! twenty times at temperature 1 and every answer validates under the schema
//! (Python's `jsonschema`), streamed too; `json_object` gives an object; a malformed
//! schema is a 400 naming `response_format`. With tools, `tool_choice: required`
//! always gives calls whose arguments validate under the function's parameters, a
//! named function is the one called, a round trip (call, tool result, answer) works
//! streamed and not, and an unknown tool or a tool message answering no call is a
//! 400 naming its parameter. A seeded constrained completion equals one process's
//! to the token. The model is random-weight: only the constraint makes its output
//! JSON at all. Three seeded choices (`n`) come back the same each time, the prompt
//! computed once for them.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::json;
use strata_coordinator::cli::http;
use strata_coordinator::engine::local::LocalEngine;
use strata_coordinator::engine::{Engine, GenerateEvent, GenerateRequest};
use strata_grammar::Grammar;
use strata_model::synthetic::SyntheticModel;
use strata_model::{Device, ModelFile, SamplingParams, Tokenizer};
use strata_tests::clients::CHOICES_CLIENT;
use strata_tests::{python, ClusterOptions, TestCluster};

/// Six layers, so three workers hold two each; a context for the tools' description,
/// which takes a token a byte in this vocabulary.
fn synthetic(dir: &Path) -> PathBuf {
    SyntheticModel { layers: 6, context_length: 2048, ..SyntheticModel::tiny() }.write_to(dir).unwrap()
}

/// A schema with what schemas hold: nested objects, enums, bounded numbers and
/// strings, arrays, optional properties.
const SCHEMA: &str = r#"{
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "pattern": "^[A-Z][a-z]{1,8}$"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": false
        },
        "scores": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}, "minItems": 1, "maxItems": 3},
        "active": {"type": "boolean"}
    },
    "required": ["name", "age", "role", "address", "scores"],
    "additionalProperties": false
}"#;

const CLIENT: &str = r#"
import json, sys, jsonschema, openai
base, schema = sys.argv[1], json.loads(sys.argv[2])
client = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=120)
messages = [{"role": "user", "content": "Describe a person as JSON."}]
fmt = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": schema}}
for i in range(20):
    chat = client.chat.completions.create(model="test-model", messages=messages, max_tokens=200, temperature=1,
                                          response_format=fmt)
    choice = chat.choices[0]
    assert choice.finish_reason == "stop", chat
    jsonschema.validate(json.loads(choice.message.content), schema)
text = ""
for chunk in client.chat.completions.create(model="test-model", messages=messages, max_tokens=200, temperature=1,
                                            response_format=fmt, stream=True):
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
jsonschema.validate(json.loads(text), schema)
# Any object at all has no bound on its length: a sampled one may outrun max_tokens,
# so up to three are asked for, and one that ends must be an object.
for attempt in range(3):
    chat = client.chat.completions.create(model="test-model", messages=messages, max_tokens=200, temperature=1,
                                          response_format={"type": "json_object"})
    if chat.choices[0].finish_reason == "stop":
        break
assert chat.choices[0].finish_reason == "stop", chat
assert isinstance(json.loads(chat.choices[0].message.content), dict), chat
for bad in [{"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}},
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no such type"}}},
            {"type": "json_schema", "json_schema": {"name": "x"}},
            {"type": "grammar"}]:
    try:
        client.chat.completions.create(model="test-model", messages=messages, max_tokens=5, response_format=bad)
        sys.exit(f"accepted {bad}")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and e.param == "response_format", (bad, e)
print("structured output ok")
"#;

const TOOLS_CLIENT: &str = r#"
import json, sys, jsonschema, openai
base = sys.argv[1]
client = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=120)
weather = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
add = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 100},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 100}},
       "required": ["a", "b"], "additionalProperties": False}
schemas = {"get_weather": weather, "add": add}
tools = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": weather}},
         {"type": "function", "function": {"name": "add", "description": "Adds two numbers", "parameters": add}}]
question = [{"role": "user", "content": "What is the weather in Paris?"}]
ask = dict(model="test-model", tools=tools, temperature=1, max_tokens=400)
def check(calls):
    assert calls, "no call"
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
for i in range(10):
    chat = client.chat.completions.create(messages=question, tool_choice="required", **ask)
    assert chat.choices[0].finish_reason == "tool_calls", chat
    check(chat.choices[0].message.tool_calls)
named = {"type": "function", "function": {"name": "add"}}
chat = client.chat.completions.create(messages=question, tool_choice=named, parallel_tool_calls=False, **ask)
calls = chat.choices[0].message.tool_calls
assert len(calls) == 1 and calls[0].function.name == "add", chat
check(calls)
# Streamed: the calls come as deltas, put together by index.
streamed, finish = {}, None
for chunk in client.chat.completions.create(messages=question, tool_choice="required", stream=True, **ask):
    for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
        entry = streamed.setdefault(d.index, {"id": d.id, "name": d.function.name, "arguments": ""})
        entry["arguments"] += d.function.arguments or ""
    if chunk.choices and chunk.choices[0].finish_reason:
        finish = chunk.choices[0].finish_reason
assert finish == "tool_calls" and streamed, (finish, streamed)
for entry in streamed.values():
    jsonschema.validate(json.loads(entry["arguments"]), schemas[entry["name"]])
# The round trip: the call, the tool's result, the answer (the model may call again).
first = client.chat.completions.create(messages=question, tool_choice="required", **ask).choices[0].message
history = question + [first.model_dump(exclude_none=True)] + [
    {"role": "tool", "tool_call_id": c.id, "content": json.dumps({"temperature": 21})} for c in first.tool_calls]
for stream in [False, True]:
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(messages=history, stream=True, tool_choice="none", **ask) if c.choices)
    else:
        chat = client.chat.completions.create(messages=history, **ask)
        assert chat.choices[0].message.tool_calls or chat.choices[0].message.content is not None, chat
        text = client.chat.completions.create(messages=history, tool_choice="none", **ask).choices[0].message.content
    assert isinstance(text, str), text
for bad, param in [(dict(messages=question, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
                   (dict(messages=history[:2] + [{"role": "tool", "tool_call_id": "call_unknown", "content": "1"}]),
                    "messages[2].tool_call_id")]:
    try:
        client.chat.completions.create(**bad, **ask)
        sys.exit(f"accepted {bad}")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and e.param == param, (bad, e)
print("tools ok")
"#;

fn has_client() -> bool {
    python().args(["-c", "import openai, jsonschema"]).status().is_ok_and(|s| s.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemas_and_tool_calls_through_three_workers_are_valid_and_equal_one_process() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = synthetic(dir.path());
    let cluster = TestCluster::start(&model, &ClusterOptions::default()).await?;
    assert_eq!(cluster.stage_lines.len(), 3, "{:?}", cluster.stage_lines);

    // Seeded and sampled, a constrained completion is the same tokens as one process's.
    let schema: serde_json::Value = serde_json::from_str(SCHEMA)?;
    let prompt = [5u32, 80, 120, 33];
    let body = json!({
        "model": "test-model", "prompt": prompt, "max_tokens": 200, "temperature": 1, "seed": 7,
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
    });
    let reply = http::request(cluster.http(), "POST", "/v1/completions", Some(&body)).await?.json()?;
    let text = reply["choices"][0]["text"].as_str().context("no text")?.to_owned();
    let sampling = SamplingParams { temperature: 1.0, seed: 7, ..SamplingParams::greedy() };
    let local = local_tokens(&model, &prompt, 200, sampling, Grammar::json_schema(&schema)?).await?;
    let tokenizer = Tokenizer::from_gguf(ModelFile::open(&model)?.metadata())?;
    assert_eq!(text, tokenizer.decode(&local)?, "{reply}");
    assert_eq!(reply["choices"][0]["finish_reason"], "stop", "{reply}");
    serde_json::from_str::<serde_json::Value>(&text).with_context(|| format!("not JSON: {text}"))?;

    if !has_client() {
        eprintln!("SKIPPED: the openai and jsonschema Python packages are not installed (.ci/run installs them)");
        cluster.stop().await;
        return Ok(());
    }
    let base = format!("http://{}/v1", cluster.http());
    let out = tokio::task::spawn_blocking(move || python().args(["-c", CLIENT, &base, SCHEMA]).output()).await??;
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.contains("structured output ok"), "{stdout}\n{stderr}");
    let base = format!("http://{}/v1", cluster.http());
    let out = tokio::task::spawn_blocking(move || python().args(["-c", TOOLS_CLIENT, &base]).output()).await??;
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.contains("tools ok"), "{stdout}\n{stderr}");
    // Several choices, seeded: the second time the stages hold a copy of the first
    // request's prompt and every choice copies it; the choices are the same.
    let base = format!("http://{}/v1", cluster.http());
    let out = tokio::task::spawn_blocking(move || python().args(["-c", CHOICES_CLIENT, &base, "none", "test-model"]).output())
        .await??;
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.contains("choices ok"), "{stdout}\n{stderr}");
    let status = http::request(cluster.http(), "GET", "/admin/status", None).await?.json()?;
    assert!(status["prefix_positions"].as_u64() > Some(0), "the choices copied no prompt: {status}");
    cluster.stop().await;
    Ok(())
}

/// The tokens one process (the local engine) generates under `grammar`.
async fn local_tokens(
    model: &Path,
    prompt: &[u32],
    max_tokens: usize,
    sampling: SamplingParams,
    grammar: Grammar,
) -> anyhow::Result<Vec<u32>> {
    let file = ModelFile::open(model)?;
    let engine = LocalEngine::start(&file, &Device::Cpu, "test-model".into())?;
    let request = GenerateRequest {
        prompt_tokens: prompt.to_vec(),
        max_tokens,
        sampling,
        prompt_logprobs: None,
        logprobs: None,
        constraint: Some(grammar),
        shared_prompt: false,
    };
    let mut events = engine.generate(request)?;
    let mut tokens = Vec::new();
    while let Some(event) = events.recv().await {
        match event {
            GenerateEvent::Token(id, _) => tokens.push(id),
            GenerateEvent::Finished(_) => return Ok(tokens),
            GenerateEvent::Failed(e) => anyhow::bail!("{e}"),
            _ => {}
        }
    }
    anyhow::bail!("the engine stopped without finishing")
}
