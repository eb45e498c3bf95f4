"""Row-wise kernels: RMSNorm (optionally fused with the residual add) and SiLU-and-mul."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, y_ptr, res_out_ptr, n_cols, eps,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
    if HAS_RES:
        # add in fp32 then round, exactly as the torch add of two tensors of x's dtype
        x = (x.to(tl.float32) + tl.load(res_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + row * n_cols + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n_cols
    h = (xf * tl.rsqrt(var + eps)).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(y_ptr + row * n_cols + cols, (w.to(tl.float32) * h.to(tl.float32)).to(x.dtype), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    shape = x.shape
    x2 = x.contiguous().view(-1, shape[-1])
    rows, n = x2.shape
    y = torch.empty_like(x2)
    res_out = torch.empty_like(x2) if residual is not None else y
    res_in = residual.contiguous().view(-1, n) if residual is not None else x2
    if rows:
        _rms_norm_kernel[(rows,)](x2, res_in, weight.to(x.dtype).contiguous(), y, res_out, n, eps,
                                  HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(n))
    if residual is not None:
        return y.view(shape), res_out.view(shape)
    return y.view(shape)


@triton.jit
def _silu_and_mul_kernel(x_ptr, y_ptr, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * 2 * n_cols + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * 2 * n_cols + n_cols + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # rounded like torch's silu in x's dtype
    tl.store(y_ptr + row * n_cols + cols, (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    x2 = x.contiguous().view(-1, shape[-1])
    n = shape[-1] // 2
    y = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(n))
    if x2.shape[0]:
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](x2, y, n, BLOCK=block)
    return y.view(*shape[:-1], n)
