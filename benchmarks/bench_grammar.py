"""What structured output costs per decode step at full DeepSeek-V3.2 width (random FP8-block weights, 1 dense + 3
MoE layers, vocabulary 129,280; the demo tokenizer supplies token texts, so only its 512 ids can match a grammar and
the rest are always masked — the mask work is the full vocabulary's either way).

    python benchmarks/bench_grammar.py [--batch 1,8,32] [--tokens 128] [--out benchmarks/results/grammar.json]

Per batch size B: B requests of `tokens` output tokens each, unconstrained (ignore_eos) and constrained by a regex
that never forces an end (`[a-z ]+`, so the random model keeps going; requests that pick EOS early are counted by
their real lengths). Reported: wall time per decode step (the longest request's tokens), its ratio to the
unconstrained run, and the grammar's host work per step (bitmask fill of every row, measured inside the engine). A
constrained batch also runs without the overlap scheduler's look-ahead (the mask needs the previous token), so the
ratio includes that.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_engine import model_dir  # noqa: E402
from common import print_table, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results/grammar.json")
    args = ap.parse_args()
    from dsv32 import LLM, SamplingParams
    from dsv32.core.demo import make_demo_checkpoint

    tmp = tempfile.mkdtemp()
    path = model_dir(os.path.join(tmp, "model"))
    demo = make_demo_checkpoint(os.path.join(tmp, "demo"))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(demo, f), os.path.join(path, f))
    batches = [int(b) for b in args.batch.split(",")]
    llm = LLM(model=path, load_format="dummy", max_num_seqs=max(batches), max_model_len=1024, kv_cache_memory_gib=8)
    eng = llm.engine
    fill_s = [0.0]
    real_bitmask = None

    def timed_bitmask(matchers):
        t = time.perf_counter()
        out = real_bitmask(matchers)
        fill_s[0] += time.perf_counter() - t
        return out

    rows = []
    for B in batches:
        prompts = [[(17 * i + j) % 500 + 10 for j in range(64)] for i in range(B)]
        result = {"batch": B}
        for name, sp in (("plain", SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)),
                         ("regex", SamplingParams(max_tokens=args.tokens, temperature=0, regex="[a-z ]+"))):
            # warm-up at this batch size: kernels compiled and tuned for its shapes before the timed run
            llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=8, temperature=0,
                                                                                  ignore_eos=True))
            if name == "regex" and real_bitmask is None:
                llm.generate(prompt_token_ids=prompts[:1], sampling_params=sp)  # builds the engine's grammar state
                real_bitmask = eng.grammars.bitmask
                eng.grammars.bitmask = timed_bitmask
            fill_s[0] = 0.0
            torch.cuda.synchronize()
            t = time.perf_counter()
            outs = llm.generate(prompt_token_ids=prompts, sampling_params=sp)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t
            steps = max(len(o.token_ids) for o in outs)
            result[f"{name}_ms_per_step"] = wall / steps * 1e3
            result[f"{name}_tokens"] = sum(len(o.token_ids) for o in outs)
            if name == "regex":
                result["mask_fill_ms_per_step"] = fill_s[0] / steps * 1e3
        result["ratio"] = result["regex_ms_per_step"] / result["plain_ms_per_step"]
        rows.append(result)
    print_table(f"Structured output at full width ({torch.cuda.get_device_name()}, {args.tokens} tokens, wall per "
                "decode step incl. the prompt)", rows,
                ["batch", "plain_ms_per_step", "regex_ms_per_step", "ratio", "mask_fill_ms_per_step", "regex_tokens"])
    write_json(args.out, {"device": torch.cuda.get_device_name(), "tokens": args.tokens, "rows": rows})


if __name__ == "__main__":
    main()
