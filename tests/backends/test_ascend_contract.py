"""CONTRACT TESTS, NOT HARDWARE TESTS: the Ascend backend's torch_npu adapters (backends/ascend/npu_kernels.py,
AscendOps) against a fake torch_npu (tests/fakes/torch_npu: torch-npu 2.14's operator schemas — checked against the
real wheel by test_npu_api.py — and the semantics its documentation states, with its hazards). They prove the
adapters call torch_npu as documented (TND batches, rightDownCausal, paged split caches, positions vs slots, valid
indices first) and turn the results into dsv32's op contracts; nothing here ran on an NPU.

Compared with the reference backend. Tolerances: attention bf16 2e-2 abs+rel; the indexer's top-k as sets (its head
weights go to the operator in bf16: ≥ 97% shared, every pick a causal key); MoE / int8 linears within the int8
activation quantization error (relative norm ≤ 0.05); RMSNorm one bf16 ulp."""

from __future__ import annotations

import importlib
import math
import os
import sys

import pytest
import torch

from dsv32.backends.ascend import npu_kernels as nk
from dsv32.backends.ascend.ops import AscendOps
from dsv32.backends.reference.ops import ReferenceOps
from dsv32.core import registry
from dsv32.core.kv_cache import KVCache, KVCacheSpec, SplitLatent
from dsv32.core.ops import AttnMetadata, ExpertWeights, KernelContext, LinearWeight

FAKES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fakes")
BF16 = torch.bfloat16
REF = ReferenceOps("cpu")


@pytest.fixture
def npu(monkeypatch):
    """The fake torch_npu on sys.path for one test."""
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    monkeypatch.syspath_prepend(FAKES)
    nk.status.cache_clear()
    yield importlib.import_module("torch_npu")
    sys.modules.pop("torch_npu", None)
    nk.status.cache_clear()


def _ops(**kernels):
    ops = AscendOps("cpu")
    ops.kernels = {slot: "ascend" for slot in ("dsa_prefill_backend", "dsa_decode_backend", "dsa_indexer_backend",
                                               "moe_runner_backend", "norm_backend")} | kernels
    return ops


def test_platform_and_choices(npu):
    ops = AscendOps("cpu")
    p = ops.platform()
    assert p.fp8_dtype is None and p.latent_layouts == ("split",) and p.page_sizes.problem(64) == ""
    assert p.page_sizes.problem(8) and p.page_sizes.problem(2048) and p.graphs
    assert "no fp8" in p.kv_problems(64, True, False)[0]
    ctx = KernelContext(page_size=128)
    assert ops.select_kernels(ctx)["dsa_decode_backend"] == "ascend"  # no other fast path on an NPU
    assert "multiple of 16" in ops.kernel_options(KernelContext(page_size=8))["dsa_decode_backend"]["ascend"]
    assert "bf16 keys" in ops.kernel_options(KernelContext(indexer_fp8=True))["dsa_indexer_backend"]["ascend"]
    assert ops.select_kernels(ctx, {"moe_runner_backend": "reference"})["moe_runner_backend"] == "reference"


