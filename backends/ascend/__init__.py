"""The Huawei Ascend backend (Atlas A2/A3 NPUs): torch_npu's fused operators for DeepSeek-V3.2 — the lightning
indexer, sparse flash attention over split latent caches, the fused MLA key write, grouped MoE routing, grouped
matmuls (bf16, or W8A8 int8 with dequant-SwiGLU-quant), int8 linears and RMSNorm — with HCCL between ranks. Ascend
A2/A3 have no fp8: FP8 checkpoints are dequantized to bf16 at load (about twice the weight memory of FP8; a
690 GB checkpoint needs ~1.3 TB of NPU memory, i.e. two A3 nodes), fp8 KV caches and the fp8 indexer are refused;
what Ascend users deploy is msModelSlim's W8A8-dynamic int8 (`--quantization modelslim`), which keeps int8 here.

NEVER RUN ON ASCEND HARDWARE: no NPU was available to this project. The adapters are written against the operator
schemas and documentation in the torch_npu wheel and pass contract tests against a fake torch_npu (tests/fakes);
tests/backends/test_npu_api.py checks every call against the schemas of the newest torch-npu wheel. Where the
documentation is silent (the RoPE pairing of npu_kv_rmsnorm_rope_cache, the output of rows without any selected
key) the adapters say what they assume. Device graphs are off until verified on hardware.
"""

from __future__ import annotations

HARDWARE_NOTE = "never run on Ascend hardware (contract tests against torch_npu's operator schemas only)"
SLOTS = ("dsa_prefill_backend", "dsa_decode_backend", "dsa_indexer_backend", "moe_runner_backend", "norm_backend")


class AscendBackend:
    name = "ascend"
    device_type = "npu"
    priority = 50
    hardware_note = HARDWARE_NOTE
    # "ascend": torch_npu's fused operators; "reference": the pure-torch ops on the NPU (slow; to bisect a problem)
    kernel_choices = {slot: ("ascend", "reference") for slot in SLOTS}

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        try:
            import torch_npu  # noqa: F401
        except ImportError:
            return False, "torch_npu is not installed (pip install 'dsv32[ascend]', matching your CANN and torch)"
        except Exception as e:  # CANN missing or mismatched: report, never crash
            return False, f"torch_npu failed to import: {type(e).__name__}: {e}"
        import torch

        if not torch.npu.is_available():
            return False, "no Ascend NPU visible to torch_npu (ASCEND_RT_VISIBLE_DEVICES?)"
        return True, ""

    @classmethod
    def default_device(cls) -> str:
        return "npu"

    @classmethod
    def total_memory_bytes(cls, device) -> int:
        import torch

        return torch.npu.mem_get_info(torch.device(device))[1]

    @classmethod
    def create(cls, device):
        from dsv32.backends.ascend.ops import AscendOps

        return AscendOps(device)


BACKEND = AscendBackend
