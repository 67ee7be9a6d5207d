//! `strata perplexity`: a model's perplexity on a text, and its KL divergence from a
//! base run's logits, computed and printed as `llama-perplexity` computes them, so a
//! strata figure stands next to a llama.cpp one. With `--coordinator` the text is
//! scored by a running cluster (each chunk a `/v1/completions` request with `echo`,
//! `logprobs` and `max_tokens: 0`), so a split is checked the same way.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use strata_model::logits_file::{BaseHeader, BaseReader, BaseWriter};
use strata_model::perplexity::{score_chunks, Chunking, KlDivergence, Perplexity};
use strata_model::stage::StageOptions;
use strata_model::{Stage, Tokenizer};

use super::ModelArgs;

#[derive(Debug, Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text to score (UTF-8). Not needed with `--kl-divergence-base`, whose file
    /// holds the tokens it scored.
    #[arg(short = 'f', long = "file", required_unless_present = "kl_divergence_base")]
    pub file: Option<PathBuf>,
    /// Tokens per chunk; the second half of each is scored.
    #[arg(short = 'c', long = "context", default_value_t = 512)]
    pub context: usize,
    /// Score at most this many chunks.
    #[arg(long)]
    pub chunks: Option<usize>,
    /// A base-logits file (what `llama-perplexity --kl-divergence-base FILE` writes):
    /// prints the KL divergence from it and how often the top tokens agree. Its tokens
    /// are scored, so both runs see the same ones.
    #[arg(long, value_name = "FILE")]
    pub kl_divergence_base: Option<PathBuf>,
    /// Save this run's logits as a base-logits file, in llama.cpp's format.
    #[arg(long, value_name = "FILE", conflicts_with = "kl_divergence_base")]
    pub save_logits: Option<PathBuf>,
    /// Score through the cluster this coordinator runs (its HTTP address, as
    /// `strata status --coordinator`), which must serve this model; the model file
    /// is only read for its tokenizer. Perplexity only: KL divergence needs every
    /// logit, which the API does not return.
    #[arg(
        long,
        value_name = "ADDRESS",
        value_parser = super::admin::coordinator_address,
        conflicts_with_all = ["kl_divergence_base", "save_logits"]
    )]
    pub coordinator: Option<String>,
    /// The coordinator's API key, where it asks for one (`strata serve --api-key`).
    #[arg(long, env = "STRATA_API_KEY", hide_env_values = true, value_name = "KEY")]
    pub api_key: Option<String>,
}

/// How long one chunk may take through a cluster.
const CHUNK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

pub fn run(args: PerplexityArgs) -> anyhow::Result<()> {
    let (file, device) = args.model.open()?;
    let tokenizer = Tokenizer::from_gguf(file.metadata())?;
    if let Some(coordinator) = &args.coordinator {
        return through_cluster(&args, coordinator, &tokenizer);
    }
    let mut stage = Stage::load(&file, 0..file.info().layers, &device, StageOptions::default())?;
    let bos = tokenizer.add_bos().then(|| tokenizer.bos_token()).flatten();
    let vocab = file.info().vocab_size;
    if let Some(base) = &args.kl_divergence_base {
        return kl_divergence(&mut stage, base, bos, vocab, args.chunks);
    }
    let (tokens, chunking) = read_chunks(&args, &tokenizer)?;
    let mut saving = match &args.save_logits {
        Some(path) => {
            let tokens = tokens[..chunking.count * chunking.context].to_vec();
            Some(BaseWriter::create(
                path,
                &BaseHeader { context: chunking.context, vocab, chunks: chunking.count, tokens },
            )?)
        }
        None => None,
    };
    let mut ppl = Perplexity::default();
    let per_chunk = chunking.scored_per_chunk();
    let mut stdout = std::io::stdout().lock();
    score_chunks(&mut stage, &tokens, bos, chunking, |chunk, row, target| {
        ppl.add(row, target);
        if let Some(w) = saving.as_mut() {
            w.write_row(row)?;
        }
        if ppl.count() == (chunk + 1) * per_chunk {
            print_running(&mut stdout, chunk, &ppl);
        }
        Ok(())
    })?;
    if let Some(w) = saving {
        w.finish()?;
    }
    print_final(&mut stdout, &ppl)
}

/// Reads the text, cuts it as llama-perplexity does, and reports the cut.
fn read_chunks(args: &PerplexityArgs, tokenizer: &Tokenizer) -> anyhow::Result<(Vec<u32>, Chunking)> {
    let path = args.file.as_ref().context("give the text to score with -f FILE")?;
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let tokens = tokenizer.encode(&text)?;
    let chunking = Chunking::new(tokens.len(), args.context, args.chunks)?;
    eprintln!(
        "{} tokens; {} chunks of {} ({} positions scored each)",
        tokens.len(),
        chunking.count,
        chunking.context,
        chunking.scored_per_chunk()
    );
    Ok((tokens, chunking))
}

