//! `strata bench --switch`: how long requests in flight pause when the plan changes
//! under them, replayed versus moved with their KV caches, measured in one run.
//!
//! Three worker processes on loopback (taking turns through a shared compute lock,
//! as in `--workers`) run `--switch-streams` greedy requests. When every request has
//! reached the length L (prompt plus generated tokens), the middle worker is drained:
//! make before break, the new two-stage pipeline loads beside the old one and the
//! requests move. Two figures per L: the longest pause a client saw (the gap in its
//! tokens), and the time to resume, from the switch to the last moved request's next
//! token, as the drain reports it (the pause less however long before the switch the
//! last token came: the old pipeline serves while the new one loads, but on a small
//! machine the load competes with it for the cores; the drain stops waiting for it
//! after 30 s). Each L runs twice on
//! the same requests, once with every request replayed and once with every request
//! moved with its KV cache, and the two outputs must be equal token for token.
//!
//! The run also prints the constants of the coordinator's cost model
//! ([`crate::cluster::MoveCost`]) as measured here: the decode step, what a prompt
//! token costs in steps, and a transfer's fixed cost and speed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use strata_model::SamplingParams;
use strata_proto::v1::WireDtype;

use super::bench::{median, prompt_tokens, BenchArgs};
use super::children::{start_local_worker, Children};
use crate::cluster::{
    Cluster, ClusterConfig, ClusterEngine, Membership, MoveCost, MovePolicy, PlacementPolicy, ReturnPath, ServedModel,
};
use crate::engine::{GenerateEvent, GenerateRequest};

/// Workers in the measurement; the middle one is drained.
const WORKERS: usize = 3;

/// Tokens each request generates after the switch, so every one resumes.
const TAIL: usize = 16;

/// Prompt of the prefill measurement behind the cost model's prompt-token figure.
const PREFILL_PROMPT: usize = 256;

#[derive(Debug, Serialize)]
struct Measured {
    policy: String,
    /// Mean length of the requests when the drain began.
    length_at_switch: f64,
    /// From the switch to the last moved request's next token; `None` when the
    /// drain stopped waiting for it.
    resume_s: Option<f64>,
    /// Longest and median pause a client saw.
    longest_pause_s: f64,
    median_pause_s: f64,
    /// From the drain command to the old pipeline unloaded.
    drain_s: f64,
    transferred: usize,
    replayed: usize,
    /// Median interval between a request's tokens before the drain.
    step_s: f64,
}

#[derive(Debug, Serialize)]
struct Length {
    length: usize,
    replay: Measured,
    transfer: Measured,
    /// Replay's longest pause over transfer's.
    replay_over_transfer: f64,
    /// KV bytes one request moves (all layers, `length - 1` positions).
    kv_bytes_per_request: u64,
    outputs_identical: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    workers: usize,
    streams: usize,
    prompt_tokens: usize,
    threads_per_worker: usize,
    lengths: Vec<Length>,
    /// The cost model's constants as measured in this run.
    cost: CostReport,
}

#[derive(Debug, Serialize)]
struct CostReport {
    step_s: f64,
    prompt_token_steps: f64,
    transfer_fixed_s: f64,
    transfer_bytes_per_s: f64,
    /// What the cost model with these constants picks for one request at each length.
    auto_choice: Vec<(usize, String)>,
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let path = crate::model_store::resolve(&args.model.model)?;
    let model = Arc::new(ServedModel::open(&path, args.model.model.clone())?);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = args.worker_threads.unwrap_or_else(|| super::demo::threads_per_worker(cores, WORKERS));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let mut children = Children::with_coordinator_here(false)?;
    let result = runtime.block_on(measure(args, model, threads, &path, &mut children));
    runtime.block_on(children.stop_all());
    super::bench::emit(&result?, args.json, print)
}

