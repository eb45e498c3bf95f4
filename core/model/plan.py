"""The parallel plan: which part of each checkpoint tensor a rank keeps (the model's parallelize plan, as data).

Rules by name (the layout itself is core/parallel.py):
- rows split (column-parallel linears), in whole heads or equal parts:
  `self_attn.q_b_proj`, `self_attn.kv_b_proj` over the attention group; `mlp.gate_proj` / `up_proj` and
  `mlp.shared_experts.gate_proj` / `up_proj` over all ranks; `model.embed_tokens` and `lm_head` (vocabulary rows)
  over the attention group, the last part zero-padded when the vocabulary does not divide;
- columns split (row-parallel linears, their outputs summed across ranks): `self_attn.o_proj` over the attention
  group; `mlp.down_proj`, `mlp.shared_experts.down_proj` over all ranks;
- routed experts: experts [ep_rank·E/ep, (ep_rank+1)·E/ep) of the rank's expert group, each with its gate / up rows
  and down columns split over the expert group's ranks;
- everything else is replicated: q_a / kv_a projections and their norms, the indexer (so every rank scores and
  selects the same keys), layer norms, the router and its bias, the MTP layer's eh_proj and norms.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv32.core.config import ModelConfig
from dsv32.core.model.specs import WeightSpec
from dsv32.core.parallel import RankLayout


@dataclass(frozen=True)
class Shard:
    """Part `index` of `parts` equal parts of dimension `dim`. pad: the dimension need not divide; parts are
    ceil(n / parts) long and the last one is zero-padded past n."""

    dim: int
    index: int
    parts: int
    pad: bool = False

    def size(self, n: int) -> int:
        return -(-n // self.parts) if self.pad else n // self.parts

    def bounds(self, n: int) -> tuple[int, int]:
        """[start, end) of this part inside [0, n) (shorter than size(n) only for a padded last part)."""
        k = self.size(n)
        return min(self.index * k, n), min((self.index + 1) * k, n)


_ATTN_ROWS = ("self_attn.q_b_proj.weight", "self_attn.kv_b_proj.weight")
_ATTN_COLS = ("self_attn.o_proj.weight",)
_MLP_ROWS = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.shared_experts.gate_proj.weight",
             "mlp.shared_experts.up_proj.weight")
_MLP_COLS = ("mlp.down_proj.weight", "mlp.shared_experts.down_proj.weight")
_VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


class ParallelPlan:
    def __init__(self, cfg: ModelConfig, layout: RankLayout):
        self.cfg, self.layout = cfg, layout

    def shard(self, name: str) -> Shard | None:
        """The part of tensor `name` this rank keeps (None: all of it)."""
        L = self.layout
        if name in _VOCAB:
            return _maybe(Shard(0, L.attn_tp_rank, L.attn_tp_size, pad=True))
        if name.endswith(_ATTN_ROWS):
            return _maybe(Shard(0, L.attn_tp_rank, L.attn_tp_size))
        if name.endswith(_ATTN_COLS):
            return _maybe(Shard(1, L.attn_tp_rank, L.attn_tp_size))
        if name.endswith(_MLP_ROWS):
            return _maybe(Shard(0, L.rank, L.world_size))
        if name.endswith(_MLP_COLS):
            return _maybe(Shard(1, L.rank, L.world_size))
        return None

    def expert_range(self) -> tuple[int, int]:
        """(first, count) of the routed experts this rank holds."""
        n = self.cfg.n_routed_experts // self.layout.moe_ep_size
        return self.layout.moe_ep_rank * n, n

    def expert_shard(self, proj: str) -> Shard | None:
        """Part of one routed expert's `proj` ('gate_proj', 'up_proj' or 'down_proj') weight [N, K] this rank keeps."""
        L = self.layout
        return _maybe(Shard(1 if proj == "down_proj" else 0, L.moe_tp_rank, L.moe_tp_size))

    def local_shape(self, name: str, spec: WeightSpec) -> tuple[int, ...]:
        """The shape of this rank's part of `name` (for stacked experts: [local experts, I_local, K])."""
        if spec.kind == "experts":
            E, I, Hd = spec.shape
            s = self.expert_shard("gate_proj")
            return (self.expert_range()[1], s.size(I) if s else I, Hd)
        s = self.shard(name)
        if s is None:
            return spec.shape
        shape = list(spec.shape)
        shape[s.dim] = s.size(shape[s.dim])
        return tuple(shape)

    def vocab_start(self) -> int:
        """First vocabulary row of this rank's embedding / lm_head part."""
        s = self.shard("lm_head.weight")
        return s.bounds(self.cfg.vocab_size)[0] if s else 0


def _maybe(s: Shard) -> Shard | None:
    return s if s.parts > 1 else None
