"""Model configuration: parse a DeepSeek-V3.2 `config.json` (official or HF-transformers-5.x spelling).

One frozen dataclass, `ModelConfig`, is the single source of truth handed down to the model graph, the
KV-cache manager and the loader. Unknown architectures and missing required fields raise `ConfigError`
naming the field and the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from dsv32.core.parallel import ParallelConfig

SUPPORTED_ARCHITECTURES = ("DeepseekV32ForCausalLM",)
MODELSLIM_DESCRIPTION = "quant_model_description.json"  # msModelSlim's per-tensor quantization types

# Fields without a sensible default: a config.json lacking one is rejected.
REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "n_routed_experts",
    "num_experts_per_tok",
    "index_n_heads",
    "index_head_dim",
    "index_topk",
)

# Optional fields and their defaults — the same defaults transformers' DeepseekV32Config uses, so a
# config.json that omits them means the same model to us and to the HF reference.
OPTIONAL_DEFAULTS: dict[str, Any] = {
    "n_shared_experts": 1,
    "routed_scaling_factor": 2.5,
    "n_group": 8,
    "topk_group": 4,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "first_k_dense_replace": 3,
    "moe_layer_freq": 1,
    "max_position_embeddings": 163840,
    "tie_word_embeddings": False,
    "num_nextn_predict_layers": 0,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "attention_bias": False,
}


class ConfigError(ValueError):
    """A config.json that this engine cannot serve; the message names the field and what to do."""


@dataclass(frozen=True)
class RopeConfig:
    """RoPE / YaRN parameters shared by MLA (interleaved) and the indexer (half-split)."""

    theta: float = 10000.0
    rope_type: str = "default"  # "default" or "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class Fp8BlockQuantConfig:
    """DeepSeek FP8 e4m3 weights with `weight_scale_inv` per (block_n × block_k) block."""

    block_n: int = 128
    block_k: int = 128
    scale_fmt: str | None = None  # "ue8m0" on V3.2; informational — scales are read from the file


@dataclass(frozen=True)
class Fp4QuantConfig:
    """FP4 weights (core/fp4.py): NVFP4 from NVIDIA ModelOpt (`method` "modelopt_fp4") or MXFP4 from AMD Quark
    ("quark"). Which linears are FP4 comes from the checkpoint's exclusion list (and Quark's per-layer overrides), never
    from a built-in list. `act` "mxfp4": the checkpoint asks for dynamic MXFP4 activations (Quark `input_tensors`;
    W4A4), emulated by rounding activations through MXFP4 before each product; NVFP4's static activation scales are
    used only by native FP4-math kernels (elsewhere NVFP4 runs weight-only, as vLLM's Marlin path does)."""

    method: str
    fmt: str  # "nvfp4" | "mxfp4"
    group_size: int
    exclude: tuple[str, ...] = ()  # module-name patterns: shell wildcards, or "re:<regex>" (Quark)
    act: str = ""
    overrides: tuple[tuple[str, bool], ...] = ()  # Quark layer_quant_config: (pattern, quantized) in file order
    kv_cache_quant: str | None = None  # informational: the KV cache format comes from --kv-cache-dtype

    def quantized(self, module: str) -> bool:
        """Whether linear `module` (e.g. "model.layers.3.mlp.experts.7.up_proj") is FP4 by this configuration."""
        for pattern, quantized in self.overrides:
            if _module_matches(pattern, module):
                return quantized
        return not any(_module_matches(p, module) for p in self.exclude)


def _module_matches(pattern: str, module: str) -> bool:
    """A ModelOpt / Quark module pattern: "re:<regex>" (full match), else a shell wildcard; a pattern also matches the
    modules below the one it names ("model.layers.61" matches "model.layers.61.mlp.gate_proj")."""
    import fnmatch
    import re

    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], module) is not None
    return fnmatch.fnmatchcase(module, pattern) or module.startswith(pattern + ".")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    num_experts_per_tok: int
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    n_shared_experts: int = 1
    routed_scaling_factor: float = 2.5
    n_group: int = 8
    topk_group: int = 4
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    first_k_dense_replace: int = 3
    max_position_embeddings: int = 163840
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = 0
    eos_token_ids: tuple[int, ...] = (1,)
    dense_layers: tuple[bool, ...] = ()  # per layer: True = dense MLP, False = MoE
    rope: RopeConfig = field(default_factory=RopeConfig)
    quant: Fp8BlockQuantConfig | None = None
    fp4: Fp4QuantConfig | None = None  # NVFP4 / MXFP4 checkpoints (then quant is None)
    torch_dtype: str = "bfloat16"
    # msModelSlim W8A8-dynamic checkpoint (a quant_model_description.json beside config.json): int8 linears with a
    # scale per output channel, activations quantized per token at run time (core/model/checkpoint.py)
    modelslim: bool = False

    # ---- derived quantities -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Width of one token's MLA cache entry: compressed latent c plus the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """MLA softmax scale: qk_head_dim^-0.5 times YaRN mscale² (0.1352338 for V3.2)."""
        scale = self.qk_head_dim**-0.5
        r = self.rope
        if r.rope_type != "default" and r.mscale_all_dim:
            m = yarn_get_mscale(r.factor, r.mscale_all_dim)
            scale = scale * m * m
        return scale

    def is_dense_layer(self, layer: int) -> bool:
        """Layer `layer` has a dense MLP (else MoE); an MTP layer (index ≥ num_hidden_layers) as the official
        checkpoints: MoE unless it falls within first_k_dense_replace."""
        if layer >= len(self.dense_layers):
            return layer < self.first_k_dense_replace
        return self.dense_layers[layer]

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        return _parse(raw, source)

    @classmethod
    def from_pretrained(cls, model_dir: str) -> "ModelConfig":
        path = os.path.join(model_dir, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"{path} not found: --model must be a directory holding config.json and *.safetensors")
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        hf_quant = os.path.join(model_dir, "hf_quant_config.json")
        if not raw.get("quantization_config") and os.path.isfile(hf_quant):  # ModelOpt's own file
            try:
                with open(hf_quant, encoding="utf-8") as f:
                    raw = {**raw, "quantization_config": _modelopt_file(json.load(f), hf_quant)}
            except json.JSONDecodeError as e:
                raise ConfigError(f"{hf_quant} is not valid JSON: {e}") from None
        cfg = _parse(raw, path)
        if os.path.isfile(os.path.join(model_dir, MODELSLIM_DESCRIPTION)):
            if cfg.quant is not None or cfg.fp4 is not None:
                raise ConfigError(f"{path}: an FP8 quantization_config and {MODELSLIM_DESCRIPTION} together: "
                                  "which quantization the weights have is ambiguous")
            cfg = dataclasses.replace(cfg, modelslim=True)
        return cfg


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _parse(raw: dict[str, Any], source: str) -> ModelConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    archs = raw.get("architectures") or []
    if not archs:
        raise ConfigError(f"{source}: missing required field 'architectures' (expected {list(SUPPORTED_ARCHITECTURES)})")
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ConfigError(
            f"{source}: unsupported architecture {archs}; dsv32 serves {list(SUPPORTED_ARCHITECTURES)} "
            "(DeepSeek-V3.2, V3.2-Exp, V3.2-Speciale)"
        )
    missing = [k for k in REQUIRED_FIELDS if raw.get(k) is None]
    if missing:
        raise ConfigError(f"{source}: missing required field(s) {missing}")
    vals: dict[str, Any] = {k: raw[k] for k in REQUIRED_FIELDS}
    for k, default in OPTIONAL_DEFAULTS.items():
        v = raw.get(k)
        vals[k] = default if v is None else v

    _check(vals["hidden_act"] == "silu", source, "hidden_act", f"only 'silu' is supported, got {vals['hidden_act']!r}")
    _check(vals["scoring_func"] == "sigmoid", source, "scoring_func", f"only 'sigmoid' is supported, got {vals['scoring_func']!r}")
    _check(vals["moe_layer_freq"] == 1, source, "moe_layer_freq", f"only 1 is supported, got {vals['moe_layer_freq']}")
    _check(not vals["attention_bias"], source, "attention_bias", "biased attention projections are not part of DeepSeek-V3.2")
    _check(vals["n_routed_experts"] % vals["n_group"] == 0, source, "n_group",
           f"n_routed_experts={vals['n_routed_experts']} is not divisible by n_group={vals['n_group']}")
    _check(vals["topk_group"] <= vals["n_group"], source, "topk_group", f"topk_group={vals['topk_group']} > n_group={vals['n_group']}")
    _check(vals["index_head_dim"] > vals["qk_rope_head_dim"], source, "index_head_dim",
           f"index_head_dim={vals['index_head_dim']} must exceed qk_rope_head_dim={vals['qk_rope_head_dim']}")
    _check(vals["qk_rope_head_dim"] % 2 == 0, source, "qk_rope_head_dim", "must be even")
    nkv = raw.get("num_key_value_heads")
    _check(nkv is None or nkv == vals["num_attention_heads"], source, "num_key_value_heads",
           f"MLA needs num_key_value_heads == num_attention_heads, got {nkv}")

    n_layers = vals["num_hidden_layers"]
    mlp_types = raw.get("mlp_layer_types")
    if mlp_types is not None:
        _check(len(mlp_types) >= n_layers and all(t in ("dense", "sparse") for t in mlp_types), source,
               "mlp_layer_types", f"expected {n_layers} entries of 'dense'/'sparse', got {mlp_types}")
        dense_layers = tuple(t == "dense" for t in mlp_types[:n_layers])
    else:
        n_dense = min(vals["first_k_dense_replace"], n_layers)
        dense_layers = tuple(i < n_dense for i in range(n_layers))

    eos = vals["eos_token_id"]
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())

    return ModelConfig(
        **{k: vals[k] for k in REQUIRED_FIELDS},
        n_shared_experts=vals["n_shared_experts"],
        routed_scaling_factor=float(vals["routed_scaling_factor"]),
        n_group=vals["n_group"],
        topk_group=vals["topk_group"],
        norm_topk_prob=bool(vals["norm_topk_prob"]),
        rms_norm_eps=float(vals["rms_norm_eps"]),
        first_k_dense_replace=vals["first_k_dense_replace"],
        max_position_embeddings=vals["max_position_embeddings"],
        tie_word_embeddings=bool(vals["tie_word_embeddings"]),
        num_nextn_predict_layers=vals["num_nextn_predict_layers"],
        bos_token_id=vals["bos_token_id"],
        eos_token_ids=eos_ids,
        dense_layers=dense_layers,
        rope=_parse_rope(raw, source),
        quant=_parse_quant(raw.get("quantization_config"), source),
        fp4=_parse_fp4(raw.get("quantization_config"), source),
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
    )


