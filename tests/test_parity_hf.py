"""Reference backend vs transformers' DeepseekV32ForCausalLM (the oracle), fp32 on CPU.

Tolerance: logits max |diff| ≤ 1e-4 in fp32 (observed ~1e-6: absorbed vs materialized MLA and RoPE output
layout change only the summation order). Prompts are longer than index_topk so the indexer's selection
matters; `test_sparsity_changes_logits` shows that it does.
"""

from __future__ import annotations

import pytest
import torch
from _tiny import hf_greedy, load_hf, make_checkpoint

from dsv32 import LLM, SamplingParams
from dsv32.core.forward_batch import ForwardBatch

TOL = 1e-4


def engine_logits(llm: LLM, prompt: list[int]) -> torch.Tensor:
    """All-position logits of one prompt through the paged engine path (prefill in one step)."""
    cache, pages = llm.kv_cache, []
    cache.grow(pages, len(prompt))
    try:
        fb = ForwardBatch.build([(prompt, 0, pages)], cache, llm.model.device)
        return llm.model.logits(llm.model.forward(fb, cache))
    finally:
        cache.free(pages)


def hf_logits(model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].float()


VARIANTS = [
    dict(n_group=1, topk_group=1, first_k_dense_replace=0, index_topk=8, index_n_heads=2),
    dict(n_group=2, topk_group=1, first_k_dense_replace=1, index_topk=16, index_n_heads=4),
    dict(n_group=4, topk_group=2, first_k_dense_replace=2, index_topk=24, num_hidden_layers=3),
    dict(n_group=4, topk_group=3, first_k_dense_replace=1, index_topk=5, num_experts_per_tok=3),
    # official default RoPE (no YaRN), tied-free, more indexer heads
    dict(n_group=2, topk_group=2, first_k_dense_replace=1, index_topk=12, rope_parameters=None, index_n_heads=8),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}{v[k]}" for k in ("n_group", "first_k_dense_replace", "index_topk")))
def test_prefill_logits_match_hf(tmp_path, variant):
    hf = make_checkpoint(str(tmp_path), seed=hash(str(variant)) % 1000, **variant)
    llm = LLM(model=str(tmp_path), dtype="float32", device="cpu", page_size=8)
    g = torch.Generator().manual_seed(7)
    for length in (variant["index_topk"] * 3 + 5, 50):
        prompt = torch.randint(0, 320, (length,), generator=g).tolist()
        diff = (engine_logits(llm, prompt) - hf_logits(hf, prompt)).abs().max().item()
        assert diff <= TOL, f"max |logit diff| {diff} > {TOL} at length {length}"


def test_sparsity_changes_logits(tmp_path):
    """The same weights with index_topk ≥ length (dense attention) give clearly different logits, so the
    parity above really tests the indexer's selection."""
    sparse_dir, dense_dir = tmp_path / "sparse", tmp_path / "dense"
    make_checkpoint(str(sparse_dir), seed=3, index_topk=8)
    make_checkpoint(str(dense_dir), seed=3, index_topk=4096)
    prompt = torch.randint(0, 320, (60,), generator=torch.Generator().manual_seed(0)).tolist()
    sparse = engine_logits(LLM(model=str(sparse_dir), dtype="float32"), prompt)
    dense = engine_logits(LLM(model=str(dense_dir), dtype="float32"), prompt)
    assert torch.allclose(sparse[:8], dense[:8], atol=TOL)  # first 8 positions see ≤ 8 keys: identical
    assert (sparse[8:] - dense[8:]).abs().max().item() > 0.1


def test_greedy_batch_matches_hf(tmp_path):
    """≥ 4 prompts of different lengths, 40 greedy tokens, batched on the paged cache == HF one by one."""
    hf = make_checkpoint(str(tmp_path), seed=11, index_topk=12, index_n_heads=4)
    llm = LLM(model=str(tmp_path), dtype="float32", device="cpu", page_size=16)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 320, (n,), generator=g).tolist() for n in (3, 17, 30, 9, 44)]
    n_new = 40
    outs = llm.generate(prompt_token_ids=prompts,
                        sampling_params=SamplingParams(max_tokens=n_new, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert len(out.token_ids) == n_new
        assert out.token_ids == hf_greedy(hf, prompt, n_new)


def test_official_rope_scaling_spelling_matches(tmp_path):
    """The same model described with the official `rope_scaling` + `rope_theta` keys loads to the same logits."""
    import json
    import shutil

    hf = make_checkpoint(str(tmp_path / "a"), seed=4)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    with open(tmp_path / "b" / "config.json") as f:
        cfg = json.load(f)
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp.pop("rope_theta")
    rp["type"] = rp.pop("rope_type")
    cfg["rope_scaling"] = rp
    for k in ("mlp_layer_types", "layer_types", "qk_head_dim", "head_dim"):
        cfg.pop(k, None)
    with open(tmp_path / "b" / "config.json", "w") as f:
        json.dump(cfg, f)
    prompt = list(range(1, 40))
    a = engine_logits(LLM(model=str(tmp_path / "a"), dtype="float32"), prompt)
    b = engine_logits(LLM(model=str(tmp_path / "b"), dtype="float32"), prompt)
    assert torch.equal(a, b)
    assert (a - hf_logits(hf, prompt)).abs().max().item() <= TOL


def test_bf16_error_no_worse_than_hf_bf16(tmp_path):
    """bf16 end to end: our bf16 logits are as close to the fp32 oracle as transformers' own bf16 run is.
    (A random tiny model amplifies bf16 rounding: HF bf16 itself is ~10-30% off its fp32 here, so a fixed
    tolerance against HF bf16 would test noise.)"""
    make_checkpoint(str(tmp_path), seed=8, dtype=torch.bfloat16)
    oracle = hf_logits(load_hf(str(tmp_path), dtype=torch.float32), list(range(5, 45)))
    hf_bf16 = hf_logits(load_hf(str(tmp_path), dtype=torch.bfloat16), list(range(5, 45)))
    llm = LLM(model=str(tmp_path), dtype="auto")
    assert llm.dtype == torch.bfloat16
    mine = engine_logits(llm, list(range(5, 45)))
    rel = lambda a: ((a - oracle).norm() / oracle.norm()).item()  # noqa: E731
    assert rel(mine) <= 1.5 * rel(hf_bf16) + 0.01, (rel(mine), rel(hf_bf16))


def test_tied_embeddings_and_odd_indexer_dim(tmp_path):
    """tie_word_embeddings (no lm_head tensor in the checkpoint) and an index_head_dim that is not a power of two
    (fp8 indexer impossible: 'fp8' is refused up front, 'auto' falls back to exact for FP8 checkpoints)."""
    hf = make_checkpoint(str(tmp_path), seed=13, tie_word_embeddings=True, index_head_dim=24, index_topk=10)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    llm = LLM(model=str(tmp_path), dtype="float32")
    prompt = list(range(3, 40))
    assert (engine_logits(llm, prompt) - hf_logits(hf, prompt)).abs().max().item() <= TOL
    with pytest.raises(ValueError, match="power-of-two index_head_dim"):
        LLM(model=str(tmp_path), dtype="float32", indexer_precision="fp8")
