"""Tensor, expert and attention-data parallelism (core/parallel.py, core/model/plan.py, core/engine/worker.py) on the
CPU: several rank processes over gloo, compared token for token with a single process and with transformers (fp32).

The checkpoint is tie-free: 32 indexer heads (a key scoring exactly 0 on every head is practically impossible), prompts
longer than index_topk, n_group 2, a dense first layer. With DSV32_CHECK_RANK_AGREEMENT=1 the ranks of an attention
group also compare their indexer top-k at every layer and stop on any difference.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from _tiny import convert_to_fp8_checkpoint, hf_greedy, make_checkpoint

from dsv32 import LLM, SamplingParams
from dsv32.core.config import ModelConfig, deepseek_v32_config
from dsv32.core.engine.launcher import RankFailure
from dsv32.core.model.checkpoint import CheckpointError, dummy_weights, load_weights
from dsv32.core.model.plan import ParallelPlan
from dsv32.core.model.specs import weight_specs
from dsv32.core.parallel import ParallelConfig

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
LAYOUTS = {
    "tp2": dict(tp_size=2),
    "tp4": dict(tp_size=4),
    "tp2-ep2": dict(tp_size=2, ep_size=2),
    "tp4-ep4": dict(tp_size=4, ep_size=4),
    "tp4-ep2": dict(tp_size=4, ep_size=2),  # experts split over 2 groups, each expert's columns over 2 ranks
    "dp2": dict(tp_size=2, dp_size=2, enable_dp_attention=True),
    "tp4-dp2": dict(tp_size=4, dp_size=2, enable_dp_attention=True),  # 2 attention groups of 2 ranks
}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(checkpoint dir, prompts, transformers' greedy tokens, single-process greedy tokens)."""
    path = str(tmp_path_factory.mktemp("parallel"))
    hf = make_checkpoint(path, seed=5, n_group=2, topk_group=1, first_k_dense_replace=1, index_n_heads=32,
                         index_topk=16)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 320, (n,), generator=g).tolist() for n in (41, 23, 9, 30, 17)]
    want_hf = [hf_greedy(hf, p, GREEDY.max_tokens) for p in prompts]
    single = LLM(model=path, dtype="float32", device="cpu")
    want = [o.token_ids for o in single.generate(prompt_token_ids=prompts, sampling_params=GREEDY)]
    assert want == want_hf
    return path, prompts, want_hf


@pytest.fixture
def check_agreement(monkeypatch):
    monkeypatch.setenv("DSV32_CHECK_RANK_AGREEMENT", "1")  # inherited by the spawned ranks


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_parallel_greedy_equals_single_process_and_transformers(model, layout, check_agreement):
    path, prompts, want = model
    llm = LLM(model=path, dtype="float32", device="cpu", **LAYOUTS[layout])
    try:
        got = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)]
        assert got == want
        # the ranks' weights are their parts only (each rank read less than the whole checkpoint)
        read = [m["checkpoint_read"] for m in llm._ranks.info["memory_per_rank"]]
        total = llm._ranks.info["memory_per_rank"][0]["checkpoint_total"]
        assert len(read) == LAYOUTS[layout]["tp_size"] and all(r < total for r in read)
    finally:
        llm.shutdown()


def test_parallel_under_preemption_chunking_and_sampling(model):
    """TP 2 with a KV pool small enough to preempt, chunked prefill, seeded sampling with n=2, stop ids and mixed
    lengths: the same completions as one process with the same settings."""
    path, prompts, _ = model
    kw = dict(model=path, dtype="float32", device="cpu", page_size=8, num_kv_pages=14, chunked_prefill_size=24,
              max_model_len=96)
    params = [SamplingParams(max_tokens=14, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=9, temperature=0.8, top_k=20, seed=7, n=2, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[5, 17, 40, 99, 101, 200], min_tokens=2),
              SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=1, temperature=0)]

    def run(llm):
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
        return [[(c.token_ids, c.finish_reason) for c in o.outputs] for o in outs]

    single = LLM(**kw)
    want = run(single)
    assert single.engine.num_preemptions > 0
    tp = LLM(tp_size=2, **kw)
    try:
        assert run(tp) == want
    finally:
        tp.shutdown()


