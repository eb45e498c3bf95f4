"""The communicator tier of the op interface: collectives among ranks through torch.distributed — the device's
collective library on devices, gloo on the CPU; the backend names it (`Platform.collective_backend`). Nothing
home-made: every cross-rank transfer of the model is one of these calls. A group of one rank makes each call the
identity, so a single process pays nothing and runs the same code.

The engine's control plane (new requests, outputs, per-step token counts) is host objects over a gloo group of all
ranks (`ProcessGroups.control`), so it never waits on device streams.
"""

from __future__ import annotations

import datetime
import pickle
from dataclasses import dataclass

import torch

from dsv32.core.parallel import RankLayout


def _dist():
    import torch.distributed as dist

    return dist


class Communicator:
    """Collectives among `ranks` (world ranks, in group order) over `group`."""

    def __init__(self, ranks: tuple[int, ...] = (0,), group=None, rank: int = 0):
        self.ranks, self.group = tuple(ranks), group
        self.size = len(self.ranks)
        self.rank = self.ranks.index(rank) if self.size > 1 else 0  # position in the group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the group, in place; returns x."""
        if self.size > 1:
            _dist().all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """The group's x (equal shapes) concatenated along `dim`, in group order."""
        if self.size == 1:
            return x
        dist = _dist()
        out = x.new_empty((self.size * x.shape[0],) + tuple(x.shape[1:]))
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, x.contiguous(), group=self.group)
        dim = dim % x.dim()
        if dim == 0:
            return out
        return out.view(self.size, *x.shape).movedim(0, dim).reshape(
            *x.shape[:dim], self.size * x.shape[dim], *x.shape[dim + 1:])

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the group of x [size·n, ...]; this rank keeps rows [rank·n, (rank+1)·n)."""
        if self.size == 1:
            return x
        dist = _dist()
        out = x.new_empty((x.shape[0] // self.size,) + tuple(x.shape[1:]))
        scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        scatter(out, x.contiguous(), group=self.group)
        return out

    def all_to_all(self, x: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        """Rows of x split by send_counts (one count per group rank) go to those ranks; returns the rows received,
        recv_counts[j] from rank j, in group order."""
        if self.size == 1:
            return x
        out = x.new_empty((sum(recv_counts),) + tuple(x.shape[1:]))
        _dist().all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=self.group)
        return out

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Group rank `src`'s x into every rank's x, in place; returns x."""
        if self.size > 1:
            _dist().broadcast(x, src=self.ranks[src], group=self.group)
        return x


@dataclass
class ProcessGroups:
    """The groups one rank takes part in."""

    layout: RankLayout
    world: Communicator  # every rank: dense-MLP / MoE reductions, attention-DP gathers
    attn_tp: Communicator  # this rank's attention group: o_proj reduction, vocab-parallel embedding / logits, tokens
    control: object | None = None  # gloo group of every rank for host objects; None in a single process

    @property
    def dp_attention(self) -> bool:
        return self.layout.attn_dp_size > 1

    def all_gather_objects(self, obj) -> list:
        """Every rank's picklable obj, in rank order (host only, over the control group)."""
        if self.layout.world_size == 1:
            return [obj]
        dist = _dist()
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        sizes = torch.zeros(self.layout.world_size, dtype=torch.int64)
        sizes[self.layout.rank] = data.numel()
        dist.all_reduce(sizes, group=self.control)
        buf = torch.zeros(int(sizes.max()) * self.layout.world_size, dtype=torch.uint8)
        mine = torch.zeros(int(sizes.max()), dtype=torch.uint8)
        mine[:data.numel()] = data
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(buf, mine, group=self.control)
        width = int(sizes.max())
        return [pickle.loads(buf[r * width:r * width + int(n)].numpy().tobytes()) for r, n in enumerate(sizes.tolist())]

    def all_gather_ints(self, values: list[int]) -> list[list[int]]:
        """Every rank's list of len(values) integers, in rank order (host only)."""
        if self.layout.world_size == 1:
            return [list(values)]
        t = torch.zeros(self.layout.world_size, len(values), dtype=torch.int64)
        t[self.layout.rank] = torch.tensor(values, dtype=torch.int64)
        _dist().all_reduce(t, group=self.control)
        return t.tolist()

    def min_int(self, value: int) -> int:
        """The smallest of every rank's value (host only)."""
        return min(row[0] for row in self.all_gather_ints([value]))


def single_process() -> ProcessGroups:
    return ProcessGroups(RankLayout(), Communicator(), Communicator())


def init_process_groups(layout: RankLayout, backend: str, init_method: str, timeout_s: float) -> ProcessGroups:
    """Joins the world (torch.distributed.init_process_group) and creates every group, in the same order on every
    rank. `backend` (the platform's collective backend) carries device tensors; the control group is gloo."""
    if layout.world_size == 1:
        return single_process()
    dist = _dist()
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend, init_method=init_method, rank=layout.rank, world_size=layout.world_size,
                            timeout=timeout)
    world_ranks = tuple(range(layout.world_size))
    control = None if backend == "gloo" else dist.new_group(list(world_ranks), backend="gloo", timeout=timeout)
    attn = None
    a = layout.attn_tp_size
    for first in range(0, layout.world_size, a):
        ranks = list(range(first, first + a))
        group = dist.new_group(ranks, backend=backend, timeout=timeout) if a < layout.world_size else None
        if layout.rank in ranks:
            attn = Communicator(tuple(ranks), group, layout.rank)
    return ProcessGroups(layout, Communicator(world_ranks, None, layout.rank), attn, control)