def _check(ok: bool, source: str, name: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"{source}: field '{name}': {why}")


def _parse_rope(raw: dict[str, Any], source: str) -> RopeConfig:
    # HF 5.x: rope_parameters {rope_type, rope_theta, ...}; official: rope_scaling {type, ...} + rope_theta.
    params = raw.get("rope_parameters")
    if params is None:
        params = dict(raw.get("rope_scaling") or {})
    else:
        params = dict(params)
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in ("default", "yarn"):
        raise ConfigError(f"{source}: field 'rope_scaling.type': only 'yarn' or default RoPE is supported, got {rope_type!r}")
    if rope_type == "default":
        return RopeConfig(theta=float(theta))
    if params.get("factor") is None:
        raise ConfigError(f"{source}: missing required field 'rope_scaling.factor' for YaRN")
    return RopeConfig(
        theta=float(theta),
        rope_type="yarn",
        factor=float(params["factor"]),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings") or raw.get("max_position_embeddings") or 4096
        ),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
    )


def _parse_quant(q: dict[str, Any] | None, source: str) -> Fp8BlockQuantConfig | None:
    if not q:
        return None
    method = q.get("quant_method")
    if method in ("modelopt", "modelopt_fp4", "quark"):
        return None  # FP4: _parse_fp4
    if method != "fp8":
        raise ConfigError(
            f"{source}: field 'quantization_config.quant_method': {method!r} checkpoints are not supported "
            "(supported: bf16/fp32 weights, DeepSeek FP8 block 'fp8', NVFP4 'modelopt', MXFP4 'quark')"
        )
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"{source}: field 'quantization_config.fmt': only 'e4m3' is supported, got {fmt!r}")
    block = q.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ConfigError(f"{source}: field 'quantization_config.weight_block_size': expected [n, k], got {block!r}")
    if q.get("activation_scheme", "dynamic") != "dynamic":
        raise ConfigError(f"{source}: field 'quantization_config.activation_scheme': only 'dynamic' is supported")
    return Fp8BlockQuantConfig(block_n=block[0], block_k=block[1], scale_fmt=q.get("scale_fmt"))


