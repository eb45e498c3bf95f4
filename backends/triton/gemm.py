"""DeepSeek fp8 block GEMM: y = x · Wᵀ with x quantized per token per 128 channels and W in 128×128 e4m3 blocks.

y[m, n] = Σ_kb sa[m, kb] · sb[n // 128, kb] · Σ_{k ∈ kb} a[m, k] · b[n, k]: one fp8 tl.dot per 128-wide K block, its
fp32 partial scaled and added to an fp32 accumulator (DeepSeek's per-block promotion; on sm90 Triton lets the MMA
accumulate each 128-wide block with reduced precision, as DeepGEMM). M, N and K need not be multiples of the tiles
(partial last blocks). Configs are fixed per M range, not autotuned: small M (decode) swaps the operands
(yᵀ = W · xᵀ, so weight rows fill the MMA's M side); when the output tiles alone cannot fill the GPU, K is split
across programs and the partials summed in a fixed order (deterministic). bf16/fp32 weights are not handled here:
they go to torch's F.linear (cuBLAS).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dsv32.backends.triton.quant import quantize_fp8

BLOCK = 128  # DeepSeek weight block (both dims) and activation block


@triton.jit
def _fp8_gemm_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, c_ptr, M, N, K, stride_am, stride_sam, stride_bn, stride_sbn,
                     stride_cs, stride_cm, kb_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr, EVEN_K: tl.constexpr):
    """One (BLOCK_M × BLOCK_N) output tile over K blocks [split·kb_per_split, +kb_per_split) of program_id(1).
    BLOCK_K = 128 = the scale block, and BLOCK_N divides 128, so a tile reads one weight scale per K block."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % rows
    pid_n = (pid % group) // rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = (offs_m % M).to(tl.int64)  # wrapped rows/cols: in-bounds loads without masks; never stored
    rn = (offs_n % N).to(tl.int64)
    kb0 = split * kb_per_split
    kb1 = tl.minimum(kb0 + kb_per_split, tl.cdiv(K, BLOCK_K))
    offs_k = kb0 * BLOCK_K + tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * stride_am + offs_k[None, :]  # [BM, BK]
    b_ptrs = b_ptr + rn[:, None] * stride_bn + offs_k[None, :]  # [BN, BK]
    sa_ptrs = sa_ptr + rm * stride_sam + kb0
    sb_ptrs = sb_ptr + ((pid_n * BLOCK_N) // BLOCK_K) * stride_sbn + kb0

    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb0, kb1):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            kmask = offs_k < K - (kb - kb0) * BLOCK_K
            a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=kmask[None, :], other=0.0)
        sa = tl.load(sa_ptrs)
        sb = tl.load(sb_ptrs)
        if SWAP_AB:
            acc += tl.dot(b, tl.trans(a)) * (sa[None, :] * sb)
        else:
            acc += tl.dot(a, tl.trans(b)) * (sa[:, None] * sb)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
        sa_ptrs += 1
        sb_ptrs += 1

    c_base = c_ptr + split.to(tl.int64) * stride_cs
    if SWAP_AB:
        c_ptrs = c_base + offs_m[None, :].to(tl.int64) * stride_cm + offs_n[:, None]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[None, :] < M) & (offs_n[:, None] < N))
    else:
        c_ptrs = c_base + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _sum_splits_kernel(ws_ptr, y_ptr, numel, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    """y = Σ_s ws[s] (fp32, in split order), cast to y's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLITS):
        acc += tl.load(ws_ptr + s * numel + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device, off_gpu: int = 1) -> int:
    """Streaming multiprocessors of a GPU, cached per device; `off_gpu` stands in under the CPU interpreter (a few
    pretend SMs make heuristics take their multi-program paths in CPU tests)."""
    if device.type != "cuda":
        return off_gpu
    return torch.cuda.get_device_properties(device).multi_processor_count


def _config(M: int, N: int, nkb: int, sms: int) -> tuple[dict, int]:
    """(kernel meta-parameters, K splits) for an M×N output with nkb K blocks."""
    if M <= 64:  # decode: weight-bandwidth bound; weight rows on the MMA's M side, tokens on its N side
        bm = max(16, triton.next_power_of_2(M))
        cfg = dict(BLOCK_M=bm, BLOCK_N=64, SWAP_AB=True, num_warps=4, num_stages=4)
    elif M <= 256:
        cfg = dict(BLOCK_M=64, BLOCK_N=128, SWAP_AB=False, num_warps=4, num_stages=4)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, SWAP_AB=False, num_warps=8, num_stages=3)
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    split = 1
    if tiles < sms:  # fill about two waves, with at least 2 K blocks per split
        split = max(1, min(triton.cdiv(2 * sms, tiles), nkb // 2))
    return cfg, split


def fp8_block_gemm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale_inv: torch.Tensor,
                   out_dtype: torch.dtype, split_k: int | None = None) -> torch.Tensor:
    """y [M, N] (out_dtype) from a [M, K] e4m3 with a_scale [M, ceil(K/128)] fp32 and w [N, K] e4m3 with
    w_scale_inv [ceil(N/128), ceil(K/128)] fp32. `split_k` overrides the heuristic number of K splits."""
    M, K = a.shape
    N = w.shape[0]
    assert w.shape[1] == K and a.stride(1) == 1 and w.stride(1) == 1
    nkb = triton.cdiv(K, BLOCK)
    assert a_scale.shape == (M, nkb) and w_scale_inv.shape == (triton.cdiv(N, BLOCK), nkb)
    y = torch.empty(M, N, dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return y
    if K == 0:
        return y.zero_()
    cfg, split = _config(M, N, nkb, num_sms(a.device))
    kb_per_split = triton.cdiv(nkb, split if split_k is None else split_k)
    split = triton.cdiv(nkb, kb_per_split)  # no empty splits
    out = y if split == 1 else torch.empty(split, M, N, dtype=torch.float32, device=a.device)
    a_scale, w_scale_inv = a_scale.contiguous(), w_scale_inv.contiguous()
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), split)
    _fp8_gemm_kernel[grid](a, a_scale, w, w_scale_inv, out, M, N, K, a.stride(0), a_scale.stride(0), w.stride(0),
                           w_scale_inv.stride(0), M * N, N, kb_per_split, BLOCK_K=BLOCK, GROUP_M=8,
                           EVEN_K=K % BLOCK == 0, **cfg)
    if split > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(M * N, block),)](out, y, M * N, SPLITS=split, BLOCK=block)
    return y


def fp8_block_linear(x: torch.Tensor, w_fp8: torch.Tensor, w_scale_inv: torch.Tensor, ue8m0_act: bool = True,
                     split_k: int | None = None) -> torch.Tensor:
    """y [.., N] = x [.., K] · Wᵀ in x's dtype, W[n, k] = w_fp8[n, k] · w_scale_inv[n // 128, k // 128]; x is
    quantized per token per 128 channels (`quantize_fp8`, power-of-two scales if ue8m0_act) in the weight's e4m3 format
    (e4m3fn or e4m3fnuz), fp32 sums per K block."""
    K = x.shape[-1]
    a, a_scale = quantize_fp8(x.reshape(-1, K), BLOCK, ue8m0_act, fnuz=w_fp8.dtype == torch.float8_e4m3fnuz)
    y = fp8_block_gemm(a, a_scale, w_fp8.contiguous(), w_scale_inv, x.dtype, split_k)
    return y.view(*x.shape[:-1], w_fp8.shape[0])
