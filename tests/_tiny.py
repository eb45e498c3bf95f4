"""Tiny DeepSeek-V3.2 checkpoints made in the test: transformers' DeepseekV32ForCausalLM with weights scaled so
activations are O(1) (HF's 0.02 init makes everything near zero and parity trivially true), with the
router bias and norm weights randomized (zeros/ones would leave them untested).

Indexer ties: a key scores exactly 0 when every head's ReLU is 0 (probability ~2^-index_n_heads). Top-k
over a plateau of zeros is arbitrary (torch.topk breaks such ties differently for rows of different length),
so with few heads, full recompute and incremental decode may legitimately select different keys — in
transformers too. The default tiny model uses 32 indexer heads (ties practically impossible); HF parity
tests also run 2-4-head variants, where only an identical row layout keeps parity."""

from __future__ import annotations

import json
import math
import os

import torch

TINY = dict(
    vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, kv_lora_rank=32,
    q_lora_rank=48, qk_rope_head_dim=16, v_head_dim=24, qk_nope_head_dim=24, n_group=2, topk_group=1,
    num_experts_per_tok=2, index_topk=16, index_head_dim=32, index_n_heads=32, first_k_dense_replace=1,
    max_position_embeddings=512, routed_scaling_factor=2.5,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                     "original_max_position_embeddings": 128, "beta_fast": 32, "beta_slow": 1,
                     "mscale": 1.0, "mscale_all_dim": 1.0},
)


def hf_config(**overrides):
    from transformers import DeepseekV32Config

    kw = {**TINY, **overrides}
    return DeepseekV32Config(**kw)


