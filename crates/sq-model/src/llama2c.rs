//! llama2.c checkpoints (Karpathy's "legacy" export): a header of 7 little-endian i32
//! (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len), then f32 tensors in
//! this order: token_embedding `[vocab, dim]`, rms_att `[L, dim]`, wq `[L, dim, dim]`,
//! wk `[L, kv_dim, dim]`, wv `[L, kv_dim, dim]`, wo `[L, dim, dim]`, rms_ffn `[L, dim]`,
//! w1 `[L, hidden, dim]`, w2 `[L, dim, hidden]`, w3 `[L, hidden, dim]`, rms_final `[dim]`,
//! freq_cis_real and freq_cis_imag `[seq_len, head_size/2]` (unused: RoPE is recomputed), and
//! `wcls [vocab, dim]` only when the header's vocab_size is negative (untied classifier).
//!
//! w1, w3 and w2 are the gate, up and down projections; wq and wk rows are in interleaved-RoPE
//! order and are converted to Hugging Face order at load. RoPE theta is 10000 and the RMSNorm
//! epsilon 1e-5, as `run.c` hard-codes them.

use crate::error::{ModelError, Result};
use crate::raw::{
    finite_tensor, hf_layer_tensor_names, unpermute_interleaved_rope, LlamaHyperParams, RawModel,
};
use crate::tokenizer::{Llama2cTokenizer, Tokenizer};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// Bytes of the header.
pub const HEADER_BYTES: usize = 7 * 4;
/// `run.c`'s RoPE base frequency.
pub const ROPE_THETA: f64 = 10000.0;
/// `run.c`'s RMSNorm epsilon.
pub const RMS_NORM_EPS: f64 = 1e-5;
/// Magic of llama2.c's newer (versioned) export format, "ak42" as a little-endian u32.
const VERSIONED_MAGIC: u32 = 0x616b_3432;

/// A validated llama2.c header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Llama2cHeader {
    /// Model width.
    pub dim: usize,
    /// MLP width.
    pub hidden_dim: usize,
    /// Number of layers.
    pub n_layers: usize,
    /// Number of query heads.
    pub n_heads: usize,
    /// Number of key/value heads.
    pub n_kv_heads: usize,
    /// Vocabulary size (absolute value of the stored field).
    pub vocab_size: usize,
    /// Maximum sequence length.
    pub seq_len: usize,
    /// Whether the classifier reuses the token embedding (stored vocab_size > 0).
    pub shared_classifier: bool,
}

impl Llama2cHeader {
    /// Parses and validates the header of a checkpoint of `file_len` bytes: positive sizes, `dim`
    /// divisible by `n_heads`, `n_heads` by `n_kv_heads`, an even head size, and a file size that
    /// is exactly the header plus every tensor.
    pub fn parse(bytes: &[u8], file_len: usize, source: &Path) -> Result<Self> {
        let err = |reason: String| ModelError::Llama2c {
            path: source.to_path_buf(),
            reason,
        };
        if bytes.len() < HEADER_BYTES {
            return Err(err(format!(
                "{} bytes is shorter than the {HEADER_BYTES}-byte header",
                bytes.len()
            )));
        }
        let field = |i: usize| {
            let b = &bytes[4 * i..4 * i + 4];
            i32::from_le_bytes([b[0], b[1], b[2], b[3]])
        };
        if field(0) as u32 == VERSIONED_MAGIC {
            return Err(err(format!(
                "this is llama2.c's versioned export (magic \"ak42\", version {}); only the legacy format (export.py --version 0) is supported",
                field(1)
            )));
        }
        let names = [
            "dim",
            "hidden_dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "vocab_size",
            "seq_len",
        ];
        let mut v = [0usize; 7];
        for (i, name) in names.iter().enumerate() {
            let raw = field(i);
            // vocab_size's sign only says whether the classifier is shared.
            let magnitude = if i == 5 {
                raw.unsigned_abs()
            } else {
                u32::try_from(raw).unwrap_or(0)
            };
            if magnitude == 0 {
                return Err(err(format!("{name} is {raw}; it must be positive")));
            }
            v[i] = magnitude as usize;
        }
        let [dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len] = v;
        if dim % n_heads != 0 {
            return Err(err(format!(
                "dim {dim} is not divisible by n_heads {n_heads}"
            )));
        }
        if n_heads % n_kv_heads != 0 {
            return Err(err(format!(
                "n_heads {n_heads} is not divisible by n_kv_heads {n_kv_heads}"
            )));
        }
        if (dim / n_heads) % 2 != 0 {
            return Err(err(format!(
                "head size {} is odd; RoPE needs an even head size",
                dim / n_heads
            )));
        }
        let header = Llama2cHeader {
            dim,
            hidden_dim,
            n_layers,
            n_heads,
            n_kv_heads,
            vocab_size,
            seq_len,
            shared_classifier: field(5) > 0,
        };
        let expected = header
            .file_size()
            .ok_or_else(|| err(format!("the sizes in the header overflow: {header:?}")))?;
        if expected != file_len {
            return Err(err(format!(
                "the header ({header:?}) implies {expected} bytes, but the file has {file_len}"
            )));
        }
        Ok(header)
    }

