"""Backends: one package per vendor, each implementing dsv32.core.ops.Ops (see core/registry.py).

Vendor checks live here and in the backend packages only (house rule)."""

from __future__ import annotations


def present_devices() -> dict[str, bool]:
    """Which accelerator kinds this machine has, keyed by test marker: cuda (NVIDIA), rocm (AMD), ascend."""
    import torch

    gpu = torch.cuda.is_available()
    try:
        import torch_npu  # noqa: F401

        npu = bool(torch.npu.is_available())
    except Exception:
        npu = False
    return {"cuda": gpu and torch.version.hip is None, "rocm": gpu and torch.version.hip is not None, "ascend": npu}
