//! `strata perplexity`: a model's perplexity on a text, and its KL divergence from a
//! base run's logits, computed and printed as `llama-perplexity` computes them, so a
//! strata figure stands next to a llama.cpp one.

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
}

pub fn run(args: PerplexityArgs) -> anyhow::Result<()> {
    let (file, device) = args.model.open()?;
    let tokenizer = Tokenizer::from_gguf(file.metadata())?;
    let mut stage = Stage::load(&file, 0..file.info().layers, &device, StageOptions::default())?;
    let bos = tokenizer.add_bos().then(|| tokenizer.bos_token()).flatten();
    let vocab = file.info().vocab_size;
    if let Some(base) = &args.kl_divergence_base {
        return kl_divergence(&mut stage, base, bos, vocab, args.chunks);
    }
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
    let mut saving = match &args.save_logits {
        Some(path) => {
            let tokens = tokens[..chunking.count * chunking.context].to_vec();
            Some(BaseWriter::create(path, &BaseHeader { context: chunking.context, vocab, chunks: chunking.count, tokens })?)
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
            // The running figure after each chunk, as llama-perplexity prints it.
            let _ = write!(stdout, "[{}]{:.4},", chunk + 1, ppl.value()).and_then(|()| stdout.flush());
        }
        Ok(())
    })?;
    writeln!(stdout)?;
    if let Some(w) = saving {
        w.finish()?;
    }
    match ppl.uncertainty() {
        Some(u) => writeln!(stdout, "Final estimate: PPL = {:.4} +/- {u:.5}", ppl.value())?,
        None => writeln!(stdout, "Final estimate: PPL = {:.4}", ppl.value())?,
    }
    Ok(())
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
