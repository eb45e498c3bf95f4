"""End to end on the GPU at full DeepSeek-V3.2 width: one MoE layer (hidden 7168, 128 heads, 256 experts, indexer
64×128, top-k 2048) with random weights, run by each fast backend and by the reference backend on the same GPU,
through prefill (longer than top-k, so the indexer selects), a mixed step (one decode + one new prefill) and a
pure decode step (the decode kernels). The logits must agree.

Tolerances (per token, relative L2 error of the logits, and greedy agreement): bf16 weights 3e-2; FP8-block
weights 6e-2 — the fast path quantizes activations per token per 128 channels (as DeepGEMM and SGLang do) while
the reference multiplies by the dequantized weights in bf16. The indexer's top-k may differ where scores tie
within rounding, which moves a key in or out of the 2048 attended ones; that is inside these bounds.
"""

from __future__ import annotations

import gc

import pytest
import torch

from dsv32.core import registry
from dsv32.core.config import ModelConfig, deepseek_v32_config
from dsv32.core.forward_batch import ForwardBatch
from dsv32.core.kv_cache import KVCache, KVCacheSpec
from dsv32.core.loader import dummy_weights
from dsv32.core.model import DeepseekV32
from dsv32.core.ops import KernelContext

VOCAB = 16384
PAGE = 64


def _fast_backends():
    out = []
    for name, info in sorted(registry.discover().items()):
        if name != "reference":
            out.append(pytest.param(name, marks=[] if info.available else pytest.mark.skip(reason=info.reason)))
    return out


def _run(backend: str, cfg: ModelConfig, fp8_indexer: bool, kv_dtype, steps) -> list[torch.Tensor]:
    ops = registry.create_ops(registry.discover()[backend], "cuda")
    ops.select_kernels(KernelContext(dtype=torch.bfloat16, kv_cache_fp8=kv_dtype == "fp8_e4m3",
                                     fp8_weights=cfg.quant is not None, num_heads=cfg.num_attention_heads))
    weights = dummy_weights(cfg, ops, torch.bfloat16, "cuda", seed=0)
    model = DeepseekV32(cfg, weights, ops, torch.bfloat16, "cuda", indexer_fp8=fp8_indexer, max_positions=4096)
    spec = KVCacheSpec(1, 4096 // PAGE * 2, PAGE, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_head_dim,
                       kv_dtype, fp8_indexer, torch.bfloat16)
    cache = KVCache(spec, "cuda")
    pages = {"a": list(range(0, 64)), "b": list(range(64, 128))}
    out = []
    for step in steps:
        fb = ForwardBatch.build([(ids, start, pages[r]) for r, ids, start in step], cache, "cuda")
        out.append(model.logits(model.forward(fb, cache)).cpu())
    del model, weights, cache
    gc.collect()
    torch.cuda.empty_cache()
    return out


@pytest.mark.cuda
@pytest.mark.parametrize("backend", _fast_backends())
@pytest.mark.parametrize("fp8_weights,kv_dtype", [(False, torch.bfloat16), (True, torch.bfloat16),
                                                  (True, "fp8_e4m3")], ids=["bf16", "fp8w", "fp8w-fp8kv"])
def test_full_dimension_layer_logits(backend, fp8_weights, kv_dtype):
    cfg = ModelConfig.from_dict(deepseek_v32_config(
        num_hidden_layers=1, first_k_dense_replace=0, vocab_size=VOCAB,
        quantization_config=None if not fp8_weights else deepseek_v32_config()["quantization_config"]))
    g = torch.Generator().manual_seed(7)
    a = torch.randint(0, VOCAB, (2600,), generator=g).tolist()
    b = torch.randint(0, VOCAB, (300,), generator=g).tolist()
    steps = [[("a", a[:2500], 0)],                            # prefill beyond top-k: the indexer selects
             [("a", a[2500:2501], 2500), ("b", b, 0)],        # mixed: one decode token + a new prefill
             [("a", a[2501:2502], 2501), ("b", [5], 300)]]    # pure decode
    fp8_indexer = fp8_weights  # the engine's auto choice: fp8 indexer for FP8 checkpoints
    got = _run(backend, cfg, fp8_indexer, kv_dtype, steps)
    want = _run("reference", cfg, fp8_indexer, kv_dtype, steps)
    tol = 6e-2 if fp8_weights else 3e-2
    for i, (x, y) in enumerate(zip(got, want)):
        rel = (x - y).norm(dim=-1) / y.norm(dim=-1)
        agree = (x.argmax(-1) == y.argmax(-1)).float().mean().item()
        print(f"step {i}: tokens {x.shape[0]}, rel err max {rel.max():.4f} mean {rel.mean():.4f}, argmax agree {agree:.4f}")
        assert rel.max() < tol, f"step {i}: logits differ by {rel.max():.4f} (relative L2) > {tol}"
        assert agree >= 0.97, f"step {i}: greedy tokens agree on only {agree:.3f}"
