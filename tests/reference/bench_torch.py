#!/usr/bin/env python3
"""PyTorch f32 CPU baseline for SmolLM2-135M (GGUF dequantized to f32): prefill and decode speed.

Prefill: tokens/s for one forward over prompts of 128, 512 and 2048 tokens.
Decode:  tokens/s for 64 greedy single-token steps with the KV cache after a 512-token prompt
         (the prompt's prefill is not timed).
Each measurement: one warm-up, then the median of --reps runs, at 1 and 2 threads.

Usage: python tests/reference/bench_torch.py [--reps 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from make_fixtures import DEFAULT_ASSETS, REPO, load_smollm, versions

PREFILL_LENS = (128, 512, 2048)
DECODE_PROMPT, DECODE_STEPS = 512, 64


def machine() -> dict:
    info = {"cpu": "unknown", "logical_cpus": os.cpu_count(), "platform": platform.platform()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and info["cpu"] == "unknown":
                info["cpu"] = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                # SIMD level decides which kernels torch (and the Rust side) can use.
                flags = set(line.split(":", 1)[1].split())
                info["simd_flags"] = sorted(f for f in flags if f.startswith(("avx", "fma", "amx")))
                break
        mem = next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
        info["mem_total"] = mem.split(":", 1)[1].strip()
    except OSError:
        pass
    return info


def median_time(fn, reps: int) -> float:
    fn()  # warm-up: allocator, oneDNN/MKL kernel selection
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.inference_mode()
def bench(model, ids: list[int], reps: int) -> dict:
    out = {}
    for n in PREFILL_LENS:
        x = torch.tensor([ids[:n]])
        dt = median_time(lambda: model(input_ids=x, use_cache=False), reps)
        out[f"prefill_{n}"] = {"tokens": n, "median_s": round(dt, 4), "tokens_per_s": round(n / dt, 1)}

    prompt = torch.tensor([ids[:DECODE_PROMPT]])

    def decode():
        # The untimed part (prefill) is excluded by timing the loop only.
        o = model(input_ids=prompt, use_cache=True)
        cache, nxt = o.past_key_values, o.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(DECODE_STEPS):
            o = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            cache, nxt = o.past_key_values, o.logits[:, -1:].argmax(-1)
        return time.perf_counter() - t

    decode()  # warm-up
    dt = statistics.median(decode() for _ in range(reps))
    out[f"decode_{DECODE_STEPS}_after_{DECODE_PROMPT}"] = {
        "tokens": DECODE_STEPS, "median_s": round(dt, 4), "tokens_per_s": round(DECODE_STEPS / dt, 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--assets", type=Path, default=DEFAULT_ASSETS)
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "reference" / "results" / "bench_torch.json")
    args = ap.parse_args()

    load_start = os.getloadavg()
    torch.set_num_threads(2)
    tok, model = load_smollm(args.assets, attn="sdpa")
    text = (args.assets / "wikitext-2" / "wiki.test.txt").read_text(encoding="utf-8")
    ids = tok(text[:100_000], add_special_tokens=False).input_ids
    assert len(ids) >= max(PREFILL_LENS)

    results = {}
    for th in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(th)
        before = os.getloadavg()
        r = bench(model, ids, args.reps)
        r["loadavg_before"] = [round(v, 2) for v in before]
        results[f"threads_{th}"] = r
        print(f"threads {th}: " + ", ".join(f"{k} {v['tokens_per_s']} tok/s" for k, v in r.items() if isinstance(v, dict)))

    report = {
        "what": "PyTorch f32 CPU, SmolLM2-135M-Instruct Q4_1 GGUF dequantized to f32 by transformers, "
                "attn sdpa, batch 1, torch.inference_mode, median of reps after one warm-up",
        "machine": machine(),
        "date": "2026-11-23",
        **versions(),
        "reps": args.reps,
        "loadavg_start": [round(v, 2) for v in load_start],
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        # Other jobs share this machine; numbers taken with a busy machine are only indicative.
        "noisy": load_start[0] > 1.0,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"load average at start {load_start[0]:.2f} (noisy: {report['noisy']})")


if __name__ == "__main__":
    main()
