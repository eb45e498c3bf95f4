"""Lightning indexer kernels: the fused key write, the fused query preparation and the top-k over paged keys.

- `indexer_k_write`: one program per token: LayerNorm (fp32 math) → half-split RoPE on the rope part → Sylvester
  Hadamard (fp32 butterfly in registers) → store into the float pool, or e4m3 + one ue8m0 scale per token into the
  DeepGEMM page layout of the uint8 pool. Every step rounds to k's dtype as the reference's unfused ops do.
- `indexer_q_prepare`: one program per (token, block of heads): RoPE; in fp8 mode Hadamard, per-(token, head) e4m3
  quantization and head_weights × scale.
- `indexer_topk`: a tiled logits kernel ([BLOCK_T·Hi, D] queries of one request × [D, BLOCK_S] keys read through
  the block table, fp8 tensor-core dots on fp8 pools) over chunks of query rows (≤ 2^28 bytes of logits at a time),
  then the radix-select top-k of topk.py, which also maps positions to physical slots.

Rounding to bf16 and to e4m3 is done with integer round-to-nearest-even here (identical to the hardware conversion
on GPUs) because the CPU interpreter truncates fp32 → bf16 and mis-rounds fp32 → fp8.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv32.backends.triton.gemm import num_sms
from dsv32.backends.triton.quant import e4m3_bits, fp8_dtype, fp8_max, fp8_scale
from dsv32.backends.triton.topk import topk_into
from dsv32.core import envs
from dsv32.core.ops import AttnMetadata

LOGITS_BYTES = 1 << 28  # largest logits buffer indexer_topk allocates


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """fp32 x → dtype, round to nearest even."""
    if dtype == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        return b.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x.to(dtype)


@triton.jit
def _butterfly(x, M: tl.constexpr, D: tl.constexpr, S: tl.constexpr):
    """One Sylvester stage on rows of x [M, D]: pairs (i, i+S) in blocks of 2S → (a+b, a−b)."""
    a, b = tl.split(tl.permute(tl.reshape(x, [M, D // (2 * S), 2, S]), (0, 1, 3, 2)))
    return tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), [M, D])


@triton.jit
def _hadamard(x, M: tl.constexpr, D: tl.constexpr):
    """Rows of x [M, D] fp32 times the ±1 Sylvester matrix H_D: the reference's butterfly, same order of adds."""
    for i in tl.static_range(0, 16):
        if 2**i < D:
            x = _butterfly(x, M, D, 2**i)
    return x


@triton.jit
def _rope_half(x, xp, cols, cos_sin_row, R: tl.constexpr, dtype: tl.constexpr):
    """Half-split RoPE of the first R columns, rounded like the reference's ops in dtype: x·cos + rot·sin with
    rot = (−x[i+R/2] | x[i−R/2]); x and its partner xp are fp32 values of dtype. Columns ≥ R pass through."""
    half: tl.constexpr = R // 2
    in_rope = cols < R
    j = tl.where(cols < half, cols, cols - half)
    cos = _round_to(tl.load(cos_sin_row + j, mask=in_rope, other=1.0), dtype).to(tl.float32)
    sin = _round_to(tl.load(cos_sin_row + half + j, mask=in_rope, other=0.0), dtype).to(tl.float32)
    rot = tl.where(cols < half, -xp, xp)
    a = _round_to(x * cos, dtype).to(tl.float32)
    b = _round_to(rot * sin, dtype).to(tl.float32)
    return tl.where(in_rope, _round_to(a + b, dtype).to(tl.float32), x)


@triton.jit
def _quant_rows(x, FNUZ: tl.constexpr):
    """Rows of x [M, D] fp32 → (e4m3 bytes [M, D], ue8m0 scale [M]) as ReferenceOps.quantize_fp8 (block = D)."""
    scale = fp8_scale(tl.max(tl.abs(x), axis=1), True, FNUZ)
    inv = ((254 << 23) - scale.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)  # 1 / scale, exactly
    m = fp8_max(FNUZ)
    q = tl.minimum(tl.maximum(x * inv[:, None], -m), m)
    return e4m3_bits(q, FNUZ).to(tl.uint8), scale


