"""Accuracy cost of each quantized format against bf16: the logits of the same random DeepSeek-V3.2 model (the same
underlying weights, `dummy_weights`' per-tensor seeds) with bf16 weights and a bf16 KV cache (the reference) and with
each format, over every position of a few random prompts run through the paged engine (prefill in one step).

    python benchmarks/bench_quant_accuracy.py [--device cpu|cuda] [--setup tiny|layer|both] [--backend NAME]
        [--prompts 8] [--prompt-len 256] [--layer-prompts 2] [--layer-prompt-len 3072] [--layers 2]
        [--out benchmarks/results/cpu/quant_accuracy.json]

Formats (compute dtype bf16 in every run; weights all drawn by `dummy_weights` from the same seeds, then quantized as
the config says — the run checks this by dequantizing probe tensors of each format against the bf16 ones):
- fp8-block: DeepSeek's 128×128 e4m3 blocks with fp32 (ue8m0) scale_inv — the default `quantization_config` of
  `deepseek_v32_config`; activations quantized per token per 128 channels (ue8m0 scales) before each FP8 product. GPU
  backends do this in their FP8 GEMMs; the reference backend dequantizes FP8 weights at load and multiplies in bf16,
  so on it this benchmark emulates the activation rounding (a ReferenceOps subclass: quantize_fp8 → dequantize before
  every linear / expert product whose weight was FP8; flagged in the `acts` column). The engine's default
  indexer_precision for an FP8 checkpoint is 'fp8' (Hadamard + e4m3 indexer keys): the main row keeps that default,
  an extra row ("fp8-block, exact idx") runs the same weights with indexer_precision='exact' to separate the two.
- nvfp4: ModelOpt NVFP4 (e2m1, 16-element groups, e4m3 group scales, fp32 global scale), weight-only (W4A16) —
  exclusions = the published NVFP4_EXCLUDE (core/config.py): o_proj, dense MLPs, shared
  and routed experts are FP4; the other attention projections, the indexer, the router and lm_head stay bf16.
- mxfp4: Quark MXFP4 (e2m1, 32-element groups, e8m0 scales), weight-only (W4A16) — exclusions = MXFP4_EXCLUDE
  (dense MLPs, shared and routed experts are FP4; all of attention, the router and lm_head stay bf16).
- mxfp4-w4a4: the same weights with Quark's dynamic MXFP4 input activations (emulated: activations rounded through
  MXFP4 per 32 before each FP4 product).
- fp8-kv: bf16 weights, kv_cache_dtype='fp8_e4m3' (latent c in e4m3 with an fp32 scale per 128, rope part bf16).
- fp32-compute (context, not a format): the bf16 weights computed in fp32 — how far bf16 arithmetic itself is from
  exact, the scale against which the formats' costs can be read.

Metrics, over all positions of all prompts (logits in fp32): rel_l2 = ‖q − ref‖ / ‖ref‖ (Frobenius over every
position and vocabulary entry); kl = mean over positions of KL(ref ‖ q) (softmax in fp32); top1 = % of positions whose
argmax agrees. Prompts are longer than index_topk: positions past it attend to the indexer's top-k only; the table
also gives rel_l2 over the positions before index_topk (*_dense) and after it (*_sparse) apart. The `quantized` column
names the linears each format stores quantized (the same rules dummy_weights applies). Random weights make near-ties
in the indexer's top-k and in the router's expert choice common, so a small perturbation flips discrete choices and
moves the logits a lot (most of all at the tiny size): read each row against fp32-compute's.

Setups: tiny — a small random V3.2 (hidden 256, 3 layers: 1 dense + 2 MoE with 16 experts, vocab 2048, index_topk
64; every input width a multiple of 128); layer — full V3.2 width (hidden 7168, 256 experts, vocab 129280,
index_topk 2048) at --layers layers (default 2: 1 dense + 1 MoE): too big for a CPU, skipped there unless --setup
layer is asked for.

On a GPU (--device cuda) the default backend is the one the engine picks. A format that backend cannot run (an
exception while building or running it) runs on the reference backend on the same device instead and is compared
with a bf16 baseline computed on the reference backend as well (the `backend` column says which one; a "bf16
(reference)" row then gives the distance between the two backends' bf16 logits).

A benchmark: it measures and reports, asserting nothing about the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform as _platform
import shlex
import sys
import tempfile
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import print_table, write_json
from dsv32.backends.reference.ops import ReferenceOps
from dsv32.backends.reference.ops import _act as _reference_act
from dsv32.core.config import ModelConfig, deepseek_v32_config, fp4_quantization_config
from dsv32.core.forward_batch import ForwardBatch
from dsv32.core.model.checkpoint import _BF16_IN_FP8_CHECKPOINTS
from dsv32.core.model.specs import weight_specs
from dsv32.core.ops import ExpertWeights, LinearWeight

PAGE = 64

TINY = {"hidden_size": 256, "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 8,
        "n_routed_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 128, "intermediate_size": 512,
        "q_lora_rank": 128, "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
        "index_n_heads": 8, "index_head_dim": 64, "index_topk": 64, "vocab_size": 2048, "n_group": 4, "topk_group": 2,
        "first_k_dense_replace": 1, "num_nextn_predict_layers": 0}

FP8 = "default"  # deepseek_v32_config's own quantization_config


# name, quantization_config (None: bf16), kv_cache_dtype, indexer_precision, compute dtype, extra (context row)
FORMATS = [
    {"name": "fp8-block", "quant": FP8, "kv": "auto", "indexer": "auto"},
    {"name": "fp8-block, exact idx", "quant": FP8, "kv": "auto", "indexer": "exact", "extra": True},
    {"name": "nvfp4", "quant": fp4_quantization_config("nvfp4"), "kv": "auto", "indexer": "auto"},
    {"name": "mxfp4", "quant": fp4_quantization_config("mxfp4"), "kv": "auto", "indexer": "auto"},
    {"name": "mxfp4-w4a4", "quant": fp4_quantization_config("mxfp4", w4a4=True), "kv": "auto", "indexer": "auto"},
    {"name": "fp8-kv", "quant": None, "kv": "fp8_e4m3", "indexer": "auto"},
    {"name": "fp32-compute", "quant": None, "kv": "auto", "indexer": "auto", "dtype": "float32", "extra": True},
]
BASELINE = {"name": "bf16", "quant": None, "kv": "auto", "indexer": "auto"}


# ---- the reference backend with FP8 activation rounding --------------------------------------------------------------
_FP8_ACT = "fp8-block-act"  # marker on prepared weights that were FP8 in the checkpoint


class Fp8ActReferenceOps(ReferenceOps):
    """ReferenceOps that, like the GPU backends' FP8 GEMMs, round the activations of every product with an FP8-block
    weight through e4m3 per token per 128 channels (power-of-two scales, V3.2's ue8m0) first. Weights are still
    dequantized at load (as the reference does); the prepared weight carries a marker in `act`."""

    def _fp8_qdq(self, x: torch.Tensor) -> torch.Tensor:
        q, scale = self.quantize_fp8(x, 128, ue8m0=True)
        d = x.shape[-1]
        return (q.float() * scale.repeat_interleave(128, dim=-1)[..., :d]).to(x.dtype)

    def _act(self, x: torch.Tensor, w: LinearWeight) -> torch.Tensor:
        return self._fp8_qdq(x) if w.act == _FP8_ACT else _reference_act(x, w)

    def prepare_linear(self, w, dtype):
        out = super().prepare_linear(w, dtype)
        return dataclasses.replace(out, act=_FP8_ACT) if w.is_fp8 else out

    def prepare_experts(self, w, dtype):
        out = super().prepare_experts(w, dtype)
        if not w.down.is_fp8:
            return out
        return ExpertWeights(None, None, dataclasses.replace(out.down, act=_FP8_ACT),
                             gate_up=dataclasses.replace(out.gate_up, act=_FP8_ACT))

    def linear(self, x, w):
        weight = w.weight if w.scale_inv is None and not w.is_fp4 else self.dequantize(w, x.dtype)
        return F.linear(self._act(x, w), weight.to(x.dtype))

    def moe_experts(self, x, experts, topk_weights, topk_ids):  # ReferenceOps.moe_experts with self._act
        out = torch.zeros_like(x)
        w13, w2 = experts.gate_up.weight, experts.down.weight
        for e in torch.unique(topk_ids).tolist():
            if e >= w2.shape[0]:
                continue
            tok, slot = torch.where(topk_ids == e)
            h = self.silu_and_mul(F.linear(self._act(x[tok], experts.gate_up), w13[e].to(x.dtype)))
            h = F.linear(self._act(h, experts.down), w2[e].to(x.dtype)) * topk_weights[tok, slot, None]
            out.index_add_(0, tok, h.to(out.dtype))
        return out


# ---- engines -------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Engine:
    model: object
    kv_cache: object
    ops: object
    backend: str
    indexer_precision: str
    act_emulated: bool
    keep: object  # what owns them (LLM / EngineCore)


def write_model_dir(root: str, name: str, setup_overrides: dict, quant) -> str:
    over = dict(setup_overrides)
    if quant != FP8:
        over["quantization_config"] = quant  # None drops the key: bf16 weights
    path = os.path.join(root, name.replace(" ", "_").replace(",", ""))
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(deepseek_v32_config(**over), f)
    return path


def build_engine(model_dir: str, fmt: dict, device: str, backend: str | None, max_len: int,
                 emulate_fp8_act: bool) -> Engine:
    """The public LLM (load_format='dummy', no tokenizer, graphs off); for FP8 weights on the reference backend the
    same engine built with Fp8ActReferenceOps (build_engine_core with those ops, which is what LLM does inside)."""
    from dsv32 import LLM
    from dsv32.core.config import CacheConfig, EngineConfig, SchedulerConfig
    from dsv32.core.engine.build import build_engine_core, resolve, select_ops

    dtype = fmt.get("dtype", "bfloat16")
    pages = math.ceil(max_len / PAGE) + 2
    kw = {"dtype": dtype, "device": device, "backend": backend, "load_format": "dummy"}
    cache = {"kv_cache_dtype": fmt["kv"], "indexer_precision": fmt["indexer"], "page_size": PAGE, "num_kv_pages": pages}
    config = EngineConfig(model=model_dir, **kw, cache=CacheConfig(**cache),
                          scheduler=SchedulerConfig(max_model_len=max_len, max_running_requests=1, disable_graphs=True))
    cfg = ModelConfig.from_pretrained(model_dir)
    if emulate_fp8_act and cfg.quant is not None:
        info, base, _r = select_ops(config, cfg, resolve(config, cfg))
        if info.name == "reference":
            ops = Fp8ActReferenceOps(base.device, base.fp8_dtype)
            ops.kernels, ops.kernel_sources = dict(base.kernels), dict(getattr(base, "kernel_sources", {}))
            core = build_engine_core(config, backend=info, ops=ops)
            return Engine(core.model, core.kv_cache, core.ops, info.name, core.resolved.indexer_precision, True, core)
    llm = LLM(model=model_dir, **kw, **cache, max_model_len=max_len, max_num_seqs=1, disable_graphs=True)
    return Engine(llm.model, llm.kv_cache, llm.ops, llm.backend.name, llm.indexer_precision, False, llm)


@torch.no_grad()
def engine_logits(eng: Engine, prompt: list[int]) -> torch.Tensor:
    """All-position fp32 logits of one prompt through the paged engine path (prefill in one step), as
    tests/test_parity_hf.py::engine_logits."""
    cache, pages = eng.kv_cache, []
    cache.grow(pages, len(prompt))
    try:
        fb = ForwardBatch.build([(prompt, 0, pages)], cache, eng.model.device)
        return eng.model.logits(eng.model.forward(fb, cache)).float()
    finally:
        cache.free(pages)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_format(model_dir, fmt, device, backend, max_len, prompts, emulate) -> tuple[Engine, list[torch.Tensor], dict]:
    t0 = time.monotonic()
    eng = build_engine(model_dir, fmt, device, backend, max_len, emulate)
    sync(device)
    t1 = time.monotonic()
    logits = [engine_logits(eng, p) for p in prompts]
    sync(device)
    return eng, logits, {"build_s": round(t1 - t0, 2), "forward_s": round(time.monotonic() - t1, 2)}


def free() -> None:
    """Release what the caller has just dropped (its engine, logits) before the next engine is built."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- metrics -------------------------------------------------------------------------------------------------------
def compare(ref: list[torch.Tensor], q: list[torch.Tensor], topk: int) -> dict:
    """The metrics over every position, and split at index_topk: positions < topk see at most topk keys (the
    indexer's selection is everything: dense attention), the later ones attend to the indexer's top-k only."""
    per = {"d2": [], "r2": [], "kl": [], "agree": [], "dense": []}
    for r, x in zip(ref, q):
        per["d2"].append((x.double() - r.double()).pow(2).sum(-1).cpu())
        per["r2"].append(r.double().pow(2).sum(-1).cpu())
        lr, lq = torch.log_softmax(r.float(), -1), torch.log_softmax(x.float(), -1)
        per["kl"].append((lr.exp() * (lr - lq)).sum(-1).double().cpu())
        per["agree"].append((r.argmax(-1) == x.argmax(-1)).cpu())
        per["dense"].append(torch.arange(r.shape[0]) < topk)
    v = {k: torch.cat(t) for k, t in per.items()}

    def metrics(m: torch.Tensor) -> dict:
        n = int(m.sum())
        if n == 0:
            return {"rel_l2": None, "kl": None, "top1_pct": None, "positions": 0}
        return {"rel_l2": math.sqrt(v["d2"][m].sum().item() / v["r2"][m].sum().item()), "kl": v["kl"][m].mean().item(),
                "top1_pct": 100.0 * v["agree"][m].double().mean().item(), "positions": n}

    out = metrics(torch.ones_like(v["dense"]))
    dense, sparse = metrics(v["dense"]), metrics(~v["dense"])
    out.update({f"{k}_dense": dense[k] for k in dense}, **{f"{k}_sparse": sparse[k] for k in sparse})
    return out


def logit_stats(ref: list[torch.Tensor]) -> dict:
    """What the reference logits look like (random weights: how peaked they are bounds what top-1 agreement means)."""
    ent = top_p = std = 0.0
    n = 0
    for r in ref:
        lp = torch.log_softmax(r.float(), -1)
        ent += -(lp.exp() * lp).sum(-1).double().sum().item()
        top_p += lp.max(-1).values.exp().double().sum().item()
        std += r.float().std(-1).double().sum().item()
        n += r.shape[0]
    return {"mean_entropy_nats": ent / n, "mean_top1_prob": top_p / n, "mean_logit_std": std / n,
            "uniform_entropy_nats": math.log(ref[0].shape[-1])}


# ---- which linears a format quantizes (the same rules as dummy_weights) ---------------------------------------------
_GROUPS = [("q_a", "self_attn.q_a_proj"), ("q_b", "self_attn.q_b_proj"), ("kv_a", "self_attn.kv_a_proj_with_mqa"),
           ("kv_b", "self_attn.kv_b_proj"), ("o", "self_attn.o_proj"), ("idx.wq_b", "self_attn.indexer.wq_b"),
           ("idx.wk", "self_attn.indexer.wk"), ("idx.w", "self_attn.indexer.weights_proj"), ("router", "mlp.gate"),
           ("shared", "mlp.shared_experts."), ("experts", "mlp.experts"), ("dense_mlp", "mlp."), ("lm_head", "lm_head")]


def _group(name: str) -> str:
    for short, key in _GROUPS:
        if name.removesuffix(".weight").endswith(key) or (key.endswith(".") and key in name):
            return short
    return name


def quantized_modules(cfg: ModelConfig) -> dict[str, str]:
    """short group → 'all' / 'none' / 'k of n' of its linears that are stored quantized under cfg."""
    fp4 = cfg.fp4
    counts: dict[str, list[int]] = {}
    for name, spec in weight_specs(cfg).items():
        if spec.kind == "experts":
            E, I, Hd = spec.shape
            modules = [(f"{name}.{j}.{p}", K) for j in range(E) for p, K in
                       (("gate_proj", Hd), ("up_proj", Hd), ("down_proj", I))]
        elif spec.kind == "linear":
            modules = [(name.removesuffix(".weight"), spec.shape[-1])]
        else:
            continue
        for module, K in modules:
            if fp4 is not None:
                q = fp4.quantized(module) and K % fp4.group_size == 0
            elif cfg.quant is not None:
                q = spec.kind == "experts" or not (spec.fp32 or name.endswith(_BF16_IN_FP8_CHECKPOINTS))
            else:
                q = False
            c = counts.setdefault(_group(name), [0, 0])
            c[0] += q
            c[1] += 1
    return {g: "all" if k == n else "none" if k == 0 else f"{k} of {n}" for g, (k, n) in counts.items()}


def quantized_summary(q: dict[str, str]) -> str:
    parts = [g if v == "all" else f"{g}({v})" for g, v in q.items() if v != "none"]
    return ",".join(parts) or "-"


# ---- same underlying weights: dequantized probe tensors of each format against the bf16 ones -----------------------
def probe_names(cfg: ModelConfig) -> list[str]:
    moe = next(i for i in range(cfg.num_hidden_layers) if not cfg.is_dense_layer(i))
    dense = [i for i in range(cfg.num_hidden_layers) if cfg.is_dense_layer(i)]
    names = [f"model.layers.{moe}.self_attn.o_proj.weight", f"model.layers.{moe}.self_attn.q_b_proj.weight",
             f"model.layers.{moe}.mlp.shared_experts.down_proj.weight", f"model.layers.{moe}.mlp.experts"]
    if dense:
        names.append(f"model.layers.{dense[0]}.mlp.down_proj.weight")
    return names


def probe_weights(eng: Engine, names: list[str]) -> dict[str, torch.Tensor | str]:
    """fp32 dense value of each probe tensor as this engine holds it (routed experts: expert 0's down_proj)."""
    out = {}
    for name in names:
        try:
            w = eng.model.w[name]
            if isinstance(w, ExpertWeights):
                w = w.down
                w = dataclasses.replace(w, **{f: getattr(w, f)[:1] for f in ("weight", "scale_inv", "global_scale")
                                              if getattr(w, f) is not None})
            out[name] = eng.ops.dequantize(w, torch.float32).reshape(-1, w.shape[-1]).float().cpu()
        except Exception as e:  # noqa: BLE001 - a backend whose prepared layout cannot be read back: say so
            out[name] = f"n/a ({type(e).__name__}: {str(e)[:80]})"
    return out


def weight_check(ref: dict, q: dict) -> dict:
    """‖deq(q) − bf16‖ / ‖bf16‖ per probe: a quantization error (FP8 ≈ 0.03, FP4 ≈ 0.1) means the same
    underlying weights; independent random weights would give ≈ 1.4."""
    out = {}
    for name, r in ref.items():
        x = q.get(name)
        if isinstance(r, str) or isinstance(x, str) or x is None:
            out[name] = r if isinstance(r, str) else x
        elif x.shape != r.shape:
            out[name] = f"n/a (prepared shape {tuple(x.shape)} vs {tuple(r.shape)})"
        else:
            out[name] = round(((x - r).norm() / r.norm()).item(), 5)
    return out


# ---- one setup -----------------------------------------------------------------------------------------------------
def acts_of(cfg: ModelConfig, eng: Engine, fmt: dict) -> str:
    if cfg.quant is not None:
        if eng.act_emulated:
            return "fp8/128 ue8m0 (emulated)"
        return "fp8/128 ue8m0 (backend's GEMM)" if eng.backend != "reference" else "bf16 (not emulated: W8A16)"
    if cfg.fp4 is not None:
        return "mxfp4/32 (emulated)" if cfg.fp4.act == "mxfp4" else "bf16 (weight-only)"
    return fmt.get("dtype", "bfloat16").replace("bfloat16", "bf16").replace("float32", "fp32")


def run_setup(setup: str, overrides: dict, args, root: str) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    n_prompts, length = (args.prompts, args.prompt_len) if setup == "tiny" else (args.layer_prompts,
                                                                                 args.layer_prompt_len)
    vocab = deepseek_v32_config(**overrides)["vocab_size"]
    topk = deepseek_v32_config(**overrides)["index_topk"]
    prompts = [torch.randint(2, vocab, (length,), generator=g).tolist() for _ in range(n_prompts)]
    max_len = length + PAGE
    print(f"\n# setup {setup}: {n_prompts} prompts × {length} tokens = {n_prompts * length} positions "
          f"(index_topk {topk}: {n_prompts * max(0, length - topk)} positions attend sparsely)", flush=True)

    baselines: dict[str, tuple[list[torch.Tensor], dict]] = {}  # backend → (logits, probe weights)
    rows, checks = [], {}

    def baseline(backend: str | None) -> tuple[str, list[torch.Tensor], dict, dict]:
        d = write_model_dir(root, f"{setup}-bf16-{backend or 'default'}", overrides, None)
        eng, logits, t = run_format(d, BASELINE, args.device, backend, max_len, prompts, args.emulate_fp8_act)
        probes = probe_weights(eng, probe_names(ModelConfig.from_pretrained(d)))
        name = eng.backend
        cfg = ModelConfig.from_pretrained(d)
        row = {"format": "bf16" + ("" if backend is None else f" ({name})"), "backend": name,
               "indexer": eng.indexer_precision, "kv": "bf16", "acts": acts_of(cfg, eng, BASELINE),
               "quantized": "-", "modules": quantized_modules(cfg), **t}
        del eng
        free()
        baselines[name] = (logits, probes)
        print(f"  bf16 baseline on {name}: built in {t['build_s']} s, {n_prompts} prompts in {t['forward_s']} s",
              flush=True)
        return name, logits, probes, row

    default_backend, ref_logits, _ref_probes, base_row = baseline(args.backend)
    stats = logit_stats(ref_logits)
    rows.append({**base_row, **compare(ref_logits, ref_logits, topk)})
    for fmt in FORMATS:
        d = write_model_dir(root, f"{setup}-{fmt['name']}", overrides, fmt["quant"])
        cfg = ModelConfig.from_pretrained(d)
        backend, fallback = args.backend, None
        try:
            eng, logits, t = run_format(d, fmt, args.device, backend, max_len, prompts, args.emulate_fp8_act)
        except Exception as e:
            if args.device == "cpu" or default_backend == "reference":
                raise
            fallback = f"{default_backend} failed: {type(e).__name__}: {str(e)[:160]}"
            print(f"  {fmt['name']}: {fallback}\n    → running it on the reference backend on {args.device}",
                  flush=True)
            traceback.print_exc(limit=3)
            free()
            backend = "reference"
            eng, logits, t = run_format(d, fmt, args.device, backend, max_len, prompts, args.emulate_fp8_act)
        if eng.backend not in baselines:
            del eng, logits
            free()
            _, _, _, row = baseline(eng.backend)
            r_logits = baselines[eng.backend][0]
            rows.append({**row, **compare(ref_logits, r_logits, topk),
                         "note": f"bf16 on {eng.backend} vs bf16 on {default_backend}"})
            eng, logits, t = run_format(d, fmt, args.device, backend, max_len, prompts, args.emulate_fp8_act)
        ref, probes = baselines[eng.backend]
        q = quantized_modules(cfg)
        kv = {"auto": fmt.get("dtype", "bf16"), "fp8_e4m3": "fp8_e4m3"}[fmt["kv"]]
        row = {"format": fmt["name"], "backend": eng.backend, "indexer": eng.indexer_precision,
               "kv": kv.replace("float32", "fp32"), "acts": acts_of(cfg, eng, fmt), "quantized": quantized_summary(q),
               "modules": q, **compare(ref, logits, topk), **t}
        if fmt.get("extra"):
            row["note"] = ("context row, not a format: fp32 arithmetic on the bf16 linear weights (embeddings and "
                           "norm weights also unrounded)" if fmt["name"] == "fp32-compute" else
                           "attribution row: FP8 weights + activations with the exact indexer")
        if fallback:
            row["fallback"] = fallback
        if fmt["quant"] is not None:
            checks[fmt["name"]] = weight_check(probes, probe_weights(eng, list(probes)))
        rows.append(row)
        print(f"  {fmt['name']}: rel_l2 {row['rel_l2']:.4f}  kl {row['kl']:.5f}  top1 {row['top1_pct']:.2f}%  "
              f"(built {t['build_s']} s, forward {t['forward_s']} s)", flush=True)
        del eng, logits
        free()

    print_table(f"{setup}: logits against bf16 weights + bf16 KV ({rows[0]['positions']} positions, "
                f"{n_prompts} prompts × {length}, compute bf16)", [display(r) for r in rows],
                ["format", "rel_l2", "kl", "top1_pct", "positions", "rel_l2_dense", "rel_l2_sparse", "top1_pct_sparse",
                 "backend", "indexer", "kv", "acts", "quantized"])
    print(f"  rel_l2 / kl / top1_pct: all positions; *_dense: the {n_prompts * min(length, topk)} positions "
          f"< index_topk (dense attention), *_sparse: the {n_prompts * max(0, length - topk)} later ones (the "
          f"indexer's top-{topk})")
    print(f"  reference logits: mean entropy {stats['mean_entropy_nats']:.3f} nats (uniform "
          f"{stats['uniform_entropy_nats']:.3f}), mean top-1 prob {stats['mean_top1_prob']:.3f}, "
          f"mean logit std {stats['mean_logit_std']:.3f}")
    print("  quantized = linears stored quantized: q_a/q_b/kv_a/kv_b/o = attention projections, idx.wq_b/idx.wk/"
          "idx.w = indexer, router = mlp.gate, shared / experts = shared / routed experts, dense_mlp = the dense "
          "layers' MLP")
    print("  same underlying weights (‖deq(format) − bf16‖ / ‖bf16‖ of probe tensors; ≈1.4 would mean "
          "different random weights):")
    for fmt, c in checks.items():
        print(f"    {fmt:22s} " + "  ".join(f"{k.removeprefix('model.layers.')}: {v}" for k, v in c.items()))
    return {"config_overrides": overrides, "prompts": n_prompts, "prompt_len": length, "prompt_seed": args.seed,
            "weights_seed": 0, "index_topk": topk, "reference_logits": stats, "rows": rows, "weight_check": checks}


def display(row: dict) -> dict:
    """The row with its metrics as fixed-precision strings for the table (the JSON keeps the full floats)."""
    out = dict(row)
    for k, v in row.items():
        if isinstance(v, float) and (k.startswith(("rel_l2", "kl"))):
            out[k] = f"{v:.4f}" if k.startswith("rel_l2") else f"{v:.5f}"
        elif isinstance(v, float) and k.startswith("top1"):
            out[k] = f"{v:.2f}"
    return out


def device_info(device: str) -> dict:
    info = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        info["device"] = torch.cuda.get_device_name()
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
    else:
        name = _platform.processor() or _platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        info["device"] = f"cpu ({name})"
    print(f"device {info['device']}  torch {info['torch']}  threads {info['threads']}"
          + (f"  triton {info['triton']}" if "triton" in info else ""))
    return info


def default_out(device: str) -> str:
    base = os.path.join(os.path.dirname(__file__), "results")
    if device == "cpu":
        return os.path.join(base, "cpu", "quant_accuracy.json")
    name = torch.cuda.get_device_name().lower()
    sub = next((k for k in ("h100", "h200", "b200", "a100") if k in name), "cuda")
    return os.path.join(base, sub, "quant_accuracy.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu (reference backend) or cuda (the default GPU backend)")
    ap.add_argument("--backend", default=None, help="force a backend (default: the engine's choice for the device)")
    ap.add_argument("--setup", choices=("tiny", "layer", "both"), default="both")
    ap.add_argument("--prompts", type=int, default=8, help="tiny setup: prompts")
    ap.add_argument("--prompt-len", type=int, default=256, help="tiny setup: tokens per prompt (> index_topk 64)")
    ap.add_argument("--layer-prompts", type=int, default=2, help="layer setup: prompts")
    ap.add_argument("--layer-prompt-len", type=int, default=3072,
                    help="layer setup: tokens per prompt (> index_topk 2048)")
    ap.add_argument("--layers", type=int, default=2,
                    help="layer setup: decoder layers (2+: the first dense, the rest MoE; 1: a single MoE layer)")
    ap.add_argument("--seed", type=int, default=0, help="prompt token ids (the weights are dummy_weights' seed 0)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--no-fp8-act-emulation", dest="emulate_fp8_act", action="store_false",
                    help="on the reference backend, leave FP8 rows' activations in bf16 (weight-only FP8)")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/cpu/quant_accuracy.json on "
                    "the CPU, benchmarks/results/<gpu>/quant_accuracy.json on a GPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    info = device_info(args.device)
    setups = ["tiny", "layer"] if args.setup == "both" else [args.setup]
    if "layer" in setups and args.device == "cpu" and args.setup != "layer":
        print("\n# setup layer: skipped on the CPU — full V3.2 width (hidden 7168, 256 experts, vocab 129280) is "
              "about 28 GB of bf16 weights at 2 layers, and reference-backend prefill of 3k-token prompts at that "
              "width is far too slow here; run it on a GPU (--device cuda) or force it with --setup layer")
        setups.remove("layer")
    layer_over = {"num_hidden_layers": args.layers, "first_k_dense_replace": 1 if args.layers > 1 else 0,
                  "num_nextn_predict_layers": 0}
    payload = {"benchmark": "quant_accuracy", "command": "python " + shlex.join(sys.argv), **info,
               "device_arg": args.device, "backend_arg": args.backend, "compute_dtype": "bfloat16",
               "setup": args.setup, "fp8_act_emulation_on_reference": args.emulate_fp8_act,
               "formats": {f["name"]: {k: v for k, v in f.items() if k != "name"} for f in [BASELINE] + FORMATS},
               "setups": {}}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dsv32-quant-acc-") as root:
        for setup in setups:
            t = time.monotonic()
            result = run_setup(setup, TINY if setup == "tiny" else layer_over, args, root)
            result["wall_s"] = round(time.monotonic() - t, 1)
            payload["setups"][setup] = result
    if "layer" not in setups:
        payload["setups"]["layer"] = "skipped on the CPU (run with --device cuda, or force with --setup layer)" \
            if args.device == "cpu" and args.setup == "both" else "not asked for"
    payload["wall_s"] = round(time.monotonic() - t0, 1)
    print(f"\ntotal {payload['wall_s']} s")
    write_json(args.out or default_out(args.device), payload)


if __name__ == "__main__":
    main()
