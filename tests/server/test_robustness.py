"""A server that survives anything: each defect found by trying `dsv32 serve` as a careless user and as an attacker,
on a live server (demo tokenizer, tiny transformers-made model, CPU). Every bad input is a 4xx in the one error shape
({"error": {message, type, param, code}}) and never hurts another request; health tells the truth; shutdown
drains; auth covers every route."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from _live import Server, http, prompts

GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The demo model (random weights, DeepSeek-V3.2 tokenizer markers, a 4096-token context: room for tools)."""
    from dsv32.core.demo import make_demo_checkpoint

    return (make_demo_checkpoint(str(tmp_path_factory.mktemp("demo"))),)


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir[0], "--enable-metrics", "--page-size", "8", "--tool-call-parser", "deepseekv32",
               "--reasoning-parser", "deepseek-v3")
    yield s
    s.stop()


def post(s, path, body, timeout=120):
    """POST a JSON body (or raw text / bytes) on a client of its own (httpx clients are not shared across threads)."""
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(s.url + path, content=data, headers={"Content-Type": "application/json", **s.headers},
                      timeout=timeout)


def assert_error(r, status, param=None):
    assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status, err
    assert "Traceback" not in err["message"] and "Overflow when" not in err["message"], err
    if param is not None:
        assert err["param"] == param, err
    return err


def greedy_text(s, prompt, n=40):
    r = post(s, "/v1/completions", {"prompt": prompt, "max_tokens": n, **GREEDY})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


# ---- 1. one request never aborts the others ----------------------------------------------------------------------
POISON = [  # (path, raw JSON body, expected status, param)
    ("/v1/completions", '{"prompt": [20, 30], "temperature": NaN}', 400, "temperature"),
    ("/v1/completions", '{"prompt": [20, 30], "top_p": Infinity}', 400, "top_p"),
    ("/v1/completions", '{"prompt": [20, 30], "stop_token_ids": [600], "min_tokens": 1}', 400, "stop_token_ids"),
    ("/v1/completions", '{"prompt": [20, 30], "seed": 1180591620717411303424}', 400, "seed"),
    ("/v1/completions", '{"prompt": [20, 30], "logit_bias": {"99999": 5}}', 400, "logit_bias"),
    ("/v1/completions", '{"prompt": [20, 30], "logit_bias": {"5": 500}}', 400, "logit_bias"),
    ("/v1/completions", '{"prompt": [20, 30], "suffix": "x"}', 400, "suffix"),
    ("/v1/completions", '{"prompt": [20, 30], "best_of": 3}', 400, "best_of"),
    ("/v1/completions", '{"prompt": [20, 30], "stream": true, "stream_options": "x"}', 400, "stream_options"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "stream": true, '
                             '"stream_options": "x"}', 400, "stream_options"),
    ("/generate", '{"input_ids": [20, 30], "rid": [1]}', 400, "rid"),
    ("/generate", '{"input_ids": [20, 30], "sampling_params": {"regex": "([a-"}}', 400, "sampling_params.regex"),
    ("/generate", '{"input_ids": [20, 30], "sampling_params": {"json_schema": "{\\"type\\": 5}"}}', 400,
     "sampling_params.json_schema"),
    ("/generate", '{"input_ids": [20, 99999]}', 400, "input_ids"),
    ("/generate", '{"input_ids": [20, 99999], "stream": true}', 400, "input_ids"),
    ("/detokenize", '{"tokens": [8589934592]}', 400, "tokens"),
]


def test_poison_parameters_hurt_no_one(server):
    """Every poison of the original report and more, sent while a long greedy request runs: each is a 400 naming
    its field, and the greedy request is exactly its quiet self."""
    p = prompts(1, seed=51, lo=30, hi=30)[0]
    quiet = greedy_text(server, p, 200)
    with cf.ThreadPoolExecutor(8) as ex:
        victim = ex.submit(greedy_text, server, p, 200)
        time.sleep(0.3)
        results = list(ex.map(lambda x: (x, post(server, x[0], x[1])), POISON * 2))
    for (path, body, status, param), r in results:
        assert_error(r, status, param)
    assert victim.result() == quiet
    # values the original report saw abort the batch that are legitimate: a subnormal temperature is greedy, a
    # top_k beyond the vocabulary no cut
    quiet40 = greedy_text(server, p, 40)
    tiny_t = post(server, "/v1/completions", '{"prompt": %s, "max_tokens": 40, "ignore_eos": true, '
                                              '"temperature": 1e-40}' % json.dumps(p))
    assert tiny_t.status_code == 200 and tiny_t.json()["choices"][0]["text"] == quiet40
    big_k = post(server, "/v1/completions", '{"prompt": %s, "max_tokens": 8, "top_k": 9223372036854775808, '
                                             '"temperature": 0.5, "seed": 1}' % json.dumps(p))
    assert big_k.status_code == 200, big_k.text


