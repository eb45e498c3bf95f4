"""The DeepSeek-V3.2 model graph, written against the op interface only, sized for this rank's shard.

Per layer: RMSNorm → MLA with q_lora (absorbed form: queries are projected into the 512-wide latent space,
attention runs over the cached [c | k_pe] entries) whose keys are chosen by the lightning indexer →
residual → RMSNorm → dense MLP (first layers) or MoE (grouped sigmoid routing + shared expert) → residual.
Final RMSNorm and lm_head give fp32 logits. With several ranks the embedding and lm_head are split over the
vocabulary (core/model/plan.py) and the layers reduce their partial sums through the communicator (layers.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv32.core import envs
from dsv32.core.communicator import ProcessGroups, single_process
from dsv32.core.config import ModelConfig
from dsv32.core.forward_batch import ForwardBatch
from dsv32.core.kv_cache import KVCache
from dsv32.core.model.layers import DecoderLayer, MTPLayer
from dsv32.core.model.plan import ParallelPlan
from dsv32.core.ops import LinearWeight, Ops
from dsv32.core.rope import cos_sin_table


class DeepseekV32:
    """Holds this rank's prepared weights and runs forward passes over a ForwardBatch with a KVCache."""

    def __init__(self, cfg: ModelConfig, weights: dict, ops: Ops, dtype: torch.dtype, device,
                 indexer_fp8: bool, max_positions: int | None = None, groups: ProcessGroups | None = None):
        self.cfg, self.ops, self.dtype, self.device = cfg, ops, dtype, torch.device(device)
        self.groups = groups or single_process()
        self.plan = ParallelPlan(cfg, self.groups.layout)
        self.indexer_fp8 = indexer_fp8
        self.w = weights
        self.max_positions = max_positions or cfg.max_position_embeddings
        # Batches whose longest request has at most this many keys skip the indexer logits and run dense attention.
        # Exact only up to index_topk (every key is then selected), so larger values are clamped.
        self.dense_kv_threshold = envs.dense_attn_kv_len_threshold(cfg.index_topk)
        self.check_rank_agreement = self.groups.attn_tp.size > 1 and envs.check_rank_agreement()
        # One table serves MLA (interleaved) and the indexer (half-split): same frequencies and positions.
        self.cos_sin = cos_sin_table(cfg.rope, cfg.qk_rope_head_dim, self.max_positions, self.device)
        self.lm_head = weights.get("lm_head.weight") or LinearWeight(weights["model.embed_tokens.weight"])
        self.vocab_start = self.plan.vocab_start()
        Is = cfg.moe_intermediate_size * cfg.n_shared_experts
        n = self.groups.world.size
        self._out_size = {"self_attn.q_a_proj": cfg.q_lora_rank, "self_attn.indexer.wk": cfg.index_head_dim,
                          "self_attn.kv_a_proj_with_mqa": cfg.latent_dim, "mlp.gate_proj": cfg.intermediate_size // n,
                          "mlp.up_proj": cfg.intermediate_size // n, "mlp.shared_experts.gate_proj": Is // n,
                          "mlp.shared_experts.up_proj": Is // n}
        L = cfg.num_hidden_layers
        self.has_mtp = f"model.layers.{L}.eh_proj.weight" in weights  # loaded with include_mtp
        self._fuse_linears()
        self.layers = [DecoderLayer(self, i) for i in range(L)]
        self.mtp = MTPLayer(self, L) if self.has_mtp else None

    # Linears that read the same input, computed as one where the backend fuses them (one activation quantization,
    # one GEMM launch). The separate weights are dropped: the fused one replaces them.
    _FUSED = {"self_attn.qkv_a": ("self_attn.q_a_proj", "self_attn.indexer.wk", "self_attn.kv_a_proj_with_mqa"),
              "mlp.gate_up": ("mlp.gate_proj", "mlp.up_proj"),
              "mlp.shared_experts.gate_up": ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj")}

    def _fuse_linears(self) -> None:
        for i in range(self.cfg.num_hidden_layers + (1 if self.has_mtp else 0)):
            p = f"model.layers.{i}."
            for fused, parts in self._FUSED.items():
                names = [p + n + ".weight" for n in parts]
                if all(n in self.w for n in names):
                    w = self.ops.fuse_linears([self.w[n] for n in names])
                    if w is not None:
                        self.w[p + fused + ".weight"] = w
                        for n in names:
                            del self.w[n]

    def linears(self, x: torch.Tensor, layer: str, fused: str) -> list[torch.Tensor]:
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
        if self.check_rank_agreement:
            self.check_agreement(torch.cat([fb.input_ids, fb.positions, fb.slots]), "the scheduled batch")
        self.ops.prepare_metadata(fb.attn)
        h, residual = self.embed(fb.input_ids), None
        for layer in self.layers:
            h, residual = layer(h, residual, fb, cache)
        h = h + residual if residual is not None else h
        return self.ops.rms_norm(h, self.w["model.norm.weight"], self.cfg.rms_norm_eps)

    @torch.inference_mode()
    def forward_mtp(self, fb: ForwardBatch, cache: KVCache, hidden: torch.Tensor) -> torch.Tensor:
        """The MTP (NextN) layer on fb's tokens: token t of fb is the token after the one whose hidden state (the
        target's, or the MTP layer's own for a further draft) is hidden[t]; writes the MTP layer's KV (cache layer
        num_hidden_layers) at fb's positions; returns its hidden [T, Hd] after shared_head.norm (lm_head input)."""
        if self.mtp is None:
            raise RuntimeError("the model was built without its MTP layer (include_mtp)")
        if fb.max_kv_len > self.max_positions:
            raise ValueError(f"position {fb.max_kv_len - 1} exceeds the model's {self.max_positions} positions")
        self.ops.prepare_metadata(fb.attn)
        return self.mtp(fb.input_ids, hidden, fb, cache)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.w["model.embed_tokens.weight"]
        comm = self.groups.attn_tp
        if comm.size == 1:
            return F.embedding(ids, table)
        local = ids - self.vocab_start  # this rank's rows of the vocabulary; the others contribute zeros
        inside = (local >= 0) & (local < table.shape[0])
        rows = F.embedding(torch.where(inside, local, torch.zeros_like(local)), table)
        return comm.all_reduce(rows * inside[:, None].to(rows.dtype))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [T, vocab] (gathered from every rank's part of the vocabulary)."""
        out = self.ops.linear(hidden, self.lm_head).float()
        if self.groups.attn_tp.size > 1:
            out = self.groups.attn_tp.all_gather(out, dim=-1)[:, :self.cfg.vocab_size]
        return out

    def check_agreement(self, t: torch.Tensor, what: str) -> None:
        """Debug (DSV32_CHECK_RANK_AGREEMENT=1): every rank of the attention group holds the same t, bit for bit (the
        batch its identical schedulers built, the keys its replicated indexers selected)."""
        ref = self.groups.attn_tp.broadcast(t.clone(), src=0)
        if not torch.equal(ref, t):
            raise RuntimeError(f"rank {self.groups.layout.rank}: {what} differs from its attention group's first rank")
