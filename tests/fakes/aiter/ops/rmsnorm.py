"""aiter.ops.rmsnorm (fake): CK's RMSNorm, computed in fp32 and rounded once at the end."""

import torch


def _norm(x, weight, epsilon):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + epsilon) * weight.float()).to(x.dtype)


def rms_norm(input, weight, epsilon, use_model_sensitive_rmsnorm=0):  # noqa: A002 - aiter's name
    assert input.dim() == 2 and weight.dtype == input.dtype
    return _norm(input, weight, epsilon)


def rmsnorm2d_fwd_with_add(out, input, residual_in, residual_out, weight, epsilon,  # noqa: A002
                           use_model_sensitive_rmsnorm=0):
    """residual_out ← input + residual_in; out ← rms_norm(residual_out)."""
    residual_out.copy_(input + residual_in)
    out.copy_(_norm(residual_out, weight, epsilon))
