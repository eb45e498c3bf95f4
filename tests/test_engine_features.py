"""Serving-engine features on the offline engine: chunked prefill, prefix cache, abort, penalties, min_tokens,
logprobs, n, stop strings and incremental detokenization."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_engine import GREEDY, assert_all_pages_returned, prompts_of

from dsv32 import LLM, SamplingParams
from dsv32.core.demo import build_tokenizer, make_demo_checkpoint
from dsv32.core.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return make_demo_checkpoint(str(tmp_path_factory.mktemp("demo")))


def run(llm, prompts, params):
    return [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]


def test_chunked_prefill_matches_whole_prefill(tiny_dir):
    prompts = prompts_of([45, 30, 7, 60], seed=21)
    sp = SamplingParams(max_tokens=12, **GREEDY)
    whole = run(LLM(model=tiny_dir, dtype="float32", chunked_prefill_size=-1, enable_prefix_caching=False), prompts, sp)
    chunked = LLM(model=tiny_dir, dtype="float32", chunked_prefill_size=16, page_size=8, enable_prefix_caching=False)
    steps = []
    orig = chunked.engine._schedule
    chunked.engine._schedule = lambda **kw: steps.append(orig(**kw)) or steps[-1]
    assert run(chunked, prompts, sp) == whole
    assert max(sum(n for _, n in w) for w in steps if w) <= 16  # the budget is respected
    assert any(n not in (1,) and n < len(r.prompt_ids) for w in steps for r, n in w)  # prompts were split


def test_max_prefill_tokens_caps_admitted_prompt_tokens(tiny_dir):
    """--max-prefill-tokens (SGLang's): newly admitted requests take at most that many prompt tokens per step (the
    rest of a prompt continues as a running request's chunk); outputs unchanged."""
    prompts = prompts_of([45, 30, 7, 60], seed=22)
    sp = SamplingParams(max_tokens=6, **GREEDY)
    free = run(LLM(model=tiny_dir, dtype="float32", enable_prefix_caching=False), prompts, sp)
    capped = LLM(model=tiny_dir, dtype="float32", enable_prefix_caching=False, max_prefill_tokens=20, page_size=8)
    steps, orig = [], capped.engine._schedule
    capped.engine._schedule = lambda **kw: steps.append([(r, n, r.num_cached) for r, n in orig(**kw)]) or \
        [(r, n) for r, n, _ in steps[-1]]
    assert run(capped, prompts, sp) == free
    admitted = [sum(n for _, n, cached in w if cached == 0 and n > 1) for w in steps]
    assert max(admitted) <= 20 and any(n == 20 for n in admitted)


def test_seed_makes_unseeded_sampling_reproducible(tiny_dir):
    """LLM(seed=...) / --random-seed: requests without their own seed draw from a seeded RNG."""
    sp = SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)
    prompts = prompts_of([9, 14], seed=5)
    a = run(LLM(model=tiny_dir, dtype="float32", seed=11), prompts, sp)
    b = run(LLM(model=tiny_dir, dtype="float32", seed=11), prompts, sp)
    c = run(LLM(model=tiny_dir, dtype="float32", seed=12), prompts, sp)
    assert a == b and a != c  # 16 tokens at temperature 1 over 320: another seed draws others


def test_prefix_cache_hit_equals_miss(tiny_dir):
    shared = prompts_of([40], seed=3)[0]
    a, b = shared + [5, 6, 7], shared + [9, 10]
    sp = SamplingParams(max_tokens=10, **GREEDY)
    cold = LLM(model=tiny_dir, dtype="float32", page_size=8, enable_prefix_caching=False)
    want = run(cold, [a], sp) + run(cold, [b], sp)
    warm = LLM(model=tiny_dir, dtype="float32", page_size=8)
    run(warm, [a], sp)
    out = warm.generate(prompt_token_ids=[b], sampling_params=sp)
    assert warm.engine.prefix_cache.hit_tokens >= 40
    assert run(warm, [a], sp) + [out[0].token_ids] == want
    req_cached = warm.engine.prefix_cache.hit_tokens
    assert req_cached > 0
    assert_all_pages_returned(warm)


