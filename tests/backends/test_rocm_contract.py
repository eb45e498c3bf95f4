"""CONTRACT TESTS, NOT HARDWARE TESTS: the ROCm backend's aiter adapters (backends/rocm/aiter_kernels.py, RocmOps)
against a fake aiter (tests/fakes/aiter: aiter 0.1.7's names and parameters — checked against the real wheel by
test_aiter_api.py — and its documented semantics in torch, with its hazards). They prove the adapters call aiter as
documented and turn its results into dsv32's op contracts; nothing here ran on an AMD GPU.

Compared with the reference backend in e4m3fnuz (gfx942's fp8). Tolerances: attention bf16 2e-2 abs+rel; RMSNorm one
bf16 ulp (the fake rounds once, the reference before the weight multiply); the indexer's top-k as sets (fp32 sums in
another order: ≥ 99% shared, every pick a causal key); MoE and FP8 GEMM against the reference within the activation
quantization error (relative norm ≤ 0.1; aiter's per-1×128 activation scales are not powers of two)."""

from __future__ import annotations

import importlib
import math
import os
import sys

import pytest
import torch

from dsv32.backends.reference.ops import ReferenceOps
from dsv32.backends.rocm import aiter_kernels as ak
from dsv32.backends.rocm.ops import RocmOps
from dsv32.core import envs
from dsv32.core.kv_cache import KVCache, KVCacheSpec
from dsv32.core.ops import AttnMetadata, ExpertWeights, KernelChoiceError, KernelContext, LinearWeight

FAKES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fakes")
FNUZ = torch.float8_e4m3fnuz
BF16 = torch.bfloat16
REF = ReferenceOps("cpu", fp8_dtype=FNUZ)


def _forget_aiter():
    for name in [n for n in sys.modules if n == "aiter" or n.startswith("aiter.")]:
        del sys.modules[name]
    ak.status.cache_clear()
    ak.fn.cache_clear()
    ak._accepts.cache_clear()


@pytest.fixture
def aiter(monkeypatch):
    """The fake aiter on sys.path (instead of any installed one) for one test."""
    _forget_aiter()
    monkeypatch.syspath_prepend(FAKES)
    yield importlib.import_module("aiter")
    _forget_aiter()


def _ops(arch="gfx942", **kernels):
    ops = RocmOps("cpu", arch=arch)
    ops.kernels = {"dsa_prefill_backend": "triton", "dsa_decode_backend": "triton", "moe_runner_backend": "triton",
                   "fp8_gemm_backend": "triton", "dsa_indexer_backend": "triton", "norm_backend": "triton", **kernels}
    return ops


# ---- availability and kernel choices ---------------------------------------------------------------------------
def test_without_aiter_every_aiter_choice_says_so(monkeypatch):
    _forget_aiter()
    monkeypatch.setitem(sys.modules, "aiter", None)
    try:
        assert "not installed" in ak.status()
        opts = RocmOps("cpu", arch="gfx942").kernel_options(KernelContext())
        assert all("not installed" in opts[slot]["aiter"] for slot in opts)
        assert all(opts[slot]["triton"] == "" for slot in opts)
    finally:
        _forget_aiter()


