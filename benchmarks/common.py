"""Shared benchmark plumbing: ceilings measured in the same run, graph-replayed timing with a cold L2, the
table printer and the JSON writer.

Timing: the function is captured in a CUDA graph once (so launch overhead, which graphs remove in the engine,
does not count) and replayed `iters` times; before each replay a 256 MiB write evicts H100's 50 MiB L2, so every
byte the kernel needs comes from HBM as in a real step of a large model. The median of the per-replay event
times is reported. Functions that cannot be captured are timed eagerly (flagged in the row).
"""

from __future__ import annotations

import json
import os
import statistics
import sys

import torch

_FLUSH = None


def flush_l2() -> None:
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    _FLUSH.fill_(1)


def time_ms(fn, iters: int = 20, graph: bool = True, flush: bool = True) -> tuple[float, bool]:
    """Median GPU milliseconds of fn(); returns (ms, graphed)."""
    fn()
    torch.cuda.synchronize()
    run = fn
    graphed = False
    if graph:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            run, graphed = g.replay, True
        except Exception as e:  # noqa: BLE001 - report and time eagerly
            print(f"  (not graph-capturable, timed eagerly: {type(e).__name__}: {str(e)[:80]})", file=sys.stderr)
            torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if flush:
            flush_l2()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        times.append((a, b))
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in times), graphed


def ceilings() -> dict:
    """Measured here, now: device copy bandwidth (read + write bytes), dense fp8 and bf16 GEMM rates."""
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    copy_ms, _ = time_ms(lambda: y.copy_(x), iters=10, graph=False, flush=False)
    n = 8192
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn).t()
    one = torch.ones((), device="cuda")
    fp8_ms, _ = time_ms(lambda: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16), iters=10, flush=False)
    c = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    bf16_ms, _ = time_ms(lambda: c @ c, iters=10, flush=False)
    return {"copy_GBps": 2 * (2 << 30) / copy_ms / 1e6, "fp8_TFLOPs": 2 * n**3 / fp8_ms / 1e9,
            "bf16_TFLOPs": 2 * n**3 / bf16_ms / 1e9}


def rate_row(ms: float, bytes_: float, flops: float, ceil: dict, flop_dtype: str = "fp8") -> dict:
    """Achieved GB/s and TFLOP/s with their ratios to the measured ceilings."""
    gbps, tflops = bytes_ / ms / 1e6, flops / ms / 1e9
    return {"ms": round(ms, 4), "GBps": round(gbps, 1), "bw_ratio": round(gbps / ceil["copy_GBps"], 3),
            "TFLOPs": round(tflops, 1), "flop_ratio": round(tflops / ceil[f"{flop_dtype}_TFLOPs"], 3)}


def print_table(title: str, rows: list[dict], cols: list[str]) -> None:
    print(f"\n## {title}")
    if not rows:
        print("(none)")
        return
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(cols, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return "" if v is None else str(v)


def header(ceil: dict) -> dict:
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "ceilings": ceil}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    print(f"device {info['device']}  torch {info['torch']}  triton {info.get('triton')}")
    print(f"ceilings (measured now): copy {ceil['copy_GBps']:.0f} GB/s, fp8 GEMM {ceil['fp8_TFLOPs']:.0f} TFLOP/s, "
          f"bf16 GEMM {ceil['bf16_TFLOPs']:.0f} TFLOP/s")
    return info


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"\nwrote {path}")


def gpu_ops(backend: str = "cuda"):
    from dsv32.core import registry

    return registry.create_ops(registry.select_backend(backend), "cuda")
