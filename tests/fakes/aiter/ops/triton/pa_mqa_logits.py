"""aiter.ops.triton.pa_mqa_logits (fake)."""

import torch


def deepgemm_fp8_paged_mqa_logits(q_fp8, kv_cache_fp8, weights, out_logits, context_lens, kv_indices, max_model_len,
                                  ChunkK=64, SplitKV=5):  # noqa: N803 - aiter's names
    """q_fp8 [B, next_n, H, D]; kv_cache_fp8 [blocks, 1, 1, D+4] uint8/fp8 = [D key bytes | fp32 scale] per block
    (one key per block); kv_indices [B, max_blk] block ids; weights [B·next_n, H]. For each row (b, n) writes
    out_logits[b·next_n + n, c] for c in whole chunks of ChunkK up to context_lens[b]: the score
    Σ_h w·relu(scale · q·k) where c ≤ context_lens[b] − n − 1, 0 at c = context_lens[b] − n (the kernel's mask is
    c ≤ len − n and that key reads as 0), −inf beyond; columns past the last chunk are left as they were."""
    B, next_n, H, D = q_fp8.shape
    fp8 = q_fp8.dtype
    assert fp8 in (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
    raw = kv_cache_fp8.view(torch.uint8).reshape(kv_cache_fp8.shape[0], D + 4)
    keys, scales = raw[:, :D].contiguous().view(fp8).float(), raw[:, D:].contiguous().view(torch.float32)[:, 0]
    for b in range(B):
        n_ctx = int(context_lens[b])
        width = -(-n_ctx // ChunkK) * ChunkK
        blocks = kv_indices[b, :n_ctx].long()
        for n in range(next_n):
            row = out_logits[b * next_n + n]
            vals = torch.zeros(width)
            if n_ctx:
                s = (q_fp8[b, n].float() @ keys[blocks].T) * scales[blocks][None, :]
                vals[:n_ctx] = (torch.relu(s) * weights[b * next_n + n].float()[:, None]).sum(0)
            c = torch.arange(width)
            vals = torch.where(c <= n_ctx - n, vals, torch.full_like(vals, float("-inf")))
            row[:width] = vals