@pytest.mark.parametrize("layout", ["tp2", "dp2", "tp4-dp2"])
def test_parallel_with_graphs_and_overlap(model, layout, monkeypatch):
    """Decode graphs (EagerGraph stands in for CUDA graphs on the CPU) and the overlap scheduler in rank processes:
    with attention DP, groups with different batch sizes pad to one captured size (a group without requests replays
    it with padding rows). Same tokens as one process."""
    path, prompts, want = model
    monkeypatch.setenv("DSV32_DEBUG_EAGER_GRAPHS", "1")
    monkeypatch.setenv("DSV32_DEBUG_FORCE_OVERLAP", "1")
    llm = LLM(model=path, dtype="float32", device="cpu", graph_max_bs=8, **LAYOUTS[layout])
    try:
        assert [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)] == want
        assert llm._ranks.stats["graph_replays"] > 0 and llm._ranks.stats["overlapped_steps"] > 0
    finally:
        llm.shutdown()


def test_fp8_checkpoint_scales_sliced_with_the_weights(tmp_path, model):
    """An FP8-block checkpoint with 16-wide blocks (so the tiny weights span several scale blocks): each rank slices
    the scale blocks of its part; greedy output equals transformers on the dequantized weights (with transformers'
    exact indexer), under TP 2 + EP 2."""
    src, dst, deq = tmp_path / "src", tmp_path / "fp8", tmp_path / "deq"
    make_checkpoint(str(src), seed=8, n_group=2, topk_group=1, first_k_dense_replace=1, index_topk=16)
    convert_to_fp8_checkpoint(str(src), str(dst), str(deq), block=16)
    from _tiny import load_hf

    _, prompts, _ = model
    want = [hf_greedy(load_hf(str(deq)), p, 6) for p in prompts[:3]]
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    llm = LLM(model=str(dst), dtype="float32", device="cpu", tp_size=2, ep_size=2, indexer_precision="exact")
    try:
        assert [o.token_ids for o in llm.generate(prompt_token_ids=prompts[:3], sampling_params=sp)] == want
    finally:
        llm.shutdown()


def test_killed_rank_ends_the_run_naming_it(model):
    path, prompts, _ = model
    llm = LLM(model=path, dtype="float32", device="cpu", tp_size=2)
    try:
        victim = llm._ranks.procs[1]
        os.kill(victim.pid, signal.SIGKILL)
        with pytest.raises(RankFailure, match=rf"rank 1 \(pid {victim.pid}\) killed by signal SIGKILL"):
            llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    finally:
        llm.shutdown()


