//! `strata bench`: speed and memory of the runtime, measured in one run (`--workers`:
//! the pipeline against one process; `--switch`: requests moved by a drain).
//!
//! Speeds are medians over several runs. Each stage's memory is measured in a child
//! process that loads only that stage, so the numbers are not blurred by memory the
//! allocator kept from an earlier load.

use std::ops::Range;
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use strata_model::stage::StageOptions;
use strata_model::{ModelFile, Stage, StageInput, StageOutput, StageStep};

use super::ModelArgs;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Runs to take the median of.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Tokens decoded per run.
    #[arg(long, default_value_t = 64)]
    pub decode_tokens: usize,
    /// Even stages to measure the memory of (0 skips it).
    #[arg(long, default_value_t = 3)]
    pub stages: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Internal: load only these layers (`a..b`) and print resident memory.
    #[arg(long, hide = true)]
    pub measure_stage: Option<String>,
    /// Also run the model as a pipeline of this many worker processes and compare
    /// (see `bench_cluster`); 0 measures one process only.
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Compute threads of each worker in the pipeline measurement.
    #[arg(long)]
    pub worker_threads: Option<usize>,
    /// Let the pipeline's workers compute at the same time (no shared compute lock).
    #[arg(long)]
    pub no_compute_lock: bool,
    /// With --workers: plain TCP between the nodes instead of mutual TLS (what
    /// `scripts/bench-tls` compares).
    #[arg(long)]
    pub insecure: bool,
    /// Instead: how long requests pause when the middle of three workers is drained
    /// under them, replayed versus moved with their KV caches (see `bench_switch`).
    #[arg(long)]
    pub switch: bool,
    /// Lengths (prompt and generated tokens) the requests reach before the drain.
    #[arg(long, value_delimiter = ',', default_value = "64,256,1024")]
    pub switch_lengths: Vec<usize>,
    /// Requests in flight during the drain.
    #[arg(long, default_value_t = 4)]
    pub switch_streams: usize,
    /// Prompt tokens of those requests (the rest of the length is generated).
    #[arg(long, default_value_t = 16)]
    pub switch_prompt: usize,
    /// With --workers: the in-process coordinator's spans (the workers it starts
    /// read OTEL_EXPORTER_OTLP_ENDPOINT from the environment they inherit), for
    /// measuring what tracing costs (`scripts/bench-tracing`).
    #[command(flatten)]
    pub trace: strata_telemetry::TraceArgs,
}

#[derive(Debug, Serialize)]
struct StageMemory {
    layers: String,
    /// Bytes of the transformer layers alone (no embedding or head).
    layer_bytes: u64,
    weight_bytes: u64,
    resident_bytes: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    threads: usize,
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
    peak_resident_bytes: u64,
    stages: Vec<StageMemory>,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.switch && args.measure_stage.is_none() {
        return super::bench_switch::run(&args);
    }
    if args.workers > 0 && args.measure_stage.is_none() {
        return super::bench_cluster::run(&args);
    }
    let (file, device) = args.model.open()?;
    if let Some(range) = &args.measure_stage {
        return measure_stage_here(&file, &device, parse_range(range)?);
    }
    let n_layers = file.info().layers;
    let stages = even_ranges(n_layers, args.stages.min(n_layers))
        .into_iter()
        .map(|r| measure_stage_in_child(&args, r, &file))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut stage = Stage::load(&file, 0..n_layers, &device, StageOptions::default())?;
    let prompt = prompt_tokens(file.info().vocab_size, args.prompt_tokens, 0);
    let speed = measure_speed(&mut stage, &prompt, args.decode_tokens, args.runs)?;
    let report = Report {
        model: args.model.model.clone(),
        threads: candle_core_threads(),
        prefill_tokens_per_s: speed.prefill_tokens_per_s,
        decode_tokens_per_s: speed.decode_tokens_per_s,
        peak_resident_bytes: proc_status_bytes(None, "VmHWM")?,
        stages,
    };
    emit(&report, args.json, |r| print_report(r, file.sizes().layers.iter().sum()))
}

/// Median speeds of a full stage.
#[derive(Debug, Clone, Copy)]
pub(super) struct Speed {
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
}

/// Runs `prompt` and then `decode_tokens` greedy steps `runs` times on a stage that
/// holds every layer, after one run that warms caches and the thread pool (and a
/// GPU's kernels) and is not counted.
pub(super) fn measure_speed(
    stage: &mut Stage,
    prompt: &[u32],
    decode_tokens: usize,
    runs: usize,
) -> anyhow::Result<Speed> {
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for run in 0..runs.max(1) + 1 {
        let seq = run as u64;
        let t = Instant::now();
        let mut next = last_token(&stage.forward(&[StageStep {
            seq,
            position: 0,
            input: StageInput::Tokens(prompt.to_vec()),
        }])?)?;
        let prefill_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for i in 0..decode_tokens {
            let step = StageStep { seq, position: prompt.len() + i, input: StageInput::Tokens(vec![next]) };
            next = last_token(&stage.forward(&[step])?)?;
        }
        let decode_s = t.elapsed().as_secs_f64();
        stage.release(seq);
        if run > 0 {
            prefill.push(prompt.len() as f64 / prefill_s);
            decode.push(decode_tokens as f64 / decode_s);
        }
    }
    Ok(Speed { prefill_tokens_per_s: median(&mut prefill), decode_tokens_per_s: median(&mut decode) })
}

