"""Triton fp8 activation quantization and fp8 block GEMM (backends/triton/quant.py, gemm.py) against ReferenceOps.

Tiny shapes run on the CPU interpreter; `cuda` tests run V3.2 shapes on an NVIDIA GPU. Tolerances:
- quantize_fp8: bit-exact (fp8 bytes and fp32 scales), CPU interpreter and GPU alike.
- fp8 linear vs its exact emulation (reference-quantized x, dequantized, times the dequantized weight, in fp64):
  |y − emul| ≤ tol · (|x_deq| · |W|ᵀ) elementwise, tol = 1e-6 on the interpreter (fp32 sums; only the order differs)
  and 1e-2 on GPU (Hopper fp8 MMAs accumulate each 128-wide K block with ~14 mantissa bits, which is why partials are
  promoted to fp32 per block), plus ‖y − emul‖ / ‖emul‖ ≤ 2e-3 on GPU; bf16 outputs add one bf16 ulp (2^-7 rel).
- fp8 linear vs ReferenceOps.linear (full-precision activations): ‖y − ref‖ / ‖ref‖ ≤ 5e-2 (e4m3 activation error,
  measured ≈ 2.5 %).
The same checks run in e4m3fnuz (AMD MI300's format: weights converted from the checkpoint's e4m3fn as the loader
does, activations quantized to fnuz) against the reference in fnuz.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from dsv32.backends.reference.ops import ReferenceOps
from dsv32.core import envs
from dsv32.core.model.checkpoint import to_platform_fp8
from dsv32.core.ops import LinearWeight
from _variants import skip_without_fnuz_kernels

pytest.importorskip("triton")

from dsv32.backends.triton.gemm import fp8_block_linear  # noqa: E402
from dsv32.backends.triton.quant import quantize_fp8  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
REF = ReferenceOps(DEV)


def fp8_block_weight(N: int, K: int, g: torch.Generator, ue8m0: bool = True, dev: str = DEV):
    """A checkpoint-like fp8 weight: randn/√K quantized per 128×128 block (partial edge blocks) by the reference's
    quantize_fp8 → (e4m3 [N, K], scale_inv [ceil(N/128), ceil(K/128)] fp32)."""
    w = (torch.randn(N, K, generator=g) / math.sqrt(K)).to(dev)
    nb, kb = math.ceil(N / 128), math.ceil(K / 128)
    padded = torch.zeros(nb * 128, kb * 128, device=dev)
    padded[:N, :K] = w
    blocks = padded.view(nb, 128, kb, 128).permute(0, 2, 1, 3).reshape(nb, kb, 128 * 128)
    q, s = REF.quantize_fp8(blocks, 128 * 128, ue8m0)
    q = q.view(nb, kb, 128, 128).permute(0, 2, 1, 3).reshape(nb * 128, kb * 128)[:N, :K].contiguous()
    return q, s[..., 0].contiguous()


@functools.lru_cache(maxsize=2)
def cached_weight(N: int, K: int, ue8m0: bool):
    return fp8_block_weight(N, K, torch.Generator().manual_seed(N * 7 + K), ue8m0)


FNUZ = torch.float8_e4m3fnuz


def assert_quant_exact(x, block, ue8m0, fmt=torch.float8_e4m3fn):
    q, s = quantize_fp8(x, block, ue8m0, fnuz=fmt == FNUZ)
    # The reference runs on the CPU: torch on CUDA divides by a scalar as a multiply by its reciprocal (1-ulp off the
    # correctly rounded quotient); the kernel divides exactly, as the CPU does.
    q_ref, s_ref = (t.to(x.device) for t in ReferenceOps("cpu", fp8_dtype=fmt).quantize_fp8(x.cpu(), block, ue8m0))
    assert q.dtype == fmt and s.dtype == torch.float32
    assert q.shape == x.shape and s.shape == (*x.shape[:-1], math.ceil(x.shape[-1] / block))
    assert torch.equal(s.view(torch.int32), s_ref.view(torch.int32))
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))  # bytes: −0 and NaN codes count


# ---- activation quantization -----------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", [torch.float8_e4m3fn, FNUZ], ids=["e4m3fn", "e4m3fnuz"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ue8m0", [True, False])
@pytest.mark.parametrize("block", [128, 64, 100])
def test_quantize_fp8_exact(dtype, ue8m0, block, fmt):
    g = torch.Generator().manual_seed(block + ue8m0)
    x = torch.randn(2, 19, 300, generator=g) * torch.logspace(-9, 5, 19)[:, None]  # D not a multiple of block
    x[0, 3] = 0  # all-zero row: scale 1e-4/448 (rounded up), q = 0
    x[1, 4, :block] = 0  # one zero block
    x[1, 5] = -x[1, 5].abs()  # tiny negatives round to −0
    x[0, 7, 11] = 3e4  # one outlier dominates its block
    assert_quant_exact(x.to(DEV, dtype), block, ue8m0, fmt)


def test_quantize_fp8_rounding_grid():
    """Every finite e4m3 value, the midpoints between neighbours (ties to even, subnormals) and their negatives, at
    scale exactly 1 (amax 448)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    values = codes[~codes.isnan()].unique()
    mids = (values[1:] + values[:-1]) / 2
    row = torch.cat([values, mids, -mids, torch.tensor([448.0, -0.0])])
    assert_quant_exact(row[None].to(DEV), row.numel(), ue8m0=True)


