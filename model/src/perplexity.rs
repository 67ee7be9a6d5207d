//! Perplexity and KL divergence of a model on a text, computed the way llama.cpp's
//! `llama-perplexity` computes them, so that the two tools' figures compare directly.
//!
//! The tokens (a BOS first where the vocabulary asks for one) are cut into chunks of
//! `context` tokens; each chunk runs on its own from position 0 with its first token
//! replaced by the BOS, and only its second half is scored, so every scored position
//! has at least half a context of history: the logits at position `i` score token
//! `i + 1`, for `i` in `[context / 2, context - 1)`.
//!
//! Per position: the negative log-likelihood of the next token, from the largest
//! logit in f32 and the sum of `exp(logit - max)` in f64; perplexity is `exp` of the
//! mean. Against a base (the logits another run saved, [`crate::logits_file`]): the
//! KL divergence from the base distribution to this one, and whether both put the
//! same token on top.

use crate::logits_file::BaseRow;
use crate::stage::{Stage, StageInput, StageStep};

/// Scored positions whose logits are computed at once: bounds the memory of a large
/// vocabulary's logits (262144 f32 a row for Gemma 3).
const SCORED_AT_ONCE: usize = 32;

/// Runs every chunk of `tokens` through `stage` (the whole model) and hands each
/// scored position's logits to `scored` with the chunk index and the token they
/// predict, in order.
pub fn score_chunks(
    stage: &mut Stage,
    tokens: &[u32],
    bos: Option<u32>,
    chunking: Chunking,
    mut scored: impl FnMut(usize, &[f32], u32) -> crate::Result<()>,
) -> crate::Result<()> {
    let first = chunking.first_scored();
    for i in 0..chunking.count {
        let chunk = chunking.chunk(tokens, i, bos);
        let seq = i as u64;
        // The first half only feeds the cache; its logits are never scored.
        stage.forward(&[StageStep { seq, position: 0, input: StageInput::Tokens(chunk[..first].to_vec()) }])?;
        let mut position = first;
        while position < chunking.context - 1 {
            let len = SCORED_AT_ONCE.min(chunking.context - 1 - position);
            let step = StageStep { seq, position, input: StageInput::Tokens(chunk[position..position + len].to_vec()) };
            let logits = stage.forward_every_position(&step)?;
            for (row, target) in logits.to_vec2::<f32>()?.iter().zip(&chunk[position + 1..position + 1 + len]) {
                scored(i, row, *target)?;
            }
            position += len;
        }
        stage.release(seq);
    }
    Ok(())
}

/// The chunks a text of `tokens` is scored in: `count` runs of `context` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunking {
    pub context: usize,
    pub count: usize,
}

impl Chunking {
    /// As llama.cpp cuts: whole chunks only, at most `limit` of them, and the text
    /// must hold at least two.
    pub fn new(tokens: usize, context: usize, limit: Option<usize>) -> crate::Result<Self> {
        if context < 4 {
            return Err(crate::Error::BadInput(format!("a context of {context} tokens is too short to score")));
        }
        if tokens < 2 * context {
            return Err(crate::Error::TextTooShort { tokens, context, needed: 2 * context });
        }
        let whole = tokens / context;
        Ok(Self { context, count: limit.map_or(whole, |l| l.min(whole)) })
    }

    /// The first position whose logits are scored.
    pub fn first_scored(&self) -> usize {
        self.context / 2
    }

    /// Positions scored per chunk.
    pub fn scored_per_chunk(&self) -> usize {
        self.context - 1 - self.first_scored()
    }

    /// Chunk `i` as it runs: its tokens with the first replaced by `bos`, when there is one.
    pub fn chunk(&self, tokens: &[u32], i: usize, bos: Option<u32>) -> Vec<u32> {
        let mut chunk = tokens[i * self.context..(i + 1) * self.context].to_vec();
        if let Some(bos) = bos {
            chunk[0] = bos;
        }
        chunk
    }
}

/// The largest logit (the first of equals), where it is, and `Σ exp(logit - max)`.
struct RowStats {
    max: f32,
    argmax: usize,
    sum_exp: f64,
}

