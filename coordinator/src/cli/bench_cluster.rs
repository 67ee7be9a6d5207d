//! `strata bench --workers N`: the pipeline against one process, measured in one run.
//!
//! 1. Single-process decode speed, in this process (all of `--threads`), and
//! 2. N worker processes on loopback, driven by an in-process coordinator: a single
//!    stream's decode speed on both return paths. The three alternate run by run
//!    (medians), so the ratio compares the same stretch of the machine and the
//!    faster path can be chosen on numbers.
//! 3. Aggregate speed at 1, 4 and 16 concurrent streams.
//! 4. Per-hop latency (p50/p99) from the frames' send stamps, as the receiving
//!    side saw them.
//!
//! Every run generates exactly `--decode-tokens` tokens (end-of-generation tokens
//! do not stop a benchmark run).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use strata_model::stage::StageOptions;
use strata_model::{SamplingParams, Stage, StageInput, StageStep};
use strata_proto::v1::WireDtype;

use super::bench::{last_token, median, prompt_tokens, BenchArgs};
use super::children::{start_local_worker, Children};
use crate::cluster::{Cluster, ClusterConfig, ClusterEngine, Membership, PlacementPolicy, ReturnPath, ServedModel};
use crate::engine::{GenerateEvent, GenerateRequest};

#[derive(Debug, Serialize)]
struct Percentiles {
    hop: String,
    samples: usize,
    p50_us: u32,
    p99_us: u32,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    workers: usize,
    threads_single_process: usize,
    threads_per_worker: usize,
    single_process_decode_tokens_per_s: f64,
    pipeline_decode_tokens_per_s_coordinator_return: f64,
    pipeline_decode_tokens_per_s_direct_return: f64,
    return_path_kept: String,
    pipeline_to_single_ratio: f64,
    aggregate_tokens_per_s: Vec<(usize, f64)>,
    /// Per concurrency level: mean frames per batch, and busy seconds, by stage.
    batch_sizes: Vec<(usize, Vec<f64>, Vec<f64>)>,
    /// Mean compute time of one single-stream decode step on each stage.
    compute_per_step_us: Vec<u32>,
    hops: Vec<Percentiles>,
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let (file, device) = args.model.open()?;
    let path = crate::model_store::resolve(&args.model.model)?;
    let single = SingleProcess::load(&file, &device, args)?;
    drop(file);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = args.worker_threads.unwrap_or_else(|| super::demo::threads_per_worker(cores, args.workers));
    let model = Arc::new(ServedModel::open(&path, args.model.model.clone())?);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let mut children = Children::with_coordinator_here(args.insecure)?;
    let result = runtime.block_on(pipeline(args, model, threads, single, &path, &mut children));
    runtime.block_on(children.stop_all());
    super::bench::emit(&result?, args.json, print)
}