    /// Head width.
    pub fn head_size(&self) -> usize {
        self.dim / self.n_heads
    }

    /// Width of the K and V projections.
    pub fn kv_dim(&self) -> usize {
        self.head_size() * self.n_kv_heads
    }

    /// f32 counts of each section, in file order, with their names (checked arithmetic).
    fn sections(&self) -> Option<Vec<(&'static str, usize)>> {
        let (d, h, l, v) = (self.dim, self.hidden_dim, self.n_layers, self.vocab_size);
        let kv = self.kv_dim();
        let m = |a: usize, b: usize| a.checked_mul(b);
        let freq = m(self.seq_len, self.head_size() / 2)?;
        let mut s = vec![
            ("token_embedding", m(v, d)?),
            ("rms_att", m(l, d)?),
            ("wq", m(m(l, d)?, d)?),
            ("wk", m(m(l, kv)?, d)?),
            ("wv", m(m(l, kv)?, d)?),
            ("wo", m(m(l, d)?, d)?),
            ("rms_ffn", m(l, d)?),
            ("w1", m(m(l, h)?, d)?),
            ("w2", m(m(l, d)?, h)?),
            ("w3", m(m(l, h)?, d)?),
            ("rms_final", d),
            ("freq_cis_real", freq),
            ("freq_cis_imag", freq),
        ];
        if !self.shared_classifier {
            s.push(("wcls", m(v, d)?));
        }
        Some(s)
    }

    /// Total file size the header implies, or `None` on overflow.
    pub fn file_size(&self) -> Option<usize> {
        self.sections()?
            .iter()
            .try_fold(0usize, |acc, (_, n)| acc.checked_add(*n))?
            .checked_mul(4)?
            .checked_add(HEADER_BYTES)
    }

    /// The equivalent Hugging Face hyper-parameters.
    pub fn hyper_params(&self) -> LlamaHyperParams {
        LlamaHyperParams {
            hidden_size: self.dim,
            intermediate_size: self.hidden_dim,
            num_hidden_layers: self.n_layers,
            num_attention_heads: self.n_heads,
            num_key_value_heads: self.n_kv_heads,
            rms_norm_eps: RMS_NORM_EPS,
            rope_theta: ROPE_THETA,
            vocab_size: self.vocab_size,
            max_position_embeddings: self.seq_len,
            tie_word_embeddings: self.shared_classifier,
            bos_token_id: Some(Llama2cTokenizer::BOS),
            eos_token_id: Some(Llama2cTokenizer::EOS),
            rope_scaling: None,
        }
    }
}

/// Loads a llama2.c checkpoint (memory-mapped: each tensor is decoded straight from the map,
/// so the file is never held twice) and its `tokenizer.bin`.
pub fn load_llama2c(model: &Path, tokenizer: &Path) -> Result<RawModel> {
    let file = std::fs::File::open(model)
        .map_err(|e| ModelError::io(model, "opening llama2.c checkpoint", e))?;
    // SAFETY: the map is read-only; like every memory-mapped model loader we rely on the file
    // not being truncated or rewritten while it is loading.
    let map = unsafe { memmap2::Mmap::map(&file) }
        .map_err(|e| ModelError::io(model, "memory-mapping llama2.c checkpoint", e))?;
    let tok_bytes = std::fs::read(tokenizer)
        .map_err(|e| ModelError::io(tokenizer, "reading llama2.c tokenizer", e))?;
    load_inner(&map, &tok_bytes, model, tokenizer)
}

