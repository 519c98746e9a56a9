//! Tokenizers: the [`Tokenizer`] trait and its implementations.
//!
//! - [`HfTokenizer`]: a Hugging Face `tokenizers::Tokenizer`, read from a `tokenizer.json` or
//!   built in memory from GGUF metadata ([`tokenizer_from_gguf`]) so that it can be exported.
//! - [`Llama2cTokenizer`]: llama2.c's `tokenizer.bin`, encoding and decoding exactly as
//!   llama2.c's `run.c` does.
//!
//! Decoding is stream-friendly: an incomplete UTF-8 sequence at the end of the decoded bytes is
//! held back rather than rendered as U+FFFD, so the text of a prefix of `ids` is always a prefix
//! of the text of `ids`, and a caller can stream by printing the new suffix.

use crate::error::{ModelError, Result};
use crate::gguf::{tokenizer_err, GgufFile, GgufValue};
use serde_json::{json, Value};
use std::collections::{BinaryHeap, HashMap};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

/// Text to token ids and back.
pub trait Tokenizer: Send + Sync {
    /// Token ids of `text`, with no BOS/EOS added.
    fn encode(&self, text: &str) -> crate::Result<Vec<u32>>;
    /// Text of `ids` (special tokens skipped). Decoding a prefix then the full sequence must let a caller stream text by printing the new suffix.
    fn decode(&self, ids: &[u32]) -> crate::Result<String>;
    /// Number of token ids (the embedding rows a model needs).
    fn vocab_size(&self) -> usize;
    /// Beginning-of-sequence token, if the tokenizer has one.
    fn bos_id(&self) -> Option<u32>;
    /// End-of-sequence token, if the tokenizer has one.
    fn eos_id(&self) -> Option<u32>;
    /// The tokenizer.json content (Hugging Face format) if this tokenizer can be expressed as one (used later to export checkpoints); None otherwise.
    fn to_hf_json(&self) -> Option<String> {
        None
    }
}

/// Checks that every id is below `vocab_size`.
fn check_ids(path: &Path, ids: &[u32], vocab_size: usize) -> Result<()> {
    match ids.iter().find(|&&id| id as usize >= vocab_size) {
        None => Ok(()),
        Some(id) => Err(ModelError::Tokenizer {
            path: path.to_path_buf(),
            reason: format!("cannot decode token id {id}: the vocabulary has {vocab_size} tokens"),
        }),
    }
}

