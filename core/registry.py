"""Backend registry: discovery through the `dsv32.backends` entry-point group, availability, automatic
selection by priority, and per-op fallback to the reference backend.

A backend entry point names a class with:
  name: str; device_type: str (torch's device type of its default device; "any" for reference);
  priority: int (higher wins) — or a classmethod auto_priority() -> int | None, where None means "only when asked
  for by name";
  is_available() -> tuple[bool, str]   (the str says why not, e.g. which device or library is missing);
  create(device) -> Ops                (imports vendor libraries lazily, here or in is_available);
  optionally kernel_choices: {slot: names} (the values of the kernel flags it understands), default_device(),
  total_memory_bytes(device), describe() -> dict (what `dsv32 env` shows).
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
    """All registered backends with their availability: the `dsv32.backends` entry points (ours are declared in
    pyproject.toml like any third party's). A source tree that was never pip-installed has none: then every
    package under dsv32.backends that exports a BACKEND class is probed (core names none of them)."""
    eps = list(entry_points(group=GROUP))
    if eps:
        return {ep.name: _probe(ep.name, ep.load) for ep in eps}
    import pkgutil

    import dsv32.backends as pkg

    found = {}
    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.ispkg:
            target = f"{pkg.__name__}.{mod.name}:BACKEND"
            info = _probe(mod.name, lambda t=target: _load_target(t))
            if info.cls is not None or "has no attribute 'BACKEND'" not in info.reason:
                found[getattr(info.cls, "name", mod.name)] = info
    return found


def known_kernel_choices() -> dict[str, tuple[str, ...]]:
    """Kernel slot → every kernel name the discovered backends declare for it (their classes' `kernel_choices`),
    plus each backend's own name (any backend serves every slot with its own ops)."""
    backends = discover()
    names = tuple(backends)
    out: dict[str, tuple[str, ...]] = {}
    for info in backends.values():
        for slot, choices in getattr(info.cls, "kernel_choices", {}).items():
            out[slot] = tuple(dict.fromkeys(out.get(slot, ()) + tuple(choices)))
    return {slot: tuple(dict.fromkeys(choices + names)) for slot, choices in out.items()}


def select_backend(requested: str | None = None, device: str | None = None) -> BackendInfo:
    """The requested backend (argument, else DSV32_BACKEND), or the available one with the highest priority; with a
    device asked for, the highest whose default device is of that type (a CPU on a GPU host: the reference
    backend), else the highest overall."""
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
    if device is not None:
        kind = str(device).split(":")[0]  # a string: torch.device() knows only the device types loaded so far
        same = [b for b in usable if str(b.cls.default_device()).split(":")[0] == kind]
        usable = same or usable
    return max(usable, key=lambda b: b.priority)


_fallback_logged: set[tuple[str, str]] = set()


def create_ops(info: BackendInfo, device: torch.device | str) -> Ops:
    """Instantiate the backend's ops; ops it does not implement are bound to the reference backend's (logged once),
    which then uses this backend's fp8 format."""
    ops = info.cls.create(device)
    if info.name == "reference":
        ops.kernel_sources = {name: "reference" for name in OP_NAMES}
        return ops
    reference = discover().get("reference")
    if reference is None or reference.cls is None:
        raise BackendError("the reference backend (the fallback of every op a backend leaves out) is not registered")
    ref = reference.cls.create(device)
    ref.fp8_dtype = ops.fp8_format()[0]
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
