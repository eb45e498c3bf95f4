"""RoPE and the fused MLA key path (RMSNorm of the latent + interleaved RoPE of k_pe + latent-cache write).

Rounding follows the unfused reference ops step by step (each product and sum rounded to the activation dtype), so
bf16 results agree with the reference bit for bit on a GPU; the fp8 cache entry (656 B at V3.2 sizes: c e4m3 |
fp32 ue8m0 scale per 128 | k_pe bf16) is quantized from the rounded latent exactly as ReferenceOps does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv32.backends.triton.quant import e4m3_bits, fp8_scale
from dsv32.core.kv_cache import latent_scale_blocks


@triton.jit
def _rope_pairs(x1, x2, cos, sin):
    """(x1, x2) rotated by (cos, sin), each product and sum rounded to x's dtype as torch does in that dtype."""
    dt = x1.dtype
    a = (x1.to(tl.float32) * cos).to(dt).to(tl.float32)
    b = (x2.to(tl.float32) * sin).to(dt).to(tl.float32)
    c = (x2.to(tl.float32) * cos).to(dt).to(tl.float32)
    d = (x1.to(tl.float32) * sin).to(dt).to(tl.float32)
    return (a - b).to(dt), (c + d).to(dt)


@triton.jit
def _rotary_kernel(x_ptr, out_ptr, pos_ptr, cs_ptr, stride_xt, stride_xh, stride_ot, stride_oh, H,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, INTERLEAVED: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_R)
    mask = (heads < H)[:, None] & (i < HALF)[None, :]
    pos = tl.load(pos_ptr + t).to(tl.int64)
    x_base = x_ptr + t * stride_xt + heads[:, None] * stride_xh
    o_base = out_ptr + t * stride_ot + heads[:, None] * stride_oh
    if INTERLEAVED:
        off1, off2 = 2 * i[None, :], 2 * i[None, :] + 1
    else:
        off1, off2 = i[None, :], i[None, :] + HALF
    x1 = tl.load(x_base + off1, mask=mask, other=0.0)
    x2 = tl.load(x_base + off2, mask=mask, other=0.0)
    cos = tl.load(cs_ptr + pos * 2 * HALF + i, mask=i < HALF, other=0.0).to(x1.dtype).to(tl.float32)[None, :]
    sin = tl.load(cs_ptr + pos * 2 * HALF + HALF + i, mask=i < HALF, other=0.0).to(x1.dtype).to(tl.float32)[None, :]
    y1, y2 = _rope_pairs(x1, x2, cos, sin)
    tl.store(o_base + off1, y1, mask=mask)
    tl.store(o_base + off2, y2, mask=mask)


def rotary_embedding(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    T, H, R = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(T, H, R, dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    block_h = min(16, triton.next_power_of_2(H))
    half = R // 2
    _rotary_kernel[(T, triton.cdiv(H, block_h))](
        x, out, positions, cos_sin.contiguous(), x.stride(0), x.stride(1), out.stride(0), out.stride(1), H,
        HALF=half, BLOCK_H=block_h, BLOCK_R=triton.next_power_of_2(half), INTERLEAVED=interleaved)
    return out


@triton.jit
def _mla_kv_write_kernel(kv_ptr, w_ptr, pos_ptr, cs_ptr, slot_ptr, cache_ptr, stride_kv, entry_stride, eps,
                         L: tl.constexpr, R: tl.constexpr, NB: tl.constexpr, NB_POW2: tl.constexpr,
                         BLOCK_R: tl.constexpr, FP8: tl.constexpr, FNUZ: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    # RMSNorm of the latent, laid out as [NB, 128] so the fp8 path can take a max per 128-block.
    rows = tl.arange(0, NB_POW2)[:, None]
    cols = tl.arange(0, 128)[None, :]
    lidx = rows * 128 + cols
    lmask = lidx < L
    x = tl.load(kv_ptr + t * stride_kv + lidx, mask=lmask, other=0.0)
    dt = x.dtype
    xf = x.to(tl.float32)
    var = tl.sum(tl.sum(xf * xf, axis=1), axis=0) / L
    h = (xf * tl.rsqrt(var + eps)).to(dt)
    w = tl.load(w_ptr + lidx, mask=lmask, other=0.0)
    c = (w.to(tl.float32) * h.to(tl.float32)).to(dt)
    # Interleaved RoPE of k_pe.
    HALF: tl.constexpr = R // 2
    i = tl.arange(0, BLOCK_R)
    imask = i < HALF
    pos = tl.load(pos_ptr + t).to(tl.int64)
    x1 = tl.load(kv_ptr + t * stride_kv + L + 2 * i, mask=imask, other=0.0)
    x2 = tl.load(kv_ptr + t * stride_kv + L + 2 * i + 1, mask=imask, other=0.0)
    cos = tl.load(cs_ptr + pos * R + i, mask=imask, other=0.0).to(dt).to(tl.float32)
    sin = tl.load(cs_ptr + pos * R + HALF + i, mask=imask, other=0.0).to(dt).to(tl.float32)
    y1, y2 = _rope_pairs(x1, x2, cos, sin)
    base = cache_ptr + slot * entry_stride
    if FP8:
        amax = tl.max(tl.abs(c.to(tl.float32)), axis=1)
        scale = fp8_scale(amax, True, FNUZ)
        q = e4m3_bits(c.to(tl.float32) / scale[:, None], FNUZ)  # exact: scale is a power of two
        tl.store(base + lidx, q.to(tl.uint8), mask=lmask)
        nb = tl.arange(0, NB_POW2)
        tl.store((base + L).to(tl.pointer_type(tl.float32)) + nb, scale, mask=nb < NB)
        pe = (base + L + 4 * NB).to(tl.pointer_type(tl.bfloat16))
        tl.store(pe + 2 * i, y1.to(tl.bfloat16), mask=imask)
        tl.store(pe + 2 * i + 1, y2.to(tl.bfloat16), mask=imask)
    else:
        tl.store(base + lidx, c.to(cache_ptr.dtype.element_ty), mask=lmask)
        tl.store(base + L + 2 * i, y1.to(cache_ptr.dtype.element_ty), mask=imask)
        tl.store(base + L + 2 * i + 1, y2.to(cache_ptr.dtype.element_ty), mask=imask)


def mla_kv_write(kv: torch.Tensor, kv_lora_rank: int, norm_weight: torch.Tensor, eps: float, positions: torch.Tensor,
                 cos_sin: torch.Tensor, latent_cache: torch.Tensor, slots: torch.Tensor, fnuz: bool = False) -> None:
    T, W = kv.shape
    L, R = kv_lora_rank, W - kv_lora_rank
    if T == 0:
        return
    if kv.stride(-1) != 1:
        kv = kv.contiguous()
    pool = latent_cache.view(-1, latent_cache.shape[-1])
    nb = latent_scale_blocks(L)
    _mla_kv_write_kernel[(T,)](
        kv, norm_weight.to(kv.dtype).contiguous(), positions, cos_sin.contiguous(), slots, pool, kv.stride(0),
        pool.stride(0), eps, L=L, R=R, NB=nb, NB_POW2=triton.next_power_of_2(nb),
        BLOCK_R=triton.next_power_of_2(R // 2), FP8=latent_cache.dtype == torch.uint8, FNUZ=fnuz)