def test_kernel_choices_with_aiter(aiter):
    ops = RocmOps("cpu", arch="gfx942")
    assert ak.status() == ""
    ctx = KernelContext(num_heads=128, attn_tp_size=8, page_size=1, indexer_fp8=True)
    assert ops.select_kernels(ctx) == {slot: "triton" for slot in ops.kernel_options(ctx)}  # aiter is opt-in
    opts = ops.kernel_options(ctx)
    assert all(opts[slot]["aiter"] == "" for slot in opts if slot != "fp8_gemm_backend")
    assert "no FP8 linears" in opts["fp8_gemm_backend"]["aiter"]
    assert "bf16 cache" in ops.kernel_options(KernelContext(kv_cache_fp8=True))["dsa_decode_backend"]["aiter"]
    assert "16 or 128 heads" in ops.kernel_options(KernelContext(num_heads=64))["dsa_decode_backend"]["aiter"]
    assert "--page-size 1" in ops.kernel_options(KernelContext(indexer_fp8=True))["dsa_indexer_backend"]["aiter"]
    assert "fixed at 2048" in ops.kernel_options(
        KernelContext(page_size=1, indexer_fp8=True, index_topk=16))["dsa_indexer_backend"]["aiter"]
    chosen = ops.select_kernels(ctx, {"dsa_decode_backend": "aiter", "moe_runner_backend": "aiter"})
    assert chosen["dsa_decode_backend"] == "aiter" and chosen["moe_runner_backend"] == "aiter"
    with pytest.raises(KernelChoiceError, match="--dsa-decode-backend aiter cannot run here .*bf16 cache"):
        ops.select_kernels(KernelContext(kv_cache_fp8=True), {"dsa_decode_backend": "aiter"})
    with pytest.raises(KernelChoiceError, match="--dsa-prefill-backend tilelang cannot run here .*TileLang"):
        ops.select_kernels(ctx, {"dsa_prefill_backend": "tilelang"})
    assert ops.platform().fp8_dtype == FNUZ and RocmOps("cpu", arch="gfx950").platform().fp8_dtype == torch.float8_e4m3fn
    assert RocmOps("cpu", arch="gfx90a").platform().fp8_dtype is None  # MI200: no fp8


# ---- sparse MLA ------------------------------------------------------------------------------------------------
def test_sparse_mla(aiter):
    g = torch.Generator().manual_seed(0)
    T, H, L, R, K, page, n_tok = 5, 16, 512, 64, 40, 16, 120
    spec = KVCacheSpec(1, 10, page, L, R, 16, BF16, False, BF16)
    cache = KVCache(spec, "cpu")
    slots = torch.randperm(10 * page, generator=g)[:n_tok]
    REF.write_latent_cache(cache.latent[0], torch.randn(n_tok, L, generator=g).to(BF16),
                           torch.randn(n_tok, R, generator=g).to(BF16), slots)
    q = (torch.randn(T, H, L + R, generator=g) / 24).to(BF16)
    idx = slots[torch.stack([torch.randperm(n_tok, generator=g)[:K] for _ in range(T)])].to(torch.int32)
    idx[torch.rand(T, K, generator=g) < 0.25] = -1
    idx[1] = -1  # no valid key: aiter leaves the row undefined, the adapter outputs 0
    idx[0, 3] = 10**6  # out of the pool: ignored
    ops = _ops(dsa_decode_backend="aiter")
    batch = AttnMetadata(torch.arange(T), torch.zeros(T, dtype=torch.long), torch.zeros(T, 1, dtype=torch.int32),
                         torch.ones(T, dtype=torch.long), [1] * T, page, is_decode=True)
    got = ops.sparse_mla_attention(q, cache.latent[0], idx, 0.1352338, L, batch)
    want = REF.sparse_mla_attention(q, cache.latent[0], idx, 0.1352338, L)
    assert not got.isnan().any() and torch.count_nonzero(got[1]) == 0
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


def test_compact_slots_is_graph_safe():
    idx = torch.tensor([[5, -1, 7, 99], [-1, -1, -1, -1], [3, 2, -1, 1]], dtype=torch.int32)
    indptr, indices, counts = ak.compact_slots(idx, n_slots=50)
    assert indptr.tolist() == [0, 2, 2, 5] and counts.tolist() == [2, 0, 3]
    assert indices[:5].tolist() == [5, 7, 3, 2, 1] and indices.shape == (13,)


