"""NVIDIA backend: the Triton kernels (backends/triton) on CUDA devices. FlashMLA / FlashInfer / DeepGEMM
integration is not in yet; ops without a kernel fall back to the reference backend (listed by `dsv32 env`)."""

from __future__ import annotations


_DSA = ("auto", "flashmla_sparse", "flashmla_kv", "flashmla_auto", "fa3", "tilelang", "triton")


class CudaBackend:
    name = "cuda"
    device_type = "cuda"
    priority = 30
    # SGLang's values for its kernel flags (what cannot run here is refused with the reason, see CudaOps)
    kernel_choices = {"dsa_prefill_backend": _DSA, "dsa_decode_backend": _DSA,
                      "moe_runner_backend": ("deep_gemm", "triton", "flashinfer_cutlass", "flashinfer_trtllm", "cutlass"),
                      "fp8_gemm_backend": ("deep_gemm", "triton", "flashinfer_trtllm", "cutlass"),
                      "dsa_indexer_backend": ("deep_gemm", "triton")}

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA device visible to torch"
        if torch.version.hip is not None:
            return False, "this torch is a ROCm build (use the rocm backend)"
        try:
            import triton  # noqa: F401
        except ImportError:
            return False, "triton is not installed (pip install 'dsv32[cuda]')"
        return True, ""

    @classmethod
    def default_device(cls) -> str:
        return "cuda"

    @classmethod
    def total_memory_bytes(cls, device) -> int:
        from dsv32.backends.reference import ReferenceBackend

        return ReferenceBackend.total_memory_bytes(device)

    @classmethod
    def create(cls, device):
        from dsv32.backends.cuda.ops import CudaOps

        return CudaOps(device)


BACKEND = CudaBackend
