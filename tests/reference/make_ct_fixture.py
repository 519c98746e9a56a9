#!/usr/bin/env python3
"""A compressed-tensors W8A8 checkpoint written by the compressed-tensors package itself.

The fixture for reading third-party (llm-compressor style) checkpoints in Rust, with no
smoothquant-rs code involved in writing it. Starting from tests/fixtures/hf/llama-gqa (f32):

- `apply_quantization_config` with one group: weights INT8 symmetric per channel, input
  activations INT8 symmetric static per tensor; `ignore`: `lm_head` and, through a regex,
  `model.layers.1.mlp.down_proj` (so that a float Linear sits between INT8 ones);
- scales as llm-compressor's min-max observer sets them (compressed-tensors' `calculate_qparams`):
  weight_scale = max|W| per output row / 127.5, input_scale = max|x| over the calibration
  tokens / 127.5 (the first 2000 characters of wiki.valid.txt, one forward pass);
- `ModelCompressor.compress_model` (INT8 weights) and `update_config` write the directory;
  the state dict is written with safetensors' own writer, as `save_pretrained` would.

The directory is then reloaded with transformers (the compressed-tensors quantizer), and its logits
on a prompt (fake-quantized W8A8 in float) go to `golden.safetensors` beside it, with the same
computation redone with activations clamped to [-127, 127] instead of [-128, 127] (what the
sq-kernels quantizers do; see the comment in main).

Usage: python tests/reference/make_ct_fixture.py     # a few seconds
"""
from __future__ import annotations

import json
import shutil

import compressed_tensors
import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    apply_quantization_config,
)
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from make_fixtures import DEFAULT_ASSETS, REPO, save_file as save_golden, versions

SRC = REPO / "tests" / "fixtures" / "hf" / "llama-gqa"
OUT = REPO / "tests" / "fixtures" / "compressed-tensors" / "llama-gqa-w8a8-static"
PROMPT = "The tower is 324 metres tall, about the same height as an 81-storey building."


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(SRC)
    model = AutoModelForCausalLM.from_pretrained(SRC, dtype=torch.float32, attn_implementation="eager")
    model.eval()

    # Calibration: record max|x| at every Linear input.
    calib_text = (DEFAULT_ASSETS / "wikitext-2" / "wiki.valid.txt").read_text(encoding="utf-8")[:2000]
    calib_ids = torch.tensor([tok(calib_text, add_special_tokens=False).input_ids[:96]])
    absmax: dict[str, torch.Tensor] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            def hook(mod, args, name=name):
                v = args[0].detach().abs().amax()
                absmax[name] = torch.maximum(absmax.get(name, v), v)
            hooks.append(m.register_forward_pre_hook(hook))
    with torch.inference_mode():
        model(input_ids=calib_ids, use_cache=False)
    for h in hooks:
        h.remove()

    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel", dynamic=False),
        input_activations=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="tensor", dynamic=False),
    )
    ignore = ["lm_head", r"re:.*layers\.1\.mlp\.down_proj$"]
    qconfig = QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore, format="int-quantized")
    apply_quantization_config(model, qconfig)
    quantized = [n for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None]
    assert len(quantized) == 13 and "model.layers.1.mlp.down_proj" not in quantized, quantized
    with torch.no_grad():
        for name, m in model.named_modules():
            if name in quantized:
                m.weight_scale.copy_(m.weight.abs().amax(dim=1, keepdim=True) / 127.5)
                m.input_scale.copy_((absmax[name] / 127.5).reshape(m.input_scale.shape))
                if hasattr(m, "weight_zero_point"):
                    m.weight_zero_point.zero_()
                if hasattr(m, "input_zero_point"):
                    m.input_zero_point.zero_()
                m.quantization_status = QuantizationStatus.FROZEN

    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="int-quantized")
    compressor.compress_model(model)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    model.config.save_pretrained(OUT)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, OUT / "model.safetensors", metadata={"format": "pt"})
    compressor.update_config(str(OUT))
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(SRC / f, OUT / f)

    # Reload as a user would, and record its logits.
    reloaded = AutoModelForCausalLM.from_pretrained(OUT, dtype=torch.float32, attn_implementation="eager")
    reloaded.eval()
    ids = tok(PROMPT, add_special_tokens=False).input_ids
    with torch.inference_mode():
        logits = reloaded(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
    # The same arithmetic re-done by hand on the float model with each quantized Linear replaced
    # by `linear(clamp(round(x / input_scale), lo, 127) * input_scale, int8 * weight_scale)`.
    # With lo = -128 (compressed-tensors' range) it must reproduce transformers exactly; with
    # lo = -127 it is what smoothquant-rs computes (its INT8 quantizers clamp to +-127, so the
    # calibrated minimum, which lands on -127.5 with scale max|x| / 127.5, rounds to -127).
    stored = {k: v.clone() for k, v in state.items()}

    def emulate(lo: int) -> torch.Tensor:
        m2 = AutoModelForCausalLM.from_pretrained(SRC, dtype=torch.float32, attn_implementation="eager")
        m2.eval()
        for name, mod in m2.named_modules():
            if name + ".weight_scale" in stored:
                w = stored[name + ".weight"].float() * stored[name + ".weight_scale"]
                s = stored[name + ".input_scale"]

                def fwd(x, w=w, s=s, bias=mod.bias):
                    return torch.nn.functional.linear(torch.clamp(torch.round(x / s), lo, 127) * s, w, bias)

                mod.forward = fwd
        with torch.inference_mode():
            return m2(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()

    assert torch.equal(emulate(-128), logits), "the hand-made W8A8 differs from transformers"
    logits_127 = emulate(-127)
    n_int8 = sum(1 for k, v in state.items() if v.dtype == torch.int8)
    assert n_int8 == 13, n_int8
    config = json.loads((OUT / "config.json").read_text())
    save_golden(
        {
            "input_ids": torch.tensor(ids, dtype=torch.int32).numpy(),
            "logits": logits.numpy(),
            "logits_clamp127": logits_127.numpy(),
        },
        str(OUT / "golden.safetensors"),
        {
            "prompt": PROMPT,
            "what": "logits: the reloaded checkpoint in transformers + compressed-tensors (float fake-quant "
            "W8A8, activations clamped to [-128, 127]); logits_clamp127: the same with activations clamped "
            "to [-127, 127] as smoothquant-rs' INT8 quantizers do",
            "compressed_tensors_version": compressed_tensors.__version__,
            "quantization_config": json.dumps(config["quantization_config"], sort_keys=True),
            **versions(),
        },
    )
    print(f"wrote {OUT}: {n_int8} INT8 Linears, logits {tuple(logits.shape)}")


if __name__ == "__main__":
    main()
