//! Two workers on the one device as a 2-stage pipeline, under a coordinator in this
//! process on loopback: a completion, then the second worker drained while a
//! request runs through it, its memory freed (on a GPU read back from the driver:
//! what stopping the drained worker then frees is no more than its start-up
//! memory), and the generated tokens the same before, through and after the drain.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use strata_model::SamplingParams;
use strata_proto::v1::WireDtype;
use tokio::sync::mpsc;

use super::super::bench::{proc_status_bytes, prompt_tokens};
use super::super::children::{start_local_worker_on, Children};
use super::inventory::WorkerDevices;
use super::Verdict;
use crate::cluster::{Cluster, ClusterConfig, Membership, MovePolicy, PlacementPolicy, ReturnPath, ServedModel};
use crate::engine::{Engine, GenerateEvent, GenerateRequest};
use crate::planner::format_bytes;

/// The workers' names; the second is drained.
const WORKERS: [&str; 2] = ["gpu-check-0", "gpu-check-1"];
const PROMPT_TOKENS: usize = 24;
const GENERATED: usize = 32;
/// Tokens the request has generated when the drain starts, and generates after it.
const DRAIN_AFTER: usize = 8;
/// The most tokens the request running through the drain may generate.
const LONG_REQUEST: usize = 4096;

/// Runs the pipeline part on `device`; each worker computes with `threads` threads.
pub fn check(path: &Path, device: &str, threads: usize) -> anyhow::Result<Vec<Verdict>> {
    let model = Arc::new(ServedModel::open(path, "gpu-check".into())?);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let mut children = Children::with_coordinator_here(false)?;
    let result = runtime.block_on(run(&model, path, device, threads, &mut children));
    runtime.block_on(children.stop_all());
    result
}

/// The driver's memory in use on the GPU `device` names, every process on it
/// together (read in a process of its own).
async fn gpu_in_use(device: &str) -> anyhow::Result<u64> {
    let device = device.to_string();
    let used = tokio::task::spawn_blocking(move || WorkerDevices::probe(&device, false)).await??.gpu_memory_used();
    used.context("the driver did not report the GPU's free memory")
}

/// The worker's resident memory (Linux).
fn resident(pid: Option<u32>) -> anyhow::Result<u64> {
    proc_status_bytes(Some(pid.context("the worker has exited")?), "VmRSS")
}

/// The GPU's memory in use before the workers started, and once they had (their
/// CUDA contexts and start-up benchmarks, before any layer).
#[derive(Debug, Clone, Copy)]
struct GpuBaseline {
    before: u64,
    started: u64,
}

async fn run(
    model: &Arc<ServedModel>,
    path: &Path,
    device: &str,
    threads: usize,
    children: &mut Children,
) -> anyhow::Result<Vec<Verdict>> {
    let gpu = device != "cpu";
    let before = if gpu { Some(gpu_in_use(device).await?) } else { None };
    // CPU workers on one machine take turns; a GPU's work is queued by its driver.
    let lock_dir = tempfile::tempdir()?;
    let lock = (!gpu).then(|| lock_dir.path().join("compute.lock"));
    let mut workers = Vec::new();
    for name in WORKERS {
        workers.push(start_local_worker_on(children, name, path, threads, lock.as_deref(), device).await?);
    }
    let config = ClusterConfig {
        workers: workers.clone(),
        min_workers: workers.len(),
        worker_wait: Duration::from_secs(60),
        wire_dtype: WireDtype::F32,
        return_path: ReturnPath::Direct,
        weights_source: crate::cluster::WeightsSource::None,
        placement: PlacementPolicy::Spread,
        plan: crate::planner::PlanOptions::default(),
        queue_timeout: Duration::from_secs(120),
        move_sequences: MovePolicy::Transfer,
        prefix_cache: false,
    };
    let baseline = match before {
        Some(before) => Some(GpuBaseline { before, started: gpu_in_use(device).await? }),
        None => None,
    };
    let cluster = Cluster::start(&config, model.clone(), Arc::new(Membership::default())).await?.loaded().await?;
    let result = exercise(&cluster, model, device, baseline, children).await;
    cluster.shutdown().await;
    result
}