fn row_stats(logits: &[f32]) -> RowStats {
    let (mut max, mut argmax) = (logits[0], 0);
    for (i, &l) in logits.iter().enumerate().skip(1) {
        if l > max {
            (max, argmax) = (l, i);
        }
    }
    let sum_exp = logits.iter().map(|&l| f64::from((l - max).exp())).sum();
    RowStats { max, argmax, sum_exp }
}

/// One position scored: the log-probability of the token that follows it, and the
/// most likely tokens with theirs (the argmax first; equal logits keep the lower id
/// first). Computed as [`Perplexity::add`] computes it, so a perplexity summed from
/// `-logprob` equals one summed from the logits.
#[derive(Debug, Clone, PartialEq)]
pub struct RowScore {
    pub logprob: f64,
    pub top: Vec<(u32, f64)>,
}

/// Scores `target` under one position's `logits`, with its `top_k` most likely tokens
/// (at least the argmax). `None` when `target` is not in the vocabulary.
pub fn score_row(logits: &[f32], target: u32, top_k: usize) -> Option<RowScore> {
    let target_logit = *logits.get(target as usize)?;
    let RowStats { max, argmax, sum_exp } = row_stats(logits);
    let ln_sum = sum_exp.ln();
    let logprob = |l: f32| f64::from(l - max) - ln_sum;
    let mut top = vec![(argmax as u32, logprob(max))];
    if top_k > 1 {
        let mut ids: Vec<u32> = (0..logits.len() as u32).filter(|&i| i as usize != argmax).collect();
        let k = (top_k - 1).min(ids.len());
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
        if k < ids.len() {
            ids.select_nth_unstable_by(k, by_logit);
            ids.truncate(k);
        }
        ids.sort_by(by_logit);
        top.extend(ids.into_iter().map(|i| (i, logprob(logits[i as usize]))));
    }
    Some(RowScore { logprob: logprob(target_logit), top })
}

/// Running perplexity over the scored positions.
#[derive(Debug, Clone, Default)]
pub struct Perplexity {
    nll: f64,
    nll2: f64,
    count: usize,
}

impl Perplexity {
    /// Scores `target` under one position's `logits`; returns its negative log-likelihood.
    pub fn add(&mut self, logits: &[f32], target: u32) -> f64 {
        let RowStats { max, sum_exp, .. } = row_stats(logits);
        let nll = -(f64::from(logits[target as usize] - max) - sum_exp.ln());
        self.add_nll(nll);
        nll
    }

    /// Adds one position's negative log-likelihood computed elsewhere (by
    /// [`score_row`], for instance on a pipeline's last stage).
    pub fn add_nll(&mut self, nll: f64) {
        self.nll += nll;
        self.nll2 += nll * nll;
        self.count += 1;
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn value(&self) -> f64 {
        (self.nll / self.count.max(1) as f64).exp()
    }

    /// The standard error of the perplexity, as llama.cpp prints it after `+/-`.
    pub fn uncertainty(&self) -> Option<f64> {
        let n = self.count as f64;
        let mean = self.nll / n;
        let var = self.nll2 / n - mean * mean;
        (var > 0.0 && self.count > 1).then(|| (var / (n - 1.0)).sqrt() * self.value())
    }
}

/// Running comparison with a base run, position by position.
#[derive(Debug, Clone, Default)]
pub struct KlDivergence {
    sum_nll: f64,
    sum_nll_base: f64,
    sum_kld: f64,
    sum_kld2: f64,
    same_top: usize,
    kld: Vec<f32>,
}

/// What [`KlDivergence`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct KlSummary {
    pub positions: usize,
    pub ppl: f64,
    pub ppl_base: f64,
    pub mean_kld: f64,
    pub mean_kld_uncertainty: f64,
    pub median_kld: f32,
    pub kld_p99: f32,
    pub kld_p999: f32,
    pub max_kld: f32,
    /// Share of positions whose top token is the base's.
    pub same_top: f64,
    pub same_top_uncertainty: f64,
}

