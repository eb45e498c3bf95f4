"""Backend registry: discovery through the `dsv32.backends` entry-point group, availability, automatic
selection by priority, and per-op fallback to the reference backend.

A backend entry point names a class with:
  name: str; device_type: str ("cpu"/"cuda"/"npu"/...; "any" for reference); priority: int (higher wins) —
  or a classmethod auto_priority() -> int | None, where None means "only when asked for by name";
  is_available() -> tuple[bool, str]   (the str says why not, e.g. "no CUDA device");
  create(device) -> Ops                (imports vendor libraries lazily, here or in is_available).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from importlib.metadata import entry_points

import torch

from dsv32.core import envs
from dsv32.core.ops import OP_NAMES, Ops

log = logging.getLogger("dsv32.registry")

GROUP = "dsv32.backends"
# The same as pyproject.toml's entry points, for a source tree that was never pip-installed.
BUILTIN_BACKENDS = {"reference": "dsv32.backends.reference:ReferenceBackend",
                    "triton": "dsv32.backends.triton:TritonBackend", "cuda": "dsv32.backends.cuda:CudaBackend"}


class BackendError(RuntimeError):
    """An impossible backend choice; the message names what would work."""


@dataclass
class BackendInfo:
    name: str
    cls: type | None
    available: bool
    reason: str
    priority: int | None = 0  # None: never picked automatically, only by name


def _probe(name: str, load) -> BackendInfo:
    """Load a backend class and ask whether it can run here (never raises: a broken plugin is reported)."""
    try:
        cls = load()
        ok, reason = cls.is_available()
        prio = cls.auto_priority() if hasattr(cls, "auto_priority") else getattr(cls, "priority", 0)
        return BackendInfo(name, cls, bool(ok), reason or "", prio)
    except Exception as e:  # a third-party plugin must not take the engine down
        return BackendInfo(name, None, False, f"failed to load: {type(e).__name__}: {e}")


def _load_target(target: str):
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def discover() -> dict[str, BackendInfo]:
    """All registered backends with their availability. A source tree that was never pip-installed has no entry
    points: then our own backends (BUILTIN_BACKENDS) are probed."""
    eps = list(entry_points(group=GROUP))
    if eps:
        return {ep.name: _probe(ep.name, ep.load) for ep in eps}
    return {name: _probe(name, lambda t=target: _load_target(t)) for name, target in BUILTIN_BACKENDS.items()}


def select_backend(requested: str | None = None) -> BackendInfo:
    """The requested backend (argument, else DSV32_BACKEND), or the available one with the highest priority."""
    backends = discover()
    requested = requested or envs.backend_override()
    if requested and requested != "auto":
        info = backends.get(requested)
        if info is None:
            raise BackendError(f"unknown backend '{requested}'; registered: {sorted(backends)}")
        if not info.available:
            usable = sorted(n for n, b in backends.items() if b.available)
            raise BackendError(f"backend '{requested}' is not available here: {info.reason}. Usable: {usable}")
        return info
    usable = [b for b in backends.values() if b.available and b.priority is not None]
    return max(usable, key=lambda b: b.priority)


_fallback_logged: set[tuple[str, str]] = set()


def create_ops(info: BackendInfo, device: torch.device | str) -> Ops:
    """Instantiate the backend's ops; ops it does not implement are bound to the reference (logged once)."""
    ops = info.cls.create(device)
    if info.name == "reference":
        ops.kernel_sources = {name: "reference" for name in OP_NAMES}
        return ops
    from dsv32.backends.reference.ops import ReferenceOps

    ref = ReferenceOps(device)
    sources = {}
    for name in OP_NAMES:
        if getattr(type(ops), name) is getattr(Ops, name):
            setattr(ops, name, getattr(ref, name))
            sources[name] = "reference (fallback)"
            if (info.name, name) not in _fallback_logged:
                _fallback_logged.add((info.name, name))
                log.info("backend %s: op %s falls back to reference", info.name, name)
        else:
            sources[name] = info.name
    ops.kernel_sources = sources
    return ops
