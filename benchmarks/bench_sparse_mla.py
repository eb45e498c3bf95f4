"""Sparse MLA attention kernel benchmark (decode / MTP-verify shapes of DeepSeek-V3.2: 128 heads, 512+64 latent,
top-2048 selected slots per query), bf16 and fp8 latent caches, against ceilings measured in the same run
(a device copy for bandwidth, a large bf16 GEMM for FLOP/s). Prints a table and writes JSON.

    python benchmarks/bench_sparse_mla.py [--backend cuda] [--out benchmarks/results/sparse_mla.json]
"""

from __future__ import annotations

import argparse
import json
import os

import torch


def time_ms(fn, iters: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def ceilings() -> dict:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    copy_ms = time_ms(lambda: y.copy_(x))
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    gemm_ms = time_ms(lambda: a @ a, iters=10)
    return {"copy_GBps": 2 * x.numel() / copy_ms / 1e6, "bf16_TFLOPs": 2 * 8192**3 / gemm_ms / 1e9}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--backend", default="cuda")
    p.add_argument("--out", default="benchmarks/results/sparse_mla.json")
    args = p.parse_args()
    from dsv32.backends.reference.ops import ReferenceOps
    from dsv32.core import registry
    from dsv32.core.kv_cache import KVCache, KVCacheSpec, latent_entry_bytes

    ops = registry.create_ops(registry.select_backend(args.backend), "cuda")
    ceil = ceilings()
    H, L, R, K, n_tokens = 128, 512, 64, 2048, 65536
    rows = []
    for cache_dtype in ("bf16", "fp8"):
        spec = KVCacheSpec(1, n_tokens // 64, 64, L, R, 128, "fp8_e4m3" if cache_dtype == "fp8" else torch.bfloat16,
                           True, torch.bfloat16)
        cache = KVCache(spec, "cuda")
        ReferenceOps("cuda").write_latent_cache(cache.latent[0], torch.randn(n_tokens, L, device="cuda"),
                                                torch.randn(n_tokens, R, device="cuda"), torch.arange(n_tokens, device="cuda"))
        entry = latent_entry_bytes(L, R) if cache_dtype == "fp8" else (L + R) * 2
        for T in (1, 8, 32, 64, 128):
            q = torch.randn(T, H, L + R, dtype=torch.bfloat16, device="cuda") / 24
            idx = torch.stack([torch.randperm(n_tokens, device="cuda")[:K] for _ in range(T)]).int()
            ms = time_ms(lambda: ops.sparse_mla_attention(q, cache.latent[0], idx, 0.1352338, L))
            flops = 2 * T * H * K * (L + R + L)
            bytes_ = T * K * entry + q.numel() * 2 + T * H * L * 2 + idx.numel() * 4
            rows.append({"cache": cache_dtype, "tokens": T, "ms": ms, "TFLOPs": flops / ms / 1e9,
                         "GBps": bytes_ / ms / 1e6, "flop_ratio": flops / ms / 1e9 / ceil["bf16_TFLOPs"],
                         "bw_ratio": bytes_ / ms / 1e6 / ceil["copy_GBps"]})
    print(f"device {torch.cuda.get_device_name()}  backend {args.backend}  copy {ceil['copy_GBps']:.0f} GB/s  "
          f"bf16 GEMM {ceil['bf16_TFLOPs']:.0f} TFLOP/s")
    print(f"{'cache':>5} {'T':>5} {'ms':>8} {'TFLOP/s':>8} {'%flop':>6} {'GB/s':>8} {'%bw':>6}")
    for r in rows:
        print(f"{r['cache']:>5} {r['tokens']:>5} {r['ms']:>8.3f} {r['TFLOPs']:>8.1f} {100 * r['flop_ratio']:>5.1f}% "
              f"{r['GBps']:>8.0f} {100 * r['bw_ratio']:>5.1f}%")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "backend": args.backend, "ceilings": ceil, "rows": rows}, f,
                  indent=2)


if __name__ == "__main__":
    main()
