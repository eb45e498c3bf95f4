"""MTP speculative decoding (core/engine/speculative.py): greedy output with speculation equals output without it,
token for token; rejected drafts are rolled back (every page returns); the rejection sampler keeps the target's
distribution; the flags' errors.

Two kinds of drafts: the checkpoint's random MTP layer (its drafts are almost always rejected: the plain path), and an
"oracle" that replaces the MTP layer's drafts by the known greedy continuation with some tokens corrupted, so that
steps accept 0..k drafts (rollback at every offset). The MTP layer itself still runs (its KV is written every step)."""

from __future__ import annotations

import random
import shutil

import pytest
import torch
from _tiny import make_mtp_checkpoint
from test_engine import GREEDY, assert_all_pages_returned, prompts_of

from dsv32 import LLM, SamplingParams
from dsv32.core.demo import make_demo_checkpoint


@pytest.fixture(scope="module")
def mtp_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mtp"))
    make_mtp_checkpoint(path, seed=4)
    return path


@pytest.fixture(scope="module")
def mtp_text_dir(tmp_path_factory):
    """A random MTP checkpoint with the demo tokenizer (stop strings need text)."""
    demo = make_demo_checkpoint(str(tmp_path_factory.mktemp("demo")))
    path = str(tmp_path_factory.mktemp("mtp_text"))
    make_mtp_checkpoint(path, seed=6, vocab_size=512)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{demo}/{name}", f"{path}/{name}")
    return path


def run(llm, prompts, params):
    return [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]


def spec_llm(path, steps=3, **kw):
    return LLM(model=path, dtype="float32", speculative_algorithm="EAGLE", speculative_num_steps=steps, **kw)


def use_oracle_drafts(llm, refs: dict, corrupt: float = 0.3, seed: int = 0, vocab: int = 320):
    """After each step's MTP drafting, replace every request's drafts by its reference continuation (refs: prompt
    tuple → greedy output), each token corrupted with probability `corrupt`."""
    spec, rng = llm.engine.spec, random.Random(seed)

    def oracle(drafting):  # the MTP drafting (after an eager / ragged step, or queued after a uniform one), then this
        def run(launched):
            drafting(launched)
            for req in llm.engine.running:
                if req.draft_ids:
                    n, k = len(req.output_ids), len(req.draft_ids)
                    want = (refs[tuple(req.prompt_ids)][n:n + k] + [0] * k)[:k]
                    req.draft_ids = [t if rng.random() >= corrupt else (t + 1) % vocab for t in want]
        return run

    spec.draft, spec.take_drafts = oracle(spec.draft), oracle(spec.take_drafts)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_greedy_with_mtp_drafts_equals_plain(mtp_dir, steps):
    prompts = prompts_of([17, 7, 30, 1], seed=steps)
    sp = SamplingParams(max_tokens=20, **GREEDY)
    want = run(LLM(model=mtp_dir, dtype="float32"), prompts, sp)
    llm = spec_llm(mtp_dir, steps, page_size=4)
    assert run(llm, prompts, sp) == want
    s = llm.stats()
    assert s["spec_verify_steps"] > 0 and s["spec_drafted_tokens"] > 0
    assert s["avg_spec_accept_length"] >= 1.0 and sum(s["spec_accept_histogram"]) == s["spec_verify_steps"]
    assert_all_pages_returned(llm)


@pytest.mark.parametrize("corrupt", [0.0, 0.3, 0.7])
def test_oracle_drafts_accept_and_roll_back(mtp_dir, corrupt):
    """Accepted drafts (all, some, few): output identical, accept length > 1, every page back. Small pages and chunked
    prefill so that verify rows and rollbacks cross page and chunk boundaries."""
    prompts = prompts_of([23, 9, 41, 3, 16], seed=7)
    sp = SamplingParams(max_tokens=25, **GREEDY)
    want = run(LLM(model=mtp_dir, dtype="float32"), prompts, sp)
    llm = spec_llm(mtp_dir, 3, page_size=4, chunked_prefill_size=12)
    use_oracle_drafts(llm, {tuple(p): w for p, w in zip(prompts, want)}, corrupt, seed=int(corrupt * 10))
    assert run(llm, prompts, sp) == want
    s = llm.stats()
    hist = s["spec_accept_histogram"]
    if corrupt == 0.0:
        assert s["avg_spec_accept_length"] > 3.5 and hist[4] > 0
    else:
        assert 1.0 < s["avg_spec_accept_length"] < 4.0 and hist[1] > 0 and sum(hist[2:]) > 0
    assert_all_pages_returned(llm)


