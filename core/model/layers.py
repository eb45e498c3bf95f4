"""DeepSeek-V3.2's layers, sized for this rank's shard (core/model/plan.py), written against the op interface.

Each layer reads its weights from the model's dict (official names; each tensor already this rank's part) and returns
its output summed over the ranks that share the computation:
- `Attention`: MLA with q_lora in absorbed form over this rank's heads, keys chosen by the lightning indexer (all of
  its heads on every rank: every rank selects the same keys); o_proj's partial sums reduced over the attention group.
- `DenseMLP` / `MoE`: partial sums over this rank's intermediate columns / experts (`partial`); `FeedForward` runs one
  of them over every attention group's tokens and reduces: one all-reduce, or with attention data-parallelism a
  gather of each group's tokens before and a reduce-scatter after.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from dsv32.core.forward_batch import ForwardBatch
from dsv32.core.kv_cache import KVCache
from dsv32.core.ops import ExpertWeights

if TYPE_CHECKING:
    from dsv32.core.model.model import DeepseekV32

# With attention data-parallelism the dense MLP / MoE runs on every group's tokens: at most this many at a time.
MLP_CHUNK_TOKENS = 8192


class Attention:
    def __init__(self, m: "DeepseekV32", i: int):
        cfg = m.cfg
        self.m, self.i, self.p = m, i, f"model.layers.{i}."
        self.heads = cfg.num_attention_heads // m.groups.attn_tp.size
        # Absorbed MLA needs kv_b_proj per head as dense matrices: W_UK [H, dn, L], W_UV [H, dv, L].
        dn, dv = cfg.qk_nope_head_dim, cfg.v_head_dim
        kv_b = m.ops.dequantize(m.w[self.p + "self_attn.kv_b_proj.weight"], m.dtype)
        kv_b = kv_b.view(self.heads, dn + dv, cfg.kv_lora_rank)
        self.w_uk = kv_b[:, :dn].contiguous()
        self.w_uv = kv_b[:, dn:].contiguous()

    def __call__(self, x: torch.Tensor, fb: ForwardBatch, cache: KVCache) -> torch.Tensor:
        m, i = self.m, self.i
        cfg, ops, w, p = m.cfg, m.ops, m.w, self.p + "self_attn."
        T, H = x.shape[0], self.heads
        dn, dr, L = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank

        q_a, index_k, kv = m.linears(x, self.p, "self_attn.qkv_a")
        qr = ops.rms_norm(q_a, w[p + "q_a_layernorm.weight"], 1e-6)
        q = ops.linear(qr, w[p + "q_b_proj.weight"]).view(T, H, cfg.qk_head_dim)
        q_nope, q_pe = q.split([dn, dr], dim=-1)
        ops.mla_kv_write(kv, L, w[p + "kv_a_layernorm.weight"], 1e-6, fb.positions, m.cos_sin, cache.latent[i],
                         fb.slots)
        q_pe = ops.rotary_embedding(q_pe, fb.positions, m.cos_sin, interleaved=True)

        topk_slots = self.indexer(x, qr, index_k, fb, cache)
        q_abs = torch.bmm(q_nope.transpose(0, 1), self.w_uk).transpose(0, 1)  # [T, H, L]
        q_full = torch.cat([q_abs, q_pe], dim=-1)
        if topk_slots is None:
            o_lat = ops.dense_mla_attention(q_full, cache.latent[i], fb.attn, cfg.softmax_scale, L)
        else:
            o_lat = ops.sparse_mla_attention(q_full, cache.latent[i], topk_slots, cfg.softmax_scale, L, fb.attn)
        o = torch.bmm(o_lat.transpose(0, 1), self.w_uv.transpose(1, 2)).transpose(0, 1)  # [T, H, dv]
        return m.groups.attn_tp.all_reduce(ops.linear(o.reshape(T, H * cfg.v_head_dim), w[p + "o_proj.weight"]))

    def indexer(self, x: torch.Tensor, qr: torch.Tensor, k: torch.Tensor, fb: ForwardBatch, cache: KVCache):
        """Writes this step's indexer keys (k = wk·x); returns top-k physical slots [T, index_topk], or None when no
        request has more keys than the dense threshold (every causal key is selected: dense attention)."""
        m, i = self.m, self.i
        cfg, ops, w, p = m.cfg, m.ops, m.w, self.p + "self_attn.indexer."
        T, Hi, D, dr = x.shape[0], cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        # [rope | nope]: rope first, unlike MLA
        ops.indexer_k_write(k, w[p + "k_norm.weight"], w[p + "k_norm.bias"], 1e-6,
                            fb.positions, m.cos_sin, dr, m.indexer_fp8, cache.index_keys[i], fb.slots)
        if fb.max_kv_len <= m.dense_kv_threshold:
            return None

        q = ops.linear(qr, w[p + "wq_b.weight"]).view(T, Hi, D)
        head_weights = ops.linear(x.float(), w[p + "weights_proj.weight"]) * Hi**-0.5
        q, head_weights = ops.indexer_q_prepare(q, head_weights, fb.positions, m.cos_sin, dr, m.indexer_fp8)
        topk = ops.indexer_topk(q, head_weights, cache.index_keys[i], fb.attn, D**-0.5, cfg.index_topk)
        if m.check_rank_agreement:
            m.check_agreement(topk, f"layer {i} indexer top-k")
        return topk


class DenseMLP:
    """SiLU-gated MLP over this rank's intermediate columns (the dense layers, and the shared experts)."""

    def __init__(self, m: "DeepseekV32", prefix: str):
        self.m, self.prefix = m, prefix  # 'model.layers.{i}.mlp.' or '….mlp.shared_experts.'

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        ops, w = self.m.ops, self.m.w
        fused = w.get(self.prefix + "gate_up.weight")
        if fused is not None:  # [gate | up] in one GEMM: what silu_and_mul takes
            gate_up = ops.linear(x, fused)
        else:
            gate_up = torch.cat([ops.linear(x, w[self.prefix + "gate_proj.weight"]),
                                 ops.linear(x, w[self.prefix + "up_proj.weight"])], -1)
        return ops.linear(ops.silu_and_mul(gate_up), w[self.prefix + "down_proj.weight"])


