"""SGLang's tooling and API surface against `dsv32 serve` (a real process, the tiny transformers-made model):

- SGLang's own `python -m sglang.bench_serving`, from the newest sglang wheel on PyPI, unchanged, with the
  backends its DeepSeek-V3.2 docs use (sglang, sglang-oai, sglang-oai-chat, vllm) and --flush-cache; its two
  imports from SGLang's server runtime (a URL helper and a constant, which pull in CUDA-only packages) are stood in
  for; everything it sends and reads is its own code;
- `dsv32 bench serve` prints the same block, label for label, and writes the same JSON keys;
- the endpoints SGLang / OpenAI clients call: /v1/models/{id}, /model_info, /server_info, /flush_cache,
  /reset_prefix_cache, /abort_request, batch /generate and /v1/completions, meta_info.finish_reason, logprobs,
  text_offset, echo, matched_stop; Prometheus names as SGLang's; the periodic batch log line.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re
import subprocess
import sys
import textwrap
import time

import httpx
import openai
import pytest
from _live import Server, complete, http, make_served_model, prompts
from _pypi import newest_wheel

BENCH_BACKENDS = ("sglang", "sglang-oai", "sglang-oai-chat", "vllm")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_served_model(tmp_path_factory)


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir[0], "--enable-metrics", "--page-size", "8", "--decode-log-interval", "4")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def sglang_bench(tmp_path_factory):
    """A runner of SGLang's bench_serving from the sglang wheel (its benchmark package only)."""
    for module in ("aiohttp", "msgspec", "orjson", "tqdm", "requests", "pybase64", "PIL"):
        pytest.importorskip(module, reason="sglang.bench_serving's imports (the test extra installs them)")
    root = tmp_path_factory.mktemp("sglang")
    wheel = newest_wheel("sglang")
    wheel.extractall(root, [n for n in wheel.namelist() if n.startswith(("sglang/benchmark/", "sglang/bench_serving"))])
    (root / "sglang" / "__init__.py").write_text("")  # the package's own __init__ starts SGLang's runtime
    runner = root / "run_bench_serving.py"
    runner.write_text(textwrap.dedent(f"""
        import runpy, sys, types
        sys.path.insert(0, {str(root)!r})
        def stub(name, **attrs):
            m = types.ModuleType(name); m.__path__ = []; m.__dict__.update(attrs); sys.modules[name] = m
        for name in ("sglang.srt", "sglang.srt.utils", "sglang.srt.disaggregation"):
            stub(name)
        stub("sglang.srt.disaggregation.utils", FAKE_BOOTSTRAP_HOST="2.2.2.2")
        stub("sglang.srt.utils.network", resolve_base_url=lambda b, h, p: b or f"http://{{h}}:{{p}}",
             resolve_host_port=lambda b, h, p: b or f"{{h}}:{{p}}")
        try:
            import datasets
        except ImportError:  # only its MMMU / LongBench datasets use it
            stub("datasets", load_dataset=None)
        sys.argv = ["bench_serving"] + sys.argv[1:]
        runpy.run_module("sglang.bench_serving", run_name="__main__")
    """))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(runner), *args], capture_output=True, text=True, timeout=600,
                              env=env)
    return run


