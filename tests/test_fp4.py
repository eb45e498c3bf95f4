"""NVFP4 (ModelOpt) and MXFP4 (Quark) checkpoints on the reference backend: the format helpers (core/fp4.py), loading
both published layouts, greedy parity with transformers on the dequantized weights (fp32, CPU), W4A4 MXFP4, and the
errors a malformed checkpoint or configuration gets."""

from __future__ import annotations

import json
import os

import pytest
import torch
from _tiny import convert_to_fp4_checkpoint, hf_greedy, load_hf, make_checkpoint
from safetensors.torch import load_file, save_file
from test_checkpoint import engine_logits, hf_logits

from dsv32 import LLM, SamplingParams
from dsv32.core import fp4
from dsv32.core.config import ConfigError, ModelConfig
from dsv32.core.model.checkpoint import CheckpointError

E2M1 = torch.tensor(fp4.E2M1_VALUES)


# ---- the formats ----------------------------------------------------------------------------------------------------
def test_e2m1_codes_round_to_nearest_even_and_pack_low_nibble_first():
    vals = torch.tensor([0.0, 0.25, 0.3, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.1, 7.0, -0.7, -6.5, -0.1])
    want = torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -0.5, -6.0, 0.0])
    codes = fp4.e2m1_codes(vals)
    assert torch.equal(E2M1[codes.long()], want)
    every = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(fp4.e2m1_codes(E2M1), torch.where(every == 8, 0, every).to(torch.uint8))  # −0 → +0
    packed = fp4.pack_e2m1(torch.tensor([[1, 2, 15, 7]], dtype=torch.uint8))
    assert packed.tolist() == [[0x21, 0x7F]]
    assert fp4.unpack_e2m1(packed).tolist() == [[0.5, 1.0, -6.0, 6.0]]


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_quantize_dequantize_error_is_within_the_format(fmt):
    """Per group, |w − deq| ≤ half the e2m1 step at the group's scale (NVFP4 adds the e4m3 rounding of the scale,
    ≤ 1/16 relative); relative L2 of Gaussian weights ≈ 0.1 (FP4's ~3 bits)."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    if fmt == "nvfp4":
        q, s, g2 = fp4.quantize_nvfp4(w)
        assert q.dtype == torch.uint8 and q.shape == (64, 128) and s.dtype == torch.float8_e4m3fn and s.shape == (64, 16)
        deq = fp4.dequantize_fp4(q, s, fmt, g2.expand(64), torch.float32)
        group_max = w.view(64, 16, 16).abs().amax(-1)
        bound = (group_max / 6 * 1.0625 + 1e-6).repeat_interleave(16, 1)  # step ≤ 2 × scale; half of it, scale err
    else:
        q, s = fp4.quantize_mxfp4(w)
        assert q.shape == (64, 128) and s.dtype == torch.uint8 and s.shape == (64, 8)
        deq = fp4.dequantize_fp4(q, s, fmt, None, torch.float32)
        scale = fp4.e8m0_to_float(s).repeat_interleave(32, 1)
        bound = torch.maximum(scale, (w.abs() - 6 * scale).clamp(min=0) + 1e-6)  # half-step ≤ scale; saturation
    assert ((w - deq).abs() <= bound).all()
    rel = ((w - deq).norm() / w.norm()).item()
    assert 0.05 < rel < 0.16, rel


def test_qdq_mxfp4_rounds_each_group_of_32_onto_its_grid():
    x = torch.randn(3, 70, generator=torch.Generator().manual_seed(1)) * torch.tensor([1e-3, 1.0, 50.0])[:, None]
    y = fp4.qdq_mxfp4(x)
    assert y.shape == x.shape
    for r in range(3):
        for g0 in range(0, 70, 32):
            xs, ys = x[r, g0:g0 + 32], y[r, g0:g0 + 32]
            scale = 2.0 ** (torch.floor(torch.log2(xs.abs().max())) - 2)
            assert torch.isin(ys / scale, E2M1).all()
            assert ((xs - ys).abs() <= torch.maximum(scale, xs.abs() - 6 * scale) + 1e-7).all()
    assert torch.equal(fp4.qdq_mxfp4(y), y)  # idempotent


# ---- checkpoints ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp4_dirs(tmp_path_factory):
    """src (fp32 tiny model) and per format: (FP4 checkpoint, its exact dequantized weights)."""
    root = tmp_path_factory.mktemp("fp4")
    make_checkpoint(str(root / "src"), seed=23, hidden_size=128, intermediate_size=96, moe_intermediate_size=32,
                    index_topk=12)
    out = {"src": str(root / "src")}
    for fmt, w4a4 in (("nvfp4", False), ("mxfp4", False), ("mxfp4", True)):
        key = fmt + ("-w4a4" if w4a4 else "")
        convert_to_fp4_checkpoint(out["src"], str(root / key), str(root / (key + "-deq")), fmt, w4a4)
        out[key] = (str(root / key), str(root / (key + "-deq")))
    return out


def test_published_layouts_are_detected(fp4_dirs):
    nv = ModelConfig.from_pretrained(fp4_dirs["nvfp4"][0])
    assert nv.quant is None and nv.fp4.method == "modelopt_fp4" and nv.fp4.fmt == "nvfp4" and nv.fp4.act == ""
    assert not nv.fp4.quantized("model.layers.1.self_attn.kv_b_proj") and nv.fp4.quantized("model.layers.1.self_attn.o_proj")
    mx = ModelConfig.from_pretrained(fp4_dirs["mxfp4"][0])
    assert mx.fp4.method == "quark" and mx.fp4.fmt == "mxfp4" and mx.fp4.group_size == 32 and mx.fp4.act == ""
    assert ModelConfig.from_pretrained(fp4_dirs["mxfp4-w4a4"][0]).fp4.act == "mxfp4"
    assert not mx.fp4.quantized("model.layers.2.mlp.gate") and mx.fp4.quantized("model.layers.2.mlp.experts.3.up_proj")


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_checkpoint_greedy_equals_transformers_on_dequantized_weights(fp4_dirs, fmt):
    ckpt, deq = fp4_dirs[fmt]
    hf = load_hf(deq)
    llm = LLM(model=ckpt, dtype="float32", device="cpu")
    assert llm.config.fp4.fmt == fmt
    prompt = torch.randint(0, 320, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    assert (engine_logits(llm, prompt) - hf_logits(hf, prompt)).abs().max().item() <= 1e-4
    outs = llm.generate(prompt_token_ids=[prompt[:17], prompt[:31]],
                        sampling_params=SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    assert outs[0].token_ids == hf_greedy(hf, prompt[:17], 24)
    assert outs[1].token_ids == hf_greedy(hf, prompt[:31], 24)


def test_fp4_weights_are_not_the_unquantized_ones(fp4_dirs):
    """The parity above is with the dequantized weights, not the fp32 originals (the quantization is real)."""
    prompt = list(range(5, 45))
    src = engine_logits(LLM(model=fp4_dirs["src"], dtype="float32"), prompt)
    q = engine_logits(LLM(model=fp4_dirs["nvfp4"][0], dtype="float32"), prompt)
    rel = ((q - src).norm() / src.norm()).item()
    assert 0.01 < rel < 0.5, rel


def test_w4a4_mxfp4_loads_rounds_activations_and_generates(fp4_dirs):
    """Quark with dynamic MXFP4 input_tensors: every FP4 linear rounds its input through MXFP4 (emulated); the model
    generates, and its logits differ from the weight-only run of the same weights by about FP4's activation error."""
    ckpt, _ = fp4_dirs["mxfp4-w4a4"]
    w4a4 = LLM(model=ckpt, dtype="float32")
    w4a16 = LLM(model=fp4_dirs["mxfp4"][0], dtype="float32")
    w = w4a4.model.w["model.layers.1.mlp.experts"]
    assert w.gate_up.act == "mxfp4" and w.down.act == "mxfp4"
    assert w4a4.model.w["model.layers.0.mlp.down_proj.weight"].act == "mxfp4"
    assert w4a4.model.w["model.layers.0.self_attn.q_a_proj.weight"].act == ""  # excluded: unquantized
    prompt = list(range(7, 47))
    a, b = engine_logits(w4a4, prompt), engine_logits(w4a16, prompt)
    rel = ((a - b).norm() / b.norm()).item()
    assert 0.005 < rel < 0.5, rel
    out = w4a4.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(max_tokens=8, temperature=0,
                                                                                  ignore_eos=True))
    assert len(out[0].token_ids) == 8


