"""Ahead-of-time compilation of every Triton kernel of the project, for GPUs this machine does not have.

    python -m dsv32.backends.triton.aot [--targets gfx942,gfx950,sm80,sm90,sm100,sm120] [--json out.json]

How the kernels and their meta-parameters are found: the real host code runs — the ops of the backend that runs on
each target driving a full-width DeepSeek-V3.2 model (one dense and one MoE layer) through prefill, mixed and decode
steps, with bf16 and fp8 KV caches, bf16, FP8-block, NVFP4 and W4A4 MXFP4 weights, batch sizes that select every tile configuration — on
*meta* tensors (shapes and dtypes only), with Triton's launch replaced by a recorder. Each target has its profile,
what its platform declares (core/platform.py) and the tiles its shared memory allows: NVIDIA sm_90/100/120 —
TritonOps, e4m3fn (sm_120 with 99 KB of shared memory per block: smaller attention and MoE tiles); sm_80 — no fp8 (FP8
checkpoints dequantized at load, bf16 KV cache, exact indexer: Triton has no e4m3 there); AMD gfx942 — RocmOps,
e4m3fnuz, 64 KB LDS; gfx950 — RocmOps, e4m3fn, 160 KB LDS. Each distinct launch (kernel, argument types, constexprs,
num_warps, num_stages) is then compiled with `triton.compile` for each target (AMD: HIP, warp size 64, down to
hsaco; NVIDIA: CUDA, warp 32, down to cubin). Printed per kernel and target: compiled or the error, registers and
spills (from the AMD assembly, or from ptxas -v for NVIDIA) and shared memory / LDS bytes. Exit status 1 when any
launch fails to compile for any target or needs more shared memory than the target has (it would fail at launch),
so CI fails when a target stops compiling.

This proves the kernels build for those chips, not that they run correctly there (nothing executes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

TARGETS = {"gfx942": ("hip", "gfx942", 64), "gfx950": ("hip", "gfx950", 64), "sm80": ("cuda", 80, 32),
           "sm90": ("cuda", 90, 32), "sm100": ("cuda", 100, 32), "sm120": ("cuda", 120, 32)}
# target → the ops profile whose launches it compiles (see _ops)
PROFILES = {"gfx942": "rocm-gfx942", "gfx950": "rocm-gfx950", "sm80": "nvidia-no-fp8", "sm90": "nvidia",
            "sm100": "nvidia", "sm120": "nvidia-sm120"}
# shared memory (LDS) one program may use: a launch compiled above it fails on that GPU at run time
SHARED_LIMIT = {"gfx942": 64 * 1024, "gfx950": 160 * 1024, "sm80": 163 * 1024, "sm90": 227 * 1024,
                "sm100": 227 * 1024, "sm120": 99 * 1024}


@dataclass
class Launch:
    kernel: object  # the JITFunction
    signature: dict
    constexprs: dict
    options: dict
    scenarios: set = field(default_factory=set)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def key(self) -> tuple:
        return (self.kernel.fn.__module__, self.name, tuple(sorted(self.signature.items())),
                tuple(sorted((k, repr(v)) for k, v in self.constexprs.items())), tuple(sorted(self.options.items())))


_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


@contextlib.contextmanager
def recording(launches: dict, scenario: list[str]):
    """Kernels launched inside are recorded (not run)."""
    from triton.runtime import jit

    original = jit.JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in _LAUNCH_OPTIONS}
        bound = dict(zip(self.arg_names, args))
        bound.update({k: v for k, v in kwargs.items() if k in self.arg_names})
        signature, constexprs = {}, {}
        for p in self.params:
            v = bound.get(p.name, p.default if hasattr(p, "default") else None)
            if p.is_constexpr:
                signature[p.name] = "constexpr"
                constexprs[p.name] = v
            else:
                t = jit.mangle_type(v)
                signature[p.name] = t
                if t == "constexpr":  # None arguments
                    constexprs[p.name] = v
        launch = Launch(self, signature, constexprs, options)
        launches.setdefault(launch.key(), launch).scenarios.add(scenario[0])
        return None

    jit.JITFunction.run = record
    try:
        yield
    finally:
        jit.JITFunction.run = original


def _ops(profile: str, device):
    """The ops a target's backend would use, on `device` (meta), with reference fallbacks bound."""
    from dsv32.backends.triton.ops import TritonOps
    from dsv32.core.registry import BackendInfo, create_ops

    if profile.startswith("rocm-"):
        from dsv32.backends.rocm.ops import RocmOps

        arch = profile.split("-", 1)[1]
        cls = type("Rocm", (), {"create": staticmethod(lambda d: RocmOps(d, arch=arch))})
    else:
        target = {"nvidia": "sm90", "nvidia-no-fp8": "sm80", "nvidia-sm120": "sm120"}[profile]

        class Nvidia(TritonOps):
            fp32_denormals = True  # as CudaOps

            def gpu_fp8(self):
                return (None, "sm_80: no fp8") if target == "sm80" else super().gpu_fp8()

            def max_shared_bytes(self):
                return SHARED_LIMIT[target]

        cls = type("Nvidia", (), {"create": staticmethod(Nvidia)})
    return create_ops(BackendInfo(profile, cls, True, ""), device)


