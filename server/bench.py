"""`dsv32 bench serve`: a load generator for a running server, like `sglang.bench_serving`.

Datasets: random (token-id prompts with lengths uniform in [max(⌊L·r⌋, 1), L], r = --random-range-ratio, SGLang's
meaning: r = 1 gives fixed lengths) or a ShareGPT-format JSON file (first human turn as prompt, the reply's
length as output length; needs the tokenizer). Requests stream (greedy, ignore_eos) to the --backend's endpoint
(sglang: /generate; sglang-oai / vllm: /v1/completions; sglang-oai-chat / vllm-chat: /v1/chat/completions) at
--request-rate (Poisson; inf = all at once) under --max-concurrency, after --warmup-requests and an optional
--flush-cache. Prints sglang.bench_serving's "Serving Benchmark Result" block, row for row, and appends its JSON
result (the same keys) as one line to --output-file, so scripts written for SGLang's benchmark read both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
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
    p.add_argument("--backend", default="sglang-oai", choices=sorted(BACKENDS),
                   help="endpoint, as sglang.bench_serving's backends: sglang = /generate, sglang-oai / vllm = "
                        "/v1/completions, sglang-oai-chat / vllm-chat = /v1/chat/completions")
    p.add_argument("--flush-cache", action="store_true", help="empty the server's prefix cache before the run")
    p.add_argument("--warmup-requests", type=int, default=1, help="requests sent (and not counted) before the run")
    p.add_argument("--tag", default=None, help="a label stored in the JSON result")


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
    start_s: float = 0.0  # perf_counter at send
    text: str = ""  # the generated text


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


# --backend: which endpoint the requests go to, as sglang.bench_serving's backends
BACKENDS = {"sglang": "/generate", "sglang-native": "/generate", "sglang-oai": "/v1/completions",
            "vllm": "/v1/completions", "openai": "/v1/completions", "sglang-oai-chat": "/v1/chat/completions",
            "vllm-chat": "/v1/chat/completions", "openai-chat": "/v1/chat/completions"}


def _request_body(backend: str, model: str, item: Item, text: str | None) -> dict:
    """The streaming request of one item for a backend (greedy, ignore_eos, exactly output_len tokens)."""
    path = BACKENDS[backend]
    if path == "/generate":
        prompt = {"text": item.prompt} if isinstance(item.prompt, str) else {"input_ids": item.prompt}
        return {**prompt, "stream": True, "sampling_params": {"max_new_tokens": item.output_len, "temperature": 0.0,
                                                              "ignore_eos": True}}
    common = {"model": model, "max_tokens": item.output_len, "temperature": 0.0, "ignore_eos": True, "stream": True,
              "stream_options": {"include_usage": True}}
    if path == "/v1/chat/completions":
        return {**common, "messages": [{"role": "user", "content": text}]}
    return {**common, "prompt": item.prompt}


async def _one(client, base_url: str, headers: dict, backend: str, model: str, item: Item,
               text: str | None = None) -> RequestResult:
    """One streamed request: TTFT, the gaps between chunks that carry text, its output tokens (from usage or
    meta_info) and the generated text."""
    res = RequestResult(input_len=item.input_len)
    path = BACKENDS[backend]
    body = _request_body(backend, model, item, text)
    res.start_s = t0 = time.perf_counter()
    last, pieces = None, []
    try:
        async with client.stream("POST", base_url + path, json=body, headers=headers) as r:
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
                if path == "/generate":  # cumulative text and counts per chunk
                    res.output_len = chunk["meta_info"]["completion_tokens"]
                    new = chunk["text"][len("".join(pieces)):]
                    got = bool(chunk.get("output_ids")) or bool(new)
                else:
                    if chunk.get("usage"):
                        res.output_len = chunk["usage"]["completion_tokens"]
                    choice = (chunk.get("choices") or [None])[0]
                    new = "" if choice is None else choice.get("text") or (choice.get("delta") or {}).get("content") \
                        or (choice.get("delta") or {}).get("reasoning_content") or ""
                    got = choice is not None and (bool(new) or choice.get("logprobs") is not None)
                if got:
                    pieces.append(new)
                    now = time.perf_counter()
                    if last is None:
                        res.ttft_s = now - t0
                    else:
                        res.itl_s.append(now - last)
                    last = now
        res.latency_s = time.perf_counter() - t0
        res.text = "".join(pieces)
        res.ok = last is not None
    except Exception as e:  # a failed request is counted, never fatal
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run_benchmark(base_url: str, model: str, items: list[Item], request_rate: float,
                        max_concurrency: int | None, api_key: str | None, seed: int, progress: bool,
                        backend: str = "sglang-oai", texts: list[str] | None = None) -> tuple[list, float]:
    """Runs the items against the server; returns (results, duration in s)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sem = asyncio.Semaphore(max_concurrency or len(items))
    rng = random.Random(seed)
    done = 0

    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=httpx.Limits(max_connections=None)) as client:
        async def guarded(item, text):
            nonlocal done
            async with sem:
                r = await _one(client, base_url, headers, backend, model, item, text)
            done += 1
            if progress:
                print(f"\r[bench] {done}/{len(items)} requests", end="", file=sys.stderr, flush=True)
            return r

        t0 = time.perf_counter()
        tasks = []
        for k, item in enumerate(items):
            tasks.append(asyncio.create_task(guarded(item, texts[k] if texts else None)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    if progress:
        print(file=sys.stderr)
    return results, duration


def _peaks(ok: list[RequestResult]) -> tuple[float, int]:
    """sglang.bench_serving's peaks over 1-second buckets from the first request's start: the most output chunks
    received in one second, and the most requests in flight during one second."""
    if not ok:
        return 0.0, 0
    start = min(r.start_s for r in ok)
    seconds = int(math.ceil(max(r.start_s + r.latency_s for r in ok) - start)) + 1
    tokens, inflight = [0] * seconds, [0] * seconds
    for r in ok:
        t = r.start_s + r.ttft_s
        times = [t]
        for gap in r.itl_s:
            t += gap
            times.append(t)
        for t in times:
            b = int(t - start)
            if 0 <= b < seconds:
                tokens[b] += 1
        for b in range(int(r.start_s - start), min(int(r.start_s + r.latency_s - start) + 1, seconds)):
            inflight[b] += 1
    return float(max(tokens)), max(inflight)


def summarize(results: list[RequestResult], duration: float, request_rate: float, max_concurrency,
              retokenize=None) -> dict:
    """sglang.bench_serving's metrics under its JSON keys (plus failed / errors): mean, median, std, p90, p95,
    p99 of E2E latency, TTFT, TPOT = (latency − TTFT) / (output tokens − 1) and ITL; `retokenize(text)` counts
    the generated text's tokens again (else the server's counts are used)."""
    import numpy as np

    ok = [r for r in results if r.ok]
    inp = sum(r.input_len for r in ok)
    out = sum(r.output_len for r in ok)
    retok = sum(len(retokenize(r.text)) if retokenize else r.output_len for r in ok)
    tpot = [(r.latency_s - r.ttft_s) / (r.output_len - 1) for r in ok if r.output_len > 1]
    itl = [g for r in ok for g in r.itl_s]
    peak_tokens, peak_requests = _peaks(ok)
    m = {
        "request_rate": request_rate, "max_concurrency": max_concurrency, "duration": duration,
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "total_input_tokens": inp, "total_input_text_tokens": inp, "total_input_vision_tokens": 0,
        "total_output_tokens": out, "total_output_tokens_retokenized": retok,
        "request_throughput": len(ok) / duration, "input_throughput": inp / duration,
        "output_throughput": out / duration, "total_throughput": (inp + out) / duration,
    }
    for key, xs in (("e2e_latency", [r.latency_s for r in ok]), ("ttft", [r.ttft_s for r in ok]), ("tpot", tpot),
                    ("itl", itl)):
        a = np.asarray(xs or [0.0]) * 1000
        m.update({f"mean_{key}_ms": float(a.mean()), f"median_{key}_ms": float(np.median(a)),
                  f"std_{key}_ms": float(a.std()), f"p90_{key}_ms": float(np.percentile(a, 90)),
                  f"p95_{key}_ms": float(np.percentile(a, 95)), f"p99_{key}_ms": float(np.percentile(a, 99))})
    m.update({"max_itl_ms": max(itl or [0.0]) * 1000, "concurrency": sum(r.latency_s for r in ok) / duration,
              "accept_length": None, "max_output_tokens_per_s": peak_tokens, "max_concurrent_requests": peak_requests})
    return m


def format_result(m: dict, backend: str = "sglang-oai") -> str:
    """sglang.bench_serving's result block, row for row (labels padded to 40, values left-aligned in 10)."""
    lines = ["", "{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]

    def row(label, value, fmt="{:<40} {:<10}"):
        lines.append(fmt.format(label, value))

    def num(label, value):
        row(label, value, "{:<40} {:<10.2f}")

    row("Backend:", backend)
    row("Traffic request rate:", m["request_rate"])
    row("Max request concurrency:", m["max_concurrency"] if m["max_concurrency"] else "not set")
    row("Successful requests:", m["completed"])
    num("Benchmark duration (s):", m["duration"])
    row("Total input tokens:", m["total_input_tokens"])
    row("Total input text tokens:", m["total_input_text_tokens"])
    row("Total generated tokens:", m["total_output_tokens"])
    row("Total generated tokens (retokenized):", m["total_output_tokens_retokenized"])
    num("Request throughput (req/s):", m["request_throughput"])
    num("Input token throughput (tok/s):", m["input_throughput"])
    num("Output token throughput (tok/s):", m["output_throughput"])
    num("Peak output token throughput (tok/s):", m["max_output_tokens_per_s"])
    row("Peak concurrent requests:", m["max_concurrent_requests"])
    num("Total token throughput (tok/s):", m["total_throughput"])
    num("Concurrency:", m["concurrency"])
    if m.get("accept_length"):
        num("Accept length:", m["accept_length"])
    for title, key, short in (("End-to-End Latency", "e2e_latency", "E2E Latency"), ("Time to First Token", "ttft", "TTFT"),
                              ("Time per Output Token (excl. 1st token)", "tpot", "TPOT"),
                              ("Inter-Token Latency", "itl", "ITL")):
        lines.append("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        for stat, name in (("mean", "Mean"), ("median", "Median"), ("p90", "P90"), ("p95", "P95"), ("p99", "P99")):
            num(f"{name} {short} (ms):", m[f"{stat}_{key}_ms"])
    num("Max ITL (ms):", m["max_itl_ms"])
    lines.append("=" * 50)
    return "\n".join(lines)


def bench_serve(args: argparse.Namespace) -> int:
    import httpx

    base = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        info = httpx.get(base + "/model_info", headers=headers, timeout=30).json()
        model = args.model or httpx.get(base + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    except Exception as e:
        print(f"error: cannot reach the server at {base}: {e}", file=sys.stderr)
        return 2
    tokenizer = None
    tok_dir = args.tokenizer or info.get("tokenizer_path") or info.get("model_path")
    if tok_dir and os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    chat = BACKENDS[args.backend] == "/v1/chat/completions"
    if args.dataset_name == "random":
        items = random_dataset(args.num_prompts, args.random_input_len, args.random_output_len,
                               args.random_range_ratio, info["vocab_size"], args.seed)
    else:
        if not args.dataset_path:
            print("error: --dataset-name sharegpt needs --dataset-path FILE.json", file=sys.stderr)
            return 2
        if tokenizer is None:
            print("error: ShareGPT needs a tokenizer: --tokenizer DIR (with tokenizer.json)", file=sys.stderr)
            return 2
        items = sharegpt_dataset(args.dataset_path, args.num_prompts, tokenizer, args.sharegpt_output_len, args.seed)
    if chat and tokenizer is None:
        print("error: a chat backend sends text: --tokenizer DIR (with tokenizer.json) to decode the prompts",
              file=sys.stderr)
        return 2
    texts = [it.prompt if isinstance(it.prompt, str) else tokenizer.decode(it.prompt) for it in items] if chat else None
    too_long = [it for it in items if it.input_len + it.output_len > info["max_model_len"]]
    if too_long:
        print(f"error: {len(too_long)} requests exceed the server's context of {info['max_model_len']} tokens; "
              "lower --random-input-len/--random-output-len", file=sys.stderr)
        return 2
    if args.warmup_requests > 0:
        warm = [Item(items[0].prompt, items[0].input_len, min(items[0].output_len, 16))] * args.warmup_requests
        results, _ = asyncio.run(run_benchmark(base, model, warm, float("inf"), None, args.api_key, args.seed, False,
                                               args.backend, texts[:1] * len(warm) if texts else None))
        if not any(r.ok for r in results):
            print(f"error: the warm-up request failed: {results[0].error}", file=sys.stderr)
            return 1
    if args.flush_cache:
        r = httpx.post(base + "/flush_cache", headers=headers, params={"timeout": 60}, timeout=90)
        if r.status_code != 200:
            print(f"error: /flush_cache answered {r.status_code}: {r.text.strip()}", file=sys.stderr)
            return 1
    results, duration = asyncio.run(run_benchmark(base, model, items, args.request_rate, args.max_concurrency,
                                                  args.api_key, args.seed, not args.disable_tqdm, args.backend, texts))
    retokenize = (lambda t: tokenizer.encode(t, add_special_tokens=False).ids) if tokenizer is not None else None
    m = summarize(results, duration, args.request_rate, args.max_concurrency, retokenize)
    try:
        server_info = httpx.get(base + "/server_info", headers=headers, timeout=30).json()
    except Exception:  # noqa: BLE001 - the result stands without it
        server_info = None
    if server_info and server_info.get("internal_states"):
        m["accept_length"] = server_info["internal_states"][0].get("avg_spec_accept_length")
    if m["failed"]:
        print(f"[bench] {m['failed']} requests failed: {'; '.join(m['errors'])}", file=sys.stderr)
    print(format_result(m, args.backend))
    result = {"tag": args.tag, "backend": args.backend, "dataset_name": args.dataset_name,
              "request_rate": args.request_rate, "max_concurrency": args.max_concurrency,
              "sharegpt_output_len": args.sharegpt_output_len, "random_input_len": args.random_input_len,
              "random_output_len": args.random_output_len, "random_range_ratio": args.random_range_ratio,
              "server_info": server_info, **m, "model": model, "num_prompts": len(items)}
    if args.output_file:
        with open(args.output_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")
    return 0 if m["completed"] else 1
