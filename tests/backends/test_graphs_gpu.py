"""CUDA graphs and the overlap scheduler on a GPU: the same tokens and logprobs as the eager synchronous engine, and
a decode step that never waits for the device (checked with torch's sync debug mode). CPU CI covers the same
logic with EagerGraph (tests/test_graphs_overlap.py)."""

from __future__ import annotations

import pytest
import torch

from dsv32 import LLM, SamplingParams
from dsv32.core import registry
from _variants import variants, with_variants

pytestmark = pytest.mark.cuda


def backends_under_test():
    """The GPU backends with device graphs (registered ones of device type "cuda": NVIDIA and ROCm), plus the ROCm
    backend's ops as "rocm-gfx950" (OCP fp8; tests/_variants.py) where no AMD GPU is. One that cannot run here is
    skipped with the reason."""
    found = {n: info for n, info in registry.discover().items()
             if info.cls is not None and getattr(info.cls, "device_type", "") == "cuda"}
    found.update({n: info for n, info in variants().items() if n == "rocm-gfx950"})
    return [pytest.param(n, marks=[] if info.available else pytest.mark.skip(reason=f"{n}: {info.reason}"))
            for n, info in sorted(found.items())] or [
        pytest.param("none", marks=pytest.mark.skip(reason="no GPU backend registered"))]


def _gen(llm, prompts, n=24):
    sp = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=5)
    return [(o.token_ids, [(lp.token_id, lp.logprob, lp.top) for lp in o.outputs[0].logprobs])
            for o in llm.generate(prompt_token_ids=prompts, sampling_params=sp)]


def _prompts(lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("backend", backends_under_test())
@pytest.mark.parametrize("dtype,kv", [("bfloat16", "auto"), ("bfloat16", "fp8_e4m3"), ("float32", "auto")])
def test_graphs_and_overlap_equal_eager(backend, dtype, kv, tiny_dir, monkeypatch):
    """Batches of exactly a captured size (4, 2, 1) replay graphs whose kernels see the same shapes as the eager
    step: identical tokens and bit-identical logprobs. Contexts start below index_topk (16, dense path) and grow
    past it (indexer + top-k + sparse attention, all inside the graph)."""
    with_variants(monkeypatch)
    kw = dict(model=tiny_dir, dtype=dtype, device="cuda", backend=backend, kv_cache_dtype=kv, page_size=8)
    eager = LLM(**kw, disable_graphs=True, disable_overlap_schedule=True)
    fast = LLM(**kw, graph_max_bs=4)
    assert fast.engine.cfg.overlap and sorted(fast.runner.graphs) == [("target", b, 1, s) for b in (1, 2, 4) for s in (False, True)]
    for lengths in ((5, 9, 12, 40), (7, 30), (11,)):
        prompts = _prompts(lengths)
        assert _gen(fast, prompts) == _gen(eager, prompts), lengths
    assert fast.runner.replays >= 3 * 23 and fast.engine.overlapped_steps >= 3 * 20


@pytest.mark.parametrize("backend", backends_under_test())
def test_padded_graph_batches_equal_eager_fp32(backend, tiny_dir, monkeypatch):
    """3 requests replay the graph of 4 (one padding row on the scratch page): same tokens (fp32)."""
    with_variants(monkeypatch)
    kw = dict(model=tiny_dir, dtype="float32", device="cuda", backend=backend, page_size=8)
    prompts = _prompts((6, 20, 33), seed=5)
    got = [t for t, _ in _gen(LLM(**kw, graph_max_bs=4), prompts)]
    assert got == [t for t, _ in _gen(LLM(**kw, disable_graphs=True), prompts)]


@pytest.mark.parametrize("backend", backends_under_test())
@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_decode_step_never_waits_for_the_device(backend, graphs, tiny_dir, monkeypatch):
    """A steady decode step (schedule, build, forward, sample, read back the previous step) makes no synchronizing
    call: torch's sync debug mode turns any into an error. Reading the previous step's tokens waits on its event
    only, never on the batch just launched."""
    with_variants(monkeypatch)
    llm = LLM(model=tiny_dir, dtype="bfloat16", device="cuda", backend=backend, page_size=8,
              disable_graphs=not graphs)
    eng = llm.engine
    sp = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    for p in _prompts((5, 30, 18)):
        eng.add_request(p, sp)
    for _ in range(4):  # prefill and the first decode steps (allocations, first-use kernel loads)
        eng.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):
            eng.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    while eng.has_work():
        eng.step()
    assert all(len(r.output_ids) == 40 for r in eng.running) or not eng.running