def test_prefix_cache_eviction_under_pressure(tiny_dir):
    """A small pool fills with cached prefixes; later requests evict them and still produce correct output."""
    sp = SamplingParams(max_tokens=8, **GREEDY)
    prompts = prompts_of([30, 28, 31, 29, 33], seed=8)
    ref = run(LLM(model=tiny_dir, dtype="float32", page_size=4, enable_prefix_caching=False), prompts, sp)
    small = LLM(model=tiny_dir, dtype="float32", page_size=4, num_kv_pages=20, max_model_len=64)
    got = [run(small, [p], sp)[0] for p in prompts]
    assert got == ref
    assert small.engine.prefix_cache.num_pages <= 20
    assert_all_pages_returned(small)


def test_abort_frees_pages(tiny_dir):
    llm = LLM(model=tiny_dir, dtype="float32", page_size=4)
    eng = llm.engine
    r1 = eng.add_request(prompts_of([20], seed=1)[0], SamplingParams(max_tokens=50, **GREEDY))
    r2 = eng.add_request(prompts_of([25], seed=2)[0], SamplingParams(max_tokens=5, **GREEDY))
    eng.step()
    eng.step()
    assert r1.pages and not r1.finished
    assert eng.abort(r1.request_id)
    outs = []
    while eng.has_work():
        outs += eng.step()
    assert [o.finish_reason for o in outs if o.request_id == r1.request_id] == ["abort"]
    assert r2.finish_reason == "length" and len(r2.output_ids) == 5
    assert not eng.abort(r1.request_id)  # already gone
    waiting = eng.add_request([1, 2, 3], SamplingParams(max_tokens=3))
    assert eng.abort(waiting.request_id) and eng.step()[0].finish_reason == "abort"
    assert_all_pages_returned(llm)


def test_penalties_and_min_tokens(tiny_dir):
    llm = LLM(model=tiny_dir, dtype="float32")
    p = prompts_of([12], seed=4)
    base = run(llm, p, SamplingParams(max_tokens=30, **GREEDY))[0]
    rep = run(llm, p, SamplingParams(max_tokens=30, repetition_penalty=1.8, **GREEDY))[0]
    loop = run(llm, p, SamplingParams(max_tokens=30, frequency_penalty=-2.0, **GREEDY))[0]
    assert rep != base
    assert max(loop.count(t) for t in set(loop)) > max(base.count(t) for t in set(base))  # rewards repeats
    # min_tokens: the greedy's own first token as a stop token cannot end generation before min_tokens
    stop = base[0]
    early = run(llm, p, SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[stop]))[0]
    assert early == [stop]
    held = run(llm, p, SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[stop], min_tokens=6))[0]
    assert len(held) >= 6 and stop not in held[:6]


def test_penalty_math():
    from dsv32.core.sampling import apply_penalties

    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    out = apply_penalties(logits, [[0]], [[1, 1, 3]], [SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5,
                                                                       presence_penalty=0.25)])
    # token 0: prompt only → repetition only (2/2); token 1: -1*2 (rep) - 2*0.5 - 0.25; token 3: 3/2 - 0.5 - 0.25
    assert torch.allclose(out, torch.tensor([[1.0, -3.25, 0.5, 0.75]]))
    assert torch.equal(apply_penalties(logits, [[0]], [[1]], [SamplingParams()]), logits)


def test_logprobs_and_n(tiny_dir):
    llm = LLM(model=tiny_dir, dtype="float32")
    p = prompts_of([10], seed=5)
    out = llm.generate(prompt_token_ids=p, sampling_params=SamplingParams(max_tokens=6, logprobs=3, **GREEDY))[0]
    lps = out.outputs[0].logprobs
    assert len(lps) == 6
    for tok, lp in zip(out.token_ids, lps):
        assert lp.token_id == tok and lp.top[0][0] == tok and abs(lp.top[0][1] - lp.logprob) < 1e-6
        assert len(lp.top) == 3 and lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1] and lp.logprob <= 0
    many = llm.generate(prompt_token_ids=p, sampling_params=SamplingParams(max_tokens=8, n=3, temperature=1.0,
                                                                           seed=7, ignore_eos=True))[0]
    assert [o.index for o in many.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in many.outputs}) > 1
    again = llm.generate(prompt_token_ids=p, sampling_params=SamplingParams(max_tokens=8, n=3, temperature=1.0,
                                                                            seed=7, ignore_eos=True))[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in many.outputs]


