"""Fuzz and storm a live `dsv32 serve` (demo model, CPU): well-formed greedy requests of every endpoint and mode run
concurrently with poison requests (malformed JSON, wrong types, out-of-range and non-finite numbers, huge integers,
lone surrogates, deep nesting, out-of-vocabulary ids, oversized bodies, unknown routes and methods) and with
clients that hang up mid-stream or mid-wait, in a KV pool small enough to preempt. Asserted: every well-formed
request gets exactly its full quiet-run output; every poison gets a 4xx in the one error shape (never a 5xx); /health
answers within 1 s throughout; afterwards nothing runs and no KV page is held; and over 500+ requests the HTTP and
engine processes' memory stays flat.

The CI run is the fast subset; DSV32_SOAK=1 runs a longer soak (more rounds, more requests).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import random
import threading
import time

import httpx
import pytest
from _live import Server

SOAK = os.environ.get("DSV32_SOAK", "") not in ("", "0")
GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from dsv32.core.demo import make_demo_checkpoint

    model = make_demo_checkpoint(str(tmp_path_factory.mktemp("demo")))
    s = Server(model, "--enable-metrics", "--page-size", "8", "--num-kv-pages", "80", "--context-length", "512",
               "--tool-call-parser", "deepseekv32", "--reasoning-parser", "deepseek-v3",
               "--max-running-requests", "24")
    yield s
    s.stop()


# ---- well-formed requests, with their quiet-run answers ------------------------------------------------------------
def good_requests(rng: random.Random, n: int) -> list[tuple[str, dict]]:
    out = []
    for _ in range(n):
        ids = [rng.randrange(16, 500) for _ in range(rng.randint(3, 120))]
        k = rng.randint(2, 40)
        kind = rng.choice(["cmpl", "cmpl-stream", "chat", "chat-stream", "gen", "gen-stream"])
        if kind.startswith("cmpl"):
            out.append((kind, {"prompt": ids, "max_tokens": k, **GREEDY}))
        elif kind.startswith("chat"):
            text = " ".join(rng.choice(["weather", "Paris", "hello", "why", "sparse", "tokens"]) for _ in ids[:12])
            out.append((kind, {"messages": [{"role": "user", "content": text}], "max_tokens": k, **GREEDY}))
        else:
            out.append((kind, {"input_ids": ids, "sampling_params": {"max_new_tokens": k, **GREEDY}}))
    return out


def run_good(s: Server, kind: str, body: dict):
    """The request's full output (text and token count) as the client sees it."""
    path = {"cmpl": "/v1/completions", "chat": "/v1/chat/completions", "gen": "/generate"}[kind.split("-")[0]]
    stream = kind.endswith("stream")
    with httpx.Client(timeout=300) as c:
        if not stream:
            r = c.post(s.url + path, json=body)
            assert r.status_code == 200, (kind, r.status_code, r.text[:300])
            j = r.json()
            if kind == "gen":
                return j["text"], len(j["output_ids"])
            choice = j["choices"][0]
            text = choice["text"] if kind == "cmpl" else (choice["message"]["content"] or "") + \
                (choice["message"].get("reasoning_content") or "")
            return text, j["usage"]["completion_tokens"]
        with c.stream("POST", s.url + path, json={**body, "stream": True}) as r:
            assert r.status_code == 200, (kind, r.status_code)
            events = [json.loads(line[6:]) for line in r.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        assert not any("error" in e for e in events), events[-1]
        if kind == "gen-stream":
            return events[-1]["text"], len(events[-1]["output_ids"])
        if kind == "cmpl-stream":
            return "".join(e["choices"][0]["text"] for e in events if e["choices"]), None
        return "".join((e["choices"][0]["delta"].get("content") or "") + (e["choices"][0]["delta"].get(
            "reasoning_content") or "") for e in events if e["choices"]), None


# ---- poison ----------------------------------------------------------------------------------------------------------
def poison_requests(rng: random.Random, n: int) -> list[tuple[str, str, bytes | str]]:
    """(method, path, raw body) of requests that must be refused with a 4xx."""
    fields = {  # field → values that are wrong for it
        "temperature": ["NaN", "Infinity", "-1", "3", '"hot"', "true", "1e400"],
        "top_p": ["0", "NaN", "-Infinity", "2", '"x"'],
        "top_k": ["-2", "1.5", '"k"'],
        "max_tokens": ["0", "-5", "99999", "1.5", '"many"', "9" * 5000],
        "seed": ["1180591620717411303424", "-18446744073709551616", "1.5"],
        "n": ["0", "129", '"two"'],
        "stop": ["5", "[1]", '[""]', '["a","b","c","d","e","f","g","h","i","j","k","l","m","n","o","p","q"]'],
        "stop_token_ids": ["[512]", "[-1]", '["a"]', "7"],
        "min_tokens": ["-1", "9999"],
        "logit_bias": ['{"600": 1}', '{"5": 101}', '{"x": 1}', "[1]", '{"5": NaN}'],
        "presence_penalty": ["3", "NaN"], "frequency_penalty": ["-3"], "repetition_penalty": ["0", "5"],
        "logprobs": ["21", "-1", '"y"'], "stream_options": ['"x"', "[1]"], "rid": ["[1]", '""', "{}"],
        "stream": ['"yes"', "1"],
    }
    completion_only = {"suffix": ['"s"'], "best_of": ["4"], "echo": ['"x"', "5"]}  # chat ignores them, as OpenAI
    shapes = [
        ("/v1/completions", '{"prompt": [20, 30, 40], "max_tokens": 4, "stream": %s, "%s": %s}'),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, '
                                 '"stream": %s, "%s": %s}'),
    ]
    raw = [
        ("POST", "/v1/completions", "{"), ("POST", "/v1/completions", "[1, 2]"), ("POST", "/v1/completions", '"x"'),
        ("POST", "/v1/completions", b"\xff\xfe{}"), ("POST", "/v1/completions", "[" * 3000 + "]" * 3000),
        ("POST", "/v1/completions", '{"prompt": [%s]}' % ("9" * 5000)),
        ("POST", "/v1/completions", '{"prompt": [1, 600]}'), ("POST", "/v1/completions", '{"prompt": []}'),
        ("POST", "/v1/completions", '{"prompt": "a\\ud800b"}'), ("POST", "/v1/completions", '{"prompt": null}'),
        ("POST", "/v1/completions", '{"prompt": [1, 2], "model": "gpt-4"}'),
        ("POST", "/v1/chat/completions", '{"messages": []}'), ("POST", "/v1/chat/completions", '{"messages": "hi"}'),
        ("POST", "/v1/chat/completions", '{"messages": [{"role": "wizard", "content": "hi"}]}'),
        ("POST", "/v1/chat/completions", '{"messages": [{"role": "user", "content": 5}]}'),
        ("POST", "/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "tools": 5}'),
        ("POST", "/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "tool_choice": "all"}'),
        ("POST", "/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], '
                                         '"response_format": {"type": "json_schema", "json_schema": {"schema": '
                                         '{"type": "objec"}}}}'),
        ("POST", "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "w " * 400_000}]})),
        ("POST", "/generate", '{"input_ids": [20, 30], "sampling_params": {"regex": "([a-"}}'),
        ("POST", "/generate", '{"input_ids": [20, 600], "stream": true}'), ("POST", "/generate", '{"text": 5}'),
        ("POST", "/generate", '{"input_ids": [20], "return_logprob": "yes"}'),
        ("POST", "/generate", '{"input_ids": [20], "top_logprobs_num": 99}'),
        ("POST", "/detokenize", '{"tokens": [8589934592]}'), ("POST", "/detokenize", '{"tokens": "x"}'),
        ("POST", "/tokenize", '{"prompt": 5}'), ("GET", "/v1/completions", ""), ("DELETE", "/v1/models", ""),
        ("GET", "/no/such/path", ""), ("POST", "/v1/embeddings", "{}"),
    ]
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            out.append(rng.choice(raw))
        else:
            path, shape = rng.choice(shapes)
            usable = {**fields, **(completion_only if path == "/v1/completions" else {})}
            name = rng.choice(sorted(usable))
            out.append(("POST", path, shape % (rng.choice(["true", "false"]), name, rng.choice(usable[name]))))
    return out


def run_poison(s: Server, method: str, path: str, body) -> int:
    with httpx.Client(timeout=120) as c:
        r = c.request(method, s.url + path, content=body if body else None,
                      headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, (method, path, str(body)[:200], r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == r.status_code, err
    assert "Traceback" not in err["message"]
    return r.status_code


def hang_up(s: Server, rng: random.Random, body: dict) -> None:
    """A client that leaves: mid-stream after a few chunks, or before a non-streaming answer."""
    try:
        if rng.random() < 0.6:
            with httpx.Client(timeout=60) as c, c.stream("POST", s.url + "/v1/completions",
                                                           json={**body, "stream": True}) as r:
                lines = r.iter_lines()
                for _ in range(rng.randint(1, 6)):
                    next(lines, None)
        else:
            httpx.post(s.url + "/v1/completions", json=body, timeout=rng.uniform(0.05, 0.5))
    except httpx.TimeoutException:
        pass


def storm(s: Server, seed: int, n_good: int, n_poison: int, n_hangups: int, workers: int = 16) -> None:
    rng = random.Random(seed)
    good = good_requests(rng, n_good)
    quiet = [run_good(s, kind, body) for kind, body in good]  # one at a time: the reference
    poison = poison_requests(rng, n_poison)
    hangups = [{"prompt": [rng.randrange(16, 500) for _ in range(20)], "max_tokens": 300, **GREEDY}
               for _ in range(n_hangups)]
    slow, stop = [], threading.Event()

    def probe():
        while not stop.is_set():
            t0 = time.monotonic()
            r = httpx.get(s.url + "/health", timeout=5)
            slow.append((time.monotonic() - t0, r.status_code))
            time.sleep(0.05)

    jobs = [("good", i) for i in range(n_good)] + [("poison", i) for i in range(n_poison)] + \
        [("hangup", i) for i in range(n_hangups)]
    rng.shuffle(jobs)
    prober = threading.Thread(target=probe)
    prober.start()
    try:
        with cf.ThreadPoolExecutor(workers) as ex:
            futures = {}
            for kind, i in jobs:
                if kind == "good":
                    futures[ex.submit(run_good, s, *good[i])] = ("good", i)
                elif kind == "poison":
                    futures[ex.submit(run_poison, s, *poison[i])] = ("poison", i)
                else:
                    futures[ex.submit(hang_up, s, random.Random(seed * 1000 + i), hangups[i])] = ("hangup", i)
            for f in cf.as_completed(futures):
                kind, i = futures[f]
                result = f.result()  # raises the assertion of a failed check
                if kind == "good":
                    text, n = result
                    want_text, want_n = quiet[i]
                    assert text == want_text, (good[i][0], good[i][1], text[:200], want_text[:200])
                    assert n is None or want_n is None or n == want_n
    finally:
        stop.set()
        prober.join()
    assert slow and all(code == 200 for _, code in slow)
    assert max(t for t, _ in slow) < 1.0, max(t for t, _ in slow)
    m = s.drained(30)
    assert m["sglang:num_running_reqs"] == 0 and m["sglang:num_queue_reqs"] == 0
    assert m["sglang:token_usage"] == 0


def test_storm_with_poison_and_hangups(server):
    rounds = 4 if SOAK else 1
    for r in range(rounds):
        storm(server, seed=100 + r, n_good=60 if SOAK else 30, n_poison=400 if SOAK else 120,
              n_hangups=40 if SOAK else 12)
    # Whether the storm preempts depends on timing; this round always does: 6 requests of 100 + 100 tokens need 150
    # pages together, the pool has 80. Preempted (recomputed) requests still answer exactly as alone.
    rng = random.Random(7)
    big = [{"prompt": [rng.randrange(16, 500) for _ in range(100)], "max_tokens": 100, "ignore_eos": True, **GREEDY}
           for _ in range(6)]
    alone = [run_good(server, "cmpl", body) for body in big]
    before = server.metrics()["dsv32_num_preemptions_total"]
    with cf.ThreadPoolExecutor(len(big)) as ex:
        assert list(ex.map(lambda body: run_good(server, "cmpl", body), big)) == alone
    assert server.metrics()["dsv32_num_preemptions_total"] > before


def test_memory_flat_over_many_requests(server):
    """500+ requests (1000 in the soak) of every endpoint, good and bad: after a warm-up the HTTP process and the
    engine process keep their memory."""
    engine_pid = server.pid_of_rank(0)
    rng = random.Random(7)
    bodies = [b for _, _, b in poison_requests(rng, 50)]

    def one(i):
        if i % 3 == 0:
            httpx.post(server.url + "/v1/completions", content=bodies[i % len(bodies)] or "{}", timeout=60,
                       headers={"Content-Type": "application/json"})
        elif i % 3 == 1:
            httpx.post(server.url + "/v1/completions", json={"prompt": [20 + i % 400, 30], "max_tokens": 3},
                       timeout=60)
        else:
            httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 2, "stream": i % 2 == 0})

    n = 1000 if SOAK else 500
    with cf.ThreadPoolExecutor(8) as ex:
        list(ex.map(one, range(100)))  # warm-up
        rss0 = (server.rss_mib(), server.rss_mib(engine_pid))
        list(ex.map(one, range(100, 100 + n)))
    rss1 = (server.rss_mib(), server.rss_mib(engine_pid))
    assert rss1[0] - rss0[0] < 40 and rss1[1] - rss0[1] < 40, (rss0, rss1)
    m = server.drained(30)
    assert m["sglang:num_running_reqs"] == 0 and m["sglang:token_usage"] == 0
