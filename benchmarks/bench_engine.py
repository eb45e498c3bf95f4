"""Engine benchmarks at full DeepSeek-V3.2 dimensions (random FP8-block weights, 1 dense + 3 MoE layers): offline
throughput with the step overhead outside the device work, and `dsv32 bench serve` against `dsv32 serve`.

    python benchmarks/bench_engine.py [--skip-serve] [--concurrency 1,16,64] [--out benchmarks/results/engine.json]

Workloads: random token prompts, input/output 1024/1024 and 4096/200, ignore_eos, concurrency 1/16/64 (offline:
the engine's max running requests; serving: bench serve's --max-concurrency), 2×concurrency prompts (at least 2).
Step overhead: every launched step is bracketed by CUDA events; over the steps where all running requests decode
at full concurrency, overhead = 1 − (device time of the steps) / (wall time of the steps) — the share of the step
the GPU spends waiting for the host (0 when the host fully hides behind the device).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import header, print_table, write_json  # noqa: E402

WORKLOADS = [(1024, 1024), (4096, 200)]


def model_dir(path: str) -> str:
    from dsv32.core.config import deepseek_v32_config

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(deepseek_v32_config(num_hidden_layers=4, first_k_dense_replace=1), f)
    return path


def offline(path, concs, args):
    from dsv32 import LLM, SamplingParams

    llm = LLM(model=path, load_format="dummy", max_num_seqs=max(concs), max_model_len=5200,
              kv_cache_dtype=args.kv_cache_dtype, kv_cache_memory_gib=args.kv_cache_gib,
              disable_graphs=args.disable_cuda_graph, disable_overlap_schedule=args.disable_overlap_schedule)
    eng = llm.engine
    events = []  # (start, end, number of requests, all decoding)
    launch = eng._launch

    def timed_launch(work):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = launch(work)
        b.record()
        events.append((a, b, len(work), all(n == 1 for _, n in work), time.perf_counter()))
        return out

    eng._launch = timed_launch
    rng = random.Random(0)
    rows = []
    for inp, out in WORKLOADS:
        for conc in concs:
            n = max(2, 2 * conc)
            prompts = [[rng.randrange(3, 120000) for _ in range(inp)] for _ in range(n)]
            eng.cfg = dataclasses.replace(eng.cfg, max_running_requests=conc)
            events.clear()
            t0 = time.perf_counter()
            res = llm.generate(prompt_token_ids=prompts,
                               sampling_params=SamplingParams(max_tokens=out, temperature=0, ignore_eos=True))
            wall = time.perf_counter() - t0
            torch.cuda.synchronize()
            gen = sum(len(r.token_ids) for r in res)
            # consecutive pairs of launches that are both full-concurrency decode steps: the wall time between them is
            # one step (prefill steps of the next wave in between are excluded)
            ok = [dec and k == conc for _, _, k, dec, _ in events]
            steady = [(events[i][0].elapsed_time(events[i][1]), events[i + 1][4] - events[i][4])
                      for i in range(len(events) - 1) if ok[i] and ok[i + 1]]
            row = {"input": inp, "output": out, "concurrency": conc, "prompts": n, "wall_s": round(wall, 2),
                   "output_tok_s": round(gen / wall, 1), "total_tok_s": round((gen + n * inp) / wall, 1)}
            if len(steady) > 10:
                gpu_ms = sum(ms for ms, _ in steady)
                wall_ms = sum(dt for _, dt in steady) * 1e3  # launch to next launch
                row.update({"decode_steps": len(steady), "step_ms": round(wall_ms / len(steady), 3),
                            "gpu_step_ms": round(gpu_ms / len(steady), 3),
                            "overhead": round(max(0.0, 1 - gpu_ms / wall_ms), 3)})
            rows.append(row)
            print(row, flush=True)
    return rows, {"graphs": sorted({key.batch_size for key in llm.runner.graphs}), "overlap": eng.cfg.overlap}


def serve(path, concs, args):
    port = 30123
    cmd = [sys.executable, "-m", "dsv32.server.launch_server", "--model", path, "--load-format", "dummy",
           "--port", str(port), "--max-running-requests", str(max(concs)), "--context-length", "5200",
           "--kv-cache-dtype", args.kv_cache_dtype, "--kv-cache-gib", str(args.kv_cache_gib)]
    server = subprocess.Popen(cmd)
    rows = []
    try:
        import httpx

        t0 = time.time()
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.time() - t0 > 900:
                raise RuntimeError("server did not start")
            time.sleep(2)
        out_file = os.path.join(tempfile.mkdtemp(), "serve.jsonl")
        for inp, out in WORKLOADS:
            for conc in concs:
                subprocess.run([sys.executable, "-m", "dsv32.server.cli", "bench", "serve", "--port", str(port),
                                "--num-prompts", str(max(2, 2 * conc)), "--random-input-len", str(inp),
                                "--random-output-len", str(out), "--random-range-ratio", "1.0", "--max-concurrency",
                                str(conc), "--output-file", out_file, "--disable-tqdm"], check=True)
        with open(out_file) as f:
            for (inp, out), line in zip([(i, o) for i, o in WORKLOADS for _ in concs], f):
                m = json.loads(line)
                rows.append({"input": inp, "output": out, "concurrency": m["max_concurrency"],
                             "completed": m["completed"], "failed": m["failed"],
                             "output_tok_s": round(m["output_throughput"], 1),
                             "total_tok_s": round(m["total_throughput"], 1),
                             "median_ttft_ms": round(m["ttft_ms"]["median"], 1),
                             "median_tpot_ms": round(m["tpot_ms"]["median"], 2),
                             "median_itl_ms": round(m["itl_ms"]["median"], 2), "raw": m})
    finally:
        server.terminate()
        server.wait(60)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--kv-cache-dtype", default="fp8_e4m3")
    p.add_argument("--kv-cache-gib", type=float, default=8.0)
    p.add_argument("--disable-cuda-graph", action="store_true")
    p.add_argument("--disable-overlap-schedule", action="store_true")
    p.add_argument("--skip-serve", action="store_true")
    p.add_argument("--skip-offline", action="store_true")
    p.add_argument("--out", default="benchmarks/results/engine.json")
    args = p.parse_args()
    concs = [int(c) for c in args.concurrency.split(",")]
    path = model_dir(os.path.join(tempfile.gettempdir(), "dsv32_bench_model"))
    payload = {**header({"copy_GBps": 0, "fp8_TFLOPs": 0, "bf16_TFLOPs": 0}), "args": vars(args)}
    if not args.skip_offline:
        rows, info = offline(path, concs, args)
        payload.update({"offline": rows, **info})
        gc.collect()  # the offline engine's weights must be gone before the server loads its own
        print_table("offline (LLM.generate)", rows, ["input", "output", "concurrency", "prompts", "wall_s",
                                                      "output_tok_s", "total_tok_s", "step_ms", "gpu_step_ms",
                                                      "overhead"])
        torch.cuda.empty_cache()
    if not args.skip_serve:
        rows = serve(path, concs, args)
        payload["serve"] = rows
        print_table("dsv32 bench serve (against dsv32 serve)", rows,
                    ["input", "output", "concurrency", "completed", "failed", "output_tok_s", "total_tok_s",
                     "median_ttft_ms", "median_tpot_ms", "median_itl_ms"])
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