@torch.no_grad()
def randomize(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            fan_in = p.shape[-1]
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            if "embed_tokens" in name:
                p.mul_(math.sqrt(fan_in))
        elif name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        else:  # norm weights
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(torch.randn(b.shape, generator=g) * 0.2)


def make_checkpoint(path: str, seed: int = 0, dtype=torch.float32, **overrides):
    """Save a random tiny model to `path` (transformers' format = official tensor names); returns the HF model."""
    from transformers import DeepseekV32ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV32ForCausalLM(hf_config(**overrides)).to(dtype)
    randomize(model, seed)
    model.save_pretrained(path)
    return model.eval()


def load_hf(path: str, dtype=torch.float32):
    from transformers import DeepseekV32ForCausalLM

    return DeepseekV32ForCausalLM.from_pretrained(path, dtype=dtype).eval()


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    # an explicit mask: generate() would otherwise take prompt tokens equal to pad_token_id for padding
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         min_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def quantize_fp8_block(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Official DeepSeek FP8 format: e4m3 weight and float32 scale_inv per block×block (partial edge blocks)."""
    from dsv32.core.model.checkpoint import fp8_block_quantize

    return fp8_block_quantize(w, (block, block), ue8m0=False)


FP8_SKIP = ("embed_tokens", "lm_head", "norm", "mlp.gate.weight", "weights_proj", "k_norm")


def convert_to_fp8_checkpoint(src: str, dst: str, dequant_dst: str, block: int = 128) -> None:
    """Rewrite `src` as an official FP8-block checkpoint at `dst` (two shards + index) and the exact dequantized
    weights (what the FP8 checkpoint means) as a plain checkpoint at `dequant_dst`, for the HF oracle."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(os.path.join(src, "model.safetensors"))
    fp8, deq = {}, {}
    for name, t in tensors.items():
        if t.dim() == 2 and not any(s in name for s in FP8_SKIP):
            q, s = quantize_fp8_block(t, block)
            fp8[name], fp8[name + "_scale_inv"] = q, s
            full = s.repeat_interleave(block, 0)[: t.shape[0]].repeat_interleave(block, 1)[:, : t.shape[1]]
            deq[name] = (q.float() * full).to(t.dtype)
        else:
            fp8[name] = t.to(torch.bfloat16) if t.dtype == torch.float32 and "e_score" not in name else t
            deq[name] = fp8[name].to(t.dtype)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    os.makedirs(dst, exist_ok=True)
    os.makedirs(dequant_dst, exist_ok=True)
    names = sorted(fp8)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: fp8[k].contiguous() for k in keys}, os.path.join(dst, fname))
        weight_map.update({k: fname for k in keys})
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    qcfg = dict(cfg, torch_dtype="bfloat16", quantization_config={
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "scale_fmt": "ue8m0",
        "weight_block_size": [block, block]})
    qcfg.pop("dtype", None)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(qcfg, f, indent=2)
    save_file({k: v.contiguous() for k, v in deq.items()}, os.path.join(dequant_dst, "model.safetensors"))
    with open(os.path.join(dequant_dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def convert_to_modelslim_checkpoint(src: str, dst: str, dequant_dst: str) -> None:
    """Rewrite `src` as an msModelSlim W8A8-dynamic checkpoint at `dst` (Ascend's format: int8 linears with a scale
    and a zero offset per output channel, `quant_model_description.json` typing every tensor; kv_b_proj kept FLOAT as
    a mixed description would) and the exact dequantized weights as a plain checkpoint at `dequant_dst`."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(os.path.join(src, "model.safetensors"))
    out, deq, desc = {}, {}, {"model_quant_type": "W8A8_DYNAMIC"}
    for name, t in tensors.items():
        if t.dim() == 2 and not any(s in name for s in FP8_SKIP) and "kv_b_proj" not in name:
            scale = t.float().abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
            q = torch.round(t.float() / scale).clamp(-128, 127).to(torch.int8)
            out[name], out[name + "_scale"], out[name + "_offset"] = q, scale, torch.zeros_like(scale)
            desc.update({name: "W8A8_DYNAMIC", name + "_scale": "W8A8_DYNAMIC", name + "_offset": "W8A8_DYNAMIC"})
            deq[name] = (q.float() * scale).to(t.dtype)
        else:
            out[name], deq[name] = t, t
            desc[name] = "FLOAT"
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    for folder, weights in ((dst, out), (dequant_dst, deq)):
        os.makedirs(folder, exist_ok=True)
        save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(folder, "model.safetensors"))
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
    with open(os.path.join(dst, "quant_model_description.json"), "w") as f:
        json.dump(desc, f, indent=2)


def decisive_routing(model_dir: str) -> str:
    """Rewrite the router bias so every token picks the same experts. In bf16 a tiny random MoE is chaotic: a rounding
    difference anywhere flips some token's top-2 of 8 experts, which changes its logits by up to ~80% (measured on an
    H100), so token-level comparisons would measure the router, not the kernels (which the conformance tests and the
    full-width layer test check with the flips identified)."""
    from safetensors.torch import load_file, save_file

    for name in os.listdir(model_dir):
        if name.endswith(".safetensors"):
            path = os.path.join(model_dir, name)
            tensors = load_file(path)
            for key, t in tensors.items():
                if key.endswith("e_score_correction_bias"):
                    tensors[key] = torch.zeros_like(t)
                    tensors[key][:2] = 4.0
            save_file(tensors, path, metadata={"format": "pt"})
    return model_dir


def make_mtp_checkpoint(path: str, seed: int = 0, mtp_like_last: bool = False, **overrides):
    """A tiny checkpoint with an MTP layer (layer num_hidden_layers: a full decoder layer plus enorm, hnorm, eh_proj,
    shared_head.norm, and the optional duplicates of the head and embedding): transformers' model with one layer more,
    saved with the config saying one layer less and num_nextn_predict_layers 1 (HF ignores the MTP layer, so the
    oracle is unchanged). Random weights (the drafts are poor: speculation must still emit the target's tokens);
    eh_proj is scaled so the MTP layer's input is O(1). Returns the HF model without the MTP layer."""
    from safetensors.torch import load_file, save_file

    layers = overrides.pop("num_hidden_layers", TINY["num_hidden_layers"])
    make_checkpoint(path, seed=seed, num_hidden_layers=layers + 1, **overrides)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    g = torch.Generator().manual_seed(seed + 1)
    hd = tensors["model.norm.weight"].shape[0]
    p = f"model.layers.{layers}."
    tensors[p + "enorm.weight"] = torch.rand(hd, generator=g) + 0.5
    tensors[p + "hnorm.weight"] = torch.rand(hd, generator=g) + 0.5
    tensors[p + "eh_proj.weight"] = torch.randn(hd, 2 * hd, generator=g) / math.sqrt(2 * hd)
    tensors[p + "shared_head.norm.weight"] = torch.rand(hd, generator=g) + 0.5
    tensors[p + "shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["num_hidden_layers"], cfg["num_nextn_predict_layers"] = layers, 1
    for key in ("mlp_layer_types", "layer_types"):  # per-layer lists written by transformers: one entry per layer
        if isinstance(cfg.get(key), list):
            cfg[key] = cfg[key][:layers]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return load_hf(path)


# FP4 layouts as published (spec §5.2/5.3): which linears each producer leaves unquantized, as exclusion patterns
from dsv32.core.config import MXFP4_EXCLUDE, NVFP4_EXCLUDE  # noqa: E402


def convert_to_fp4_checkpoint(src: str, dst: str, dequant_dst: str, fmt: str, w4a4: bool = False,
                              exclude: list[str] | None = None) -> None:
    """Rewrite `src` as an NVFP4 (ModelOpt: hf_quant_config.json beside a config.json without quantization_config;
    weight / weight_scale e4m3 / weight_scale_2 / input_scale) or MXFP4 (Quark: quantization_config in config.json;
    weight / weight_scale e8m0) checkpoint at `dst`, and the exact dequantized weights at `dequant_dst` (the HF
    oracle's). Excluded linears, norms, embeddings stay as they are (bf16 in the FP4 file for 2-D linears)."""
    import fnmatch
    import re

    from safetensors.torch import load_file, save_file

    from dsv32.core.fp4 import dequantize_fp4, quantize_mxfp4, quantize_nvfp4

    exclude = (NVFP4_EXCLUDE if fmt == "nvfp4" else MXFP4_EXCLUDE) if exclude is None else exclude

    def excluded(module: str) -> bool:
        return any(re.fullmatch(p[3:], module) if p.startswith("re:") else fnmatch.fnmatchcase(module, p)
                   for p in exclude)

    tensors = load_file(os.path.join(src, "model.safetensors"))
    out, deq = {}, {}
    for name, t in tensors.items():
        module = name.removesuffix(".weight")
        if t.dim() == 2 and name.endswith(".weight") and "embed_tokens" not in name and not excluded(module):
            if fmt == "nvfp4":
                q, s, g2 = quantize_nvfp4(t)
                out.update({name: q, module + ".weight_scale": s, module + ".weight_scale_2": g2.reshape(()),
                            module + ".input_scale": (t.abs().amax() / (6 * 448)).float().reshape(())})
                deq[name] = dequantize_fp4(q, s, "nvfp4", g2.expand(t.shape[0]), t.dtype)
            else:
                q, s = quantize_mxfp4(t)
                out.update({name: q, module + ".weight_scale": s})
                deq[name] = dequantize_fp4(q, s, "mxfp4", None, t.dtype)
        elif t.dim() == 2 and "embed_tokens" not in name and "mlp.gate.weight" not in name:
            out[name] = t.to(torch.bfloat16)  # published FP4 checkpoints keep excluded linears in bf16
            deq[name] = out[name].to(t.dtype)
        else:
            out[name], deq[name] = t, t
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    os.makedirs(dst, exist_ok=True)
    os.makedirs(dequant_dst, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(dst, "model.safetensors"))
    qcfg = dict(cfg, torch_dtype="bfloat16")
    qcfg.pop("dtype", None)
    if fmt == "nvfp4":
        with open(os.path.join(dst, "hf_quant_config.json"), "w") as f:
            json.dump({"producer": {"name": "modelopt", "version": "0.37.0"},
                       "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16,
                                        "exclude_modules": exclude}}, f, indent=2)
    else:
        spec = {"dtype": "fp4", "qscheme": "per_group", "ch_axis": -1, "group_size": 32, "is_dynamic": False,
                "scale_format": "e8m0", "round_method": "half_even", "observer_cls": "PerBlockMXObserver"}
        qcfg["quantization_config"] = {
            "quant_method": "quark", "export": {"kv_cache_group": [], "pack_method": "reorder"},
            "global_quant_config": {"weight": spec, "input_tensors": dict(spec, is_dynamic=True) if w4a4 else None,
                                    "output_tensors": None, "bias": None},
            "exclude": exclude, "layer_quant_config": {}, "layer_type_quant_config": {}, "algo_config": None}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(qcfg, f, indent=2)
    save_file({k: v.contiguous() for k, v in deq.items()}, os.path.join(dequant_dst, "model.safetensors"))
    with open(os.path.join(dequant_dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
