"""Sparse MLA attention over selected latent-cache slots (decode, prefill and MTP-style multi-token queries alike:
every query token carries its own list of slots).

One program per (query token, block of heads): an online softmax over the token's slots in blocks of BLOCK_K.
Heads-major (the default): scores heads × keys, so a program's heads are the matrix products' M dimension — with 16
heads per rank (TP 8) the default 64-head block pads them to 64 (4× the matrix work), and a 16-head block compiles to
mma.sync, not Hopper's wgmma (sm_90 PTX checked). The
keys-major form (`keys_major=True`: keys × heads, output cᵀ · pᵀ) puts the keys and latent channels in M; with 64
keys per block it compiles to wgmma only. It is tested against the reference (CPU interpreter)
but not yet timed on a GPU, so it is opt-in until it is measured.
The score of a slot is q_lat·c + q_pe·k_pe (absorbed MLA, 576-wide at V3.2 sizes), the output Σ p·c (512 wide).
The "combined" cache layouts (core/platform.py): float [slots, L+R] and the fp8 entry [c e4m3 | fp32 scale per 128 |
k_pe bf16] (e4m3fn, or e4m3fnuz on platforms that compute in it), dequantized in the kernel. Invalid slots (−1 or ≥ number of slots) are skipped; a token with none outputs 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv32.backends.triton.gemm import num_sms
from dsv32.backends.triton.moe import _dot
from dsv32.core.kv_cache import latent_scale_blocks


@triton.jit
def _sparse_mla_kernel(q_ptr, kv_ptr, idx_ptr, out_ptr, lse_ptr, stride_qt, stride_qh, stride_it, stride_ot, stride_os,
                       stride_oh, entry_stride, n_slots, H, K, keys_per_split, scale,
                       L: tl.constexpr, R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, FP8: tl.constexpr, NB: tl.constexpr,
                       SB: tl.constexpr, IEEE: tl.constexpr, SPLIT: tl.constexpr, FNUZ: tl.constexpr,
                       KEYS_MAJOR: tl.constexpr = False):
    """KEYS_MAJOR: scores computed transposed, keys × heads (c · q_latᵀ, and the output as cᵀ · pᵀ), so the matrix
    products have the keys (or the 512 latent channels) as their M dimension and the heads as N: with few heads per
    program (16 per rank at TP 8) the heads-major form pads them to the matrix units' minimum M."""
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    hmask = heads < H
    offs_l = tl.arange(0, BLOCK_L)
    lmask = offs_l < L
    offs_r = tl.arange(0, BLOCK_R)
    rmask = offs_r < R
    q_base = q_ptr + t * stride_qt + heads[:, None] * stride_qh
    q_lat = tl.load(q_base + offs_l[None, :], mask=hmask[:, None] & lmask[None, :], other=0.0)
    q_pe = tl.load(q_base + L + offs_r[None, :], mask=hmask[:, None] & rmask[None, :], other=0.0)
    dtype = q_lat.dtype
    NSB: tl.constexpr = BLOCK_L // SB
    offs_sb = tl.arange(0, NSB)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    if KEYS_MAJOR:
        q_lat_t = tl.trans(q_lat)
        q_pe_t = tl.trans(q_pe)
        acc_t = tl.zeros([BLOCK_L, BLOCK_H], tl.float32)
    else:
        acc = tl.zeros([BLOCK_H, BLOCK_L], tl.float32)
    k_begin = split * keys_per_split
    k_end = tl.minimum(K, k_begin + keys_per_split)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        slot = tl.load(idx_ptr + t * stride_it + offs_k, mask=offs_k < k_end, other=-1)
        valid = (slot >= 0) & (slot < n_slots)
        # Skip blocks with no valid slot (top-k lists end in −1 padding; causal lists past the row's length):
        # they would add exact zeros, so skipping changes no result, only the time.
        if tl.max(valid.to(tl.int32), axis=0) > 0:
            base = tl.where(valid, slot, 0).to(tl.int64) * entry_stride
            lm = valid[:, None] & lmask[None, :]
            rm = valid[:, None] & rmask[None, :]
            if FP8:
                raw = tl.load(kv_ptr + base[:, None] + offs_l[None, :], mask=lm, other=0)
                if FNUZ:
                    c = raw.to(tl.float8e4b8, bitcast=True).to(tl.float32)
                else:
                    c = raw.to(tl.float8e4nv, bitcast=True).to(tl.float32)
                # one fp32 scale per SB (=128) latent channels: load [BLOCK_K, NSB], broadcast over each block's channels
                sc = tl.load((kv_ptr + base[:, None] + L).to(tl.pointer_type(tl.float32)) + offs_sb[None, :],
                             mask=valid[:, None] & (offs_sb < NB)[None, :], other=0.0)
                c = tl.reshape(tl.reshape(c, [BLOCK_K, NSB, SB]) * sc[:, :, None], [BLOCK_K, BLOCK_L]).to(dtype)
                pe_ptr = (kv_ptr + base[:, None] + L + 4 * NB).to(tl.pointer_type(tl.bfloat16)) + offs_r[None, :]
                k_pe = tl.load(pe_ptr, mask=rm, other=0.0).to(tl.float32).to(dtype)
            else:
                c = tl.load(kv_ptr + base[:, None] + offs_l[None, :], mask=lm, other=0.0).to(dtype)
                k_pe = tl.load(kv_ptr + base[:, None] + L + offs_r[None, :], mask=rm, other=0.0).to(dtype)
            if KEYS_MAJOR:
                st = _dot(c, q_lat_t, IEEE) + _dot(k_pe, q_pe_t, IEEE)  # [BLOCK_K, BLOCK_H]
                st = tl.where(valid[:, None], st * scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(st, axis=0))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp(m_i - m_safe)
                pt = tl.exp(st - m_safe[None, :])
                l_i = l_i * alpha + tl.sum(pt, axis=0)
                acc_t = acc_t * alpha[None, :] + _dot(tl.trans(c), pt.to(dtype), IEEE)
            else:
                s = _dot(q_lat, tl.trans(c), IEEE) + _dot(q_pe, tl.trans(k_pe), IEEE)
                s = tl.where(valid[None, :], s * scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp(m_i - m_safe)
                p = tl.exp(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + _dot(p.to(dtype), c, IEEE)
            m_i = m_new
    if KEYS_MAJOR:
        acc = tl.trans(acc_t)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptr = out_ptr + t * stride_ot + split * stride_os + heads[:, None] * stride_oh + offs_l[None, :]
    if SPLIT:  # partial result of this split of the keys (fp32) and its log-sum-exp; _combine_kernel merges
        tl.store(o_ptr, out, mask=hmask[:, None] & lmask[None, :])
        lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + (t * tl.num_programs(2) + split) * H + heads, lse, mask=hmask)
    else:
        tl.store(o_ptr, out.to(dtype), mask=hmask[:, None] & lmask[None, :])


@triton.jit
def _combine_kernel(part_ptr, lse_ptr, out_ptr, H, NSPLIT, stride_pt, stride_ps, stride_ph, stride_ot, stride_oh,
                    L: tl.constexpr, BLOCK_L: tl.constexpr):
    """out[t, h] = Σ_s exp(lse_s − max) · part_s / Σ_s exp(lse_s − max) over the key splits, in split order (so
    trailing empty splits, lse = −inf, change nothing: padded key lists give bit-identical results); 0 when all
    splits are empty."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    m = float("-inf")
    for sp in range(0, NSPLIT):
        m = tl.maximum(m, tl.load(lse_ptr + (t * NSPLIT + sp) * H + h))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    cols = tl.arange(0, BLOCK_L)
    acc = tl.zeros([BLOCK_L], tl.float32)
    total = 0.0
    for sp in range(0, NSPLIT):
        w = tl.exp(tl.load(lse_ptr + (t * NSPLIT + sp) * H + h) - m_safe)
        part = tl.load(part_ptr + t * stride_pt + sp * stride_ps + h * stride_ph + cols, mask=cols < L, other=0.0)
        acc += w * part
        total += w
    out = acc / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + cols, out.to(out_ptr.dtype.element_ty), mask=cols < L)


def sparse_mla_attention(q: torch.Tensor, latent_cache: torch.Tensor, topk_slots: torch.Tensor,
                         softmax_scale: float, kv_lora_rank: int, block_h: int | None = None, block_k: int | None = None,
                         num_warps: int | None = None, keys_per_split: int | None = None,
                         num_stages: int | None = None, fnuz: bool = False,
                         keys_major: bool | None = None) -> torch.Tensor:
    """Tuning knobs (None: the defaults below): heads per program, keys per block, warps, keys per split
    (flash-decoding: few query tokens spread their keys over several programs, merged by a second kernel) and the
    keys-major form (KEYS_MAJOR in the kernel). fnuz: the fp8 cache holds e4m3fnuz."""
    T, H, D = q.shape
    L, R = kv_lora_rank, D - kv_lora_rank
    q = q.contiguous()
    idx = topk_slots.to(torch.int32).contiguous()
    out = torch.empty(T, H, L, dtype=q.dtype, device=q.device)
    n_slots = latent_cache.shape[0] * latent_cache.shape[1]
    fp8 = latent_cache.dtype == torch.uint8
    pool = latent_cache.view(n_slots, -1)
    K = idx.shape[1]
    if T == 0 or K == 0:
        return out.zero_()
    ieee = q.dtype == torch.float32
    # measured on an H100 (scratch sweeps over 16/32/64 heads × 16/32/64 keys × 4/8 warps): 64 × 32 × 8 warps is
    # the fastest for batches ≥ 32 and prefill with either cache, within 20% of the best at batch 1
    block_h = block_h or (16 if ieee else 64)
    block_k = block_k or (16 if ieee else 32)
    block_l = max(16, triton.next_power_of_2(L))
    programs = T * triton.cdiv(H, block_h)
    # Key splits: sized from the query count only (never from K), so the same keys fall in the same splits whatever
    # the padding of the slot lists (graph-captured and eager steps give identical results).
    if keys_per_split is None:
        target = triton.cdiv(2 * num_sms(q.device, off_gpu=4), programs)  # programs to fill the GPU twice
        keys_per_split = K if target <= 1 else max(2 * block_k, triton.cdiv(triton.cdiv(2048, target), block_k) * block_k)
    keys_per_split = triton.cdiv(keys_per_split, block_k) * block_k
    nsplit = triton.cdiv(K, keys_per_split)
    if nsplit > 1:
        part = torch.empty(T, nsplit, H, L, dtype=torch.float32, device=q.device)
        lse = torch.empty(T, nsplit, H, dtype=torch.float32, device=q.device)
        dst, strides = part, (part.stride(0), part.stride(1), part.stride(2))
    else:
        lse = out  # unused
        dst, strides = out, (out.stride(0), 0, out.stride(1))
    _sparse_mla_kernel[(T, triton.cdiv(H, block_h), nsplit)](
        q, pool, idx, dst, lse, q.stride(0), q.stride(1), idx.stride(0), *strides,
        pool.stride(0), n_slots, H, K, keys_per_split, softmax_scale,
        L=L, R=R, BLOCK_L=block_l, BLOCK_R=max(16, triton.next_power_of_2(R)),
        BLOCK_H=block_h, BLOCK_K=block_k, FP8=fp8, NB=latent_scale_blocks(L), SB=min(128, block_l), IEEE=ieee,
        SPLIT=nsplit > 1, FNUZ=fnuz, KEYS_MAJOR=bool(keys_major), num_warps=num_warps or (4 if block_h <= 16 else 8),
        **({"num_stages": num_stages} if num_stages else {}))
    if nsplit > 1:
        _combine_kernel[(T, H)](part, lse, out, H, nsplit, part.stride(0), part.stride(1), part.stride(2),
                                out.stride(0), out.stride(1), L=L, BLOCK_L=block_l)
    return out