@triton.jit
def _k_write_kernel(k_ptr, w_ptr, b_ptr, pos_ptr, cs_ptr, slot_ptr, pool_ptr, stride_k, stride_cs, eps, inv_sqrt_d,
                    page_size, page_bytes, D: tl.constexpr, BLOCK_D: tl.constexpr, R: tl.constexpr,
                    HADAMARD: tl.constexpr, FP8: tl.constexpr, FNUZ: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t)
    cols = tl.arange(0, BLOCK_D)[None, :]
    cmask = cols < D
    half: tl.constexpr = R // 2
    partner = tl.where(cols < half, cols + half, tl.where(cols < R, cols - half, cols))
    row = k_ptr + t * stride_k
    x = tl.load(row + cols, mask=cmask, other=0.0)
    dtype: tl.constexpr = x.dtype
    xf = x.to(tl.float32)
    mean = tl.sum(xf, axis=1)[:, None] / D
    xc = tl.where(cmask, xf - mean, 0.0)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(xc * xc, axis=1)[:, None] / D + eps)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    y = _round_to(xc * rstd * w + b, dtype).to(tl.float32)
    # the partner element of the rotation, normalized the same way (elementwise, so bit-identical)
    xp = tl.load(row + partner, mask=cmask, other=0.0).to(tl.float32)
    wp = tl.load(w_ptr + partner, mask=cmask, other=0.0).to(tl.float32)
    bp = tl.load(b_ptr + partner, mask=cmask, other=0.0).to(tl.float32)
    yp = _round_to((xp - mean) * rstd * wp + bp, dtype).to(tl.float32)
    y = _rope_half(y, yp, cols, cs_ptr + tl.load(pos_ptr + t) * stride_cs, R, dtype)
    if HADAMARD:
        y = _round_to(_hadamard(y, 1, BLOCK_D) * inv_sqrt_d, dtype).to(tl.float32)
    # the scalar condition broadcast to the row first: Triton 3.9's interpreter turns block_bool & scalar_bool into int32
    smask = cmask & ((cols * 0 + slot) >= 0)
    page = slot // page_size
    off = slot % page_size
    if FP8:
        q, scale = _quant_rows(y, FNUZ)
        base = pool_ptr + page * page_bytes
        tl.store(base + off * D + cols, q, mask=smask)
        scale_ptr = (base + page_size * D + off * 4).to(tl.pointer_type(tl.float32))
        one = tl.arange(0, 1)
        tl.store(scale_ptr + one, scale, mask=(one * 0 + slot) >= 0)
    else:
        tl.store(pool_ptr + slot * D + cols, _round_to(y, pool_ptr.dtype.element_ty), mask=smask)


def indexer_k_write(k, norm_weight, norm_bias, eps, positions, cos_sin, rope_dim, hadamard, index_cache, slots,
                    fnuz=False):
    T, D = k.shape
    if T == 0:
        return
    fp8 = index_cache.dtype == torch.uint8
    assert not hadamard or D & (D - 1) == 0, "the Hadamard rotation needs a power-of-two head dim"
    assert not fp8 or D % 4 == 0, "the fp8 index pool's fp32 scales need a head dim that is a multiple of 4"
    page_size = index_cache.shape[1] // (D + 4) if fp8 else index_cache.shape[1]
    k = k.contiguous()
    _k_write_kernel[(T,)](k, norm_weight.contiguous(), norm_bias.contiguous(), positions.contiguous(),
                          cos_sin.contiguous(), slots.to(torch.int64).contiguous(), index_cache, k.stride(0),
                          cos_sin.shape[1], eps, D**-0.5, page_size, index_cache.shape[1] if fp8 else 0,
                          D=D, BLOCK_D=triton.next_power_of_2(D), R=rope_dim, HADAMARD=hadamard, FP8=fp8,
                          FNUZ=fnuz)