/// Decodes bytes as UTF-8, replacing invalid sequences with U+FFFD but dropping an incomplete
/// sequence at the very end (the next token may complete it).
pub fn utf8_stream_prefix(mut bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    loop {
        match std::str::from_utf8(bytes) {
            Ok(s) => {
                out.push_str(s);
                return out;
            }
            Err(e) => {
                let (valid, rest) = bytes.split_at(e.valid_up_to());
                // `valid` is valid UTF-8 by construction.
                out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                match e.error_len() {
                    None => return out,
                    Some(n) => {
                        out.push('\u{FFFD}');
                        bytes = rest.get(n..).unwrap_or_default();
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Hugging Face tokenizers

/// A Hugging Face `tokenizers` tokenizer with its BOS/EOS ids.
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    source: PathBuf,
    vocab_size: usize,
    bos: Option<u32>,
    eos: Option<u32>,
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

/// Deepest nesting of arrays and objects accepted in a tokenizer.json.
const MAX_TOKENIZER_JSON_DEPTH: usize = 32;

/// The deepest nesting of arrays and objects in a JSON text (brackets inside strings ignored).
fn json_depth(bytes: &[u8]) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in bytes {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Special-token spellings that unambiguously mean BOS or EOS.
const BOS_NAMES: [&str; 4] = ["<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"];
const EOS_NAMES: [&str; 4] = ["</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>"];

impl HfTokenizer {
    /// Reads a `tokenizer.json`. BOS/EOS are guessed from its special tokens (`<s>`/`</s>`,
    /// `<|begin_of_text|>`/`<|end_of_text|>`, `<bos>`/`<eos>`, `<|endoftext|>`); a model's
    /// `config.json` is the authority, so prefer [`HfTokenizer::with_special_ids`] when it has them.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes =
            std::fs::read(path).map_err(|e| ModelError::io(path, "reading tokenizer.json", e))?;
        Self::from_bytes(&bytes, path)
    }

    /// Parses `tokenizer.json` content; `source` names it in errors. BOS/EOS as in
    /// [`HfTokenizer::from_file`].
    pub fn from_bytes(bytes: &[u8], source: impl Into<PathBuf>) -> Result<Self> {
        let source = source.into();
        // tokenizers 0.22 panics (`expect("Helper")` in its decoder deserializer) on a JSON
        // syntax error inside `decoder`: check the syntax first, so that it only sees valid JSON.
        // Its nested deserializers also hit serde_json's recursion limit far below the
        // document's own depth, so nesting is bounded too (real files nest about 6 deep).
        serde_json::from_slice::<serde::de::IgnoredAny>(bytes).map_err(|e| {
            ModelError::Tokenizer {
                path: source.clone(),
                reason: format!("invalid tokenizer.json: not valid JSON: {e}"),
            }
        })?;
        let depth = json_depth(bytes);
        if depth > MAX_TOKENIZER_JSON_DEPTH {
            return Err(ModelError::Tokenizer {
                path: source,
                reason: format!(
                    "invalid tokenizer.json: nested {depth} deep (at most {MAX_TOKENIZER_JSON_DEPTH})"
                ),
            });
        }
        let inner =
            tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| ModelError::Tokenizer {
                path: source.clone(),
                reason: format!("invalid tokenizer.json: {e}"),
            })?;
        let find = |names: &[&str]| {
            let added = inner.get_added_tokens_decoder();
            names.iter().find_map(|name| {
                added
                    .iter()
                    .filter(|(_, tok)| tok.special && tok.content == *name)
                    .map(|(&id, _)| id)
                    .min()
            })
        };
        let (bos, eos) = (find(&BOS_NAMES), find(&EOS_NAMES));
        Self::from_tokenizer(inner, bos, eos, source)
    }

    /// Wraps a tokenizer with explicit BOS/EOS ids (checked against the vocabulary).
    pub fn from_tokenizer(
        inner: tokenizers::Tokenizer,
        bos: Option<u32>,
        eos: Option<u32>,
        source: impl Into<PathBuf>,
    ) -> Result<Self> {
        let source = source.into();
        let vocab_size = inner
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&m| m as usize + 1);
        Self {
            inner,
            source,
            vocab_size,
            bos: None,
            eos: None,
        }
        .with_special_ids(bos, eos)
    }

    /// Replaces the BOS/EOS ids (e.g. with those of the model's `config.json`).
    pub fn with_special_ids(mut self, bos: Option<u32>, eos: Option<u32>) -> Result<Self> {
        for (what, id) in [("BOS", bos), ("EOS", eos)] {
            if let Some(id) = id {
                if id as usize >= self.vocab_size {
                    return Err(ModelError::Tokenizer {
                        path: self.source.clone(),
                        reason: format!(
                            "{what} id {id} is outside the vocabulary of {} tokens",
                            self.vocab_size
                        ),
                    });
                }
            }
        }
        self.bos = bos;
        self.eos = eos;
        Ok(self)
    }

    /// The wrapped `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Where the tokenizer came from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The id of a token string (model vocabulary or added tokens).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    fn err(&self, action: &str, e: impl std::fmt::Display) -> ModelError {
        ModelError::Tokenizer {
            path: self.source.clone(),
            reason: format!("{action}: {e}"),
        }
    }
}

impl Tokenizer for HfTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| self.err("encoding", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes with special tokens skipped. Trailing U+FFFD characters are dropped: they are
    /// what the decoders make of a multi-byte character whose last bytes are still to come (a
    /// genuinely invalid sequence at the very end is therefore not shown).
    fn decode(&self, ids: &[u32]) -> Result<String> {
        check_ids(&self.source, ids, self.vocab_size)?;
        let mut text = self
            .inner
            .decode(ids, true)
            .map_err(|e| self.err("decoding", e))?;
        // The decoders render an incomplete trailing UTF-8 sequence as U+FFFD; hold it back so
        // that streaming never prints a replacement character the next token would fix.
        while text.ends_with('\u{FFFD}') {
            text.pop();
        }
        Ok(text)
    }

    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    fn to_hf_json(&self) -> Option<String> {
        self.inner.to_string(false).ok()
    }
}

// ---------------------------------------------------------------------------------------------
// Building tokenizer.json from vocabularies

/// SentencePiece / llama.cpp token types (`tokenizer.ggml.token_type`).
pub mod token_type {
    /// An ordinary piece.
    pub const NORMAL: i32 = 1;
    /// The unknown-token piece.
    pub const UNKNOWN: i32 = 2;
    /// A control token (BOS, EOS, chat markers): never produced from text by the model.
    pub const CONTROL: i32 = 3;
    /// A user-defined token, matched verbatim in text.
    pub const USER_DEFINED: i32 = 4;
    /// An unused slot.
    pub const UNUSED: i32 = 5;
    /// A byte-fallback token `<0xXX>`.
    pub const BYTE: i32 = 6;
}

fn added_tokens_json(tokens: &[String], types: &[i32]) -> Vec<Value> {
    tokens
        .iter()
        .zip(types)
        .enumerate()
        // An empty added token would match everywhere; it cannot occur in text anyway.
        .filter(|(_, (tok, &t))| {
            !tok.is_empty() && (t == token_type::CONTROL || t == token_type::USER_DEFINED)
        })
        .map(|(id, (content, &t))| {
            json!({
                "id": id, "content": content, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": t == token_type::CONTROL,
            })
        })
        .collect()
}

fn vocab_json(tokens: &[String]) -> std::result::Result<serde_json::Map<String, Value>, String> {
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    for (id, tok) in tokens.iter().enumerate() {
        if vocab.insert(tok.clone(), json!(id)).is_some() {
            return Err(format!(
                "token {tok:?} (id {id}) appears twice in the vocabulary"
            ));
        }
    }
    Ok(vocab)
}

/// `tokenizer.json` for a SentencePiece-style BPE (LLaMA 1/2, llama2.c): pieces use `▁` for
/// spaces, merges are derived from the piece scores (a piece is the merge of any split into two
/// pieces, ranked by the piece's score, highest first), unknown characters fall back to
/// `<0xXX>` byte pieces, and a `▁` is prepended when `add_space_prefix`.
pub fn sentencepiece_bpe_json(
    tokens: &[String],
    scores: &[f32],
    types: &[i32],
    unk_id: Option<u32>,
    add_space_prefix: bool,
) -> std::result::Result<String, String> {
    if scores.len() != tokens.len() || types.len() != tokens.len() {
        return Err(format!(
            "{} tokens but {} scores and {} token types",
            tokens.len(),
            scores.len(),
            types.len()
        ));
    }
    let vocab = vocab_json(tokens)?;
    let id_of: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(f32, usize, usize, usize)> = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        let mergeable = types[id] == token_type::NORMAL || types[id] == token_type::USER_DEFINED;
        if !mergeable {
            continue;
        }
        for (split, _) in tok.char_indices().skip(1) {
            let (l, r) = tok.split_at(split);
            if let (Some(&li), Some(&ri)) = (id_of.get(l), id_of.get(r)) {
                merges.push((scores[id], li, ri, id));
            }
        }
    }
    // Highest score first; ties by the pieces' ids so the order is deterministic.
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2))));
    let merges: Vec<Value> = merges
        .iter()
        .map(|&(_, l, r, _)| json!([tokens[l], tokens[r]]))
        .collect();
    let unk = match unk_id {
        None => Value::Null,
        Some(id) => match tokens.get(id as usize) {
            Some(t) => json!(t),
            None => return Err(format!("unknown-token id {id} is outside the vocabulary")),
        },
    };
    let normalizer = if add_space_prefix {
        json!({"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ]})
    } else {
        json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"})
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens_json(tokens, types),
        "normalizer": normalizer,
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    });
    Ok(doc.to_string())
}

