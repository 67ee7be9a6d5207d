//! Choosing the next token from logits.
//!
//! A sampler keeps no state between tokens: the random draw for the token at a given
//! position is seeded from the request's seed and that position. A sequence replayed
//! on another stage after a failure therefore draws exactly the same tokens.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What a request asks of the sampler; travels with the sequence to the last stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    /// 1.0 disables it; applied llama.cpp-style to the last `repeat_last_n` tokens.
    pub repetition_penalty: f32,
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self { temperature: 0.0, top_k: None, top_p: None, min_p: None, repetition_penalty: 1.0, repeat_last_n: 64, seed: 0 }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::BadSampling(m));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(format!("temperature must be a finite number >= 0, got {}", self.temperature));
        }
        if self.top_k == Some(0) {
            return bad("top_k must be at least 1".into());
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return bad(format!("top_p must be in (0, 1], got {p}"));
            }
        }
        if let Some(p) = self.min_p {
            if !(0.0..=1.0).contains(&p) {
                return bad(format!("min_p must be in [0, 1], got {p}"));
            }
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad(format!("repetition_penalty must be > 0, got {}", self.repetition_penalty));
        }
        Ok(())
    }
}

/// The sampling method, decided once from the parameters.
#[derive(Debug, Clone, PartialEq)]
enum Method {
    Greedy,
    Random { temperature: f32, top_k: Option<usize>, top_p: Option<f32>, min_p: Option<f32> },
}

#[derive(Debug, Clone)]
pub struct Sampler {
    method: Method,
    repetition_penalty: f32,
    repeat_last_n: usize,
    seed: u64,
}

impl Sampler {
    pub fn new(params: &SamplingParams) -> Result<Self> {
        params.validate()?;
        let method = if params.temperature == 0.0 || params.top_k == Some(1) {
            Method::Greedy
        } else {
            Method::Random { temperature: params.temperature, top_k: params.top_k, top_p: params.top_p, min_p: params.min_p }
        };
        Ok(Self { method, repetition_penalty: params.repetition_penalty, repeat_last_n: params.repeat_last_n, seed: params.seed })
    }

    /// Picks the token at `position` from `logits`; `history` is every token of the
    /// sequence so far (prompt included), used by the repetition penalty.
    pub fn sample(&self, logits: &[f32], history: &[u32], position: usize) -> Result<u32> {
        if matches!(self.method, Method::Greedy) && self.repetition_penalty == 1.0 && !logits.is_empty() {
            // Nothing to change in the logits: no copy of them.
            return Ok(argmax(logits));
        }
        self.sample_owned(logits.to_vec(), history, position)
    }

    /// As [`Sampler::sample`], on logits the caller made for it (a masked copy):
    /// they are changed in place rather than copied once more.
    pub fn sample_owned(&self, mut logits: Vec<f32>, history: &[u32], position: usize) -> Result<u32> {
        if logits.is_empty() {
            return Err(Error::BadInput("no logits to sample from".into()));
        }
        if self.repetition_penalty != 1.0 {
            let recent = &history[history.len().saturating_sub(self.repeat_last_n)..];
            let mut seen = std::collections::HashSet::new();
            for &t in recent {
                if let Some(l) = logits.get_mut(t as usize) {
                    if seen.insert(t) {
                        *l = if *l > 0.0 { *l / self.repetition_penalty } else { *l * self.repetition_penalty };
                    }
                }
            }
        }
        match &self.method {
            Method::Greedy => Ok(argmax(&logits)),
            Method::Random { temperature, top_k, top_p, min_p } => {
                let mut candidates: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
                candidates.sort_by(|a, b| b.1.total_cmp(&a.1));
                if let Some(k) = top_k {
                    candidates.truncate(*k);
                }
                softmax_in_place(&mut candidates, 1.0);
                if let Some(p) = top_p {
                    let mut total = 0.0;
                    let keep = candidates
                        .iter()
                        .position(|&(_, prob)| {
                            total += prob;
                            total >= *p
                        })
                        .map_or(candidates.len(), |i| i + 1);
                    candidates.truncate(keep.max(1));
                }
                if let Some(p) = min_p {
                    let floor = candidates[0].1 * p;
                    candidates.retain(|&(_, prob)| prob >= floor);
                }
                // Temperature applies to the surviving logits, as in llama.cpp's chain.
                for c in candidates.iter_mut() {
                    c.1 = logits[c.0 as usize] / temperature;
                }
                softmax_in_place(&mut candidates, 1.0);
                let mut rng = StdRng::seed_from_u64(mix(self.seed, position as u64));
                let mut r: f32 = rng.random();
                for &(id, prob) in &candidates {
                    if r < prob {
                        return Ok(id);
                    }
                    r -= prob;
                }
                Ok(candidates.last().map_or(0, |c| c.0))
            }
        }
    }
}