class MoE:
    """Grouped sigmoid routing over every expert (replicated router), this rank's experts, the shared expert."""

    def __init__(self, m: "DeepseekV32", i: int):
        self.m, self.p = m, f"model.layers.{i}."
        self.first_expert, self.num_local = m.plan.expert_range()
        self.all_local = self.num_local == m.cfg.n_routed_experts
        self.shared = DenseMLP(m, self.p + "mlp.shared_experts.") if m.cfg.n_shared_experts else None

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        cfg, ops, w, p = self.m.cfg, self.m.ops, self.m.w, self.p
        router_logits = ops.linear(x.float(), w[p + "mlp.gate.weight"])
        weights, ids = ops.moe_route(router_logits, w[p + "mlp.gate.e_score_correction_bias"], cfg.n_group,
                                     cfg.topk_group, cfg.num_experts_per_tok, cfg.norm_topk_prob,
                                     cfg.routed_scaling_factor)
        if not self.all_local:  # this rank's experts by local index; the others' as num_local (they add nothing here)
            ids = ids - self.first_expert
            ids = torch.where((ids >= 0) & (ids < self.num_local), ids, torch.full_like(ids, self.num_local))
        experts: ExpertWeights = w[p + "mlp.experts"]
        y = ops.moe_experts(x, experts, weights, ids)
        if self.shared is not None:
            y = y + self.shared.partial(x)
        return y


class FeedForward:
    """A dense MLP or MoE run over the tokens of every attention group, reduced over all ranks."""

    def __init__(self, m: "DeepseekV32", i: int):
        self.m = m
        self.block = DenseMLP(m, f"model.layers.{i}.mlp.") if m.cfg.is_dense_layer(i) else MoE(m, i)

    def __call__(self, x: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        g = self.m.groups
        if not g.dp_attention:  # every rank holds the same tokens
            return g.world.all_reduce(self.block.partial(x))
        # Each attention group pads its tokens to the step's per-group size; the group's ranks hold the same tokens
        # and each contributes a 1/attn_tp slice, so the gather has every group's tokens once, in group order.
        T, padded = x.shape[0], fb.mlp_tokens_per_group
        a, j = g.attn_tp.size, g.attn_tp.rank
        chunk = padded // a
        mine = F.pad(x, (0, 0, 0, padded - T))[j * chunk:(j + 1) * chunk]
        xg = g.world.all_gather(mine)
        # every group's tokens at once can be many (a prefill chunk per group): bound the MLP's activations
        y = torch.cat([self.block.partial(part) for part in xg.split(MLP_CHUNK_TOKENS)])
        return g.attn_tp.all_gather(g.world.reduce_scatter(y))[:T]


class DecoderLayer:
    def __init__(self, m: "DeepseekV32", i: int):
        self.m, self.p = m, f"model.layers.{i}."
        self.attn = Attention(m, i)
        self.ffn = FeedForward(m, i)

    def __call__(self, h: torch.Tensor, residual: torch.Tensor | None, fb: ForwardBatch, cache: KVCache):
        ops, w, eps = self.m.ops, self.m.w, self.m.cfg.rms_norm_eps
        if residual is None:
            residual, x = h, ops.rms_norm(h, w[self.p + "input_layernorm.weight"], eps)
        else:
            x, residual = ops.rms_norm(h, w[self.p + "input_layernorm.weight"], eps, residual)
        h = self.attn(x, fb, cache)
        x, residual = ops.rms_norm(h, w[self.p + "post_attention_layernorm.weight"], eps, residual)
        return self.ffn(x, fb), residual


class MTPLayer:
    """The NextN (MTP) layer: h' = Block(eh_proj([enorm(Emb(next token)) ; hnorm(h)])), returned after
    shared_head.norm, where h is the hidden state (lm_head input) of the position before; Block is a full decoder
    layer with its own MLA and indexer caches (cache layer num_hidden_layers). Logits come from the main lm_head."""

    def __init__(self, m: "DeepseekV32", i: int):
        self.m, self.p = m, f"model.layers.{i}."
        self.block = DecoderLayer(m, i)

    def __call__(self, ids: torch.Tensor, hidden: torch.Tensor, fb: ForwardBatch, cache: KVCache) -> torch.Tensor:
        ops, w, eps, p = self.m.ops, self.m.w, self.m.cfg.rms_norm_eps, self.p
        e = ops.rms_norm(self.m.embed(ids), w[p + "enorm.weight"], eps)
        h = ops.rms_norm(hidden.to(e.dtype), w[p + "hnorm.weight"], eps)
        x = ops.linear(torch.cat([e, h], dim=-1), w[p + "eh_proj.weight"])  # embedding half first
        x, residual = self.block(x, None, fb, cache)
        return ops.rms_norm(x, w[p + "shared_head.norm.weight"], eps, residual)[0]
