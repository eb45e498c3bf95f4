"""What the checkpoint holds: every tensor of DeepSeek-V3.2 with its full (unsharded) shape, under the official
names (transformers 5.x writes the same). The parallel plan (plan.py) says which part of each one a rank keeps."""

from __future__ import annotations

from dataclasses import dataclass

from dsv32.core.config import ModelConfig


@dataclass(frozen=True)
class WeightSpec:
    """What the loader must find for one checkpoint tensor.

    kind: "linear" (may come as FP8 with `<name>_scale_inv`), "tensor" (plain), "experts" (the stacked
    routed experts of a layer; the checkpoint holds them as `experts.{j}.{gate,up,down}_proj.weight`),
    "duplicate" (a copy of another tensor: accepted, never read).
    fp32: kept and computed in fp32 whatever the model dtype (router, its bias, indexer head weights).
    """

    shape: tuple[int, ...]
    kind: str = "tensor"
    fp32: bool = False
    optional: bool = False


def layer_weight_specs(cfg: ModelConfig, i: int, dense: bool) -> dict[str, WeightSpec]:
    p = f"model.layers.{i}."
    Hd, H = cfg.hidden_size, cfg.num_attention_heads
    lin = lambda *shape, fp32=False: WeightSpec(tuple(shape), "linear", fp32)  # noqa: E731
    vec = lambda n, fp32=False: WeightSpec((n,), "tensor", fp32)  # noqa: E731
    s = {
        p + "input_layernorm.weight": vec(Hd),
        p + "post_attention_layernorm.weight": vec(Hd),
        p + "self_attn.q_a_proj.weight": lin(cfg.q_lora_rank, Hd),
        p + "self_attn.q_a_layernorm.weight": vec(cfg.q_lora_rank),
        p + "self_attn.q_b_proj.weight": lin(H * cfg.qk_head_dim, cfg.q_lora_rank),
        p + "self_attn.kv_a_proj_with_mqa.weight": lin(cfg.latent_dim, Hd),
        p + "self_attn.kv_a_layernorm.weight": vec(cfg.kv_lora_rank),
        p + "self_attn.kv_b_proj.weight": lin(H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
        p + "self_attn.o_proj.weight": lin(Hd, H * cfg.v_head_dim),
        p + "self_attn.indexer.wq_b.weight": lin(cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank),
        p + "self_attn.indexer.wk.weight": lin(cfg.index_head_dim, Hd),
        p + "self_attn.indexer.k_norm.weight": vec(cfg.index_head_dim),
        p + "self_attn.indexer.k_norm.bias": vec(cfg.index_head_dim),
        p + "self_attn.indexer.weights_proj.weight": lin(cfg.index_n_heads, Hd, fp32=True),
    }
    if dense:
        I = cfg.intermediate_size
        s.update({p + "mlp.gate_proj.weight": lin(I, Hd), p + "mlp.up_proj.weight": lin(I, Hd),
                  p + "mlp.down_proj.weight": lin(Hd, I)})
    else:
        E, I = cfg.n_routed_experts, cfg.moe_intermediate_size
        s.update({
            p + "mlp.gate.weight": lin(E, Hd, fp32=True),
            p + "mlp.gate.e_score_correction_bias": vec(E, fp32=True),
            p + "mlp.experts": WeightSpec((E, I, Hd), "experts"),
        })
        if cfg.n_shared_experts:
            Is = I * cfg.n_shared_experts
            s.update({p + "mlp.shared_experts.gate_proj.weight": lin(Is, Hd),
                      p + "mlp.shared_experts.up_proj.weight": lin(Is, Hd),
                      p + "mlp.shared_experts.down_proj.weight": lin(Hd, Is)})
    return s


def weight_specs(cfg: ModelConfig, include_mtp: bool = False) -> dict[str, WeightSpec]:
    """Every tensor the checkpoint must provide (official names, as transformers 5.x also writes them)."""
    Hd, V = cfg.hidden_size, cfg.vocab_size
    specs = {
        "model.embed_tokens.weight": WeightSpec((V, Hd)),
        "model.norm.weight": WeightSpec((Hd,)),
        # lm_head may be absent when tied to the embedding.
        "lm_head.weight": WeightSpec((V, Hd), "linear", optional=cfg.tie_word_embeddings),
    }
    for i in range(cfg.num_hidden_layers):
        specs.update(layer_weight_specs(cfg, i, cfg.is_dense_layer(i)))
    if include_mtp:
        for j in range(cfg.num_nextn_predict_layers):
            i = cfg.num_hidden_layers + j
            p = f"model.layers.{i}."
            specs.update(layer_weight_specs(cfg, i, dense=i < cfg.first_k_dense_replace))
            specs.update({
                p + "enorm.weight": WeightSpec((Hd,)), p + "hnorm.weight": WeightSpec((Hd,)),
                p + "eh_proj.weight": WeightSpec((Hd, 2 * Hd), "linear"),
                p + "shared_head.norm.weight": WeightSpec((Hd,)),
                # Duplicates of the main head and embedding: engines reuse the main ones.
                p + "shared_head.head.weight": WeightSpec((V, Hd), "duplicate", optional=True),
                p + "embed_tokens.weight": WeightSpec((V, Hd), "duplicate", optional=True),
            })
    return specs
