//! Scoring a prompt through the pipeline: `/v1/completions` with `echo`, `logprobs` and
//! `max_tokens: 0` (or more, the generated tokens' logprobs after the prompt's) on a
//! cluster of three workers, and `strata perplexity
//! --coordinator`, whose figures must equal one process's `strata perplexity` to the
//! last digit (the same logits, computed on the last stage).

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};
use strata_model::synthetic::SyntheticModel;
use strata_tests::{ClusterOptions, TestCluster};

fn perplexity(model: &Path, text: &Path, extra: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(strata_tests::binary("strata")?)
        .args(["perplexity", "-m"])
        .arg(model)
        .arg("-f")
        .arg(text)
        .args(["-c", "64", "--chunks", "3", "--threads", "1"])
        .args(extra)
        .output()?;
    anyhow::ensure!(out.status.success(), "strata perplexity failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?)
}

async fn completions(http: &str, body: Value) -> anyhow::Result<(u16, Value)> {
    let reply = strata_coordinator::cli::http::request(http, "POST", "/v1/completions", Some(&body)).await?;
    Ok((reply.status, reply.json()?))
}

#[tokio::test]
async fn a_prompt_scored_through_three_workers_equals_one_process() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // Sliding-window layers (window 3) and soft-capped logits: the scored rows cross
    // every stage and the window many times over.
    let model = SyntheticModel::gemma3_tiny().write_to(dir.path())?;
    let text = dir.path().join("text.txt");
    std::fs::write(&text, "the winter in the hills is the time the rivers run ".repeat(40))?;
    let local = perplexity(&model, &text, &[])?;

    let options = ClusterOptions { serve_args: vec!["--context".into(), "128".into()], ..ClusterOptions::default() };
    let cluster = TestCluster::start(&model, &options).await?;
    anyhow::ensure!(cluster.stage_lines.len() == 3, "{:?}", cluster.stage_lines);
    let through = perplexity(&model, &text, &["--coordinator", cluster.http()])?;
    assert_eq!(through, local, "the cluster's figures differ from one process's");
    assert!(local.contains("Final estimate: PPL = "), "{local}");
    eprintln!("through three workers: {through}");

    // The API's shape: a null first entry, then one logprob and `logprobs` top tokens
    // per position, tokens named by id on request.
    let model_id = "test-model";
    let prompt = [5u32, 80, 120, 33, 7, 250, 2, 9];
    let (status, body) = completions(
        cluster.http(),
        json!({"model": model_id, "prompt": prompt, "max_tokens": 0, "echo": true, "logprobs": 3,
               "return_tokens_as_token_ids": true}),
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "length", "{body}");
    let logprobs = &choice["logprobs"];
    let tokens: Vec<String> = prompt.iter().map(|t| format!("token_id:{t}")).collect();
    assert_eq!(logprobs["tokens"], json!(tokens), "{body}");
    let lps = logprobs["token_logprobs"].as_array().unwrap();
    assert_eq!(lps.len(), prompt.len());
    assert!(lps[0].is_null() && lps[1..].iter().all(|l| l.as_f64().is_some_and(|l| l <= 0.0)), "{body}");
    let tops = logprobs["top_logprobs"].as_array().unwrap();
    assert!(tops[0].is_null() && tops[1..].iter().all(|t| t.as_object().is_some_and(|t| t.len() == 3)), "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 0, "{body}");

    // The prompt scored and tokens generated in one request: the prompt's entries
    // as above, then the generated tokens' as a request without `echo` gives them,
    // their offsets counted in the echoed text.
    let ask = |echo: bool| {
        json!({"model": model_id, "prompt": prompt, "max_tokens": 4, "temperature": 0, "echo": echo, "logprobs": 3,
               "return_tokens_as_token_ids": true})
    };
    let (status, echoed) = completions(cluster.http(), ask(true)).await?;
    assert_eq!(status, 200, "{echoed}");
    let (status, generated) = completions(cluster.http(), ask(false)).await?;
    assert_eq!(status, 200, "{generated}");
    let (both, alone) = (&echoed["choices"][0]["logprobs"], &generated["choices"][0]["logprobs"]);
    let n = prompt.len();
    for key in ["tokens", "token_logprobs", "top_logprobs"] {
        let both = both[key].as_array().unwrap();
        assert_eq!(&both[..n], &logprobs[key].as_array().unwrap()[..], "{key}: {echoed}");
        assert_eq!(&both[n..], &alone[key].as_array().unwrap()[..], "{key}: {echoed} {generated}");
    }
    let prompt_chars: u64 = tokens.iter().map(|t| t.len() as u64).sum();
    let offsets = |l: &serde_json::Value| -> Vec<u64> {
        l["text_offset"].as_array().unwrap().iter().filter_map(serde_json::Value::as_u64).collect()
    };
    let shifted: Vec<u64> = offsets(alone).iter().map(|o| o + prompt_chars).collect();
    assert_eq!(offsets(both)[n..], shifted[..], "{echoed}");

    // What is not supported is refused, with the parameter named. (Without `echo`,
    // `logprobs` is for the generated tokens: `tests/tests/cluster.rs`.)
    for (request, param) in [
        (json!({"prompt": prompt, "max_tokens": 0, "echo": true, "logprobs": 21}), "logprobs"),
        (json!({"prompt": prompt, "max_tokens": 0}), "max_tokens"),
        (json!({"prompt": prompt, "max_tokens": 2, "echo": true, "stream": true}), "echo"),
    ] {
        let mut request = request;
        request["model"] = json!(model_id);
        let (status, body) = completions(cluster.http(), request.clone()).await?;
        assert_eq!(status, 400, "{request} -> {body}");
        assert_eq!(body["error"]["param"], param, "{request} -> {body}");
    }
    // Echo alone puts the prompt before the completion.
    let (status, body) = completions(
        cluster.http(),
        json!({"model": model_id, "prompt": "the winter", "max_tokens": 2, "echo": true, "temperature": 0}),
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    assert!(body["choices"][0]["text"].as_str().is_some_and(|t| t.starts_with("the winter")), "{body}");
    cluster.stop().await;
    Ok(())
}
