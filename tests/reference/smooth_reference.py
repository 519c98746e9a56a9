#!/usr/bin/env python3
"""Reference outputs for the SmoothQuant smoothing pass (activation scales + LayerNorm/RMSNorm fold).

Python is only a reference tool: the Rust tests read the committed files under
tests/fixtures/smooth/ and never run Python.  Everything is CPU, float32 and deterministic;
the files are written with the sorted-header writer of make_fixtures.py, so running this
script twice gives byte-identical outputs.

The calibration and the fold follow the official SmoothQuant code (mit-han-lab/smoothquant,
`calibration.get_act_scales` and `smooth.smooth_ln_fcs`), written afresh here:

  act_scales[linear] = max over all tokens of |x| per input channel (forward hook on every
                       nn.Linear except lm_head; one forward, batch 1, no mask)
  weight_scales      = max over the group's Linears of max_rows |W[:, j]|, clamped to >= 1e-5
  scales             = (act_scales ** alpha / weight_scales ** (1 - alpha)).clamp(min=1e-5)
  ln.weight /= scales; ln.bias /= scales (if any); fc.weight *= scales[None, :]

Outputs, for each fixture in FIXTURES:
  tests/fixtures/smooth/<fixture>/act_scales.safetensors
  tests/fixtures/smooth/<fixture>/smoothed_alpha0.5.safetensors
  tests/fixtures/smooth/<fixture>/smoothed_alpha0.85.safetensors

Usage: python tests/reference/smooth_reference.py [--assets DIR] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import DEFAULT_ASSETS, FIXTURES, save_file, versions  # noqa: E402

FIXTURE_NAMES = ["llama-gqa", "qwen2-bias", "opt-prenorm", "bloom", "llama-tied-bf16"]
ALPHAS = [0.5, 0.85]
CALIB_CHARS = 2000  # first characters of wiki.valid.txt
CALIB_TOKENS = 96  # first token ids of those characters
EQUIV_TOL = 1e-4  # max |logits_smoothed - logits| / max |logits|
# Size budget: the alpha-0.85 file keeps the Linear weights of these layers only (the norms and
# scales of every layer are always kept).  A smoothed Linear weight is exactly W * scales, with
# the scales stored next to it, so the other layers add bytes but no coverage.
ALPHA085_LINEAR_LAYERS = {0}


def alpha_tag(alpha: float) -> str:
    return f"{alpha:g}"


# --------------------------------------------------------------------------------------
# Groups: (norm module name, [Linear module names]); the act-scales key is the first Linear.
# --------------------------------------------------------------------------------------

def smooth_groups(model) -> list[tuple[str, list[str]]]:
    cls = type(model).__name__
    groups = []
    if cls.startswith(("Llama", "Qwen2")):
        for i in range(model.config.num_hidden_layers):
            p = f"model.layers.{i}."
            groups.append((p + "input_layernorm", [p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"]))
            groups.append((p + "post_attention_layernorm", [p + "mlp.gate_proj", p + "mlp.up_proj"]))
    elif cls.startswith("OPT"):
        assert model.config.do_layer_norm_before, "post-norm OPT has no norm in front of q/k/v and fc1"
        for i in range(model.config.num_hidden_layers):
            p = f"model.decoder.layers.{i}."
            groups.append((p + "self_attn_layer_norm", [p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"]))
            groups.append((p + "final_layer_norm", [p + "fc1"]))
    elif cls.startswith("Bloom"):
        for i in range(model.config.n_layer):
            p = f"transformer.h.{i}."
            groups.append((p + "input_layernorm", [p + "self_attention.query_key_value"]))
            groups.append((p + "post_attention_layernorm", [p + "mlp.dense_h_to_4h"]))
    else:
        raise ValueError(f"no smoothing groups for {cls}")
    return groups


def layer_of(name: str) -> int:
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a in ("layers", "h") and b.isdigit():
            return int(b)
    raise ValueError(name)


# --------------------------------------------------------------------------------------
# Calibration (official get_act_scales, one sequence)
# --------------------------------------------------------------------------------------

def calibration_ids(fixture_dir: Path, assets: Path) -> np.ndarray:
    text = (assets / "wikitext-2" / "wiki.valid.txt").read_text(encoding="utf-8")[:CALIB_CHARS]
    tok = Tokenizer.from_file(str(fixture_dir / "tokenizer.json"))
    ids = tok.encode(text, add_special_tokens=False).ids[:CALIB_TOKENS]
    return np.asarray(ids, dtype=np.int32)


@torch.no_grad()
def get_act_scales(model, ids: np.ndarray) -> dict[str, torch.Tensor]:
    scales: dict[str, torch.Tensor] = {}
    hooks = []

    def stat(name, x):
        x = x.reshape(-1, x.shape[-1]).abs().detach()
        cur = x.max(dim=0)[0].float()
        scales[name] = torch.maximum(scales[name], cur) if name in scales else cur

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            hooks.append(m.register_forward_hook(lambda mod, args, out, name=name: stat(name, args[0])))
    model(input_ids=torch.from_numpy(ids.astype(np.int64))[None], use_cache=False)
    for h in hooks:
        h.remove()
    return scales


@torch.no_grad()
def logits_of(model, ids: np.ndarray) -> torch.Tensor:
    return model(input_ids=torch.from_numpy(ids.astype(np.int64))[None], use_cache=False).logits[0].float()


# --------------------------------------------------------------------------------------
# Smoothing (official smooth_ln_fcs / smooth_ln_fcs_llama_like)
# --------------------------------------------------------------------------------------

@torch.no_grad()
def smooth_ln_fcs(ln, fcs, act_scales: torch.Tensor, alpha: float) -> torch.Tensor:
    for fc in fcs:
        assert isinstance(fc, torch.nn.Linear)
        assert ln.weight.numel() == fc.in_features == act_scales.numel()
    dtype = fcs[0].weight.dtype
    act_scales = act_scales.to(dtype=dtype)
    weight_scales = torch.cat([fc.weight.abs().max(dim=0, keepdim=True)[0] for fc in fcs], dim=0)
    weight_scales = weight_scales.max(dim=0)[0].clamp(min=1e-5)
    scales = (act_scales.pow(alpha) / weight_scales.pow(1 - alpha)).clamp(min=1e-5).to(dtype)
    ln.weight.div_(scales)
    if getattr(ln, "bias", None) is not None:
        ln.bias.div_(scales)
    for fc in fcs:
        fc.weight.mul_(scales.view(1, -1))
    return scales


def smooth_model(model, act_scales: dict[str, torch.Tensor], alpha: float) -> dict[str, np.ndarray]:
    """Smooth `model` in place; return every changed tensor by state-dict name, plus the scales."""
    mods = dict(model.named_modules())
    out: dict[str, np.ndarray] = {}
    for ln_name, fc_names in smooth_groups(model):
        ln, fcs = mods[ln_name], [mods[n] for n in fc_names]
        scales = smooth_ln_fcs(ln, fcs, act_scales[fc_names[0]], alpha)
        out[f"scales.{fc_names[0]}"] = scales.numpy().copy()
        out[f"{ln_name}.weight"] = ln.weight.detach().numpy().copy()
        if getattr(ln, "bias", None) is not None:
            out[f"{ln_name}.bias"] = ln.bias.detach().numpy().copy()
        for n, fc in zip(fc_names, fcs):
            out[f"{n}.weight"] = fc.weight.detach().numpy().copy()
    return out


def max_over_median(a: torch.Tensor) -> float:
    return float(a.max() / a.median())  # torch.median: lower median for an even count


# --------------------------------------------------------------------------------------

def load_f32(path: Path):
    # bf16 checkpoints are upcast on load, so everything is computed in f32.
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def run_fixture(name: str, assets: Path, report: dict) -> None:
    src = FIXTURES / "hf" / name
    out_dir = FIXTURES / "smooth" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    base = load_f32(src)
    ids = calibration_ids(src, assets)
    groups = smooth_groups(base)
    meta_common = {"fixture": name, "source_dir": f"tests/fixtures/hf/{name}", "attn_implementation": "eager",
                   "compute_dtype": "float32", **versions()}

    act = get_act_scales(base, ids)
    ref_logits = logits_of(base, ids)
    calib_meta = {
        **meta_common,
        "calibration": f"first {CALIB_CHARS} chars of wikitext-2/wiki.valid.txt, tokenizer.json without special "
                       f"tokens, first {CALIB_TOKENS} ids; one forward, batch 1, no attention mask, no cache",
        "num_tokens": str(len(ids)),
        "act_scales": "per input channel max over tokens of |x| (f32), hook on every nn.Linear except lm_head",
        "smooth_groups": json.dumps(groups),
    }
    tensors = {n: v.numpy().copy() for n, v in act.items()}
    assert "input_ids" not in tensors
    tensors["input_ids"] = ids
    save_file(tensors, str(out_dir / "act_scales.safetensors"), metadata=calib_meta)

    rep = {"num_tokens": len(ids), "linears": len(act), "alphas": {}}
    for alpha in ALPHAS:
        model = copy.deepcopy(base)
        changed = smooth_model(model, act, alpha)
        logits = logits_of(model, ids)
        rel = float((logits - ref_logits).abs().max() / ref_logits.abs().max())
        assert rel < EQUIV_TOL, (name, alpha, rel)

        # The smoothed model's own activations must be act_scales / scales.
        act2 = get_act_scales(model, ids)
        ratios, act_check = {}, 0.0
        for _, fc_names in groups:
            key = fc_names[0]
            s = torch.from_numpy(changed[f"scales.{key}"])
            expect = act[key] / s
            act_check = max(act_check, float(((act2[key] - expect).abs() / expect.abs().max()).max()))
            ratios[key] = (max_over_median(act[key]), max_over_median(expect))
        assert act_check < 1e-4, (name, alpha, act_check)
        for before, after in ratios.values():
            assert after < before, (name, alpha, ratios)

        if alpha != 0.5:
            linear_weights = {f"{n}.weight" for _, fc_names in groups for n in fc_names}
            changed = {k: v for k, v in changed.items()
                       if k not in linear_weights or layer_of(k) in ALPHA085_LINEAR_LAYERS}
            linear_layers = ",".join(str(i) for i in sorted(ALPHA085_LINEAR_LAYERS))
        else:
            linear_layers = "all"
        meta = {**meta_common, "alpha": alpha_tag(alpha),
                "logits_max_rel_diff": f"{rel:.3e}",
                "logits_rel_diff_note": "max |smoothed - original| / max |original| on the act_scales input_ids",
                "linear_weights_layers": linear_layers,
                "smooth_groups": json.dumps(groups),
                "formula": "weight_scales = max_j over group Linears of max_rows |W| clamp(min=1e-5); "
                           "scales = (act^alpha / weight_scales^(1-alpha)).clamp(min=1e-5); "
                           "norm.weight /= scales; norm.bias /= scales; fc.weight *= scales[None, :]"}
        path = out_dir / f"smoothed_alpha{alpha_tag(alpha)}.safetensors"
        save_file(changed, str(path), metadata=meta)
        if linear_layers == "all":
            # Independent reload: the original model with the saved tensors swapped in must give
            # exactly the smoothed model's logits (so the file holds every tensor the fold changed).
            fresh = load_f32(src)
            sd = {k: torch.from_numpy(v) for k, v in load_file(str(path)).items() if not k.startswith("scales.")}
            missing = set(sd) - set(fresh.state_dict())
            assert not missing, missing
            fresh.load_state_dict(sd, strict=False)
            assert torch.equal(logits_of(fresh, ids), logits), (name, alpha)
        rep["alphas"][alpha_tag(alpha)] = {"logits_max_rel_diff": rel, "act_check": act_check,
                                           "max_over_median": ratios, "tensors": len(changed)}
    report[name] = rep


def print_report(report: dict) -> None:
    for name, rep in report.items():
        print(f"[smooth] {name}: {rep['num_tokens']} tokens, {rep['linears']} Linears")
        for tag, r in rep["alphas"].items():
            print(f"  alpha {tag}: logits max rel diff {r['logits_max_rel_diff']:.2e}, "
                  f"act/scales check {r['act_check']:.1e}, {r['tensors']} tensors")
            for key, (before, after) in r["max_over_median"].items():
                print(f"    {key:48s} max/median {before:7.2f} -> {after:6.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", type=Path, default=DEFAULT_ASSETS)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    t0 = time.time()
    report: dict = {}
    for name in FIXTURE_NAMES:
        run_fixture(name, args.assets, report)
    print_report(report)
    total = sum(f.stat().st_size for f in (FIXTURES / "smooth").rglob("*.safetensors"))
    print(f"total {total / 1024:.0f} KiB; done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
