"""The memory plan (core/engine/memory.py, `dsv32 memory-plan`) against what one GPU really allocates, at full
V3.2 width with reduced depth (random FP8 weights): weights, KV pool, decode graphs, and the peak workspace of a
prefill step of --chunked-prefill-size tokens and of a decode step. Prints a table and writes JSON.

    python benchmarks/bench_memory.py [--layers 4] [--chunk 8192] [--out benchmarks/results/memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import header, print_table, write_json  # noqa: E402

GIB = 2**30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--chunk", type=int, default=8192)
    p.add_argument("--graph-bs", type=int, default=64)
    p.add_argument("--out", default="benchmarks/results/memory.json")
    args = p.parse_args()

    from dsv32 import LLM, SamplingParams
    from dsv32.core.config import ModelConfig, deepseek_v32_config
    from dsv32.core.engine.build import kv_spec
    from dsv32.core.engine.memory import plan_memory

    path = os.path.join(tempfile.gettempdir(), "dsv32_memory_model")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(deepseek_v32_config(num_hidden_layers=args.layers, first_k_dense_replace=1), f)
    before = torch.cuda.memory_allocated()
    llm = LLM(model=path, load_format="dummy", max_num_seqs=args.graph_bs, max_model_len=args.chunk + 64,
              kv_cache_dtype="fp8_e4m3", kv_cache_memory_gib=4.0, chunked_prefill_size=args.chunk,
              graph_max_bs=args.graph_bs)
    mem = llm.core.memory
    cfg = ModelConfig.from_pretrained(path)
    spec = kv_spec(cfg, llm.core.resolved, 64)
    plan = plan_memory(llm.engine_config, cfg, torch.cuda.get_device_properties(0).total_memory, 0,
                       spec.latent_bytes_per_token(), spec.index_bytes_per_token())

    def peak(prompts, max_tokens):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                              ignore_eos=True))
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    prefill = peak([[7] * args.chunk], 1)  # one step of chunk tokens (and its one sampled token)
    llm.generate(prompt_token_ids=[[7] * 65] * args.graph_bs, sampling_params=SamplingParams(max_tokens=1))
    decode = peak([[7] * 65] * args.graph_bs, 8)  # prefix-cached prompts: decode steps (graphs hold their pool)
    rows = [
        {"item": "weights", "plan_GiB": plan.weights / GIB, "measured_GiB": mem["weights"] / GIB},
        {"item": "KV pool", "plan_GiB": plan.kv_bytes / GIB, "measured_GiB": (mem["kv_latent"] + mem["kv_index"]) / GIB},
        {"item": f"graphs (bs ≤ {args.graph_bs})", "plan_GiB": plan.graphs / GIB,
         "measured_GiB": (mem["graphs"] or 0) / GIB},
        {"item": f"workspace, {args.chunk}-token prefill", "plan_GiB": plan.workspace / GIB,
         "measured_GiB": prefill / GIB},
        {"item": f"workspace, decode bs {args.graph_bs} (after prefix-cached prompts)", "plan_GiB": float("nan"),
         "measured_GiB": decode / GIB},
        {"item": "all allocated by the engine", "plan_GiB": (plan.weights + plan.kv_bytes + plan.graphs) / GIB,
         "measured_GiB": (torch.cuda.memory_allocated() - before) / GIB},
    ]
    for r in rows:
        r["plan_GiB"], r["measured_GiB"] = round(r["plan_GiB"], 3), round(r["measured_GiB"], 3)
    print_table(f"memory plan vs measured ({args.layers} layers at full width, FP8 weights, fp8 KV)", rows,
                ["item", "plan_GiB", "measured_GiB"])
    write_json(args.out, {**header({"copy_GBps": 0, "fp8_TFLOPs": 0, "bf16_TFLOPs": 0}), "args": vars(args),
                          "rows": rows})


if __name__ == "__main__":
    main()
