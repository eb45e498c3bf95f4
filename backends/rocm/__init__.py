"""The AMD backend: the shared Triton kernels on ROCm (HIP through torch's "cuda" device type; warp size 64; fp8 in
the GPU's format: e4m3fnuz on gfx942 / MI300, OCP e4m3fn on gfx950 / MI350; HIP graphs through torch.cuda) plus
AMD's aiter kernels where aiter is importable, each chosen by SGLang's kernel flags (`--dsa-decode-backend aiter`,
`--moe-runner-backend aiter`, ...; `dsv32 env` lists them with the reason each can or cannot run).

NEVER RUN ON AMD HARDWARE: no AMD GPU was available to this project. What is verified: every Triton kernel compiles
for gfx942 and gfx950 at the meta-parameters V3.2 uses (`python -m dsv32.backends.triton.aot`, in CPU CI); the
fnuz numerics match the reference on the CPU interpreter; the ROCm ops run on an NVIDIA GPU where they share code
with CUDA; the aiter adapters pass contract tests against a fake aiter whose function names and parameters are
checked against the real `amd-aiter` wheel's source. The aiter adapters are therefore opt-in, never the default.
"""

from __future__ import annotations

HARDWARE_NOTE = "never run on AMD hardware (AOT compilation for gfx942/gfx950 and contract tests only)"


class RocmBackend:
    name = "rocm"
    device_type = "cuda"  # ROCm builds of torch name HIP devices "cuda"
    priority = 40
    hardware_note = HARDWARE_NOTE
    # SGLang's values for its kernel flags on AMD (plus dsv32's --dsa-indexer-backend and --norm-backend)
    kernel_choices = {"dsa_prefill_backend": ("triton", "aiter", "tilelang"),
                      "dsa_decode_backend": ("triton", "aiter", "tilelang"),
                      "moe_runner_backend": ("triton", "aiter"),
                      "fp8_gemm_backend": ("triton", "aiter"),
                      "dsa_indexer_backend": ("triton", "aiter"),
                      "norm_backend": ("triton", "aiter")}

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        import torch

        if not torch.version.hip:
            return False, "not a ROCm build of torch (install torch for ROCm, then pip install 'dsv32[rocm]')"
        try:
            import triton  # noqa: F401
        except ImportError:
            return False, "triton is not installed (pip install 'dsv32[rocm]')"
        if not torch.cuda.is_available():
            return False, "no AMD GPU visible to torch (HIP_VISIBLE_DEVICES?)"
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
        from dsv32.backends.rocm.ops import RocmOps

        return RocmOps(device)


BACKEND = RocmBackend
