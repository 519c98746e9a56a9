#!/usr/bin/env python3
"""Generate the golden fixtures used by the Rust tests of smoothquant-rs.

Python is only a reference tool: its outputs under tests/fixtures/ are committed and the
Rust tests never run Python.  Everything here is deterministic (fixed seeds, CPU, f32).

Outputs
  tests/fixtures/hf/<name>/            small random HF models (config.json, safetensors,
                                       tokenizer.json, tokenizer_config.json, golden.safetensors)
  tests/fixtures/real/stories260k_golden.safetensors   NumPy re-implementation of llama2.c run.c
  tests/fixtures/real/smollm2_golden.safetensors       transformers, GGUF dequantized to f32

Usage: python tests/reference/make_fixtures.py [--only hf,stories,smollm] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.numpy import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BloomConfig,
    BloomForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
DEFAULT_ASSETS = REPO.parent / "shared" / "assets"

VOCAB = 320
MAX_POS = 128
# Special tokens come first in the trained vocab, so their ids are fixed.
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]

# Prompts: (text, number of leading tokens kept).  Truncating to a fixed length keeps the
# shapes stable even if the tokenizer merges differ slightly.
PROMPTS = [
    ("The", 1),
    ("The game was released in Japan.", 7),
    ("In 1996, the team won the championship after a long season of hard work and many close games.", 19),
]
ARBITRARY_LEN = 40  # > original_max_position_embeddings (32) of llama-tied-bf16

OUTLIER_FACTOR = 20.0  # on the residual stream (embedding columns)
NORM_OUTLIER_FACTOR = 5.0  # on the same channels of every per-layer norm gamma


def versions() -> dict[str, str]:
    return {
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "numpy_version": np.__version__,
    }


def save_file(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str]) -> None:
    """Write a safetensors file with a sorted header.

    safetensors' own writer orders `__metadata__` from a hash map, so regenerating would
    churn the committed bytes; a sorted header makes regeneration byte-identical.
    """
    dtypes = {np.dtype(np.float32): "F32", np.dtype(np.int32): "I32"}  # the only golden dtypes
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, off = [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        data = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": dtypes[a.dtype], "shape": list(a.shape), "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
    back = load_file(path)
    assert all(np.array_equal(back[k], tensors[k]) for k in tensors)


# --------------------------------------------------------------------------------------
# Tokenizer shared by all random fixtures
# --------------------------------------------------------------------------------------

def train_tokenizer(assets: Path) -> Tokenizer:
    text = (assets / "wikitext-2" / "wiki.valid.txt").read_text(encoding="utf-8")
    text = text[: text.rfind("\n", 0, 200_000) + 1]  # first ~200 KB, whole lines
    tok = Tokenizer(models.BPE())
    # GPT-2 style byte-level BPE: same family as SmolLM2/OPT/BLOOM tokenizers.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i
    return tok


TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
    "add_bos_token": False,
    "add_eos_token": False,
    "clean_up_tokenization_spaces": False,
    "model_max_length": MAX_POS,
}


def make_prompts(tok: Tokenizer, seed: int) -> list[tuple[str, np.ndarray]]:
    out = []
    for text, n in PROMPTS:
        ids = tok.encode(text).ids
        assert len(ids) >= n, (text, len(ids))
        out.append((text, np.asarray(ids[:n], dtype=np.int32)))
    # Arbitrary ids: cover the whole vocab range, including the special ids and the last id.
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=ARBITRARY_LEN).astype(np.int32)
    ids[[3, 11, 29]] = [0, VOCAB - 1, EOS_ID]
    out.append(("<arbitrary ids>", ids))
    return out


# --------------------------------------------------------------------------------------
# Random models
# --------------------------------------------------------------------------------------

COMMON = dict(vocab_size=VOCAB, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)


def llama_cfg(**kw) -> LlamaConfig:
    base = dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=MAX_POS, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, **COMMON,
    )
    base.update(kw)
    return LlamaConfig(**base)


def opt_cfg(**kw) -> OPTConfig:
    base = dict(
        hidden_size=64, num_attention_heads=4, ffn_dim=128, num_hidden_layers=2,
        max_position_embeddings=MAX_POS, word_embed_proj_dim=64, do_layer_norm_before=True,
        activation_function="relu", dropout=0.0, attention_dropout=0.0, enable_bias=True,
        tie_word_embeddings=True, **COMMON,
    )
    base.update(kw)
    return OPTConfig(**base)


def bloom_cfg(**kw) -> BloomConfig:
    base = dict(
        hidden_size=64, n_head=4, n_layer=2, layer_norm_epsilon=1e-5,
        hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=True, **COMMON,
    )
    base.update(kw)
    return BloomConfig(**base)


# name -> (model class, config, seed, save dtype, max_shard_size or None)
FIXTURE_SPECS = {
    "llama-gqa": (LlamaForCausalLM, lambda: llama_cfg(), 1001, torch.float32, "150KB"),
    "llama-tied-bf16": (
        LlamaForCausalLM,
        lambda: llama_cfg(
            num_key_value_heads=4, tie_word_embeddings=True,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        ),
        1002, torch.bfloat16, None,
    ),
    "llama-linear-rope": (
        LlamaForCausalLM,
        # One KV head: exercises the MQA corner of GQA.
        lambda: llama_cfg(num_key_value_heads=1, rope_scaling={"rope_type": "linear", "factor": 2.0}),
        1003, torch.float32, None,
    ),
    "qwen2-bias": (
        Qwen2ForCausalLM,
        lambda: Qwen2Config(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=MAX_POS, rms_norm_eps=1e-6,
            rope_theta=10000.0, tie_word_embeddings=False, use_sliding_window=False, **COMMON,
        ),
        1004, torch.float32, None,
    ),
    "opt-prenorm": (OPTForCausalLM, lambda: opt_cfg(), 1005, torch.float32, None),
    "opt-postnorm": (OPTForCausalLM, lambda: opt_cfg(do_layer_norm_before=False), 1006, torch.float32, None),
    "opt-project": (
        OPTForCausalLM,
        lambda: opt_cfg(do_layer_norm_before=False, word_embed_proj_dim=32),
        1007, torch.bfloat16, None,
    ),
    "bloom": (BloomForCausalLM, lambda: bloom_cfg(), 1008, torch.float32, None),
    "bloom-bf16": (BloomForCausalLM, lambda: bloom_cfg(), 1009, torch.bfloat16, None),
}


def head_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The norm whose output feeds the LM head (outlier channels are damped there)."""
    name = type(model).__name__
    if name.startswith("OPT"):
        dec = model.model.decoder
        return dec.final_layer_norm if dec.final_layer_norm is not None else dec.layers[-1].final_layer_norm
    if name.startswith("Bloom"):
        return model.transformer.ln_f
    return model.model.norm