/// The running figure after each chunk, as llama-perplexity prints it.
fn print_running(stdout: &mut impl Write, chunk: usize, ppl: &Perplexity) {
    let _ = write!(stdout, "[{}]{:.4},", chunk + 1, ppl.value()).and_then(|()| stdout.flush());
}

fn print_final(stdout: &mut impl Write, ppl: &Perplexity) -> anyhow::Result<()> {
    writeln!(stdout)?;
    match ppl.uncertainty() {
        Some(u) => writeln!(stdout, "Final estimate: PPL = {:.4} +/- {u:.5}", ppl.value())?,
        None => writeln!(stdout, "Final estimate: PPL = {:.4}", ppl.value())?,
    }
    Ok(())
}

/// Scores every chunk through the cluster: the prompt's logprobs come back for every
/// position, and the second half of each chunk is counted, as locally.
fn through_cluster(args: &PerplexityArgs, coordinator: &str, tokenizer: &Tokenizer) -> anyhow::Result<()> {
    use super::admin::call;
    let (tokens, chunking) = read_chunks(args, tokenizer)?;
    let bos = tokenizer.add_bos().then(|| tokenizer.bos_token()).flatten();
    let runtime = super::admin::runtime()?;
    let models = runtime.block_on(call(
        coordinator,
        args.api_key.as_deref(),
        "GET",
        "/v1/models",
        None,
        std::time::Duration::from_secs(10),
    ))?;
    let model = models["data"][0]["id"].as_str().context("the coordinator serves no model")?.to_owned();
    let first = chunking.first_scored();
    let mut ppl = Perplexity::default();
    let mut stdout = std::io::stdout().lock();
    for i in 0..chunking.count {
        let chunk = chunking.chunk(&tokens, i, bos);
        let body = serde_json::json!({
            "model": model, "prompt": chunk, "max_tokens": 0, "echo": true, "logprobs": 0,
            "return_tokens_as_token_ids": true,
        });
        let reply = runtime.block_on(call(
            coordinator,
            args.api_key.as_deref(),
            "POST",
            "/v1/completions",
            Some(body),
            CHUNK_TIMEOUT,
        ))?;
        let logprobs = reply["choices"][0]["logprobs"]["token_logprobs"]
            .as_array()
            .filter(|l| l.len() == chunk.len())
            .with_context(|| {
                format!("the coordinator returned no logprobs for chunk {} (is it serving {model}?)", i + 1)
            })?;
        // Position p's row predicts token p + 1, whose logprob is entry p + 1.
        for p in first..chunking.context - 1 {
            let logprob =
                logprobs[p + 1].as_f64().with_context(|| format!("chunk {}: no logprob at {}", i + 1, p + 1))?;
            ppl.add_nll(-logprob);
        }
        print_running(&mut stdout, i, &ppl);
    }
    print_final(&mut stdout, &ppl)
}

fn kl_divergence(
    stage: &mut Stage,
    base: &std::path::Path,
    bos: Option<u32>,
    vocab: usize,
    limit: Option<usize>,
) -> anyhow::Result<()> {
    let mut reader = BaseReader::open(base)?;
    let header = reader.header().clone();
    anyhow::ensure!(
        header.vocab == vocab,
        "{} was made with a vocabulary of {} tokens, this model has {vocab}",
        base.display(),
        header.vocab
    );
    let chunking = Chunking { context: header.context, count: limit.map_or(header.chunks, |l| l.min(header.chunks)) };
    eprintln!("{} chunks of {} from {}", chunking.count, chunking.context, base.display());
    let mut kld = KlDivergence::default();
    score_chunks(stage, &header.tokens, bos, chunking, |_, row, target| {
        kld.add(row, &reader.next_row()?, target);
        Ok(())
    })?;
    let s = kld.summary();
    println!("positions scored        : {}", s.positions);
    println!("Mean PPL(Q)             : {:.6}", s.ppl);
    println!("Mean PPL(base)          : {:.6}", s.ppl_base);
    println!("PPL(Q)/PPL(base)        : {:.6}", s.ppl / s.ppl_base);
    println!("Mean    KLD: {:10.6} ± {:10.6}", s.mean_kld, s.mean_kld_uncertainty);
    println!("Maximum KLD: {:10.6}", s.max_kld);
    println!("99.9%   KLD: {:10.6}", s.kld_p999);
    println!("99.0%   KLD: {:10.6}", s.kld_p99);
    println!("Median  KLD: {:10.6}", s.median_kld);
    println!("Same top p: {:6.3} ± {:5.3} %", 100.0 * s.same_top, 100.0 * s.same_top_uncertainty);
    Ok(())
}