impl KlDivergence {
    /// Compares one position's `logits` with the base's, scoring `target`.
    pub fn add(&mut self, logits: &[f32], base: &BaseRow<'_>, target: u32) {
        let RowStats { max, argmax, sum_exp } = row_stats(logits);
        let log_sum_exp = sum_exp.ln() as f32;
        let nll = max + log_sum_exp - logits[target as usize];
        let nll_base = -base.log_prob(target as usize);
        self.sum_nll += f64::from(nll);
        self.sum_nll_base += f64::from(nll_base);
        // KL(base ‖ this) over the tokens the base gives more than e^-16.
        let log_norm = max + log_sum_exp;
        let mut kld = 0f64;
        let (mut base_top, mut base_top_log_prob) = (0, f32::NEG_INFINITY);
        for (i, &l) in logits.iter().enumerate() {
            let log_p_base = base.log_prob(i);
            if i == 0 || log_p_base > base_top_log_prob {
                (base_top, base_top_log_prob) = (i, log_p_base);
            }
            if log_p_base > -16.0 {
                kld += f64::from(log_p_base.exp() * (log_p_base - l + log_norm));
            }
        }
        self.sum_kld += kld;
        self.sum_kld2 += kld * kld;
        self.kld.push(kld as f32);
        if argmax == base_top {
            self.same_top += 1;
        }
    }

    pub fn summary(&self) -> KlSummary {
        let n = self.kld.len().max(1) as f64;
        let mean = self.sum_kld / n;
        let var = self.sum_kld2 / n - mean * mean;
        let mean_kld_uncertainty = if var > 0.0 && self.kld.len() > 10 { (var / (n - 1.0)).sqrt() } else { 0.0 };
        let mut sorted = self.kld.clone();
        sorted.sort_by(f32::total_cmp);
        let same_top = self.same_top as f64 / n;
        KlSummary {
            positions: self.kld.len(),
            ppl: (self.sum_nll / n).exp(),
            ppl_base: (self.sum_nll_base / n).exp(),
            mean_kld: mean,
            mean_kld_uncertainty,
            median_kld: percentile(&sorted, 0.5),
            kld_p99: percentile(&sorted, 0.99),
            kld_p999: percentile(&sorted, 0.999),
            max_kld: sorted.last().copied().unwrap_or(0.0),
            same_top,
            same_top_uncertainty: (same_top * (1.0 - same_top) / (n - 1.0).max(1.0)).sqrt(),
        }
    }
}