async fn exercise(
    cluster: &Cluster,
    model: &ServedModel,
    device: &str,
    baseline: Option<GpuBaseline>,
    children: &mut Children,
) -> anyhow::Result<Vec<Verdict>> {
    let admin = cluster.admin();
    let status = admin.status().await?;
    for node in &status.nodes {
        let layers = node.layers.map_or("none".into(), |[a, b]| format!("{a}..{b}"));
        println!("  {} on {}: layers {layers}", node.name, node.devices.join(", "));
    }
    let drained_pid = children.processes.get(1).and_then(|p| p.id());
    let loaded = match baseline {
        Some(_) => gpu_in_use(device).await?,
        None => resident(drained_pid)?,
    };

    let vocab = model.file.info().vocab_size;
    let prompt = prompt_tokens(vocab, PROMPT_TOKENS, 3);
    let request = || GenerateRequest {
        prompt_tokens: prompt.clone(),
        max_tokens: GENERATED,
        sampling: SamplingParams::greedy(),
        prompt_logprobs: None,
        logprobs: None,
        constraint: None,
            shared_prompt: false,
    };
    let engine = &cluster.engine;
    let first = collect(engine.generate_ignoring_eos(request(), ReturnPath::Direct)?, GENERATED).await?;
    println!("  completion of {PROMPT_TOKENS} prompt tokens: {GENERATED} tokens through both stages");

    // A request long enough to outlast the drain (the old pipeline serves while
    // the new one loads), read until a few tokens after it and then dropped.
    let long = GenerateRequest {
        max_tokens: LONG_REQUEST.min(engine.limits().context.saturating_sub(PROMPT_TOKENS + 1)),
        ..request()
    };
    let mut running = engine.generate_ignoring_eos(long, ReturnPath::Direct)?;
    let mut through = collect_some(&mut running, DRAIN_AFTER).await?;
    let drain = admin.drain(WORKERS[1].to_string(), false, true);
    tokio::pin!(drain);
    let mut report = None;
    let mut after_drain = 0;
    // At least as many tokens as the first completion, to compare with all of it,
    // however quickly the drain ends.
    while after_drain < DRAIN_AFTER || through.len() < GENERATED {
        tokio::select! {
            done = &mut drain, if report.is_none() => report = Some(done.context("draining the second worker")?),
            token = collect_some(&mut running, 1) => {
                through.extend(token.context("the request ended before the drain did")?);
                after_drain += usize::from(report.is_some());
            }
        }
    }
    drop(running);
    let report = report.context("the drain did not finish")?;
    let again = GenerateRequest { max_tokens: through.len(), ..request() };
    let after = collect(engine.generate_ignoring_eos(again, ReturnPath::Direct)?, through.len()).await?;
    println!(
        "  drained {} after {DRAIN_AFTER} tokens of a request in {:.1}s: {} sequence(s) moved ({} with their KV cache), {} freed by its account",
        WORKERS[1],
        report.seconds,
        report.sequences_moved,
        report.sequences_transferred,
        format_bytes(report.memory_freed_bytes)
    );
    println!("  the request went on to {} tokens; the same prompt again after the drain", through.len());

    let same = |a: &[u32], b: &[u32]| a.iter().zip(b).filter(|(x, y)| x == y).count();
    let mut verdicts = vec![Verdict::new(
        "pipeline: the same tokens before, through and after a drain",
        through[..GENERATED] == first[..] && after == through && report.sequences_moved > 0,
        format!(
            "{} of the first {GENERATED} equal through the drain, {} of {} after it; {} request(s) moved",
            same(&first, &through),
            same(&through, &after),
            through.len(),
            report.sequences_moved
        ),
    )];
    let share = report.memory_freed_bytes;
    let (passed, detail) = match baseline {
        // The driver sees the device as a whole, and the layers moved within it.
        // What the drained worker still holds is what stopping it frees, less what
        // a worker holds before any layer (its context, its start-up benchmark).
        Some(GpuBaseline { before, started }) => {
            let drained = gpu_in_use(device).await?;
            if children.processes.len() > 1 {
                children.processes.remove(1).stop(Duration::from_secs(10)).await;
            }
            let stopped = gpu_in_use(device).await?;
            let at_start = started.saturating_sub(before) / WORKERS.len() as u64;
            let kept = drained.saturating_sub(stopped);
            let beyond = kept.saturating_sub(at_start);
            (
                beyond < share / 2,
                format!(
                    "GPU memory in use by the driver: {} before the workers, {} once started ({} each), {} loaded, {} after the drain, {} with the drained worker stopped: it still held {}, {} beyond its start ({} of layers before the drain)",
                    format_bytes(before),
                    format_bytes(started),
                    format_bytes(at_start),
                    format_bytes(loaded),
                    format_bytes(drained),
                    format_bytes(stopped),
                    format_bytes(kept),
                    format_bytes(beyond),
                    format_bytes(share)
                ),
            )
        }
        None => {
            let drained = resident(drained_pid)?;
            (
                drained + share / 2 < loaded,
                format!(
                    "the drained worker's resident memory: {} loaded, {} drained (it held {})",
                    format_bytes(loaded),
                    format_bytes(drained),
                    format_bytes(share)
                ),
            )
        }
    };
    verdicts.push(Verdict::new("pipeline: the drained worker's memory is freed", passed && share > 0, detail));
    Ok(verdicts)
}

/// Reads `n` tokens of a request (it may go on).
async fn collect_some(rx: &mut mpsc::Receiver<GenerateEvent>, n: usize) -> anyhow::Result<Vec<u32>> {
    let mut tokens = Vec::with_capacity(n);
    while tokens.len() < n {
        match rx.recv().await {
            Some(GenerateEvent::Token(t, _)) => tokens.push(t),
            Some(GenerateEvent::Admitted | GenerateEvent::PromptLogprobs(_)) => {}
            Some(GenerateEvent::Failed(e)) => anyhow::bail!("the request failed: {e}"),
            Some(GenerateEvent::Finished(_)) | None => {
                anyhow::bail!("the request ended after {} of {n} tokens", tokens.len())
            }
        }
    }
    Ok(tokens)
}

/// Reads the remaining `n` tokens of a request and its end.
async fn collect(mut rx: mpsc::Receiver<GenerateEvent>, n: usize) -> anyhow::Result<Vec<u32>> {
    let tokens = collect_some(&mut rx, n).await?;
    match rx.recv().await {
        Some(GenerateEvent::Finished(_)) | None => Ok(tokens),
        Some(GenerateEvent::Failed(e)) => anyhow::bail!("the request failed: {e}"),
        Some(_) => anyhow::bail!("the request generated more than {n} tokens"),
    }
}
