"""A tiny DeepSeek-V3.2-architecture checkpoint with deterministic random weights, written in the official
format (config.json + model.safetensors) and then loaded through the normal loader. Used by `dsv32 demo`
(and the quickstart) so a new user sees the engine work without downloading anything."""

from __future__ import annotations

import json
import math
import os

import torch

from dsv32.core.config import ModelConfig
from dsv32.core.model import weight_specs

DEMO_CONFIG = {
    "architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32", "vocab_size": 512,
    "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 64, "kv_lora_rank": 64,
    "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "n_routed_experts": 8,
    "num_experts_per_tok": 2, "n_shared_experts": 1, "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5,
    "norm_topk_prob": True, "first_k_dense_replace": 1, "index_n_heads": 32, "index_head_dim": 32,
    "index_topk": 64, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False, "torch_dtype": "float32",
}


def make_demo_checkpoint(path: str, seed: int = 0) -> str:
    """Write the demo checkpoint to `path` (idempotent: an existing complete one is kept). Returns path."""
    from safetensors.torch import save_file

    done = os.path.join(path, "model.safetensors")
    if os.path.isfile(done) and os.path.isfile(os.path.join(path, "config.json")):
        return path
    os.makedirs(path, exist_ok=True)
    cfg = ModelConfig.from_dict(DEMO_CONFIG, "demo config")
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, spec in weight_specs(cfg).items():
        if spec.kind == "experts":
            E, I, Hd = spec.shape
            for j in range(E):
                for proj, shape in (("gate_proj", (I, Hd)), ("up_proj", (I, Hd)), ("down_proj", (Hd, I))):
                    tensors[f"{name}.{j}.{proj}.weight"] = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        elif len(spec.shape) == 2:
            scale = 1.0 if "embed_tokens" in name else 1 / math.sqrt(spec.shape[1])
            tensors[name] = torch.randn(spec.shape, generator=g) * scale
        elif name.endswith("bias"):
            tensors[name] = torch.randn(spec.shape, generator=g) * 0.1
        else:
            tensors[name] = torch.rand(spec.shape, generator=g) + 0.5
    tmp = done + ".tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(DEMO_CONFIG, f, indent=2)
    os.replace(tmp, done)  # atomic: a crash never leaves a half-written checkpoint that looks complete
    return path