def _block(text: str) -> list[str]:
    """The result block's lines, from its title to its closing rule."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if "Serving Benchmark Result" in line)
    end = next(i for i in range(start + 1, len(lines)) if lines[i] == "=" * 50)
    return lines[start:end + 1]


def _labels(block: list[str]) -> list[str]:
    return [line[:40].rstrip() if ":" in line else line for line in block]


def test_sglang_bench_serving_runs_unchanged(server, sglang_bench, tmp_path):
    common = ["--port", str(server.port), "--dataset-name", "random-ids", "--random-input-len", "32",
              "--random-output-len", "8", "--random-range-ratio", "1.0", "--num-prompts", "6", "--flush-cache",
              "--warmup-requests", "1", "--max-concurrency", "3"]
    ours_out = tmp_path / "ours.jsonl"
    for backend in BENCH_BACKENDS:
        out = tmp_path / f"{backend}.jsonl"
        r = sglang_bench("--backend", backend, "--output-file", str(out), *common)
        assert r.returncode == 0, (backend, r.stdout[-2000:], r.stderr[-3000:])
        block = _block(r.stdout)
        assert f"Successful requests:{' ' * 21}6" in "\n".join(block), (backend, block)
        theirs = json.loads(out.read_text().splitlines()[-1])
        assert theirs["completed"] == 6 and theirs["total_output_tokens"] == 6 * 8, (backend, theirs)
        assert theirs["server_info"]["status"] == "ready" if "sglang" in backend else True

        # dsv32's own client: the same block (label for label) and the same JSON keys
        mine = subprocess.run([sys.executable, "-m", "dsv32.server.cli", "bench", "serve", "--backend", backend,
                               "--port", str(server.port), "--random-input-len", "32", "--random-output-len", "8",
                               "--random-range-ratio", "1.0", "--num-prompts", "6", "--max-concurrency", "3",
                               "--flush-cache", "--output-file", str(ours_out), "--disable-tqdm"],
                              capture_output=True, text=True, timeout=300)
        assert mine.returncode == 0, mine.stderr
        assert _labels(_block(mine.stdout)) == _labels(block), backend
        ours = json.loads(ours_out.read_text().splitlines()[-1])
        assert set(theirs) <= set(ours), set(theirs) - set(ours)
        assert ours["completed"] == 6 and ours["total_output_tokens"] == 48 and ours["backend"] == backend


def test_model_info_server_info_and_model_card(server, model_dir):
    info = http.get(server.url + "/model_info").json()
    assert info["tokenizer_path"] == model_dir[0] and info["model_path"] == model_dir[0]
    assert info == http.get(server.url + "/get_model_info").json()
    card = server.client.models.retrieve("tiny")
    assert card.id == "tiny" and card.object == "model"
    with pytest.raises(openai.NotFoundError):
        server.client.models.retrieve("gpt-4")
    si = http.get(server.url + "/server_info").json()
    assert si["status"] == "ready" and si["page_size"] == 8 and si["tokenizer_path"] == model_dir[0]
    assert si["max_total_num_tokens"] > 0 and si["max_req_input_len"] == 511 and si["api_key"] is None
    state = si["internal_states"][0]
    assert {"last_gen_throughput", "avg_spec_accept_length"} <= set(state)
    assert http.get(server.url + "/get_server_info").json()["model_path"] == model_dir[0]


def _cached(server, prompt) -> int:
    r = http.post(server.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1, "temperature": 0})
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_flush_cache_empties_the_prefix_cache(server):
    p = prompts(1, seed=91, lo=40, hi=40)[0]
    _cached(server, p)
    assert _cached(server, p) > 0  # a repeat hits the prefix cache
    r = http.post(server.url + "/flush_cache")
    assert r.status_code == 200 and r.text.startswith("Cache flushed")
    assert _cached(server, p) == 0
    assert _cached(server, p) > 0
    assert http.get(server.url + "/flush_cache").status_code == 200  # SGLang takes GET too
    assert http.post(server.url + "/reset_prefix_cache").status_code == 200  # vLLM's name
    assert _cached(server, p) == 0
    # while a request runs: 400 at once, or 200 once it is done when ?timeout= allows the wait
    with cf.ThreadPoolExecutor(1) as pool:
        long = pool.submit(http.post, server.url + "/v1/completions",
                           json={"prompt": p, "max_tokens": 300, "temperature": 0, "ignore_eos": True})
        deadline = time.monotonic() + 60
        while server.metrics()["sglang:num_running_reqs"] == 0 and time.monotonic() < deadline and not long.done():
            time.sleep(0.05)
        busy = http.post(server.url + "/flush_cache")
        waited = http.post(server.url + "/flush_cache", params={"timeout": 120})
        assert long.result().status_code == 200
    assert busy.status_code == 400 and "requests are running" in busy.text
    assert waited.status_code == 200


def test_abort_request_by_rid_and_all(server):
    import threading

    p = prompts(1, seed=5, lo=10, hi=10)[0]
    streaming = {rid: threading.Event() for rid in ("victim", "other-1", "other-2")}

    def stream(rid):
        chunks = []
        with http.stream("POST", server.url + "/generate", json={
                "input_ids": p, "rid": rid, "stream": True,
                "sampling_params": {"max_new_tokens": 500, "temperature": 0, "ignore_eos": True}}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))
                    streaming[rid].set()
        return chunks

    with cf.ThreadPoolExecutor(3) as pool:
        a, b, c = (pool.submit(stream, rid) for rid in streaming)
        assert all(e.wait(120) for e in streaming.values())  # every request is generating
        assert http.post(server.url + "/abort_request", json={"rid": "victim"}).status_code == 200
        victim = a.result(timeout=120)
        assert victim[-1]["meta_info"]["finish_reason"]["type"] == "abort"
        assert victim[-1]["meta_info"]["completion_tokens"] < 500
        assert http.post(server.url + "/abort_request", json={"abort_all": True}).status_code == 200
        for f in (b, c):  # aborted, unless it had already finished (a fast device)
            last = f.result(timeout=120)[-1]["meta_info"]
            assert last["finish_reason"]["type"] == "abort" or last["completion_tokens"] == 500
    assert http.post(server.url + "/abort_request", json={"rid": "gone"}).status_code == 200  # unknown: no error
    r = http.post(server.url + "/abort_request", json={})
    assert r.status_code == 400 and r.json()["error"]["param"] == "rid"


def test_generate_batches_and_meta_info(server):
    ps = prompts(3, seed=17, lo=8, hi=20)
    greedy = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
    single = [http.post(server.url + "/generate", json={"input_ids": p, "sampling_params": greedy}).json()
              for p in ps]
    batch = http.post(server.url + "/generate", json={"input_ids": ps, "sampling_params": greedy}).json()
    assert isinstance(batch, list) and [b["output_ids"] for b in batch] == [s["output_ids"] for s in single]
    assert all(b["meta_info"]["finish_reason"] == {"type": "length", "length": 6} for b in batch)
    texts = ["Hello there", "The weather in Paris"]
    tb = http.post(server.url + "/generate", json={"text": texts, "sampling_params": [greedy, {**greedy, "n": 2}]})
    assert tb.status_code == 200 and len(tb.json()) == 3  # prompt-major: 1 + 2 samples
    one = http.post(server.url + "/generate", json={"text": texts[1], "sampling_params": greedy}).json()
    assert tb.json()[1]["output_ids"] == tb.json()[2]["output_ids"] == one["output_ids"]
    # finish_reason as SGLang's: the matched stop token id, the matched stop string
    tok = single[0]["output_ids"][2]
    r = http.post(server.url + "/generate", json={"input_ids": ps[0], "sampling_params": {
        **greedy, "stop_token_ids": [tok]}}).json()
    assert r["meta_info"]["finish_reason"] == {"type": "stop", "matched": tok}
    full = one["text"]
    if len(full) >= 4:
        stop = full[1:3]
        r = http.post(server.url + "/generate", json={"text": texts[1], "sampling_params": {
            **greedy, "stop": [stop]}}).json()
        assert r["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    # logprobs: [logprob, token id, text] per output token, with the top alternatives
    r = http.post(server.url + "/generate", json={"input_ids": ps[0], "sampling_params": greedy, "return_logprob": True,
                                                  "top_logprobs_num": 2, "return_text_in_logprobs": True}).json()
    lps = r["meta_info"]["output_token_logprobs"]
    assert [t for _, t, _ in lps] == single[0]["output_ids"] and all(v <= 0 and isinstance(s, str) for v, _, s in lps)
    assert all(len(top) == 2 and top[0][0] >= top[1][0] for top in r["meta_info"]["output_top_logprobs"])
    # a batch stream: chunks carry "index", cumulative text per index, then [DONE]
    with http.stream("POST", server.url + "/generate", json={"input_ids": ps[:2], "stream": True,
                                                             "sampling_params": greedy}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    for i in range(2):
        mine = [e for e in events if e["index"] == i]
        assert mine[-1]["output_ids"] == single[i]["output_ids"] and mine[-1]["meta_info"]["finish_reason"]
    for bad in ({"text": ["ok", ""]}, {"input_ids": [[1, 2], []]}, {"input_ids": [[1, 2]], "text": "x"},
                {"input_ids": [[1], [2]], "sampling_params": [greedy]}, {"input_ids": [[1], [2]], "rid": ["a", "a"]}):
        r = http.post(server.url + "/generate", json=bad)
        assert r.status_code == 400 and r.json()["error"]["message"], bad


def test_completions_batch_echo_text_offset(server):
    ps = prompts(2, seed=23, lo=8, hi=16)
    r = server.client.completions.create(model="tiny", prompt=ps, max_tokens=5, n=2, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    singles = [complete(server.client, p, 5).choices[0].text for p in ps]
    assert [c.text for c in r.choices] == [singles[0], singles[0], singles[1], singles[1]]
    assert r.usage.prompt_tokens == sum(len(p) for p in ps) and r.usage.completion_tokens == 20
    texts = ["Hello there", "Tell me a story"]
    r = server.client.completions.create(model="tiny", prompt=texts, max_tokens=4, temperature=0, echo=True,
                                         extra_body={"ignore_eos": True})
    assert [c.text[:len(t)] for c, t in zip(r.choices, texts)] == texts
    # text_offset: where each token starts in the choice's text (after the echoed prompt)
    r = server.client.completions.create(model="tiny", prompt=texts[0], max_tokens=6, temperature=0, logprobs=2,
                                         extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert lp.text_offset[0] == 0 and all(b - a == len(t) for a, b, t in zip(lp.text_offset, lp.text_offset[1:],
                                                                              lp.tokens))
    assert "".join(lp.tokens) == r.choices[0].text or r.choices[0].finish_reason == "length"
    stream = server.client.completions.create(model="tiny", prompt=texts[0], max_tokens=6, temperature=0, logprobs=2,
                                              stream=True, extra_body={"ignore_eos": True})
    offsets = [o for c in stream if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == lp.text_offset
    r = http.post(server.url + "/v1/completions", json={"prompt": texts[0], "max_tokens": 4, "temperature": 0,
                                                        "stop_token_ids": [int(x) for x in range(512)]})
    assert r.json()["choices"][0]["finish_reason"] == "stop" and isinstance(r.json()["choices"][0]["matched_stop"], int)
    r = http.post(server.url + "/v1/completions", json={"prompt": [texts[0], 7], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_prompt_logprobs_echo_and_logprob_start_len(server, model_dir):
    """echo + logprobs (OpenAI): the prompt's tokens first, the first with a null logprob, then the completion's,
    text_offset over both; /generate's logprob_start_len ≥ 0 (SGLang): input_token_logprobs from there. Both equal
    transformers' log-softmax over the prompt."""
    import torch

    p = prompts(1, seed=44, lo=12, hi=12)[0]
    with torch.no_grad():
        ref = torch.log_softmax(model_dir[1](torch.tensor([p])).logits[0].float(), dim=-1)
    want = [ref[i, p[i + 1]].item() for i in range(len(p) - 1)]
    r = server.client.completions.create(model="tiny", prompt=p, max_tokens=3, temperature=0, echo=True, logprobs=1,
                                         extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(p) + 3 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:len(p)], want)) < 1e-3
    assert lp.text_offset[0] == 0 and all(b - a == len(t) for a, b, t in zip(lp.text_offset, lp.text_offset[1:],
                                                                              lp.tokens))
    streamed = [c.choices[0].logprobs for c in server.client.completions.create(
        model="tiny", prompt=p, max_tokens=3, temperature=0, echo=True, logprobs=1, stream=True,
        extra_body={"ignore_eos": True}) if c.choices and c.choices[0].logprobs]
    assert [t for s in streamed for t in s.token_logprobs] == lp.token_logprobs
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset
    g = http.post(server.url + "/generate", json={"input_ids": p, "return_logprob": True, "logprob_start_len": 4,
                                                  "top_logprobs_num": 2, "sampling_params": {"max_new_tokens": 2}})
    meta = g.json()["meta_info"]
    assert [t for _, t, _ in meta["input_token_logprobs"]] == p[4:]
    assert max(abs(v - w) for (v, _, _), w in zip(meta["input_token_logprobs"], want[3:])) < 1e-3
    assert len(meta["input_top_logprobs"]) == len(p) - 4 and len(meta["output_token_logprobs"]) == 2