/// GPT-2's pre-tokenizer regex (what the `ByteLevel` pre-tokenizer uses).
const GPT2_PRE_NAMES: [&str; 4] = ["default", "gpt-2", "gpt2", "phi-2"];
/// Values of `tokenizer.ggml.pre` that llama.cpp maps to "single digits, then the GPT-2 regex"
/// (StarCoder's tokenizer, which SmolLM2 reuses).
const DIGITS_GPT2_PRE_NAMES: [&str; 7] = [
    "smollm",
    "starcoder",
    "refact",
    "command-r",
    "codeshell",
    "exaone",
    "minerva-7b",
];
/// Values that mean LLaMA 3's regex.
const LLAMA3_PRE_NAMES: [&str; 4] = ["llama3", "llama-v3", "llama-bpe", "falcon3"];
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `tokenizer.json` for a GPT-2-style byte-level BPE. `pre` is llama.cpp's
/// `tokenizer.ggml.pre` and selects the pre-tokenizer (`None` means GPT-2's).
pub fn byte_level_bpe_json(
    tokens: &[String],
    types: &[i32],
    merges: &[String],
    pre: Option<&str>,
    add_prefix_space: bool,
) -> std::result::Result<String, String> {
    if types.len() != tokens.len() {
        return Err(format!(
            "{} tokens but {} token types",
            tokens.len(),
            types.len()
        ));
    }
    let vocab = vocab_json(tokens)?;
    let mut pairs = Vec::with_capacity(merges.len());
    for (i, m) in merges.iter().enumerate() {
        match m.split_once(' ') {
            Some((l, r)) if !l.is_empty() && !r.is_empty() && !r.contains(' ') => {
                pairs.push(json!([l, r]))
            }
            _ => {
                return Err(format!(
                    "merge {i} ({m:?}) is not two tokens separated by a space"
                ))
            }
        }
    }
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": true, "use_regex": use_regex});
    let pre_tokenizer = match pre {
        None => byte_level(true),
        Some(p) if GPT2_PRE_NAMES.contains(&p) => byte_level(true),
        Some(p) if DIGITS_GPT2_PRE_NAMES.contains(&p) => {
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true),
            ]})
        }
        Some(p) if LLAMA3_PRE_NAMES.contains(&p) => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": false},
            byte_level(false),
        ]}),
        Some(p) => {
            let mut known: Vec<&str> = GPT2_PRE_NAMES.to_vec();
            known.extend(DIGITS_GPT2_PRE_NAMES);
            known.extend(LLAMA3_PRE_NAMES);
            return Err(format!(
                "unsupported pre-tokenizer `tokenizer.ggml.pre` = {p:?} (supported: {})",
                known.join(", ")
            ));
        }
    };
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens_json(tokens, types),
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": pairs,
        },
    });
    Ok(doc.to_string())
}

fn parse_tokenizer_json(json: &str, path: &Path) -> Result<tokenizers::Tokenizer> {
    tokenizers::Tokenizer::from_str(json).map_err(|e| ModelError::Tokenizer {
        path: path.to_path_buf(),
        reason: format!("building the tokenizer: {e}"),
    })
}

fn gguf_array<'a>(
    file: &'a GgufFile,
    key: &str,
    required: bool,
) -> Result<Option<&'a [GgufValue]>> {
    match file.get(key) {
        None if required => Err(tokenizer_err(file, format!("metadata `{key}` is missing"))),
        None => Ok(None),
        Some(v) => v.as_array().map(Some).ok_or_else(|| {
            tokenizer_err(
                file,
                format!("metadata `{key}` must be an array, found {}", v.summary()),
            )
        }),
    }
}

fn gguf_strings(file: &GgufFile, key: &str, values: &[GgufValue]) -> Result<Vec<String>> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str().map(str::to_string).ok_or_else(|| {
                tokenizer_err(file, format!("element {i} of `{key}` is not a string"))
            })
        })
        .collect()
}