def test_malformed_bodies_are_4xx_without_internals(server):
    assert_error(post(server, "/v1/completions", "[" * 5000 + "]" * 5000), 400)
    assert_error(post(server, "/v1/completions", '{"prompt": [1], "max_tokens": %s}' % ("9" * 5000)), 400)
    assert_error(post(server, "/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\ud800b"}]}'),
                 400, "messages[0].content")
    assert_error(post(server, "/v1/completions", b'{"prompt": "\xff\xfe"}'), 400)
    assert_error(post(server, "/v1/completions", "[1, 2]"), 400)
    assert_error(http.get(server.url + "/no/such/route"), 404)
    assert_error(http.get(server.url + "/v1/completions"), 405)
    r = post(server, "/v1/completions", {"prompt": [1, 2], "max_tokens": 2, "seed": 2**70})
    assert "Overflow" not in assert_error(r, 400, "seed")["message"]


def test_big_bodies_never_block_health(server):
    """A 31.5 MB chat body (under the 32 MiB limit) is refused as too long for the context before any tokenization,
    while /health keeps answering fast; a body over the limit is a 413 before it is read."""
    body = json.dumps({"messages": [{"role": "user", "content": "word " * 6_300_000}], "max_tokens": 4})
    probes = []

    def probe():
        t0 = time.monotonic()
        while time.monotonic() - t0 < 6:
            t = time.monotonic()
            http.get(server.url + "/health")
            probes.append(time.monotonic() - t)
            time.sleep(0.1)

    with cf.ThreadPoolExecutor(2) as ex:
        f = ex.submit(probe)
        t0 = time.monotonic()
        r = post(server, "/v1/chat/completions", body)
        took = time.monotonic() - t0
        f.result()
    assert_error(r, 400, "messages")
    assert "cannot fit" in r.json()["error"]["message"] and took < 10
    assert max(probes) < 1.0, max(probes)
    big = b'{"prompt": "' + b"a" * (33 << 20) + b'"}'
    assert_error(post(server, "/v1/completions", big), 413)


def test_stream_errors_are_not_empty_200s(server):
    """A stream the engine refuses (out-of-vocabulary ids: in POISON; a request id in use: here) is an error
    response, not a 200 with an empty stream. Background load keeps the first request running meanwhile."""
    long = {"max_new_tokens": 2000, **GREEDY}
    with cf.ThreadPoolExecutor(6) as ex:
        load = [ex.submit(post, server, "/generate", {"input_ids": [20 + i, 30], "sampling_params": long})
                for i in range(5)]
        with httpx.Client(timeout=120) as c, c.stream("POST", server.url + "/generate", json={
                "input_ids": [20, 30], "rid": "same", "sampling_params": long, "stream": True}) as first:
            assert first.status_code == 200
            lines = first.iter_lines()  # kept: a discarded iterator closes the connection (the server aborts then)
            next(lines)
            second = post(server, "/generate", {"input_ids": [20, 30], "rid": "same", "stream": True})
            assert_error(second, 400)
            assert "already in use" in second.json()["error"]["message"]
        assert all(f.result().status_code == 200 for f in load)


def test_non_streaming_request_aborted_when_client_leaves(server):
    before = server.metrics().get("dsv32_requests_finished_total", 0)
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/completions", {"prompt": [20, 30], "max_tokens": 3000, **GREEDY}, timeout=1.0)
    m = server.drained(10)
    assert m["sglang:num_running_reqs"] == 0 and m["sglang:token_usage"] == 0
    text = http.get(server.url + "/metrics").text
    aborted = [ln for ln in text.splitlines() if ln.startswith("dsv32_requests_finished_total")
               and 'finish_reason="abort"' in ln]
    assert aborted and float(aborted[0].rsplit(" ", 1)[1]) >= 1
    assert m.get("dsv32_requests_finished_total", 0) > before


