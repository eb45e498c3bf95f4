"""The ROCm backend's ops where no AMD GPU is: RocmOps for a given AMD architecture ("rocm-gfx942": e4m3fnuz fp8,
"rocm-gfx950": OCP e4m3fn) on whatever runs Triton here — an NVIDIA GPU, or the CPU interpreter. Its kernels are
the shared Triton ones, so this runs the ROCm backend's code paths and its fp8 format's numerics; it is not a run on
AMD hardware. `backend_info(name)` knows the registered backends and these variants; `with_variants(monkeypatch)`
makes LLM(backend="rocm-gfx942") work in a test."""

from __future__ import annotations

from dsv32.core import envs, registry

ARCHS = ("gfx942", "gfx950")


def _variant(arch: str):
    from dsv32.backends.rocm import RocmBackend
    from dsv32.backends.triton import TritonBackend

    class RocmAs(RocmBackend):
        name = f"rocm-{arch}"
        priority = None

        # wherever the shared Triton kernels run: a GPU, or the CPU interpreter
        is_available = TritonBackend.is_available
        default_device = TritonBackend.default_device

        @classmethod
        def create(cls, device):
            from dsv32.backends.rocm.ops import RocmOps

            return RocmOps(device, arch=arch)

    ok, reason = RocmAs.is_available()
    return registry.BackendInfo(RocmAs.name, RocmAs, ok, reason, None)


def _reference_fnuz():
    import torch

    from dsv32.backends.reference import ReferenceBackend

    class ReferenceFnuz(ReferenceBackend):
        name = "reference-e4m3fnuz"
        priority = None

        @classmethod
        def create(cls, device):
            from dsv32.backends.reference.ops import ReferenceOps

            return ReferenceOps(device, fp8_dtype=torch.float8_e4m3fnuz)

    return registry.BackendInfo(ReferenceFnuz.name, ReferenceFnuz, True, "", None)


def variants() -> dict[str, registry.BackendInfo]:
    """The rocm-<arch> variants, unless a real AMD GPU is here (then the registered "rocm" backend is tested)."""
    real = registry.discover().get("rocm")
    if real is not None and real.available:
        return {}
    return {f"rocm-{arch}": _variant(arch) for arch in ARCHS}


def reference_for(backend: str) -> str:
    """The reference backend in the backend's fp8 format (needs with_variants for the fnuz one)."""
    return "reference-e4m3fnuz" if backend == "rocm-gfx942" else "reference"


def backend_info(name: str) -> registry.BackendInfo:
    found = registry.discover().get(name) or variants().get(name)
    if found is None:
        raise KeyError(name)
    return found


def with_variants(monkeypatch) -> None:
    original = registry.discover
    extra = {**variants(), "reference-e4m3fnuz": _reference_fnuz()}
    monkeypatch.setattr(registry, "discover", lambda: {**original(), **extra})


def skip_without_fnuz_kernels() -> None:
    """Triton's e4m3fnuz type (fp8e4b8) exists on AMD GPUs and in the CPU interpreter, not on NVIDIA GPUs: there the
    fnuz fp8 kernels cannot compile. They are checked on the interpreter against the reference in e4m3fnuz (CPU CI)
    and compiled for gfx942 (`python -m dsv32.backends.triton.aot`)."""
    import pytest
    import torch

    if envs.triton_interpret() or torch.version.hip or not torch.cuda.is_available():
        return
    pytest.skip("e4m3fnuz kernels do not exist on NVIDIA GPUs (Triton's fp8e4b8 is AMD-only); checked on the CPU "
                "interpreter and by the gfx942 AOT compilation instead")
