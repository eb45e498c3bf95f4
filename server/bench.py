"""`dsv32 bench serve`: a load generator for a running server, like `sglang.bench_serving`.

Datasets: random (token-id prompts with lengths uniform in [max(⌊L·r⌋, 1), L], r = --random-range-ratio, SGLang's
meaning: r = 1 gives fixed lengths) or a ShareGPT-format JSON file (first human turn as prompt, the reply's
length as output length; needs the tokenizer). Requests stream from /v1/completions with ignore_eos and
include_usage, at --request-rate (Poisson; inf = all at once) under --max-concurrency. Prints the "Serving
Benchmark Result" block and writes JSON (appends one line per run to --output-file).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default=None, help="server URL (default: http://HOST:PORT)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset-name", default="random", choices=["random", "sharegpt"])
    p.add_argument("--dataset-path", default=None, help="ShareGPT-format JSON file (for --dataset-name sharegpt)")
    p.add_argument("--tokenizer", default=None, help="directory with tokenizer.json (default: the served model's)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=1024)
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths uniform in [max(floor(L*r), 1), L]; 1.0 = fixed length (SGLang's meaning)")
    p.add_argument("--sharegpt-output-len", type=int, default=None, help="override ShareGPT output lengths")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s, Poisson (inf: burst)")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--output-file", default=None, help="append the result as one JSON line")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress line")


@dataclass
class Item:
    prompt: list[int] | str
    input_len: int
    output_len: int


@dataclass
class RequestResult:
    ok: bool = False
    input_len: int = 0
    output_len: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""


def random_dataset(n: int, input_len: int, output_len: int, ratio: float, vocab: int, seed: int) -> list[Item]:
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        il = rng.randint(max(int(input_len * ratio), 1), input_len)
        ol = rng.randint(max(int(output_len * ratio), 1), output_len)
        items.append(Item([rng.randrange(16, vocab) for _ in range(il)], il, ol))
    return items


def sharegpt_dataset(path: str, n: int, tokenizer, output_len: int | None, seed: int) -> list[Item]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    pairs = []
    for conv in data:
        turns = conv.get("conversations") or conv.get("conversation") or []
        if len(turns) >= 2:
            pairs.append((turns[0].get("value", ""), turns[1].get("value", "")))
    random.Random(seed).shuffle(pairs)
    items = []
    for prompt, reply in pairs:
        il = len(tokenizer.encode(prompt, add_special_tokens=False).ids)
        ol = output_len or len(tokenizer.encode(reply, add_special_tokens=False).ids)
        if il < 4 or ol < 4:
            continue
        items.append(Item(prompt, il, ol))
        if len(items) == n:
            break
    if not items:
        raise ValueError(f"{path}: no usable conversations (need 'conversations' with ≥ 2 turns)")
    return items


async def _one(client, url: str, headers: dict, model: str, item: Item) -> RequestResult:
    res = RequestResult(input_len=item.input_len)
    body = {"model": model, "prompt": item.prompt, "max_tokens": item.output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = str(chunk["error"])
                    return res
                if chunk.get("usage"):
                    res.output_len = chunk["usage"]["completion_tokens"]
                if chunk.get("choices"):
                    now = time.perf_counter()
                    if last is None:
                        res.ttft_s = now - t0
                    else:
                        res.itl_s.append(now - last)
                    last = now
        res.latency_s = time.perf_counter() - t0
        res.ok = last is not None
    except Exception as e:  # a failed request is counted, never fatal
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run_benchmark(base_url: str, model: str, items: list[Item], request_rate: float,
                        max_concurrency: int | None, api_key: str | None, seed: int, progress: bool) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sem = asyncio.Semaphore(max_concurrency or len(items))
    rng = random.Random(seed)
    done = 0

    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=httpx.Limits(max_connections=None)) as client:
        async def guarded(item):
            nonlocal done
            async with sem:
                r = await _one(client, base_url + "/v1/completions", headers, model, item)
            done += 1
            if progress:
                print(f"\r[bench] {done}/{len(items)} requests", end="", file=sys.stderr, flush=True)
            return r

        t0 = time.perf_counter()
        tasks = []
        for item in items:
            tasks.append(asyncio.create_task(guarded(item)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    if progress:
        print(file=sys.stderr)
    return summarize(results, duration, request_rate, max_concurrency)


def _stats(xs: list[float], scale: float = 1000.0) -> dict:
    if not xs:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0}
    s = sorted(xs)
    return {"mean": statistics.fmean(s) * scale, "median": statistics.median(s) * scale,
            "p99": s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))] * scale}


def summarize(results: list[RequestResult], duration: float, request_rate: float, max_concurrency) -> dict:
    ok = [r for r in results if r.ok]
    inp = sum(r.input_len for r in ok)
    out = sum(r.output_len for r in ok)
    tpot = [(r.latency_s - r.ttft_s) / (r.output_len - 1) for r in ok if r.output_len > 1]
    return {
        "request_rate": request_rate, "max_concurrency": max_concurrency, "duration_s": duration,
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "total_input_tokens": inp, "total_output_tokens": out,
        "request_throughput": len(ok) / duration, "input_throughput": inp / duration,
        "output_throughput": out / duration, "total_throughput": (inp + out) / duration,
        "concurrency": sum(r.latency_s for r in ok) / duration,
        "ttft_ms": _stats([r.ttft_s for r in ok]), "tpot_ms": _stats(tpot),
        "itl_ms": _stats([g for r in ok for g in r.itl_s]), "e2e_latency_ms": _stats([r.latency_s for r in ok]),
    }


def format_result(m: dict) -> str:
    w = 50
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=w, c="=")]
    row = lambda k, v: lines.append(f"{k:<40}{v:>10}")  # noqa: E731
    row("Request rate (req/s):", "inf" if m["request_rate"] == float("inf") else f"{m['request_rate']:.2f}")
    row("Max request concurrency:", str(m["max_concurrency"] or "not set"))
    row("Successful requests:", str(m["completed"]))
    row("Failed requests:", str(m["failed"]))
    row("Benchmark duration (s):", f"{m['duration_s']:.2f}")
    row("Total input tokens:", str(m["total_input_tokens"]))
    row("Total generated tokens:", str(m["total_output_tokens"]))
    row("Request throughput (req/s):", f"{m['request_throughput']:.2f}")
    row("Input token throughput (tok/s):", f"{m['input_throughput']:.2f}")
    row("Output token throughput (tok/s):", f"{m['output_throughput']:.2f}")
    row("Total token throughput (tok/s):", f"{m['total_throughput']:.2f}")
    row("Concurrency:", f"{m['concurrency']:.2f}")
    for title, key in (("End-to-End Latency", "e2e_latency_ms"), ("Time to First Token", "ttft_ms"),
                       ("Time per Output Token (excl. 1st token)", "tpot_ms"), ("Inter-Token Latency", "itl_ms")):
        lines.append("{s:{c}^{n}}".format(s=title, n=w, c="-"))
        short = key.split("_ms")[0].upper().replace("E2E_LATENCY", "E2E Latency")
        for stat in ("mean", "median", "p99"):
            row(f"{stat.capitalize() if stat != 'p99' else 'P99'} {short} (ms):", f"{m[key][stat]:.2f}")
    lines.append("=" * w)
    return "\n".join(lines)


def bench_serve(args: argparse.Namespace) -> int:
    import httpx

    base = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        info = httpx.get(base + "/get_model_info", headers=headers, timeout=30).json()
        model = args.model or httpx.get(base + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    except Exception as e:
        print(f"error: cannot reach the server at {base}: {e}", file=sys.stderr)
        return 2
    if args.dataset_name == "random":
        items = random_dataset(args.num_prompts, args.random_input_len, args.random_output_len,
                               args.random_range_ratio, info["vocab_size"], args.seed)
    else:
        if not args.dataset_path:
            print("error: --dataset-name sharegpt needs --dataset-path FILE.json", file=sys.stderr)
            return 2
        tok_dir = args.tokenizer or info.get("model_path")
        if not tok_dir or not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
            print("error: ShareGPT needs a tokenizer: --tokenizer DIR (with tokenizer.json)", file=sys.stderr)
            return 2
        from tokenizers import Tokenizer

        items = sharegpt_dataset(args.dataset_path, args.num_prompts, Tokenizer.from_file(
            os.path.join(tok_dir, "tokenizer.json")), args.sharegpt_output_len, args.seed)
    too_long = [it for it in items if it.input_len + it.output_len > info["max_model_len"]]
    if too_long:
        print(f"error: {len(too_long)} requests exceed the server's context of {info['max_model_len']} tokens; "
              "lower --random-input-len/--random-output-len", file=sys.stderr)
        return 2
    m = asyncio.run(run_benchmark(base, model, items, args.request_rate, args.max_concurrency, args.api_key,
                                  args.seed, not args.disable_tqdm))
    m.update({"dataset_name": args.dataset_name, "num_prompts": len(items), "model": model,
              "random_input_len": args.random_input_len, "random_output_len": args.random_output_len,
              "random_range_ratio": args.random_range_ratio})
    print(format_result(m))
    if args.output_file:
        with open(args.output_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(m) + "\n")
    return 0 if m["completed"] else 1