fn gguf_opt_id(file: &GgufFile, key: &str, vocab: usize) -> Result<Option<u32>> {
    match file.get(key) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(id) if (id as u128) < vocab as u128 => Ok(Some(id as u32)),
            _ => Err(tokenizer_err(
                file,
                format!(
                    "metadata `{key}` = {} is not a token id below the vocabulary size {vocab}",
                    v.summary()
                ),
            )),
        },
    }
}

fn gguf_opt_bool(file: &GgufFile, key: &str) -> Result<Option<bool>> {
    match file.get(key) {
        None => Ok(None),
        Some(v) => v.as_bool().map(Some).ok_or_else(|| {
            tokenizer_err(
                file,
                format!("metadata `{key}` must be a bool, found {}", v.summary()),
            )
        }),
    }
}

/// Builds the tokenizer of a GGUF file from its `tokenizer.ggml.*` metadata:
/// `model = "gpt2"` gives a byte-level BPE from `tokens` + `merges` with the pre-tokenizer
/// selected by `pre`; `model = "llama"` gives a SentencePiece-style BPE from `tokens` + `scores`
/// with byte fallback. BOS/EOS come from `bos_token_id`/`eos_token_id`.
pub fn tokenizer_from_gguf(file: &GgufFile) -> Result<Arc<dyn Tokenizer>> {
    Ok(Arc::new(hf_tokenizer_from_gguf(file)?))
}

/// [`tokenizer_from_gguf`] with the concrete type.
pub fn hf_tokenizer_from_gguf(file: &GgufFile) -> Result<HfTokenizer> {
    let model = match file.get("tokenizer.ggml.model") {
        None => {
            return Err(tokenizer_err(
                file,
                "metadata `tokenizer.ggml.model` is missing (the GGUF has no tokenizer)"
                    .to_string(),
            ))
        }
        Some(v) => v.as_str().ok_or_else(|| {
            tokenizer_err(
                file,
                format!(
                    "`tokenizer.ggml.model` must be a string, found {}",
                    v.summary()
                ),
            )
        })?,
    };
    let token_values = gguf_array(file, "tokenizer.ggml.tokens", true)?.unwrap_or_default();
    let tokens = gguf_strings(file, "tokenizer.ggml.tokens", token_values)?;
    if tokens.is_empty() || tokens.len() > u32::MAX as usize {
        return Err(tokenizer_err(
            file,
            format!("vocabulary of {} tokens", tokens.len()),
        ));
    }
    let types: Vec<i32> = match gguf_array(file, "tokenizer.ggml.token_type", false)? {
        None => vec![token_type::NORMAL; tokens.len()],
        Some(values) => values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_i64()
                    .and_then(|t| i32::try_from(t).ok())
                    .ok_or_else(|| {
                        tokenizer_err(
                            file,
                            format!("element {i} of `tokenizer.ggml.token_type` is not an integer"),
                        )
                    })
            })
            .collect::<Result<_>>()?,
    };
    if types.len() != tokens.len() {
        return Err(tokenizer_err(
            file,
            format!("{} tokens but {} token types", tokens.len(), types.len()),
        ));
    }
    let json = match model {
        "gpt2" => {
            let merge_values = gguf_array(file, "tokenizer.ggml.merges", true)?.unwrap_or_default();
            let merges = gguf_strings(file, "tokenizer.ggml.merges", merge_values)?;
            let pre = match file.get("tokenizer.ggml.pre") {
                None => None,
                Some(v) => Some(v.as_str().ok_or_else(|| {
                    tokenizer_err(file, "`tokenizer.ggml.pre` must be a string".to_string())
                })?),
            };
            let prefix = gguf_opt_bool(file, "tokenizer.ggml.add_space_prefix")?.unwrap_or(false);
            byte_level_bpe_json(&tokens, &types, &merges, pre, prefix)
        }
        "llama" => {
            let score_values = gguf_array(file, "tokenizer.ggml.scores", true)?.unwrap_or_default();
            let scores: Vec<f32> = score_values
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    GgufValue::F32(s) => Ok(*s),
                    _ => Err(tokenizer_err(
                        file,
                        format!("element {i} of `tokenizer.ggml.scores` is not an f32"),
                    )),
                })
                .collect::<Result<_>>()?;
            let unk = gguf_opt_id(file, "tokenizer.ggml.unknown_token_id", tokens.len())?;
            let prefix = gguf_opt_bool(file, "tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
            sentencepiece_bpe_json(&tokens, &scores, &types, unk, prefix)
        }
        other => {
            return Err(tokenizer_err(
                file,
                format!("unsupported tokenizer model `{other}` (supported: gpt2, llama)"),
            ))
        }
    }
    .map_err(|reason| tokenizer_err(file, reason))?;
    let inner = parse_tokenizer_json(&json, file.path())?;
    let bos = gguf_opt_id(file, "tokenizer.ggml.bos_token_id", tokens.len())?;
    let eos = gguf_opt_id(file, "tokenizer.ggml.eos_token_id", tokens.len())?;
    let tok = HfTokenizer::from_tokenizer(inner, bos, eos, file.path())?;
    if tok.vocab_size() != tokens.len() {
        return Err(tokenizer_err(
            file,
            format!(
                "built a tokenizer of {} ids from {} tokens",
                tok.vocab_size(),
                tokens.len()
            ),
        ));
    }
    Ok(tok)
}

// ---------------------------------------------------------------------------------------------
// llama2.c