# ---- indexer ---------------------------------------------------------------------------------------------------
def _index_batch(reqs, page, H, D, g, decode):
    """Requests (kv_len, query tokens at the end) on scattered pages of an fp8 (e4m3fnuz) pool; fp8 queries."""
    pages = [math.ceil(n / page) for n, _ in reqs]
    perm = torch.randperm(sum(pages) + 2, generator=g)
    pool = torch.zeros(sum(pages) + 2, page * (D + 4), dtype=torch.uint8)
    table = torch.full((len(reqs), max(pages)), -1, dtype=torch.int32)
    o, tok_req, tok_pos = 0, [], []
    for r, ((n, nq), np_) in enumerate(zip(reqs, pages)):
        table[r, :np_] = perm[o:o + np_].int()
        o += np_
        pos = torch.arange(n)
        REF.write_index_keys(pool, torch.randn(n, D, generator=g).to(BF16),
                             table[r, pos // page].long() * page + pos % page)
        tok_req += [r] * nq
        tok_pos += list(range(n - nq, n))
    lens = torch.tensor([n for n, _ in reqs])
    batch = AttnMetadata(torch.tensor(tok_req), torch.tensor(tok_pos), table, lens, lens.tolist(), page,
                         is_decode=decode)
    T = len(tok_req)
    cos_sin = torch.randn(max(lens).item(), 16, generator=g)
    q, hw = REF.indexer_q_prepare(torch.randn(T, H, D, generator=g).to(BF16), torch.randn(T, H, generator=g),
                                  batch.positions, cos_sin, 16, True)
    return batch, pool, q, hw


@pytest.mark.parametrize("case", ["decode-paged", "prefill-gathered"])
def test_indexer_topk(aiter, case):
    g = torch.Generator().manual_seed(1)
    H, D, topk = 4, 32, 2048
    if case == "decode-paged":  # page size 1: aiter's paged logits + top_k_per_row_decode
        batch, pool, q, hw = _index_batch([(100, 1), (2500, 1), (3000, 1)], 1, H, D, g, True)
    else:  # pages of 16: keys gathered per request, fp8_mqa_logits + top_k_per_row_prefill
        batch, pool, q, hw = _index_batch([(2600, 3), (40, 40), (2100, 1)], 16, H, D, g, False)
    got = _ops(dsa_indexer_backend="aiter").indexer_topk(q, hw, pool, batch, D**-0.5, topk)
    want = REF.indexer_topk(q, hw, pool, batch, D**-0.5, topk)
    assert got.shape == want.shape == (q.shape[0], topk) and got.dtype == torch.int32
    for t in range(q.shape[0]):
        a, b = set(got[t].tolist()) - {-1}, set(want[t].tolist()) - {-1}
        assert len(a) == len(b) == min(topk, int(batch.positions[t]) + 1)
        assert len(a & b) >= 0.99 * len(b), f"token {t}: only {len(a & b)} of {len(b)} picks shared"


# ---- MoE, routing, FP8 GEMM, RMSNorm ---------------------------------------------------------------------------
def _experts(E, I, K, fp8, g):
    def lin(n, k):
        w = torch.randn(E, n, k, generator=g) / math.sqrt(k)
        if not fp8:
            return LinearWeight(w.to(BF16))
        from dsv32.core.model.checkpoint import fp8_block_quantize, to_platform_fp8

        return to_platform_fp8(LinearWeight(*fp8_block_quantize(w), (128, 128)), FNUZ, BF16)

    return ExpertWeights(lin(I, K), lin(I, K), lin(K, I))


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8-128x128"])
def test_fused_moe(aiter, fp8):
    g = torch.Generator().manual_seed(2)
    E, I, K, T = 6, 128, 256, 7
    raw = _experts(E, I, K, fp8, g)
    ops = _ops(moe_runner_backend="aiter")
    prepared = ops.prepare_experts(raw, BF16)
    assert getattr(prepared.gate_up.weight, "is_shuffled", False) and getattr(prepared.down.weight, "is_shuffled", False)
    x = torch.randn(T, K, generator=g).to(BF16)
    ids = torch.randint(0, E, (T, 2), generator=g)
    ids[0, 1] = E  # an expert on another rank (expert parallelism): contributes nothing
    w = torch.rand(T, 2, generator=g)
    got = ops.moe_experts(x, prepared, w, ids)
    want = REF.moe_experts(x, REF.prepare_experts(raw, BF16), w, ids)
    rel = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert rel < (0.1 if fp8 else 1e-2), rel


def test_fused_moe_refuses_unfusable_weights(aiter):
    raw = _experts(4, 160, 256, True, torch.Generator().manual_seed(3))  # I = 160: gate and up cannot be fused
    ops = _ops(moe_runner_backend="aiter")
    prepared = ops.prepare_experts(raw, BF16)
    assert prepared.gate_up is None  # kept in the Triton layout: the Triton kernel runs them
    assert ops.moe_experts(torch.zeros(0, 256, dtype=BF16), prepared, torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.long)).shape == (0, 256)


def _fp4_experts(E, I, K, fmt, act, g):
    from dsv32.core.model.checkpoint import _stack, fp4_quantize

    def stack(n, k):
        return _stack([fp4_quantize(torch.randn(n, k, generator=g) * k ** -0.5, fmt, act) for _ in range(E)])

    return ExpertWeights(stack(I, K), stack(I, K), stack(K, I))


def test_fused_moe_mxfp4_w4a4(aiter):
    """W4A4 MXFP4 experts (Quark with MXFP4 activations) on gfx950: aiter's per_1x32 fused MoE over shuffled e2m1
    weights and shuffled e8m0 scales. Against the reference (dequantized weights, activations rounded through MXFP4 as
    well): relative error norm < 0.05 — the fake sums in fp32, the reference in bf16, and rounding the intermediate
    through MXFP4 turns those last-bit differences into whole e2m1 steps for values near a rounding threshold
    (measured 0.019; a wrong weight or scale layout gives ~1.4)."""
    g = torch.Generator().manual_seed(6)
    E, I, K, T = 8, 256, 256, 7  # (e8m0_shuffle's 8-column tiles: I and K multiples of 256)
    raw = _fp4_experts(E, I, K, "mxfp4", "mxfp4", g)
    ops = _ops("gfx950", moe_runner_backend="aiter")
    prepared = ops.prepare_experts(raw, BF16)
    assert prepared.gate_up is not None and prepared.gate_up.is_fp4 and prepared.gate_up.weight.shape == (E, 2 * I, K // 2)
    assert getattr(prepared.gate_up.weight, "is_shuffled", False) and getattr(prepared.down.weight, "is_shuffled", False)
    x = torch.randn(T, K, generator=g).to(BF16)
    ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(T)])
    ids[0, 1] = E  # another rank's expert
    w = torch.rand(T, 2, generator=g)
    got = ops.moe_experts(x, prepared, w, ids)
    want = REF.moe_experts(x, REF.prepare_experts(raw, BF16), w, ids)
    rel = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert rel < 0.05, rel