fn print(r: &Report) {
    println!("model                  {}", r.model);
    println!(
        "setting                {} workers on loopback ({} threads each, shared compute lock), {} requests, \
         prompt {} tokens, middle worker drained",
        r.workers, r.threads_per_worker, r.streams, r.prompt_tokens
    );
    println!("longest pause a client saw, and time from the switch to the last moved request's next token:");
    println!(
        "{:>6}  {:>10}  {:>13}  {:>14}  {:>7}  {:>14}  {:>15}  {:>9}",
        "length", "KV/request", "pause replay", "pause transf.", "ratio", "resume replay", "resume transf.", "identical"
    );
    let ms = |s: Option<f64>| s.map_or("n/a".to_string(), |s| format!("{:.0} ms", s * 1e3));
    for l in &r.lengths {
        println!(
            "{:>6}  {:>10}  {:>10.0} ms  {:>11.0} ms  {:>6.1}x  {:>14}  {:>15}  {:>9}",
            l.length,
            crate::planner::format_bytes(l.kv_bytes_per_request),
            l.replay.longest_pause_s * 1e3,
            l.transfer.longest_pause_s * 1e3,
            l.replay_over_transfer,
            ms(l.replay.resume_s),
            ms(l.transfer.resume_s),
            if l.outputs_identical { "yes" } else { "NO" }
        );
    }
    for l in &r.lengths {
        println!(
            "  length {:>5}: moved {} replayed / {} with KV; median pause replay {:.0} ms, transfer {:.0} ms; \
             drain command {:.2} s / {:.2} s; decode step {:.1} ms",
            l.length,
            l.replay.replayed,
            l.transfer.transferred,
            l.replay.median_pause_s * 1e3,
            l.transfer.median_pause_s * 1e3,
            l.replay.drain_s,
            l.transfer.drain_s,
            l.replay.step_s * 1e3
        );
    }
    let c = &r.cost;
    println!(
        "cost model             step {:.1} ms, prompt token {:.3} steps, transfer {:.1} ms + {:.0} MB/s",
        c.step_s * 1e3,
        c.prompt_token_steps,
        c.transfer_fixed_s * 1e3,
        c.transfer_bytes_per_s / 1e6
    );
    let picks: Vec<String> = c.auto_choice.iter().map(|(l, p)| format!("{l}: {p}")).collect();
    println!("auto would choose      {}", picks.join(", "));
}

/// One request's tokens, with when each arrived.
#[derive(Default)]
struct Received {
    tokens: Vec<(Instant, u32)>,
}

/// Runs a request to its end, recording every token; `progress` counts them.
async fn follow(
    mut rx: tokio::sync::mpsc::Receiver<GenerateEvent>,
    received: Arc<Mutex<Received>>,
    progress: Arc<AtomicUsize>,
) -> anyhow::Result<()> {
    while let Some(event) = rx.recv().await {
        match event {
            GenerateEvent::Token(t, _) => {
                received.lock().unwrap_or_else(|p| p.into_inner()).tokens.push((Instant::now(), t));
                progress.fetch_add(1, Ordering::Relaxed);
            }
            GenerateEvent::Admitted | GenerateEvent::PromptLogprobs(_) => {}
            GenerateEvent::Finished(_) => return Ok(()),
            GenerateEvent::Failed(e) => anyhow::bail!("a benchmark request failed: {e}"),
        }
    }
    anyhow::bail!("a benchmark request ended without finishing")
}

/// A cluster over `workers` that admits `streams` requests at once.
async fn start_cluster(
    workers: &[String],
    model: &Arc<ServedModel>,
    policy: MovePolicy,
    streams: usize,
) -> anyhow::Result<Cluster> {
    let config = ClusterConfig {
        workers: workers.to_vec(),
        min_workers: workers.len(),
        worker_wait: Duration::from_secs(30),
        wire_dtype: WireDtype::F32,
        return_path: ReturnPath::Direct,
        weights_source: crate::cluster::WeightsSource::None,
        placement: PlacementPolicy::Spread,
        plan: crate::planner::PlanOptions { sequences: streams.max(1), ..crate::planner::PlanOptions::default() },
        queue_timeout: Duration::from_secs(120),
        move_sequences: policy,
        prefix_cache: false,
    };
    Ok(Cluster::start(&config, model.clone(), Arc::new(Membership::default())).await?.loaded().await?)
}

/// Time to the first token of a `len`-token prompt, and the step after it (one request).
async fn prefill_and_step(engine: &ClusterEngine, vocab: usize, len: usize) -> anyhow::Result<(f64, f64)> {
    let request =
        GenerateRequest { prompt_tokens: prompt_tokens(vocab, len, 99), max_tokens: 3, sampling: SamplingParams::greedy(), prompt_logprobs: None, logprobs: None, constraint: None, shared_prompt: false };
    let started = Instant::now();
    let received = Arc::new(Mutex::new(Received::default()));
    follow(engine.generate_ignoring_eos(request, ReturnPath::Direct)?, received.clone(), Arc::default()).await?;
    let r = received.lock().unwrap_or_else(|p| p.into_inner());
    anyhow::ensure!(r.tokens.len() == 3, "the prefill run produced {} tokens", r.tokens.len());
    let first = (r.tokens[0].0 - started).as_secs_f64();
    let step = (r.tokens[2].0 - r.tokens[1].0).as_secs_f64();
    Ok((first, step))
}