/// llama2.c's `tokenizer.bin` tokenizer, encoding and decoding as `run.c` does.
///
/// Layout: i32 `max_token_length`, then per token an f32 score, an i32 byte length and the
/// bytes. Ids 0, 1 and 2 are `<unk>`, BOS and EOS; ids 3..259 are the byte pieces `<0x00>`..
pub struct Llama2cTokenizer {
    source: PathBuf,
    max_token_length: usize,
    vocab: Vec<Vec<u8>>,
    scores: Vec<f32>,
    lookup: HashMap<Vec<u8>, u32>,
}

impl std::fmt::Debug for Llama2cTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Llama2cTokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab.len())
            .field("max_token_length", &self.max_token_length)
            .finish()
    }
}

/// run.c's `best_score` starts here: a merge must score strictly higher.
const LLAMA2C_MIN_SCORE: f32 = -1e10;
/// run.c maps byte `b` to token `b + 3`.
const LLAMA2C_BYTE_OFFSET: u32 = 3;

impl Llama2cTokenizer {
    /// BOS id in llama2.c.
    pub const BOS: u32 = 1;
    /// EOS id in llama2.c.
    pub const EOS: u32 = 2;

    /// Reads a `tokenizer.bin`. With `vocab_size` (from the model header, as run.c does)
    /// exactly that many tokens are read; with `None`, tokens are read to the end of the file.
    pub fn from_file(path: impl AsRef<Path>, vocab_size: Option<usize>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path)
            .map_err(|e| ModelError::io(path, "reading llama2.c tokenizer", e))?;
        Self::from_bytes(&bytes, vocab_size, path)
    }

    /// Parses `tokenizer.bin` content; `source` names it in errors. The file must hold exactly
    /// the tokens asked for, each no longer than `max_token_length`.
    pub fn from_bytes(
        bytes: &[u8],
        vocab_size: Option<usize>,
        source: impl Into<PathBuf>,
    ) -> Result<Self> {
        let source = source.into();
        let err = |reason: String| ModelError::Tokenizer {
            path: source.clone(),
            reason: format!("invalid llama2.c tokenizer: {reason}"),
        };
        let read_i32 = |pos: usize, what: &str| -> Result<i32> {
            bytes
                .get(pos..pos.saturating_add(4))
                .and_then(|b| b.try_into().ok())
                .map(i32::from_le_bytes)
                .ok_or_else(|| {
                    err(format!(
                        "truncated at offset {pos} reading {what} ({} bytes)",
                        bytes.len()
                    ))
                })
        };
        let max_len = read_i32(0, "max_token_length")?;
        let max_token_length = usize::try_from(max_len)
            .ok()
            .filter(|&m| m > 0)
            .ok_or_else(|| err(format!("max_token_length {max_len} must be positive")))?;
        // Each token needs at least 8 bytes (score + length).
        let capacity = vocab_size.unwrap_or(0).min(bytes.len() / 8);
        let mut vocab = Vec::with_capacity(capacity);
        let mut scores = Vec::with_capacity(capacity);
        let mut pos = 4usize;
        while vocab_size.map_or(pos < bytes.len(), |n| vocab.len() < n) {
            let id = vocab.len();
            let score = f32::from_bits(read_i32(pos, &format!("the score of token {id}"))? as u32);
            let len = read_i32(pos + 4, &format!("the length of token {id}"))?;
            let len = usize::try_from(len)
                .ok()
                .filter(|&l| l <= max_token_length)
                .ok_or_else(|| {
                    err(format!("token {id} has length {len}, outside 0..={max_token_length} (max_token_length)"))
                })?;
            let start = pos + 8;
            let piece = bytes.get(start..start + len).ok_or_else(|| {
                err(format!("token {id} ({len} bytes at offset {start}) runs past the end of the file ({} bytes)", bytes.len()))
            })?;
            vocab.push(piece.to_vec());
            scores.push(score);
            pos = start + len;
        }
        if pos != bytes.len() {
            return Err(err(format!(
                "{} bytes follow the {} tokens",
                bytes.len() - pos,
                vocab.len()
            )));
        }
        if vocab.is_empty() || vocab.len() > u32::MAX as usize {
            return Err(err(format!("vocabulary of {} tokens", vocab.len())));
        }
        let mut lookup = HashMap::with_capacity(vocab.len());
        for (id, piece) in vocab.iter().enumerate() {
            // Keep the first id of a duplicated piece.
            lookup.entry(piece.clone()).or_insert(id as u32);
        }
        Ok(Self {
            source,
            max_token_length,
            vocab,
            scores,
            lookup,
        })
    }

    /// The bytes of token `id`.
    pub fn piece(&self, id: u32) -> Option<&[u8]> {
        self.vocab.get(id as usize).map(Vec::as_slice)
    }

    /// The merge score of token `id`.
    pub fn score(&self, id: u32) -> Option<f32> {
        self.scores.get(id as usize).copied()
    }

    /// The longest token, in bytes, as the file declares it.
    pub fn max_token_length(&self) -> usize {
        self.max_token_length
    }

    fn err(&self, reason: String) -> ModelError {
        ModelError::Tokenizer {
            path: self.source.clone(),
            reason,
        }
    }

    /// The score run.c would compare for a merge into `id`, if that merge can ever win.
    fn merge_score(&self, id: u32) -> Option<f32> {
        let s = self.scores[id as usize];
        // NaN never compares greater; -0.0 must tie with 0.0 as in C.
        (s > LLAMA2C_MIN_SCORE).then_some(s + 0.0)
    }

    fn is_special(&self, id: u32) -> bool {
        id < 3
    }

    /// The byte a `<0xXX>` piece stands for.
    fn byte_piece(piece: &[u8]) -> Option<u8> {
        let hex = piece.strip_prefix(b"<0x")?.strip_suffix(b">")?;
        if hex.is_empty() || hex.len() > 2 {
            return None;
        }
        u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
    }
}