@pytest.mark.parametrize("arch,fmt,act,why", [("gfx942", "mxfp4", "mxfp4", "gfx950"),
                                              ("gfx950", "mxfp4", "", "weight-only"),
                                              ("gfx950", "nvfp4", "", "NVFP4 runs on the Triton kernel")])
def test_fused_moe_fp4_falls_back_to_triton(aiter, caplog, arch, fmt, act, why):
    """Where aiter's MXFP4 MoE would not compute what the checkpoint means (or cannot run), the Triton FP4 kernel
    keeps the experts, and the log says why."""
    import logging

    raw = _fp4_experts(4, 64, 128, fmt, act, torch.Generator().manual_seed(7))
    ops = _ops(arch, moe_runner_backend="aiter")
    with caplog.at_level(logging.INFO):
        prepared = ops.prepare_experts(raw, BF16)
    assert prepared.gate_up is None and prepared.gate.is_fp4  # the Triton FP4 layout
    assert why in caplog.text


def test_routing(aiter):
    """Choice scores kept positive (bias ≥ 0): aiter's torch reference masks dropped groups with 0 where DeepSeek's
    routing masks with −inf; the two agree unless a kept expert's biased score is negative."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(9, 32, generator=g)
    bias = torch.rand(32, generator=g) * 0.3
    ops = _ops(moe_runner_backend="aiter")
    w, ids = ops.moe_route(logits, bias, 4, 2, 4, True, 2.5)
    rw, rids = REF.moe_route(logits, bias, 4, 2, 4, True, 2.5)
    assert ids.dtype == torch.int64 and torch.equal(ids.sort(-1).values, rids.sort(-1).values)
    torch.testing.assert_close(w.gather(1, ids.argsort(-1)), rw.gather(1, rids.argsort(-1)), atol=1e-6, rtol=1e-6)


@pytest.mark.skipif(not envs.triton_interpret(), reason="the activations are quantized by a Triton kernel: on CPU tensors "
                    "that runs on the interpreter only (the fake aiter takes CPU tensors)")
def test_fp8_linear(aiter):
    from dsv32.core.model.checkpoint import fp8_block_quantize, to_platform_fp8

    g = torch.Generator().manual_seed(5)
    w = to_platform_fp8(LinearWeight(*fp8_block_quantize(torch.randn(384, 256, generator=g) / 16), (128, 128)),
                        FNUZ, BF16)
    x = torch.randn(2, 3, 256, generator=g).to(BF16)
    got = _ops(fp8_gemm_backend="aiter").linear(x, w)
    want = REF.linear(x, w)
    assert got.shape == (2, 3, 384) and got.dtype == BF16
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 5e-2


def test_rms_norm(aiter):
    g = torch.Generator().manual_seed(6)
    x, res = torch.randn(2, 5, 64, generator=g).to(BF16), torch.randn(2, 5, 64, generator=g).to(BF16)
    w = (torch.rand(64, generator=g) + 0.5).to(BF16)
    ops = _ops(norm_backend="aiter")
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6).float(), REF.rms_norm(x, w, 1e-6).float(), atol=0, rtol=2**-7)
    y, r = ops.rms_norm(x, w, 1e-6, res)
    y_ref, r_ref = REF.rms_norm(x, w, 1e-6, res)
    assert torch.equal(r, r_ref)
    torch.testing.assert_close(y.float(), y_ref.float(), atol=0, rtol=2**-7)


# ---- the engine with every aiter adapter ---------------------------------------------------------------------------
@pytest.mark.skipif(not envs.triton_interpret(), reason="runs the ROCm ops on the CPU (the Triton interpreter)")
def test_engine_with_aiter_kernels(aiter, tmp_path, monkeypatch):
    """A tiny model with V3.2's attention widths (16 heads, latent 512 + 64) through the whole engine with aiter for
    sparse MLA, MoE + routing and RMSNorm: the reference's greedy tokens, or a near-tie of them (bf16)."""
    from _tiny import make_checkpoint
    from _variants import with_variants

    from dsv32 import LLM, SamplingParams

    with_variants(monkeypatch)
    make_checkpoint(str(tmp_path), seed=2, num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512,
                    qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32, hidden_size=64,
                    moe_intermediate_size=32, index_head_dim=128)
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=10)
    prompts = [list(range(3, 30)), [7, 8, 9]]
    kernels = {"dsa_prefill_backend": "aiter", "dsa_decode_backend": "aiter", "moe_runner_backend": "aiter",
               "norm_backend": "aiter"}
    llm = LLM(model=str(tmp_path), dtype="bfloat16", backend="rocm-gfx942", kernels=kernels)
    assert {k: llm.ops.kernels[k] for k in kernels} == kernels
    got = [o.outputs[0] for o in llm.generate(prompt_token_ids=prompts, sampling_params=sp)]
    want = [o.outputs[0] for o in LLM(model=str(tmp_path), dtype="bfloat16", backend="reference-e4m3fnuz").generate(
        prompt_token_ids=prompts, sampling_params=sp)]
    for a, b in zip(got, want):
        for tok, lp in zip(a.token_ids, b.logprobs):
            top = dict(lp.top)
            assert tok in top and lp.top[0][1] - top[tok] <= 0.15, (a.token_ids, b.token_ids)
            if tok != lp.token_id:
                break
