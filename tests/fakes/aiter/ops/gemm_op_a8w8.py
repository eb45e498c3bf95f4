"""aiter.ops.gemm_op_a8w8 (fake)."""

import torch


def gemm_a8w8_blockscale(XQ, WQ, x_scale, w_scale, dtype=torch.bfloat16, isBpreshuffled=False):  # noqa: N803
    """Y [M, N] (dtype, bf16 or fp16) = (XQ · x_scale per 1×128) · (WQ · w_scale per 128×128)ᵀ, fp32 accumulation."""
    assert dtype in (torch.bfloat16, torch.float16) and not isBpreshuffled
    assert XQ.dtype == WQ.dtype and XQ.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
    M, K = XQ.shape
    N = WQ.shape[0]
    assert x_scale.shape == (M, -(-K // 128)) and w_scale.shape == (-(-N // 128), -(-K // 128))
    x = XQ.float() * x_scale.float().repeat_interleave(128, 1)[:, :K]
    w = WQ.float() * w_scale.float().repeat_interleave(128, 0)[:N].repeat_interleave(128, 1)[:, :K]
    return (x @ w.T).to(dtype)