def test_no_special_token_text_leaks_into_content(server):
    """Tools on: the model is pushed to end-of-sentence after 3 tokens (logit_bias, min_tokens); the EOS text must
    not reach the content (it did, because tools made the server keep every special token)."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": tools, "max_tokens": 20, "min_tokens": 3,
            "logit_bias": {"1": 100}, "temperature": 0}
    for stream in (False, True):
        r = post(server, "/v1/chat/completions", {**body, "stream": stream})
        assert r.status_code == 200
        text = r.text
        assert "end▁of▁sentence" not in text and "<｜" not in text.replace("\\uff5c", "｜"), text[:500]
    usage = post(server, "/v1/chat/completions", {**body, "chat_template_kwargs": {"thinking": True}}).json()["usage"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] <= usage["completion_tokens"] == 4


def test_generate_logprobs_as_sglang(server):
    r = post(server, "/generate", {"input_ids": [20, 30, 40], "return_logprob": True, "top_logprobs_num": 2,
                                   "return_text_in_logprobs": True, "sampling_params": {"max_new_tokens": 5, **GREEDY}})
    meta = r.json()["meta_info"]
    assert len(meta["output_token_logprobs"]) == 5 and len(meta["output_top_logprobs"]) == 5
    lp, tid, text = meta["output_token_logprobs"][0]
    assert tid == r.json()["output_ids"][0] and lp <= 0 and isinstance(text, str)
    assert meta["output_top_logprobs"][0][0][1] == tid  # greedy: the top alternative is the token


# ---- health, auth, shutdown, startup ---------------------------------------------------------------------------
def test_health_tells_the_truth_about_a_frozen_engine(model_dir):
    s = Server(model_dir[0], "--health-timeout", "2")
    try:
        pid = s.pid_of_rank(0)
        assert http.get(s.url + "/health").status_code == 200
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(3)
            t0 = time.monotonic()
            assert http.get(s.url + "/health").status_code == 503
            assert time.monotonic() - t0 < 1
            t0 = time.monotonic()
            assert_error(http.get(s.url + "/health_generate"), 503)
            assert time.monotonic() - t0 < 5
        finally:
            os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while http.get(s.url + "/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert http.get(s.url + "/health").status_code == 200
        assert http.get(s.url + "/health_generate").status_code == 200
    finally:
        s.stop()


def test_api_key_covers_every_route(model_dir):
    s = Server(model_dir[0], "--enable-metrics", api_key="sekret")
    try:
        for path in ("/get_model_info", "/docs", "/redoc", "/openapi.json", "/health_generate", "/v1/models"):
            assert_error(http.get(s.url + path), 401)
            assert_error(http.get(s.url + path, headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(http.post(s.url + "/tokenize", json={"prompt": "x"}), 401)
        for path in ("/health", "/metrics"):
            assert http.get(s.url + path).status_code == 200
        for scheme in ("Bearer", "bearer", "BEARER"):
            assert http.get(s.url + "/get_model_info", headers={"Authorization": f"{scheme} sekret"}).status_code == 200
    finally:
        s.stop()


def test_sigterm_drains_then_ends_what_is_left_with_an_error(model_dir):
    s = Server(model_dir[0], "--graceful-shutdown-timeout", "1.5")
    try:
        with cf.ThreadPoolExecutor(3) as ex:
            def stream():
                with http.stream("POST", s.url + "/v1/completions", json={
                        "prompt": [20, 30], "max_tokens": 3000, "stream": True, **GREEDY}) as r:
                    return [line for line in r.iter_lines() if line]

            long_stream = ex.submit(stream)
            long_plain = ex.submit(post, s, "/v1/completions", {"prompt": [20, 31], "max_tokens": 3000, **GREEDY})
            short = ex.submit(post, s, "/v1/completions", {"prompt": [20, 32], "max_tokens": 3, **GREEDY})
            time.sleep(0.5)
            s.proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            with pytest.raises(httpx.ConnectError):  # no longer accepting
                httpx.get(s.url + "/health", timeout=2)
            lines = long_stream.result()
            assert short.result().status_code == 200  # finished within the grace period
            assert_error(long_plain.result(), 503)
        assert lines[-1] == "data: [DONE]"
        assert any('"error"' in ln and "shutting down" in ln for ln in lines), lines[-3:]
        assert s.proc.wait(20) == 0
    finally:
        s.stop()


def test_silent_connections_are_closed(server):
    with socket.create_connection(("127.0.0.1", server.port)) as c:
        c.settimeout(20)
        t0 = time.monotonic()
        assert c.recv(1) == b""  # the server closed it
        assert time.monotonic() - t0 < 15
    with socket.create_connection(("127.0.0.1", server.port)) as c:  # a head that never completes
        c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        c.settimeout(20)
        assert c.recv(1) == b""


def test_startup_fails_early_on_a_busy_or_bad_port(model_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "dsv32.server.launch_server", "--model", model_dir[0], "--port",
                            str(port)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr, r.stderr
        assert "rank 0" not in r.stderr and time.monotonic() - t0 < 30  # before any engine started
    r = subprocess.run([sys.executable, "-m", "dsv32.server.launch_server", "--port", "99999"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "not a TCP port" in r.stderr and "Traceback" not in r.stderr