def test_quantize_fp8_ue8m0_rounds_up():
    """Scales just above a power of two go to the next power (from the bits, as DeepSeek's act_quant), so x / scale
    never saturates. (The reference's ceil(log2(·)) in fp32 can round such scales down; inputs there differ.)"""
    k = torch.arange(-20, 8, dtype=torch.float32)
    amax = torch.nextafter(448.0 * 2.0**k, torch.tensor(float("inf")))
    q, s = quantize_fp8(amax[:, None].to(DEV), 1, ue8m0=True)
    assert torch.equal(s.cpu()[:, 0], 2.0 ** (k + 1))
    assert (q.float().abs() < 448).all()


# ---- fp8 block linear ------------------------------------------------------------------------------------
def emulate(x, q, s, ue8m0_act, ref=REF):
    """Exact fp64 value of the fp8 GEMM and the magnitude Σ|a||b| that bounds its rounding."""
    K = x.shape[-1]
    xq, xs = ref.quantize_fp8(x.reshape(-1, K), 128, ue8m0_act)
    xd = xq.double() * xs.double().repeat_interleave(128, dim=-1)[:, :K]
    wd = ref.dequantize(LinearWeight(q, s), torch.float64)
    return xd @ wd.T, xd.abs() @ wd.abs().T


def check_linear(M, N, K, dtype, ue8m0_act=True, w_ue8m0=True, split_k=None, seed=0, lead=(), fmt=None):
    q, s = cached_weight(N, K, w_ue8m0)
    ref = REF
    if fmt is not None:  # the checkpoint's e4m3fn weight converted to fmt as the loader does (exactly the same values)
        w = to_platform_fp8(LinearWeight(q, s), fmt, dtype)
        q, s, ref = w.weight, w.scale_inv, ReferenceOps(DEV, fp8_dtype=fmt)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, M, K, generator=g)
    x[..., 0, 7] *= 50  # an outlier channel in one token
    x = x.to(DEV, dtype)
    y = fp8_block_linear(x, q, s, ue8m0_act, split_k=split_k)
    assert y.shape == (*lead, M, N) and y.dtype == dtype
    want, bound = emulate(x, q, s, ue8m0_act, ref)
    got = y.reshape(-1, N).double()
    interp = envs.triton_interpret()
    tol = (1e-6 if interp else 1e-2) * bound
    if dtype == torch.bfloat16:
        tol = tol + want.abs() * 2**-7
    err = (got - want).abs()
    assert (err <= tol).all(), f"max excess {(err - tol).max().item():.3g}"
    if not interp:
        assert (got - want).norm() <= 2e-3 * want.norm()
    exact = ref.linear(x, LinearWeight(q, s)).reshape(-1, N).double()
    assert (got - exact).norm() <= 5e-2 * exact.norm()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 5, 33])
@pytest.mark.parametrize("N,K", [(200, 320), (128, 256)])
def test_fp8_linear_tiny(M, N, K, dtype):
    check_linear(M, N, K, dtype, seed=M * N + K)


@pytest.mark.parametrize("split_k", [1, 2, 3])
def test_fp8_linear_split_k(split_k):
    check_linear(5, 200, 520, torch.float32, split_k=split_k, seed=split_k)


@pytest.mark.parametrize("ue8m0_act,w_ue8m0", [(False, True), (True, False), (False, False)])
def test_fp8_linear_scale_formats(ue8m0_act, w_ue8m0):
    check_linear(3, 130, 384, torch.bfloat16, ue8m0_act=ue8m0_act, w_ue8m0=w_ue8m0, seed=7)


