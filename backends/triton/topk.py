"""Row-wise top-k selection by radix select (replaces torch.topk on the indexer's logits).

One program per row. fp32 scores map to order-preserving uint32 keys; four passes of 8-bit digit histograms over
the row's valid prefix find the k-th largest key and how many keys equal to it to take; a compaction pass then
writes, in index order, every position whose key is above that threshold and the first ties equal to it. Rows with
at most k valid entries take them all. Optionally maps each chosen position to its physical cache slot through
a block table (the indexer's output), −1 padding kept.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _order_key(x):
    """fp32 → uint32 with the same order (negative values flipped, positive ones above them)."""
    b = x.to(tl.uint32, bitcast=True)
    return tl.where((b >> 31) != 0, b ^ 0xFFFFFFFF, b | 0x80000000)


@triton.jit
def _store_positions(out_row_ptr, dst, pos, mask, bt_row_ptr, page_size, MAP: tl.constexpr):
    if MAP:
        page = tl.load(bt_row_ptr + pos // page_size, mask=mask, other=-1)
        pos = tl.where(page >= 0, page * page_size + pos % page_size, -1)
    tl.store(out_row_ptr + dst, pos.to(tl.int32), mask=mask)


@triton.jit
def _topk_kernel(scores_ptr, len_ptr, out_ptr, bt_ptr, req_ptr, stride_s, stride_o, stride_bt, K, page_size,
                 MAP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    n = tl.load(len_ptr + row).to(tl.int32)
    row_ptr = scores_ptr + row * stride_s
    out_row = out_ptr + row * stride_o
    bt_row = bt_ptr
    if MAP:
        bt_row = bt_ptr + tl.load(req_ptr + row).to(tl.int64) * stride_bt
    offs0 = tl.arange(0, BLOCK)
    if n <= K:  # every valid position is selected; pad with −1
        for i in range(0, K, BLOCK):
            offs = i + offs0
            _store_positions(out_row, offs, offs, offs < n, bt_row, page_size, MAP)
            tl.store(out_row + offs, tl.full([BLOCK], -1, tl.int32), mask=(offs >= n) & (offs < K))
    else:
        bins = tl.arange(0, 256)
        prefix = tl.zeros([], tl.uint32)  # the threshold's digits found so far
        remaining = K  # how many keys matching `prefix` are still to take
        for p in tl.static_range(4):
            shift = 24 - 8 * p
            hist = tl.zeros([256], tl.int32)
            for i in range(0, n, BLOCK):
                offs = i + offs0
                valid = offs < n
                key = _order_key(tl.load(row_ptr + offs, mask=valid, other=0.0))
                if p > 0:
                    valid = valid & ((key >> (shift + 8)) == (prefix >> (shift + 8)))
                hist += tl.histogram(((key >> shift) & 0xFF).to(tl.int32), 256, mask=valid)
            cnt_ge = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist  # keys with digit ≥ bin
            d = tl.max(tl.where(cnt_ge >= remaining, bins, -1), axis=0)
            remaining -= tl.sum(tl.where(bins > d, hist, 0), axis=0)
            prefix = prefix | (d.to(tl.uint32) << shift)
        n_gt = K - remaining
        gt_base = 0
        eq_base = 0
        for i in range(0, n, BLOCK):
            offs = i + offs0
            valid = offs < n
            key = _order_key(tl.load(row_ptr + offs, mask=valid, other=0.0))
            gt = (valid & (key > prefix)).to(tl.int32)
            eq = (valid & (key == prefix)).to(tl.int32)
            gt_rank = gt_base + tl.cumsum(gt, axis=0) - gt
            eq_rank = eq_base + tl.cumsum(eq, axis=0) - eq
            _store_positions(out_row, gt_rank, offs, gt != 0, bt_row, page_size, MAP)
            _store_positions(out_row, n_gt + eq_rank, offs, (eq != 0) & (eq_rank < remaining), bt_row, page_size, MAP)
            gt_base += tl.sum(gt, axis=0)
            eq_base += tl.sum(eq, axis=0)


def _block(n: int) -> int:
    return max(16, min(4096, triton.next_power_of_2(max(1, n))))


def topk_into(out: torch.Tensor, scores: torch.Tensor, lengths: torch.Tensor, k: int,
              block_table: torch.Tensor | None = None, row_req: torch.Tensor | None = None, page_size: int = 1) -> None:
    """Fill out [R, k] int32 (any row stride) with the top-k of each row of scores [R, N], lengths[r] ≤ N (see
    topk_indices).
    With block_table [B, P] and row_req [R]: positions become physical slots block_table[row_req[r], pos // page_size]
    · page_size + pos % page_size (a missing page gives −1)."""
    R = scores.shape[0]
    if R == 0:
        return
    assert scores.dtype == torch.float32 and scores.stride(-1) == 1 and out.stride(-1) == 1
    mapped = block_table is not None
    bt = block_table if mapped else out
    req = row_req if mapped else lengths
    _topk_kernel[(R,)](scores, lengths, out, bt, req, scores.stride(0), out.stride(0), bt.stride(0) if mapped else 0,
                       k, page_size, MAP=mapped, BLOCK=_block(scores.shape[1]), num_warps=8)


def topk_indices(scores: torch.Tensor, lengths: torch.Tensor, k: int) -> torch.Tensor:
    """int32 [R, k]: column positions of the k largest of the first lengths[r] entries of each row of scores [R, N]
    fp32 (any order; ties taken in index order), padded with −1 where lengths[r] < k (then every valid entry)."""
    out = torch.empty(scores.shape[0], k, dtype=torch.int32, device=scores.device)
    topk_into(out, scores.contiguous(), lengths.contiguous(), k)
    return out