def _scenarios(launches: dict, profile: str = "nvidia") -> None:
    """Drives the profile's ops over meta tensors at DeepSeek-V3.2 dimensions."""
    import torch

    from dsv32.core.config import ModelConfig, deepseek_v32_config, fp4_quantization_config
    from dsv32.core.forward_batch import ForwardBatch
    from dsv32.core.kv_cache import KVCache, KVCacheSpec
    from dsv32.core.model import DeepseekV32
    from dsv32.core.model.checkpoint import dummy_weights
    from dsv32.core.sampling import SamplingParams  # noqa: F401  (sampling is driven below)

    dev = torch.device("meta")
    scenario = ["setup"]
    with recording(launches, scenario):
        for kind in ("fp8", "bf16", "nvfp4", "mxfp4-w4a4"):
            fp8_weights = kind == "fp8"
            quant = {"fp8": {}, "bf16": {"quantization_config": None},
                     "nvfp4": {"quantization_config": fp4_quantization_config("nvfp4")},
                     "mxfp4-w4a4": {"quantization_config": fp4_quantization_config("mxfp4", w4a4=True)}}[kind]
            raw = deepseek_v32_config(num_hidden_layers=2, first_k_dense_replace=1, **quant)
            cfg = ModelConfig.from_dict(raw)
            ops = _ops(profile, dev)
            platform = ops.platform()
            indexer_fp8 = fp8_weights and not platform.fp8_indexer  # as fit_platform decides
            weights = dummy_weights(cfg, ops, torch.bfloat16, dev)  # FP8 converted as the platform says
            model = DeepseekV32(cfg, weights, ops, torch.bfloat16, dev, indexer_fp8=indexer_fp8,
                                max_positions=16384)
            for kv in ("fp8_e4m3", torch.bfloat16):
                if kv == "fp8_e4m3" and platform.fp8_kv_cache or kv == "fp8_e4m3" and kind not in ("fp8", "bf16"):
                    continue  # (FP4 weights: the linear and MoE launches; attention is the same as above)
                spec = KVCacheSpec(cfg.num_hidden_layers, 512, 64, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                                   cfg.index_head_dim, kv, indexer_fp8, torch.bfloat16)
                cache = KVCache(spec, dev)
                tag = f"{kind} weights, {kv if isinstance(kv, str) else 'bf16'} kv"
                pages = list(range(128))
                steps = {  # (new ids, start, pages) per request
                    "prefill 4096 tokens, 8192 keys": [([1] * 4096, 4096, pages)],
                    "prefill 1024 tokens, dense": [([1] * 1024, 0, pages[:16])],
                    "mixed decode + prefill": [([1], 6000, pages), ([1] * 300, 0, pages[:8])],
                    "decode bs 1, 8192 keys": [([1], 8191, pages)],
                    "decode bs 64, 8192 keys": [([1], 8191, pages)] * 64,
                    "decode bs 256, 1024 keys": [([1], 1023, pages[:16])] * 256,
                }
                for name, reqs in steps.items():
                    scenario[0] = f"{tag}: {name}"
                    fb = ForwardBatch.build(reqs, cache, dev)
                    hidden = model.forward(fb, cache)
                    logits = model.logits(hidden[fb.logits_indices])
                    B = logits.shape[0]
                    ops.sample(logits, torch.ones(B), torch.full((B,), 0.9), torch.full((B,), 50, dtype=torch.long),
                               torch.zeros(B), [None] * B)
                    ops.sample(logits, torch.zeros(B), torch.ones(B), torch.full((B,), -1, dtype=torch.long),
                               torch.zeros(B), [None] * B)