@triton.jit
def _q_prepare_kernel(q_ptr, w_ptr, pos_ptr, cs_ptr, q_out_ptr, w_out_ptr, H, stride_qt, stride_qh, stride_wt,
                      stride_cs, inv_sqrt_d, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
                      R: tl.constexpr, FP8: tl.constexpr, FNUZ: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    hv = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    heads = hv[:, None]
    cols = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < H) & (cols < D)
    half: tl.constexpr = R // 2
    partner = tl.where(cols < half, cols + half, tl.where(cols < R, cols - half, cols))
    base = q_ptr + t * stride_qt + heads * stride_qh
    x = tl.load(base + cols, mask=mask, other=0.0)
    dtype: tl.constexpr = x.dtype
    xp = tl.load(base + partner, mask=mask, other=0.0).to(tl.float32)
    y = _rope_half(x.to(tl.float32), xp, cols, cs_ptr + tl.load(pos_ptr + t) * stride_cs, R, dtype)
    out = q_out_ptr + t * H * D + heads * D + cols
    if FP8:
        y = _round_to(_hadamard(y, BLOCK_H, BLOCK_D) * inv_sqrt_d, dtype).to(tl.float32)
        q, scale = _quant_rows(y, FNUZ)
        tl.store(out, q, mask=mask)
        w = tl.load(w_ptr + t * stride_wt + hv, mask=hv < H, other=0.0)
        tl.store(w_out_ptr + t * H + hv, w * scale, mask=hv < H)
    else:
        tl.store(out, y.to(dtype), mask=mask)


def indexer_q_prepare(q, head_weights, positions, cos_sin, rope_dim, fp8, fnuz=False):
    T, H, D = q.shape
    q, head_weights = q.contiguous(), head_weights.contiguous()
    if fp8:
        assert D & (D - 1) == 0, "fp8 indexer queries need a power-of-two head dim"
        q_out = torch.empty(T, H, D, dtype=torch.uint8, device=q.device)
        w_out = torch.empty(T, H, dtype=torch.float32, device=q.device)
    else:
        q_out, w_out = torch.empty(T, H, D, dtype=q.dtype, device=q.device), head_weights
    if T:
        block_h = min(16, triton.next_power_of_2(H))
        _q_prepare_kernel[(T, triton.cdiv(H, block_h))](
            q, head_weights, positions.contiguous(), cos_sin.contiguous(), q_out, w_out, H, q.stride(0), q.stride(1),
            head_weights.stride(0), cos_sin.shape[1], D**-0.5, D=D, BLOCK_D=triton.next_power_of_2(D),
            BLOCK_H=block_h, R=rope_dim, FP8=fp8, FNUZ=fnuz)
    return (q_out.view(fp8_dtype(fnuz)), w_out) if fp8 else (q_out, w_out)


@triton.jit
def _as_fp8(raw, FNUZ: tl.constexpr):
    """uint8 bytes read as e4m3 of the platform's format."""
    if FNUZ:
        return raw.to(tl.float8e4b8, bitcast=True)
    else:
        return raw.to(tl.float8e4nv, bitcast=True)


