"""How ranks split DeepSeek-V3.2, with SGLang's flag meanings.

- `--tp N`: N ranks in all (as in SGLang, tp_size is the number of ranks). Attention heads (q_b, kv_b, o_proj), the
  dense and shared-expert MLPs, the routed experts' intermediate columns and the vocabulary (embedding, lm_head) are
  split over them; the indexer, q_a / kv_a projections, norms and the router are replicated (so every rank selects
  the same top-k keys from the same inputs). One all-reduce after o_proj and one after the MLP / MoE.
- `--dp D --enable-dp-attention`: the N ranks form D attention groups of N/D ranks. Each group runs its own batch,
  with attention (and embedding / lm_head) split over its N/D ranks; the dense MLPs and MoE still span all N ranks:
  every group's tokens are gathered before them and the results scattered back. The MLA latent cache is replicated
  inside an attention group, so D groups hold D times more KV than one TP-N group.
- `--ep E` (E divides N): the routed experts are partitioned over E expert groups; each expert's intermediate
  columns over the N/E ranks of its group. Ranks combine expert outputs through the same reduction as TP.
- `--nnodes K --node-rank k --dist-init-addr host:port`: the N ranks are spread over K nodes, N/K per node.

World rank r belongs to attention group r // (N/D) at position r % (N/D), and to expert group r // (N/E) at
position r % (N/E).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dsv32.core.config import ModelConfig


@dataclass(frozen=True)
class ParallelConfig:
    tp_size: int = 1
    dp_size: int = 1
    ep_size: int = 1
    enable_dp_attention: bool = False
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None  # host:port of rank 0's rendezvous (default on one node: a free local port)
    dist_timeout_s: float = 600.0  # a collective or a rank that makes no progress this long ends the run
    watchdog_timeout_s: float | None = None  # a rank that makes no progress this long ends the run (None: the above)

    @property
    def progress_timeout_s(self) -> float:
        return self.watchdog_timeout_s if self.watchdog_timeout_s is not None else self.dist_timeout_s

    @property
    def world_size(self) -> int:
        return self.tp_size

    @property
    def attn_dp_size(self) -> int:
        """Number of attention groups (independent batches)."""
        return self.dp_size if self.enable_dp_attention else 1

    @property
    def attn_tp_size(self) -> int:
        return self.tp_size // self.attn_dp_size

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nnodes

    def node_ranks(self) -> range:
        """The world ranks this node runs."""
        k = self.ranks_per_node
        return range(self.node_rank * k, (self.node_rank + 1) * k)

    def problems(self) -> list[str]:
        """What is wrong with these flags alone (an empty list: nothing)."""
        out = []
        for name in ("tp_size", "dp_size", "ep_size", "nnodes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                out.append(f"--{name.replace('_size', '').replace('_', '-')} must be a positive integer, "
                           f"got {getattr(self, name)!r}")
        if out:
            return out
        if self.dp_size > 1 and not self.enable_dp_attention:
            out.append(f"--dp {self.dp_size} without --enable-dp-attention asks for {self.dp_size} independent "
                       "replicas behind a router, which dsv32 does not implement; add --enable-dp-attention (attention "
                       "data-parallel inside one TP group, as SGLang's DeepSeek docs use it) or run one server per "
                       "replica behind a load balancer")
        hint = f" (as in SGLang, --tp is the number of ranks: e.g. --tp {max(self.dp_size, self.ep_size)})"
        if self.enable_dp_attention and self.tp_size % self.dp_size:
            out.append(f"--dp {self.dp_size} must divide --tp {self.tp_size} with --enable-dp-attention" + hint)
        if self.tp_size % self.ep_size:
            out.append(f"--ep {self.ep_size} must divide --tp {self.tp_size}" + hint)
        if self.tp_size % self.nnodes:
            out.append(f"--nnodes {self.nnodes} must divide --tp {self.tp_size} (ranks per node)")
        if not 0 <= self.node_rank < self.nnodes:
            out.append(f"--node-rank {self.node_rank} must be in [0, --nnodes {self.nnodes})")
        if self.nnodes > 1 and not self.dist_init_addr:
            out.append("--nnodes > 1 needs --dist-init-addr HOST:PORT (rank 0's node, reachable from every node)")
        if self.dist_init_addr is not None and not _is_host_port(self.dist_init_addr):
            out.append(f"--dist-init-addr {self.dist_init_addr!r}: expected HOST:PORT")
        if not self.dist_timeout_s > 0:
            out.append(f"--dist-timeout must be positive, got {self.dist_timeout_s}")
        return out

    def model_problems(self, cfg: "ModelConfig") -> list[str]:
        """Which of the model's dimensions this layout cannot split evenly."""
        out = []
        a, n, e = self.attn_tp_size, self.world_size, self.ep_size
        if cfg.num_attention_heads % a:
            out.append(f"{cfg.num_attention_heads} attention heads cannot be split over {a} attention-TP ranks"
                       + (" (--tp / --dp)" if self.enable_dp_attention else " (--tp)"))
        if any(cfg.dense_layers) and cfg.intermediate_size % n:
            out.append(f"the dense MLP's intermediate_size {cfg.intermediate_size} cannot be split over {n} ranks")
        if cfg.n_shared_experts and (cfg.moe_intermediate_size * cfg.n_shared_experts) % n:
            out.append(f"the shared expert's {cfg.moe_intermediate_size * cfg.n_shared_experts} intermediate columns "
                       f"cannot be split over {n} ranks")
        if cfg.n_routed_experts % e:
            out.append(f"{cfg.n_routed_experts} routed experts cannot be partitioned over --ep {e}")
        if cfg.moe_intermediate_size % (n // e):
            out.append(f"moe_intermediate_size {cfg.moe_intermediate_size} cannot be split over the {n // e} ranks of "
                       f"an expert group (--tp {n} / --ep {e})")
        return out

    def layout(self, rank: int) -> "RankLayout":
        n, a, m = self.world_size, self.attn_tp_size, self.world_size // self.ep_size
        if not 0 <= rank < n:
            raise ValueError(f"rank {rank} outside [0, {n})")
        return RankLayout(rank=rank, world_size=n, attn_tp_rank=rank % a, attn_tp_size=a, attn_dp_rank=rank // a,
                          attn_dp_size=self.attn_dp_size, moe_ep_rank=rank // m, moe_ep_size=self.ep_size,
                          moe_tp_rank=rank % m, moe_tp_size=m, local_rank=rank % self.ranks_per_node)


@dataclass(frozen=True)
class RankLayout:
    """One rank's place in the parallel layout (see the module docstring)."""

    rank: int = 0
    world_size: int = 1
    attn_tp_rank: int = 0
    attn_tp_size: int = 1
    attn_dp_rank: int = 0
    attn_dp_size: int = 1
    moe_ep_rank: int = 0
    moe_ep_size: int = 1
    moe_tp_rank: int = 0
    moe_tp_size: int = 1
    local_rank: int = 0  # index among this node's ranks (its device index)

    @property
    def attn_group_ranks(self) -> tuple[int, ...]:
        first = self.attn_dp_rank * self.attn_tp_size
        return tuple(range(first, first + self.attn_tp_size))

    @property
    def is_attn_leader(self) -> bool:
        """The rank that talks to the front end for its attention group (and samples for it)."""
        return self.attn_tp_rank == 0


def _is_host_port(addr: str) -> bool:
    host, sep, port = addr.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)