def _modelopt_file(raw: Any, source: str) -> dict[str, Any]:
    """hf_quant_config.json ({producer, quantization: {quant_algo, group_size, exclude_modules, kv_cache_quant_algo}})
    as a quantization_config."""
    q = raw.get("quantization") if isinstance(raw, dict) else None
    if not isinstance(q, dict):
        raise ConfigError(f"{source}: expected an object with a 'quantization' object")
    return {"quant_method": "modelopt", **q}


def _parse_fp4(q: dict[str, Any] | None, source: str) -> Fp4QuantConfig | None:
    if not q or q.get("quant_method") not in ("modelopt", "modelopt_fp4", "quark"):
        return None
    f = "quantization_config"
    if q["quant_method"] != "quark":
        if isinstance(q.get("quantization"), dict):  # hf_quant_config.json's nesting, copied into config.json
            q = {**q, **q["quantization"]}
        algo = q.get("quant_algo")
        if algo != "NVFP4":
            raise ConfigError(f"{source}: field '{f}.quant_algo': only 'NVFP4' ModelOpt checkpoints are supported, "
                              f"got {algo!r}")
        group = q.get("group_size", 16)
        if group != 16:
            raise ConfigError(f"{source}: field '{f}.group_size': NVFP4 groups are 16 elements, got {group!r}")
        exclude = q.get("exclude_modules", q.get("ignore")) or []
        if not isinstance(exclude, list) or not all(isinstance(x, str) for x in exclude):
            raise ConfigError(f"{source}: field '{f}.exclude_modules': expected a list of module names / patterns")
        kv = q.get("kv_cache_quant_algo")
        return Fp4QuantConfig("modelopt_fp4", "nvfp4", 16, tuple(exclude), kv_cache_quant=str(kv) if kv else None)
    glob = q.get("global_quant_config")
    if not isinstance(glob, dict):
        raise ConfigError(f"{source}: field '{f}.global_quant_config': expected an object (Quark)")
    act = _quark_scheme(glob, f"{f}.global_quant_config", source)
    if act is None:
        raise ConfigError(f"{source}: field '{f}.global_quant_config.weight': a Quark checkpoint without quantized "
                          "weights")
    overrides = []
    for key in ("layer_quant_config", "layer_type_quant_config"):
        table = q.get(key) or {}
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: field '{f}.{key}': expected an object (pattern → quantization)")
        if key == "layer_type_quant_config" and table:
            raise ConfigError(f"{source}: field '{f}.{key}': per-layer-type Quark overrides are not supported")
        for pattern, cfg in table.items():
            a = _quark_scheme(cfg or {}, f"{f}.{key}.{pattern}", source)
            if a is not None and a != act:
                raise ConfigError(f"{source}: field '{f}.{key}.{pattern}': activations {a or 'unquantized'} differ "
                                  f"from the global {act or 'unquantized'}; mixed activation schemes are not supported")
            overrides.append((pattern, a is not None))
    exclude = q.get("exclude") or []
    if not isinstance(exclude, list) or not all(isinstance(x, str) for x in exclude):
        raise ConfigError(f"{source}: field '{f}.exclude': expected a list of module names / patterns")
    kv = q.get("kv_cache_quant_config") or None
    return Fp4QuantConfig("quark", "mxfp4", 32, tuple(exclude), act, tuple(overrides),
                          kv_cache_quant="fp8" if kv else None)


