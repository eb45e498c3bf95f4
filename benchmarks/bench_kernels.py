"""Kernel benchmarks at DeepSeek-V3.2 shapes on one GPU, against ceilings measured in the same run.

    python benchmarks/bench_kernels.py [--backend cuda] [--only indexer,topk,mla,moe,gemm] [--quick]
        [--mla-heads 128,16] [--out benchmarks/results/kernels.json]

Each row: median ms (CUDA-graph replay, cold L2), the bytes and FLOPs the op must move/do at minimum (stated per
section), and achieved GB/s and TFLOP/s as ratios of the measured copy bandwidth and fp8 (or bf16) GEMM rate.
Sections:
  indexer  decode (one query token per request; contexts 4k/32k/128k; batch 1/32/128) and prefill (one request of
           4k/16k tokens, causal): logits over the fp8 paged keys + top-2048, ops.indexer_topk. Floor bytes: keys
           (132 B/token) + queries; FLOPs: 2·64 heads·128·keys per query (fp8).
  topk     top-2048 alone over fp32 logit rows of the same sizes (bytes: the row read once).
  mla      sparse MLA, 128 heads (--mla-heads: also a TP rank's share, e.g. 16 at TP 8, with the Triton kernel's
           heads-major and keys-major forms side by side), 2048 selected keys per query: decode batch 1/32/128 (bf16
           and fp8 cache) and prefill of 4096 queries (bf16 cache; both caches below 128 heads). FLOPs
           2·heads·2048·(576+512) per query (bf16 rate); bytes: selected entries.
           Prefill is also compared with FlashMLA's published 640 TFLOP/s (H800) for its sparse prefill kernel.
  moe      256 FP8 experts (7168→2048→7168), top-8 of random router logits, 1/32/256/4096 tokens: bytes = distinct
           experts' weights + scales; FLOPs = tokens·8·2·3·7168·2048.
  gemm     the FP8-block linears of one layer at M = 1/32/128/4096 (bytes = weight + scales + activations in/out),
           with cuBLAS fp8 (per-tensor scales, torch._scaled_mm) at the same shape for comparison.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import ceilings, gpu_ops, header, print_table, rate_row, time_ms, write_json  # noqa: E402

from dsv32.core.model.checkpoint import _stack, fp8_block_quantize  # noqa: E402
from dsv32.core.ops import AttnMetadata, ExpertWeights, LinearWeight  # noqa: E402

PAGE, TOPK, HI, DI = 64, 2048, 64, 128
dev = "cuda"


def _meta(positions, kv_lens, block_table, decode):
    T = positions.shape[0]
    B = block_table.shape[0]
    token_req = torch.arange(B, device=dev).repeat_interleave(T // B) if decode else torch.zeros(T, dtype=torch.int64,
                                                                                                 device=dev)
    return AttnMetadata(token_req=token_req, positions=positions, block_table=block_table,
                        kv_lens=torch.tensor(kv_lens, device=dev), kv_lens_cpu=list(kv_lens), page_size=PAGE,
                        is_decode=decode)


def _index_pool(n_tokens):
    pages = -(-n_tokens // PAGE)
    pool = torch.randint(0, 0x78, (pages, PAGE * (DI + 4)), dtype=torch.uint8, device=dev)  # finite e4m3 bytes
    pool[:, PAGE * DI:].view(torch.float32).fill_(0.01)
    return pool


def bench_indexer(ops, ceil, quick):
    rows, trows = [], []
    from dsv32.backends.triton.topk import topk_into

    cases = [("decode", c, b) for c in (4096, 32768, 131072) for b in (1, 32, 128)]
    cases += [("prefill", c, 1) for c in (4096, 16384)]
    if quick:
        cases = [("decode", 32768, 32), ("prefill", 4096, 1)]
    for mode, ctx, B in cases:
        pool = _index_pool(ctx * B)
        bt = torch.arange(pool.shape[0], device=dev, dtype=torch.int32).view(B, -1)
        if mode == "decode":
            T, positions, keys = B, torch.full((B,), ctx - 1, device=dev), B * ctx
            flops = 2 * B * HI * DI * ctx
        else:
            T, positions, keys = ctx, torch.arange(ctx, device=dev), ctx
            flops = 2 * HI * DI * ctx * (ctx + 1) // 2
        meta = _meta(positions, [ctx] * B, bt, mode == "decode")
        q = torch.randn(T, HI, DI, device=dev).to(torch.float8_e4m3fn)
        w = torch.randn(T, HI, device=dev)
        ms, graphed = time_ms(lambda: ops.indexer_topk(q, w, pool, meta, DI**-0.5, TOPK), iters=10)
        bytes_ = keys * (DI + 4) + q.numel() + w.numel() * 4 + T * TOPK * 4
        rows.append({"mode": mode, "context": ctx, "batch": B, "graph": graphed, **rate_row(ms, bytes_, flops, ceil)})
        # top-k alone over the logits rows this step produces
        n_rows = min(T, 4096)
        logits = torch.randn(n_rows, ctx, device=dev)
        lengths = positions[:n_rows] + 1
        out = torch.empty(n_rows, TOPK, dtype=torch.int32, device=dev)
        ms, graphed = time_ms(lambda: topk_into(out, logits, lengths, TOPK), iters=10)
        read = int(lengths.sum()) * 4
        trows.append({"rows": n_rows, "row_len": ctx, "mode": mode, "graph": graphed,
                      **rate_row(ms, read + out.numel() * 4, 0, ceil)})
    print_table("indexer: logits + top-2048 (ops.indexer_topk), fp8 keys", rows,
                ["mode", "context", "batch", "ms", "GBps", "bw_ratio", "TFLOPs", "flop_ratio"])
    print_table("top-2048 alone (radix select over fp32 rows)", trows,
                ["mode", "rows", "row_len", "ms", "GBps", "bw_ratio"])
    return {"indexer": rows, "topk": trows}


def bench_mla(ops, ceil, quick, heads=(128,)):
    from dsv32.backends.reference.ops import ReferenceOps
    from dsv32.backends.triton.attention import sparse_mla_attention
    from dsv32.core.kv_cache import KVCache, KVCacheSpec, latent_entry_bytes

    L, R, n_tokens = 512, 64, 1 << 17
    rows = []
    for cache_dtype in ("bf16", "fp8"):
        spec = KVCacheSpec(1, n_tokens // PAGE, PAGE, L, R, DI, "fp8_e4m3" if cache_dtype == "fp8" else torch.bfloat16,
                           True, torch.bfloat16)
        cache = KVCache(spec, dev)
        ReferenceOps(dev).write_latent_cache(cache.latent[0], torch.randn(n_tokens, L, device=dev),
                                             torch.randn(n_tokens, R, device=dev), torch.arange(n_tokens, device=dev))
        entry = latent_entry_bytes(L, R) if cache_dtype == "fp8" else (L + R) * 2
        for H in heads:
            cases = [("decode", t) for t in (1, 32, 128)] + ([("prefill", 4096)] if cache_dtype == "bf16" or H < 128
                                                             else [])
            if quick:
                cases = cases[1:2] + cases[3:]
            # the op as the backend runs it; with few heads per program (a TP rank's share) also the Triton kernel's
            # forms by hand: heads-major with 16-head blocks and keys-major (backends/triton/attention.py)
            forms = {"op": lambda q, idx: ops.sparse_mla_attention(q, cache.latent[0], idx, 0.1352338, L)}
            if H <= 32:
                for name, kw in (("heads-major 16", dict(block_h=16, num_warps=4)),
                                 ("keys-major 64 keys, 4 warps", dict(block_h=16, block_k=64, num_warps=4, keys_major=True)),
                                 ("keys-major 64 keys, 8 warps", dict(block_h=16, block_k=64, num_warps=8, keys_major=True))):
                    forms[name] = lambda q, idx, kw=kw: sparse_mla_attention(q, cache.latent[0], idx, 0.1352338, L, **kw)
            for mode, T in cases:
                q = torch.randn(T, H, L + R, dtype=torch.bfloat16, device=dev) / 24
                idx = torch.randint(0, n_tokens, (T, TOPK), device=dev, dtype=torch.int32)
                for form, fn in forms.items():
                    ms, graphed = time_ms(lambda: fn(q, idx), iters=10)
                    flops = 2 * T * H * TOPK * (L + R + L)
                    bytes_ = T * TOPK * entry + q.numel() * 2 + T * H * L * 2 + idx.numel() * 4
                    r = {"mode": mode, "cache": cache_dtype, "heads": H, "form": form, "queries": T, "graph": graphed,
                         **rate_row(ms, bytes_, flops, ceil, "bf16")}
                    if mode == "prefill":
                        r["vs_flashmla_640"] = round(r["TFLOPs"] / 640, 3)
                    rows.append(r)
    print_table("sparse MLA (top-2048 keys per query)", rows,
                ["mode", "cache", "heads", "form", "queries", "ms", "GBps", "bw_ratio", "TFLOPs", "flop_ratio",
                 "vs_flashmla_640"])
    return {"sparse_mla": rows}


def _fp8_linear(N, K, g):
    w = torch.randn(N, K, device=dev, generator=g) * K**-0.5
    return LinearWeight(*fp8_block_quantize(w))


def bench_moe(ops, ceil, quick):
    E, Hd, I, k = 256, 7168, 2048, 8
    g = torch.Generator(device=dev).manual_seed(0)
    gate = _stack([_fp8_linear(I, Hd, g) for _ in range(E)])
    up = _stack([_fp8_linear(I, Hd, g) for _ in range(E)])
    down = _stack([_fp8_linear(Hd, I, g) for _ in range(E)])
    experts = ops.prepare_experts(ExpertWeights(gate, up, down), torch.bfloat16)
    per_expert = 3 * I * Hd + 3 * (I // 128) * (Hd // 128) * 4
    bias = torch.randn(E, device=dev) * 0.1
    rows = []
    for T in ((32, 4096) if quick else (1, 32, 256, 4096)):
        x = torch.randn(T, Hd, dtype=torch.bfloat16, device=dev)
        logits = torch.randn(T, E, device=dev)
        weights, ids = ops.moe_route(logits, bias, 8, 4, k, True, 2.5)
        distinct = int(ids.unique().numel())
        ms, graphed = time_ms(lambda: ops.moe_experts(x, experts, weights, ids), iters=10)
        bytes_ = distinct * per_expert + 2 * x.numel() * 2
        flops = T * k * 2 * 3 * Hd * I
        rows.append({"tokens": T, "experts_touched": distinct, "graph": graphed, **rate_row(ms, bytes_, flops, ceil)})
    print_table("MoE experts (256 × FP8 7168→2048→7168, top-8)", rows,
                ["tokens", "experts_touched", "ms", "GBps", "bw_ratio", "TFLOPs", "flop_ratio"])
    return {"moe": rows}


GEMMS = {"q_a_proj": (1536, 7168), "q_b_proj": (24576, 1536), "kv_a_proj": (576, 7168), "o_proj": (7168, 16384),
         "indexer.wq_b": (8192, 1536), "indexer.wk": (128, 7168), "shared.gate_up": (4096, 7168),
         "shared.down": (7168, 2048), "dense.gate_up": (36864, 7168), "dense.down": (7168, 18432)}


def bench_gemm(ops, ceil, quick):
    g = torch.Generator(device=dev).manual_seed(1)
    one = torch.ones((), device=dev)
    rows = []
    for name, (N, K) in GEMMS.items():
        w = ops.prepare_linear(_fp8_linear(N, K, g), torch.bfloat16)
        wt = torch.randn(N, K, device=dev).to(torch.float8_e4m3fn)
        for M in ((1, 4096) if quick else (1, 32, 128, 4096)):
            x = torch.randn(M, K, dtype=torch.bfloat16, device=dev)
            ms, graphed = time_ms(lambda: ops.linear(x, w), iters=10)
            bytes_ = N * K + (N // 128 + 1) * (K // 128 + 1) * 4 + M * K * 2 + M * N * 2
            r = {"linear": name, "N": N, "K": K, "M": M, "graph": graphed, **rate_row(ms, bytes_, 2 * M * N * K, ceil)}
            if M % 16 == 0:
                xq = x.to(torch.float8_e4m3fn)
                cms, _ = time_ms(lambda: torch._scaled_mm(xq, wt.t(), one, one, out_dtype=torch.bfloat16), iters=10)
                r["cublas_fp8_ms"] = round(cms, 4)
                r["vs_cublas"] = round(cms / ms, 3)
            rows.append(r)
    print_table("FP8-block linears (ops.linear; vs_cublas = cuBLAS per-tensor fp8 time / ours)", rows,
                ["linear", "M", "N", "K", "ms", "GBps", "bw_ratio", "TFLOPs", "flop_ratio", "cublas_fp8_ms", "vs_cublas"])
    return {"gemm": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", default="cuda")
    p.add_argument("--only", default="indexer,mla,moe,gemm", help="comma-separated sections (topk runs with indexer)")
    p.add_argument("--quick", action="store_true", help="one or two sizes per section")
    p.add_argument("--mla-heads", default="128",
                   help="comma-separated head counts for the mla section (128: one GPU; 16: a rank of TP 8)")
    p.add_argument("--out", default="benchmarks/results/kernels.json")
    args = p.parse_args()
    ops = gpu_ops(args.backend)
    ceil = ceilings()
    payload = {**header(ceil), "backend": args.backend}
    sections = {"indexer": bench_indexer, "mla": bench_mla, "moe": bench_moe, "gemm": bench_gemm}
    for name in args.only.split(","):
        extra = {"heads": tuple(int(h) for h in args.mla_heads.split(","))} if name == "mla" else {}
        payload.update(sections[name](ops, ceil, args.quick, **extra))
        torch.cuda.empty_cache()
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