def test_frozen_rank_ends_the_run_within_the_timeout(model):
    path, prompts, _ = model
    llm = LLM(model=path, dtype="float32", device="cpu", tp_size=2, dist_timeout_s=4)
    try:
        victim = llm._ranks.procs[1]
        os.kill(victim.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(RankFailure, match=r"rank 1 stopped answering"):
            llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
        assert time.monotonic() - t0 < 4 + 10
        os.kill(victim.pid, signal.SIGCONT)
    finally:
        llm.shutdown()


def test_rank_that_cannot_start_is_named(model, monkeypatch):
    path, _, _ = model
    monkeypatch.setenv("DSV32_DSA_PREFILL_DENSE_ATTN_KV_LEN_THRESHOLD", "many")  # every rank fails to build
    with pytest.raises(RankFailure, match=r"engine failed to start: rank \d: ValueError: .*must be an integer"):
        LLM(model=path, dtype="float32", device="cpu", tp_size=2)


# ---- the layout and the plan, without processes -----------------------------------------------------------------------
def test_layout_flags_are_checked():
    assert ParallelConfig(tp_size=8, dp_size=8, enable_dp_attention=True, ep_size=8).problems() == []
    msgs = " | ".join(ParallelConfig(tp_size=8, dp_size=3).problems()
                      + ParallelConfig(tp_size=8, dp_size=3, enable_dp_attention=True).problems()
                      + ParallelConfig(tp_size=6, ep_size=4, nnodes=4).problems()
                      + ParallelConfig(tp_size=2, nnodes=2, node_rank=2, dist_init_addr="host").problems())
    for needle in ("without --enable-dp-attention", "--dp 3 must divide --tp 8", "--ep 4 must divide --tp 6",
                   "--nnodes 4 must divide --tp 6", "--node-rank 2 must be in [0, --nnodes 2)", "expected HOST:PORT"):
        assert needle in msgs
    cfg = ModelConfig.from_dict(deepseek_v32_config())
    assert ParallelConfig(tp_size=8, ep_size=8).model_problems(cfg) == []
    assert "128 attention heads cannot be split over 3" in ParallelConfig(tp_size=3).model_problems(cfg)[0]
    layout = ParallelConfig(tp_size=8, dp_size=4, enable_dp_attention=True, ep_size=4, nnodes=2).layout(5)
    assert (layout.attn_dp_rank, layout.attn_tp_rank, layout.moe_ep_rank, layout.moe_tp_rank, layout.local_rank) == \
        (2, 1, 2, 1, 1)
    assert layout.attn_group_ranks == (4, 5) and not layout.is_attn_leader


def test_plan_shapes_of_the_official_model():
    """What one of 8 ranks holds of DeepSeek-V3.2 under TP 8, TP 8 + EP 8 and DP-attention 8."""
    cfg = ModelConfig.from_dict(deepseek_v32_config())
    specs = weight_specs(cfg)

    def shapes(**kw):
        plan = ParallelPlan(cfg, ParallelConfig(**kw).layout(3))
        return {n.replace("model.layers.3.", "L."): plan.local_shape(n, s) for n, s in specs.items()
                if n.startswith("model.layers.3.") or "layers" not in n}

    tp = shapes(tp_size=8)
    assert tp["L.self_attn.q_b_proj.weight"] == (16 * 192, 1536)
    assert tp["L.self_attn.kv_b_proj.weight"] == (16 * 256, 512)
    assert tp["L.self_attn.o_proj.weight"] == (7168, 16 * 128)
    assert tp["L.self_attn.indexer.wq_b.weight"] == (8192, 1536)  # the indexer is replicated
    assert tp["L.mlp.experts"] == (256, 256, 7168) and tp["L.mlp.shared_experts.down_proj.weight"] == (7168, 256)
    assert tp["model.embed_tokens.weight"] == tp["lm_head.weight"] == (16160, 7168)
    assert shapes(tp_size=8, ep_size=8)["L.mlp.experts"] == (32, 2048, 7168)
    dp = shapes(tp_size=8, dp_size=8, enable_dp_attention=True, ep_size=8)
    assert dp["L.self_attn.o_proj.weight"] == (7168, 16384) and dp["model.embed_tokens.weight"] == (129280, 7168)
    assert dp["L.mlp.experts"] == (32, 2048, 7168) and dp["L.mlp.shared_experts.gate_proj.weight"] == (256, 7168)
    assert ParallelPlan(cfg, ParallelConfig(tp_size=8, ep_size=8).layout(3)).expert_range() == (96, 32)
    odd = ParallelPlan(cfg, ParallelConfig(tp_size=3 * 128).layout(383))  # 129280 rows in 384 parts: padded last part
    assert odd.shard("lm_head.weight").bounds(129280) == (129071, 129280) and odd.shard("lm_head.weight").size(129280) == 337


def test_dummy_weights_of_a_rank_are_its_part_of_the_whole(tmp_path):
    """--load-format dummy under a plan: each rank's tensors equal the same part of a single process's (FP8 blocks
    sliced with their scales), so parallel runs on dummy weights compute the same model."""
    from dsv32.backends.reference.ops import ReferenceOps

    raw = deepseek_v32_config(hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=2,
                              first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=128,
                              qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32, index_n_heads=4,
                              index_head_dim=64, n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2,
                              vocab_size=300, quantization_config={"quant_method": "fp8", "fmt": "e4m3",
                                                                   "weight_block_size": [64, 64]})
    cfg = ModelConfig.from_dict(raw)
    ops = ReferenceOps("cpu")
    full = dummy_weights(cfg, ops, torch.float32, "cpu")
    for rank in range(4):
        plan = ParallelPlan(cfg, ParallelConfig(tp_size=4, ep_size=2).layout(rank))
        part = dummy_weights(cfg, ops, torch.float32, "cpu", plan=plan)
        assert set(part) == set(full)
        for name, w in part.items():
            whole = full[name]
            if name.endswith("mlp.experts"):
                first, n = plan.expert_range()
                s = plan.expert_shard("gate_proj")
                lo, hi = s.bounds(whole.gate_up.weight.shape[1] // 2)
                half = whole.gate_up.weight.shape[1] // 2
                gate_up = whole.gate_up.weight[first:first + n]
                want = torch.cat([gate_up[:, lo:hi], gate_up[:, half + lo:half + hi]], 1)
                assert torch.equal(w.gate_up.weight, want), name
                assert torch.equal(w.down.weight, whole.down.weight[first:first + n, :, lo:hi]), name
                continue
            t, ref = (w.weight, whole.weight) if hasattr(w, "weight") else (w, whole)
            s = plan.shard(name)
            if s is not None:
                start, end = s.bounds(ref.shape[s.dim])
                ref = ref.narrow(s.dim, start, end - start)
                if t.shape[s.dim] > ref.shape[s.dim]:  # padded vocabulary part
                    t = t.narrow(s.dim, 0, ref.shape[s.dim])
            assert torch.equal(t, ref), name


def test_adapter_reads_only_its_part(tmp_path):
    """Each rank reads exactly its rows / columns / experts plus the replicated tensors (counted independently of the
    plan), and gets the same values as the corresponding part of a full load; an FP8 part that straddles a scale
    block is refused naming the tensor."""
    from safetensors import safe_open

    from dsv32.backends.reference.ops import ReferenceOps

    make_checkpoint(str(tmp_path), seed=2)
    cfg = ModelConfig.from_pretrained(str(tmp_path))
    ops = ReferenceOps("cpu")
    sizes = {}
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        for name in f.keys():
            sizes[name] = f.get_slice(name).get_shape()
    total = sum(4 * torch.Size(s).numel() for s in sizes.values())
    full = load_weights(str(tmp_path), cfg, ops, torch.float32, "cpu")
    tp, ep = 2, 2
    for rank in range(tp):
        expected = 0
        for name, shape in sizes.items():
            n = 4 * torch.Size(shape).numel()
            if ".mlp.experts." in name:
                expert = int(name.split(".mlp.experts.")[1].split(".")[0])
                expected += n if expert // (cfg.n_routed_experts // ep) == rank else 0  # moe_tp = 1: whole experts
            elif any(k in name for k in ("q_b_proj", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                         "embed_tokens", "lm_head")):
                expected += n // tp
            else:
                expected += n
        report = {}
        plan = ParallelPlan(cfg, ParallelConfig(tp_size=tp, ep_size=ep).layout(rank))
        part = load_weights(str(tmp_path), cfg, ops, torch.float32, "cpu", plan=plan, report=report)
        assert report == {"read_bytes": expected, "checkpoint_bytes": os.path.getsize(tmp_path / "model.safetensors")}
        assert expected < total
        o = "model.layers.0.self_attn.o_proj.weight"
        assert torch.equal(part[o].weight, full[o].weight.chunk(tp, dim=1)[rank])
    # 48 rows of q_a_layernorm-free q_b (4 heads × 24+16) split in 2 → parts of 80 rows; blocks of 32 rows: [80, 160)
    # starts inside a block and ends in another
    src, dst, deq = tmp_path / "s", tmp_path / "f", tmp_path / "d"
    make_checkpoint(str(src), seed=2)
    convert_to_fp8_checkpoint(str(src), str(dst), str(deq), block=32)
    cfg8 = ModelConfig.from_pretrained(str(dst))
    with pytest.raises(CheckpointError, match=r"q_b_proj.weight': this rank's part \[80, 160\) .*blocks of 32"):
        load_weights(str(dst), cfg8, ops, torch.float32, "cpu",
                     plan=ParallelPlan(cfg8, ParallelConfig(tp_size=2).layout(1)))


def test_memory_plan_matches_what_a_rank_holds(model):
    """The plan's weights for a rank (computed from the config) equal what that rank's engine holds; the KV pool of
    the plan is the engine's; and for the official model it says what fits where."""
    import dataclasses

    from dsv32.core.engine.build import kv_spec, resolve
    from dsv32.core.engine.memory import GIB, plan_memory

    path, _, _ = model
    llm = LLM(model=path, dtype="float32", device="cpu", num_kv_pages=80, page_size=8)
    cfg = llm.config
    cfg_tp = dataclasses.replace(llm.engine_config, parallel=ParallelConfig(tp_size=2, ep_size=2))
    r = resolve(cfg_tp, cfg)
    spec = kv_spec(cfg, r, 8)
    mem = llm.core.memory
    plan = plan_memory(llm.engine_config, cfg, 64 * GIB, 0, spec.latent_bytes_per_token(),
                       spec.index_bytes_per_token(), act_bytes=4)
    assert plan.weights == mem["weights"]
    assert plan.kv_tokens == mem["max_tokens"] == 640
    assert plan.kv_bytes == mem["kv_latent"] + mem["kv_index"]
    tp = LLM(model=path, dtype="float32", device="cpu", tp_size=2, ep_size=2)
    try:
        for rank, mem in enumerate(tp._ranks.info["memory_per_rank"]):
            assert plan_memory(cfg_tp, cfg, 64 * GIB, rank, act_bytes=4).weights == mem["weights"]
    finally:
        tp.shutdown()
    official = ModelConfig.from_dict(deepseek_v32_config())
    from dsv32.core.config import CacheConfig, EngineConfig, SchedulerConfig

    def plan(device_gib, **par):
        c = EngineConfig(model="official", cache=CacheConfig(mem_fraction_static=0.9),
                         scheduler=SchedulerConfig(max_model_len=163840, max_running_requests=256),
                         parallel=ParallelConfig(**par))
        return plan_memory(c, official, int(device_gib * GIB))

    h200, h100 = plan(141, tp_size=8), plan(80, tp_size=8)
    assert 78 * GIB < h200.weights < 83 * GIB and h200.problems() == [] and h200.kv_tokens > 900_000
    assert h100.kv_tokens <= 0 and "leave no room for a KV cache" in h100.problems()[0]
    assert plan(141, tp_size=8, dp_size=8, enable_dp_attention=True, ep_size=8).problems() == []


def test_memory_plan_command(capsys):
    from dsv32.server.cli import main

    assert main(["memory-plan", "--tp", "8", "--device-memory-gib", "141", "--kv-cache-dtype", "fp8_e4m3",
                 "--context-length", "163840"]) == 0
    out = capsys.readouterr().out
    assert "official DeepSeek-V3.2" in out and "weights" in out and "(ranks 0-7: the same)" in out and "fits:" in out
    assert main(["memory-plan", "--tp", "8", "--device-memory-gib", "80"]) == 1
    assert "ranks 0-7: the weights" in capsys.readouterr().out
    assert main(["memory-plan", "--tp", "3", "--device-memory-gib", "80"]) == 2
    assert "128 attention heads cannot be split over 3" in capsys.readouterr().err


def test_dp_feed_forward_in_chunks_equals_whole(model, monkeypatch):
    """Under attention DP the MLP runs on every group's gathered tokens in chunks of MLP_CHUNK_TOKENS; chunking
    changes nothing (here in one process, where the gathers are identities)."""
    from dsv32.core.communicator import Communicator, ProcessGroups
    from dsv32.core.model import layers
    from dsv32.core.parallel import RankLayout

    path, prompts, _ = model
    llm = LLM(model=path, dtype="float32", device="cpu")
    ffn = llm.model.layers[1].ffn  # an MoE layer
    x = torch.randn(11, llm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    whole = ffn.block.partial(x)
    monkeypatch.setattr(layers, "MLP_CHUNK_TOKENS", 3)
    llm.model.groups = ProcessGroups(RankLayout(attn_dp_size=2), Communicator(), Communicator())

    class Batch:
        mlp_tokens_per_group = 13  # padded past the 11 tokens

    torch.testing.assert_close(ffn(x, Batch()), whole, rtol=1e-5, atol=1e-5)  # fp32: GEMM shapes differ


@pytest.mark.parametrize("layout,graphs", [("tp2", False), ("dp2", False), ("tp4-dp2", False), ("tp2", True),
                                           ("dp2", True)])
def test_parallel_speculative_decoding_equals_single_process(tmp_path, layout, graphs, check_agreement, monkeypatch):
    """MTP speculative decoding over ranks (TP: the group's first rank verifies and broadcasts; DP attention: every
    rank runs the target, MTP-extend and chain passes of each step, padding where it has no requests), eager or with
    graphs (EagerGraph in the ranks; DP groups agree on one verify / draft graph): greedy tokens equal the
    single-process plain run's, the accept length reaches LLM.stats()."""
    if graphs:
        monkeypatch.setenv("DSV32_DEBUG_EAGER_GRAPHS", "1")
    from _tiny import make_mtp_checkpoint

    path = str(tmp_path / "mtp")
    make_mtp_checkpoint(path, seed=8, n_group=2, topk_group=1, first_k_dense_replace=1, index_topk=16)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 320, (n,), generator=g).tolist() for n in (33, 12, 5, 27)]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    want = [o.token_ids for o in LLM(model=path, dtype="float32", device="cpu").generate(
        prompt_token_ids=prompts, sampling_params=params)]
    llm = LLM(model=path, dtype="float32", device="cpu", speculative_algorithm="EAGLE", speculative_num_steps=2,
              page_size=4, **(dict(graph_max_bs=4) if graphs else {}), **LAYOUTS[layout])
    try:
        assert [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)] == want
        s = llm.stats()
        assert s["spec_verify_steps"] > 0 and s["avg_spec_accept_length"] >= 1.0
        assert (s["graph_replays"] > 0) == graphs
    finally:
        llm.shutdown()