/// A merge candidate: the pair starting at node `left`, valid while both nodes still hold
/// `left_tok` and `right_tok` and are adjacent.
struct Candidate {
    score: f32,
    left: usize,
    right: usize,
    left_tok: u32,
    right_tok: u32,
    merged: u32,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    /// Max-heap order: higher score first, then the leftmost pair (run.c scans left to right
    /// and only replaces its best on a strictly greater score).
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.score
            .total_cmp(&other.score)
            .then(other.left.cmp(&self.left))
    }
}

impl Tokenizer for Llama2cTokenizer {
    /// run.c's `encode`: a dummy-prefix `" "` token (for non-empty text), one token per UTF-8
    /// character with `<0xXX>` byte fallback (id = byte + 3), then repeatedly merge the adjacent
    /// pair whose concatenation is the highest-scoring token (leftmost on ties). A heap with
    /// lazy invalidation gives the same result as run.c's quadratic scan.
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let mut toks: Vec<u32> = Vec::with_capacity(text.len() + 1);
        toks.push(*self.lookup.get(&b" "[..]).ok_or_else(|| {
            self.err("the vocabulary has no \" \" token for the dummy prefix".into())
        })?);
        let mut buf = [0u8; 4];
        for ch in text.chars() {
            let bytes = ch.encode_utf8(&mut buf).as_bytes();
            match self.lookup.get(bytes) {
                Some(&id) => toks.push(id),
                None => {
                    for &b in bytes {
                        let id = u32::from(b) + LLAMA2C_BYTE_OFFSET;
                        if id as usize >= self.vocab.len() {
                            return Err(self.err(format!(
                                "no token for byte 0x{b:02X} of {ch:?}: byte fallback needs id {id}, but the vocabulary has {} tokens",
                                self.vocab.len()
                            )));
                        }
                        toks.push(id);
                    }
                }
            }
        }

