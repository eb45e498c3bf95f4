"""The aiter functions dsv32's ROCm adapters call exist in the real `amd-aiter` package with the parameters the
adapters pass, and the contract tests' fake has the same signatures — read from the newest amd-aiter wheel on PyPI
(the one `pip install "dsv32[rocm]"` installs; a pure-Python JIT wheel) by parsing its source, never importing it
(it needs ROCm). So an upstream rename or signature change fails CI instead of a user's server.

The wheel is downloaded into $DSV32_CACHE_DIR/wheels (`pip download --no-deps amd-aiter`: the newest, so a new release
is checked as soon as users would get it); without network and without a cached wheel the test skips, saying so."""

from __future__ import annotations

import ast
import os
import re
import zipfile

import pytest

from dsv32.backends.rocm.aiter_kernels import AITER_CALLS, AITER_ENUMS
from _pypi import newest_wheel

FAKES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fakes")


@pytest.fixture(scope="module")
def wheel():
    return newest_wheel("amd-aiter")


def _module_path(module: str) -> list[str]:
    base = module.replace(".", "/")
    return [base + ".py", base + "/__init__.py"]


def _functions(source: str) -> dict[str, ast.arguments]:
    return {node.name: node.args for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)}


def _params(args: ast.arguments) -> list[tuple[str, bool]]:
    """(name, has a default) of every positional-or-keyword parameter, in order."""
    pos = args.posonlyargs + args.args
    first_default = len(pos) - len(args.defaults)
    return [(a.arg, i >= first_default) for i, a in enumerate(pos)] + \
           [(a.arg, d is not None) for a, d in zip(args.kwonlyargs, args.kw_defaults)]


def _real(wheel: zipfile.ZipFile, name: str):
    """(module, parameters) of the first of AITER_CALLS' modules that defines `name` in the wheel (as the adapters
    look it up), else (None, None)."""
    names = set(wheel.namelist())
    for module in AITER_CALLS[name][0]:
        for path in _module_path(module):
            if path in names:
                funcs = _functions(wheel.read(path).decode())
                if name in funcs:
                    return module, _params(funcs[name])
    return None, None


@pytest.mark.parametrize("name", sorted(AITER_CALLS))
def test_adapter_calls_match_the_real_aiter(wheel, name):
    module, params = _real(wheel, name)
    assert module, f"{name} is in none of {AITER_CALLS[name][0]} in {wheel.filename}"
    positional, keywords = AITER_CALLS[name][1:]
    names = [p for p, _ in params]
    assert names[:len(positional)] == list(positional), f"{module}.{name}{tuple(names)}: the adapter passes {positional}"
    missing = [k for k in keywords if k not in names]
    assert not missing, f"{module}.{name}{tuple(names)} has no parameter {missing}"
    required = [p for p, has_default in params[len(positional):] if not has_default and p not in keywords]
    assert not required, f"{module}.{name} requires {required}, which the adapter does not pass"


@pytest.mark.parametrize("name", sorted(AITER_CALLS))
def test_fake_has_the_real_signature(wheel, name):
    module, params = _real(wheel, name)
    assert module
    fake = None
    for mod in AITER_CALLS[name][0]:
        for path in _module_path(mod):
            full = os.path.join(FAKES, path)
            if os.path.isfile(full):
                funcs = _functions(open(full, encoding="utf-8").read())
                if name in funcs:
                    fake = _params(funcs[name])
                    break
        if fake:
            break
    assert fake == params, f"fake {name}{fake} differs from {module}.{name}{params}"


def test_enums_the_adapters_use(wheel):
    """ActivationType / QuantType come from aiter's C++ (aiter_enum.h, bound by pybind)."""
    header = next((n for n in wheel.namelist() if n.endswith("csrc/include/aiter_enum.h")), None)
    assert header, "aiter_enum.h is not in the wheel"
    text = wheel.read(header).decode()
    for enum, members in AITER_ENUMS.items():
        body = re.search(r"enum class " + enum + r"\s*:\s*\w+\s*\{([^}]*)\}", text)
        assert body, f"enum {enum} not found in {header}"
        declared = set(re.findall(r"(\w+)\s*(?:=|,|$)", body.group(1), re.M))
        assert set(members) <= declared, f"{enum} lacks {set(members) - declared}"
