//! The base-logits file `llama-perplexity --kl-divergence-base FILE` writes, read and
//! written here so that strata's logits can be compared with llama.cpp's (or with
//! another strata run's) as llama.cpp compares its own.
//!
//! Layout, little-endian: the magic `_logits_`; the context (u32), the vocabulary
//! size and the chunk count (i32 each); the tokens of every chunk (i32 each); then,
//! for every scored position of every chunk in order, one row of `2 * ((vocab + 1)
//! / 2) + 4` u16 slots: the first four hold two f32, a scale and the smallest log-
//! probability kept (16 below the largest at most), and slot `4 + i` token `i`'s
//! log-probability as `min + scale * q`, 0 meaning "at or below the smallest".

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"_logits_";

/// How far below the top log-probability a row keeps detail.
const KEPT_RANGE: f32 = 16.0;

/// The u16 slots of one row for a vocabulary of `vocab` tokens.
fn row_slots(vocab: usize) -> usize {
    2 * vocab.div_ceil(2) + 4
}

/// What the file says before the rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseHeader {
    pub context: usize,
    pub vocab: usize,
    pub chunks: usize,
    /// `chunks * context` token ids, as the base run tokenized the text.
    pub tokens: Vec<u32>,
}

/// One decoded row: token `i`'s log-probability under the base.
#[derive(Debug, Clone)]
pub struct BaseRow<'a> {
    scale: f32,
    min_log_prob: f32,
    quantized: &'a [u16],
}

impl<'a> BaseRow<'a> {
    /// A row from its slots (as [`encode_row`] makes them) for `vocab` tokens.
    pub fn decode(slots: &'a [u16], vocab: usize) -> Self {
        let f = |i: usize| f32::from_bits(u32::from(slots[i]) | (u32::from(slots[i + 1]) << 16));
        Self { scale: f(0), min_log_prob: f(2), quantized: &slots[4..4 + vocab] }
    }

    pub fn log_prob(&self, token: usize) -> f32 {
        self.scale * f32::from(self.quantized[token]) + self.min_log_prob
    }
}

/// The slots of one row for `logits`: log-probabilities kept to 16 bits over the top
/// 16 nats, as llama.cpp stores them.
pub fn encode_row(logits: &[f32]) -> Vec<u16> {
    let (mut max, mut min) = (logits[0], logits[0]);
    for &l in &logits[1..] {
        max = max.max(l);
        min = min.min(l);
    }
    let min = min.max(max - KEPT_RANGE);
    let sum_exp: f64 = logits.iter().map(|&l| f64::from((l - max).exp())).sum();
    let log_sum_exp = sum_exp.ln() as f32;
    let min_log_prob = min - max - log_sum_exp;
    let scale = (max - min) / 65535.0;
    let mut slots = vec![0u16; row_slots(logits.len())];
    for (i, bits) in [scale.to_bits(), min_log_prob.to_bits()].into_iter().enumerate() {
        slots[2 * i] = bits as u16;
        slots[2 * i + 1] = (bits >> 16) as u16;
    }
    if scale > 0.0 {
        let inv = 1.0 / scale;
        for (slot, &l) in slots[4..].iter_mut().zip(logits) {
            *slot = if l > min { (inv * (l - min)).round_ties_even() as u16 } else { 0 };
        }
    }
    slots
}

/// Reads a base file row by row.
pub struct BaseReader {
    path: PathBuf,
    reader: BufReader<File>,
    header: BaseHeader,
    row: Vec<u16>,
    bytes: Vec<u8>,
}

impl BaseReader {
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::LogitsFile { path: path.to_path_buf(), reason };
        let file = File::open(path).map_err(|e| bad(e.to_string()))?;
        let mut reader = BufReader::new(file);
        let mut magic = [0u8; 8];
        reader.read_exact(&mut magic).map_err(|_| bad("not a base-logits file (too short)".into()))?;
        if &magic != MAGIC {
            return Err(bad("not a base-logits file (no `_logits_` magic)".into()));
        }
        let mut word = || -> Result<u32> {
            let mut b = [0u8; 4];
            reader.read_exact(&mut b).map_err(|_| bad("the header is cut short".into()))?;
            Ok(u32::from_le_bytes(b))
        };
        let (context, vocab, chunks) = (word()? as usize, word()? as i32, word()? as i32);
        if context < 4 || vocab <= 0 || chunks <= 0 {
            return Err(bad(format!("the header says context {context}, vocabulary {vocab}, {chunks} chunks")));
        }
        let (vocab, chunks) = (vocab as usize, chunks as usize);
        // The header's sizes must fit the file before anything is allocated for them.
        let file_len = reader.get_ref().metadata().map_err(|e| bad(e.to_string()))?.len();
        let token_bytes = chunks.checked_mul(context).and_then(|n| n.checked_mul(4));
        match token_bytes {
            Some(n) if (n as u64) < file_len => {}
            _ => return Err(bad(format!("the header's {chunks} chunks of {context} tokens do not fit the file"))),
        }
        let mut raw = vec![0u8; chunks * context * 4];
        reader.read_exact(&mut raw).map_err(|_| bad("the tokens are cut short".into()))?;
        let tokens: Vec<u32> = raw.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(bad(format!("token {t} is outside the vocabulary of {vocab}")));
        }
        let slots = row_slots(vocab);
        Ok(Self {
            path: path.to_path_buf(),
            reader,
            header: BaseHeader { context, vocab, chunks, tokens },
            row: vec![0; slots],
            bytes: vec![0; slots * 2],
        })
    }

    pub fn header(&self) -> &BaseHeader {
        &self.header
    }

    /// The next scored position's row.
    pub fn next_row(&mut self) -> Result<BaseRow<'_>> {
        self.reader.read_exact(&mut self.bytes).map_err(|_| Error::LogitsFile {
            path: self.path.clone(),
            reason: "it ends before its last scored position".into(),
        })?;
        for (slot, b) in self.row.iter_mut().zip(self.bytes.chunks_exact(2)) {
            *slot = u16::from_le_bytes([b[0], b[1]]);
        }
        Ok(BaseRow::decode(&self.row, self.header.vocab))
    }
}