def test_without_torch_npu(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    nk.status.cache_clear()
    try:
        assert nk.status() == "torch_npu is not installed"
        opts = AscendOps("cpu").kernel_options(KernelContext())
        assert all("not installed" in opts[s]["ascend"] and opts[s]["reference"] == "" for s in opts)
        ok, why = registry.discover()["ascend"].cls.is_available()
        assert not ok and "torch_npu is not installed" in why
    finally:
        nk.status.cache_clear()


# ---- a batch: requests on scattered pages, one page shared (prefix cache), tokens shuffled --------------------------
def _batch(reqs, page, g, pages_total=None, share=True):
    n_pages = [math.ceil(n / page) for n, _ in reqs]
    total = pages_total or sum(n_pages) + 2
    perm = torch.randperm(total, generator=g)
    table = torch.full((len(reqs), max(n_pages)), -1, dtype=torch.int32)
    o = 0
    for r, np_ in enumerate(n_pages):
        table[r, :np_] = perm[o:o + np_].int()
        o += np_
    if share and len(reqs) > 1 and min(n_pages[:2]) > 1:
        table[1, 0] = table[0, 0]  # a shared prefix page: the same positions 0..page-1 in both requests
    tok_req, tok_pos = [], []
    for r, (n, nq) in enumerate(reqs):
        tok_req += [r] * nq
        tok_pos += list(range(n - nq, n))
    shuffle = torch.randperm(len(tok_req), generator=g)
    lens = torch.tensor([n for n, _ in reqs])
    return AttnMetadata(torch.tensor(tok_req)[shuffle], torch.tensor(tok_pos)[shuffle], table, lens, lens.tolist(),
                        page, is_decode=all(nq == 1 for _, nq in reqs)), total


def _all_slots(batch, r, n):
    pos = torch.arange(n)
    return batch.block_table[r, pos // batch.page_size].long() * batch.page_size + pos % batch.page_size


# ---- indexer --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reqs", [[(70, 19), (40, 1), (131, 3), (25, 25)], [(90, 1), (33, 1), (200, 1)]],
                         ids=["ragged", "decode"])
def test_indexer_topk(npu, reqs):
    g = torch.Generator().manual_seed(0)
    H, D, topk, page = 8, 64, 32, 16
    batch, total = _batch(reqs, page, g)
    pool = torch.zeros(total, page, D, dtype=BF16)
    for r, (n, _) in enumerate(reqs):
        REF.write_index_keys(pool, torch.randn(n, D, generator=g).to(BF16), _all_slots(batch, r, n))
    T = batch.positions.shape[0]
    q, hw = torch.randn(T, H, D, generator=g).to(BF16), torch.randn(T, H, generator=g)
    got = _ops().indexer_topk(q, hw, pool, batch, D**-0.5, topk)
    want = REF.indexer_topk(q, hw, pool, batch, D**-0.5, topk)
    assert got.shape == (T, topk) and got.dtype == torch.int32
    for t in range(T):
        r, p = int(batch.token_req[t]), int(batch.positions[t])
        causal = set(_all_slots(batch, r, p + 1).tolist())
        a, b = set(got[t].tolist()) - {-1}, set(want[t].tolist()) - {-1}
        assert a <= causal and len(a) == len(b) == min(topk, p + 1)
        assert len(a & b) >= 0.97 * len(b), f"token {t}: {len(a & b)} of {len(b)} shared"


# ---- sparse attention and the KV write ------------------------------------------------------------------------------
def _split_cache(total, page, L, R, dtype=BF16):
    spec = KVCacheSpec(1, total - 1, page, L, R, 16, dtype, False, dtype, latent_layout="split")
    return KVCache(spec, "cpu").latent[0]


def test_sparse_attention(npu):
    g = torch.Generator().manual_seed(1)
    reqs, page, L, R, H = [(70, 3), (40, 1), (50, 2)], 16, 64, 16, 4
    batch, total = _batch(reqs, page, g)
    cache = _split_cache(total, page, L, R)
    assert isinstance(cache, SplitLatent) and cache.nope.shape == (total, page, 1, L)
    for r, (n, _) in enumerate(reqs):
        REF.write_latent_cache(cache, torch.randn(n, L, generator=g).to(BF16), torch.randn(n, R, generator=g).to(BF16),
                               _all_slots(batch, r, n))
    T = batch.positions.shape[0]
    idx = torch.full((T, 24), -1, dtype=torch.int32)
    for t in range(T):
        r, p = int(batch.token_req[t]), int(batch.positions[t])
        pick = _all_slots(batch, r, p + 1)[torch.randperm(p + 1, generator=g)[:24]]
        idx[t, :pick.numel()] = pick.int()
    idx[torch.rand(T, 24, generator=g) < 0.3] = -1  # invalid entries anywhere in a row
    idx[1] = -1  # a row without keys: 0
    q = (torch.randn(T, H, L + R, generator=g) / 9).to(BF16)
    got = _ops().sparse_mla_attention(q, cache, idx, 0.1352338, L, batch)
    want = REF.sparse_mla_attention(q, cache, idx, 0.1352338, L, batch)
    assert not got.isnan().any() and torch.count_nonzero(got[1]) == 0
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


def test_dense_attention_uses_the_operator(npu):
    g = torch.Generator().manual_seed(2)
    reqs, page, L, R = [(20, 20), (37, 2)], 16, 32, 16
    batch, total = _batch(reqs, page, g, share=False)
    cache = _split_cache(total, page, L, R)
    for r, (n, _) in enumerate(reqs):
        REF.write_latent_cache(cache, torch.randn(n, L, generator=g).to(BF16), torch.randn(n, R, generator=g).to(BF16),
                               _all_slots(batch, r, n))
    q = (torch.randn(batch.positions.shape[0], 4, L + R, generator=g) / 7).to(BF16)
    got = _ops().dense_mla_attention(q, cache, batch, 0.2, L)
    torch.testing.assert_close(got.float(), REF.dense_mla_attention(q, cache, batch, 0.2, L).float(), atol=2e-2,
                               rtol=2e-2)


def test_mla_kv_write(npu):
    from dsv32.core.config import RopeConfig
    from dsv32.core.rope import cos_sin_table

    g = torch.Generator().manual_seed(3)
    L, R, T = 64, 16, 9
    cos_sin = cos_sin_table(RopeConfig(rope_type="yarn", factor=40.0, mscale=1.0, mscale_all_dim=1.0), R, 512)
    kv = (torch.randn(T, L + R, generator=g) * 3).to(BF16)
    w = (torch.rand(L, generator=g) + 0.5).to(BF16)
    pos = torch.randint(0, 512, (T,), generator=g)
    slots = torch.randperm(64, generator=g)[:T]
    slots[4] = -1
    got, want = _split_cache(5, 16, L, R), _split_cache(5, 16, L, R)
    _ops().mla_kv_write(kv, L, w, 1e-6, pos, cos_sin, got, slots)
    REF.mla_kv_write(kv, L, w, 1e-6, pos, cos_sin, want, slots)
    all_slots = torch.arange(64)
    torch.testing.assert_close(REF.read_latent(got, all_slots, L, R, torch.float32),
                               REF.read_latent(want, all_slots, L, R, torch.float32), atol=2e-2, rtol=2e-2)


# ---- MoE, routing, int8 linears, RMSNorm -------------------------------------------------------------------------------
def test_routing(npu):
    g = torch.Generator().manual_seed(4)
    logits, bias = torch.randn(9, 32, generator=g), torch.randn(32, generator=g) * 0.2
    w, ids = _ops().moe_route(logits, bias, 4, 2, 4, True, 2.5)
    rw, rids = REF.moe_route(logits, bias, 4, 2, 4, True, 2.5)
    assert ids.dtype == torch.int64 and torch.equal(ids.sort(-1).values, rids.sort(-1).values)
    torch.testing.assert_close(w.gather(1, ids.argsort(-1)), rw.gather(1, rids.argsort(-1)), atol=1e-5, rtol=1e-5)


def _int8(w):
    scale = w.abs().amax(-1, keepdim=True) / 127
    return LinearWeight(torch.round(w / scale).to(torch.int8), scale, (1, w.shape[-1]))


@pytest.mark.parametrize("int8", [False, True], ids=["bf16", "w8a8"])
def test_experts(npu, int8):
    g = torch.Generator().manual_seed(5)
    E, I, K, T = 6, 32, 64, 11

    def lin(n, k):
        w = torch.randn(E, n, k, generator=g) / math.sqrt(k)
        return _int8(w) if int8 else LinearWeight(w.to(BF16))

    raw = ExpertWeights(lin(I, K), lin(I, K), lin(K, I))
    ops = _ops()
    prepared = ops.prepare_experts(raw, BF16)
    x = torch.randn(T, K, generator=g).to(BF16)
    ids = torch.randint(0, E, (T, 3), generator=g)
    ids[2, 0] = E  # another rank's expert
    w = torch.rand(T, 3, generator=g)
    got = ops.moe_experts(x, prepared, w, ids)
    want = REF.moe_experts(x, REF.prepare_experts(raw, BF16), w, ids)
    rel = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert rel < (0.05 if int8 else 1e-2), rel


def test_int8_linear(npu):
    g = torch.Generator().manual_seed(6)
    w = _int8(torch.randn(96, 64, generator=g) / 8)
    ops = _ops()
    prepared = ops.prepare_linear(w, BF16)
    assert prepared.weight.dtype == torch.int8 and prepared.shape == (96, 64)
    x = torch.randn(2, 5, 64, generator=g).to(BF16)
    got, want = ops.linear(x, prepared), REF.linear(x, REF.prepare_linear(w, BF16))
    assert got.shape == (2, 5, 96) and ((got.float() - want.float()).norm() / want.float().norm()) < 0.05


def test_rms_norm(npu):
    g = torch.Generator().manual_seed(7)
    x, res = torch.randn(6, 64, generator=g).to(BF16), torch.randn(6, 64, generator=g).to(BF16)
    w = (torch.rand(64, generator=g) + 0.5).to(BF16)
    ops = _ops()
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6).float(), REF.rms_norm(x, w, 1e-6).float(), atol=0, rtol=2**-7)
    y, r = ops.rms_norm(x, w, 1e-6, res)
    y_ref, r_ref = REF.rms_norm(x, w, 1e-6, res)
    assert torch.equal(r, r_ref)
    torch.testing.assert_close(y.float(), y_ref.float(), atol=0, rtol=2**-7)


