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
    def create(cls, device):
        from dsv32.backends.reference.ops import ReferenceOps

        return ReferenceOps(device)
