"""The DeepSeek-V3.2 model graph, written against the op interface only.

Per layer: RMSNorm → MLA with q_lora (absorbed form: queries are projected into the 512-wide latent space,
attention runs over the cached [c | k_pe] entries) whose keys are chosen by the lightning indexer →
residual → RMSNorm → dense MLP (first layers) or MoE (grouped sigmoid routing + shared expert) → residual.
Final RMSNorm and lm_head give fp32 logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv32.core import envs
from dsv32.core.config import ModelConfig
from dsv32.core.forward_batch import ForwardBatch
from dsv32.core.kv_cache import KVCache
from dsv32.core.ops import ExpertWeights, LinearWeight, Ops
from dsv32.core.rope import cos_sin_table


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


class DeepseekV32:
    """Holds prepared weights and runs forward passes over a ForwardBatch with a KVCache."""

    def __init__(self, cfg: ModelConfig, weights: dict, ops: Ops, dtype: torch.dtype, device,
                 indexer_fp8: bool, max_positions: int | None = None):
        self.cfg, self.ops, self.dtype, self.device = cfg, ops, dtype, torch.device(device)
        self.indexer_fp8 = indexer_fp8
        self.w = weights
        self.max_positions = max_positions or cfg.max_position_embeddings
        # Batches whose longest request has at most this many keys skip the indexer logits and run dense attention.
        # Exact only up to index_topk (every key is then selected), so larger values are clamped.
        self.dense_kv_threshold = envs.dense_attn_kv_len_threshold(cfg.index_topk)
        # One table serves MLA (interleaved) and the indexer (half-split): same frequencies and positions.
        self.cos_sin = cos_sin_table(cfg.rope, cfg.qk_rope_head_dim, self.max_positions, self.device)
        self.lm_head = weights.get("lm_head.weight") or LinearWeight(weights["model.embed_tokens.weight"])
        # Absorbed MLA needs kv_b_proj per head as dense matrices: W_UK [H, dn, L], W_UV [H, dv, L].
        H, dn, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
        Is = cfg.moe_intermediate_size * cfg.n_shared_experts
        self._out_size = {"self_attn.q_a_proj": cfg.q_lora_rank, "self_attn.indexer.wk": cfg.index_head_dim,
                          "self_attn.kv_a_proj_with_mqa": cfg.latent_dim, "mlp.gate_proj": cfg.intermediate_size,
                          "mlp.up_proj": cfg.intermediate_size, "mlp.shared_experts.gate_proj": Is,
                          "mlp.shared_experts.up_proj": Is}
        self._fuse_linears()
        self.w_uk, self.w_uv = [], []
        for i in range(cfg.num_hidden_layers):
            kv_b = ops.dequantize(weights[f"model.layers.{i}.self_attn.kv_b_proj.weight"], dtype)
            kv_b = kv_b.view(H, dn + dv, cfg.kv_lora_rank)
            self.w_uk.append(kv_b[:, :dn].contiguous())
            self.w_uv.append(kv_b[:, dn:].contiguous())

    # Linears that read the same input, computed as one where the backend fuses them (one activation quantization,
    # one GEMM launch). The separate weights are dropped: the fused one replaces them.
    _FUSED = {"self_attn.qkv_a": ("self_attn.q_a_proj", "self_attn.indexer.wk", "self_attn.kv_a_proj_with_mqa"),
              "mlp.gate_up": ("mlp.gate_proj", "mlp.up_proj"),
              "mlp.shared_experts.gate_up": ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj")}

    def _fuse_linears(self) -> None:
        for i in range(self.cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            for fused, parts in self._FUSED.items():
                names = [p + n + ".weight" for n in parts]
                if all(n in self.w for n in names):
                    w = self.ops.fuse_linears([self.w[n] for n in names])
                    if w is not None:
                        self.w[p + fused + ".weight"] = w
                        for n in names:
                            del self.w[n]

    def _linears(self, x: torch.Tensor, layer: str, fused: str) -> list[torch.Tensor]:
        """The outputs of the linears fused under `fused` (layer = 'model.layers.{i}.') on x: one GEMM split, or
        one GEMM each."""
        parts = self._FUSED[fused]
        w = self.w.get(layer + fused + ".weight")
        if w is None:
            return [self.ops.linear(x, self.w[layer + n + ".weight"]) for n in parts]
        return list(self.ops.linear(x, w).split([self._out_size[n] for n in parts], dim=-1))

    # ---- forward ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, fb: ForwardBatch, cache: KVCache) -> torch.Tensor:
        """Runs all layers on fb's tokens, writing their KV into cache; returns final-normed hidden [T, Hd]."""
        if fb.max_kv_len > self.max_positions:  # host-side lengths: no device sync (graph capture, overlap)
            raise ValueError(f"position {fb.max_kv_len - 1} exceeds the model's {self.max_positions} positions")
        h = torch.nn.functional.embedding(fb.input_ids, self.w["model.embed_tokens.weight"])
        residual = None
        for i in range(self.cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            if residual is None:
                residual, x = h, self.ops.rms_norm(h, self.w[p + "input_layernorm.weight"], self.cfg.rms_norm_eps)
            else:
                x, residual = self.ops.rms_norm(h, self.w[p + "input_layernorm.weight"], self.cfg.rms_norm_eps, residual)
            h = self._attention(i, x, fb, cache)
            x, residual = self.ops.rms_norm(h, self.w[p + "post_attention_layernorm.weight"], self.cfg.rms_norm_eps, residual)
            h = self._mlp(p + "mlp.", x) if self.cfg.is_dense_layer(i) else self._moe(p, x)
        h = h + residual if residual is not None else h
        return self.ops.rms_norm(h, self.w["model.norm.weight"], self.cfg.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(hidden, self.lm_head).float()

    # ---- attention ----------------------------------------------------------------------------------
    def _attention(self, i: int, x: torch.Tensor, fb: ForwardBatch, cache: KVCache) -> torch.Tensor:
        cfg, ops, w, p = self.cfg, self.ops, self.w, f"model.layers.{i}.self_attn."
        T, H = x.shape[0], cfg.num_attention_heads
        dn, dr, L = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank

        q_a, index_k, kv = self._linears(x, f"model.layers.{i}.", "self_attn.qkv_a")
        qr = ops.rms_norm(q_a, w[p + "q_a_layernorm.weight"], 1e-6)
        q = ops.linear(qr, w[p + "q_b_proj.weight"]).view(T, H, cfg.qk_head_dim)
        q_nope, q_pe = q.split([dn, dr], dim=-1)
        ops.mla_kv_write(kv, L, w[p + "kv_a_layernorm.weight"], 1e-6, fb.positions, self.cos_sin, cache.latent[i],
                         fb.slots)
        q_pe = ops.rotary_embedding(q_pe, fb.positions, self.cos_sin, interleaved=True)

        topk_slots = self._indexer(i, x, qr, index_k, fb, cache)
        q_abs = torch.bmm(q_nope.transpose(0, 1), self.w_uk[i]).transpose(0, 1)  # [T, H, L]
        q_full = torch.cat([q_abs, q_pe], dim=-1)
        if topk_slots is None:
            o_lat = ops.dense_mla_attention(q_full, cache.latent[i], fb.attn, cfg.softmax_scale, L)
        else:
            o_lat = ops.sparse_mla_attention(q_full, cache.latent[i], topk_slots, cfg.softmax_scale, L, fb.attn)
        o = torch.bmm(o_lat.transpose(0, 1), self.w_uv[i].transpose(1, 2)).transpose(0, 1)  # [T, H, dv]
        return ops.linear(o.reshape(T, H * cfg.v_head_dim), w[p + "o_proj.weight"])

    def _indexer(self, i: int, x: torch.Tensor, qr: torch.Tensor, k: torch.Tensor, fb: ForwardBatch, cache: KVCache):
        """Writes this step's indexer keys (k = wk·x); returns top-k physical slots [T, index_topk], or None when no
        request has more keys than index_topk (every causal key is selected: dense attention)."""
        cfg, ops, w, p = self.cfg, self.ops, self.w, f"model.layers.{i}.self_attn.indexer."
        T, Hi, D, dr = x.shape[0], cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        # [rope | nope]: rope first, unlike MLA
        ops.indexer_k_write(k, w[p + "k_norm.weight"], w[p + "k_norm.bias"], 1e-6,
                            fb.positions, self.cos_sin, dr, self.indexer_fp8, cache.index_keys[i], fb.slots)
        if fb.max_kv_len <= self.dense_kv_threshold:
            return None

        q = ops.linear(qr, w[p + "wq_b.weight"]).view(T, Hi, D)
        head_weights = ops.linear(x.float(), w[p + "weights_proj.weight"]) * Hi**-0.5
        q, head_weights = ops.indexer_q_prepare(q, head_weights, fb.positions, self.cos_sin, dr, self.indexer_fp8)
        return ops.indexer_topk(q, head_weights, cache.index_keys[i], fb.attn, D**-0.5, cfg.index_topk)

    # ---- MLP / MoE ----------------------------------------------------------------------------------
    def _mlp(self, prefix: str, x: torch.Tensor) -> torch.Tensor:
        """prefix: 'model.layers.{i}.mlp.' (dense) or '….mlp.shared_experts.'."""
        ops, w = self.ops, self.w
        fused = w.get(prefix + "gate_up.weight")
        if fused is not None:  # [gate | up] in one GEMM: what silu_and_mul takes
            gate_up = ops.linear(x, fused)
        else:
            gate_up = torch.cat([ops.linear(x, w[prefix + "gate_proj.weight"]),
                                 ops.linear(x, w[prefix + "up_proj.weight"])], -1)
        return ops.linear(ops.silu_and_mul(gate_up), w[prefix + "down_proj.weight"])

    def _moe(self, p: str, x: torch.Tensor) -> torch.Tensor:
        cfg, ops, w = self.cfg, self.ops, self.w
        router_logits = ops.linear(x.float(), w[p + "mlp.gate.weight"])
        weights, ids = ops.moe_route(router_logits, w[p + "mlp.gate.e_score_correction_bias"], cfg.n_group,
                                     cfg.topk_group, cfg.num_experts_per_tok, cfg.norm_topk_prob,
                                     cfg.routed_scaling_factor)
        experts: ExpertWeights = w[p + "mlp.experts"]
        y = ops.moe_experts(x, experts, weights, ids)
        if cfg.n_shared_experts:
            y = y + self._mlp(p + "mlp.shared_experts.", x)
        return y
