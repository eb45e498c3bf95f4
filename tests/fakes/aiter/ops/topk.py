"""aiter.ops.topk (fake): DeepSeek routing and the indexer's per-row top-k (k = 2048, fixed in this release)."""

import torch

K_TOP = 2048


def biased_grouped_topk(gating_output, correction_bias, topk_weights, topk_ids, num_expert_group, topk_group,
                        need_renorm, routed_scaling_factor=1.0):
    """In place: s = sigmoid(gating_output); choice = s + bias; groups ranked by the sum of their top-2 choice scores,
    topk_group kept; top-k experts by choice among kept groups (other groups' scores replaced by 0, as aiter's torch
    reference does); weights = s of those (renormalized if need_renorm) · routed_scaling_factor."""
    assert gating_output.dtype == correction_bias.dtype, "bias dtype must equal the logits dtype"
    T, E = gating_output.shape
    s = gating_output.float().sigmoid()
    choice = s + correction_bias.float()[None, :]
    groups = choice.view(T, num_expert_group, -1).topk(2, dim=-1).values.sum(-1)
    keep = torch.zeros_like(groups).scatter_(1, groups.topk(topk_group, dim=-1).indices, 1.0)
    mask = keep[:, :, None].expand(T, num_expert_group, E // num_expert_group).reshape(T, E).bool()
    ids = choice.masked_fill(~mask, 0.0).topk(topk_ids.shape[1], dim=-1).indices
    w = s.gather(1, ids)
    if need_renorm:
        w = w / w.sum(-1, keepdim=True)
    topk_weights.copy_(w * routed_scaling_factor)
    topk_ids.copy_(ids.to(topk_ids.dtype))


def _rows(logits, starts, ends, indices, values):
    for r in range(indices.shape[0]):
        a, b = int(starts[r]), int(ends[r])
        indices[r].fill_(-1)
        if b - a <= K_TOP:
            indices[r, :b - a] = torch.arange(a, b, dtype=indices.dtype)  # every column, in order
            if values is not None:
                values[r, :b - a] = logits[r, a:b]
            continue
        top = logits[r, a:b].topk(K_TOP)
        indices[r] = (top.indices + a).to(indices.dtype)
        if values is not None:
            values[r] = top.values


def top_k_per_row_prefill(logits, rowStarts, rowEnds, indices, values, numRows, stride0, stride1):  # noqa: N803
    """indices [numRows, 2048] int32 ← the columns (absolute, in [rowStarts[r], rowEnds[r])) of each row's 2048
    largest logits (all of them, in order, when the row is shorter), −1 after."""
    assert indices.dtype == torch.int32 and indices.shape[1] == K_TOP and logits.dtype == torch.float32
    assert (stride0, stride1) == logits.stride()
    _rows(logits, rowStarts, rowEnds, indices[:numRows], values)


def top_k_per_row_decode(logits, next_n, seqLens, indices, numRows, stride0, stride1):  # noqa: N803
    """As top_k_per_row_prefill with row r covering columns [0, seqLens[r // next_n] − next_n + r % next_n + 1)."""
    assert indices.dtype == torch.int32 and indices.shape[1] == K_TOP and logits.dtype == torch.float32
    assert (stride0, stride1) == logits.stride()
    r = torch.arange(numRows)
    ends = seqLens.long()[r // next_n] - next_n + r % next_n + 1
    _rows(logits, torch.zeros_like(ends), ends, indices[:numRows], None)
