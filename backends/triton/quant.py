"""Dynamic fp8 (e4m3) activation quantization per (row, block of channels), bit-exact with the reference.

scale = max(amax, 1e-4) / M (IEEE division), with `ue8m0` rounded up to a power of two from its bits (mantissa ≠ 0
→ next exponent), as DeepSeek's act_quant; q = RNE(clamp(x / scale, ±M)) in e4m3. Two e4m3 formats (the platform's,
core/platform.py): OCP e4m3fn (M = 448, exponent bias 7, −0 kept) and e4m3fnuz (FNUZ: M = 240, bias 8, no −0; AMD
MI300). The byte is built with integer ops (`e4m3_bits`), not a float cast: the Triton CPU interpreter's fp32→fp8
conversion mis-rounds (a carry out of the mantissa is lost, −0 loses its sign); so one code path is exact on both
CPU and GPU, for either format.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_TILE = 4096  # elements per program


def fp8_dtype(fnuz: bool) -> torch.dtype:
    return torch.float8_e4m3fnuz if fnuz else torch.float8_e4m3fn


@triton.jit
def e4m3_bits(v, FNUZ: tl.constexpr = False):
    """The e4m3 byte (int32 0..255) of fp32 v, |v| ≤ the format's max, rounded to nearest even. e4m3fn: bias 7,
    sign kept (−0 → 0x80); FNUZ (e4m3fnuz): bias 8, zero is always 0x00 (0x80 is its NaN)."""
    bits = v.to(tl.int32, bitcast=True)
    r = (bits + 0x7FFFF + ((bits >> 20) & 1)) & 0x7FF00000  # normals: RNE to 3 mantissa bits (carry → exponent)
    if FNUZ:
        normal = (((r >> 23) - 119) << 3) | ((r >> 20) & 7)
        sub = ((tl.abs(v) + 8192.0) - 8192.0) * 1024.0  # |v| < 2^-7: RNE to a multiple of 2^-10 (fp32 ulp at 2^13)
        mag = tl.where(tl.abs(v) < 0.0078125, sub.to(tl.int32), normal)  # 8 (= 2^-7) is the smallest normal's code
        return tl.where(mag == 0, 0, mag | ((bits >> 24) & 0x80))
    else:
        normal = (((r >> 23) - 120) << 3) | ((r >> 20) & 7)
        sub = ((tl.abs(v) + 16384.0) - 16384.0) * 512.0  # |v| < 2^-6: RNE to a multiple of 2^-9 (fp32 ulp at 2^14)
        mag = tl.where(tl.abs(v) < 0.015625, sub.to(tl.int32), normal)  # 8 (= 2^-6) is the smallest normal's code
        return mag | ((bits >> 24) & 0x80)


@triton.jit
def fp8_max(FNUZ: tl.constexpr = False):
    if FNUZ:
        return 240.0
    else:
        return 448.0


@triton.jit
def fp8_scale(amax, UE8M0: tl.constexpr, FNUZ: tl.constexpr = False):
    """fp32 scale of a block from its amax: max(amax, 1e-4) / max, rounded up to a power of two if UE8M0."""
    s = tl.math.div_rn(tl.maximum(amax, 1e-4), fp8_max(FNUZ))
    if UE8M0:
        bits = s.to(tl.int32, bitcast=True)
        exp = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        s = (exp << 23).to(tl.float32, bitcast=True)
    return s


@triton.jit
def _quantize_kernel(x_ptr, q_ptr, s_ptr, stride_x, D, NB, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
                     G: tl.constexpr, UE8M0: tl.constexpr, FNUZ: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    blocks = tl.program_id(1) * G + tl.arange(0, G)
    offs_p = tl.arange(0, BLOCK_P)
    cols = blocks[:, None] * BLOCK + offs_p[None, :]
    mask = (offs_p[None, :] < BLOCK) & (cols < D)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    scale = fp8_scale(tl.max(tl.abs(x), axis=1), UE8M0, FNUZ)
    m = fp8_max(FNUZ)
    v = tl.minimum(tl.maximum(tl.math.div_rn(x, scale[:, None]), -m), m)
    tl.store(q_ptr + row * D + cols, e4m3_bits(v, FNUZ).to(tl.uint8), mask=mask)
    tl.store(s_ptr + row * NB + blocks, scale, mask=blocks < NB)


def quantize_fp8(x: torch.Tensor, block: int, ue8m0: bool = True,
                 fnuz: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [.., D] → (q [.., D] float8_e4m3fn (float8_e4m3fnuz if fnuz), scale [.., ceil(D/block)] fp32, contiguous)
    with x ≈ q · scale."""
    shape = x.shape
    D = shape[-1]
    nb = math.ceil(D / block)
    x2 = x.reshape(-1, D)
    if D and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    q = torch.empty(rows, D, dtype=fp8_dtype(fnuz), device=x.device)
    scale = torch.empty(rows, nb, dtype=torch.float32, device=x.device)
    if rows and D:
        block_p = triton.next_power_of_2(block)
        g = min(triton.next_power_of_2(nb), max(1, _TILE // block_p))
        _quantize_kernel[(rows, triton.cdiv(nb, g))](x2, q.view(torch.uint8), scale, x2.stride(0), D, nb,
                                                     BLOCK=block, BLOCK_P=block_p, G=g, UE8M0=ue8m0, FNUZ=fnuz)
    return q.view(*shape), scale.view(*shape[:-1], nb)
