//! The HTTP API behind keys, end to end: `strata serve-local --api-key` on a loopback
//! port it picks, used by OpenAI's official Python client with `api_key=`: the right
//! key completes, a wrong one is an `AuthenticationError`, and `/health` needs none.
//! `.ci/run` installs the client into `~/.cache/strata/python` (pip's `--target`:
//! Debian's Python refuses installs into itself).

use std::time::Duration;

use strata_coordinator::cli::children::Process;
use strata_coordinator::cli::http;
use strata_model::synthetic::SyntheticModel;
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

fn has_openai() -> bool {
    python().args(["-c", "import openai"]).status().is_ok_and(|s| s.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_client_uses_the_key_and_a_wrong_one_is_refused() -> anyhow::Result<()> {
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
    server.stop(Duration::from_secs(5)).await;
    Ok(())
}