@torch.no_grad()
def reinit(model: torch.nn.Module, seed: int) -> list[int]:
    """Re-draw weights with a larger scale so logits have spread, and inject outlier channels.

    Default HF init (std 0.02) gives near-uniform logits, which makes parity tests weak.
    """
    g = torch.Generator().manual_seed(seed)

    def normal_(t, std):
        t.copy_(torch.randn(t.shape, generator=g) * std)

    def uniform_(t, lo, hi):
        t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=g))

    seen = set()
    for _, mod in sorted(model.named_modules(), key=lambda kv: kv[0]):
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.nn.Parameter) or id(w) in seen:
            continue  # tied lm_head shares the embedding tensor
        seen.add(id(w))
        b = getattr(mod, "bias", None)
        if isinstance(mod, torch.nn.Linear):
            normal_(w, 0.25)
        elif isinstance(mod, torch.nn.Embedding):
            normal_(w, 0.5)
        elif w.ndim == 1:  # LayerNorm / RMSNorm gamma
            uniform_(w, 0.7, 1.3)
        else:
            raise RuntimeError(f"unexpected module {type(mod)}")
        if isinstance(b, torch.nn.Parameter):
            uniform_(b, -0.1, 0.1)

    hidden = model.config.hidden_size
    chans = sorted(torch.randperm(hidden, generator=g)[:3].tolist())
    name = type(model).__name__
    if name.startswith("OPT") and model.model.decoder.project_in is not None:
        # Residual stream starts after project_in: scale its output rows.
        model.model.decoder.project_in.weight[chans, :] *= OUTLIER_FACTOR
    else:
        model.get_input_embeddings().weight[:, chans] *= OUTLIER_FACTOR
    # Block outputs soon dilute the residual outliers; large gammas on the same channels keep
    # every linear input outlier-heavy, the way real LLMs' LayerNorm gammas do.
    for n, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if (".layers." in n or ".h." in n) and isinstance(w, torch.nn.Parameter) and w.ndim == 1:
            w[chans] *= NORM_OUTLIER_FACTOR
    # Keep the LM head from being dominated by the outliers (matters with tied embeddings).
    head_norm(model).weight[chans] /= OUTLIER_FACTOR
    return chans