/// The index of the largest logit, the first of equal ones; a NaN never wins (0 if
/// every logit is NaN). Sixteen running maxima, which the compiler keeps in vector
/// registers, then a scan for the first index holding the maximum: on Gemma 3's
/// 262,144 logits about a tenth of the time of one comparison chain through them
/// (144 µs), which was a percent or two of its decode step.
pub fn argmax(logits: &[f32]) -> u32 {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (best, &l) in lanes.iter_mut().zip(chunk) {
            *best = if l > *best { l } else { *best };
        }
    }
    let max = lanes.iter().chain(rest).fold(f32::NEG_INFINITY, |m, &l| if l > m { l } else { m });
    logits.iter().position(|&l| l == max).unwrap_or(0) as u32
}

fn softmax_in_place(c: &mut [(u32, f32)], temperature: f32) {
    let max = c.iter().map(|x| x.1).fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for x in c.iter_mut() {
        // libm's expf: a token sampled on a Windows stage equals one sampled on Linux.
        x.1 = libm::expf((x.1 - max) / temperature);
        sum += x.1;
    }
    for x in c.iter_mut() {
        x.1 /= sum;
    }
}

/// SplitMix64 of the seed and position: independent streams per position.
fn mix(seed: u64, position: u64) -> u64 {
    let mut z = seed ^ position.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first index of the maximum at every length around the 16 lanes, with ties,
    /// NaNs and infinities, as a plain scan finds it.
    #[test]
    fn argmax_is_the_first_largest() {
        let scan = |v: &[f32]| {
            let mut best: Option<usize> = None;
            for (i, &l) in v.iter().enumerate() {
                if !l.is_nan() && best.is_none_or(|b| l > v[b]) {
                    best = Some(i);
                }
            }
            best.unwrap_or(0) as u32
        };
        for n in [1usize, 2, 15, 16, 17, 31, 33, 100] {
            for seed in 0..20u32 {
                let v: Vec<f32> =
                    (0..n as u32).map(|i| ((i.wrapping_mul(2654435761) ^ seed.wrapping_mul(97)) % 7) as f32).collect();
                assert_eq!(argmax(&v), scan(&v), "{v:?}");
                let mut w = v.clone();
                w[(seed as usize) % n] = f32::NAN;
                assert_eq!(argmax(&w), scan(&w), "{w:?}");
            }
        }
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY, -1.0]), 2);
        assert_eq!(argmax(&[f32::NAN, 1.0, f32::INFINITY, f32::INFINITY]), 2);
    }

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams { temperature, seed: 42, ..SamplingParams::greedy() }
    }

    #[test]
    fn greedy_takes_the_largest_logit() {
        let s = Sampler::new(&SamplingParams::greedy()).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9], &[], 0).unwrap(), 1);
    }

    #[test]
    fn a_seed_makes_sampling_reproducible_per_position() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let s = Sampler::new(&params(1.0)).unwrap();
        let a: Vec<u32> = (0..20).map(|p| s.sample(&logits, &[], p).unwrap()).collect();
        let b: Vec<u32> = (0..20).map(|p| s.sample(&logits, &[], p).unwrap()).collect();
        assert_eq!(a, b);
        assert!(a.iter().any(|&t| t != a[0]), "draws should vary with position: {a:?}");
        let other = Sampler::new(&SamplingParams { seed: 43, ..params(1.0) }).unwrap();
        let c: Vec<u32> = (0..20).map(|p| other.sample(&logits, &[], p).unwrap()).collect();
        assert_ne!(a, c);
    }

    #[test]
    fn filters_restrict_the_candidates() {
        let logits = [5.0, 4.9, 0.0, -3.0];
        let top_k = Sampler::new(&SamplingParams { top_k: Some(2), ..params(2.0) }).unwrap();
        let top_p = Sampler::new(&SamplingParams { top_p: Some(0.5), ..params(2.0) }).unwrap();
        let min_p = Sampler::new(&SamplingParams { min_p: Some(0.5), ..params(2.0) }).unwrap();
        for p in 0..200 {
            assert!(top_k.sample(&logits, &[], p).unwrap() < 2);
            assert_eq!(top_p.sample(&logits, &[], p).unwrap(), 0);
            assert!(min_p.sample(&logits, &[], p).unwrap() < 2);
        }
    }

    #[test]
    fn repetition_penalty_discourages_recent_tokens() {
        let s = Sampler::new(&SamplingParams { repetition_penalty: 2.0, ..SamplingParams::greedy() }).unwrap();
        assert_eq!(s.sample(&[3.0, 2.0], &[0], 0).unwrap(), 1);
        assert_eq!(s.sample(&[3.0, 2.0], &[1], 0).unwrap(), 0);
    }

    #[test]
    fn bad_parameters_are_refused() {
        for p in [
            SamplingParams { temperature: -1.0, ..params(1.0) },
            SamplingParams { temperature: f32::NAN, ..params(1.0) },
            SamplingParams { top_p: Some(0.0), ..params(1.0) },
            SamplingParams { min_p: Some(1.5), ..params(1.0) },
            SamplingParams { top_k: Some(0), ..params(1.0) },
            SamplingParams { repetition_penalty: 0.0, ..params(1.0) },
        ] {
            assert!(matches!(Sampler::new(&p), Err(Error::BadSampling(_))), "{p:?}");
        }
    }
}
