"""The reference backend: pure PyTorch, every op, any device (the oracle other backends are tested against)."""

from __future__ import annotations


class ReferenceBackend:
    name = "reference"
    device_type = "any"
    priority = 0

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        return True, ""

    @classmethod
    def default_device(cls) -> str:
        return "cpu"

    @classmethod
    def total_memory_bytes(cls, device) -> int:
        """Memory of the device the model runs on (system RAM for the CPU)."""
        import os

        import torch

        device = torch.device(device)
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[1]
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    @classmethod
    def create(cls, device):
        from dsv32.backends.reference.ops import ReferenceOps

        return ReferenceOps(device)


BACKEND = ReferenceBackend