def test_reference_linear_w4a4_is_the_product_with_rounded_activations():
    from dsv32.backends.reference.ops import ReferenceOps
    from dsv32.core.model.checkpoint import fp4_quantize

    ops = ReferenceOps()
    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(48, 96, generator=g), torch.randn(5, 96, generator=g)
    lw = ops.prepare_linear(fp4_quantize(w, "mxfp4", act="mxfp4"), torch.float32)
    deq = ops.dequantize(fp4_quantize(w, "mxfp4"), torch.float32)
    assert torch.equal(ops.linear(x, lw), torch.nn.functional.linear(fp4.qdq_mxfp4(x), deq))


# ---- errors ---------------------------------------------------------------------------------------------------------
def _rewrite(src: str, dst: str, edit) -> str:
    import shutil

    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    return dst


NAME = "model.layers.0.mlp.down_proj"


@pytest.mark.parametrize("fmt,edit,needle", [
    ("nvfp4", lambda t: t.pop(NAME + ".weight_scale"), f"missing tensor '{NAME}.weight_scale'"),
    ("nvfp4", lambda t: t.pop(NAME + ".weight_scale_2"), f"missing tensor '{NAME}.weight_scale_2'"),
    ("nvfp4", lambda t: t.__setitem__(NAME + ".weight_scale", t[NAME + ".weight_scale"][:, :-1].contiguous()),
     f"'{NAME}.weight_scale' has shape"),
    ("nvfp4", lambda t: t.__setitem__(NAME + ".weight_scale", t[NAME + ".weight_scale"].float()),
     f"'{NAME}.weight_scale' holds F32"),
    ("nvfp4", lambda t: t.__setitem__(NAME + ".weight_scale_2", torch.tensor([-1.0])), f"'{NAME}.weight_scale_2'"),
    ("mxfp4", lambda t: t[NAME + ".weight_scale"].view(-1).__setitem__(0, 255), "e8m0 scale 255"),
    ("mxfp4", lambda t: t.__setitem__(NAME + ".weight", t[NAME + ".weight"][:, :-2].contiguous()),
     f"'{NAME}.weight' has shape"),
])
def test_malformed_fp4_tensors_are_named(fp4_dirs, tmp_path, fmt, edit, needle):
    bad = _rewrite(fp4_dirs[fmt][0], str(tmp_path / "bad"), edit)
    with pytest.raises(CheckpointError) as e:
        LLM(model=bad, dtype="float32")
    assert needle in str(e.value)