def test_incremental_detokenizer_matches_full_decode():
    tok = build_tokenizer(512)
    g = torch.Generator().manual_seed(0)
    texts = ["Hello! 你好, wörld. <think>hm</think>ok", "def add(a, b): return a + b 🙂🙂", "plain"]
    for text in texts:
        ids = tok.encode(text).ids
        for skip in (True, False):
            d = IncrementalDetokenizer(tok, [0, 5], skip_special_tokens=skip)
            streamed = ""
            for t in ids:
                d.add(t)
                streamed += d.take_delta(False)
            streamed += d.take_delta(True)
            assert streamed == tok.decode(ids, skip_special_tokens=skip)
    for _ in range(20):  # random token soup: byte tokens that form invalid / unfinished UTF-8
        ids = torch.randint(15, 509, (30,), generator=g).tolist()
        d = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
        for t in ids:
            d.add(t)
            assert not d.take_delta(False).endswith("\ufffd")  # never emit half a character mid-stream
        d.flush()
        assert d.final_text == tok.decode(ids)


def test_stop_strings_never_leak():
    tok = build_tokenizer(512)
    text = "The weather in Paris is sunny and warm today."
    ids = tok.encode(text).ids
    for stop, trim in ((["sunny"], False), (["Paris is", "zzz"], False), (["warm"], True)):
        d = IncrementalDetokenizer(tok, [], stop=stop, no_stop_trim=trim)
        chunks = []
        for t in ids:
            d.add(t)
            chunks.append(d.take_delta(False))
            if d.stopped_by:
                break
        chunks.append(d.take_delta(True))
        out = "".join(chunks)
        cut = text.index(d.stopped_by) + (len(d.stopped_by) if trim else 0)
        assert out == text[:cut]
        if not trim:
            assert all(stop[0][:2] not in c for c in chunks[:-1] if c) or stop[0][:2] in text[:cut]