def test_speculation_with_preemption_prefix_cache_and_n(mtp_dir):
    """A pool too small for the batch (preemption, recompute), shared prefixes (prefix cache), n > 1 and seeded
    sampling rows mixed with greedy ones: greedy rows identical to plain decoding, every page back."""
    base = prompts_of([14, 22, 9], seed=8)
    prompts = base + [base[0] + [5, 6, 7, 8, 9, 10], base[1][:16] + [1, 2, 3]]
    greedy = SamplingParams(max_tokens=24, **GREEDY)
    want = run(LLM(model=mtp_dir, dtype="float32", page_size=4), prompts, greedy)
    llm = spec_llm(mtp_dir, 2, page_size=4, num_kv_pages=30, max_model_len=64)
    use_oracle_drafts(llm, {tuple(p): w for p, w in zip(prompts, want)}, 0.2, seed=3)
    params = [greedy] * len(prompts) + [SamplingParams(max_tokens=24, n=2, temperature=0.9, seed=1, ignore_eos=True)]
    outs = llm.generate(prompt_token_ids=prompts + [base[2]], sampling_params=params)
    assert [o.token_ids for o in outs[:len(prompts)]] == want
    assert [len(c.token_ids) for c in outs[-1].outputs] == [24, 24]
    assert llm.engine.num_preemptions > 0
    assert llm.engine.prefix_cache.hit_tokens > 0
    assert llm.stats()["avg_spec_accept_length"] > 1.5
    assert_all_pages_returned(llm)


def test_speculation_with_penalties_logprobs_stops(mtp_text_dir):
    """Penalties see the drafts before each row (as if generated), min_tokens / stop tokens / stop strings end the
    request at the first stopping token of an accepted run, logprobs come for every emitted token."""
    prompts = prompts_of([12, 20, 8, 15], seed=9, vocab=512)
    params = [SamplingParams(max_tokens=30, temperature=0, repetition_penalty=1.3, frequency_penalty=0.5,
                             presence_penalty=0.3, ignore_eos=True),
              SamplingParams(max_tokens=30, temperature=0, logprobs=3, ignore_eos=True),
              SamplingParams(max_tokens=30, temperature=0, min_tokens=10, ignore_eos=False),
              SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)]
    plain = LLM(model=mtp_text_dir, dtype="float32")
    ref = plain.generate(prompt_token_ids=prompts, sampling_params=params)
    want = [o.outputs[0].token_ids for o in ref]
    # a stop token and a stop string that the plain run reaches midway
    params[3] = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop_token_ids=[want[3][9]])
    text = ref[0].outputs[0].text
    params[0] = SamplingParams(**{**params[0].__dict__, "stop": [text[len(text) // 2:len(text) // 2 + 2]]})
    ref = plain.generate(prompt_token_ids=prompts, sampling_params=params)
    want = [o.outputs[0].token_ids for o in ref]
    llm = spec_llm(mtp_text_dir, 3, page_size=4)
    use_oracle_drafts(llm, {tuple(p): w for p, w in zip(prompts, want)}, 0.25, seed=5, vocab=512)
    got = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    assert [o.outputs[0].token_ids for o in got] == want
    assert [o.outputs[0].text for o in got] == [o.outputs[0].text for o in ref]
    assert [o.outputs[0].finish_reason for o in got] == [o.outputs[0].finish_reason for o in ref]
    a, b = ref[1].outputs[0].logprobs, got[1].outputs[0].logprobs
    assert len(a) == len(b) == len(want[1])
    for x, y in zip(a, b):  # verify rows are computed in a multi-token batch: fp32 rounding differs slightly
        assert x.token_id == y.token_id and abs(x.logprob - y.logprob) < 1e-4
        assert [t for t, _ in x.top] == [t for t, _ in y.top]
    assert llm.stats()["avg_spec_accept_length"] > 1.5


def _verify_impl(name):
    """Ops.verify of the reference backend (row by row) or of the GPU backends (batched torch ops, also on the CPU)."""
    from dsv32.backends.reference.ops import ReferenceOps
    from dsv32.backends.triton import sampling

    return ReferenceOps() if name == "reference" else sampling


@pytest.mark.parametrize("impl", ["reference", "batched"])
@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7, top_k=3), dict(temperature=1.3, top_p=0.8),
                                dict(temperature=1.0, min_p=0.2)])
def test_rejection_sampling_preserves_the_target_distribution(kw, impl):
    """Ops.verify with a one-hot draft: the emitted token's frequencies over N draws match the target distribution p
    (as `sample` defines it from the row's parameters). Bound: every token's frequency within 5 standard errors
    (sqrt(p(1-p)/N)) + 1e-3 of p; the draft is accepted with frequency p(draft). Seeded: deterministic."""
    from dsv32.backends.reference.ops import _sampling_probs

    ops = _verify_impl(impl)
    V, N = 8, 20000
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 3.0]])
    p = _sampling_probs(logits[0], kw["temperature"], kw.get("top_p", 1.0), kw.get("top_k", -1), kw.get("min_p", 0.0))
    p = p / p.sum()
    for draft in (0, 1, 6):  # likely, less likely, and (with the cuts) impossible drafts
        rows = logits.expand(N, V).contiguous()
        f32 = dict(dtype=torch.float32)
        out = ops.verify(rows, torch.full((N,), draft), torch.full((N,), kw["temperature"], **f32),
                         torch.full((N,), kw.get("top_p", 1.0), **f32), torch.full((N,), kw.get("top_k", -1)),
                         torch.full((N,), kw.get("min_p", 0.0), **f32), [torch.Generator().manual_seed(draft)] * N)
        freq = torch.bincount(out, minlength=V).double() / N
        bound = 5 * (p * (1 - p) / N).sqrt() + 1e-3
        assert ((freq - p).abs() <= bound).all(), (draft, freq, p)