@pytest.mark.parametrize("change,needle", [
    (lambda q: q["global_quant_config"]["weight"].update(group_size=16), "global_quant_config.weight.group_size"),
    (lambda q: q["global_quant_config"]["weight"].update(dtype="fp8_e4m3"), "global_quant_config.weight.dtype"),
    (lambda q: q["global_quant_config"].update(input_tensors={"dtype": "fp8_e4m3", "qscheme": "per_tensor"}),
     "global_quant_config.input_tensors.dtype"),
    (lambda q: q.update(exclude="lm_head"), "quantization_config.exclude"),
])
def test_unsupported_quark_configs_are_refused_by_field(fp4_dirs, change, needle):
    with open(os.path.join(fp4_dirs["mxfp4"][0], "config.json")) as f:
        raw = json.load(f)
    change(raw["quantization_config"])
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(raw)
    assert needle in str(e.value)


def test_modelopt_algorithms_other_than_nvfp4_are_refused(fp4_dirs):
    with open(os.path.join(fp4_dirs["nvfp4"][0], "config.json")) as f:
        raw = json.load(f)
    raw["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "FP8", "exclude_modules": []}
    with pytest.raises(ConfigError, match="quant_algo.*NVFP4"):
        ModelConfig.from_dict(raw)


def test_quark_layer_override_excludes_a_layer(fp4_dirs, tmp_path):
    """layer_quant_config entries override the global scheme (first match wins); a None weight = unquantized."""
    with open(os.path.join(fp4_dirs["mxfp4"][0], "config.json")) as f:
        raw = json.load(f)
    raw["quantization_config"]["layer_quant_config"] = {"re:model.layers.2.mlp.*": {"weight": None}}
    cfg = ModelConfig.from_dict(raw)
    assert not cfg.fp4.quantized("model.layers.2.mlp.experts.0.up_proj")
    assert cfg.fp4.quantized("model.layers.1.mlp.experts.0.up_proj")


def test_quantization_flag_checks_the_checkpoint(fp4_dirs):
    """`dsv32 serve --quantization` takes SGLang's names; the format comes from the checkpoint, the flag must agree."""
    import argparse

    from dsv32.server import serve

    p = argparse.ArgumentParser()
    serve.add_serve_args(p)
    nv, mx = fp4_dirs["nvfp4"][0], fp4_dirs["mxfp4"][0]
    for model, flag in ((nv, "modelopt_fp4"), (mx, "quark"), (mx, "mxfp4"), (nv, None)):
        args = ["--model", model] + (["--quantization", flag] if flag else [])
        assert serve._checked_config(p.parse_args(args)).model == model
    for model, flag, needle in ((mx, "modelopt_fp4", "is mxfp4, not NVFP4"), (nv, "quark", "is nvfp4, not MXFP4"),
                                (fp4_dirs["src"], "mxfp4", "is unquantized"), (nv, "fp8", "no FP8")):
        with pytest.raises(serve.FlagError) as e:
            serve._checked_config(p.parse_args(["--model", model, "--quantization", flag]))
        assert needle in e.value.message, e.value.message


def test_memory_plan_counts_fp4_weights_packed():
    """`dsv32 memory-plan` / the engine's plan: FP4 linears count as packed e2m1 + group scales (+ NVFP4's fp32 global
    scale per row), excluded ones in the model dtype — equal to the bytes of the weights `dummy_weights` makes for a
    rank when the backend keeps them as loaded (as the GPU backends do). The published NVFP4 checkpoint then fits
    TP 4 on 141 GB devices, which FP8 does not."""
    from dsv32.backends.reference.ops import ReferenceOps
    from dsv32.core.config import ParallelConfig, deepseek_v32_config, fp4_quantization_config
    from dsv32.core.engine.memory import GIB, weight_bytes
    from dsv32.core.model.checkpoint import dummy_weights
    from dsv32.core.model.plan import ParallelPlan
    from dsv32.core.ops import ExpertWeights, LinearWeight

    class Packed(ReferenceOps):  # keeps FP4 as the loader hands it over, as a GPU backend does
        def prepare_linear(self, w, dtype):
            return w if w.is_fp4 else LinearWeight(w.weight.to(dtype))

        def prepare_experts(self, w, dtype):
            return w

    def nbytes(v) -> int:
        if isinstance(v, ExpertWeights):
            return sum(nbytes(p) for p in (v.gate, v.up, v.down))
        if isinstance(v, LinearWeight):
            return sum(t.numel() * t.element_size() for t in (v.weight, v.scale_inv, v.global_scale) if t is not None)
        return v.numel() * v.element_size()

    tiny = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
                v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, index_n_heads=4,
                index_head_dim=32, index_topk=16, vocab_size=512, first_k_dense_replace=1, num_nextn_predict_layers=0)
    for fmt in ("nvfp4", "mxfp4"):
        cfg = ModelConfig.from_dict(deepseek_v32_config(quantization_config=fp4_quantization_config(fmt), **tiny))
        for par in (ParallelConfig(), ParallelConfig(tp_size=2, ep_size=2)):
            plan = ParallelPlan(cfg, par.layout(1 if par.tp_size > 1 else 0))
            w = dummy_weights(cfg, Packed(), torch.bfloat16, "cpu", plan=plan)
            held = sum(nbytes(v) for k, v in w.items() if k != "lm_head.weight" or "lm_head.weight" in w)
            uk_uv = cfg.num_hidden_layers * (cfg.num_attention_heads // par.tp_size) * (
                cfg.qk_nope_head_dim + cfg.v_head_dim) * cfg.kv_lora_rank * 2  # absorbed W_UK, W_UV (bf16)
            assert weight_bytes(cfg, plan) == held + uk_uv, (fmt, par)
    official = ModelConfig.from_dict(deepseek_v32_config(quantization_config=fp4_quantization_config("nvfp4")))
    fp8 = ModelConfig.from_dict(deepseek_v32_config())
    tp4 = ParallelConfig(tp_size=4).layout(0)
    assert weight_bytes(official, ParallelPlan(official, tp4)) < 100 * GIB < 0.85 * 141 * GIB \
        < weight_bytes(fp8, ParallelPlan(fp8, tp4))


def test_signed_packed_bytes_and_e8m0_scales_load_the_same(fp4_dirs, tmp_path):
    """Exporters differ in the dtype they give the same bytes: packed e2m1 as int8, MXFP4 scales as float8_e8m0fnu —
    the loader takes either and reads the same weights."""
    if not hasattr(torch, "float8_e8m0fnu"):
        pytest.skip("this torch has no float8_e8m0fnu")

    def retype(t):
        for k in list(t):
            if k.endswith(".weight") and t[k].dtype == torch.uint8:
                t[k] = t[k].view(torch.int8)
            elif k.endswith(".weight_scale") and t[k].dtype == torch.uint8:
                t[k] = t[k].view(torch.float8_e8m0fnu)

    odd = _rewrite(fp4_dirs["mxfp4"][0], str(tmp_path / "odd"), retype)
    prompt = list(range(3, 40))
    a = engine_logits(LLM(model=odd, dtype="float32"), prompt)
    b = engine_logits(LLM(model=fp4_dirs["mxfp4"][0], dtype="float32"), prompt)
    assert torch.equal(a, b)