def _quark_scheme(cfg: dict[str, Any], field_name: str, source: str) -> str | None:
    """A Quark quantization spec {weight, input_tensors, output_tensors, bias}: None when its weight is not quantized,
    else the activation scheme ("mxfp4" for dynamic MXFP4 inputs, "" for none). Anything else is refused by name."""
    w = cfg.get("weight")
    if not w:
        return None
    want = {"dtype": "fp4", "qscheme": "per_group", "group_size": 32, "scale_format": "e8m0"}
    for k, v in want.items():
        if w.get(k, v if k == "scale_format" else None) != v:
            raise ConfigError(f"{source}: field '{field_name}.weight.{k}': only MXFP4 weights (fp4, per_group, "
                              f"group_size 32, e8m0 scales) are supported, got {w.get(k)!r}")
    if w.get("is_dynamic"):
        raise ConfigError(f"{source}: field '{field_name}.weight.is_dynamic': weights must be stored quantized")
    if cfg.get("output_tensors"):
        raise ConfigError(f"{source}: field '{field_name}.output_tensors': output quantization is not supported")
    inp = cfg.get("input_tensors")
    if not inp:
        return ""
    for k, v in want.items():
        if inp.get(k, v if k == "scale_format" else None) != v:
            raise ConfigError(f"{source}: field '{field_name}.input_tensors.{k}': only dynamic MXFP4 activations "
                              f"(fp4, per_group, group_size 32, e8m0) are supported, got {inp.get(k)!r}")
    if inp.get("is_dynamic") is False:
        raise ConfigError(f"{source}: field '{field_name}.input_tensors.is_dynamic': static activation scales are "
                          "not supported")
    return "mxfp4"