def test_metrics_have_sglang_names_and_the_batch_log_line(server):
    complete(server.client, prompts(1, seed=3)[0], 12)
    text = http.get(server.url + "/metrics").text
    for name in ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage", "sglang:gen_throughput",
                 "sglang:cache_hit_rate", "sglang:prompt_tokens_total", "sglang:generation_tokens_total",
                 "sglang:num_requests_total", "sglang:time_to_first_token_seconds_bucket",
                 "sglang:inter_token_latency_seconds_bucket", "sglang:e2e_request_latency_seconds_bucket"):
        assert re.search(rf'^{re.escape(name)}{{.*model_name="tiny"', text, re.M), name
    m = server.metrics()
    assert m["sglang:generation_tokens_total"] >= 12 and m["sglang:num_requests_total"] >= 1
    log = open(server.log.name).read()
    assert re.search(r"Decode batch, #running-req: \d+, #token: \d+, token usage: \d\.\d\d, (cuda|cpu) graph: (True|False), "
                     r"gen throughput \(token/s\): \d+\.\d\d, #queue-req: \d+", log)
    assert re.search(r"Prefill batch, #new-seq: \d+, #new-token: \d+, #cached-token: \d+, token usage: \d\.\d\d, "
                     r"#running-req: \d+, #queue-req: \d+", log)
    assert http.get(server.url + "/server_info").json()["internal_states"][0]["last_gen_throughput"] > 0


def test_bench_serve_needs_a_tokenizer_for_chat(model_dir, server):
    r = subprocess.run([sys.executable, "-m", "dsv32.server.cli", "bench", "serve", "--backend", "sglang-oai-chat",
                        "--port", str(server.port), "--num-prompts", "1", "--random-input-len", "8",
                        "--random-output-len", "2", "--tokenizer", os.path.dirname(model_dir[0]), "--disable-tqdm"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--tokenizer DIR" in r.stderr
    assert httpx.get(server.url + "/health").status_code == 200
