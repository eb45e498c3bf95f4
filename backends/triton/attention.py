"""Sparse MLA attention over selected latent-cache slots (decode, prefill and MTP-style multi-token queries alike:
every query token carries its own list of slots).

One program per (query token, block of heads): an online softmax over the token's slots in blocks of BLOCK_K.
The score of a slot is q_lat·c + q_pe·k_pe (absorbed MLA, 576-wide at V3.2 sizes), the output Σ p·c (512 wide).
Both cache layouts: float [slots, L+R] and the FlashMLA-style fp8 entry [c e4m3 | fp32 scale per 128 | k_pe bf16],
dequantized in the kernel. Invalid slots (−1 or ≥ number of slots) are skipped; a token with none outputs 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv32.core.kv_cache import latent_scale_blocks


@triton.jit
def _sparse_mla_kernel(q_ptr, kv_ptr, idx_ptr, out_ptr, stride_qt, stride_qh, stride_it, stride_ot, stride_oh,
                       entry_stride, n_slots, H, K, scale,
                       L: tl.constexpr, R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, FP8: tl.constexpr, NB: tl.constexpr,
                       IEEE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < H
    offs_l = tl.arange(0, BLOCK_L)
    lmask = offs_l < L
    offs_r = tl.arange(0, BLOCK_R)
    rmask = offs_r < R
    q_base = q_ptr + t * stride_qt + heads[:, None] * stride_qh
    q_lat = tl.load(q_base + offs_l[None, :], mask=hmask[:, None] & lmask[None, :], other=0.0)
    q_pe = tl.load(q_base + L + offs_r[None, :], mask=hmask[:, None] & rmask[None, :], other=0.0)
    dtype = q_lat.dtype

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_L], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        slot = tl.load(idx_ptr + t * stride_it + offs_k, mask=offs_k < K, other=-1)
        valid = (slot >= 0) & (slot < n_slots)
        base = tl.where(valid, slot, 0).to(tl.int64) * entry_stride
        lm = valid[:, None] & lmask[None, :]
        rm = valid[:, None] & rmask[None, :]
        if FP8:
            raw = tl.load(kv_ptr + base[:, None] + offs_l[None, :], mask=lm, other=0)
            c = raw.to(tl.float8e4nv, bitcast=True).to(tl.float32)
            scale_ptr = (kv_ptr + base[:, None] + L).to(tl.pointer_type(tl.float32)) + (offs_l // 128)[None, :]
            c = (c * tl.load(scale_ptr, mask=lm, other=0.0)).to(dtype)
            pe_ptr = (kv_ptr + base[:, None] + L + 4 * NB).to(tl.pointer_type(tl.bfloat16)) + offs_r[None, :]
            k_pe = tl.load(pe_ptr, mask=rm, other=0.0).to(tl.float32).to(dtype)
        else:
            c = tl.load(kv_ptr + base[:, None] + offs_l[None, :], mask=lm, other=0.0).to(dtype)
            k_pe = tl.load(kv_ptr + base[:, None] + L + offs_r[None, :], mask=rm, other=0.0).to(dtype)
        if IEEE:
            s = tl.dot(q_lat, tl.trans(c), input_precision="ieee") + tl.dot(q_pe, tl.trans(k_pe), input_precision="ieee")
        else:
            s = tl.dot(q_lat, tl.trans(c)) + tl.dot(q_pe, tl.trans(k_pe))
        s = tl.where(valid[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(dtype), c, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(dtype), c)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptr = out_ptr + t * stride_ot + heads[:, None] * stride_oh + offs_l[None, :]
    tl.store(o_ptr, out.to(dtype), mask=hmask[:, None] & lmask[None, :])


def sparse_mla_attention(q: torch.Tensor, latent_cache: torch.Tensor, topk_slots: torch.Tensor,
                         softmax_scale: float, kv_lora_rank: int) -> torch.Tensor:
    T, H, D = q.shape
    L, R = kv_lora_rank, D - kv_lora_rank
    q = q.contiguous()
    idx = topk_slots.to(torch.int32).contiguous()
    out = torch.empty(T, H, L, dtype=q.dtype, device=q.device)
    n_slots = latent_cache.shape[0] * latent_cache.shape[1]
    fp8 = latent_cache.dtype == torch.uint8
    pool = latent_cache.view(n_slots, -1)
    if T == 0:
        return out
    block_h = 16
    grid = (T, triton.cdiv(H, block_h))
    _sparse_mla_kernel[grid](
        q, pool, idx, out, q.stride(0), q.stride(1), idx.stride(0), out.stride(0), out.stride(1),
        pool.stride(0), n_slots, H, idx.shape[1], softmax_scale,
        L=L, R=R, BLOCK_L=max(16, triton.next_power_of_2(L)), BLOCK_R=max(16, triton.next_power_of_2(R)),
        BLOCK_H=block_h, BLOCK_K=32, FP8=fp8, NB=latent_scale_blocks(L), IEEE=q.dtype == torch.float32)
    return out