/// Writes a base file: the header, then one row per scored position.
pub struct BaseWriter {
    path: PathBuf,
    writer: BufWriter<File>,
}

impl BaseWriter {
    pub fn create(path: &Path, header: &BaseHeader) -> Result<Self> {
        let bad = |e: std::io::Error| Error::LogitsFile { path: path.to_path_buf(), reason: e.to_string() };
        let mut writer = BufWriter::new(File::create(path).map_err(bad)?);
        let mut head = MAGIC.to_vec();
        for word in [header.context as u32, header.vocab as u32, header.chunks as u32] {
            head.extend(word.to_le_bytes());
        }
        head.extend(header.tokens.iter().flat_map(|t| t.to_le_bytes()));
        writer.write_all(&head).map_err(bad)?;
        Ok(Self { path: path.to_path_buf(), writer })
    }

    pub fn write_row(&mut self, logits: &[f32]) -> Result<()> {
        let bytes: Vec<u8> = encode_row(logits).iter().flat_map(|s| s.to_le_bytes()).collect();
        self.writer.write_all(&bytes).map_err(|e| Error::LogitsFile { path: self.path.clone(), reason: e.to_string() })
    }

    pub fn finish(mut self) -> Result<()> {
        self.writer.flush().map_err(|e| Error::LogitsFile { path: self.path.clone(), reason: e.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_keep_log_probabilities_to_sixteen_bits_over_the_top_sixteen_nats() {
        let logits: Vec<f32> = (0..101).map(|i| (i as f32 * 0.37).sin() * 9.0).collect();
        let slots = encode_row(&logits);
        assert_eq!(slots.len(), 2 * 51 + 4);
        let row = BaseRow::decode(&slots, logits.len());
        let max = logits.iter().copied().fold(f32::MIN, f32::max);
        let log_z = logits.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>().ln() as f32 + max;
        for (i, &l) in logits.iter().enumerate() {
            let want = l - log_z;
            if l > max - 15.9 {
                assert!((row.log_prob(i) - want).abs() < 3e-4, "token {i}: {} vs {want}", row.log_prob(i));
            }
        }
    }

    #[test]
    fn a_written_file_reads_back_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("base.bin");
        let header = BaseHeader { context: 8, vocab: 5, chunks: 2, tokens: (0..16).map(|t| t % 5).collect() };
        let mut w = BaseWriter::create(&path, &header).unwrap();
        let rows = [[0.0, 1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0, 0.0]];
        for r in &rows {
            w.write_row(r).unwrap();
        }
        w.finish().unwrap();
        let mut r = BaseReader::open(&path).unwrap();
        assert_eq!(r.header(), &header);
        // ln softmax of the top logit of 0..=4: 4 - ln(e^0 + … + e^4) = -0.4519.
        assert!((r.next_row().unwrap().log_prob(4) + 0.4519).abs() < 1e-3);
        assert!((r.next_row().unwrap().log_prob(0) + 0.4519).abs() < 1e-3);
        assert!(matches!(r.next_row(), Err(Error::LogitsFile { reason, .. }) if reason.contains("ends before")));
        std::fs::write(&path, b"_logitz_").unwrap();
        assert!(matches!(BaseReader::open(&path), Err(Error::LogitsFile { reason, .. }) if reason.contains("magic")));
        std::fs::write(&path, b"_logits_\x08\0\0\0").unwrap();
        assert!(matches!(BaseReader::open(&path), Err(Error::LogitsFile { reason, .. }) if reason.contains("cut short")));
        let mut huge = b"_logits_".to_vec();
        for w in [u32::MAX, 5, i32::MAX as u32] {
            huge.extend(w.to_le_bytes());
        }
        std::fs::write(&path, &huge).unwrap();
        assert!(matches!(BaseReader::open(&path), Err(Error::LogitsFile { reason, .. }) if reason.contains("do not fit")));
        let mut bad_token = b"_logits_".to_vec();
        for w in [4u32, 3, 1, 0, 1, 2, 9] {
            bad_token.extend(w.to_le_bytes());
        }
        std::fs::write(&path, &bad_token).unwrap();
        assert!(matches!(BaseReader::open(&path), Err(Error::LogitsFile { reason, .. }) if reason.contains("token 9")));
    }
}