# The published FP4 checkpoints' exclusion lists (spec §5.2 / §5.3): NVFP4 quantizes o_proj, the dense MLPs and the
# shared and routed experts; MXFP4 the MLPs and experts. As patterns, for synthetic checkpoints and dummy weights.
NVFP4_EXCLUDE = ["lm_head", "model.layers.*.self_attn.q_a_proj", "model.layers.*.self_attn.q_b_proj",
                 "model.layers.*.self_attn.kv_a_proj_with_mqa", "model.layers.*.self_attn.kv_b_proj",
                 "model.layers.*.self_attn.indexer*", "model.layers.*.mlp.gate", "model.layers.61*"]
MXFP4_EXCLUDE = ["lm_head", "re:.*mlp.gate$", "re:model.layers.61.*", "re:.*self_attn.*"]


def fp4_quantization_config(fmt: str, w4a4: bool = False) -> dict[str, Any]:
    """A quantization_config like the published checkpoints': "nvfp4" (ModelOpt) or "mxfp4" (Quark; w4a4: dynamic
    MXFP4 activations)."""
    if fmt == "nvfp4":
        return {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16, "kv_cache_quant_algo": None,
                "exclude_modules": list(NVFP4_EXCLUDE)}
    spec = {"dtype": "fp4", "qscheme": "per_group", "ch_axis": -1, "group_size": 32, "is_dynamic": False,
            "scale_format": "e8m0"}
    return {"quant_method": "quark", "global_quant_config": {"weight": spec, "input_tensors": dict(spec, is_dynamic=True)
                                                             if w4a4 else None, "output_tensors": None, "bias": None},
            "exclude": list(MXFP4_EXCLUDE), "layer_quant_config": {}}


def deepseek_v32_config(**overrides: Any) -> dict[str, Any]:
    """The official DeepSeek-V3.2 config.json (FP8-block checkpoint) as a dict, with overrides (e.g.
    num_hidden_layers=4 for a reduced-depth model at full width, quantization_config=None for bf16 weights).
    `ModelConfig.from_dict(deepseek_v32_config(...))` plus load_format='dummy' benchmarks without the checkpoint."""
    raw: dict[str, Any] = {
        "architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32", "vocab_size": 129280,
        "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
        "first_k_dense_replace": 3, "moe_layer_freq": 1, "num_attention_heads": 128, "num_key_value_heads": 128,
        "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048, "n_routed_experts": 256,
        "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True, "num_nextn_predict_layers": 1,
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "max_position_embeddings": 163840, "rope_theta": 10000,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 0, "eos_token_id": 1,
    }
    raw.update(overrides)
    return {k: v for k, v in raw.items() if v is not None}


# ---- engine configuration: built by LLM(...) and by `dsv32 serve` alike, handed to every rank ------------------------
@dataclass(frozen=True)
class CacheConfig:
    """KV cache: kv_cache_dtype 'auto' (= model dtype), 'bfloat16', 'float32' or 'fp8_e4m3' (656 bytes per
    token, core/platform.py); indexer_precision 'auto' ('fp8' for FP8 checkpoints, else 'exact'), 'exact' or 'fp8'; the pool is
    num_kv_pages pages, else sized by memory: mem_fraction_static × device memory − weights, else
    kv_cache_memory_gib (at most room for max_running_requests full-length requests)."""

    kv_cache_dtype: str = "auto"
    indexer_precision: str = "auto"
    page_size: int = 64
    num_kv_pages: int | None = None
    kv_cache_memory_gib: float = 1.0
    mem_fraction_static: float | None = None


