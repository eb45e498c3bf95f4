"""FP4 weights without FP4 math (W4A16): dense and grouped-MoE GEMMs that read NVFP4 / MXFP4 weights (core/fp4.py)
and unpack them in the kernel, on any GPU Triton targets (Hopper, Ampere, AMD CDNA, ...).

Two forms. Prefill-sized batches (matrix units): a weight tile is loaded as packed bytes [BLOCK_K/2, BLOCK_N]; the
low nibbles are the even K elements and the high nibbles the odd ones, so the activations are read as even and odd
columns and the tile takes two products, acc += x[:, 0::2] · lo + x[:, 1::2] · hi (tl.dot in the activation dtype;
the decoded values have ≤ 6 significant bits, exact in bf16). Decode (≤ GEMV_TOKENS tokens of a dense linear,
≤ GEMV_PAIRS token-expert pairs of the MoE, one per program; vector units, fp32): `_gemv_rows` keeps each row's bytes
contiguous in the tile, joins a byte's two codes into K order in place, sums the products per scale group inside the
thread and reduces the rows once after the loop. Codes are decoded with integer operations into an fp16's bits (every
target) or, where fp32 denormals are kept (NVIDIA: `fp32_denormals`), an fp32's (`_e2m1`); group scales (e4m3 for
NVFP4, e8m0 for MXFP4) from their bytes the same way — no fp8 / fp4 conversion instructions, so the same code runs on
every target and in the CPU interpreter; NVFP4's per-row global scale multiplies the fp32 sum. K is split across
programs when the output tiles alone cannot fill the GPU (partials summed in a fixed order).

Speed (H200, benchmarks/bench_fp4.py): the decode kernels stream ~1.7 TB/s of FP4 weights (MoE; dense ~1.3), so at
batch 1 the routed experts run 1.6x (NVFP4) / 1.75x (MXFP4) as fast as FP8 and the dense linears 1.0-1.4x. What
bounds them is the work per weight (decode, fp32 product, group sum), not the bytes. Hence the F32 form folds every
power-of-two factor out of the per-weight work (codes stay denormal, the activations carry 2^64, the sum 2^62), the
MoE's gate and up share one loop, and where the tile divides K (EVEN) no K mask is applied. (Vector loads of the
GEMV tiles were measured slower than Triton's byte-wise layout for the gate/up tile: 0.118 vs 0.070 ms.) The
matrix-unit form loads activations and packed bytes as contiguous tiles and splits even / odd columns in registers
(`_even_odd`); it is 1.4-4x slower than FP8 from 32 tokens on: unpacking costs several instructions per weight plus a
register-layout shuffle before tl.dot; a kernel that keeps up with HBM needs the weights pre-shuffled into the
matrix units' operand layout (Marlin's approach, CUDA) or FP4 math units (the vendor paths on Blackwell, gfx950).

W4A4 MXFP4 checkpoints (Quark `input_tensors`): activations are first rounded through MXFP4 (`qdq_mxfp4`, the same
arithmetic as core/fp4.qdq_mxfp4), then multiplied as above (emulated; no FP4 math units are used).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv32.backends.triton.gemm import _sum_splits_kernel, num_sms
from dsv32.backends.triton.moe import _align, _block_pairs, _dot, _store_silu_mul, _store_weighted, _sum_topk_kernel
from dsv32.core import envs
from dsv32.core.ops import ExpertWeights, LinearWeight


# ---- decoding -------------------------------------------------------------------------------------------------------
@triton.jit
def _group_scale(bits, NV: tl.constexpr, F32: tl.constexpr = False):
    """fp32 value of stored group scales (int32 bits): NVFP4 e4m3 (positive) or MXFP4 e8m0 (2^(e−127)). F32 (fp32
    denormals kept): e4m3 through an fp32's bits like `_e2m1` — its exponent and mantissa in the fp32's low exponent
    and top mantissa bits are the value times 2^-120, subnormals included —, then times 2^120."""
    if NV:
        if F32:
            return (bits << 20).to(tl.float32, bitcast=True) * 1.329227995784916e36
        e = (bits >> 3) & 15
        m = bits & 7
        normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
        return tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)  # subnormal: m · 2^-9
    return (bits << 23).to(tl.float32, bitcast=True)


@triton.jit
def _e2m1(b, F32: tl.constexpr):
    """fp32 value of the e2m1 code in the low nibble of b (int32), times 2^-126 (F32: its sign, exponent and mantissa
    bits placed in an fp32's sign, low exponent and top mantissa bits — a denormal when e = 0, exact where fp32
    denormals are kept, as on NVIDIA GPUs) or times 2^-14 (F32 false: the same through an fp16's bits, which every
    target converts exactly)."""
    if F32:
        return (((b & 7) << 22) | ((b & 8) << 28)).to(tl.float32, bitcast=True)
    return (((b << 9) & 0x0E00) | ((b << 12) & 0x8000)).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _fp4_tile(w_ptrs, s_ptrs, wmask, smask, NV: tl.constexpr, GROUP: tl.constexpr, BK2: tl.constexpr,
              BN: tl.constexpr):
    """(even, odd) fp32 weight values [BK2, BN] of a packed tile, exact. w_ptrs address its bytes; s_ptrs
    [BK2·2/GROUP, BN] the group scales (each covers GROUP/2 consecutive bytes of a column). Codes decoded through fp16
    bits (`_e2m1`), times scale · 2^14."""
    packed = tl.load(w_ptrs, mask=wmask, other=0).to(tl.int32)
    scale = _group_scale(tl.load(s_ptrs, mask=smask, other=0).to(tl.int32), NV) * 16384.0  # [BK2·2/GROUP, BN]
    scale = tl.reshape(tl.broadcast_to(scale[:, None, :], (BK2 * 2 // GROUP, GROUP // 2, BN)), (BK2, BN))
    return _e2m1(packed, False) * scale, _e2m1(packed >> 4, False) * scale


@triton.jit
def _even_odd(x):
    """Columns 0, 2, 4, ... and 1, 3, 5, ... of a tile loaded whole (contiguous, vectorized loads)."""
    return tl.split(tl.reshape(x, [x.shape[0], x.shape[1] // 2, 2]))


@triton.jit
def _mac(acc, xe, xo, we, wo, IEEE: tl.constexpr):
    """acc + xe · we + xo · wo on the matrix units (the decoded values have ≤ 6 significant bits: exact in bf16)."""
    return acc + _dot(xe, we.to(xe.dtype), IEEE) + _dot(xo, wo.to(xo.dtype), IEEE)


@triton.jit
def _gemv_rows(x_ptr, w_row, s_row, nmask, k2_lo, k2_hi, NV: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr,
               BK2: tl.constexpr, F32: tl.constexpr, EVEN: tl.constexpr = False):
    """[BN] fp32: Σ x[k] · W[row, k] over the packed bytes [k2_lo, k2_hi) of each row, for one activation row x, with
    fp32 products on the vector units. w_row / s_row [BN, 1]: each row's first byte and first group scale (the rows
    may come from different matrices: the MoE's gate and up share one tile). The tile [BN, BK2] keeps each row's bytes
    contiguous (as stored); a byte's two codes are decoded (`_e2m1`) and joined in place into the row's K order, so the
    activations are read as stored; the products are summed per scale group inside each thread, the group scale
    multiplies that sum, and the rows are reduced once, after the loop. F32: the codes stay denormal (value · 2^-126)
    and the activations are scaled by 2^64 instead, once per element of x rather than of W — the products
    (value · x · 2^-62) are exact unless |value · x| < 2^-64, and x overflows only beyond 2^64 —, the sum by 2^62.
    EVEN: BK2 divides k2_hi − k2_lo (and k2_lo), so no step needs a K mask."""
    NG: tl.constexpr = 2 * BK2 // GROUP
    xcols = tl.arange(0, 2 * BK2)
    acc = tl.zeros([BN, NG], tl.float32)
    for k2 in range(k2_lo, k2_hi, BK2):
        c = k2 + tl.arange(0, BK2)
        if EVEN:  # no K mask: the loads are vectorized
            b = tl.load(w_row + c[None, :], mask=nmask[:, None], other=0).to(tl.int32)
            x = tl.load(x_ptr + 2 * k2 + xcols).to(tl.float32)
        else:
            b = tl.load(w_row + c[None, :], mask=nmask[:, None] & (c < k2_hi)[None, :], other=0).to(tl.int32)
            x = tl.load(x_ptr + 2 * k2 + xcols, mask=2 * k2 + xcols < 2 * k2_hi, other=0.0).to(tl.float32)
        w = tl.reshape(tl.join(_e2m1(b, F32), _e2m1(b >> 4, F32)), [BN, 2 * BK2])
        if F32:
            x *= 1.8446744073709552e19  # 2^64
        part = tl.sum(tl.reshape(w * x[None, :], [BN, NG, GROUP]), axis=2)
        g = 2 * k2 // GROUP + tl.arange(0, NG)
        if EVEN:
            sb = tl.load(s_row + g[None, :], mask=nmask[:, None], other=0)
        else:
            sb = tl.load(s_row + g[None, :], mask=nmask[:, None] & (g * GROUP < 2 * k2_hi)[None, :], other=0)
        acc += part * _group_scale(sb.to(tl.int32), NV, F32)
    acc = tl.sum(acc, axis=1)
    return acc * 4.611686018427388e18 if F32 else acc * 16384.0  # 2^62, 2^14


# ---- dense ----------------------------------------------------------------------------------------------------------
@triton.jit
def _fp4_gemm_kernel(x_ptr, w_ptr, s_ptr, gs_ptr, c_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_cs,
                     stride_cm, k_per_split, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, NV: tl.constexpr, GLOBAL: tl.constexpr, IEEE: tl.constexpr):
    """c[split, m, n] = Σ_{k in split} x[m, k] · W[n, k] (fp32 when split, else c's dtype), W from packed FP4, on the
    matrix units."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    nmask = offs_n < N
    half = tl.arange(0, BLOCK_K // 2)
    groups = tl.arange(0, BLOCK_K // GROUP)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    rm = offs_m.to(tl.int64)
    rn = offs_n.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kb = k0 // 2 + half  # bytes of this block (K elements 2·kb, 2·kb + 1)
        kmask = kb < k_hi // 2
        ks = k0 + tl.arange(0, BLOCK_K)
        xe, xo = _even_odd(tl.load(x_ptr + rm[:, None] * stride_xm + ks[None, :],
                                   mask=mmask[:, None] & (ks < k_hi)[None, :], other=0.0))
        kg = k0 // GROUP + groups
        we, wo = _fp4_tile(w_ptr + rn[None, :] * stride_wn + kb[:, None],
                           s_ptr + rn[None, :] * stride_sn + kg[:, None], kmask[:, None] & nmask[None, :],
                           (kg * GROUP < k_hi)[:, None] & nmask[None, :], NV, GROUP, BLOCK_K // 2, BLOCK_N)
        acc = _mac(acc, xe, xo, we, wo, IEEE)
    if GLOBAL:
        acc *= tl.load(gs_ptr + offs_n, mask=nmask, other=0.0)[None, :]
    c = c_ptr + split.to(tl.int64) * stride_cs + rm[:, None] * stride_cm + offs_n[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _fp4_gemv_kernel(x_ptr, w_ptr, s_ptr, gs_ptr, c_ptr, N, K, stride_xm, stride_wn, stride_sn, stride_cs, stride_cm,
                     k2_per_split, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K2: tl.constexpr,
                     NV: tl.constexpr, GLOBAL: tl.constexpr, F32: tl.constexpr, EVEN: tl.constexpr):
    """Decode (a few tokens, one per program): c[split, m, n] = Σ_{k in split} x[m, k] · W[n, k] (`_gemv_rows`)."""
    m = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    nmask = rows < N
    k2_lo = split * k2_per_split
    k2_hi = tl.minimum(k2_lo + k2_per_split, K // 2)
    r = rows.to(tl.int64)[:, None]
    acc = _gemv_rows(x_ptr + m * stride_xm, w_ptr + r * stride_wn, s_ptr + r * stride_sn, nmask, k2_lo, k2_hi, NV,
                     GROUP, BLOCK_N, BLOCK_K2, F32, EVEN)
    if GLOBAL:
        acc *= tl.load(gs_ptr + rows, mask=nmask, other=0.0)
    tl.store(c_ptr + split.to(tl.int64) * stride_cs + m * stride_cm + rows, acc.to(c_ptr.dtype.element_ty),
             mask=nmask)


def _dense_config(M: int, N: int, K: int, sms: int) -> tuple[dict, int]:
    """(meta-parameters, K splits). Up to GEMV_TOKENS tokens: the vector-unit kernel, 8 rows × up to 1024 bytes (2048
    K) per program, K split until about four programs per SM; up to 64 tokens: 16 × 64 matrix-unit tiles; beyond,
    128 × 128. Matrix-unit tiles split K until about two waves (at least 256 K elements per split)."""
    if M <= GEMV_TOKENS:  # (H200 sweep at 1 token, o_proj / expert / shared shapes: 8 × 1024 with 4 warps near best)
        bk2 = min(1024, max(16, triton.next_power_of_2(K // 2)))
        cfg = dict(BLOCK_N=8, BLOCK_K2=bk2, num_warps=4, num_stages=3)
        programs = M * triton.cdiv(N, 8)
        return cfg, max(1, min(triton.cdiv(4 * sms, programs), triton.cdiv(K // 2, bk2)))
    elif M <= 64:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    split = 1
    if tiles < sms:
        split = max(1, min(triton.cdiv(2 * sms, tiles), K // 256))
    return cfg, split


GEMV_TOKENS = 2  # up to this many tokens the dense kernel multiplies on the vector units (GEMV), one per program
# (H200, NVFP4 o_proj: 2 tokens 0.073 ms GEMV vs 0.086 matrix units; 3 tokens 0.105 vs 0.086)
GEMV_PAIRS = 384  # up to this many (token, expert) pairs the MoE kernels do, one pair per program
# (H200, NVFP4: 48 tokens × top 8 4.25 ms GEMV vs 5.16 on the matrix units; 64 tokens 5.64 vs 5.55)


def _bits(scale: torch.Tensor) -> torch.Tensor:
    """Group scales as their bytes (e4m3 or e8m0): the kernels decode them with integer ops."""
    return scale.view(torch.uint8)


def _ieee(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or envs.triton_interpret()


def fp4_linear(x: torch.Tensor, w: LinearWeight, split_k: int | None = None, config: dict | None = None,
               fp32_denormals: bool = False) -> torch.Tensor:
    """Ops.linear for an FP4 LinearWeight (core/ops.py): y [.., N] = x [.., K] · Wᵀ in x's dtype; x rounded through
    MXFP4 first when w.act says so. split_k / config override the heuristics (benchmarks, tests). fp32_denormals:
    the target keeps fp32 denormals (NVIDIA), so the decode kernels may decode through fp32 bits (`_e2m1`)."""
    K = x.shape[-1]
    N = w.weight.shape[0]
    assert w.weight.shape[1] * 2 == K and w.weight.dtype == torch.uint8
    x2 = x.reshape(-1, K)
    if w.act == "mxfp4":
        x2 = qdq_mxfp4(x2)
    x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y.view(*x.shape[:-1], N)
    cfg, split = _dense_config(M, N, K, num_sms(x.device, off_gpu=2))
    cfg.update(config or {})
    gemv = "BLOCK_K2" in cfg
    unit = cfg["BLOCK_K2"] * 2 if gemv else cfg["BLOCK_K"]  # K elements per step
    k_per_split = triton.cdiv(triton.cdiv(K, split if split_k is None else split_k), unit) * unit
    split = triton.cdiv(K, k_per_split)
    out = y if split == 1 else torch.empty(split, M, N, dtype=torch.float32, device=x.device)
    scale = _bits(w.scale_inv)
    gs = w.global_scale if w.global_scale is not None else scale  # (unused without GLOBAL)
    common = dict(GROUP=w.block[1], NV=w.fmt == "nvfp4", GLOBAL=w.global_scale is not None)
    if gemv:
        _fp4_gemv_kernel[(M, triton.cdiv(N, cfg["BLOCK_N"]), split)](
            x2, w.weight, scale, gs, out, N, K, x2.stride(0), w.weight.stride(0), w.scale_inv.stride(0), M * N, N,
            k_per_split // 2, F32=fp32_denormals, EVEN=(K // 2) % cfg["BLOCK_K2"] == 0, **common, **cfg)
    else:
        grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(M, cfg["BLOCK_M"]), split)
        _fp4_gemm_kernel[grid](x2, w.weight, scale, gs, out, M, N, K, x2.stride(0), w.weight.stride(0),
                               w.scale_inv.stride(0), M * N, N, k_per_split, IEEE=_ieee(x.dtype), **common, **cfg)
    if split > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(M * N, block),)](out, y, M * N, SPLITS=split, BLOCK=block)
    return y.view(*x.shape[:-1], N)


def prepare_linear(w: LinearWeight) -> LinearWeight:
    """FP4 weights stay packed (contiguous); the global scale as fp32 [N]."""
    gs = None if w.global_scale is None else w.global_scale.float().contiguous()
    return LinearWeight(w.weight.contiguous(), w.scale_inv.contiguous(), w.block, w.fmt, gs, w.input_scale, w.act)


def fuse(ws: list[LinearWeight]) -> LinearWeight | None:
    """Linears of one input fused by rows (weights, group scales and global scales concatenate), or None."""
    first = ws[0]
    if any(not w.is_fp4 or w.fmt != first.fmt or w.act != first.act or w.shape[1] != first.shape[1] for w in ws):
        return None
    gs = None if first.global_scale is None else torch.cat([w.global_scale for w in ws])
    return LinearWeight(torch.cat([w.weight for w in ws]), torch.cat([w.scale_inv for w in ws]), first.block,
                        first.fmt, gs, None, first.act)


# ---- W4A4 activations -----------------------------------------------------------------------------------------------
@triton.jit
def _qdq_mxfp4_kernel(x_ptr, y_ptr, R, K, stride_x, stride_y, BLOCK_R: tl.constexpr):
    """y = x rounded through MXFP4 per 32 elements of a row: scale 2^(floor(log2 amax) − 2), e2m1 nearest, ties to
    the even code, saturating at 6 (core/fp4.qdq_mxfp4)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * 32 + tl.arange(0, 32)
    mask = (rows < R)[:, None] & (cols < K)[None, :]
    r64 = rows.to(tl.int64)
    x = tl.load(x_ptr + r64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    e = ((amax.to(tl.int32, bitcast=True) >> 23) & 255) - 2  # biased exponent of floor(log2 amax), minus 2
    e = tl.where(amax > 0, tl.maximum(e, 1), 1)
    scale = (e << 23).to(tl.float32, bitcast=True)
    a = tl.abs(x) / scale[:, None]
    q = tl.where(a <= 0.25, 0.0, tl.where(a < 0.75, 0.5, tl.where(a <= 1.25, 1.0, tl.where(a < 1.75, 1.5, tl.where(
        a <= 2.5, 2.0, tl.where(a < 3.5, 3.0, tl.where(a <= 5.0, 4.0, 6.0)))))))
    y = tl.where(x < 0, -q, q) * scale[:, None]
    tl.store(y_ptr + r64[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def qdq_mxfp4(x: torch.Tensor) -> torch.Tensor:
    """x [R, K] rounded through dynamic MXFP4 per 32 elements of each row, in x's dtype."""
    x = x.contiguous()
    R, K = x.shape
    y = torch.empty_like(x)
    if R and K:
        block_r = 16
        _qdq_mxfp4_kernel[(triton.cdiv(R, block_r), triton.cdiv(K, 32))](x, y, R, K, x.stride(0), y.stride(0),
                                                                         BLOCK_R=block_r)
    return y


# ---- grouped MoE ----------------------------------------------------------------------------------------------------
@triton.jit
def _fp4_gate_up_kernel(x_ptr, g_ptr, u_ptr, gs_ptr, us_ptr, ggs_ptr, ugs_ptr, h_ptr, sorted_ptr, expert_ptr,
                        n_pairs, N, K, stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_ge, stride_hm,
                        GROUP: tl.constexpr, TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, NV: tl.constexpr, GLOBAL: tl.constexpr, IEEE: tl.constexpr,
                        RNE: tl.constexpr):
    """h[pair, n] = silu(x[tok]·gate[e, n]) · (x[tok]·up[e, n]) for the pairs of one M-block, FP4 gate / up."""
    e = tl.load(expert_ptr + tl.program_id(0)).to(tl.int64)
    if e < 0:
        return
    pair, valid, offs_n, nmask = _block_pairs(sorted_ptr, n_pairs, N, BLOCK_M, BLOCK_N)
    tok = pair // TOP_K
    half = tl.arange(0, BLOCK_K // 2)
    groups = tl.arange(0, BLOCK_K // GROUP)
    w_off = e * stride_we + offs_n[None, :].to(tl.int64) * stride_wn
    s_off = e * stride_se + offs_n[None, :].to(tl.int64) * stride_sn
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kb = k0 // 2 + half
        kmask = kb < K // 2
        ks = k0 + tl.arange(0, BLOCK_K)
        xe, xo = _even_odd(tl.load(x_ptr + tok[:, None] * stride_xm + ks[None, :],
                                   mask=valid[:, None] & (ks < K)[None, :], other=0.0))
        wm = kmask[:, None] & nmask[None, :]
        kg = k0 // GROUP + groups
        sm = (kg * GROUP < K)[:, None] & nmask[None, :]
        ge, go = _fp4_tile(g_ptr + w_off + kb[:, None], gs_ptr + s_off + kg[:, None], wm, sm, NV, GROUP,
                           BLOCK_K // 2, BLOCK_N)
        acc_g = _mac(acc_g, xe, xo, ge, go, IEEE)
        ue, uo = _fp4_tile(u_ptr + w_off + kb[:, None], us_ptr + s_off + kg[:, None], wm, sm, NV, GROUP,
                           BLOCK_K // 2, BLOCK_N)
        acc_u = _mac(acc_u, xe, xo, ue, uo, IEEE)
    if GLOBAL:
        acc_g *= tl.load(ggs_ptr + e * stride_ge + offs_n, mask=nmask, other=0.0)[None, :]
        acc_u *= tl.load(ugs_ptr + e * stride_ge + offs_n, mask=nmask, other=0.0)[None, :]
    _store_silu_mul(acc_g, acc_u, h_ptr, pair, stride_hm, offs_n, valid, nmask, RNE)


@triton.jit
def _fp4_down_kernel(h_ptr, w_ptr, s_ptr, gs_ptr, topk_w_ptr, out_ptr, sorted_ptr, expert_ptr, n_pairs, N, K,
                     stride_hm, stride_we, stride_wn, stride_se, stride_sn, stride_ge, stride_om,
                     GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     NV: tl.constexpr, GLOBAL: tl.constexpr, IEEE: tl.constexpr, RNE: tl.constexpr):
    """out[pair, n] = weight[pair] · (h[pair]·down[e, n]) for the pairs of one M-block, FP4 down."""
    e = tl.load(expert_ptr + tl.program_id(0)).to(tl.int64)
    if e < 0:
        return
    pair, valid, offs_n, nmask = _block_pairs(sorted_ptr, n_pairs, N, BLOCK_M, BLOCK_N)
    half = tl.arange(0, BLOCK_K // 2)
    groups = tl.arange(0, BLOCK_K // GROUP)
    w_off = e * stride_we + offs_n[None, :].to(tl.int64) * stride_wn
    s_off = e * stride_se + offs_n[None, :].to(tl.int64) * stride_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kb = k0 // 2 + half
        kmask = kb < K // 2
        ks = k0 + tl.arange(0, BLOCK_K)
        he, ho = _even_odd(tl.load(h_ptr + pair[:, None] * stride_hm + ks[None, :],
                                   mask=valid[:, None] & (ks < K)[None, :], other=0.0))
        kg = k0 // GROUP + groups
        we, wo = _fp4_tile(w_ptr + w_off + kb[:, None], s_ptr + s_off + kg[:, None],
                           kmask[:, None] & nmask[None, :], (kg * GROUP < K)[:, None] & nmask[None, :], NV, GROUP,
                           BLOCK_K // 2, BLOCK_N)
        acc = _mac(acc, he, ho, we, wo, IEEE)
    if GLOBAL:
        acc *= tl.load(gs_ptr + e * stride_ge + offs_n, mask=nmask, other=0.0)[None, :]
    _store_weighted(acc, topk_w_ptr, out_ptr, pair, stride_om, offs_n, valid, nmask, RNE)


@triton.jit
def _fp4_gemv_gate_up_kernel(x_ptr, g_ptr, u_ptr, gs_ptr, us_ptr, ggs_ptr, ugs_ptr, h_ptr, ids_ptr, E, N, K,
                             stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_ge, stride_hm,
                             GROUP: tl.constexpr, TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K2: tl.constexpr,
                             NV: tl.constexpr, GLOBAL: tl.constexpr, RNE: tl.constexpr, F32: tl.constexpr,
                             EVEN: tl.constexpr):
    """Decode, one (token, slot) pair per program: h[pair, n] = silu(x[tok]·gate[e, n]) · (x[tok]·up[e, n]) for
    BLOCK_N rows n — one tile of 2·BLOCK_N rows, gate's then up's, so one loop streams both matrices."""
    pair = tl.program_id(0).to(tl.int64)
    e = tl.load(ids_ptr + pair).to(tl.int64)
    if e >= E:  # another rank's expert
        return
    r2 = tl.arange(0, 2 * BLOCK_N)
    is_up = r2 >= BLOCK_N
    offs = tl.program_id(1) * BLOCK_N + r2 % BLOCK_N
    mask2 = offs < N
    rows = offs.to(tl.int64)[:, None]
    w_row = tl.where(is_up, u_ptr, g_ptr)[:, None] + e * stride_we + rows * stride_wn
    s_row = tl.where(is_up, us_ptr, gs_ptr)[:, None] + e * stride_se + rows * stride_sn
    acc = _gemv_rows(x_ptr + (pair // TOP_K) * stride_xm, w_row, s_row, mask2, 0, K // 2, NV, GROUP, 2 * BLOCK_N,
                     BLOCK_K2, F32, EVEN)
    if GLOBAL:
        acc *= tl.load(tl.where(is_up, ugs_ptr, ggs_ptr) + e * stride_ge + offs, mask=mask2, other=0.0)
    acc_g, acc_u = tl.split(tl.permute(tl.reshape(acc, [2, BLOCK_N]), [1, 0]))
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    _store_silu_mul(acc_g[None, :], acc_u[None, :], h_ptr, tl.full([1], pair, tl.int64), stride_hm, offs_n,
                    tl.full([1], True, tl.int1), offs_n < N, RNE)


@triton.jit
def _fp4_gemv_down_kernel(h_ptr, w_ptr, s_ptr, gs_ptr, topk_w_ptr, out_ptr, ids_ptr, E, N, K, stride_hm, stride_we,
                          stride_wn, stride_se, stride_sn, stride_ge, stride_om, GROUP: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K2: tl.constexpr, NV: tl.constexpr, GLOBAL: tl.constexpr,
                          RNE: tl.constexpr, F32: tl.constexpr, EVEN: tl.constexpr):
    """Decode, one pair per program: out[pair, n] = weight[pair] · (h[pair]·down[e, n])."""
    pair = tl.program_id(0).to(tl.int64)
    e = tl.load(ids_ptr + pair).to(tl.int64)
    if e >= E:
        return
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    rows = offs_n.to(tl.int64)[:, None]
    acc = _gemv_rows(h_ptr + pair * stride_hm, w_ptr + e * stride_we + rows * stride_wn,
                     s_ptr + e * stride_se + rows * stride_sn, nmask, 0, K // 2, NV, GROUP, BLOCK_N, BLOCK_K2, F32,
                     EVEN)
    if GLOBAL:
        acc *= tl.load(gs_ptr + e * stride_ge + offs_n, mask=nmask, other=0.0)
    _store_weighted(acc[None, :], topk_w_ptr, out_ptr, tl.full([1], pair, tl.int64), stride_om, offs_n,
                    tl.full([1], True, tl.int1), nmask, RNE)


def prepare_experts(w: ExpertWeights) -> ExpertWeights:
    """FP4 experts stay packed, gate / up / down separate (kernel 1 reads gate and up through two pointers)."""
    return ExpertWeights(prepare_linear(w.gate), prepare_linear(w.up), prepare_linear(w.down))


def fp4_moe_experts(x: torch.Tensor, experts: ExpertWeights, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                    config: dict | None = None, fp32_denormals: bool = False) -> torch.Tensor:
    """Ops.moe_experts on FP4 experts from `prepare_experts`: y [T, K] in x's dtype (the fused-MoE structure of
    backends/triton/moe.py: gate+up+SiLU kernel, down kernel scaled by the routing weight, a fixed-order sum over each
    token's top-k). Up to GEMV_PAIRS (token, expert) pairs each pair is a program of its own (vector units); beyond,
    pairs are sorted by expert into blocks for the matrix units. config overrides the meta-parameters (vector units:
    bn1, bk1, bn2, bk2 — rows and bytes per step of the two kernels —, warps, stages; matrix units: block_m, bn1,
    bn2, bk, warps, stages). fp32_denormals as in `fp4_linear`."""
    T, K = x.shape
    top_k = topk_ids.shape[1]
    n_pairs = T * top_k
    gate, up, down = experts.gate, experts.up, experts.down
    E, I = gate.weight.shape[0], gate.weight.shape[1]
    dtype, dev = x.dtype, x.device
    y = torch.empty(T, K, dtype=dtype, device=dev)
    if T == 0:
        return y
    w4a4 = gate.act == "mxfp4"
    x = qdq_mxfp4(x) if w4a4 else x.contiguous()
    ieee = _ieee(dtype)
    rne = dtype == torch.bfloat16 and envs.triton_interpret()
    nv, glob, group = gate.fmt == "nvfp4", gate.global_scale is not None, gate.block[1]
    gsc, usc, dsc = _bits(gate.scale_inv), _bits(up.scale_inv), _bits(down.scale_inv)
    ggs = gate.global_scale if glob else gsc
    ugs = up.global_scale if glob else usc
    dgs = down.global_scale if glob else dsc
    rw = topk_weights.float().reshape(-1).contiguous()
    # (W4A4 rounds all of h: zeros where a pair of another rank's expert leaves it unwritten)
    h = (torch.zeros if w4a4 else torch.empty)(n_pairs, I, dtype=dtype, device=dev)
    out = torch.empty(n_pairs, K, dtype=dtype, device=dev)
    if n_pairs <= GEMV_PAIRS:  # decode: one pair per program (each has its own expert), vector-unit products
        cfg = dict(bn1=16, bk1=512, bn2=32, bk2=256, warps=4, stages=3)  # (H200 sweep at 1, 2, 8 tokens)
        cfg.update(config or {})
        ids = topk_ids.reshape(-1).contiguous()  # (int64 as routed: no conversion kernel)
        bk1, bk2 = min(cfg["bk1"], triton.next_power_of_2(K // 2)), min(cfg["bk2"], triton.next_power_of_2(I // 2))
        _fp4_gemv_gate_up_kernel[(n_pairs, triton.cdiv(I, cfg["bn1"]))](
            x, gate.weight, up.weight, gsc, usc, ggs, ugs, h, ids, E, I, K, x.stride(0), gate.weight.stride(0),
            gate.weight.stride(1), gate.scale_inv.stride(0), gate.scale_inv.stride(1), ggs.stride(0), h.stride(0),
            GROUP=group, TOP_K=top_k, BLOCK_N=cfg["bn1"], BLOCK_K2=bk1, NV=nv, GLOBAL=glob, RNE=rne,
            F32=fp32_denormals, EVEN=(K // 2) % bk1 == 0, num_warps=cfg["warps"], num_stages=cfg["stages"])
        if w4a4:
            h = qdq_mxfp4(h)
        _fp4_gemv_down_kernel[(n_pairs, triton.cdiv(K, cfg["bn2"]))](
            h, down.weight, dsc, dgs, rw, out, ids, E, K, I, h.stride(0), down.weight.stride(0),
            down.weight.stride(1), down.scale_inv.stride(0), down.scale_inv.stride(1), dgs.stride(0), out.stride(0),
            GROUP=group, BLOCK_N=cfg["bn2"], BLOCK_K2=bk2, NV=nv, GLOBAL=glob, RNE=rne, F32=fp32_denormals,
            EVEN=(I // 2) % bk2 == 0, num_warps=cfg["warps"], num_stages=cfg["stages"])
    else:
        if n_pairs <= 2048:  # (H200 sweep at 32 / 256 tokens: best of 12)
            cfg = dict(block_m=16, bn1=32, bn2=64, bk=128, warps=4, stages=4)
        else:
            cfg = dict(block_m=64, bn1=64, bn2=64, bk=128, warps=4, stages=3)  # (1024 / 4096 tokens: best of 8)
        cfg.update(config or {})
        sorted_ids, expert_ids = _align(topk_ids, E, cfg["block_m"])
        n_blocks = expert_ids.numel()
        _fp4_gate_up_kernel[(n_blocks, triton.cdiv(I, cfg["bn1"]))](
            x, gate.weight, up.weight, gsc, usc, ggs, ugs, h, sorted_ids, expert_ids, n_pairs, I, K,
            x.stride(0), gate.weight.stride(0), gate.weight.stride(1), gate.scale_inv.stride(0),
            gate.scale_inv.stride(1), ggs.stride(0), h.stride(0), GROUP=group, TOP_K=top_k, BLOCK_M=cfg["block_m"],
            BLOCK_N=cfg["bn1"], BLOCK_K=cfg["bk"], NV=nv, GLOBAL=glob, IEEE=ieee, RNE=rne, num_warps=cfg["warps"],
            num_stages=cfg["stages"])
        if w4a4:
            h = qdq_mxfp4(h)
        _fp4_down_kernel[(n_blocks, triton.cdiv(K, cfg["bn2"]))](
            h, down.weight, dsc, dgs, rw, out, sorted_ids, expert_ids, n_pairs, K, I,
            h.stride(0), down.weight.stride(0), down.weight.stride(1), down.scale_inv.stride(0),
            down.scale_inv.stride(1), dgs.stride(0), out.stride(0), GROUP=group, BLOCK_M=cfg["block_m"],
            BLOCK_N=cfg["bn2"], BLOCK_K=cfg["bk"], NV=nv, GLOBAL=glob, IEEE=ieee, RNE=rne, num_warps=cfg["warps"],
            num_stages=cfg["stages"])
    block = min(1024, triton.next_power_of_2(K))
    _sum_topk_kernel[(T, triton.cdiv(K, block))](out, topk_ids.contiguous(), y, K, E, TOP_K=top_k, BLOCK=block,
                                                  RNE=rne)
    return y
