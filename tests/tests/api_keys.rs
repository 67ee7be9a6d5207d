//! The HTTP API behind keys, end to end: `strata serve-local --api-key` on a loopback
//! port it picks, used by OpenAI's official Python client with `api_key=`: the right
//! key completes, a wrong one is an `AuthenticationError`, and `/health` needs none;
//! the same client reads the logprobs of generated tokens, streamed and not, and
//! several choices (`n`), reproducible with a seed.
//! `.ci/run` installs the client into `~/.cache/strata/python` (pip's `--target`:
//! Debian's Python refuses installs into itself).

use std::time::Duration;

use strata_coordinator::cli::children::Process;
use strata_coordinator::cli::http;
use strata_model::synthetic::SyntheticModel;
use strata_tests::clients::CHOICES_CLIENT;
use strata_tests::{binary, python, READY_TIMEOUT};

const KEY: &str = "sk-strata-test";

const CLIENT: &str = r#"
import sys, openai
base, key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=60)
done = client.completions.create(model="tiny", prompt="hello", max_tokens=3, temperature=0)
assert done.usage.completion_tokens > 0, done
chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
assert chat.choices[0].message.role == "assistant", chat
try:
    openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
    sys.exit("a wrong key was let in")
except openai.AuthenticationError as e:
    assert e.status_code == 401 and e.code == "invalid_api_key", e
print("client ok")
"#;

/// Logprobs as the official client reads them: a chat's tokens and theirs, streamed
/// and not, and the legacy completion shape.
const LOGPROBS_CLIENT: &str = r#"
import math, sys, openai
base, key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=60)
messages = [{"role": "user", "content": "hello"}]
ask = dict(model="tiny", messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
chat = client.chat.completions.create(**ask)
content = chat.choices[0].logprobs.content
assert content, chat
# The tokens' bytes together are the answer (a token that is part of a character is
# named `bytes:\\x..`).
answer = bytes(b for t in content for b in t.bytes).decode("utf-8", "replace")
assert answer == chat.choices[0].message.content, chat
for t in content:
    assert t.logprob <= 0 and len(t.top_logprobs) == 3, t
    # Greedy: the token taken is the most likely one.
    assert (t.top_logprobs[0].token, t.top_logprobs[0].logprob) == (t.token, t.logprob), t
    assert all(a.logprob >= b.logprob for a, b in zip(t.top_logprobs, t.top_logprobs[1:])), t
total = sum(t.logprob for t in content)
assert math.isfinite(total) and total <= 0, total
streamed = []
for chunk in client.chat.completions.create(stream=True, **ask):
    if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
        streamed.extend(chunk.choices[0].logprobs.content)
assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content], streamed
done = client.completions.create(model="tiny", prompt="hello", max_tokens=8, temperature=0, logprobs=2)
lp = done.choices[0].logprobs
assert any(t.startswith("bytes:") for t in lp.tokens) or "".join(lp.tokens) == done.choices[0].text, done
assert all(top[tok] == l for tok, l, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs)), done
print("logprobs ok")
"#;


fn has_openai() -> bool {
    python().args(["-c", "import openai"]).status().is_ok_and(|s| s.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_client_uses_the_key_a_wrong_one_is_refused_and_logprobs_read() -> anyhow::Result<()> {
    if !has_openai() {
        eprintln!("SKIPPED: the openai Python package is not installed (.ci/run installs it)");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let model = SyntheticModel::tiny().write_to(dir.path())?;
    let args: Vec<String> = [
        "--threads",
        "1",
        "serve-local",
        "--model",
        &model.display().to_string(),
        "--model-id",
        "tiny",
        "--http-listen",
        "127.0.0.1:0",
        "--api-key",
        KEY,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut server = Process::spawn("serve-local", &binary("strata")?, &args, &[])?;
    let ready = server.wait_for_line("listening http=", READY_TIMEOUT, |_| {}).await?;
    server.drain_output();
    let addr = Process::field(&ready, "http").expect("http= in the line");

    let health = http::request(&addr, "GET", "/health", None).await?;
    assert_eq!(health.status, 200, "{}", health.body);
    let refused = http::request(&addr, "GET", "/v1/models", None).await?;
    assert_eq!((refused.status, refused.json()?["error"]["code"].clone()), (401, "missing_api_key".into()));

    let base = format!("http://{addr}/v1");
    let out = tokio::task::spawn_blocking(move || python().args(["-c", CLIENT, &base, KEY]).output()).await??;
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.contains("client ok"), "{stdout}\n{stderr}");
    let base = format!("http://{addr}/v1");
    let out =
        tokio::task::spawn_blocking(move || python().args(["-c", LOGPROBS_CLIENT, &base, KEY]).output()).await??;
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.contains("logprobs ok"), "{stdout}\n{stderr}");
    let base = format!("http://{addr}/v1");
    let out = tokio::task::spawn_blocking(move || python().args(["-c", CHOICES_CLIENT, &base, KEY, "tiny"]).output()).await??;
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.contains("choices ok"), "{stdout}\n{stderr}");
    server.stop(Duration::from_secs(5)).await;
    Ok(())
}