def test_stop_strings_in_engine(demo_dir):
    llm = LLM(model=demo_dir, dtype="float32")
    free = llm.generate(prompt_token_ids=[[0, 3, 50, 60]], sampling_params=SamplingParams(max_tokens=20, **GREEDY))[0]
    assert free.text and len(free.text) > 6
    stop = free.text[3:6]
    out = llm.generate(prompt_token_ids=[[0, 3, 50, 60]], sampling_params=SamplingParams(
        max_tokens=20, temperature=0, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.text == free.text[:free.text.index(stop)]
    assert out.token_ids == free.token_ids[:len(out.token_ids)]


# ---- a request that breaks a step hurts nobody else (issue: one request aborted every request in flight) --------
@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_failed_step_aborts_only_the_request_it_can_attribute(tiny_dir, overlap):
    """A sampler that fails whenever one particular request is in the batch: that request ends with an error, every
    other request (running with it, or waiting) completes with exactly its quiet-run tokens, no page is lost (also
    with the overlap scheduler, where the batch in flight is dropped too)."""
    prompts = prompts_of([23, 9, 40, 17, 31], seed=41)
    sp = [SamplingParams(max_tokens=12, **GREEDY), SamplingParams(max_tokens=9, temperature=0.8, seed=3),
          SamplingParams(max_tokens=12, temperature=0.5, ignore_eos=True), SamplingParams(max_tokens=7, **GREEDY),
          SamplingParams(max_tokens=10, temperature=0.9, seed=11, ignore_eos=True)]
    quiet = LLM(model=tiny_dir, dtype="float32", page_size=8)
    want = run(quiet, prompts, sp)
    llm = LLM(model=tiny_dir, dtype="float32", page_size=8)
    real_sample = type(llm.ops).sample

    def sample(logits, temperatures, *rest):  # the poison: temperature 0.5 (request 2) in the batch
        if (temperatures == 0.5).any():
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real_sample(llm.ops, logits, temperatures, *rest)

    llm.ops.sample = sample
    eng = llm.engine
    eng.cfg = dataclasses.replace(eng.cfg, overlap=overlap)
    reqs = [eng.add_request(p, s) for p, s in zip(prompts, sp)]
    outs = []
    while eng.has_work():
        outs += eng.step()
    assert [r.output_ids for i, r in enumerate(reqs) if i != 2] == [w for i, w in enumerate(want) if i != 2]
    poisoned = reqs[2]
    assert poisoned.finish_reason == "abort" and "probability tensor" in poisoned.error
    last = [o for o in outs if o.request_id == poisoned.request_id][-1]
    assert last.finished and last.error == poisoned.error
    assert_all_pages_returned(llm)
    assert not any(r.suspect for r in reqs)


def test_sampling_params_bounds():
    assert SamplingParams(temperature=1e-40).temperature == 0.0  # 1/T would overflow: greedy
    assert SamplingParams(top_k=2**63).top_k == -1  # beyond any vocabulary: no cut
    SamplingParams(seed=2**64 - 1)
    SamplingParams(seed=-(2**63))
    for bad in (dict(temperature=float("nan")), dict(top_p=float("inf")), dict(seed=2**70), dict(seed=-(2**63) - 1),
                dict(logit_bias={5: 101}), dict(logit_bias={-1: 1.0}), dict(logit_bias={5: float("nan")})):
        with pytest.raises(ValueError, match="SamplingParams"):
            SamplingParams(**bad)


def test_engine_refuses_token_ids_outside_the_vocabulary(tiny_dir):
    llm = LLM(model=tiny_dir, dtype="float32")
    for sp in (SamplingParams(stop_token_ids=[320], min_tokens=1), SamplingParams(logit_bias={400: 1.0})):
        with pytest.raises(ValueError, match=r"out of range \[0, 320\)"):
            llm.engine.add_request([1, 2, 3], sp)


def test_logit_bias_steers_greedy_decoding(tiny_dir):
    llm = LLM(model=tiny_dir, dtype="float32")
    out = run(llm, prompts_of([12], seed=5), SamplingParams(max_tokens=6, logit_bias={77: 100}, **GREEDY))
    assert out == [[77] * 6]


def test_detokenizer_keeps_only_the_named_special_tokens():
    """skip_special_tokens with keep_special_tokens: the parser's markers survive, every other special token (an
    end-of-sentence above all) is dropped."""
    tok = build_tokenizer(512)
    ids = tok.encode("hi <｜tool▁calls▁begin｜>f<｜tool▁sep｜>{}<｜end▁of▁sentence｜>", add_special_tokens=False).ids
    d = IncrementalDetokenizer(tok, [], skip_special_tokens=True,
                               keep_special_tokens=("<｜tool▁calls▁begin｜>", "<｜tool▁sep｜>"))
    for t in ids:
        d.add(t)
    d.flush()
    assert d.take_delta(True) == "hi <｜tool▁calls▁begin｜>f<｜tool▁sep｜>{}"


def test_lpm_admits_the_longest_cached_prefix_first(tiny_dir):
    """schedule_policy='lpm' (SGLang's): with one request running at a time, a waiting request whose prompt shares a
    cached prefix goes before an earlier one that shares nothing; fcfs keeps arrival order; outputs are unchanged."""
    shared = prompts_of([40], seed=61)[0]
    warm, other, hit = shared + [3], prompts_of([30], seed=62)[0], shared + [7, 8]
    sp = SamplingParams(max_tokens=4, **GREEDY)
    orders = {}
    for policy in ("fcfs", "lpm"):
        llm = LLM(model=tiny_dir, dtype="float32", page_size=8, max_num_seqs=1, schedule_policy=policy)
        run(llm, [warm], sp)
        eng = llm.engine
        reqs = [eng.add_request(p, sp, request_id=name) for name, p in (("other", other), ("hit", hit))]
        admitted = []
        while eng.has_work():
            admitted += [r.request_id for r in eng.running if r.request_id not in admitted]
            eng.step()
        orders[policy] = ([x for x in admitted if x in ("other", "hit")], [r.output_ids for r in reqs])
        assert_all_pages_returned(llm)
    assert orders["fcfs"][0] == ["other", "hit"] and orders["lpm"][0] == ["hit", "other"]
    assert orders["fcfs"][1] == orders["lpm"][1]
    with pytest.raises(ValueError, match="schedule_policy"):
        LLM(model=tiny_dir, dtype="float32", schedule_policy="lof")


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_structured_output_in_the_engine(demo_dir, overlap):
    """SamplingParams json_schema / regex / ebnf (xgrammar, masks applied by the sampling rank on any backend): every
    constrained output parses and validates, with the overlap scheduler too; unconstrained requests batched with
    them produce exactly their solo tokens; n > 1 samples each follow the grammar."""
    jsonschema = pytest.importorskip("jsonschema")
    import json
    import re

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                               "days": {"type": "integer", "minimum": 1, "maximum": 7},
                                               "unit": {"enum": ["c", "f"]}}, "required": ["city", "days", "unit"]}
    llm = LLM(model=demo_dir, dtype="float32", page_size=8)
    llm.engine.cfg = dataclasses.replace(llm.engine.cfg, overlap=overlap)
    plain = [SamplingParams(max_tokens=10, **GREEDY), SamplingParams(max_tokens=8, temperature=0.9, seed=5)]
    ps = prompts_of([12, 20], seed=71)
    solo = run(llm, ps, plain)
    constrained = [SamplingParams(max_tokens=400, temperature=1.0, seed=3, json_schema=schema, n=2),
                   SamplingParams(max_tokens=40, temperature=1.0, seed=4, regex=r"[a-z]{2,4}-[0-9]{2}"),
                   SamplingParams(max_tokens=20, temperature=0.0, ebnf='root ::= "yes" | "no"')]
    outs = llm.generate(prompt_token_ids=ps + prompts_of([9, 15, 11], seed=72), sampling_params=plain + constrained)
    assert [o.token_ids for o in outs[:2]] == solo
    for c in outs[2].outputs:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.text), schema)
    assert re.fullmatch(r"[a-z]{2,4}-[0-9]{2}", outs[3].text) and outs[4].text in ("yes", "no")
    assert_all_pages_returned(llm)
    with pytest.raises(ValueError, match="give one of"):
        SamplingParams(regex="a", ebnf='root ::= "a"')
    with pytest.raises(ValueError, match="invalid json schema"):
        llm.generate(prompt_token_ids=[[5, 6]], sampling_params=SamplingParams(json_schema={"type": "objec"}))


