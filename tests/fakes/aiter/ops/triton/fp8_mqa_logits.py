"""aiter.ops.triton.fp8_mqa_logits (fake)."""

import torch


def fp8_mqa_logits(Q, KV, kv_scales, weights, cu_starts, cu_ends):  # noqa: N803 - aiter's names
    """logits [S, S_kv] fp32: Σ_h weights[i, h] · relu(kv_scales[j] · Q[i, h]·KV[j]) for j in [cu_starts[i],
    cu_ends[i]), −inf elsewhere. Heads and head size must be powers of two."""
    S, H, D = Q.shape
    assert H & (H - 1) == 0 and D & (D - 1) == 0
    assert Q.dtype == KV.dtype and Q.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
    assert kv_scales.dtype == weights.dtype == torch.float32 and cu_starts.dtype == cu_ends.dtype == torch.int32
    s = torch.einsum("shd,kd->shk", Q.float(), KV.float()) * kv_scales.float()[None, None, :]
    logits = (torch.relu(s) * weights.float()[:, :, None]).sum(1)
    j = torch.arange(KV.shape[0])
    inside = (j[None, :] >= cu_starts.long()[:, None].clamp(min=0)) & (j[None, :] < cu_ends.long()[:, None])
    return torch.where(inside, logits, torch.full_like(logits, float("-inf")))