# ---- the engine on the fake NPU ------------------------------------------------------------------------------------
def _register_cpu_ascend(monkeypatch):
    from dsv32.backends.ascend import AscendBackend

    class AscendOnCpu(AscendBackend):
        name = "ascend-cpu"
        priority = None

        @classmethod
        def is_available(cls):
            return True, ""

        @classmethod
        def default_device(cls):
            return "cpu"

        @classmethod
        def total_memory_bytes(cls, device):
            return 8 << 30

        @classmethod
        def create(cls, device):
            return AscendOps(device)

    original = registry.discover
    info = registry.BackendInfo("ascend-cpu", AscendOnCpu, True, "", None)
    monkeypatch.setattr(registry, "discover", lambda: {**original(), "ascend-cpu": info})


def _near_ties(got, want, max_gap):
    for a, b in zip(got, want):
        for tok, lp in zip(a.token_ids, b.logprobs):
            top = dict(lp.top)
            assert tok in top and lp.top[0][1] - top[tok] <= max_gap, (a.token_ids, b.token_ids)
            if tok != lp.token_id:
                break


@pytest.mark.parametrize("weights", ["bf16", "w8a8"])
def test_engine_on_fake_npu(npu, weights, tmp_path, monkeypatch):
    """The whole engine with every torch_npu operator (split latent cache, pages of 16, the exact indexer, prompts
    longer than index_topk so the lightning indexer and sparse attention run; a W8A8 msModelSlim checkpoint keeps its
    int8 linears and experts): the reference's greedy tokens or a near-tie of them (bf16; W8A8 adds int8 activations)."""
    from _tiny import convert_to_modelslim_checkpoint, decisive_routing, make_checkpoint

    from dsv32 import LLM, SamplingParams

    _register_cpu_ascend(monkeypatch)
    make_checkpoint(str(tmp_path / "src"), seed=4)
    model = decisive_routing(str(tmp_path / "src"))  # bf16 routing flips would measure the router, not the operators
    if weights == "w8a8":
        convert_to_modelslim_checkpoint(model, str(tmp_path / "w8a8"), str(tmp_path / "deq"))
        model = str(tmp_path / "w8a8")
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=10)
    prompts = [list(range(3, 45)), [7, 8, 9]]
    llm = LLM(model=model, dtype="bfloat16", backend="ascend-cpu", page_size=16)
    assert isinstance(llm.core.kv_cache.latent[0], SplitLatent)
    assert llm.ops.kernel_sources["indexer_topk"] == "ascend-cpu" and llm.ops.kernels["dsa_indexer_backend"] == "ascend"
    if weights == "w8a8":
        assert any(getattr(w, "weight", None) is not None and w.weight.dtype == torch.int8
                   for w in llm.core.model.w.values())
    got = [o.outputs[0] for o in llm.generate(prompt_token_ids=prompts, sampling_params=sp)]
    want = [o.outputs[0] for o in LLM(model=model, dtype="bfloat16", backend="reference", page_size=16).generate(
        prompt_token_ids=prompts, sampling_params=sp)]
    _near_ties(got, want, 0.3 if weights == "bf16" else 0.6)


