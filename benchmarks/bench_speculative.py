"""MTP speculative decoding at full DeepSeek-V3.2 width (the reduced-depth benchmark model: 1 dense + 3 MoE layers, plus
its MTP layer; random FP8-block weights): the cost of one draft + verify step with k = 1/2/3 draft tokens against a
plain decode step, at batch 1/8/32 and a 4096-token context, and the tokens/s it gives at accept lengths 2, 2.5, 3.

    python benchmarks/bench_speculative.py [--batches 1,8,32] [--steps 1,2,3] [--context 4096]
                                           [--out benchmarks/results/speculative.json]

Two measurements per (k, batch):
- device: the engine's captured graphs replayed on a batch at the context length (cold L2 is not forced: the graphs
  run back to back as in the engine): decode = target graph (batch, 1 token per request); verify = target graph
  (batch, k + 1); extend = MTP-layer graph (batch, k + 1); chain = MTP-layer graph (batch, 1) plus its LM head and
  argmax, k − 1 times. Ratio verify / decode is the issue's target (≤ 1.3 at k = 3, batch 1).
- engine: wall seconds per step of LLM.generate in steady decode (every request decoding), plain and speculative; a
  speculative step does the same work whatever is accepted (verify batches are padded to k + 1 rows per request), so
  tokens/s at accept length L = batch · L / step time (random weights accept nothing: L is supplied, not measured).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import header, print_table, time_ms, write_json  # noqa: E402

ACCEPT_LENGTHS = (2.0, 2.5, 3.0)


def model_dir(path: str) -> str:
    from dsv32.core.config import deepseek_v32_config

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(deepseek_v32_config(num_hidden_layers=4, first_k_dense_replace=1, num_nextn_predict_layers=1), f)
    return path


def replay_ms(fn) -> float:
    """Median ms of fn() run back to back (its graph replays are the engine's own; the L2 is not flushed)."""
    return time_ms(fn, iters=30, graph=False, flush=False)[0]


def device_rows(llm, k: int, batches: list[int], context: int) -> list[dict]:
    """Graph replays of the engine's runner on batches whose requests hold `context` tokens (pages from the pool)."""
    runner, cache, model = llm.runner, llm.kv_cache, llm.model
    rows = []
    for bs in batches:
        pages = [cache.allocator.alloc(-(-(context + 2 * k + 2) // cache.page_size)) for _ in range(bs)]

        def batch(q: int, kind: str):
            fb = runner.build([([1] * q, context, p) for p in pages], kind=kind)
            assert runner._graph_for(fb, kind) is not None, (kind, bs, q)
            return fb

        dec, ver, ext, chain = batch(1, "target"), batch(k + 1, "target"), batch(k + 1, "mtp"), batch(1, "mtp")
        every = list(range(bs * (k + 1)))
        decode_ms = replay_ms(lambda: runner.hidden_and_logits(dec, list(range(bs))))
        verify_ms = replay_ms(lambda: runner.hidden_and_logits(ver, every))
        extend_ms = replay_ms(lambda: runner.mtp_hidden(ext))
        chain_ms = replay_ms(lambda: model.logits(runner.mtp_hidden(chain)[:bs]).argmax(-1))
        for p in pages:
            cache.allocator.release(p)
        draft_verify = verify_ms + extend_ms + (k - 1) * chain_ms
        rows.append({"k": k, "batch": bs, "decode_ms": decode_ms, "verify_ms": verify_ms,
                     "verify_over_decode": verify_ms / decode_ms, "extend_ms": extend_ms, "chain_ms": chain_ms,
                     "draft_verify_ms": draft_verify, "step_over_decode": draft_verify / decode_ms})
    return rows


def engine_step_s(llm, bs: int, context: int, out_tokens: int) -> float:
    """Median wall seconds between consecutive launches of steps in which all bs requests decode."""
    from dsv32 import SamplingParams

    eng = llm.engine
    stamps = []
    launch = eng._launch

    def timed(work):
        stamps.append((time.perf_counter(), len(work), all(r.num_cached >= len(r.prompt_ids) for r, _ in work)))
        return launch(work)

    eng._launch = timed
    rng = random.Random(bs)
    prompts = [[rng.randrange(3, 120000) for _ in range(context)] for _ in range(bs)]
    llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=out_tokens, temperature=0,
                                                                          ignore_eos=True))
    eng._launch = launch
    gaps = [b[0] - a[0] for a, b in zip(stamps, stamps[1:]) if a[1] == b[1] == bs and a[2] and b[2]]
    return statistics.median(gaps[len(gaps) // 4:]) if gaps else float("nan")


def build(path: str, k: int, max_bs: int, context: int, kv_gib: float):
    from dsv32 import LLM

    kw = dict(speculative_algorithm="EAGLE", speculative_num_steps=k) if k else {}
    return LLM(model=path, load_format="dummy", max_num_seqs=max_bs, max_model_len=context + 512, graph_max_bs=max_bs,
               kv_cache_memory_gib=kv_gib, **kw)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--steps", default="1,2,3")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--out-tokens", type=int, default=48)
    p.add_argument("--kv-cache-gib", type=float, default=8.0)
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--out", default="benchmarks/results/speculative.json")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    steps = [int(s) for s in args.steps.split(",")]
    from common import ceilings

    info = header(ceilings())
    path = model_dir(tempfile.mkdtemp(prefix="dsv32-bench-spec-"))
    dev, eng = [], []
    plain_step = {}
    if not args.skip_engine:
        llm = build(path, 0, max(batches), args.context, args.kv_cache_gib)
        for bs in batches:
            plain_step[bs] = engine_step_s(llm, bs, args.context, args.out_tokens)
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    for k in steps:
        llm = build(path, k, max(batches), args.context, args.kv_cache_gib)
        dev += device_rows(llm, k, batches, args.context)
        if not args.skip_engine:
            for bs in batches:
                s = engine_step_s(llm, bs, args.context, args.out_tokens)
                row = {"k": k, "batch": bs, "plain_step_ms": plain_step[bs] * 1e3, "spec_step_ms": s * 1e3,
                       "plain_tok_s": bs / plain_step[bs]}
                for L in ACCEPT_LENGTHS:  # a step emits at most k + 1 tokens
                    row[f"tok_s_at_{L}"] = bs * L / s if L <= k + 1 else None
                    row[f"speedup_at_{L}"] = (bs * L / s) / (bs / plain_step[bs]) if L <= k + 1 else None
                eng.append(row)
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    print_table(f"device: graph replays at context {args.context} (ms)", dev,
                ["k", "batch", "decode_ms", "verify_ms", "verify_over_decode", "extend_ms", "chain_ms",
                 "draft_verify_ms", "step_over_decode"])
    if eng:
        print_table("engine: wall time per step in steady decode, and tokens/s at accept length L", eng,
                    ["k", "batch", "plain_step_ms", "spec_step_ms", "plain_tok_s"]
                    + [f"tok_s_at_{L}" for L in ACCEPT_LENGTHS] + [f"speedup_at_{L}" for L in ACCEPT_LENGTHS])
    write_json(args.out, {**info, "context": args.context, "model": "V3.2 width, 4 layers (1 dense + 3 MoE) + MTP, "
                          "random FP8-block weights", "device_rows": dev, "engine_rows": eng})


if __name__ == "__main__":
    main()