fn print(r: &Report) {
    println!("model                       {}", r.model);
    println!(
        "threads                     {} (one process), {} per worker x {}",
        r.threads_single_process, r.threads_per_worker, r.workers
    );
    println!("single process decode       {:.1} tokens/s", r.single_process_decode_tokens_per_s);
    println!(
        "pipeline decode, 1 stream   {:.1} tokens/s (token back via the coordinator)",
        r.pipeline_decode_tokens_per_s_coordinator_return
    );
    println!(
        "pipeline decode, 1 stream   {:.1} tokens/s (token straight to stage 0)",
        r.pipeline_decode_tokens_per_s_direct_return
    );
    println!("pipeline / single process   {:.2} (return path: {})", r.pipeline_to_single_ratio, r.return_path_kept);
    for (streams, tps) in &r.aggregate_tokens_per_s {
        println!("aggregate, {streams:>2} streams        {tps:.1} tokens/s");
    }
    for (streams, sizes, busy) in &r.batch_sizes {
        let sizes: Vec<String> = sizes.iter().map(|s| format!("{s:.1}")).collect();
        let busy: Vec<String> = busy.iter().map(|s| format!("{s:.2}")).collect();
        println!("  {streams:>2} streams: frames per batch [{}], busy s [{}]", sizes.join(", "), busy.join(", "));
    }
    if let (Some(one), Some(last)) = (r.aggregate_tokens_per_s.first(), r.aggregate_tokens_per_s.last()) {
        println!("{} streams / 1 stream       {:.2}", last.0, last.1 / one.1.max(1e-9));
    }
    println!("compute per decode step     {:?} us by stage (single stream)", r.compute_per_step_us);
    println!("per-hop latency (decode steps, single stream):");
    for h in &r.hops {
        println!("  {:<28} p50 {:>6} us  p99 {:>6} us  ({} frames)", h.hop, h.p50_us, h.p99_us, h.samples);
    }
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The whole model in this process, decoding one stream: what the pipeline is
/// compared with. Its runs alternate with the pipeline's, so that both see the
/// same stretch of a machine whose speed drifts.
struct SingleProcess {
    stage: Stage,
    prompt: Vec<u32>,
    decode_tokens: usize,
    runs: u64,
}

impl SingleProcess {
    /// Loads the model and decodes once (not counted) to warm caches and the pool.
    fn load(file: &strata_model::ModelFile, device: &strata_model::Device, args: &BenchArgs) -> anyhow::Result<Self> {
        let stage = Stage::load(file, 0..file.info().layers, device, StageOptions::default())?;
        let prompt = prompt_tokens(file.info().vocab_size, 32, 0);
        let mut single = Self { stage, prompt, decode_tokens: args.decode_tokens, runs: 0 };
        single.decode()?;
        Ok(single)
    }

    /// Decode tokens/s of one run (the prompt's prefill not counted).
    fn decode(&mut self) -> anyhow::Result<f64> {
        let seq = self.runs;
        self.runs += 1;
        let prompt = StageInput::Tokens(self.prompt.clone());
        let mut next = last_token(&self.stage.forward(&[StageStep { seq, position: 0, input: prompt }])?)?;
        let t = Instant::now();
        for i in 0..self.decode_tokens {
            let step = StageStep { seq, position: self.prompt.len() + i, input: StageInput::Tokens(vec![next]) };
            next = last_token(&self.stage.forward(&[step])?)?;
        }
        let secs = t.elapsed().as_secs_f64();
        self.stage.release(seq);
        Ok(self.decode_tokens as f64 / secs)
    }
}

/// Decode speed of one request: tokens after the first over the time since the
/// first arrived (prefill excluded).
async fn one_stream(engine: &ClusterEngine, prompt: Vec<u32>, n: usize, path: ReturnPath) -> anyhow::Result<f64> {
    let request = GenerateRequest { prompt_tokens: prompt, max_tokens: n, sampling: SamplingParams::greedy(), prompt_logprobs: None, logprobs: None, constraint: None, shared_prompt: false };
    let mut rx = engine.generate_ignoring_eos(request, path)?;
    let mut first = None;
    let mut tokens = 0usize;
    while let Some(event) = rx.recv().await {
        match event {
            GenerateEvent::Token(..) => {
                tokens += 1;
                first.get_or_insert_with(Instant::now);
            }
            GenerateEvent::Admitted | GenerateEvent::PromptLogprobs(_) => {}
            GenerateEvent::Finished(_) => break,
            GenerateEvent::Failed(e) => anyhow::bail!("a benchmark request failed: {e}"),
        }
    }
    let first = first.context("no token came back")?;
    Ok((tokens.saturating_sub(1)) as f64 / first.elapsed().as_secs_f64().max(1e-9))
}

/// Tokens/s of `streams` requests run at once (all tokens over the wall time).
async fn aggregate(
    engine: &ClusterEngine,
    vocab: usize,
    streams: usize,
    n: usize,
    path: ReturnPath,
) -> anyhow::Result<f64> {
    let t = Instant::now();
    let mut receivers = Vec::new();
    for s in 0..streams {
        let request = GenerateRequest {
            prompt_tokens: prompt_tokens(vocab, 32, s as u32 + 1),
            max_tokens: n,
            sampling: SamplingParams::greedy(),
            prompt_logprobs: None,
            logprobs: None,
            constraint: None,
            shared_prompt: false,
        };
        receivers.push(engine.generate_ignoring_eos(request, path)?);
    }
    let mut total = 0usize;
    for mut rx in receivers {
        while let Some(event) = rx.recv().await {
            match event {
                GenerateEvent::Token(..) => total += 1,
                GenerateEvent::Admitted | GenerateEvent::PromptLogprobs(_) => {}
                GenerateEvent::Finished(_) => break,
                GenerateEvent::Failed(e) => anyhow::bail!("a benchmark request failed: {e}"),
            }
        }
    }
    Ok(total as f64 / t.elapsed().as_secs_f64())
}

async fn pipeline(
    args: &BenchArgs,
    model: Arc<ServedModel>,
    threads: usize,
    mut single: SingleProcess,
    path: &std::path::Path,
    children: &mut Children,
) -> anyhow::Result<Report> {
    let lock_dir = tempfile::tempdir()?;
    let lock = lock_dir.path().join("compute.lock");
    let mut addresses = Vec::new();
    for i in 0..args.workers {
        let lock = (!args.no_compute_lock).then_some(lock.as_path());
        addresses.push(start_local_worker(children, &format!("bench-worker-{i}"), path, threads, lock).await?);
    }
    let config = ClusterConfig {
        workers: addresses,
        min_workers: args.workers,
        worker_wait: Duration::from_secs(30),
        wire_dtype: WireDtype::F32,
        return_path: ReturnPath::Direct,
        weights_source: crate::cluster::WeightsSource::None,
        placement: PlacementPolicy::Spread,
        // Up to 16 streams run at once below: the plan admits that many.
        plan: crate::planner::PlanOptions { sequences: 16, ..crate::planner::PlanOptions::default() },
        queue_timeout: Duration::from_secs(60),
        move_sequences: Default::default(),
        prefix_cache: false,
    };
    let cluster = Cluster::start(&config, model.clone(), Arc::new(Membership::default())).await?.loaded().await?;
    let engine = cluster.engine.clone();
    let vocab = model.file.info().vocab_size;
    let n = args.decode_tokens;
    // Warm-up: thread pools, connections, caches.
    one_stream(&engine, prompt_tokens(vocab, 32, 0), 16, ReturnPath::Coordinator).await?;
    one_stream(&engine, prompt_tokens(vocab, 32, 0), 16, ReturnPath::Direct).await?;

    let mut hops = Vec::new();
    let mut speeds = [Vec::new(), Vec::new()];
    let paths = [ReturnPath::Coordinator, ReturnPath::Direct];
    let mut samples: [Vec<Vec<u32>>; 2] = [vec![Vec::new(); args.workers + 1], vec![Vec::new(); args.workers + 1]];
    let mut busy = vec![(0.0f64, 0u64); args.workers];
    let mut single_speeds = Vec::new();
    for run in 0..args.runs.max(1) {
        // The workers idle meanwhile; the runtime's tasks go on beside the compute.
        single_speeds.push(tokio::task::block_in_place(|| single.decode())?);
        for (k, path) in paths.iter().enumerate() {
            cluster.stats(true).await?;
            cluster.token_hops.take();
            speeds[k].push(one_stream(&engine, prompt_tokens(vocab, 32, run as u32 + 7), n, *path).await?);
            for (i, s) in cluster.stats(false).await?.into_iter().enumerate() {
                samples[k][i].extend(s.hop_micros);
                busy[i].0 += s.busy_seconds;
                busy[i].1 += s.batches;
            }
            samples[k][args.workers].extend(cluster.token_hops.take());
        }
    }
    drop(single);
    let single = median(&mut single_speeds);
    let coordinator_return = median(&mut speeds[0]);
    let direct_return = median(&mut speeds[1]);
    let (kept, kept_path) = if direct_return >= coordinator_return {
        ("direct (last stage to stage 0)", ReturnPath::Direct)
    } else {
        ("via the coordinator", ReturnPath::Coordinator)
    };
    for (k, name) in [(0usize, "via coordinator"), (1, "direct")] {
        let w = args.workers;
        for (i, stage_samples) in samples[k].iter_mut().enumerate() {
            let mut s = std::mem::take(stage_samples);
            s.sort_unstable();
            let hop = match (k, i) {
                (0, 0) => "coordinator -> stage 0".to_string(),
                (1, 0) => format!("stage {} -> stage 0", w - 1),
                (_, i) if i == w => format!("stage {} -> coordinator", w - 1),
                (_, i) => format!("stage {} -> stage {i}", i - 1),
            };
            if k == 1 && i == w {
                // Off the critical path on the direct route; reported once above.
                continue;
            }
            hops.push(Percentiles {
                hop: format!("{hop} [{name}]"),
                samples: s.len(),
                p50_us: percentile(&s, 0.5),
                p99_us: percentile(&s, 0.99),
            });
        }
    }
    let mut aggregate_tps = Vec::new();
    let mut batch_sizes = Vec::new();
    for streams in [1usize, 4, 16] {
        cluster.stats(true).await?;
        aggregate_tps.push((streams, aggregate(&engine, vocab, streams, n, kept_path).await?));
        let stats = cluster.stats(false).await?;
        batch_sizes.push((
            streams,
            stats.iter().map(|s| s.frames as f64 / s.batches.max(1) as f64).collect::<Vec<_>>(),
            stats.iter().map(|s| s.busy_seconds).collect::<Vec<_>>(),
        ));
    }
    cluster.shutdown().await;
    let compute_per_step_us = busy.iter().map(|(s, b)| (s / (*b).max(1) as f64 * 1e6) as u32).collect();
    Ok(Report {
        compute_per_step_us,
        batch_sizes,
        model: args.model.model.clone(),
        workers: args.workers,
        threads_single_process: candle_core::utils::get_num_threads(),
        threads_per_worker: threads,
        single_process_decode_tokens_per_s: single,
        pipeline_decode_tokens_per_s_coordinator_return: coordinator_return,
        pipeline_decode_tokens_per_s_direct_return: direct_return,
        return_path_kept: kept.to_string(),
        pipeline_to_single_ratio: coordinator_return.max(direct_return) / single.max(1e-9),
        aggregate_tokens_per_s: aggregate_tps,
        hops,
    })
}
