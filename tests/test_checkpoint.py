"""Loader and config: FP8-block checkpoints in the official format, sharded index files, MTP skipping, and
every error case naming the tensor or field."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from _tiny import convert_to_fp8_checkpoint, hf_greedy, load_hf, make_checkpoint
from safetensors.torch import load_file, save_file
from test_parity_hf import engine_logits, hf_logits

from dsv32 import LLM, SamplingParams
from dsv32.core.config import ConfigError, ModelConfig
from dsv32.core.model.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def fp8_dirs(tmp_path_factory):
    """(fp8 checkpoint, its exact dequantized weights as a plain checkpoint). Dimensions are not multiples of
    128, so partial scale blocks (as kv_a_proj_with_mqa's 576 rows in V3.2) are exercised."""
    root = tmp_path_factory.mktemp("fp8")
    make_checkpoint(str(root / "src"), seed=21, hidden_size=160, q_lora_rank=96, moe_intermediate_size=48,
                    intermediate_size=200, index_topk=12)
    convert_to_fp8_checkpoint(str(root / "src"), str(root / "fp8"), str(root / "deq"))
    return str(root / "fp8"), str(root / "deq")


def test_fp8_checkpoint_matches_dequantized_reference(fp8_dirs):
    fp8_dir, deq_dir = fp8_dirs
    hf = load_hf(deq_dir)  # transformers on the dequantized weights: the oracle
    llm = LLM(model=fp8_dir, dtype="float32", indexer_precision="exact")
    assert llm.config.quant is not None and llm.config.quant.block_n == 128
    prompt = torch.randint(0, 320, (45,), generator=torch.Generator().manual_seed(2)).tolist()
    assert (engine_logits(llm, prompt) - hf_logits(hf, prompt)).abs().max().item() <= 1e-4
    outs = llm.generate(prompt_token_ids=[prompt[:20], prompt[:33]],
                        sampling_params=SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    assert outs[0].token_ids == hf_greedy(hf, prompt[:20], 32)
    assert outs[1].token_ids == hf_greedy(hf, prompt[:33], 32)


def test_fp8_checkpoint_defaults_to_fp8_indexer(fp8_dirs):
    """indexer_precision='auto' is 'fp8' for FP8 checkpoints (Hadamard + e4m3 keys, 132-byte-style cache entries).
    Until a request has more than index_topk keys the indexer selects everything, so logits equal the exact
    mode's; beyond, selection may differ near ties (selection quality: tests/backends/test_reference_ops.py)."""
    fp8_dir, _ = fp8_dirs
    llm = LLM(model=fp8_dir, dtype="float32")
    assert llm.indexer_precision == "fp8"
    assert llm.kv_cache.index_keys[0].dtype == torch.uint8
    assert llm.kv_cache.index_keys[0].shape[1] == 64 * (32 + 4)  # page of 64 tokens × (D=32 key bytes + 4 scale bytes)
    exact = LLM(model=fp8_dir, dtype="float32", indexer_precision="exact")
    prompt = list(range(10, 60))
    a, b = engine_logits(llm, prompt), engine_logits(exact, prompt)
    k = llm.config.index_topk
    assert (a[:k] - b[:k]).abs().max().item() < 1e-5
    assert torch.isfinite(a).all() and not torch.equal(a[k:], b[k:])


def test_sharded_index_and_mtp_layer(tmp_path):
    """A checkpoint split across shards with model.safetensors.index.json, carrying an MTP layer (layer index ==
    num_hidden_layers): loads with the MTP skipped by default, and with it when asked."""
    src = tmp_path / "src"
    make_checkpoint(str(src), seed=3, num_hidden_layers=2, first_k_dense_replace=1)
    tensors = load_file(str(src / "model.safetensors"))
    for name in [n for n in tensors if n.startswith("model.layers.1.")]:  # layer 2 = MTP copy of layer 1
        tensors[name.replace("model.layers.1.", "model.layers.2.")] = tensors[name].clone()
    hd = tensors["model.norm.weight"].shape[0]
    for extra, shape in {"enorm.weight": (hd,), "hnorm.weight": (hd,), "eh_proj.weight": (hd, 2 * hd),
                         "shared_head.norm.weight": (hd,), "shared_head.head.weight": (320, hd),
                         "embed_tokens.weight": (320, hd)}.items():
        tensors[f"model.layers.2.{extra}"] = torch.randn(shape)
    names = sorted(tensors)
    dst = tmp_path / "sharded"
    dst.mkdir()
    weight_map = {}
    for i, chunk in enumerate([names[0::3], names[1::3], names[2::3]]):
        fname = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({k: tensors[k] for k in chunk}, str(dst / fname))
        weight_map.update({k: fname for k in chunk})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    (dst / "config.json").write_text(json.dumps(cfg))

    prompt = list(range(30))
    base = engine_logits(LLM(model=str(src), dtype="float32"), prompt)
    assert torch.equal(engine_logits(LLM(model=str(dst), dtype="float32"), prompt), base)
    with_mtp = LLM(model=str(dst), dtype="float32", load_mtp=True)
    assert "model.layers.2.eh_proj.weight" in with_mtp.model.w
    assert torch.equal(engine_logits(with_mtp, prompt), base)


# ---- error cases ------------------------------------------------------------------------------------
def _copy(tiny_dir, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, dst)
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_unknown_architecture(tiny_dir, tmp_path):
    p = _copy(tiny_dir, tmp_path)
    _edit_config(p, architectures=["LlamaForCausalLM"])
    with pytest.raises(ConfigError, match="unsupported architecture.*LlamaForCausalLM"):
        LLM(model=str(p))


@pytest.mark.parametrize("field", ["index_topk", "kv_lora_rank", "n_routed_experts", "architectures"])
def test_missing_required_field(tiny_dir, tmp_path, field):
    p = _copy(tiny_dir, tmp_path)
    _edit_config(p, **{field: None})
    with pytest.raises(ConfigError, match=field):
        LLM(model=str(p))


def test_config_errors_name_the_field():
    base = json.loads(json.dumps({
        "architectures": ["DeepseekV32ForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
        "moe_intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "q_lora_rank": 8,
        "kv_lora_rank": 8, "qk_nope_head_dim": 4, "qk_rope_head_dim": 4, "v_head_dim": 4, "n_routed_experts": 4,
        "num_experts_per_tok": 2, "index_n_heads": 2, "index_head_dim": 8, "index_topk": 4, "n_group": 2,
        "topk_group": 1}))
    assert ModelConfig.from_dict(base).index_topk == 4
    for change, field in [({"n_group": 3}, "n_group"), ({"quantization_config": {"quant_method": "gptq"}}, "quant_method"),
                          ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}}, "weight_block_size"),
                          ({"rope_scaling": {"type": "dynamic", "factor": 2}}, "rope_scaling"),
                          ({"hidden_act": "gelu"}, "hidden_act"), ({"num_key_value_heads": 1}, "num_key_value_heads")]:
        with pytest.raises(ConfigError, match=field):
            ModelConfig.from_dict({**base, **change})
    q = ModelConfig.from_dict({**base, "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                                                "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}})
    assert q.quant.scale_fmt == "ue8m0"
    yarn = ModelConfig.from_dict({**base, "rope_theta": 10000, "rope_scaling": {
        "type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "index_head_dim": 128})
    assert abs(yarn.softmax_scale - 0.1352338) < 1e-6  # V3.2's MLA softmax scale


def test_missing_tensor(tiny_dir, tmp_path):
    p = _copy(tiny_dir, tmp_path)
    _edit_tensors(p, lambda t: t.pop("model.layers.1.self_attn.indexer.wk.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.1.self_attn.indexer.wk.weight'.*\[32, 64\]"):
        LLM(model=str(p))


def test_missing_expert(tiny_dir, tmp_path):
    p = _copy(tiny_dir, tmp_path)
    _edit_tensors(p, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match="model.layers.2.mlp.experts.5.up_proj.weight"):
        LLM(model=str(p))


def test_unexpected_tensor(tiny_dir, tmp_path):
    p = _copy(tiny_dir, tmp_path)
    _edit_tensors(p, lambda t: t.update({"model.layers.0.self_attn.extra.weight": torch.zeros(3, 3)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.layers.0.self_attn.extra.weight'"):
        LLM(model=str(p))


def test_wrong_shape(tiny_dir, tmp_path):
    p = _copy(tiny_dir, tmp_path)
    _edit_tensors(p, lambda t: t.update({"model.layers.0.self_attn.o_proj.weight": torch.zeros(64, 95)}))
    with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.o_proj.weight' has shape \[64, 95\], expected \[64, 96\]"):
        LLM(model=str(p))


def test_fp8_weight_without_scale(fp8_dirs, tmp_path):
    dst = tmp_path / "broken"
    shutil.copytree(fp8_dirs[0], dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    name = "model.layers.0.self_attn.q_a_proj.weight_scale_inv"
    shard = dst / index["weight_map"].pop(name)
    tensors = load_file(str(shard))
    tensors.pop(name)
    save_file(tensors, str(shard))
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="q_a_proj.weight_scale_inv"):
        LLM(model=str(dst))


def test_not_a_model_dir(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        LLM(model=str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        LLM(model=str(tmp_path))


def test_bad_options(tiny_dir):
    for kw, field in [({"dtype": "int8"}, "dtype"), ({"kv_cache_dtype": "int4"}, "kv_cache_dtype"),
                      ({"indexer_precision": "fp4"}, "indexer_precision"), ({"page_size": 0}, "page_size")]:
        with pytest.raises(ValueError, match=field):
            LLM(model=tiny_dir, **kw)
    assert not os.path.exists(os.path.join(tiny_dir, "tokenizer.json"))


def test_fp8_checkpoint_odd_indexer_dim_falls_back_to_exact(tmp_path):
    make_checkpoint(str(tmp_path / "src"), seed=5, index_head_dim=24, num_hidden_layers=1)
    convert_to_fp8_checkpoint(str(tmp_path / "src"), str(tmp_path / "fp8"), str(tmp_path / "deq"))
    llm = LLM(model=str(tmp_path / "fp8"), dtype="float32")
    assert llm.config.quant is not None and llm.indexer_precision == "exact"
    out = llm.generate(prompt_token_ids=[list(range(5, 30))], sampling_params=SamplingParams(max_tokens=4, temperature=0))
    assert len(out[0].token_ids) >= 1