@pytest.mark.parametrize("M,lead", [(70, (2,)), (257, ())])  # 140 rows: the 64×128 tiles; 257: the 128×128 tiles
def test_fp8_linear_large_m_tiles_and_leading_dims(M, lead):
    check_linear(M, 130, 200, torch.float32, lead=lead, seed=M)


@pytest.mark.parametrize("M", [1, 70])
def test_fp8_linear_fnuz(M):
    """e4m3fnuz weights (converted from e4m3fn: same values) and fnuz activations (the ROCm backend on gfx942)."""
    skip_without_fnuz_kernels()
    check_linear(M, 200, 320, torch.bfloat16, seed=M + 1, fmt=FNUZ)


def test_fp8_linear_empty():
    q, s = cached_weight(130, 256, True)
    assert fp8_block_linear(torch.zeros(0, 256, device=DEV), q, s).shape == (0, 130)


# ---- DeepSeek-V3.2 shapes on the GPU ---------------------------------------------------------------------
V32_NK = [(24576, 1536), (576, 7168), (1536, 7168), (7168, 16384), (2048, 7168), (7168, 2048), (8192, 1536),
          (128, 7168), (32768, 512), (36864, 7168), (7168, 18432)]


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 64, 4096])
@pytest.mark.parametrize("N,K", V32_NK)
def test_fp8_linear_v32_shapes(M, N, K):
    check_linear(M, N, K, torch.bfloat16, seed=M + N + K)


@pytest.mark.cuda
@pytest.mark.parametrize("M", [7, 200, 1000])
def test_fp8_linear_v32_ragged_m_fp32(M):
    check_linear(M, 576, 7168, torch.float32, seed=M)


@pytest.mark.cuda
def test_quantize_fp8_v32_shapes():
    g = torch.Generator().manual_seed(0)
    for ue8m0 in (True, False):
        for D, block in [(7168, 128), (18432, 128), (512, 128), (128, 128)]:
            x = (torch.randn(333, D, generator=g) * torch.logspace(-6, 3, 333)[:, None]).to(DEV, torch.bfloat16)
            assert_quant_exact(x, block, ue8m0)


def test_fuse_linears():
    """TritonOps fuses linears of one input along N (FP8: whole 128-row scale blocks before the last part); the
    fused GEMM's outputs equal the separate ones (each output row is its own K reduction: equal up to the K-split
    order, fp32 accumulation)."""
    from dsv32.backends.triton.ops import TritonOps

    ops = TritonOps(DEV)
    g = torch.Generator().manual_seed(4)
    parts = [LinearWeight(*fp8_block_weight(n, 256, g)) for n in (128, 256, 72)]
    fused = ops.fuse_linears(parts)
    assert fused.shape == (456, 256) and fused.scale_inv.shape == (1 + 2 + 1, 2)
    x = torch.randn(3, 256, generator=g).to(DEV, torch.bfloat16)
    want = torch.cat([ops.linear(x, w) for w in parts], -1)
    torch.testing.assert_close(ops.linear(x, fused).float(), want.float(), atol=2e-2, rtol=1e-2)
    assert ops.fuse_linears([parts[2], parts[0]]) is None  # 72 rows would split a scale block
    bf = [LinearWeight(torch.randn(n, 64, generator=g).to(DEV)) for n in (5, 7)]
    torch.testing.assert_close(ops.linear(x.float()[:, :64], ops.fuse_linears(bf)),
                               torch.cat([ops.linear(x.float()[:, :64], w) for w in bf], -1))
    assert ops.fuse_linears([bf[0], parts[0]]) is None  # formats differ


def test_model_uses_fused_linears(tiny_dir):
    """The model computes q_a / indexer wk / kv_a (and gate / up) as one GEMM where the backend fuses, and drops the
    separate weights; the reference backend never fuses."""
    from dsv32 import LLM

    fused = LLM(model=tiny_dir, dtype="float32", backend="triton").model.w
    assert "model.layers.0.self_attn.qkv_a.weight" in fused and "model.layers.0.self_attn.q_a_proj.weight" not in fused
    assert "model.layers.0.mlp.gate_up.weight" in fused and "model.layers.1.mlp.shared_experts.gate_up.weight" in fused
    ref = LLM(model=tiny_dir, dtype="float32", backend="reference").model.w
    assert "model.layers.0.self_attn.q_a_proj.weight" in ref and "model.layers.0.self_attn.qkv_a.weight" not in ref