/// Loads a llama2.c checkpoint and tokenizer held in memory; `source` names them in errors.
pub fn load_llama2c_bytes(model: &[u8], tokenizer: &[u8], source: &Path) -> Result<RawModel> {
    load_inner(model, tokenizer, source, source)
}

/// The stories260K model (TinyStories, dim 64, 5 layers, 512-token vocabulary; MIT licence),
/// compiled into the binary so it works with nothing outside the repository.
pub fn embedded_stories260k() -> Result<RawModel> {
    static MODEL: &[u8] = include_bytes!("../assets/stories260k/stories260K.bin");
    static TOKENIZER: &[u8] = include_bytes!("../assets/stories260k/tok512.bin");
    load_llama2c_bytes(MODEL, TOKENIZER, Path::new("<embedded>/stories260K.bin"))
}

fn load_inner(
    bytes: &[u8],
    tok_bytes: &[u8],
    source: &Path,
    tok_source: &Path,
) -> Result<RawModel> {
    let header = Llama2cHeader::parse(bytes, bytes.len(), source)?;
    let tokenizer = Llama2cTokenizer::from_bytes(tok_bytes, Some(header.vocab_size), tok_source)?;
    let params = header.hyper_params();
    params.validate(source)?;

    // The header check made the file exactly header + sections; slices are still checked.
    let sections = header
        .sections()
        .ok_or_else(|| ModelError::Invalid("llama2.c sizes overflow".into()))?;
    let mut offsets: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let mut pos = HEADER_BYTES;
    for (name, n) in sections {
        offsets.insert(name, (pos, n));
        pos = n
            .checked_mul(4)
            .and_then(|b| b.checked_add(pos))
            .ok_or_else(|| ModelError::Invalid("llama2.c sizes overflow".into()))?;
    }
    // `count` f32 values of section `name` from element `first`, decoded from the file.
    let values = |name: &str, first: usize, count: usize| -> Result<Vec<f32>> {
        let short = || ModelError::Llama2c {
            path: source.to_path_buf(),
            reason: format!("section {name} is too short for {count} values at {first}"),
        };
        let &(base, n) = offsets.get(name).ok_or_else(short)?;
        let end = first
            .checked_add(count)
            .filter(|&e| e <= n)
            .ok_or_else(short)?;
        let chunk = bytes
            .get(base + 4 * first..base + 4 * end)
            .ok_or_else(short)?;
        Ok(chunk
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    };
    let (d, h, kv, hs) = (
        header.dim,
        header.hidden_dim,
        header.kv_dim(),
        header.head_size(),
    );
    let take = |name: &str| -> Result<Vec<f32>> {
        let n = offsets.get(name).map_or(0, |&(_, n)| n);
        values(name, 0, n)
    };

    let mut tensors = BTreeMap::new();
    let mut put = |hf: String, src: String, values: Vec<f32>, shape: &[usize]| -> Result<()> {
        let t = finite_tensor(source, &format!("{src} ({hf})"), values, shape)?;
        tensors.insert(hf, t);
        Ok(())
    };
    put(
        "model.embed_tokens.weight".into(),
        "token_embedding".into(),
        take("token_embedding")?,
        &[header.vocab_size, d],
    )?;
    put(
        "model.norm.weight".into(),
        "rms_final".into(),
        take("rms_final")?,
        &[d],
    )?;
    if !header.shared_classifier {
        put(
            "lm_head.weight".into(),
            "wcls".into(),
            take("wcls")?,
            &[header.vocab_size, d],
        )?;
    }
    let stacked = [
        "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w3", "w2",
    ];
    for layer in 0..header.n_layers {
        let [ln1, q, k, v, o, ln2, gate, up, down] = hf_layer_tensor_names(layer);
        // (HF name, llama2.c section index in `stacked`, per-layer shape, RoPE heads).
        let parts: [(String, usize, Vec<usize>, Option<usize>); 9] = [
            (ln1, 0, vec![d], None),
            (q, 1, vec![d, d], Some(header.n_heads)),
            (k, 2, vec![kv, d], Some(header.n_kv_heads)),
            (v, 3, vec![kv, d], None),
            (o, 4, vec![d, d], None),
            (ln2, 5, vec![d], None),
            (gate, 6, vec![h, d], None),
            (up, 7, vec![h, d], None),
            (down, 8, vec![d, h], None),
        ];
        for (hf, idx, shape, rope) in parts {
            let per_layer: usize = shape.iter().product();
            let src = values(stacked[idx], layer * per_layer, per_layer)?;
            let values = match rope {
                Some(heads) => unpermute_interleaved_rope(&src, heads, hs, d)?,
                None => src,
            };
            put(hf, format!("{}[{layer}]", stacked[idx]), values, &shape)?;
        }
    }
    Ok(RawModel {
        config: params.to_hf_config(),
        tensors,
        tokenizer: Arc::new(tokenizer) as Arc<dyn Tokenizer>,
        source: source.to_path_buf(),
        format: "llama2.c",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(fields: [i32; 7]) -> Vec<u8> {
        fields.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn header_validation() {
        let p = Path::new("m.bin");
        let h = |f: [i32; 7]| {
            let bytes = header(f);
            Llama2cHeader::parse(&bytes, usize::MAX, p)
        };
        for bad in [
            [0, 8, 1, 2, 2, 4, 4],
            [8, 8, 1, 0, 1, 4, 4],
            [8, 8, 1, 2, 0, 4, 4],
            [8, 8, 1, 3, 3, 4, 4],  // 8 % 3 != 0
            [8, 8, 1, 4, 3, 4, 4],  // 4 % 3 != 0
            [8, 8, 1, 8, 8, 4, 4],  // head size 1 is odd
            [8, 8, -1, 2, 2, 4, 4], // negative layers
            [8, 8, 1, 2, 2, 0, 4],  // zero vocab
            [i32::MAX, i32::MAX, i32::MAX, 2, 2, i32::MAX, i32::MAX],
        ] {
            assert!(matches!(h(bad), Err(ModelError::Llama2c { .. })), "{bad:?}");
        }
        // Sizes are right but the file length is not.
        assert!(matches!(
            h([8, 8, 1, 2, 2, 4, 4]),
            Err(ModelError::Llama2c { .. })
        ));
        let ok = Llama2cHeader {
            dim: 8,
            hidden_dim: 8,
            n_layers: 1,
            n_heads: 2,
            n_kv_heads: 2,
            vocab_size: 4,
            seq_len: 4,
            shared_classifier: false,
        };
        let size = ok.file_size().unwrap();
        // 4*8 emb + 8 + 64*4 (q,k,v,o) + 8 + 64*3 + 8 + 2*4*2 freq + 32 wcls, in f32, + header.
        assert_eq!(size, 28 + 4 * (32 + 8 + 256 + 8 + 192 + 8 + 16 + 32));
        assert_eq!(
            Llama2cHeader::parse(&header([8, 8, 1, 2, 2, -4, 4]), size, p).unwrap(),
            ok
        );
        assert!(Llama2cHeader::parse(&header([8, 8, 1, 2, 2, -4, 4]), size - 4, p).is_err());
        assert!(Llama2cHeader::parse(&header([8, 8, 1, 2, 2, 4, 4])[..27], size, p).is_err());
        let mut magic = header([0, 2, 8, 8, 1, 2, 2]);
        magic[..4].copy_from_slice(&VERSIONED_MAGIC.to_le_bytes());
        assert!(Llama2cHeader::parse(&magic, size, p)
            .unwrap_err()
            .to_string()
            .contains("ak42"));
    }

    #[test]
    fn embedded_model_loads() {
        let m = embedded_stories260k().unwrap();
        assert_eq!(m.format, "llama2.c");
        assert_eq!(m.config["hidden_size"], 64);
        assert_eq!(m.config["num_key_value_heads"], 4);
        assert_eq!(m.tensors.len(), 2 + 5 * 9);
        assert_eq!(m.tokenizer.vocab_size(), 512);
    }
}
