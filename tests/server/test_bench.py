"""bench serve's datasets and report (the live run is in test_server_live.py)."""

from __future__ import annotations

import json

from dsv32.core.demo import build_tokenizer
from dsv32.server.bench import RequestResult, format_result, random_dataset, sharegpt_dataset, summarize


def test_random_range_ratio_has_sglang_meaning():
    fixed = random_dataset(20, 100, 50, 1.0, 512, seed=0)
    assert {(i.input_len, i.output_len) for i in fixed} == {(100, 50)}  # r = 1: fixed lengths
    spread = random_dataset(200, 100, 50, 0.5, 512, seed=0)
    assert min(i.input_len for i in spread) >= 50 and max(i.input_len for i in spread) == 100
    assert min(i.output_len for i in spread) >= 25 and len({i.input_len for i in spread}) > 10
    assert all(len(i.prompt) == i.input_len and all(16 <= t < 512 for t in i.prompt) for i in spread)
    assert random_dataset(5, 100, 50, 0.0, 512, seed=3)[0].prompt == random_dataset(5, 100, 50, 0.0, 512, seed=3)[0].prompt


def test_sharegpt_dataset(tmp_path):
    data = [{"conversations": [{"from": "human", "value": "What is the weather in Paris today?"},
                               {"from": "gpt", "value": "It is sunny and warm, about 24 degrees."}]},
            {"conversations": [{"from": "human", "value": "Hi"}]},  # one turn: skipped
            {"conversations": [{"from": "human", "value": "Tell me about sparse attention please."},
                               {"from": "gpt", "value": "It selects the most relevant tokens with an indexer."}]}]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(data))
    tok = build_tokenizer(512)
    items = sharegpt_dataset(str(path), 10, tok, None, seed=0)
    assert len(items) == 2 and all(isinstance(i.prompt, str) for i in items)
    for i in items:
        assert i.input_len == len(tok.encode(i.prompt, add_special_tokens=False).ids)
    assert {i.output_len for i in sharegpt_dataset(str(path), 10, tok, 7, seed=0)} == {7}


def test_summary_metrics():
    rs = [RequestResult(True, 10, 5, ttft_s=0.1, latency_s=0.5, itl_s=[0.1] * 4, start_s=100.0, text="abcde"),
          RequestResult(True, 20, 3, ttft_s=0.2, latency_s=0.4, itl_s=[0.1, 0.1], start_s=101.5, text="xyz"),
          RequestResult(error="boom")]
    m = summarize(rs, duration=2.0, request_rate=float("inf"), max_concurrency=4, retokenize=list)
    assert m["completed"] == 2 and m["failed"] == 1 and m["errors"] == ["boom"]
    assert m["total_input_tokens"] == 30 and m["output_throughput"] == 4.0
    assert m["total_output_tokens_retokenized"] == 8  # the texts' "tokens" (characters here)
    assert abs(m["mean_tpot_ms"] - 100.0) < 1e-6  # (0.5-0.1)/4 and (0.4-0.2)/2
    assert abs(m["p90_ttft_ms"] - 190.0) < 1e-6 and abs(m["max_itl_ms"] - 100.0) < 1e-6
    assert abs(m["concurrency"] - 0.45) < 1e-9
    # chunks per 1-s bucket from the first start: 5 in [100, 101), 3 in [101, 102); requests in flight per bucket
    assert m["max_output_tokens_per_s"] == 5.0 and m["max_concurrent_requests"] == 1
    text = format_result(m, "sglang")
    assert "Serving Benchmark Result" in text and "Median TTFT (ms):" in text and "P99 ITL (ms):" in text
    assert "Backend:                                 sglang" in text and "P95 TPOT (ms):" in text