@triton.jit
def _logits_kernel(q_ptr, w_ptr, kv_ptr, bt_ptr, pos_ptr, req_ptr, order_ptr, tile_first_ptr, tile_n_ptr, out_ptr,
                   H, stride_qt, stride_qh, stride_wt, stride_bt, stride_out, page_size, page_bytes, softmax_scale,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, HI_P: tl.constexpr, BLOCK_T: tl.constexpr,
                   BLOCK_S: tl.constexpr, FP8: tl.constexpr, FP8_DOT: tl.constexpr,
                   IEEE: tl.constexpr, FNUZ: tl.constexpr):
    """logits[t, s] = k_scale[s] · Σ_h w[t, h] · relu(softmax_scale · q[t, h] · k[s]) for the ≤ BLOCK_T query
    tokens of one tile (all of one request; q [BLOCK_T·HI_P, D] loaded once) and the blocks of BLOCK_S key
    positions, s ≤ positions[t]."""
    tile = tl.program_id(0)
    n_tok = tl.load(tile_n_ptr + tile)
    first = tl.load(tile_first_ptr + tile)
    tt = tl.arange(0, BLOCK_T)
    tok_t = tl.load(order_ptr + first + tt, mask=tt < n_tok, other=0)
    pos_t = tl.load(pos_ptr + tok_t, mask=tt < n_tok, other=-1)
    s_end = tl.max(pos_t, axis=0) + 1  # keys this tile needs: [0, s_end)
    # Key blocks are dealt round-robin to the grid's programs along axis 1 (block j to program j mod G): the work
    # spreads over the grid whatever the real lengths (a graph-captured grid is sized for the longest context).
    G = tl.num_programs(1)
    if tl.program_id(1) * BLOCK_S < s_end:
        m = tl.arange(0, BLOCK_T * HI_P)
        ti = m // HI_P
        h = m % HI_P
        rmask = (ti < n_tok) & (h < H)
        tok = tl.load(order_ptr + first + ti, mask=rmask, other=0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        q_addr = q_ptr + tok[:, None] * stride_qt + h[:, None] * stride_qh + cols[None, :]
        if FP8:
            q = _as_fp8(tl.load(q_addr, mask=rmask[:, None] & cmask[None, :], other=0), FNUZ)
            if not FP8_DOT:
                q = q.to(tl.float32)
        else:
            q = tl.load(q_addr, mask=rmask[:, None] & cmask[None, :], other=0.0)
            if IEEE:
                q = q.to(tl.float32)
        w = tl.load(w_ptr + tok * stride_wt + h, mask=rmask, other=0.0)
        bt_row = bt_ptr + tl.load(req_ptr + tl.load(order_ptr + first)).to(tl.int64) * stride_bt
        out_rows = out_ptr + tok_t.to(tl.int64)[:, None] * stride_out
        for j in range(tl.program_id(1), tl.cdiv(s_end, BLOCK_S), G):
            s = j * BLOCK_S + tl.arange(0, BLOCK_S)
            smask = s < s_end
            page = tl.load(bt_row + s // page_size, mask=smask, other=0).to(tl.int64)
            off = s % page_size
            km = smask[:, None] & cmask[None, :]
            if FP8:
                kbase = kv_ptr + page * page_bytes
                k = tl.load(kbase[:, None] + off[:, None] * D + cols[None, :], mask=km, other=0)
                k = _as_fp8(k, FNUZ)
                k_scale = tl.load((kbase + page_size * D + off * 4).to(tl.pointer_type(tl.float32)), mask=smask,
                                  other=0.0)
                if FP8_DOT:
                    acc = tl.dot(q, tl.trans(k))
                else:
                    acc = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                k = tl.load(kv_ptr + (page * page_size + off)[:, None] * D + cols[None, :], mask=km, other=0.0)
                if IEEE:
                    acc = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
                else:
                    acc = tl.dot(q, tl.trans(k.to(q.dtype)))
            p = tl.maximum(acc * softmax_scale, 0.0) * w[:, None]
            logits = tl.sum(tl.reshape(p, [BLOCK_T, HI_P, BLOCK_S]), axis=1)
            if FP8:
                logits = logits * k_scale[None, :]
            tl.store(out_rows + s[None, :], logits, mask=(tt[:, None] < n_tok) & (s[None, :] <= pos_t[:, None]))


def _query_tiles(token_req: torch.Tensor, num_reqs: int, block_t: int):
    """Groups of ≤ block_t query tokens of one request, without a host sync: (order, first, count) where tile i
    holds tokens order[first[i] : first[i] + count[i]] (count 0 for the padding tiles of the static upper bound)."""
    n = token_req.shape[0]
    order = torch.argsort(token_req, stable=True).to(torch.int32)
    counts = torch.zeros(num_reqs, dtype=torch.int64, device=token_req.device)
    counts.scatter_add_(0, token_req, torch.ones_like(token_req))  # bincount would sync to size its output
    starts = torch.cumsum(counts, 0) - counts
    tiles = (counts + block_t - 1) // block_t
    ends = torch.cumsum(tiles, 0)
    i = torch.arange(triton.cdiv(n, block_t) + min(n, num_reqs), device=token_req.device)
    r = torch.searchsorted(ends, i, right=True)
    rc = r.clamp(max=num_reqs - 1)
    j = i - (ends[rc] - tiles[rc])
    count = (counts[rc] - j * block_t).clamp(0, block_t)  # padding tiles (r = num_reqs) get j ≥ tiles[rc]: 0
    return order, (starts[rc] + j * block_t).to(torch.int32), count.to(torch.int32)


def indexer_topk(q, head_weights, index_cache, batch: AttnMetadata, softmax_scale, topk, block_s=None,
                 num_stages=None):
    """block_s / num_stages: tuning knobs (None: the defaults below)."""
    T, H, D = q.shape
    out = torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
    n_max = max(batch.kv_lens_cpu, default=0)
    if T == 0 or n_max == 0:
        return out
    fp8 = index_cache.dtype == torch.uint8
    fnuz = q.dtype == torch.float8_e4m3fnuz
    assert fp8 == (q.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz)), \
        "fp8 queries go with the fp8 pool, float queries with float pools"
    q, head_weights = q.contiguous(), head_weights.contiguous()
    P = batch.page_size
    pos = batch.positions.contiguous()
    req = batch.token_req.contiguous()
    bt = batch.block_table.contiguous()
    lengths = torch.minimum(pos + 1, batch.kv_lens.to(pos.device)[req])
    if n_max <= topk:  # every valid key is selected: no logits needed
        topk_into(out, torch.empty(T, 0, dtype=torch.float32, device=q.device), lengths, topk, bt, req, P)
        return out
    qv = q.view(torch.uint8) if fp8 else q
    interpret = envs.triton_interpret()
    hi_p = triton.next_power_of_2(H)
    ieee = not fp8 and (interpret or torch.float32 in (q.dtype, index_cache.dtype))
    decode = batch.is_decode and bt.shape[0] == T  # one query token per request: tile = token, no grouping
    m = 64 if ieee or decode else 128  # query rows (tokens × padded heads) per tile
    block_t = max(1, m // hi_p, triton.cdiv(16, hi_p))
    block_s = block_s or (32 if ieee else 128)  # 128 keys per block: measured fastest on an H100 (decode 4k-32k)
    sms = num_sms(q.device, off_gpu=4)
    rows = max(1, min(T, LOGITS_BYTES // (4 * n_max)))
    logits = torch.empty(rows, n_max, dtype=torch.float32, device=q.device)
    for c0 in range(0, T, rows):
        c1 = min(T, c0 + rows)
        if decode and block_t == 1:
            order = first = torch.arange(c1 - c0, dtype=torch.int32, device=q.device)
            count = torch.ones_like(order)
        else:
            order, first, count = _query_tiles(req[c0:c1], bt.shape[0], block_t)
        # programs along the keys: ~4 waves of the GPU over all tiles, never more than there are key blocks
        grid = (first.shape[0], max(1, min(triton.cdiv(n_max, block_s), triton.cdiv(4 * sms, first.shape[0]))))
        _logits_kernel[grid](
            qv[c0:c1], head_weights[c0:c1], index_cache, bt, pos[c0:c1], req[c0:c1], order, first, count, logits,
            H, qv.stride(0), qv.stride(1), head_weights.stride(0), bt.stride(0), logits.stride(0), P,
            index_cache.shape[1] if fp8 else 0, softmax_scale, D=D, BLOCK_D=triton.next_power_of_2(D), HI_P=hi_p,
            BLOCK_T=block_t, BLOCK_S=block_s, FP8=fp8, FP8_DOT=fp8 and not interpret, IEEE=ieee, FNUZ=fnuz,
            num_warps=8 if block_t * hi_p >= 128 else 4, **({"num_stages": num_stages} if num_stages else {}))
        topk_into(out[c0:c1], logits[: c1 - c0], lengths[c0:c1], topk, bt, req[c0:c1], P)
    return out
