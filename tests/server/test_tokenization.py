"""server/tokenization.py: big texts are tokenized off the event loop (same ids as inline), the context bound
refuses what cannot fit before any tokenization, and special-token text in client strings is encoded as text."""

from __future__ import annotations

import asyncio
import time

import pytest

from dsv32.core.demo import build_tokenizer
from dsv32.server.tokenization import INLINE_CHARS, Tokenization


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(512)


def test_big_text_is_encoded_off_the_loop(tok):
    t = Tokenization(tok, max_model_len=1 << 20)
    text = "The quick brown fox jumps over the lazy dog. " * 40_000  # 1.8 MB: seconds of GIL-holding Rust
    assert len(text) > INLINE_CHARS

    async def run():
        gaps, done = [], False

        async def tick():
            while not done:
                t0 = time.monotonic()
                await asyncio.sleep(0.01)
                gaps.append(time.monotonic() - t0)

        ticker = asyncio.create_task(tick())
        ids = await t.encode(text)
        done = True
        await ticker
        return ids, max(gaps)

    try:
        ids, worst_gap = asyncio.run(run())
    finally:
        t.close()
    assert ids == tok.encode(text, add_special_tokens=False).ids
    assert worst_gap < 0.5, worst_gap  # the loop kept running while the worker tokenized


def test_context_bound(tok):
    t = Tokenization(tok, max_model_len=100)
    t.check_length("a" * (100 * t.max_token_bytes), "prompt")  # might fit
    with pytest.raises(ValueError, match=r"prompt: .* cannot fit this model's context of 100 tokens"):
        t.check_length("a" * (100 * t.max_token_bytes + 1), "prompt")


def test_protect_keeps_special_token_text_as_text(tok):
    t = Tokenization(tok, max_model_len=4096)
    msgs = [{"role": "user", "content": "x <｜User｜> y", "name": "｜DSML｜"}, {"role": "tool", "content": ["<think>"]}]
    safe, pieces, marker = t.protect(msgs)
    assert pieces == ["<｜User｜>", "｜DSML｜", "<think>"] and msgs[0]["content"] == "x <｜User｜> y"  # not mutated
    rendered = "<｜User｜>" + safe[0]["content"] + safe[0]["name"] + safe[1]["content"][0]
    ids = asyncio.run(t.encode(rendered, pieces, marker))
    assert tok.decode(ids, skip_special_tokens=False) == "<｜User｜>x <｜User｜> y｜DSML｜<think>"
    user_id = tok.token_to_id("<｜User｜>")
    assert ids.count(user_id) == 1 and tok.token_to_id("｜DSML｜") not in ids  # only the trusted one
    assert t.protect([{"content": "plain"}]) == ([{"content": "plain"}], [], None)
    allow = Tokenization(tok, max_model_len=4096, allow_special_in_messages=True)
    assert allow.protect(msgs)[1] == []


def test_worker_count(tok):
    """--tokenizer-worker-num: that many tokenizer processes; the ids are the same."""
    t = Tokenization(tok, max_model_len=1 << 20, workers=2)
    text = "Workers share the big prompts. " * 4000
    assert len(text) > INLINE_CHARS
    try:
        got = asyncio.run(t.encode(text))
        assert t._get_pool()._max_workers == 2
        assert got == tok.encode(text, add_special_tokens=False).ids
    finally:
        t.close()


def test_token_histograms_only_when_collected():
    """--collect-tokens-histogram: /metrics gains per-request prompt / generation token histograms."""
    from dsv32.server.metrics import Metrics

    for collect in (False, True):
        m = Metrics("tiny", token_histograms=collect)
        m.on_finish(prompt_tokens=250, completion_tokens=40, reason="length", e2e_s=0.5)
        text = m.render().decode()
        assert ('sglang:prompt_tokens_histogram_bucket{le="300.0",model_name="tiny"} 1.0' in text) == collect
        assert ('sglang:generation_tokens_histogram_bucket{le="100.0",model_name="tiny"} 1.0' in text) == collect
