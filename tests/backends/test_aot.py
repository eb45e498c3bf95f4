"""The ahead-of-time compilation tool (backends/triton/aot.py) finds each target's launches from its platform profile:
NVIDIA sm_90+ and AMD gfx950 the e4m3fn kernels, gfx942 the e4m3fnuz variants, sm_80 no fp8 kernel at all (FP8
checkpoints dequantized, bf16 cache, exact indexer). The full compile of every launch for the six targets is the CI
cell `aot-compile` (ci/run_cell.sh); here a small kernel is compiled for each target to keep the path working."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_PROBE = r"""
import json, sys
from dsv32.backends.triton import aot
out = {}
for profile in ("nvidia", "nvidia-sm120", "nvidia-no-fp8", "rocm-gfx942", "rocm-gfx950"):
    launches = {}
    aot._scenarios(launches, profile)
    out[profile] = [{"name": l.name, "fp8": bool(l.constexprs.get("FP8")), "fnuz": bool(l.constexprs.get("FNUZ")),
                     "sig": sorted(set(l.signature.values())), "block_k": l.constexprs.get("BLOCK_K"),
                     "block_n": l.constexprs.get("BLOCK_N"), "warps": l.options.get("num_warps")}
                    for l in launches.values()]
small = {k: l for k, l in launches.items() if l.name == "_quantize_kernel"}
rows = aot.compile_all(small, list(aot.TARGETS))
out["compiled"] = [(r["target"], r["ok"], r.get("error")) for r in rows]
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def probe():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the recorder needs real JIT functions
    r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def _fp8_types(launches):
    return {t for launch in launches for t in launch["sig"] if "fp8" in t}


def test_profiles(probe):
    nvidia, sm80, gfx942, gfx950 = (probe[p] for p in ("nvidia", "nvidia-no-fp8", "rocm-gfx942", "rocm-gfx950"))
    assert {"_fp8_gemm_kernel", "_sparse_mla_kernel", "_logits_kernel"} <= {x["name"] for x in nvidia}
    assert not any(x["fnuz"] for x in nvidia + gfx950), "e4m3fn targets compile no fnuz kernel"
    assert any(x["fnuz"] and x["fp8"] for x in gfx942), "gfx942 compiles the e4m3fnuz variants"
    assert _fp8_types(gfx942) == {"*fp8e4b8"} and _fp8_types(nvidia) == _fp8_types(gfx950) == {"*fp8e4nv"}
    assert not any(x["fp8"] for x in sm80) and not _fp8_types(sm80), "sm_80 has no fp8: no fp8 kernel is launched"
    assert "_fp8_gemm_kernel" not in {x["name"] for x in sm80}


def test_tiles_follow_shared_memory(probe):
    """sm_90 keeps the H100-tuned tiles; sm_120 (99 KB shared) and AMD (64/160 KB LDS) take smaller ones."""
    def mla(profile, fp8):  # (keys per block, warps) of the sparse MLA launches over a bf16 / fp8 cache
        return {(x["block_k"], x["warps"]) for x in probe[profile] if x["name"] == "_sparse_mla_kernel" and x["fp8"] == fp8}

    def gate_up(profile):
        return {x["block_n"] for x in probe[profile] if x["name"] == "_gate_up_kernel" and x["fp8"]}

    assert (32, 8) in mla("nvidia", False) and (32, 8) in mla("nvidia", True)
    assert (32, 8) not in mla("nvidia-sm120", False) and (32, 8) in mla("nvidia-sm120", True)
    for amd in ("rocm-gfx942", "rocm-gfx950"):
        assert {b for b, _ in mla(amd, False) | mla(amd, True)} == {16}, amd
        assert 256 not in gate_up(amd), amd
    assert 256 in gate_up("nvidia") and 256 not in gate_up("nvidia-sm120")


def test_compiles_for_every_target(probe):
    failed = [row for row in probe["compiled"] if not row[1]]
    assert len(probe["compiled"]) >= 6 and not failed, failed
