"""Backend registry (entry points, selection, overrides, per-op fallback) and the `dsv32` command line."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch

from dsv32.core import registry
from dsv32.core.ops import OP_NAMES, Ops


class _PartialOps(Ops):
    name = "partial"

    def rms_norm(self, x, weight, eps, residual=None):
        from dsv32.backends.reference.ops import ReferenceOps

        return ReferenceOps.rms_norm(self, x, weight, eps, residual)


class _PartialBackend:
    name, device_type, priority = "partial", "cpu", 50

    @classmethod
    def is_available(cls):
        return True, ""

    @classmethod
    def default_device(cls):
        return "cpu"

    @classmethod
    def create(cls, device):
        return _PartialOps(device)


class _MissingBackend(_PartialBackend):
    name, priority = "missing", 100

    @classmethod
    def is_available(cls):
        return False, "vendor library 'nolib' not installed (pip install dsv32[cuda])"


class _EP:
    def __init__(self, name, cls=None, error=None):
        self.name, self._cls, self._error = name, cls, error

    def load(self):
        if self._error:
            raise self._error
        return self._cls


@pytest.fixture
def fake_plugins(monkeypatch):
    from dsv32.backends.reference import ReferenceBackend

    eps = [_EP("reference", ReferenceBackend), _EP("partial", _PartialBackend), _EP("missing", _MissingBackend),
           _EP("broken", error=ImportError("boom"))]
    monkeypatch.setattr(registry, "entry_points", lambda group: eps if group == registry.GROUP else [])
    monkeypatch.delenv("DSV32_BACKEND", raising=False)


def test_reference_registered_through_entry_point():
    names = {ep.name for ep in registry.entry_points(group="dsv32.backends")}
    assert "reference" in names  # pyproject's [project.entry-points."dsv32.backends"]
    assert registry.select_backend().name == "reference"


def test_interpreter_backend_is_never_auto_selected(monkeypatch):
    """Under TRITON_INTERPRET=1 (CPU CI) the triton backend is available but only when named."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    info = registry.discover().get("triton")
    if info is None or not info.available:
        pytest.skip("triton not installed")
    assert info.priority is None
    assert registry.select_backend().name == "reference"
    assert registry.select_backend("triton").name == "triton"


def test_auto_selection_by_priority_and_overrides(fake_plugins, monkeypatch):
    found = registry.discover()
    assert not found["missing"].available and "nolib" in found["missing"].reason
    assert not found["broken"].available and "boom" in found["broken"].reason  # a broken plugin never crashes
    assert registry.select_backend().name == "partial"  # highest available priority
    assert registry.select_backend("reference").name == "reference"
    monkeypatch.setenv("DSV32_BACKEND", "reference")
    assert registry.select_backend().name == "reference"
    with pytest.raises(registry.BackendError, match="not available here: vendor library 'nolib'.*Usable"):
        registry.select_backend("missing")
    with pytest.raises(registry.BackendError, match="unknown backend 'nope'"):
        registry.select_backend("nope")


def test_per_op_fallback_logged_once(fake_plugins, caplog):
    registry._fallback_logged.clear()
    info = registry.discover()["partial"]
    with caplog.at_level(logging.INFO, logger="dsv32.registry"):
        ops = registry.create_ops(info, "cpu")
        registry.create_ops(info, "cpu")
    assert ops.kernel_sources["rms_norm"] == "partial"
    assert ops.kernel_sources["indexer_topk"] == "reference (fallback)"
    assert set(ops.kernel_sources) == set(OP_NAMES)
    fallback_lines = [r for r in caplog.records if "indexer_topk" in r.getMessage()]
    assert len(fallback_lines) == 1
    x = torch.randn(3, 8)  # fallback ops really run
    assert ops.silu_and_mul(x).shape == (3, 4)


def test_llm_runs_on_partial_backend(fake_plugins, tiny_dir):
    from dsv32 import LLM, SamplingParams

    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    a = LLM(model=tiny_dir, dtype="float32", backend="partial")
    b = LLM(model=tiny_dir, dtype="float32", backend="reference")
    assert a.backend.name == "partial"
    assert a.generate(prompt_token_ids=[[3, 4, 5]], sampling_params=sp)[0].token_ids == \
        b.generate(prompt_token_ids=[[3, 4, 5]], sampling_params=sp)[0].token_ids


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dsv32.server.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_env():
    r = _cli("env")
    assert r.returncode == 0, r.stderr
    assert "selected: reference on cpu" in r.stdout and "indexer_topk" in r.stdout
    r = _cli("env", "--backend", "nope")
    assert r.returncode == 2 and "unknown backend 'nope'" in r.stderr


def test_cli_generate_and_demo(tiny_dir, tmp_path):
    from dsv32 import LLM, SamplingParams

    r = _cli("generate", "--model", tiny_dir, "--prompt-token-ids", "[5, 6, 7, 8]", "--max-tokens", "5",
             "--ignore-eos", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    want = LLM(model=tiny_dir, dtype="float32").generate(
        prompt_token_ids=[[5, 6, 7, 8]], sampling_params=SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert got["token_ids"] == want[0].token_ids and got["finish_reason"] == "length"
    r = _cli("generate", "--model", str(tmp_path / "absent"), "--prompt-token-ids", "[1]")
    assert r.returncode == 2 and "config.json" in r.stderr and "Traceback" not in r.stderr
    r = _cli("demo", "--path", str(tmp_path / "demo"), "--max-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("-> [") == 2 and (tmp_path / "demo" / "model.safetensors").is_file()


def test_present_devices_reports_every_marker():
    """conftest skips tests marked cuda/rocm/ascend from this map; it must cover every marker."""
    from dsv32.backends import present_devices

    present = present_devices()
    assert set(present) == {"cuda", "rocm", "ascend"}
    assert present["cuda"] == (torch.cuda.is_available() and torch.version.hip is None)
