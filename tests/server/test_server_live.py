"""`dsv32 serve` as a real process, driven by the official openai client and httpx.

The model is a tiny transformers-made checkpoint (vocab 512) carrying the demo tokenizer, so greedy outputs can
be compared with transformers and text endpoints work."""

from __future__ import annotations

import concurrent.futures as cf
import json
import subprocess
import sys

import openai
import pytest
import torch
from _live import GREEDY, Server, complete, http, make_served_model, prompts
from _tiny import hf_greedy

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_served_model(tmp_path_factory)


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir[0], "--enable-metrics", "--reasoning-parser", "deepseek-v3", "--tool-call-parser",
               "deepseekv32", "--page-size", "8")
    yield s
    s.stop()


def test_models_health_info(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert http.get(server.url + "/health").status_code == 200
    assert http.get(server.url + "/health_generate").status_code == 200
    info = http.get(server.url + "/get_model_info").json()
    assert info["vocab_size"] == 512 and info["max_model_len"] == 512


def test_completion_greedy_equals_transformers(server, model_dir):
    hf = model_dir[1]
    for p in prompts(3, seed=1, lo=30, hi=50):  # longer than index_topk=24: sparse attention
        r = complete(server.client, p, 20)
        native = http.post(server.url + "/generate", json={
            "input_ids": p, "sampling_params": {"max_new_tokens": 20, "temperature": 0, "ignore_eos": True}}).json()
        assert native["output_ids"] == hf_greedy(hf, p, 20)
        assert r.usage.completion_tokens == 20 and r.usage.prompt_tokens == len(p)
        assert r.choices[0].text == http.post(server.url + "/detokenize", json={"tokens": native["output_ids"]}).json()["text"] \
            or r.choices[0].finish_reason == "length"


def test_streaming_equals_non_streaming(server):
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    full = server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=24, **GREEDY)
    chunks = list(server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=24, stream=True,
                                                        stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    p = prompts(1, seed=2)[0]
    whole = complete(server.client, p, 12).choices[0].text
    streamed = "".join(c.choices[0].text for c in server.client.completions.create(
        model="tiny", prompt=p, max_tokens=12, stream=True, **GREEDY) if c.choices)
    assert streamed == whole


def test_32_concurrent_equal_sequential(server):
    ps = prompts(32, seed=3)
    sequential = [complete(server.client, p, 10).choices[0].text for p in ps]
    with cf.ThreadPoolExecutor(32) as ex:
        concurrent = list(ex.map(lambda p: complete(server.client, p, 10).choices[0].text, ps))
    assert concurrent == sequential


def test_prefix_cache_hit_equals_miss(server):
    p = prompts(1, seed=4, lo=50, hi=50)[0]
    first = complete(server.client, p, 12)
    second = complete(server.client, p, 12)
    assert second.choices[0].text == first.choices[0].text
    assert second.usage.prompt_tokens_details.cached_tokens >= 40
    assert server.metrics()["sglang:cache_hit_rate"] > 0


def test_preemption_gives_identical_outputs(model_dir):
    """A pool of 40 pages × 8 tokens cannot hold 12 concurrent requests of ~60 tokens: the engine preempts and
    recomputes; outputs equal those of an ample pool."""
    ps = prompts(12, seed=5, lo=30, hi=40)
    small = Server(model_dir[0], "--page-size", "8", "--num-kv-pages", "64", "--context-length", "256",
                   "--enable-metrics", "--disable-radix-cache")
    try:
        with cf.ThreadPoolExecutor(12) as ex:
            got = list(ex.map(lambda p: [complete(small.client, p, 24).choices[0].text], ps))
        assert small.metrics()["dsv32_num_preemptions_total"] > 0
    finally:
        small.stop()
    ample = Server(model_dir[0], "--page-size", "8")
    try:
        want = [[complete(ample.client, p, 24).choices[0].text] for p in ps]
    finally:
        ample.stop()
    assert got == want


def test_aborted_streams_free_pages(model_dir):
    s = Server(model_dir[0], "--page-size", "8", "--enable-metrics", "--disable-radix-cache")
    try:
        for p in prompts(6, seed=6):
            s.abandon_stream(p)
        m = s.drained()
        assert m["sglang:num_running_reqs"] == 0 and m["sglang:token_usage"] == 0
        text = http.get(s.url + "/metrics").text
        aborted = [ln for ln in text.splitlines() if ln.startswith("dsv32_requests_finished_total") and 'finish_reason="abort"' in ln]
        assert aborted and float(aborted[0].rsplit(" ", 1)[1]) == 6
    finally:
        s.stop()


def test_bad_inputs_return_openai_errors(server):
    c = server.client
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt=[20] * 500, max_tokens=100)
    assert "512" in e.value.body["message"] and "max_tokens" in str(e.value.body)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "hi"}])
    assert "messages[0]" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                  tools=[{"type": "function", "function": {"name": "f"}}],
                                  tool_choice={"type": "function", "function": {"name": "g"}})
    assert "Tool 'g' not found" in e.value.body["message"]
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        r = http.post(server.url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "error" in r.json()
    r = http.post(server.url + "/v1/completions", content=b'{"prompt": "' + b"a" * (33 * 1024 * 1024) + b'"}')
    assert r.status_code == 413
    r = http.post(server.url + "/generate", json={"input_ids": [1, 2], "sampling_params": {"top_k": "x"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "sampling_params.top_k"
    with cf.ThreadPoolExecutor(2) as ex:  # the same client-chosen rid twice at once: one is refused, no mix-up
        rs = list(ex.map(lambda _: http.post(server.url + "/generate", json={
            "input_ids": [30, 31], "rid": "dup", "sampling_params": {"max_new_tokens": 60, "ignore_eos": True}}), range(2)))
    assert sorted(r.status_code for r in rs) in ([200, 200], [200, 400])
    assert all(len(r.json()["output_ids"]) == 60 for r in rs if r.status_code == 200)
    assert http.get(server.url + "/health").status_code == 200  # still healthy
    assert complete(c, [20, 21, 22], 3).usage.completion_tokens == 3


def test_api_key(model_dir):
    s = Server(model_dir[0], "--api-key", "sekrit")
    try:
        assert http.get(s.url + "/v1/models").status_code == 401
        bad = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="sekrit", max_retries=0)
        assert good.models.list().data[0].id == "tiny"
        assert http.get(s.url + "/health").status_code == 200  # health stays open for load balancers
    finally:
        s.stop()


def test_tokenize_native_and_sampling_knobs(server):
    tok = http.post(server.url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert tok["count"] == len(tok["tokens"]) > 0
    assert http.post(server.url + "/detokenize", json={"tokens": tok["tokens"]}).json()["text"] == "Hello world"
    r = server.client.completions.create(model="tiny", prompt="Hello", max_tokens=8, n=3, temperature=1.0, seed=5,
                                         logprobs=2, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 24
    assert len(r.choices[0].logprobs.token_logprobs) == 8
    again = server.client.completions.create(model="tiny", prompt="Hello", max_tokens=8, n=3, temperature=1.0, seed=5,
                                             extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in r.choices]
    full = complete(server.client, "Hello", 16).choices[0].text
    if len(full) > 6:
        stop = full[2:5]
        cut = complete(server.client, "Hello", 16, stop=[stop], extra_body={}).choices[0]
        assert cut.text == full[:full.index(stop)] and cut.finish_reason == "stop"


def test_bench_serve(server, tmp_path):
    out = tmp_path / "bench.jsonl"
    r = subprocess.run([sys.executable, "-m", "dsv32.server.cli", "bench", "serve", "--port", str(server.port),
                        "--num-prompts", "6", "--random-input-len", "40", "--random-output-len", "8",
                        "--random-range-ratio", "0.5", "--max-concurrency", "3", "--output-file", str(out),
                        "--disable-tqdm"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Serving Benchmark Result" in r.stdout and "Mean TTFT (ms):" in r.stdout
    result = json.loads(out.read_text().splitlines()[-1])
    assert result["completed"] == 6 and result["failed"] == 0
    assert result["total_output_tokens"] == 6 * 8 // 1 or 20 <= result["total_output_tokens"] <= 48
    assert result["mean_ttft_ms"] > 0 and result["output_throughput"] > 0


def test_unsupported_flags_exit_clearly(model_dir):
    for flags, needle in ((["--dp", "2"], "without --enable-dp-attention"),
                          (["--tp", "3"], "4 attention heads cannot be split over 3"),
                          (["--tp", "2", "--ep", "3"], "--ep 3 must divide --tp 2"),
                          (["--tp", "2", "--nnodes", "2"], "needs --dist-init-addr"),
                          (["--speculative-algorithm", "EAGLE"], "speculative decoding"),
                          (["--dsa-decode-backend", "flashmla_kv"], "cannot run here"),
                          (["--moe-runner-backend", "magic"], "unknown; choose one of"),
                          (["--quantization", "w4afp8"], "only DeepSeek FP8-block"),
                          *([(["--cuda-graph-max-bs", "8"], "device graphs are not available here")]
                            if not torch.cuda.is_available() else [])):
        r = subprocess.run([sys.executable, "-m", "dsv32.server.launch_server", "--model", model_dir[0], *flags],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and needle in r.stderr, (flags, r.stderr)
