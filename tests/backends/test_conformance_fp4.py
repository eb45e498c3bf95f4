"""Triton FP4 kernels (backends/triton/fp4.py: fp4_linear, fp4_moe_experts, qdq_mxfp4) against ReferenceOps (which
dequantizes the weights, core/fp4.py) on fresh random inputs: NVFP4 and MXFP4, weight-only and W4A4 MXFP4. CPU CI runs
them under TRITON_INTERPRET=1 at tiny shapes (K and I not multiples of the tiles, split K); `cuda` tests use V3.2
shapes.

Tolerances: the kernels decode every weight exactly (e2m1 × e4m3 / e8m0 group scale has ≤ 6 significant bits, exact
in bf16) and accumulate in fp32; the reference rounds W · global scale to the model dtype before its product, the
kernels apply NVFP4's global scale to the fp32 sum. fp32: atol = rtol = 1e-4 (ieee dots, different summation order).
bf16: relative error norm < 1e-2 and max error < 2^-5 · max|ref| (the reference rounds weights · global scale and
intermediate products to bf16; measured ≈ 3e-3). qdq_mxfp4 is bit-exact against core/fp4.qdq_mxfp4."""

from __future__ import annotations

import pytest
import torch

from dsv32.backends.reference.ops import ReferenceOps
from dsv32.backends.triton import fp4 as tfp4
from dsv32.core import fp4
from dsv32.core.model.checkpoint import fp4_quantize
from dsv32.core.ops import ExpertWeights

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _check(y, ref, dtype):
    assert y.dtype == ref.dtype and y.shape == ref.shape
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    else:
        assert _rel_err(y, ref) < 1e-2
        assert (y.float() - ref.float()).abs().max().item() <= 2**-5 * ref.float().abs().max().item()


def _weight(n, k, fmt, act, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * k ** -0.5
    lw = fp4_quantize(w, fmt, act)
    return type(lw)(lw.weight.to(DEV), lw.scale_inv.to(DEV), lw.block, lw.fmt,
                    None if lw.global_scale is None else lw.global_scale.to(DEV), None, lw.act)


FORMATS = [("nvfp4", ""), ("mxfp4", ""), ("mxfp4", "mxfp4")]
IDS = ["nvfp4", "mxfp4", "mxfp4-w4a4"]


@pytest.mark.parametrize("fmt,act", FORMATS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K,split,config", [(1, 48, 96, None, None), (3, 40, 224, 3, {"BLOCK_K2": 16}),
                                                (5, 40, 224, 3, None), (33, 72, 64, None, None)],
                         ids=["vector-units", "vector-units-split-k", "matrix-units-split-k", "matrix-units"])
def test_fp4_linear(fmt, act, dtype, M, N, K, split, config):
    ref = ReferenceOps(DEV)
    w = _weight(N, K, fmt, act, M + N + K)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(K)).to(DEV, dtype)
    y = tfp4.fp4_linear(x, tfp4.prepare_linear(w), split_k=split, config=config)
    _check(y, ref.linear(x, ref.prepare_linear(w, dtype)), dtype)


def test_fp4_linear_three_dims_and_empty():
    w = _weight(32, 64, "nvfp4", "", 1)
    x = torch.randn(2, 3, 64).to(DEV)
    y = tfp4.fp4_linear(x, w)
    assert y.shape == (2, 3, 32)
    torch.testing.assert_close(y, ReferenceOps(DEV).linear(x, w), atol=1e-4, rtol=1e-4)
    assert tfp4.fp4_linear(x[:0], w).shape == (0, 3, 32)


def test_fuse_concatenates_rows_with_their_scales():
    a, b = _weight(32, 64, "nvfp4", "", 2), _weight(16, 64, "nvfp4", "", 3)
    fused = tfp4.fuse([a, b])
    x = torch.randn(4, 64).to(DEV)
    ref = ReferenceOps(DEV)
    torch.testing.assert_close(tfp4.fp4_linear(x, fused), torch.cat([ref.linear(x, a), ref.linear(x, b)], -1),
                               atol=1e-4, rtol=1e-4)
    assert tfp4.fuse([a, _weight(16, 64, "mxfp4", "", 4)]) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qdq_mxfp4_is_bit_exact(dtype):
    x = torch.randn(37, 100, generator=torch.Generator().manual_seed(7)) * torch.logspace(-3, 3, 37)[:, None]
    x[3] = 0.0
    x[5, :32] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.5] * 4) * 2  # ties at scale 2^1 (amax 11)
    x = x.to(DEV, dtype)
    assert torch.equal(tfp4.qdq_mxfp4(x), fp4.qdq_mxfp4(x))


def _experts(E, I, K, fmt, act, seed):
    ws = []
    for j, (n, k) in enumerate(((I, K), (I, K), (K, I))):
        per = [_weight(n, k, fmt, act, seed * 100 + 3 * e + j) for e in range(E)]
        first = per[0]
        gs = None if first.global_scale is None else torch.stack([p.global_scale for p in per])
        ws.append(type(first)(torch.stack([p.weight for p in per]), torch.stack([p.scale_inv for p in per]),
                              first.block, fmt, gs, None, act))
    return ExpertWeights(*ws)