def test_prompt_logprobs_equal_a_full_forward(tiny_dir):
    """SamplingParams.prompt_logprobs: the logprob of each prompt token given the ones before it (and the top
    alternatives) equal log_softmax of one forward pass over the whole prompt, whether the prompt is computed whole
    or in chunks, and although an identical prompt sits in the prefix cache (such requests recompute it)."""
    prompt = prompts_of([37], seed=81)[0]
    ref_llm = LLM(model=tiny_dir, dtype="float32", page_size=8, enable_prefix_caching=False)
    import torch.nn.functional as F

    fb = ref_llm.runner.build([(prompt, 0, ref_llm.kv_cache.allocator.alloc(5))])
    hidden = ref_llm.model.forward(fb, ref_llm.kv_cache)
    want = F.log_softmax(ref_llm.model.logits(hidden).float(), dim=-1).cpu()
    for kw in ({}, {"chunked_prefill_size": 16}):
        llm = LLM(model=tiny_dir, dtype="float32", page_size=8, **kw)
        sp = SamplingParams(max_tokens=3, prompt_logprobs=2, **GREEDY)
        run(llm, [prompt], SamplingParams(max_tokens=3, **GREEDY))  # the prompt is now cached
        out = llm.generate(prompt_token_ids=[prompt], sampling_params=sp)[0]
        lps = out.prompt_logprobs
        assert [lp.token_id for lp in lps] == prompt[1:]
        got = torch.tensor([lp.logprob for lp in lps])
        # fp32; chunks run the attention over cached keys, a whole prompt does not: equal up to rounding
        assert torch.allclose(got, want[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])], atol=1e-3)
        top = want[:-1].topk(2, dim=-1)
        assert [[t for t, _ in lp.top] for lp in lps] == top.indices.tolist()
        assert_all_pages_returned(llm)


def test_structured_output_with_tensor_parallel_ranks(demo_dir):
    """Only an attention group's first rank keeps grammar matchers; every rank must still schedule alike: greedy
    constrained outputs under tp_size=2 (gloo) equal the single-process ones, plain requests beside them too."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["n", "ok"]}
    sp = [SamplingParams(max_tokens=60, temperature=0, json_schema=schema), SamplingParams(max_tokens=12, **GREEDY),
          SamplingParams(max_tokens=30, temperature=0, regex=r"[a-z]{3}[0-9]")]
    ps = prompts_of([10, 14, 7], seed=91)
    one = LLM(model=demo_dir, dtype="float32", device="cpu", page_size=8)
    want = run(one, ps, sp)
    two = LLM(model=demo_dir, dtype="float32", device="cpu", page_size=8, tp_size=2)  # gloo ranks on any machine
    try:
        assert run(two, ps, sp) == want
    finally:
        two.shutdown()