        const NONE: usize = usize::MAX;
        let n = toks.len();
        let mut next: Vec<usize> = (1..=n).map(|i| if i == n { NONE } else { i }).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| if i == 0 { NONE } else { i - 1 }).collect();
        let mut alive = vec![true; n];
        let mut heap = BinaryHeap::new();
        let mut concat = Vec::with_capacity(2 * self.max_token_length);
        let mut push =
            |heap: &mut BinaryHeap<Candidate>, toks: &[u32], left: usize, right: usize| {
                if left == NONE || right == NONE {
                    return;
                }
                let (lt, rt) = (toks[left], toks[right]);
                concat.clear();
                concat.extend_from_slice(&self.vocab[lt as usize]);
                concat.extend_from_slice(&self.vocab[rt as usize]);
                if let Some(&merged) = self.lookup.get(concat.as_slice()) {
                    if let Some(score) = self.merge_score(merged) {
                        heap.push(Candidate {
                            score,
                            left,
                            right,
                            left_tok: lt,
                            right_tok: rt,
                            merged,
                        });
                    }
                }
            };
        for i in 0..n.saturating_sub(1) {
            push(&mut heap, &toks, i, i + 1);
        }
        while let Some(c) = heap.pop() {
            let valid = alive[c.left]
                && alive[c.right]
                && next[c.left] == c.right
                && toks[c.left] == c.left_tok
                && toks[c.right] == c.right_tok;
            if !valid {
                continue;
            }
            toks[c.left] = c.merged;
            alive[c.right] = false;
            let after = next[c.right];
            next[c.left] = after;
            if after != NONE {
                prev[after] = c.left;
            }
            push(&mut heap, &toks, prev[c.left], c.left);
            push(&mut heap, &toks, c.left, after);
        }
        Ok(toks
            .iter()
            .zip(&alive)
            .filter(|(_, &a)| a)
            .map(|(&t, _)| t)
            .collect())
    }

    /// run.c's `decode`, token by token: the leading space of a piece that follows BOS is
    /// dropped and `<0xXX>` pieces become raw bytes. `<unk>`, BOS and EOS (ids 0-2) are skipped.
    fn decode(&self, ids: &[u32]) -> Result<String> {
        check_ids(&self.source, ids, self.vocab.len())?;
        let mut bytes = Vec::new();
        let mut prev: Option<u32> = None;
        for &id in ids {
            if !self.is_special(id) {
                let mut piece = self.vocab[id as usize].as_slice();
                if prev == Some(Self::BOS) {
                    piece = piece.strip_prefix(b" ").unwrap_or(piece);
                }
                match Self::byte_piece(piece) {
                    Some(b) => bytes.push(b),
                    None => bytes.extend_from_slice(piece),
                }
            }
            prev = Some(id);
        }
        Ok(utf8_stream_prefix(&bytes))
    }

    fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    fn bos_id(&self) -> Option<u32> {
        (self.vocab.len() > Self::BOS as usize).then_some(Self::BOS)
    }

    fn eos_id(&self) -> Option<u32> {
        (self.vocab.len() > Self::EOS as usize).then_some(Self::EOS)
    }

    /// The same vocabulary as a SentencePiece-style BPE `tokenizer.json` (spaces as `▁`,
    /// `\n<s>\n` and `\n</s>\n` as `<s>` and `</s>`). `None` if a piece is not UTF-8 or
    /// pieces repeat.
    fn to_hf_json(&self) -> Option<String> {
        let mut tokens = Vec::with_capacity(self.vocab.len());
        let mut types = Vec::with_capacity(self.vocab.len());
        for (id, piece) in self.vocab.iter().enumerate() {
            let s = std::str::from_utf8(piece).ok()?;
            let (tok, ty) = match id {
                0 => (s.to_string(), token_type::UNKNOWN),
                1 | 2 => (s.trim_matches('\n').to_string(), token_type::CONTROL),
                _ if Self::byte_piece(piece).is_some() => (s.to_string(), token_type::BYTE),
                // run.c never merges into a piece scoring at or below its floor.
                _ if self.merge_score(id as u32).is_none() => {
                    (s.replace(' ', "▁"), token_type::UNUSED)
                }
                _ => (s.replace(' ', "▁"), token_type::NORMAL),
            };
            tokens.push(tok);
            types.push(ty);
        }
        sentencepiece_bpe_json(&tokens, &self.scores, &types, Some(0), true).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serialises a llama2.c tokenizer.
    pub(crate) fn tokenizer_bin(max_len: i32, pieces: &[(&[u8], f32)]) -> Vec<u8> {
        let mut out = max_len.to_le_bytes().to_vec();
        for (p, s) in pieces {
            out.extend_from_slice(&s.to_le_bytes());
            out.extend_from_slice(&(p.len() as i32).to_le_bytes());
            out.extend_from_slice(p);
        }
        out
    }

    /// A small llama2.c vocabulary: specials, 256 byte pieces, then characters and merges.
    fn toy() -> Llama2cTokenizer {
        let mut pieces: Vec<(Vec<u8>, f32)> = vec![
            (b"<unk>".to_vec(), 0.0),
            (b"\n<s>\n".to_vec(), 0.0),
            (b"\n</s>\n".to_vec(), 0.0),
        ];
        for b in 0..=255u8 {
            pieces.push((format!("<0x{b:02X}>").into_bytes(), 0.0));
        }
        for (p, s) in [
            (" ", -100.0),
            ("a", -101.0),
            ("b", -102.0),
            ("é", -103.0),
            ("ab", -5.0),
            (" a", -1.0),
            (" ab", -2.0),
            ("ba", -5.0),
            ("bb", -1e11),
        ] {
            pieces.push((p.as_bytes().to_vec(), s));
        }
        let refs: Vec<(&[u8], f32)> = pieces.iter().map(|(p, s)| (p.as_slice(), *s)).collect();
        Llama2cTokenizer::from_bytes(&tokenizer_bin(8, &refs), None, "toy.bin").unwrap()
    }

    /// run.c's encode, literally: quadratic scan for the best pair.
    fn run_c_encode(t: &Llama2cTokenizer, text: &str) -> Vec<u32> {
        if text.is_empty() {
            return vec![];
        }
        let mut toks = vec![t.lookup[&b" "[..]]];
        for ch in text.chars() {
            let mut buf = [0u8; 4];
            let b = ch.encode_utf8(&mut buf).as_bytes();
            match t.lookup.get(b) {
                Some(&id) => toks.push(id),
                None => toks.extend(b.iter().map(|&x| x as u32 + 3)),
            }
        }
        loop {
            let (mut best_score, mut best) = (-1e10f32, None);
            for i in 0..toks.len().saturating_sub(1) {
                let cat = [
                    t.vocab[toks[i] as usize].clone(),
                    t.vocab[toks[i + 1] as usize].clone(),
                ]
                .concat();
                if let Some(&id) = t.lookup.get(&cat) {
                    if t.scores[id as usize] > best_score {
                        best_score = t.scores[id as usize];
                        best = Some((i, id));
                    }
                }
            }
            match best {
                None => return toks,
                Some((i, id)) => {
                    toks[i] = id;
                    toks.remove(i + 1);
                }
            }
        }
    }

    #[test]
    fn encode_matches_run_c_on_the_toy_vocab() {
        let t = toy();
        let id = |s: &str| t.lookup[s.as_bytes()];
        assert_eq!(t.encode("").unwrap(), Vec::<u32>::new());
        // " " + "a" -> " a" (-1) beats "ab" (-5); then " a" + "b" -> " ab".
        assert_eq!(t.encode("ab").unwrap(), [id(" ab")]);
        // "bb" scores below run.c's -1e10 floor and never merges; "ba" ties "ab": leftmost wins.
        assert_eq!(t.encode("bb").unwrap(), [id(" "), id("b"), id("b")]);
        assert_eq!(t.encode("bab").unwrap(), [id(" "), id("ba"), id("b")]);
        // Characters outside the vocabulary fall back to bytes + 3.
        assert_eq!(
            t.encode("z€").unwrap(),
            [id(" "), 0x7a + 3, 0xe2 + 3, 0x82 + 3, 0xac + 3]
        );
        assert_eq!(t.encode("é").unwrap(), [id(" "), id("é")]);
        let alphabet = ['a', 'b', ' ', 'é', 'z'];
        let mut state = 12345u64;
        for _ in 0..500 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let len = (state >> 59) as usize;
            let s: String = (0..len)
                .map(|k| alphabet[((state >> (k * 3 % 50)) % 5) as usize])
                .collect();
            assert_eq!(t.encode(&s).unwrap(), run_c_encode(&t, &s), "{s:?}");
        }
    }

    #[test]
    fn decode_follows_run_c() {
        let t = toy();
        let id = |s: &str| t.lookup[s.as_bytes()];
        // Leading space dropped only after BOS; specials skipped.
        assert_eq!(t.decode(&[1, id(" ab"), id(" a"), 2]).unwrap(), "ab a");
        assert_eq!(t.decode(&[id(" ab")]).unwrap(), " ab");
        // Byte pieces; an incomplete trailing sequence is held back until completed.
        let euro = [0xe2 + 3, 0x82 + 3, 0xac + 3];
        assert_eq!(t.decode(&euro[..2]).unwrap(), "");
        assert_eq!(t.decode(&euro).unwrap(), "€");
        assert_eq!(t.decode(&[0xff + 3, id("a")]).unwrap(), "\u{FFFD}a");
        assert!(matches!(
            t.decode(&[100_000]),
            Err(ModelError::Tokenizer { .. })
        ));
    }

    #[test]
    fn stream_prefix_property() {
        assert_eq!(utf8_stream_prefix(b"a\xe2\x82"), "a");
        assert_eq!(utf8_stream_prefix(b"a\xe2\x82\xac"), "a€");
        assert_eq!(utf8_stream_prefix(b"\xffb\xc3"), "\u{FFFD}b");
        assert_eq!(utf8_stream_prefix(b"\xe2\x82b"), "\u{FFFD}b");
    }

    #[test]
    fn rejects_malformed_tokenizer_bin() {
        let ok = tokenizer_bin(4, &[(b"ab", 0.0), (b"c", 1.0)]);
        assert!(Llama2cTokenizer::from_bytes(&ok, Some(2), "t").is_ok());
        // Every truncation fails cleanly.
        for cut in 0..ok.len() {
            assert!(
                Llama2cTokenizer::from_bytes(&ok[..cut], Some(2), "t").is_err(),
                "cut {cut}"
            );
        }
        // Too few tokens for the model, trailing bytes, over-long and negative lengths.
        assert!(Llama2cTokenizer::from_bytes(&ok, Some(3), "t").is_err());
        assert!(Llama2cTokenizer::from_bytes(&ok, Some(1), "t").is_err());
        assert!(
            Llama2cTokenizer::from_bytes(&tokenizer_bin(1, &[(b"ab", 0.0)]), None, "t").is_err()
        );
        let mut neg = tokenizer_bin(4, &[(b"ab", 0.0)]);
        neg[8..12].copy_from_slice(&(-1i32).to_le_bytes());
        assert!(Llama2cTokenizer::from_bytes(&neg, None, "t").is_err());
        let mut huge = tokenizer_bin(4, &[(b"ab", 0.0)]);
        huge[0..4].copy_from_slice(&i32::MAX.to_le_bytes());
        huge[8..12].copy_from_slice(&i32::MAX.to_le_bytes());
        assert!(Llama2cTokenizer::from_bytes(&huge, Some(1 << 40), "t").is_err());
        assert!(Llama2cTokenizer::from_bytes(&tokenizer_bin(0, &[]), None, "t").is_err());
    }

    #[test]
    fn sentencepiece_json_matches_run_c() {
        let t = toy();
        let hf = HfTokenizer::from_bytes(t.to_hf_json().unwrap().as_bytes(), "toy.json").unwrap();
        // (No ties between equal-score merges here: HF ranks merges, run.c picks the leftmost.)
        for s in ["ab", "a b ab", "z€é", "abba baab", "bb a"] {
            assert_eq!(hf.encode(s).unwrap(), t.encode(s).unwrap(), "{s:?}");
            let ids = t.encode(s).unwrap();
            assert_eq!(hf.decode(&ids).unwrap(), s);
        }
    }

    #[test]
    fn byte_level_json_rejects_bad_input() {
        let toks = vec!["a".to_string(), "b".to_string(), "ab".to_string()];
        let types = vec![1; 3];
        assert!(byte_level_bpe_json(&toks, &types, &["a b".into()], Some("smollm"), false).is_ok());
        assert!(byte_level_bpe_json(&toks, &types, &["ab".into()], None, false).is_err());
        assert!(byte_level_bpe_json(&toks, &types, &[], Some("mystery"), false).is_err());
        assert!(byte_level_bpe_json(&toks, &types[..2], &[], None, false).is_err());
        // Every supported pre-tokenizer builds (the regexes compile under fancy-regex).
        let names = GPT2_PRE_NAMES
            .iter()
            .chain(&DIGITS_GPT2_PRE_NAMES)
            .chain(&LLAMA3_PRE_NAMES);
        for pre in names {
            let json =
                byte_level_bpe_json(&toks, &types, &["a b".into()], Some(pre), false).unwrap();
            let tok = parse_tokenizer_json(&json, Path::new("t.json")).unwrap();
            let ids = tok.encode("ab a", false).unwrap().get_ids().to_vec();
            assert_eq!(ids, [2, 0], "{pre}");
        }
        let dup = vec!["a".to_string(), "a".to_string()];
        assert!(byte_level_bpe_json(&dup, &[1, 1], &[], None, false).is_err());
    }
}