/// The requests of one measurement run to `length`, the middle worker is drained under
/// them, and they run to their end.
async fn one(
    workers: &[String],
    model: &Arc<ServedModel>,
    policy: MovePolicy,
    args: &BenchArgs,
    length: usize,
) -> anyhow::Result<(Measured, Vec<Vec<u32>>)> {
    let cluster = start_cluster(workers, model, policy, args.switch_streams).await?;
    let engine = cluster.engine.clone();
    let vocab = model.file.info().vocab_size;
    let prompt_len = args.switch_prompt.min(length.saturating_sub(1)).max(1);
    let generate_before = length - prompt_len;
    let mut tasks = Vec::new();
    let mut state = Vec::new();
    for s in 0..args.switch_streams {
        let request = GenerateRequest {
            prompt_tokens: prompt_tokens(vocab, prompt_len, s as u32 + 1),
            max_tokens: generate_before + TAIL,
            sampling: SamplingParams::greedy(),
            prompt_logprobs: None,
            logprobs: None,
            constraint: None,
            shared_prompt: false,
        };
        let received = Arc::new(Mutex::new(Received::default()));
        let progress = Arc::new(AtomicUsize::new(0));
        let rx = engine.generate_ignoring_eos(request, ReturnPath::Direct)?;
        tasks.push(tokio::spawn(follow(rx, received.clone(), progress.clone())));
        state.push((received, progress));
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while state.iter().any(|(_, p)| p.load(Ordering::Relaxed) < generate_before) {
        anyhow::ensure!(Instant::now() < deadline, "the requests did not reach length {length}");
        anyhow::ensure!(!tasks.iter().any(|t| t.is_finished()), "a request ended before the switch");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let switched = Instant::now();
    let at_switch: Vec<usize> = state.iter().map(|(_, p)| p.load(Ordering::Relaxed)).collect();
    let admin = cluster.admin();
    let report = admin.drain(format!("{}-1", WORKER_NAME), false, true).await.context("draining the middle worker")?;
    let drain_s = switched.elapsed().as_secs_f64();
    for t in tasks {
        t.await??;
    }
    let mut pauses = Vec::new();
    let mut steps = Vec::new();
    let mut outputs = Vec::new();
    for (received, _) in &state {
        let r = received.lock().unwrap_or_else(|p| p.into_inner());
        let times: Vec<Instant> = r.tokens.iter().map(|t| t.0).collect();
        let before: Vec<Instant> = times.iter().copied().filter(|t| *t < switched).collect();
        // The old pipeline serves while the new one loads: the pause is the longest
        // gap from the drain command on, wherever the switch fell in it.
        let pause = times
            .windows(2)
            .filter(|w| w[1] >= switched)
            .map(|w| (w[1] - w[0]).as_secs_f64())
            .fold(0.0, f64::max);
        anyhow::ensure!(!before.is_empty() && times.len() > before.len(), "no token on one side of the switch");
        pauses.push(pause);
        let mut intervals: Vec<f64> = before.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect();
        steps.push(median(&mut intervals));
        outputs.push(r.tokens.iter().map(|t| t.1).collect());
    }
    admin.undrain(format!("{}-1", WORKER_NAME)).await.context("undraining the middle worker")?;
    cluster.shutdown().await;
    let longest_pause_s = pauses.iter().copied().fold(0.0, f64::max);
    let measured = Measured {
        policy: format!("{policy:?}").to_lowercase(),
        length_at_switch: prompt_len as f64
            + at_switch.iter().sum::<usize>() as f64 / at_switch.len().max(1) as f64,
        // The drain reports 0 when its wait for the requests to resume ran out.
        resume_s: Some(report.longest_resume_seconds).filter(|s| *s > 0.0),
        longest_pause_s,
        median_pause_s: median(&mut pauses),
        drain_s,
        transferred: report.sequences_transferred,
        replayed: report.sequences_replayed,
        step_s: median(&mut steps),
    };
    Ok((measured, outputs))
}

/// Names of the benchmark's workers: `bench-switch-0`, `-1`, `-2`.
const WORKER_NAME: &str = "bench-switch";

async fn measure(
    args: &BenchArgs,
    model: Arc<ServedModel>,
    threads: usize,
    path: &std::path::Path,
    children: &mut Children,
) -> anyhow::Result<Report> {
    anyhow::ensure!(args.switch_streams >= 1, "--switch-streams must be at least 1");
    let lock_dir = tempfile::tempdir()?;
    let lock = lock_dir.path().join("compute.lock");
    let mut workers = Vec::new();
    for i in 0..WORKERS {
        let lock = (!args.no_compute_lock).then_some(lock.as_path());
        workers.push(start_local_worker(children, &format!("{WORKER_NAME}-{i}"), path, threads, lock).await?);
    }
    let info = model.file.info().clone();
    let kv_per_position = info.kv_bytes_per_token_per_layer() * info.layers as u64;

    // The prompt-token cost, in decode steps, on a pipeline of the three workers.
    let (prefill_s, step_one) = {
        let cluster = start_cluster(&workers, &model, MovePolicy::Replay, 1).await?;
        let engine = cluster.engine.clone();
        prefill_and_step(&engine, info.vocab_size, 16).await?;
        let mut runs = Vec::new();
        for _ in 0..3 {
            runs.push(prefill_and_step(&engine, info.vocab_size, PREFILL_PROMPT).await?);
        }
        cluster.shutdown().await;
        let mut firsts: Vec<f64> = runs.iter().map(|r| r.0).collect();
        let mut steps: Vec<f64> = runs.iter().map(|r| r.1).collect();
        (median(&mut firsts), median(&mut steps))
    };

    let mut lengths = Vec::new();
    for &length in &args.switch_lengths {
        anyhow::ensure!(length >= 2, "switch lengths must be at least 2");
        let (replay, replayed_out) = one(&workers, &model, MovePolicy::Replay, args, length).await?;
        let (transfer, transferred_out) = one(&workers, &model, MovePolicy::Transfer, args, length).await?;
        eprintln!(
            "length {length}: longest pause replay {:.0} ms, transfer {:.0} ms",
            replay.longest_pause_s * 1e3,
            transfer.longest_pause_s * 1e3
        );
        lengths.push(Length {
            length,
            replay_over_transfer: replay.longest_pause_s / transfer.longest_pause_s.max(1e-9),
            kv_bytes_per_request: (length as u64 - 1) * kv_per_position,
            outputs_identical: replayed_out == transferred_out,
            replay,
            transfer,
        });
    }

    // A transfer's fixed cost and speed: a straight line through (KV bytes the
    // requests moved, time to resume less the resuming step), least squares.
    let points: Vec<(f64, f64)> = lengths
        .iter()
        .filter_map(|l| {
            let bytes = (l.kv_bytes_per_request * args.switch_streams as u64) as f64;
            Some((bytes, (l.transfer.resume_s? - l.transfer.step_s).max(0.0)))
        })
        .collect();
    let (fixed, per_byte) = fit(&points);
    // The requests' transfers share the link: per request, the speed is a share of it.
    let step = lengths.first().map_or(step_one, |l| l.replay.step_s);
    let cost = MoveCost {
        step_seconds: step,
        prompt_token_steps: prefill_s / PREFILL_PROMPT as f64 / step_one.max(1e-9),
        transfer_fixed_seconds: fixed.max(0.0),
        transfer_bytes_per_second: if per_byte > 0.0 {
            1.0 / per_byte / args.switch_streams as f64
        } else {
            f64::INFINITY
        },
    };
    let auto_choice = [2usize, 17, 32, 64, 256, 1024]
        .iter()
        .map(|&l| {
            let prompt = args.switch_prompt.min(l - 1);
            let e = cost.estimate(prompt, l - prompt, kv_per_position);
            (l, if e.transfer_is_faster() { "transfer" } else { "replay" }.to_string())
        })
        .collect();
    Ok(Report {
        model: args.model.model.clone(),
        workers: WORKERS,
        streams: args.switch_streams,
        prompt_tokens: args.switch_prompt,
        threads_per_worker: threads,
        lengths,
        cost: CostReport {
            step_s: cost.step_seconds,
            prompt_token_steps: cost.prompt_token_steps,
            transfer_fixed_s: cost.transfer_fixed_seconds,
            transfer_bytes_per_s: cost.transfer_bytes_per_second,
            auto_choice,
        },
    })
}

/// Least-squares line `y = a + b x`; with fewer than two distinct x, a line through
/// the origin and the mean.
fn fit(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    let (sx, sy) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let sxx: f64 = points.iter().map(|(x, _)| x * x).sum();
    let sxy: f64 = points.iter().map(|(x, y)| x * y).sum();
    let d = n * sxx - sx * sx;
    if points.len() < 2 || d.abs() < f64::EPSILON {
        return (0.0, if sx > 0.0 { sy / sx } else { 0.0 });
    }
    let b = (n * sxy - sx * sy) / d;
    ((sy - b * sx) / n, b)
}
