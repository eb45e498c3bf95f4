"""benchmarks/bench_rank_shard.py: one rank's shard of a TP layout, built by the engine with its collectives stood in,
runs requests to the end on the CPU (tiny model) and holds that rank's share of the weights."""

import argparse
import json
import os
import sys

from _tiny import TINY

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import bench_rank_shard  # noqa: E402


def _args(tp):
    cfg = {k: v for k, v in TINY.items() if k != "rope_parameters"}
    cfg["quantization_config"] = None
    return argparse.Namespace(tp=tp, rank=tp - 1, layers=None, concurrency="1,2", input=24, output=5,
                              kv_cache_dtype="auto", mem_fraction_static=0, device="cpu",
                              config_overrides=json.dumps(cfg))


def test_rank_shard_runs_and_holds_its_share():
    one, two = bench_rank_shard.run(_args(1)), bench_rank_shard.run(_args(2))
    for res in (one, two):
        assert [r["concurrency"] for r in res["rows"]] == [1, 2]
        assert all(r["step_ms"] > 0 and r["prefill_s"] > 0 for r in res["rows"])
    # the shard is what the memory plan (computed without building anything) says that rank holds, and less than all
    for tp, res in ((1, one), (2, two)):
        assert res["memory_bytes"]["weights"] == res["plan"].weights
    assert two["memory_bytes"]["weights"] < 0.75 * one["memory_bytes"]["weights"]
