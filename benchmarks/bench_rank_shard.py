"""One rank of a multi-rank layout on one device: the rank's shard of the model built by the engine as that rank would
build it (random weights, `--load-format dummy`), its memory, and the time of its steps — with the collectives stood
in (no communication), so the step times are the rank's own compute, a lower bound for the real multi-GPU run.

    python benchmarks/bench_rank_shard.py [--tp 8] [--rank 0] [--layers 61] [--concurrency 1,8] \
        [--input 4096] [--output 64] [--mla-keys-major] [--out benchmarks/results/rank_shard.json]

Model: the official DeepSeek-V3.2 config (`core.config.deepseek_v32_config`, FP8-block weights) with --layers
decoder layers; fp8 KV cache; graphs and overlap on; --mem-fraction-static of the device as `dsv32 serve` would.
Stand-ins: all-reduce returns the rank's own partial, all-gather repeats it, reduce-scatter keeps the first slice —
right shapes and the same kernels per rank, wrong values (random weights make the values meaningless anyway). Only
TP layouts (attention and experts split over all ranks): expert-parallel all-to-all needs the other ranks' routing.
Per concurrency: `concurrency` requests of `input` random tokens, `output` tokens each (ignore_eos); prefill =
until every request has its first token; step = the decode steps' mean wall time (the rank's ITL without the
collectives); tok/s = concurrency / step.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import ceilings, header, print_table, write_json  # noqa: E402

from dsv32.core.communicator import Communicator, ProcessGroups  # noqa: E402


class StandIn(Communicator):
    """A group of `size` ranks, this one first, whose collectives return tensors of the right shape without
    communicating (see the module docstring)."""

    def __init__(self, size: int):
        super().__init__(tuple(range(size)), None, 0)

    def all_reduce(self, x):
        return x

    def all_gather(self, x, dim=0):
        return x if self.size == 1 else torch.cat([x] * self.size, dim=dim)

    def reduce_scatter(self, x):
        return x[:x.shape[0] // self.size]

    def all_to_all(self, x, send_counts, recv_counts):
        raise NotImplementedError("expert-parallel all-to-all needs the other ranks (run a TP layout)")

    def broadcast(self, x, src=0):
        return x


class StandInGroups(ProcessGroups):
    """Every other rank answers what this one says (identical schedulers, as in the real run)."""

    def all_gather_objects(self, obj):
        return [obj] * self.layout.world_size

    def all_gather_ints(self, values):
        return [list(values)] * self.layout.world_size


def stand_in_groups(parallel, rank: int) -> ProcessGroups:
    layout = parallel.layout(rank)
    return StandInGroups(layout, StandIn(layout.world_size), StandIn(layout.attn_tp_size))


def run(args) -> dict:
    from dsv32.core.config import CacheConfig, EngineConfig, SchedulerConfig, deepseek_v32_config
    from dsv32.core.engine.build import build_engine_core
    from dsv32.core.engine.memory import plan_memory
    from dsv32.core.parallel import ParallelConfig
    from dsv32.core.sampling import SamplingParams

    path = tempfile.mkdtemp(prefix="dsv32-shard-")
    overrides = json.loads(args.config_overrides)
    if args.layers:
        overrides["num_hidden_layers"] = args.layers
    cfg = deepseek_v32_config(**overrides)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    concs = [int(c) for c in args.concurrency.split(",")]
    parallel = ParallelConfig(tp_size=args.tp)
    config = EngineConfig(
        model=path, load_format="dummy", device=args.device,
        cache=CacheConfig(kv_cache_dtype=args.kv_cache_dtype, mem_fraction_static=args.mem_fraction_static or None),
        scheduler=SchedulerConfig(max_model_len=args.input + args.output + 64, max_running_requests=max(concs),
                                  graph_max_bs=max(concs) if args.device != "cpu" else None),
        parallel=parallel)
    keys_major = getattr(args, "mla_keys_major", False)
    if keys_major:  # the Triton sparse-MLA kernel's keys-major form (attention.py), in every step and graph
        from dsv32.backends.triton.ops import TritonOps

        TritonOps.mla_tiles = lambda self, fp8_cache: dict(block_h=16, block_k=64, num_warps=4, keys_major=True)
    t0 = time.perf_counter()
    core = build_engine_core(config, groups=stand_in_groups(parallel, args.rank))
    startup = time.perf_counter() - t0
    if keys_major:
        ops = core.engine.ops
        flashmla = getattr(ops, "_flashmla_auto", None)
        if not isinstance(ops, TritonOps) or flashmla:
            raise SystemExit(f"--mla-keys-major: sparse MLA here does not run the Triton kernel ({type(ops).__name__}"
                             f"{', FlashMLA' if flashmla else ''})")
    gib = 1024 ** 3
    mem = {k: (round(v / gib, 2) if isinstance(v, int) and k != "max_tokens" else v) for k, v in core.memory.items()}
    print(f"rank {args.rank} of TP {args.tp}: built in {startup:.1f} s; memory {mem}", flush=True)
    eng = core.engine
    rng = random.Random(0)
    rows = []
    for conc in concs:
        reqs = [eng.add_request([rng.randrange(3, min(120000, cfg["vocab_size"])) for _ in range(args.input)],
                                SamplingParams(max_tokens=args.output, temperature=0, ignore_eos=True))
                for _ in range(conc)]
        t0 = time.perf_counter()
        t_first, marks = None, []
        while eng.has_work():
            eng.step()
            now = time.perf_counter()
            if t_first is None and all(r.output_ids for r in reqs):
                t_first = now
            if t_first is not None:
                marks.append((now, sum(len(r.output_ids) for r in reqs)))
        if args.device != "cpu":
            torch.cuda.synchronize()
        total = time.perf_counter() - t0
        (a, na), (b, nb) = marks[0], marks[-1]
        steps = (nb - na) / conc
        step_ms = (b - a) / max(steps, 1) * 1e3
        row = {"tp": args.tp, "rank": args.rank, "layers": cfg["num_hidden_layers"], "concurrency": conc,
               "input": args.input, "output": args.output, "prefill_s": round(t_first - t0, 3),
               "step_ms": round(step_ms, 3), "tok_s": round(conc / step_ms * 1e3, 1), "total_s": round(total, 2)}
        rows.append(row)
        print(row, flush=True)
    plan = plan_memory(config, core.model_config, 0, args.rank)
    return {"startup_s": round(startup, 1), "memory_gib": mem, "memory_bytes": dict(core.memory), "plan": plan,
            "planned_weights_gib": round(plan.weights / gib, 2), "rows": rows,
            "graphs": sorted({k.batch_size for k in core.runner.graphs})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the config's 61)")
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--input", type=int, default=4096)
    p.add_argument("--output", type=int, default=64)
    p.add_argument("--kv-cache-dtype", default="fp8_e4m3")
    p.add_argument("--mem-fraction-static", type=float, default=0.85)
    p.add_argument("--device", default="cuda")
    p.add_argument("--config-overrides", default="{}", help="JSON merged into the config (tests: a tiny model)")
    p.add_argument("--mla-keys-major", action="store_true",
                   help="run the Triton sparse-MLA kernel in its keys-major form (16 heads, 64 keys per block)")
    p.add_argument("--out", default="benchmarks/results/rank_shard.json")
    args = p.parse_args()
    res = run(args)
    payload = {**(header(ceilings()) if args.device != "cpu" else {}), "command": " ".join(sys.argv)}
    print_table(f"rank {args.rank} of TP {args.tp}, collectives stood in (the rank's compute only)", res["rows"],
                ["concurrency", "input", "output", "prefill_s", "step_ms", "tok_s"])
    res.pop("plan")
    write_json(args.out, {**payload, "args": vars(args), **res})


if __name__ == "__main__":
    main()
