#!/usr/bin/env python3
"""Check a `smoothquant quantize --format compressed-tensors` export with transformers + compressed-tensors.

Loads the exported directory with `AutoModelForCausalLM.from_pretrained` (the compressed-tensors
quantizer that transformers runs for `quant_method: compressed-tensors`) and `AutoTokenizer`, and
computes WikiText-2 perplexity with the windowing of `smoothquant eval`: tokenize the whole file
without special tokens (no BOS); non-overlapping windows of --seq-len tokens from the start, at
most --max-windows of them; inside each window every token but the first is predicted;
ppl = exp(total NLL / total predicted tokens). It then runs `smoothquant eval --model DIR --json`
on the same directory (or reads --ours FILE) and requires the two perplexities to agree within
--tolerance (relative, default 1%).

What transformers does with this layout on CPU (checked below, not assumed): the INT8 weights are
loaded compressed and decompressed to float (`int8 * weight_scale`) on the first forward; every
quantized Linear then fake-quantizes its input as the config says (dynamic per token: scale =
max|x| / 127.5 per row, round, clamp to [-128, 127], times the scale; static: with the stored
`input_scale`) before a float matmul. So it computes W8A8 in float; smoothquant-rs runs the INT8
GEMM. The dynamic per-token scale differs slightly (smoothquant-rs and vLLM use max|x| / 127).

Usage:
  smoothquant quantize --model ../shared/assets/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \\
      --calib-data ../shared/assets/wikitext-2/wiki.valid.txt --format compressed-tensors --out /tmp/ct
  python tests/reference/check_compressed_tensors.py --model /tmp/ct --name smollm2_channel_token \\
      --smoothquant target/release/smoothquant --seq-len 512 --max-windows 40 --threads 2
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import time
from pathlib import Path

import compressed_tensors
import torch
import transformers
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "assets" / "wikitext-2" / "wiki.test.txt"


def check_layout(model_dir: Path, model: torch.nn.Module) -> dict:
    """What the loaded model is, checked against the checkpoint (after the first forward)."""
    qc = json.loads((model_dir / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    quantized = {n: m for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None}
    assert quantized, "transformers applied no compressed-tensors scheme"
    # Every INT8 weight in the file came back as int8 * scale, exactly.
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        names = [k[: -len(".weight_scale")] for k in f.keys() if k.endswith(".weight_scale")]
        assert sorted(names) == sorted(quantized), "quantized modules differ from the checkpoint"
        name = names[0]
        w_q, scale = f.get_tensor(name + ".weight"), f.get_tensor(name + ".weight_scale")
    module = quantized[name]
    assert w_q.dtype == torch.int8
    assert module.weight.dtype == torch.float32, module.weight.dtype
    assert torch.equal(module.weight, w_q.float() * scale), "decompressed weight != int8 * scale"
    # The Linear fake-quantizes its input: it differs from a plain float matmul and equals one
    # on the quantize-dequantized input.
    # [batch, tokens, features]: compressed-tensors' per-token scales keep the first two dims.
    torch.manual_seed(0)
    x = torch.randn(1, 3, module.in_features) * torch.linspace(0.1, 30.0, module.in_features)
    with torch.inference_mode():
        y = module(x)
        plain = torch.nn.functional.linear(x, module.weight, module.bias)
        acts = group["input_activations"]
        if acts["dynamic"]:
            s = x.abs().amax(dim=-1, keepdim=True) / 127.5
        else:
            s = module.input_scale.float()
        xq = torch.clamp(torch.round(x / s), -128, 127) * s
        fake = torch.nn.functional.linear(xq, module.weight, module.bias)
    tol = 1e-5 * y.abs().max().item()
    act_quantized = (y - plain).abs().max().item() > tol and (y - fake).abs().max().item() <= tol
    assert act_quantized, "the Linear does not fake-quantize its input as the config says"
    return {
        "quantized_linears": len(quantized),
        "weights": group["weights"]["strategy"],
        "input_activations": (
            "dynamic per token" if acts["dynamic"] and acts["strategy"] == "token" else f"static per {acts['strategy']}"
        ),
        "weight_dtype_after_load": str(module.weight.dtype),
        "transformers_runs": "weights decompressed to float (int8 * weight_scale) on the first forward; "
        "inputs fake-quantized per the config; float matmul",
    }


def transformers_ppl(model_dir: Path, text: str, seq_len: int, max_windows: int) -> dict:
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    ids = tok(text, add_special_tokens=False).input_ids
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids[:8]]), use_cache=False)  # decompresses the weights
    layout = check_layout(model_dir, model)
    n_windows = min(max_windows, len(ids) // seq_len)
    total_nll, total_tok = 0.0, 0
    with torch.inference_mode():
        for w in range(n_windows):
            x = torch.tensor([ids[w * seq_len : (w + 1) * seq_len]])
            logits = model(input_ids=x, use_cache=False).logits[0, :-1].double()
            total_nll += -torch.log_softmax(logits, dim=-1).gather(1, x[0, 1:, None]).sum().item()
            total_tok += seq_len - 1
    return {
        "ppl": math.exp(total_nll / total_tok),
        "windows": n_windows,
        "predicted_tokens": total_tok,
        "file_tokens": len(ids),
        "layout": layout,
        "wall_time_s": round(time.time() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="the compressed-tensors export")
    ap.add_argument("--name", required=True, help="result name: tests/reference/results/ct_<name>.json")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--smoothquant", type=Path, default=REPO / "target" / "release" / "smoothquant")
    ap.add_argument("--ours", type=Path, help="`smoothquant eval --json` output to use instead of running it")
    ap.add_argument("--command", default="", help="the quantize command that made --model (recorded)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.ours:
        ours = json.loads(args.ours.read_text())
        ours_wall = None
    else:
        t0 = time.time()
        cmd = [str(args.smoothquant), "eval", "--model", str(args.model), "--data", str(args.data),
               "--seq-len", str(args.seq_len), "--max-windows", str(args.max_windows), "--threads",
               str(args.threads), "--json"]
        ours = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        ours_wall = round(time.time() - t0, 1)
        print(f"smoothquant eval: {json.dumps(ours['results'])}", flush=True)
    [row] = ours["results"]

    text = args.data.read_text(encoding="utf-8")
    ref = transformers_ppl(args.model, text, args.seq_len, args.max_windows)
    assert ref["windows"] == ours["windows"], (ref["windows"], ours["windows"])
    rel = abs(ref["ppl"] - row["perplexity"]) / ref["ppl"]
    config = json.loads((args.model / "config.json").read_text())
    result = {
        "checkpoint": config.get("smoothquant_rs", {}).get("source"),
        "quantize_command": args.command,
        "record": {k: config.get("smoothquant_rs", {}).get(k) for k in ("scheme", "weights", "acts", "alpha")},
        "quantization_config": config["quantization_config"],
        "dataset": f"{args.data.name} (raw file, no special tokens, no BOS)",
        "seq_len": args.seq_len,
        "windows": ref["windows"],
        "predicted_tokens": ref["predicted_tokens"],
        "file_tokens_exported_tokenizer": ref["file_tokens"],
        "ppl_transformers_compressed_tensors": ref["ppl"],
        "ppl_smoothquant_eval": row["perplexity"],
        "relative_difference": rel,
        "tolerance": args.tolerance,
        "transformers": ref["layout"],
        "threads": args.threads,
        "wall_time_s_transformers": ref["wall_time_s"],
        "wall_time_s_smoothquant_eval": ours_wall,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "compressed_tensors_version": compressed_tensors.__version__,
        "date": "2026-11-23",
    }
    out = REPO / "tests" / "reference" / "results" / f"ct_{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"transformers+compressed-tensors ppl {ref['ppl']:.4f}, smoothquant eval ppl {row['perplexity']:.4f}, "
          f"relative difference {rel:.2e} over {ref['windows']} windows -> {out}")
    if rel > args.tolerance:
        raise SystemExit(f"perplexities differ by {rel:.2%}, more than {args.tolerance:.0%}")


if __name__ == "__main__":
    main()
