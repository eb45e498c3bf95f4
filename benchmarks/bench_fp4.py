"""FP4 weights on one GPU without FP4 math: the Triton W4A16 kernels (backends/triton/fp4.py) against the FP8-block
Triton kernels, at DeepSeek-V3.2 shapes, with the bytes floor measured in the same run.

    python benchmarks/bench_fp4.py [--backend cuda] [--out benchmarks/results/fp4.json]

MoE (256 experts 7168→2048→7168, top-8 of random router logits, 1/8/32/256 tokens): bytes = the weights of the
distinct experts the batch touches in each format (FP8: 1 B per weight + fp32 scale per 128×128 block; NVFP4: ½ B per
weight + 1 B e4m3 per 16 + fp32 global per row; MXFP4: ½ B + 1 B e8m0 per 32) + activations. Dense linears (the
V3.2 layers' FP4 ones: o_proj 7168×16384, dense MLP gate/up 18432×7168 and down 7168×18432, shared expert 2048×7168)
at 1/8/32/256 tokens. floor = bytes / measured copy bandwidth; x_floor = ms / floor. speedup = FP8 ms / FP4 ms.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import ceilings, gpu_ops, header, print_table, time_ms, write_json  # noqa: E402

from dsv32.core.model.checkpoint import fp4_quantize, fp8_block_quantize  # noqa: E402
from dsv32.core.ops import ExpertWeights, LinearWeight  # noqa: E402

dev = torch.device("cuda")
FORMATS = ("fp8", "nvfp4", "mxfp4")


def weight_bytes(n: int, k: int, fmt: str) -> int:
    if fmt == "fp8":
        return n * k + -(-n // 128) * -(-k // 128) * 4
    if fmt == "nvfp4":
        return n * k // 2 + n * k // 16 + 4 * n
    return n * k // 2 + n * k // 32


def make_linear(n: int, k: int, fmt: str, seed: int) -> LinearWeight:
    g = torch.Generator(device=dev).manual_seed(seed)
    w = torch.randn(n, k, device=dev, generator=g) * k ** -0.5
    if fmt == "fp8":
        return LinearWeight(*fp8_block_quantize(w), (128, 128))
    return fp4_quantize(w, fmt)


def make_experts(E: int, I: int, K: int, fmt: str) -> ExpertWeights:
    parts = []
    for j, (n, k) in enumerate(((I, K), (I, K), (K, I))):
        per = [make_linear(n, k, fmt, 1000 * j + e) for e in range(E)]
        gs = None if per[0].global_scale is None else torch.stack([p.global_scale for p in per])
        parts.append(LinearWeight(torch.stack([p.weight for p in per]), torch.stack([p.scale_inv for p in per]),
                                  per[0].block, per[0].fmt, gs))
    return ExpertWeights(*parts)


def bench_moe(ops, ceil) -> list[dict]:
    E, I, K, top_k = 256, 2048, 7168, 8
    rows = []
    for fmt in FORMATS:
        experts = ops.prepare_experts(make_experts(E, I, K, fmt), torch.bfloat16)
        for T in (1, 8, 32, 256):
            g = torch.Generator(device=dev).manual_seed(T)
            x = torch.randn(T, K, device=dev, dtype=torch.bfloat16, generator=g)
            logits = torch.randn(T, E, device=dev, generator=g)
            w, ids = ops.moe_route(logits, torch.zeros(E, device=dev), 8, 4, top_k, True, 2.5)
            touched = int(ids.unique().numel())
            ms, graphed = time_ms(lambda: ops.moe_experts(x, experts, w, ids), iters=20)
            nbytes = touched * (2 * weight_bytes(I, K, fmt) + weight_bytes(K, I, fmt)) + 2 * T * K * 2
            floor = nbytes / ceil["copy_GBps"] / 1e6
            rows.append({"format": fmt, "tokens": T, "experts": touched, "ms": round(ms, 4), "floor_ms": round(floor, 4),
                         "x_floor": round(ms / floor, 2), "GBps": round(nbytes / ms / 1e6, 1), "graph": graphed,
                         "weight_MB": round(nbytes / 1e6, 1)})
            print(rows[-1], flush=True)
        experts = None
        torch.cuda.empty_cache()
    _speedups(rows, "tokens")
    return rows


def bench_dense(ops, ceil) -> list[dict]:
    shapes = {"o_proj": (7168, 16384), "mlp gate/up": (18432, 7168), "mlp down": (7168, 18432),
              "shared gate/up": (2048, 7168), "shared down": (7168, 2048)}
    rows = []
    for name, (n, k) in shapes.items():
        for fmt in FORMATS:
            w = ops.prepare_linear(make_linear(n, k, fmt, n + k), torch.bfloat16)
            for M in (1, 8, 32, 256):
                x = torch.randn(M, k, device=dev, dtype=torch.bfloat16)
                ms, graphed = time_ms(lambda: ops.linear(x, w), iters=20)
                nbytes = weight_bytes(n, k, fmt) + 2 * M * (n + k)
                floor = nbytes / ceil["copy_GBps"] / 1e6
                rows.append({"linear": name, "N": n, "K": k, "format": fmt, "tokens": M, "ms": round(ms, 4),
                             "floor_ms": round(floor, 4), "x_floor": round(ms / floor, 2),
                             "GBps": round(nbytes / ms / 1e6, 1), "graph": graphed})
            w = None
    _speedups(rows, "tokens", ("linear",))
    for r in rows:
        print(r, flush=True)
    return rows


def _speedups(rows: list[dict], key: str, extra: tuple = ()) -> None:
    fp8 = {(r[key], *(r[e] for e in extra)): r["ms"] for r in rows if r["format"] == "fp8"}
    for r in rows:
        r["vs_fp8"] = round(fp8[(r[key], *(r[e] for e in extra))] / r["ms"], 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", default="cuda")
    p.add_argument("--out", default="benchmarks/results/fp4.json")
    args = p.parse_args()
    ceil = ceilings()
    payload = {**header(ceil), "backend": args.backend, "command": " ".join(sys.argv)}
    ops = gpu_ops(args.backend)
    moe = bench_moe(ops, ceil)
    print_table("routed experts (speedup vs_fp8 = FP8 ms / this ms)", moe,
                ["format", "tokens", "experts", "ms", "floor_ms", "x_floor", "GBps", "vs_fp8", "weight_MB"])
    dense = bench_dense(ops, ceil)
    print_table("dense linears", dense, ["linear", "format", "tokens", "ms", "floor_ms", "x_floor", "GBps", "vs_fp8"])
    write_json(args.out, {**payload, "moe": moe, "dense": dense})


if __name__ == "__main__":
    main()
