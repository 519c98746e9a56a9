#!/usr/bin/env python3
"""Reference perplexity of SmolLM2-135M-Instruct (GGUF dequantized to f32) on wiki.test.txt.

Contract (shared with the Rust evaluator): tokenize the whole file without special tokens
(no BOS); take non-overlapping windows of --seq-len tokens from the start, at most
--max-windows of them; inside each window every token but the first is predicted;
ppl = exp(total NLL / total predicted tokens).

Usage: python tests/reference/ppl_smollm2.py --seq-len 512 --max-windows 40 --threads 2
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from make_fixtures import DEFAULT_ASSETS, REPO, load_smollm, smollm_pretokenizer_fixed, versions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--assets", type=Path, default=DEFAULT_ASSETS)
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "reference" / "results" / "ppl_smollm2.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()

    tok, model = load_smollm(args.assets, attn="sdpa")
    text = (args.assets / "wikitext-2" / "wiki.test.txt").read_text(encoding="utf-8")
    # llama.cpp's 'smollm' pre-tokenizer (what the GGUF declares); transformers' GGUF tokenizer
    # drops its digit split.  Both agree on every window used here (checked below).
    ids = smollm_pretokenizer_fixed(tok).encode(text, add_special_tokens=False).ids
    hf_ids = tok(text, add_special_tokens=False).input_ids

    n_windows = min(args.max_windows, len(ids) // args.seq_len)
    used = n_windows * args.seq_len
    assert ids[:used] == hf_ids[:used], "tokenizers disagree inside the evaluated windows"

    total_nll, total_tok, per_window = 0.0, 0, []
    with torch.inference_mode():
        for w in range(n_windows):
            x = torch.tensor([ids[w * args.seq_len:(w + 1) * args.seq_len]])
            logits = model(input_ids=x, use_cache=False).logits[0, :-1].double()
            nll = -torch.log_softmax(logits, dim=-1).gather(1, x[0, 1:, None]).sum().item()
            per_window.append(round(nll / (args.seq_len - 1), 6))
            total_nll += nll
            total_tok += args.seq_len - 1
    ppl = math.exp(total_nll / total_tok)
    wall = time.time() - t0

    result = {
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf dequantized to f32 (transformers)",
        "dataset": "wikitext-2 wiki.test.txt (raw file, no special tokens, no BOS)",
        "ppl": ppl,
        "total_nll": total_nll,
        "seq_len": args.seq_len,
        "windows": n_windows,
        "predicted_tokens": total_tok,
        "file_tokens": len(ids),
        "file_tokens_transformers_gguf_tokenizer": len(hf_ids),
        "window_mean_nll": per_window,
        "threads": args.threads,
        "attn_implementation": "sdpa",
        "logits_dtype": "float32 (log-softmax and sums in float64)",
        **versions(),
        "date": "2026-11-23",
        "wall_time_s": round(wall, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"ppl {ppl:.4f} over {n_windows} windows, {total_tok} tokens, {wall:.0f}s")


if __name__ == "__main__":
    main()
