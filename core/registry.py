"""Backend registry: discovery through the `dsv32.backends` entry-point group, availability, automatic
selection by priority, and per-op fallback to the reference backend.

A backend entry point names a class with:
  name: str; device_type: str ("cpu"/"cuda"/"npu"/...; "any" for reference); priority: int (higher wins) —
  or a classmethod auto_priority() -> int | None, where None means "only when asked for by name";
  is_available() -> tuple[bool, str]   (the str says why not, e.g. "no CUDA device");
  create(device) -> Ops                (imports vendor libraries lazily, here or in is_available).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.metadata import entry_points

import torch

from dsv32.core import envs
from dsv32.core.ops import OP_NAMES, Ops

log = logging.getLogger("dsv32.registry")

GROUP = "dsv32.backends"


class BackendError(RuntimeError):
    """An impossible backend choice; the message names what would work."""


@dataclass
class BackendInfo:
    name: str
    cls: type | None
    available: bool
    reason: str
    priority: int | None = 0  # None: never picked automatically, only by name


def discover() -> dict[str, BackendInfo]:
    """All registered backends with their availability (never raises: a broken plugin is reported)."""
    found: dict[str, BackendInfo] = {}
    eps = list(entry_points(group=GROUP))
    names = {ep.name for ep in eps}
    for ep in eps:
        try:
            cls = ep.load()
            ok, reason = cls.is_available()
            prio = cls.auto_priority() if hasattr(cls, "auto_priority") else getattr(cls, "priority", 0)
            found[ep.name] = BackendInfo(ep.name, cls, bool(ok), reason or "", prio)
        except Exception as e:  # a third-party plugin must not take the engine down
            found[ep.name] = BackendInfo(ep.name, None, False, f"failed to load: {type(e).__name__}: {e}")
    if "reference" not in names:  # running from a source tree without installed entry points
        from dsv32.backends.reference import ReferenceBackend

        found["reference"] = BackendInfo("reference", ReferenceBackend, True, "", ReferenceBackend.priority)
    return found


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