def test_modelslim_checkpoint_loads_exactly(tmp_path):
    """W8A8 int8 weights mean int8 · scale: on the reference backend (which dequantizes them) the engine gives the
    tokens of the dequantized checkpoint, exactly (fp32)."""
    from _tiny import convert_to_modelslim_checkpoint, make_checkpoint

    from dsv32 import LLM, SamplingParams

    make_checkpoint(str(tmp_path / "src"), seed=5)
    convert_to_modelslim_checkpoint(str(tmp_path / "src"), str(tmp_path / "w8a8"), str(tmp_path / "deq"))
    sp = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    prompts = [list(range(3, 40)), [5, 9, 2, 7]]
    llm = LLM(model=str(tmp_path / "w8a8"), dtype="float32")
    assert llm.config.modelslim and llm.core.resolved.indexer_precision == "exact"
    got = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=sp)]
    want = [o.token_ids for o in LLM(model=str(tmp_path / "deq"), dtype="float32").generate(
        prompt_token_ids=prompts, sampling_params=sp)]
    assert got == want


def test_modelslim_checkpoint_loads_one_expert_parallel_rank(tmp_path):
    """Under --ep, another rank's int8 experts are shape-checked as int8 [N, K] (not as packed FP4 bytes) and not read;
    this rank's experts are the whole checkpoint's."""
    from _tiny import convert_to_modelslim_checkpoint, make_checkpoint

    from dsv32.core.config import ModelConfig
    from dsv32.core.model.checkpoint import load_weights
    from dsv32.core.model.plan import ParallelPlan
    from dsv32.core.parallel import ParallelConfig

    make_checkpoint(str(tmp_path / "src"), seed=5)
    path = str(tmp_path / "w8a8")
    convert_to_modelslim_checkpoint(str(tmp_path / "src"), path, str(tmp_path / "deq"))
    cfg = ModelConfig.from_pretrained(path)
    ops = ReferenceOps("cpu")
    full = load_weights(path, cfg, ops, torch.float32, "cpu", progress=False)
    plan = ParallelPlan(cfg, ParallelConfig(tp_size=2, ep_size=2).layout(1))
    part = load_weights(path, cfg, ops, torch.float32, "cpu", progress=False, plan=plan)
    first, n = plan.expert_range()
    name = next(k for k in full if k.endswith("mlp.experts"))
    assert 0 < n < cfg.n_routed_experts
    torch.testing.assert_close(part[name].down.weight, full[name].down.weight[first:first + n], rtol=0, atol=0)


def test_modelslim_refusals(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from _tiny import convert_to_modelslim_checkpoint, make_checkpoint

    from dsv32 import LLM
    from dsv32.core.model.checkpoint import CheckpointError

    make_checkpoint(str(tmp_path / "src"), seed=6)
    dst = str(tmp_path / "w8a8")
    convert_to_modelslim_checkpoint(str(tmp_path / "src"), dst, str(tmp_path / "deq"))
    path = os.path.join(dst, "quant_model_description.json")
    desc = json.load(open(path))
    name = next(k for k, v in desc.items() if v == "W8A8_DYNAMIC" and k.endswith("q_a_proj.weight"))
    json.dump(dict(desc, **{name: "W8A8"}), open(path, "w"))
    with pytest.raises(CheckpointError, match=f"'{name}' is W8A8 .*only W8A8_DYNAMIC and FLOAT"):
        LLM(model=dst)
    json.dump(desc, open(path, "w"))
    weights = load_file(os.path.join(dst, "model.safetensors"))
    weights[name + "_offset"] = torch.ones_like(weights[name + "_offset"])
    save_file(weights, os.path.join(dst, "model.safetensors"))
    with pytest.raises(CheckpointError, match="asymmetric int8 weights are not supported"):
        LLM(model=dst)