@torch.no_grad()
def activation_outlier_ratios(model, ids: torch.Tensor) -> dict[str, float]:
    """max/median of per-channel absmax of the inputs of each layer's first two linears."""
    stats, hooks = {}, []
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and any(
            n.endswith(s) for s in ("q_proj", "gate_proj", "fc1", "query_key_value", "dense_h_to_4h")
        ):
            def hook(mod, args, n=n):
                a = args[0].reshape(-1, args[0].shape[-1]).abs().amax(0)
                stats[n] = float(a.max() / a.median())
            hooks.append(m.register_forward_pre_hook(hook))
    model(input_ids=ids[None], use_cache=False)
    for h in hooks:
        h.remove()
    return stats


def augment_config_json(path: Path) -> None:
    """Add the transformers-4.x spellings next to the 5.x ones.

    transformers 5 writes `dtype` and `rope_parameters`; most checkpoints in the wild (and
    loaders written against them) use `torch_dtype`, `rope_theta` and `rope_scaling`.
    Writing both lets the Rust loader be tested against the common layout; transformers
    itself reads either.
    """
    cfg = json.loads(path.read_text())
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg["dtype"]
    rp = cfg.get("rope_parameters")
    if rp is not None:
        cfg["rope_theta"] = rp["rope_theta"]
        extra = {k: v for k, v in rp.items() if k != "rope_theta"}
        cfg["rope_scaling"] = extra if rp.get("rope_type", "default") != "default" else None
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def load_f32(path: Path):
    # Loading back the saved directory upcasts bf16 exactly as a Rust loader would.
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return m.eval()