@pytest.mark.parametrize("impl", ["reference", "batched"])
def test_greedy_verify_accepts_only_the_argmax(impl):
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    z = torch.zeros(3)
    out = _verify_impl(impl).verify(logits, torch.tensor([1, 2, -1]), z, z + 1, torch.full((3,), -1), z, [None] * 3)
    assert out.tolist() == [1, 0, 2]


def test_batched_verify_mixes_rows_and_is_seeded():
    """One batch of greedy, drafted and undrafted sampled rows: greedy rows emit the argmax, a draft the target
    cannot produce (top-k cut) is never emitted, a sure draft (p = 1 after top-k 1) always is, and seeded rows give
    the same tokens in any batch (their own generator draws their uniforms and noise)."""
    from dsv32.backends.triton.sampling import verify

    logits = torch.tensor([[0.0, 3.0, 1.0, 0.5], [2.0, 0.0, 1.0, 0.5], [0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 3.0, 4.0]])
    temps = torch.tensor([0.0, 1.0, 1.0, 1.0])
    top_k = torch.tensor([-1, 2, -1, 1])
    ones, zeros = torch.ones(4), torch.zeros(4)
    drafts = torch.tensor([1, 1, -1, 3])  # row 1: token 1 is outside its top 2 (tokens 0, 2)
    for seed in range(20):
        gens = [None, torch.Generator().manual_seed(seed), torch.Generator().manual_seed(100 + seed), None]
        out = verify(logits, drafts, temps, ones, top_k, zeros, gens).tolist()
        assert out[0] == 1 and out[1] in (0, 2) and out[3] == 3
        alone = verify(logits[2:3], drafts[2:3], temps[2:3], ones[:1], top_k[2:3], zeros[:1],
                       [torch.Generator().manual_seed(100 + seed)])
        assert alone.tolist() == [out[2]]


def test_speculative_flag_errors(mtp_dir, tiny_dir):
    with pytest.raises(ValueError, match="eagle_topk"):
        spec_llm(mtp_dir, 3, speculative_eagle_topk=4)
    with pytest.raises(ValueError, match="num_draft_tokens"):
        spec_llm(mtp_dir, 3, speculative_num_draft_tokens=8)
    with pytest.raises(ValueError, match="EAGLE3|'EAGLE' or 'NEXTN'"):
        LLM(model=mtp_dir, dtype="float32", speculative_algorithm="EAGLE3")
    with pytest.raises(ValueError, match="needs speculative_algorithm"):
        LLM(model=mtp_dir, dtype="float32", speculative_num_steps=2)
    with pytest.raises(ValueError, match="no MTP layer"):
        spec_llm(tiny_dir, 2)
    ok = LLM(model=mtp_dir, dtype="float32", speculative_algorithm="NEXTN", speculative_num_steps=2,
             speculative_eagle_topk=1, speculative_num_draft_tokens=3)
    assert ok.engine.spec.k == 2 and ok.kv_cache.spec.num_layers == ok.config.num_hidden_layers + 1


