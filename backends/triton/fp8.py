"""fp8 e4m3 helpers shared by the Triton kernels.

`to_e4m3` rounds in fp32 arithmetic before converting, so every Triton target gives the same bytes as
torch's `.to(torch.float8_e4m3fn)` (round to nearest even): the CPU interpreter's own fp32 → e4m3 conversion
rounds ties away and loses the carry when the mantissa rounds up (31.0 → 16.0), which would make CPU tests
of fp8 kernels meaningless.
"""

from __future__ import annotations

import triton
import triton.language as tl

E4M3_MAX = 448.0


@triton.jit
def to_e4m3(x):
    """fp32 x (any shape) → tl.float8e4nv, clamped to ±448, round to nearest even."""
    x = tl.clamp(x, -448.0, 448.0)
    exp = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    exp = tl.maximum(exp, -6)  # subnormals step by 2^-9, like the smallest normal binade
    ulp = ((exp - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits
    magic = ulp * 12582912.0  # 1.5·2^23 ulps: the fp32 add rounds x to a multiple of ulp (ties to even)
    r = (x + magic) - magic
    return r.to(tl.float8e4nv)


@triton.jit
def ue8m0_scale(amax):
    """Power-of-two scale covering amax: 2^ceil(log2(max(amax, 1e-4) / 448)), from the float bits (exact)."""
    s = tl.maximum(amax, 1e-4) / 448.0
    bits = s.to(tl.int32, bitcast=True)
    exp = (bits >> 23) & 0xFF
    exp = tl.where((bits & 0x7FFFFF) != 0, exp + 1, exp)  # round up unless already a power of two
    return (exp << 23).to(tl.float32, bitcast=True)
