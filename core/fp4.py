"""FP4 (e2m1) weight formats, in plain torch: the oracle every FP4 kernel is tested against, and the quantizer the tests
and `--load-format dummy` use.

Both formats pack two e2m1 codes per byte, the even element in the low nibble: `weight` uint8 [.., N, K/2]. An e2m1
code is s·e·e·m: value = (−1)^s · (m/2 if e == 0 else (1 + m/2) · 2^(e−1)), i.e. ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}.
- NVFP4 (NVIDIA ModelOpt): groups of 16 along K, each with an e4m3 scale (`weight_scale` float8_e4m3fn [.., N, K/16]),
  and a global fp32 scale (`weight_scale_2`; kept per output row here, [.., N]): W = e2m1 · scale · global.
- MXFP4 (OCP microscaling, AMD Quark): groups of 32 along K, each with an e8m0 scale 2^(e − 127) (`weight_scale`
  uint8 [.., N, K/32]): W = e2m1 · 2^(e − 127). Quark's dynamic MXFP4 activations ("W4A4") are emulated by
  `qdq_mxfp4` (quantize, then dequantize, per 32 activations) before a product with the weight.
"""

from __future__ import annotations

import torch

# e2m1 code (0..15) → value
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP4_MAX = 6.0
GROUP = {"nvfp4": 16, "mxfp4": 32}  # elements per scale
E4M3_MAX = 448.0


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """float32 [.., 2·K2] values of packed uint8 [.., K2] (low nibble first)."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=packed.device)
    p = packed.to(torch.int64)
    return torch.stack([table[p & 0xF], table[p >> 4]], dim=-1).flatten(-2)


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """uint8 codes of the e2m1 values nearest to x (float; saturating at ±6; ties to the even code, as hardware
    conversions round)."""
    a = x.float().abs().clamp(max=FP4_MAX)
    # magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6 are codes 0..7; the midpoints between neighbours decide
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], device=x.device)
    mag = torch.bucketize(a, mids, right=False)  # a == mid → lower code
    even_up = (torch.isin(a, mids)) & (mag % 2 == 1)  # on a midpoint with an odd lower code: the even upper one
    mag = mag + even_up.to(mag.dtype)
    sign = (x < 0) & (mag > 0)
    return (mag + 8 * sign.to(mag.dtype)).to(torch.uint8)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [.., K/2] of codes [.., K] (K even): element 2i in the low nibble, 2i+1 in the high one."""
    c = codes.to(torch.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).contiguous()


def e8m0_to_float(e: torch.Tensor) -> torch.Tensor:
    """float32 2^(e − 127) of uint8 e8m0 exponents (255, NaN in the OCP format, is refused at load)."""
    return torch.exp2(e.to(torch.float32) - 127.0)


def group_scales(scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """float32 value of each group's stored scale (e4m3 for nvfp4, e8m0 uint8 for mxfp4)."""
    return scale.float() if fmt == "nvfp4" else e8m0_to_float(scale)


def dequantize_fp4(weight: torch.Tensor, scale: torch.Tensor, fmt: str, global_scale: torch.Tensor | None,
                   dtype: torch.dtype) -> torch.Tensor:
    """W [.., N, K] in dtype: e2m1 · group scale (· global scale per row for nvfp4), computed in fp32."""
    g = GROUP[fmt]
    vals = unpack_e2m1(weight)
    s = group_scales(scale, fmt).repeat_interleave(g, dim=-1)[..., :vals.shape[-1]]
    w = vals * s
    if global_scale is not None:
        w = w * global_scale.float()[..., None]
    return w.to(dtype)


def quantize_nvfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ModelOpt's NVFP4 of w [.., N, K] (K a multiple of 16): (weight uint8 [.., N, K/2], weight_scale float8_e4m3fn
    [.., N, K/16], weight_scale_2 fp32 scalar = amax(w) / (6 · 448)) with w ≈ e2m1 · weight_scale · weight_scale_2."""
    wf = w.float()
    *lead, n, k = wf.shape
    g2 = (wf.abs().amax().clamp(min=1e-12) / (FP4_MAX * E4M3_MAX)).reshape(())
    blocks = wf.view(*lead, n, k // 16, 16)
    scale = (blocks.abs().amax(-1) / FP4_MAX / g2).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    denom = (scale.float() * g2)[..., None]
    q = torch.where(denom > 0, blocks / torch.where(denom > 0, denom, 1.0), 0.0)
    return pack_e2m1(e2m1_codes(q).view(*lead, n, k)), scale, g2


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OCP MXFP4 of w [.., N, K] (K a multiple of 32): (weight uint8 [.., N, K/2], weight_scale uint8 e8m0
    [.., N, K/32]); scale 2^(floor(log2 amax) − 2) per group (the OCP rule: the group's largest element lands in
    [4, 8), saturating at 6)."""
    q, e = _mx_groups(w.float())
    *lead, n, k = w.shape
    return pack_e2m1(e2m1_codes(q).view(*lead, n, k)), e


def _mx_groups(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / scale in groups [.., G, 32], e8m0 exponents uint8 [.., G]) of x [.., K], K a multiple of 32."""
    *lead, k = x.shape
    groups = x.reshape(*lead, k // 32, 32)
    amax = groups.abs().amax(-1)
    # floor(log2 amax) exactly: frexp's exponent (log2 rounds values just below a power of two up to it)
    exp = (torch.frexp(amax.clamp(min=2.0**-126)).exponent - 1 - 2).to(torch.float32)
    exp = torch.where(amax > 0, exp, torch.full_like(amax, -127.0)).clamp(-127, 127)
    return groups / torch.exp2(exp)[..., None], (exp + 127).to(torch.uint8)


def qdq_mxfp4(x: torch.Tensor) -> torch.Tensor:
    """x [.., K] rounded through dynamic MXFP4 (per 32 consecutive elements of the last dim; a partial last group is
    zero-padded), in x's dtype: what a W4A4 MXFP4 product sees as its activations."""
    k = x.shape[-1]
    pad = -k % 32
    xf = torch.nn.functional.pad(x.float(), (0, pad))
    q, e = _mx_groups(xf)
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=x.device)
    deq = table[e2m1_codes(q).long()] * e8m0_to_float(e)[..., None]
    return deq.flatten(-2)[..., :k].to(x.dtype)