/// The value at `fraction` of sorted `values`, interpolating linearly between ranks.
pub fn percentile(sorted: &[f32], fraction: f32) -> f32 {
    let Some(&last) = sorted.last() else { return 0.0 };
    if fraction <= 0.0 {
        return sorted[0];
    }
    if fraction >= 1.0 {
        return last;
    }
    let at = fraction * (sorted.len() - 1) as f32;
    let (i, t) = (at as usize, at.fract());
    (1.0 - t) * sorted[i] + t * sorted[(i + 1).min(sorted.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logits_file::encode_row;

    #[test]
    fn chunks_are_whole_and_need_two() {
        assert_eq!(Chunking::new(1100, 512, None).unwrap().count, 2);
        assert_eq!(Chunking::new(5000, 512, Some(3)).unwrap().count, 3);
        assert!(matches!(Chunking::new(1000, 512, None), Err(crate::Error::TextTooShort { needed: 1024, .. })));
        let c = Chunking::new(1100, 512, None).unwrap();
        assert_eq!((c.first_scored(), c.scored_per_chunk()), (256, 255));
        let tokens: Vec<u32> = (0..1100).collect();
        assert_eq!(c.chunk(&tokens, 1, Some(7))[..3], [7, 513, 514]);
        assert_eq!(c.chunk(&tokens, 1, None)[0], 512);
    }

    #[test]
    fn perplexity_of_a_uniform_guess_is_the_vocabulary_size() {
        let mut ppl = Perplexity::default();
        for t in 0..10 {
            ppl.add(&[0.5; 50], t);
        }
        assert!((ppl.value() - 50.0).abs() < 1e-9, "{}", ppl.value());
        assert!(ppl.uncertainty().is_none_or(|u| u < 1e-5), "no spread");
        // A sure, right guess scores 1.
        let mut sure = Perplexity::default();
        sure.add(&[0.0, 100.0, 0.0], 1);
        assert!((sure.value() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn a_model_against_itself_diverges_by_nothing_and_agrees_on_top() {
        let rows: Vec<Vec<f32>> =
            (0..20).map(|r| (0..64).map(|i| ((i * 7 + r * 13) % 23) as f32 * 0.3 - 2.0).collect()).collect();
        let mut same = KlDivergence::default();
        let mut shifted = KlDivergence::default();
        for (r, row) in rows.iter().enumerate() {
            let encoded = encode_row(row);
            let base = BaseRow::decode(&encoded, row.len());
            same.add(row, &base, (r % 64) as u32);
            // Flatter: the same order, so the same top, but a different distribution.
            let flat: Vec<f32> = row.iter().map(|x| x * 0.5).collect();
            shifted.add(&flat, &base, (r % 64) as u32);
        }
        let s = same.summary();
        // The base is stored in 16 bits per token: within that rounding of 0.
        assert!(s.mean_kld.abs() < 1e-5 && s.same_top == 1.0, "{s:?}");
        assert!((s.ppl / s.ppl_base - 1.0).abs() < 1e-3, "{s:?}");
        let t = shifted.summary();
        assert!(t.mean_kld > 0.01 && t.same_top == 1.0 && t.kld_p99 >= t.median_kld, "{t:?}");
    }

    #[test]
    fn chunks_are_scored_from_their_middle_with_a_bos_first() {
        let dir = tempfile::tempdir().unwrap();
        let spec = crate::synthetic::SyntheticModel::gemma3_tiny();
        let file = crate::ModelFile::open(spec.write_to(dir.path()).unwrap()).unwrap();
        let mut stage = Stage::load(&file, 0..spec.layers, &candle_core::Device::Cpu, Default::default()).unwrap();
        let tokens: Vec<u32> = (0..90).map(|i| (i * 37 % 250) as u32).collect();
        let chunking = Chunking::new(tokens.len(), 40, None).unwrap();
        let mut seen = Vec::new();
        let mut ppl = Perplexity::default();
        score_chunks(&mut stage, &tokens, Some(1), chunking, |chunk, row, target| {
            seen.push((chunk, target));
            ppl.add(row, target);
            Ok(())
        })
        .unwrap();
        // Two chunks, positions 20..39 of each scoring tokens 21..=39.
        let tokens_ref = &tokens;
        let want: Vec<(usize, u32)> =
            (0..2).flat_map(|c| (21..40).map(move |p| (c, tokens_ref[c * 40 + p]))).collect();
        assert_eq!(seen, want);
        assert!(ppl.value().is_finite() && ppl.value() > 1.0);
        // A row is the logits a run of the chunk up to there ends with.
        let mut rows = Vec::new();
        let mut again = Stage::load(&file, 0..spec.layers, &candle_core::Device::Cpu, Default::default()).unwrap();
        score_chunks(&mut again, &tokens, Some(1), chunking, |c, r, _| {
            if c == 1 {
                rows.push(r.to_vec());
            }
            Ok(())
        })
        .unwrap();
        let mut chunk = chunking.chunk(&tokens, 1, Some(1));
        chunk.truncate(26);
        let step = StageStep { seq: 9, position: 0, input: StageInput::Tokens(chunk) };
        let Some(crate::StageOutput::Logits(want)) = again.forward(&[step]).unwrap().pop() else { panic!("no logits") };
        let want = want.to_vec1::<f32>().unwrap();
        let max_diff = rows[25 - 20].iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(max_diff < 1e-4, "{max_diff}");
    }

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let v = [0.0, 1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 0.5), 2.0);
        assert!((percentile(&v, 0.99) - 3.96).abs() < 1e-5);
        assert_eq!((percentile(&v, 0.0), percentile(&v, 1.0), percentile(&[], 0.5)), (0.0, 4.0, 0.0));
    }
}
