"""Decode graphs (ModelRunner) and the overlap scheduler give the same outputs as the plain eager, synchronous
engine. On the CPU graphs are exercised through EagerGraph (replay re-runs the captured step on the static
buffers: it catches inputs not copied in, stale padding rows and wrong output rows); overlap runs its real
scheduling logic (launch N+1 before reading N). tests/backends/test_conformance.py repeats both on a GPU with CUDA
graphs."""

from __future__ import annotations

import dataclasses

import pytest
from test_engine import GREEDY, assert_all_pages_returned, prompts_of

from dsv32 import LLM, SamplingParams
from dsv32.core.engine.runner import EagerGraph, graph_batch_sizes


def outputs(llm, prompts, params):
    res = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    return [[(c.token_ids, c.finish_reason, [(lp.token_id, round(lp.logprob, 5), [t for t, _ in lp.top])
                                            for lp in c.logprobs or []]) for c in r.outputs] for r in res]


def test_graph_batch_sizes():
    assert graph_batch_sizes(0) == []
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(10) == [1, 2, 4, 8, 10]
    assert graph_batch_sizes(64)[-4:] == [40, 48, 56, 64]
    assert graph_batch_sizes(300)[-3:] == [272, 288, 300]


def test_graph_replay_matches_eager(tiny_dir):
    # 5 and 3 decoding requests run padded graphs of 8 and 4; contexts cross index_topk (16): dense and sparse paths
    prompts = prompts_of([5, 12, 30, 3, 9], seed=5)
    sp = SamplingParams(max_tokens=20, **GREEDY)
    eager = LLM(model=tiny_dir, dtype="float32", page_size=8, disable_graphs=True)
    assert not eager.runner.graphs
    graphs = LLM(model=tiny_dir, dtype="float32", page_size=8, graph_max_bs=8, graph_factory=EagerGraph)
    assert sorted(graphs.runner.graphs) == [("target", bs, 1, sparse) for bs in (1, 2, 4, 8) for sparse in (False, True)]
    want = outputs(eager, prompts, sp)
    assert outputs(graphs, prompts, sp) == want
    assert graphs.runner.replays >= 19  # every decode step replayed a graph
    assert outputs(graphs, prompts[2:], sp) == want[2:]  # 3 requests: padded to 4
    assert_all_pages_returned(graphs)


def test_graph_flags_are_checked(tiny_dir):
    with pytest.raises(ValueError, match="device graphs are not available here"):
        LLM(model=tiny_dir, dtype="float32", graph_max_bs=4)  # CPU: a flag is never silently ignored
    with pytest.raises(ValueError, match="≥ 0"):
        LLM(model=tiny_dir, dtype="float32", graph_max_bs=-1, graph_factory=EagerGraph)
    assert not LLM(model=tiny_dir, dtype="float32").runner.graphs  # CPU default: eager, logged


def _mixed_params():
    return [
        SamplingParams(max_tokens=14, **GREEDY),
        SamplingParams(max_tokens=1, **GREEDY),  # finishes at its first token: overlap runs one dropped step
        SamplingParams(max_tokens=9, temperature=0.8, top_k=20, top_p=0.9, seed=7, ignore_eos=True),
        SamplingParams(max_tokens=11, temperature=1.0, min_p=0.1, seed=3, logprobs=2, ignore_eos=True),
        SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[5, 17, 40, 99, 101, 200], min_tokens=3),
        SamplingParams(max_tokens=7, temperature=0.7, seed=11, n=2, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
    ]


@pytest.mark.parametrize("pages", [None, 14])  # 14 pages of 8 tokens: preemption under overlap
def test_overlap_schedule_matches_sync(tiny_dir, pages):
    prompts = prompts_of([23, 9, 40, 17, 31, 6, 12], seed=9)
    kw = dict(model=tiny_dir, dtype="float32", page_size=8, num_kv_pages=pages, chunked_prefill_size=32,
              max_model_len=96)
    sync = LLM(**kw)
    assert not sync.engine.cfg.overlap  # the CPU default
    overlap = LLM(**kw)
    overlap.engine.cfg = dataclasses.replace(overlap.engine.cfg, overlap=True)
    want = outputs(sync, prompts, _mixed_params())
    assert outputs(overlap, prompts, _mixed_params()) == want
    assert overlap.engine.overlapped_steps > 10
    if pages:
        assert overlap.engine.num_preemptions > 0
    assert_all_pages_returned(overlap)
    # Penalties read the previous token on the host: such batches wait for it (same outputs, less overlap).
    pen = [SamplingParams(max_tokens=10, temperature=0, repetition_penalty=1.3, frequency_penalty=0.5,
                          presence_penalty=0.2, ignore_eos=True)] * 2 + [SamplingParams(max_tokens=6, **GREEDY)]
    assert outputs(overlap, prompts[:3], pen) == outputs(sync, prompts[:3], pen)


def test_overlap_with_graphs_and_abort(tiny_dir):
    prompts = prompts_of([10, 20, 30], seed=2)
    llm = LLM(model=tiny_dir, dtype="float32", page_size=8, graph_max_bs=4, graph_factory=EagerGraph)
    llm.engine.cfg = dataclasses.replace(llm.engine.cfg, overlap=True)
    ref = LLM(model=tiny_dir, dtype="float32", page_size=8, disable_graphs=True)
    sp = SamplingParams(max_tokens=12, **GREEDY)
    assert outputs(llm, prompts, sp) == outputs(ref, prompts, sp)
    eng = llm.engine
    reqs = [eng.add_request(p, sp) for p in prompts]
    outs = []
    for _ in range(4):
        outs += eng.step()
    assert eng._launched is not None  # a batch is in flight across steps
    assert eng.abort(reqs[1].request_id)
    while eng.has_work():
        outs += eng.step()
    by_id = {}
    for o in outs:
        by_id.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert reqs[1].finish_reason == "abort" and len(reqs[1].output_ids) < 12
    assert by_id[reqs[1].request_id] == reqs[1].output_ids  # nothing after the abort was emitted
    assert [r.output_ids for r in (reqs[0], reqs[2])] == [o.token_ids for o in ref.generate(
        prompt_token_ids=[prompts[0], prompts[2]], sampling_params=sp)]
    assert_all_pages_returned(llm)