@pytest.mark.parametrize("fmt,act", FORMATS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,E,top_k,I,K,gemv_pairs", [(3, 4, 2, 32, 64, None), (21, 8, 3, 96, 160, None),
                                                       (40, 4, 2, 32, 64, 0), (700, 8, 3, 32, 64, None)],
                         ids=["vector-units", "vector-units-partial-tiles", "matrix-units", "matrix-units-large-tiles"])
def test_fp4_moe_experts(fmt, act, dtype, T, E, top_k, I, K, gemv_pairs, monkeypatch):
    """Both forms: one pair per program (≤ GEMV_PAIRS pairs; 0 forces the matrix units) and the matrix-unit
    kernels with their small (≤ 2048 pairs) and large tiles (700 × 3 = 2100 pairs)."""
    if gemv_pairs is not None:
        monkeypatch.setattr(tfp4, "GEMV_PAIRS", gemv_pairs)
    ref = ReferenceOps(DEV)
    experts = _experts(E, I, K, fmt, act, T)
    g = torch.Generator().manual_seed(T + E)
    x = torch.randn(T, K, generator=g).to(DEV, dtype)
    ids = torch.stack([torch.randperm(E + 1, generator=g)[:top_k] for _ in range(T)]).to(DEV)  # E = another rank's
    w = torch.rand(T, top_k, generator=g).to(DEV)
    y = tfp4.fp4_moe_experts(x, tfp4.prepare_experts(experts), w, ids)
    want = ref.moe_experts(x, ref.prepare_experts(experts, dtype), w, ids)
    _check(y, want, dtype)


@pytest.mark.parametrize("fmt,act", FORMATS, ids=IDS)
def test_fp4_decode_through_fp32_bits(fmt, act):
    """The decode kernels' fp32-bit e2m1 decode (targets that keep fp32 denormals, as NVIDIA's) equals the reference,
    dense (split K) and MoE, e2m1 0.5 codes (the denormal ones) included — and equals the fp16-bit decode bit for bit,
    for activations from 1e-6 to 1e4 (the fp32 form moves the power-of-two factors from the weights to the
    activations and the sums: the same products and sums, exactly)."""
    ref = ReferenceOps(DEV)
    w = _weight(40, 224, fmt, act, 5)
    assert ((w.weight & 7) == 1).any()
    lin = tfp4.prepare_linear(w)
    x = torch.randn(2, 224, generator=torch.Generator().manual_seed(1)).to(DEV)
    assert 2 <= tfp4.GEMV_TOKENS
    cfg = {"BLOCK_K2": 16}
    y = tfp4.fp4_linear(x, lin, split_k=3, config=cfg, fp32_denormals=True)
    _check(y, ref.linear(x, ref.prepare_linear(w, torch.float32)), torch.float32)
    for scale in (1e-6, 1.0, 1e4):
        assert torch.equal(tfp4.fp4_linear(x * scale, lin, split_k=3, config=cfg, fp32_denormals=True),
                           tfp4.fp4_linear(x * scale, lin, split_k=3, config=cfg, fp32_denormals=False))
    experts = tfp4.prepare_experts(_experts(4, 32, 64, fmt, act, 2))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 64, generator=g).to(DEV)
    ids = torch.stack([torch.randperm(5, generator=g)[:2] for _ in range(3)]).to(DEV)
    rw = torch.rand(3, 2, generator=g).to(DEV)
    y = tfp4.fp4_moe_experts(x, experts, rw, ids, fp32_denormals=True)
    _check(y, ref.moe_experts(x, ref.prepare_experts(_experts(4, 32, 64, fmt, act, 2), torch.float32), rw, ids),
           torch.float32)
    for scale in (1e-6, 1e4):
        assert torch.equal(tfp4.fp4_moe_experts(x * scale, experts, rw, ids, fp32_denormals=True),
                           tfp4.fp4_moe_experts(x * scale, experts, rw, ids, fp32_denormals=False))


@pytest.mark.skipif(DEV != "cuda", reason="V3.2 shapes on the GPU")
@pytest.mark.parametrize("fmt,act", FORMATS, ids=IDS)
def test_fp4_v32_shapes_cuda(fmt, act):
    ref = ReferenceOps(DEV)
    for M, N, K in ((1, 7168, 2048), (2, 7168, 16384), (64, 24576, 1536), (300, 7168, 16384)):
        w = _weight(N, K, fmt, act, N)
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(DEV, torch.bfloat16)
        want = ref.linear(x, ref.prepare_linear(w, torch.bfloat16))
        for f32 in (False, True):
            _check(tfp4.fp4_linear(x, w, fp32_denormals=f32), want, torch.bfloat16)
    E, I, K, top_k = 32, 2048, 7168, 8
    experts = _experts(E, I, K, fmt, act, 1)
    for T in (1, 8, 40, 64, 300):  # 8 / 64 / 320 pairs: vector units; 512: matrix units; 2400: their large tiles
        g = torch.Generator().manual_seed(T)
        x = torch.randn(T, K, generator=g).to(DEV, torch.bfloat16)
        ids = torch.stack([torch.randperm(E, generator=g)[:top_k] for _ in range(T)]).to(DEV)
        w = torch.rand(T, top_k, generator=g).to(DEV)
        want = ref.moe_experts(x, ref.prepare_experts(experts, torch.bfloat16), w, ids)
        for f32 in (False, True):
            _check(tfp4.fp4_moe_experts(x, tfp4.prepare_experts(experts), w, ids, fp32_denormals=f32), want,
                   torch.bfloat16)
