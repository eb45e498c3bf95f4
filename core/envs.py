"""Every environment variable dsv32 reads, read here and nowhere else."""

from __future__ import annotations

import os


def backend_override() -> str | None:
    """DSV32_BACKEND: force a backend by name (same as --backend / LLM(backend=...))."""
    return os.environ.get("DSV32_BACKEND") or None


def cache_dir() -> str:
    """DSV32_CACHE_DIR: where generated artifacts (demo model, kernel caches) live."""
    return os.environ.get("DSV32_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "dsv32")


def triton_interpret() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on the CPU interpreter (slow; used to test kernels without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")