/// `len` prompt tokens spread over the vocabulary (past its first 100 ids, where
/// the special tokens usually are); another `salt` gives another prompt.
pub(super) fn prompt_tokens(vocab: usize, len: usize, salt: u32) -> Vec<u32> {
    let span = (vocab as u32).saturating_sub(100).max(1);
    (0..len as u32).map(|i| 100 + (i.wrapping_mul(7919).wrapping_add(salt.wrapping_mul(104_729))) % span).collect()
}

/// Prints a benchmark's report: as JSON with `--json`, else as text.
pub(super) fn emit<R: Serialize>(report: &R, json: bool, text: impl FnOnce(&R)) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        text(report);
    }
    Ok(())
}

fn print_report(r: &Report, layer_bytes: u64) {
    const MIB: f64 = 1024.0 * 1024.0;
    println!("model            {}", r.model);
    println!("threads          {}", r.threads);
    println!("prefill          {:.1} tokens/s (median)", r.prefill_tokens_per_s);
    println!("decode           {:.1} tokens/s (median)", r.decode_tokens_per_s);
    println!("peak memory      {:.1} MiB", r.peak_resident_bytes as f64 / MIB);
    if r.stages.is_empty() {
        return;
    }
    println!("stages, each loaded alone in a fresh process (all layers: {:.1} MiB):", layer_bytes as f64 / MIB);
    for s in &r.stages {
        println!(
            "  layers {:<8} {:>5.1} MiB of layers ({:.2} of all layers), {:>5.1} MiB with embedding/head, resident {:>5.1} MiB",
            s.layers,
            s.layer_bytes as f64 / MIB,
            s.layer_bytes as f64 / layer_bytes.max(1) as f64,
            s.weight_bytes as f64 / MIB,
            s.resident_bytes as f64 / MIB,
        );
    }
}

pub(super) fn last_token(outputs: &[StageOutput]) -> anyhow::Result<u32> {
    match outputs.last() {
        Some(StageOutput::Logits(l)) => Ok(strata_model::sampling::argmax(&l.to_vec1::<f32>()?)),
        _ => anyhow::bail!("the full stage returned no logits"),
    }
}

pub(super) fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(0.0)
}

pub fn even_ranges(layers: usize, parts: usize) -> Vec<Range<usize>> {
    if parts == 0 {
        return Vec::new();
    }
    (0..parts).map(|i| i * layers / parts..(i + 1) * layers / parts).collect()
}

fn parse_range(s: &str) -> anyhow::Result<Range<usize>> {
    let (a, b) = s.split_once("..").context("expected a range like 0..10")?;
    Ok(a.parse()?..b.parse()?)
}

fn measure_stage_here(file: &ModelFile, device: &strata_model::Device, layers: Range<usize>) -> anyhow::Result<()> {
    let before = proc_status_bytes(None, "VmRSS")?;
    let stage = Stage::load(file, layers, device, StageOptions::default())?;
    let after = proc_status_bytes(None, "VmRSS")?;
    println!("{} {}", stage.weight_bytes(), after.saturating_sub(before));
    Ok(())
}

fn measure_stage_in_child(args: &BenchArgs, layers: Range<usize>, file: &ModelFile) -> anyhow::Result<StageMemory> {
    let layer_bytes = file.sizes().layers[layers.clone()].iter().sum();
    let exe = std::env::current_exe()?;
    let out = Command::new(exe)
        .args(["bench", "--model", &args.model.model, "--device", &args.model.device, "--measure-stage"])
        .arg(format!("{}..{}", layers.start, layers.end))
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "measuring stage {layers:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    let mut fields = text.split_whitespace().map(str::parse::<u64>);
    match (fields.next(), fields.next()) {
        (Some(Ok(weight_bytes)), Some(Ok(resident_bytes))) => Ok(StageMemory {
            layers: format!("{}..{}", layers.start, layers.end),
            layer_bytes,
            weight_bytes,
            resident_bytes,
        }),
        _ => anyhow::bail!("unexpected output from the stage measurement: {text}"),
    }
}

/// A `/proc/<pid>/status` field in bytes, of this process for `None` (Linux).
pub(super) fn proc_status_bytes(pid: Option<u32>, field: &str) -> anyhow::Result<u64> {
    let path = pid.map_or_else(|| "/proc/self/status".to_string(), |pid| format!("/proc/{pid}/status"));
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let line = status.lines().find(|l| l.starts_with(field)).with_context(|| format!("no {field} in {path}"))?;
    let kib: u64 = line.split_whitespace().nth(1).context("malformed status line")?.parse()?;
    Ok(kib * 1024)
}

fn candle_core_threads() -> usize {
    candle_core::utils::get_num_threads()
}