@torch.no_grad()
def all_logits(model, ids: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(ids.astype(np.int64))[None]
    return model(input_ids=x, use_cache=False).logits[0].float().numpy()


def make_hf_fixture(name: str, tok: Tokenizer, log: dict) -> None:
    cls, cfg_fn, seed, save_dtype, shard = FIXTURE_SPECS[name]
    out = FIXTURES / "hf" / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    torch.manual_seed(seed)
    cfg = cfg_fn()
    cfg._attn_implementation = "eager"
    model = cls(cfg).eval()
    chans = reinit(model, seed)
    model = model.to(save_dtype)
    prompts = make_prompts(tok, seed)

    # Reference computed in memory from the rounded weights, to check save/load.  A fresh
    # module is used because .to(bf16) also rounds non-persistent buffers (RoPE inv_freq)
    # that a loader recomputes in f32.
    mem = cls(cfg).eval()
    mem.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    mem_logits = [all_logits(mem, ids) for _, ids in prompts]
    ratios = activation_outlier_ratios(mem, torch.from_numpy(prompts[-1][1].astype(np.int64)))

    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(out, **kw)
    augment_config_json(out / "config.json")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    if shard:
        assert (out / "model.safetensors.index.json").exists(), "expected a sharded checkpoint"

    model = load_f32(out)
    tensors, meta = {}, {"fixture": name, "save_dtype": str(save_dtype).removeprefix("torch."),
                         "outlier_channels": json.dumps(chans), "num_prompts": str(len(prompts)),
                         "attn_implementation": "eager", **versions()}
    for i, (text, ids) in enumerate(prompts):
        logits = all_logits(model, ids)
        # Saving and reloading must not change the model (bf16: the saved file is the rounded model).
        np.testing.assert_allclose(logits, mem_logits[i], rtol=0, atol=1e-5)
        tensors[f"input_ids.{i}"] = ids
        tensors[f"logits.{i}"] = logits.astype(np.float32)
        meta[f"prompt.{i}"] = text
        meta[f"prompt_decoded.{i}"] = tok.decode(ids.tolist(), skip_special_tokens=False)
    golden = out / "golden.safetensors"
    save_file(tensors, str(golden), metadata=meta)

    # Independent reload: a fresh model from disk must reproduce the stored goldens.
    again, model2 = load_file(str(golden)), load_f32(out)
    for i in range(len(prompts)):
        assert again[f"input_ids.{i}"].dtype == np.int32
        np.testing.assert_array_equal(all_logits(model2, again[f"input_ids.{i}"]), again[f"logits.{i}"])

    lstd = float(np.mean([tensors[f"logits.{i}"].std(axis=-1).mean() for i in range(len(prompts))]))
    size = sum(f.stat().st_size for f in out.iterdir())
    log[name] = {"logits_std": round(lstd, 3), "outlier_channels": chans,
                 "act_absmax_ratio": {k: round(v, 1) for k, v in ratios.items()}, "bytes": size}
    print(f"[hf] {name}: logits std {lstd:.2f}, outliers {chans}, {size / 1024:.0f} KiB, "
          f"act ratios {[round(v) for v in ratios.values()]}")


# --------------------------------------------------------------------------------------
# stories260K: independent NumPy oracle of llama2.c run.c
# --------------------------------------------------------------------------------------

def read_llama2c(path: Path) -> dict:
    raw = path.read_bytes()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", raw[:28])
    shared = vocab > 0
    vocab = abs(vocab)
    hs, kv_dim = dim // n_heads, (dim // n_heads) * n_kv
    data = np.frombuffer(raw, dtype="<f4", offset=28)
    off = 0

    def take(*shape):
        nonlocal off
        n = int(np.prod(shape))
        t = data[off:off + n].reshape(shape)
        off += n
        return t

    w = dict(dim=dim, hidden=hidden, n_layers=n_layers, n_heads=n_heads, n_kv=n_kv,
             vocab=vocab, seq_len=seq_len)
    w["tok"] = take(vocab, dim)
    w["rms_att"] = take(n_layers, dim)
    w["wq"] = take(n_layers, dim, dim)
    w["wk"] = take(n_layers, kv_dim, dim)
    w["wv"] = take(n_layers, kv_dim, dim)
    w["wo"] = take(n_layers, dim, dim)
    w["rms_ffn"] = take(n_layers, dim)
    w["w1"] = take(n_layers, hidden, dim)
    w["w2"] = take(n_layers, dim, hidden)
    w["w3"] = take(n_layers, hidden, dim)
    w["rms_final"] = take(dim)
    take(seq_len, hs // 2)  # legacy freq_cis_real
    take(seq_len, hs // 2)  # legacy freq_cis_imag
    w["wcls"] = w["tok"] if shared else take(vocab, dim)
    assert off == data.size, (off, data.size)
    return w


def llama2c_forward(w: dict, tokens: list[int]) -> np.ndarray:
    """Logits [T, vocab] for all positions; same math as run.c's forward(), in float64."""
    f = lambda a: a.astype(np.float64)
    dim, nh, nkv = w["dim"], w["n_heads"], w["n_kv"]
    hs = dim // nh
    T = len(tokens)

    def rmsnorm(x, g):
        return f(g) * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5)

    # run.c rotates adjacent pairs (2i, 2i+1) of each head with freq 10000^(-2i/head_size).
    pos = np.arange(T, dtype=np.float64)[:, None]
    freq = 1.0 / 10000.0 ** (np.arange(0, hs, 2, dtype=np.float64) / hs)
    cos, sin = np.cos(pos * freq), np.sin(pos * freq)  # [T, hs/2]

    def rope(v, n):  # v: [T, n*hs]
        v = v.reshape(T, n, hs // 2, 2)
        v0, v1 = v[..., 0], v[..., 1]
        c, s = cos[:, None, :], sin[:, None, :]
        return np.stack([v0 * c - v1 * s, v0 * s + v1 * c], axis=-1).reshape(T, n, hs)

    mask = np.triu(np.full((T, T), -np.inf), k=1)
    x = f(w["tok"][tokens])
    for l in range(w["n_layers"]):
        xb = rmsnorm(x, w["rms_att"][l])
        q = rope(xb @ f(w["wq"][l]).T, nh)
        k = rope(xb @ f(w["wk"][l]).T, nkv)
        v = (xb @ f(w["wv"][l]).T).reshape(T, nkv, hs)
        rep = nh // nkv  # query head h uses kv head h // rep, as run.c's kv_mul
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        att = np.einsum("thd,shd->hts", q, k) / np.sqrt(hs) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", att, v).reshape(T, dim)
        x = x + o @ f(w["wo"][l]).T
        xb = rmsnorm(x, w["rms_ffn"][l])
        h1, h3 = xb @ f(w["w1"][l]).T, xb @ f(w["w3"][l]).T
        x = x + (h1 / (1.0 + np.exp(-h1)) * h3) @ f(w["w2"][l]).T
    x = rmsnorm(x, w["rms_final"])
    return x @ f(w["wcls"]).T


def llama2c_encode(tok_bin: Path, text: str) -> list[int]:
    """run.c's encode(): dummy-prefix space, per-char lookup (byte fallback +3), greedy merges by score."""
    raw = tok_bin.read_bytes()
    (max_len,) = struct.unpack_from("<i", raw, 0)
    off, pieces, scores = 4, [], []
    while off < len(raw):
        score, n = struct.unpack_from("<fi", raw, off)
        off += 8
        pieces.append(raw[off:off + n])
        scores.append(score)
        off += n
    lookup = {p: i for i, p in enumerate(pieces)}
    ids = [lookup[b" "]] if text else []
    for ch in text:
        b = ch.encode("utf-8")
        ids.extend([lookup[b]] if b in lookup else [x + 3 for x in b])
    while True:
        best, best_i = -1e10, -1
        for i in range(len(ids) - 1):
            j = lookup.get(pieces[ids[i]] + pieces[ids[i + 1]])
            if j is not None and scores[j] > best:
                best, best_i = scores[j], i
        if best_i < 0:
            return ids
        ids[best_i:best_i + 2] = [lookup[pieces[ids[best_i]] + pieces[ids[best_i + 1]]]]


@torch.no_grad()
def check_stories_vs_transformers(w: dict, tokens: list[int], ref: np.ndarray) -> float:
    """Cross-check (not the oracle): HF Llama needs wq/wk permuted from interleaved to half-split RoPE."""
    dim, nh, nkv = w["dim"], w["n_heads"], w["n_kv"]
    cfg = LlamaConfig(vocab_size=w["vocab"], hidden_size=dim, intermediate_size=w["hidden"],
                      num_hidden_layers=w["n_layers"], num_attention_heads=nh, num_key_value_heads=nkv,
                      max_position_embeddings=w["seq_len"], rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=True)
    cfg._attn_implementation = "eager"
    m = LlamaForCausalLM(cfg).eval()

    def permute(t, n):  # same as transformers' convert_llama_weights_to_hf.py
        rows, cols = t.shape
        return torch.from_numpy(t.copy()).view(n, rows // n // 2, 2, cols).transpose(1, 2).reshape(rows, cols)

    sd = {"model.embed_tokens.weight": torch.from_numpy(w["tok"].copy()),
          "model.norm.weight": torch.from_numpy(w["rms_final"].copy())}
    for l in range(w["n_layers"]):
        p = f"model.layers.{l}."
        sd[p + "input_layernorm.weight"] = torch.from_numpy(w["rms_att"][l].copy())
        sd[p + "post_attention_layernorm.weight"] = torch.from_numpy(w["rms_ffn"][l].copy())
        sd[p + "self_attn.q_proj.weight"] = permute(w["wq"][l], nh)
        sd[p + "self_attn.k_proj.weight"] = permute(w["wk"][l], nkv)
        sd[p + "self_attn.v_proj.weight"] = torch.from_numpy(w["wv"][l].copy())
        sd[p + "self_attn.o_proj.weight"] = torch.from_numpy(w["wo"][l].copy())
        sd[p + "mlp.gate_proj.weight"] = torch.from_numpy(w["w1"][l].copy())
        sd[p + "mlp.down_proj.weight"] = torch.from_numpy(w["w2"][l].copy())
        sd[p + "mlp.up_proj.weight"] = torch.from_numpy(w["w3"][l].copy())
    m.load_state_dict(sd, strict=False)
    m.tie_weights()
    hf = m(input_ids=torch.tensor([tokens]), use_cache=False).logits[0].numpy()
    return float(np.abs(hf - ref).max())


def make_stories(assets: Path) -> None:
    import sentencepiece as spm

    d = assets / "stories260k"
    w = read_llama2c(d / "stories260K.bin")
    sp = spm.SentencePieceProcessor(model_file=str(d / "tok512.model"))
    prompt = "Once upon a time"
    ids = [1] + sp.encode(prompt)
    assert ids == [1] + llama2c_encode(d / "tok512.bin", prompt), "sentencepiece vs run.c encode"

    logits = llama2c_forward(w, ids)
    seq = list(ids)
    for _ in range(30):  # greedy = run.c with temperature 0
        seq.append(int(np.argmax(llama2c_forward(w, seq)[-1])))
    greedy = seq[len(ids):]
    text = sp.decode(seq)
    expect = "Once upon a time, there was a little girl named Lily"
    assert text.startswith(expect), f"greedy text mismatch: {text!r}"
    diff = check_stories_vs_transformers(w, ids, logits)
    assert diff < 1e-4, diff

    out = FIXTURES / "real"
    out.mkdir(parents=True, exist_ok=True)
    meta = {"prompt": prompt, "greedy_text": text, "input_ids_note": "[BOS=1] + sentencepiece(tok512.model)",
            "computed_in": "float64 numpy re-implementation of llama2.c run.c, stored as f32",
            "hf_permuted_max_abs_diff": f"{diff:.3e}", **versions()}
    save_file({"input_ids": np.asarray(ids, np.int32), "logits": logits.astype(np.float32),
               "greedy_ids": np.asarray(greedy, np.int32)},
              str(out / "stories260k_golden.safetensors"), metadata=meta)
    print(f"[stories] ids {ids}; greedy {greedy}\n[stories] text {text!r}; HF cross-check max diff {diff:.2e}")


# --------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (GGUF Q4_1/Q8_0 dequantized to f32 by transformers)
# --------------------------------------------------------------------------------------

SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm_pretokenizer_fixed(tok) -> Tokenizer:
    """The tokenizer llama.cpp runs for tokenizer.ggml.pre == 'smollm'.

    llama.cpp (and SmolLM2's original tokenizer.json) split every digit first (\\p{N}), then
    apply the GPT-2 regex.  transformers' GGUF converter only installs the plain ByteLevel
    pre-tokenizer, which differs on a few whitespace+digit runs.
    """
    t = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    t.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return t


def load_smollm(assets: Path, attn: str = "eager"):
    d = assets / "smollm2-135m-instruct"
    tok = AutoTokenizer.from_pretrained(d, gguf_file=SMOL_FILE)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=SMOL_FILE, dtype=torch.float32,
                                                 attn_implementation=attn)
    return tok, model.eval()


def check_gguf_qk_layout(assets: Path, model) -> float:
    """GGUF llama attn_q/attn_k rows are in interleaved-RoPE order; transformers un-permutes them."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    r = GGUFReader(assets / "smollm2-135m-instruct" / SMOL_FILE)
    t = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight")
    raw = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(576, 576).copy())
    nh = model.config.num_attention_heads
    hf_layout = raw.view(nh, 576 // nh // 2, 2, 576).transpose(1, 2).reshape(576, 576)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(raw, q), "expected GGUF Q rows to be permuted"
    return float((hf_layout - q).abs().max())


@torch.no_grad()
def make_smollm(assets: Path) -> None:
    tok, model = load_smollm(assets)
    qk_diff = check_gguf_qk_layout(assets, model)
    assert qk_diff == 0.0, qk_diff

    prompt = "The capital of France is"
    ids = tok(prompt, add_special_tokens=False).input_ids
    x = torch.tensor([ids])
    last = model(input_ids=x, use_cache=False).logits[0, -1].numpy()
    seq = x
    for _ in range(8):
        nxt = model(input_ids=seq, use_cache=False).logits[0, -1].argmax()
        seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    greedy = seq[0, len(ids):].tolist()
    text = tok.decode(greedy)
    assert text.startswith(" Paris"), text

    wiki = (assets / "wikitext-2" / "wiki.test.txt").read_text(encoding="utf-8")
    wiki_ids = tok(wiki, add_special_tokens=False).input_ids
    fixed = smollm_pretokenizer_fixed(tok)
    fixed_ids = fixed.encode(wiki, add_special_tokens=False).ids
    n = 20480
    # The two pre-tokenizers first diverge far beyond the stored prefix, so the prefix is unambiguous.
    assert wiki_ids[:n] == fixed_ids[:n]
    probe = "In 2011 :\n\n\n 1st Division , 4 ½ months"
    probe_hf, probe_fixed = tok(probe, add_special_tokens=False).input_ids, fixed.encode(probe).ids

    out = FIXTURES / "real"
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "prompt": prompt, "greedy_text": text, "gguf_file": SMOL_FILE,
        "wikitext_test_total_tokens": str(len(fixed_ids)),
        "wikitext_test_total_tokens_transformers_gguf": str(len(wiki_ids)),
        "tokenizer_note": "wikitext_test_total_tokens uses llama.cpp's 'smollm' pre-tokenizer "
                          "(digits split, then GPT-2 regex); transformers' GGUF tokenizer omits the digit "
                          "split and gives the *_transformers_gguf count. The stored ids are identical for both.",
        "tokenizer_probe_text": probe,
        "qk_layout_note": "GGUF attn_q/attn_k rows are interleaved-RoPE order; HF row = "
                          "view(n_head, head_dim/2, 2, in).transpose(1,2) of GGUF rows",
        "attn_implementation": "eager", **versions(),
    }
    save_file({
        "input_ids": np.asarray(ids, np.int32),
        "last_logits": last.astype(np.float32),
        "greedy_ids": np.asarray(greedy, np.int32),
        "wikitext_test_ids": np.asarray(wiki_ids[:n], np.int32),
        "tokenizer_probe_ids": np.asarray(probe_fixed, np.int32),
        "tokenizer_probe_ids_transformers_gguf": np.asarray(probe_hf, np.int32),
    }, str(out / "smollm2_golden.safetensors"), metadata=meta)
    print(f"[smollm] ids {ids}; greedy {greedy} {text!r}; wikitext tokens {len(fixed_ids)} "
          f"(transformers GGUF tokenizer: {len(wiki_ids)}); probe {probe_fixed} vs {probe_hf}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", type=Path, default=DEFAULT_ASSETS)
    ap.add_argument("--only", default="hf,stories,smollm", help="comma list of: hf, stories, smollm")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    only = set(args.only.split(","))
    t0 = time.time()

    if "hf" in only:
        tok = train_tokenizer(args.assets)
        log: dict = {}
        for name in FIXTURE_SPECS:
            make_hf_fixture(name, tok, log)
        (FIXTURES / "hf" / "summary.json").write_text(json.dumps(log, indent=2) + "\n")
    if "stories" in only:
        make_stories(args.assets)
    if "smollm" in only:
        make_smollm(args.assets)
    print(f"done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