@dataclass(frozen=True)
class SchedulerConfig:
    """Batching: max_model_len (None: the config's max_position_embeddings capped at 32768), requests running at
    once, tokens per step (chunked prefill; ≤ 0: whole prompts), prefix cache, overlap of step N+1's scheduling with
    step N (where the device runs asynchronously), decode graphs up to graph_max_bs (None: min(running, 256)
    where the backend has graphs)."""

    max_model_len: int | None = None
    max_running_requests: int = 16
    chunked_prefill_size: int = 8192
    enable_prefix_cache: bool = True
    overlap: bool = True
    graph_max_bs: int | None = None
    disable_graphs: bool = False
    isolate_failures: bool = True  # a failed step aborts only the request it can attribute (one process per group)
    max_prefill_tokens: int | None = None  # prompt tokens of newly admitted requests per step (None: no extra cap)
    decode_log_interval: int = 40  # a "Decode batch" log line every this many decode steps (0: none), as SGLang's
    # admission order of waiting requests: "fcfs", or "lpm" (longest cached prefix first, as SGLang's; fcfs when
    # more than LPM_MAX_QUEUE wait or the prefix cache is off)
    schedule_policy: str = "fcfs"


SPECULATIVE_ALGORITHMS = ("EAGLE", "NEXTN")  # SGLang's names; both mean the checkpoint's MTP (NextN) layer here
DEFAULT_SPECULATIVE_STEPS = 3  # SGLang's choice for DeepSeek-V3 / V3.2 when only the algorithm is given


@dataclass(frozen=True)
class SpeculativeConfig:
    """MTP speculative decoding (SGLang's --speculative-* flags): algorithm None (off), 'EAGLE' or its alias 'NEXTN'
    (the checkpoint's NextN layer drafts); num_steps draft tokens per step (None: 3); eagle_topk 1 (a chain: tree
    drafting is not implemented); num_draft_tokens num_steps + 1 (None: that)."""

    algorithm: str | None = None
    num_steps: int | None = None
    eagle_topk: int | None = None
    num_draft_tokens: int | None = None

    @property
    def enabled(self) -> bool:
        return self.algorithm is not None

    def problems(self) -> list[str]:
        """What is wrong with these settings, each naming the flag (empty: fine)."""
        if self.algorithm is None:
            given = [n for n in ("num_steps", "eagle_topk", "num_draft_tokens") if getattr(self, n) is not None]
            return [f"speculative_{given[0]} needs speculative_algorithm (EAGLE or NEXTN)"] if given else []
        out = []
        if str(self.algorithm).upper() not in SPECULATIVE_ALGORITHMS:
            out.append(f"speculative_algorithm {self.algorithm!r}: 'EAGLE' or 'NEXTN' (the checkpoint's MTP layer "
                       "drafts; EAGLE3 / STANDALONE draft models are not implemented)")
        steps = self.num_steps
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= 16):
            out.append(f"speculative_num_steps {steps!r}: an integer in [1, 16]")
        if self.eagle_topk not in (None, 1):
            out.append(f"speculative_eagle_topk {self.eagle_topk!r}: only 1 (chain drafting; tree drafts are not "
                       "implemented)")
        want = (steps if isinstance(steps, int) else DEFAULT_SPECULATIVE_STEPS) + 1
        if self.num_draft_tokens is not None and self.num_draft_tokens != want:
            out.append(f"speculative_num_draft_tokens {self.num_draft_tokens!r}: with eagle_topk 1 it is "
                       f"speculative_num_steps + 1 = {want}")
        return out

    @property
    def steps(self) -> int:
        """Draft tokens per request per step (0: off)."""
        if self.algorithm is None:
            return 0
        return self.num_steps if self.num_steps is not None else DEFAULT_SPECULATIVE_STEPS


@dataclass(frozen=True)
class EngineConfig:
    """Everything a rank needs to build its engine (picklable). model: checkpoint directory; tokenizer: directory
    with tokenizer.json (default: model); dtype 'auto' / 'bfloat16' / 'float32'; device (default: the backend's;
    with several ranks per node each takes index local_rank); backend (None / 'auto': by availability);
    load_format 'auto' or 'dummy'; kernels: (slot, kernel) pairs as SGLang's --dsa-*-backend etc."""

    model: str
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str | None = None
    backend: str | None = None
    load_format: str = "auto"
    load_mtp: bool = False
    kernels: tuple[tuple[str, str | None], ...] = ()
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    seed: int | None = None  # each rank's sampling RNG (torch.manual_seed) at startup; requests' own seeds win

    @property
    def with_mtp(self) -> bool:
        """The MTP layer is loaded: asked for, or speculative decoding drafts with it."""
        return self.load_mtp or self.speculative.enabled
