"""The torch_npu operators dsv32's Ascend adapters call exist in the real `torch-npu` package with the parameters the
adapters pass, and the contract tests' fake has the same signatures — read from the operator schemas
(`torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml`) of the newest torch-npu wheel on PyPI for this
platform (what `pip install "dsv32[ascend]"` installs), never importing it (it needs CANN). So an upstream rename or
signature change fails CI instead of a user's server.

The wheel is downloaded into $DSV32_CACHE_DIR/wheels (`pip download --no-deps torch-npu`); without network and
without a cached wheel the test skips, saying so."""

from __future__ import annotations

import inspect
import os
import re
import sys

import pytest

from dsv32.backends.ascend.npu_kernels import NPU_CALLS
from _pypi import newest_wheel

FAKES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fakes")
SCHEMAS = "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml"


@pytest.fixture(scope="module")
def schemas():
    with newest_wheel("torch-npu", timeout=900) as wheel:
        text = wheel.read(SCHEMAS).decode()
    out = {}
    for m in re.finditer(r"func:\s*(\w+)\((.*)\)\s*->", text):
        out.setdefault(m.group(1), m.group(2))
    return out


def _split(args: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in args:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def parse(args: str) -> list[tuple[str, bool, bool]]:
    """(name, keyword-only, has a default) of each parameter of a schema's argument list."""
    out, kw_only = [], False
    for part in _split(args):
        if part == "*":
            kw_only = True
            continue
        decl, _, default = part.partition("=")
        out.append((decl.split()[-1], kw_only, bool(default)))
    return out


@pytest.mark.parametrize("name", sorted(NPU_CALLS))
def test_adapter_calls_match_the_real_torch_npu(schemas, name):
    assert name in schemas, f"torch_npu has no operator {name}"
    params = parse(schemas[name])
    positional, keywords = NPU_CALLS[name]
    pos_params = [p for p, kw, _ in params if not kw]
    assert pos_params[:len(positional)] == list(positional), f"{name}({schemas[name]}): the adapter passes {positional}"
    names = [p for p, _, _ in params]
    missing = [k for k in keywords if k not in names or names.index(k) < len(positional)]
    assert not missing, f"{name}({schemas[name]}) takes no keyword {missing}"
    required = [p for p, _, has_default in params[len(positional):] if not has_default and p not in keywords]
    assert not required, f"{name} requires {required}, which the adapter does not pass"


@pytest.mark.parametrize("name", sorted(NPU_CALLS))
def test_fake_has_the_real_signature(schemas, name, monkeypatch):
    monkeypatch.syspath_prepend(FAKES)
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    import torch_npu

    try:
        sig = inspect.signature(getattr(torch_npu, name))
        fake = [(p.name, p.kind == p.KEYWORD_ONLY, p.default is not p.empty) for p in sig.parameters.values()]
    finally:
        sys.modules.pop("torch_npu", None)
    assert fake == parse(schemas[name]), f"fake {name}{sig} differs from the schema {name}({schemas[name]})"
