"""CudaOps: TritonOps on NVIDIA devices (vendor libraries plug in here as they are integrated)."""

from __future__ import annotations

from dsv32.backends.triton.ops import TritonOps


class CudaOps(TritonOps):
    name = "cuda"
