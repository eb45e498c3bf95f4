"""What each rank reads and holds when it loads its part of an FP8-block checkpoint (core/model/checkpoint.py), on
the CPU: a checkpoint of the official layout at reduced size is written once (sharded safetensors + index), then
loaded by one process and by TP 2 / TP 4 (with EP = TP) rank processes. Per rank: bytes read from the checkpoint,
weights held, and peak host RSS (the process's maximum resident set, torch's own ~0.3 GiB included). Prints a table
and writes JSON.

    python benchmarks/bench_load.py [--hidden 2048] [--experts 64] [--layers 3] [--out benchmarks/results/load.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import print_table  # noqa: E402

GIB = 2**30


def write_checkpoint(path: str, raw: dict, shard_bytes: int = 1 << 30) -> int:
    """Random weights in the official FP8-block layout, written shard by shard; returns the total bytes."""
    from safetensors.torch import save_file

    from dsv32.core.config import ModelConfig
    from dsv32.core.model.checkpoint import fp8_block_quantize
    from dsv32.core.model.specs import weight_specs

    cfg = ModelConfig.from_dict(raw)
    g = torch.Generator().manual_seed(0)
    keep_bf16 = ("lm_head.weight", "mlp.gate.weight", "indexer.weights_proj.weight")
    shard, shards, weight_map, total = {}, 0, {}, 0

    def flush():
        nonlocal shard, shards
        if shard:
            name = f"model-{shards:05d}.safetensors"
            save_file(shard, os.path.join(path, name))
            weight_map.update({k: name for k in shard})
            shards += 1
            shard = {}

    def add(name, t):
        nonlocal total
        shard[name] = t.contiguous()
        total += t.numel() * t.element_size()
        if sum(v.numel() * v.element_size() for v in shard.values()) > shard_bytes:
            flush()

    def linear(name, shape, bf16):
        w = torch.randn(shape, generator=g) * shape[-1] ** -0.5
        if bf16:
            add(name, w.to(torch.bfloat16))
        else:
            q, s = fp8_block_quantize(w)
            add(name, q)
            add(name + "_scale_inv", s)

    for name, spec in weight_specs(cfg).items():
        if spec.kind == "experts":
            E, I, Hd = spec.shape
            for j in range(E):
                for p, shape in (("gate_proj", (I, Hd)), ("up_proj", (I, Hd)), ("down_proj", (Hd, I))):
                    linear(f"{name}.{j}.{p}.weight", shape, False)
        elif spec.kind == "linear":
            linear(name, spec.shape, spec.fp32 or name.endswith(keep_bf16))
        else:
            t = torch.rand(spec.shape, generator=g) + 0.5
            add(name, t.float() if spec.fp32 else t.to(torch.bfloat16))
    flush()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f)
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--tp", default="1,2,4")
    p.add_argument("--out", default="benchmarks/results/load.json")
    args = p.parse_args()

    from dsv32 import LLM
    from dsv32.core.config import deepseek_v32_config

    raw = deepseek_v32_config(hidden_size=args.hidden, intermediate_size=4 * args.hidden, moe_intermediate_size=1024,
                              num_hidden_layers=args.layers, first_k_dense_replace=1, n_routed_experts=args.experts,
                              n_group=8, topk_group=4, vocab_size=32768, num_nextn_predict_layers=0)
    path = os.path.join(tempfile.gettempdir(), f"dsv32_load_{args.hidden}_{args.experts}_{args.layers}")
    if not os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
        os.makedirs(path, exist_ok=True)
        t0 = time.monotonic()
        total = write_checkpoint(path, raw)
        print(f"wrote a {total / GIB:.2f} GiB FP8 checkpoint in {time.monotonic() - t0:.0f} s: {path}")
    rows = []
    for tp in [int(t) for t in args.tp.split(",")]:
        kw = dict(model=path, dtype="bfloat16", device="cpu", max_model_len=1024, num_kv_pages=16, page_size=64)
        if tp == 1:
            llm = LLM(**kw)
            mems = [llm.core.memory]
        else:
            llm = LLM(tp_size=tp, ep_size=tp, **kw)
            mems = llm._ranks.info["memory_per_rank"]
        for rank, m in enumerate(mems):
            rows.append({"tp=ep": tp, "rank": rank, "read_GiB": m["checkpoint_read"] / GIB,
                         "checkpoint_GiB": m["checkpoint_total"] / GIB, "weights_GiB": m["weights"] / GIB,
                         "host_peak_rss_GiB": m["host_peak_rss"] / GIB})
        llm.shutdown()
        del llm
    for r in rows:
        for k, v in r.items():
            r[k] = round(v, 3) if isinstance(v, float) else v
    print_table("per-rank checkpoint reads and memory (CPU, reference backend: FP8 weights dequantized to bf16)", rows,
                ["tp=ep", "rank", "read_GiB", "checkpoint_GiB", "weights_GiB", "host_peak_rss_GiB"])
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"config": raw, "rows": rows}, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
