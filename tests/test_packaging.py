"""Packaging: a non-editable install holds every package of the tree, every built-in backend is registered as an entry
point, and `pip install "dsv32[cuda]"`, `"[rocm]"` and `"[ascend]"` resolve from the package index (a dry run with
pip's resolver: nothing is installed). Without network the dry runs skip, saying so."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_every_package_is_listed():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = set()
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "benchmarks", "__pycache__")
                   and not d.endswith(".egg-info")]
        if "__init__.py" in files:
            rel = os.path.relpath(folder, ROOT)
            found.add("dsv32" if rel == "." else "dsv32." + rel.replace(os.sep, "."))
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"


def test_every_backend_is_an_entry_point():
    eps = _pyproject()["project"]["entry-points"]["dsv32.backends"]
    backends = os.path.join(ROOT, "backends")
    for name in os.listdir(backends):
        init = os.path.join(backends, name, "__init__.py")
        if os.path.isfile(init) and re.search(r"^BACKEND = ", open(init, encoding="utf-8").read(), re.M):
            assert name in eps and eps[name].startswith(f"dsv32.backends.{name}:"), name


@pytest.mark.parametrize("extra,needs", [("cuda", ("flashinfer-python", "triton")), ("rocm", ("amd-aiter", "triton")),
                                         ("ascend", ("torch-npu",))])
def test_extras_resolve(extra, needs, tmp_path):
    from importlib.metadata import PackageNotFoundError, version

    report = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--disable-pip-version-check", "-q",
                        "--report", str(report), f"{ROOT}[{extra}]"], capture_output=True, text=True, timeout=900)
    if r.returncode != 0 and re.search(r"(?i)network|connection|resolve host|timed out", r.stderr):
        pytest.skip(f"no package index reachable: {r.stderr.strip()[-200:]}")
    assert r.returncode == 0, r.stderr[-2000:]
    planned = {item["metadata"]["name"].lower().replace("_", "-") for item in json.load(open(report))["install"]}
    for name in needs:
        try:
            installed = bool(version(name))
        except PackageNotFoundError:
            installed = False
        assert name in planned or installed, f"dsv32[{extra}] does not bring {name}: {sorted(planned)}"


def test_demo_model_is_package_data():
    """`dsv32 serve` without --model reads the trained demo from the installed package: its files are package data."""
    data = _pyproject()["tool"]["setuptools"]["package-data"]["dsv32.core"]
    assert data == ["demo_model/*"]
    from dsv32.core.demo import trained_demo_path

    names = set(os.listdir(trained_demo_path()))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