def test_served_with_speculation(mtp_text_dir, tmp_path):
    """`dsv32 serve --speculative-algorithm EAGLE ...`: greedy completions equal the plain offline engine's; the accept
    length reaches /metrics (SGLang's gauge and a histogram), /server_info and `dsv32 bench serve`'s result block."""
    import json
    import subprocess
    import sys

    from _live import Server, http

    prompt = prompts_of([21], seed=12, vocab=512)[0]
    want = run(LLM(model=mtp_text_dir, dtype="float32"), [prompt], SamplingParams(max_tokens=12, **GREEDY))[0]
    server = Server(mtp_text_dir, "--speculative-algorithm", "NEXTN", "--speculative-num-steps", "2",
                    "--speculative-eagle-topk", "1", "--speculative-num-draft-tokens", "3", "--enable-metrics")
    try:
        r = http.post(server.url + "/generate", json={"input_ids": prompt, "sampling_params": {
            "max_new_tokens": 12, "temperature": 0, "ignore_eos": True}}).json()
        assert r["output_ids"] == want
        chat = server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=10)
        assert chat.choices[0].finish_reason in ("stop", "length")
        m = server.metrics()
        assert m["sglang:spec_accept_length"] >= 1.0 and m["dsv32_spec_accept_length_count"] > 0
        info = http.get(server.url + "/server_info").json()
        assert info["internal_states"][0]["avg_spec_accept_length"] >= 1.0
        out = tmp_path / "bench.jsonl"
        b = subprocess.run([sys.executable, "-m", "dsv32.server.cli", "bench", "serve", "--port", str(server.port),
                            "--num-prompts", "3", "--random-input-len", "20", "--random-output-len", "6",
                            "--max-concurrency", "3", "--output-file", str(out), "--disable-tqdm"],
                           capture_output=True, text=True, timeout=300)
        assert b.returncode == 0, b.stderr
        assert "Accept length:" in b.stdout
        assert json.loads(out.read_text().splitlines()[-1])["accept_length"] >= 1.0
    finally:
        server.stop()


@pytest.mark.parametrize("steps", [1, 3])
def test_speculation_replays_verify_and_draft_graphs(mtp_dir, steps):
    """Graphs (EagerGraph on the CPU: replay re-runs the captured pass on the static buffers): verify batches padded
    to k + 1 tokens per request, the MTP extend after them and the chain replay graphs of their kind, the drafting
    queued on the device right after the verify (positions from the accepted counts); greedy output equal to the plain
    eager run's, oracle drafts accepted, every page back."""
    from dsv32.core.engine.runner import EagerGraph

    prompts = prompts_of([13, 5, 26], seed=11)
    sp = SamplingParams(max_tokens=22, **GREEDY)
    want = run(LLM(model=mtp_dir, dtype="float32", page_size=4), prompts, sp)
    llm = spec_llm(mtp_dir, steps, page_size=4, graph_max_bs=4, graph_factory=EagerGraph)
    kinds = {(key.kind, key.tokens) for key in llm.runner.graphs}
    assert kinds == {("target", 1), ("target", steps + 1), ("mtp", 1), ("mtp", steps + 1)}
    replayed = []
    orig = llm.runner._replay
    llm.runner._replay = lambda g, fb: replayed.append(
        next(k for k, v in llm.runner.graphs.items() if v is g)) or orig(g, fb)
    use_oracle_drafts(llm, {tuple(p): w for p, w in zip(prompts, want)}, 0.25, seed=steps)
    queued, take = [], llm.engine.spec.take_drafts
    llm.engine.spec.take_drafts = lambda launched: queued.append(1) or take(launched)
    assert run(llm, prompts, sp) == want
    assert len(queued) > 5  # uniform steps drafted on the device right after their verify (one sync per step)
    seen = {(k.kind, k.tokens) for k in replayed}
    assert ("target", steps + 1) in seen and ("mtp", steps + 1) in seen
    assert steps == 1 or ("mtp", 1) in seen
    assert llm.stats()["avg_spec_accept_length"] > 1.3
    assert_all_pages_returned(llm)
