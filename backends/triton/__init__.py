"""Triton kernels shared by the CUDA and ROCm backends (Triton runs on both).

Registered on its own as backend "triton" so the kernels can be selected and tested anywhere Triton runs: on a
GPU, or on the CPU under TRITON_INTERPRET=1 (slow; tiny shapes only). The vendor backends build on TritonOps.
"""

from __future__ import annotations


class TritonBackend:
    name = "triton"
    device_type = "cuda"
    priority = 10
    kernel_choices = {slot: ("triton",) for slot in ("dsa_prefill_backend", "dsa_decode_backend", "moe_runner_backend",
                                                     "fp8_gemm_backend", "dsa_indexer_backend")}

    @classmethod
    def auto_priority(cls) -> int | None:
        """On the CPU interpreter the kernels are for testing only: never chosen automatically there."""
        import torch

        return cls.priority if torch.cuda.is_available() else None

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        try:
            import triton  # noqa: F401
        except ImportError:
            return False, "triton is not installed (pip install 'dsv32[cuda]' or 'dsv32[rocm]')"
        import torch

        from dsv32.core import envs

        if torch.cuda.is_available() or envs.triton_interpret():
            return True, ""
        return False, "no GPU (set TRITON_INTERPRET=1 to run the Triton kernels on the CPU interpreter, slowly)"

    @classmethod
    def default_device(cls) -> str:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @classmethod
    def total_memory_bytes(cls, device) -> int:
        from dsv32.backends.reference import ReferenceBackend

        return ReferenceBackend.total_memory_bytes(device)

    @classmethod
    def create(cls, device):
        from dsv32.backends.triton.ops import TritonOps

        return TritonOps(device)


BACKEND = TritonBackend