def _resources(compiled, backend: str, arch) -> dict:
    """Registers, spills and shared memory (LDS) of a compiled kernel, read from its assembly."""
    out = {"shared": int(getattr(compiled.metadata, "shared", 0) or 0)}
    if backend == "hip":
        asm = compiled.asm.get("amdgcn", "")
        for key, pattern in (("vgprs", r"\.vgpr_count:\s+(\d+)"), ("sgprs", r"\.sgpr_count:\s+(\d+)"),
                             ("spills", r"\.vgpr_spill_count:\s+(\d+)"), ("scratch", r"\.private_segment_fixed_size:\s+(\d+)")):
            m = re.search(pattern, asm)
            if m:
                out[key] = int(m.group(1))
        return out
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas().path
    except Exception:  # noqa: BLE001 - registers are a nicety
        return out
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    try:
        sm = f"sm_{arch}a" if arch in (90, 100) else f"sm_{arch}"
        r = subprocess.run([ptxas, "-v", f"--gpu-name={sm}", f.name, "-o", os.devnull], capture_output=True,
                           text=True, timeout=120)
        text = r.stdout + r.stderr
        m = re.search(r"Used (\d+) registers", text)
        if m:
            out["registers"] = int(m.group(1))
        m = re.search(r"(\d+) bytes spill stores", text)
        if m:
            out["spills"] = int(m.group(1))
    finally:
        os.unlink(f.name)
    return out


def compile_all(launches: dict, targets: list[str]) -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rows = []
    for launch in sorted(launches.values(), key=lambda item: (item.kernel.fn.__module__, item.name)):
        for t in targets:
            backend, arch, warp = TARGETS[t]
            t0 = time.monotonic()
            row = {"kernel": f"{launch.kernel.fn.__module__.rsplit('.', 1)[-1]}.{launch.name}", "target": t,
                   "constexprs": {k: v for k, v in launch.constexprs.items() if v is not None},
                   **launch.options, "scenarios": sorted(launch.scenarios)}
            try:
                compiled = triton.compile(ASTSource(launch.kernel, launch.signature, constexprs=launch.constexprs),
                                          target=GPUTarget(backend, arch, warp),
                                          options={**launch.options, "enable_fp_fusion": True})
                row.update(ok=True, **_resources(compiled, backend, arch))
                if row["shared"] > SHARED_LIMIT[t]:
                    row.update(ok=False, error=f"needs {row['shared']} B of shared memory, {t} has {SHARED_LIMIT[t]}")
            except Exception as e:  # noqa: BLE001 - every failure is reported
                row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            row["seconds"] = round(time.monotonic() - t0, 2)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsv32.backends.triton.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of {', '.join(TARGETS)}")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        print(f"error: unknown target(s) {unknown}; known: {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    os.environ.pop("TRITON_INTERPRET", None)  # the interpreter's kernels are not compilable objects
    rows, counts = [], {}
    for profile in dict.fromkeys(PROFILES[t] for t in targets):
        launches: dict = {}
        t0 = time.monotonic()
        _scenarios(launches, profile)
        mine = [t for t in targets if PROFILES[t] == profile]
        counts[profile] = len(launches)
        print(f"{profile}: {len(launches)} distinct kernel launches found in {time.monotonic() - t0:.1f} s; compiling "
              f"for {', '.join(mine)}", flush=True)
        rows += compile_all(launches, mine)
    failed = [r for r in rows if not r["ok"]]
    width = max(len(r["kernel"]) for r in rows)
    for r in rows:
        res = ", ".join(f"{k} {r[k]}" for k in ("registers", "vgprs", "sgprs", "spills", "scratch", "shared") if k in r)
        cfg = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        status = "compiled" if r["ok"] else f"FAILED: {r['error']}"
        print(f"{r['kernel']:<{width}}  {r['target']:<7} {status:<10} {res}  [{cfg}; warps {r.get('num_warps')}, "
              f"stages {r.get('num_stages')}]")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    launches_text = ", ".join(f"{p} {n}" for p, n in counts.items())
    print(f"\n{len(rows) - len(failed)}/{len(rows)} compiled (launches per profile: {launches_text})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
