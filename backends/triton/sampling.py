"""Batched, sync-free sampling for accelerators (plain torch ops, so it also runs on CPU).

Same filters as the reference sampler (temperature, top-k, top-p, min-p; see Ops.sample), applied to the whole
batch at once instead of row by row, so a step costs a handful of kernel launches and never waits for the device;
speculative verification (Ops.verify: accept a draft with probability p(draft), else draw from the rest) likewise.
The draw is the exponential race argmax(p / E), E ~ Exp(1) — the same distribution as a multinomial draw — with
each seeded row drawing its noise from its own generator, so its tokens do not depend on what it is batched with.
"""

from __future__ import annotations

import torch

from dsv32.core.forward_batch import to_device


def _filtered(logits: torch.Tensor, temperatures: torch.Tensor, top_ps: torch.Tensor, top_ks: torch.Tensor,
              min_ps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(argmax tokens [B], greedy rows (host bool [B]), the rows' sampling weights [B, V] or None when every row is
    greedy). The weights are the filtered softmax, not renormalized after min-p (the race does not need it)."""
    rows = logits.float()
    greedy_tokens = rows.argmax(-1)
    greedy = temperatures <= 0
    if bool(greedy.all()):
        return greedy_tokens, greedy, None
    dev, V = rows.device, rows.shape[1]
    temps = to_device(torch.where(greedy, torch.ones_like(temperatures), temperatures).float(), dev)
    x = rows / temps[:, None]
    k = top_ks.clone()
    k[(k <= 0) | (k >= V)] = V
    p = top_ps.float()
    if bool((k < V).any()) or bool((p < 1).any()):
        sorted_x, order = x.sort(dim=-1, descending=True)
        kth = sorted_x.gather(1, to_device(k - 1, dev)[:, None])
        if bool((k < V).any()):
            x = x.masked_fill(x < kth, float("-inf"))
            sorted_x = sorted_x.masked_fill(sorted_x < kth, float("-inf"))
        if bool((p < 1).any()):
            probs_sorted = sorted_x.softmax(-1)
            drop = (probs_sorted.cumsum(-1) - probs_sorted) >= to_device(p, dev)[:, None]
            drop &= to_device(p < 1, dev)[:, None]  # p = 1 keeps every token (cumsum may round past 1)
            x = x.scatter(1, order, sorted_x.masked_fill(drop, float("-inf")))
    probs = x.softmax(-1)
    m = min_ps.float()
    if bool((m > 0).any()):
        probs = probs.masked_fill(probs < to_device(m, dev)[:, None] * probs.amax(-1, keepdim=True), 0.0)
    return greedy_tokens, greedy, probs


def _random_(t: torch.Tensor, generators: list, method: str) -> torch.Tensor:
    """t filled in place by `method` (uniform_, exponential_), each seeded row from its own generator."""
    if all(g is None for g in generators):
        getattr(t, method)()
    else:
        for i, g in enumerate(generators):
            getattr(t[i], method)(generator=g)
    return t


def _race(weights: torch.Tensor, generators: list) -> torch.Tensor:
    """A draw per row from the (unnormalized, non-negative) weights: argmax(w / E), E ~ Exp(1); seeded rows draw
    their noise from their own generator."""
    noise = _random_(torch.empty_like(weights), generators, "exponential_")
    # Exp(1) noise can be 0 (a uniform draw of exactly 1): 0/0 would be NaN, which argmax takes. Banned tokens never win.
    return (weights / noise).masked_fill(weights <= 0, -1.0).argmax(-1)


def sample(logits: torch.Tensor, temperatures: torch.Tensor, top_ps: torch.Tensor, top_ks: torch.Tensor,
           min_ps: torch.Tensor, generators: list) -> torch.Tensor:
    """logits [B, V] on the device; the parameter tensors on the host (branching on them costs no sync)."""
    greedy_tokens, greedy, probs = _filtered(logits, temperatures, top_ps, top_ks, min_ps)
    if probs is None:
        return greedy_tokens
    return torch.where(to_device(greedy, logits.device), greedy_tokens, _race(probs, generators))


def verify(logits: torch.Tensor, drafts: torch.Tensor, temperatures: torch.Tensor, top_ps: torch.Tensor,
           top_ks: torch.Tensor, min_ps: torch.Tensor, generators: list) -> torch.Tensor:
    """Ops.verify for the whole batch at once (no per-row loop, no sync): sampled rows with a draft d accept it when
    u < p(d), u ~ U[0, 1) from the row's generator, and otherwise emit a draw (the race) from p with d's mass removed;
    rows without a draft draw from p; greedy rows emit the argmax. Drafts on the host, like the parameters."""
    greedy_tokens, greedy, probs = _filtered(logits, temperatures, top_ps, top_ks, min_ps)
    if probs is None:
        return greedy_tokens
    dev = logits.device
    d = to_device(drafts.to(torch.int64), dev)
    has = d >= 0
    at = d.clamp(min=0)[:, None]
    p_draft = probs.gather(1, at)[:, 0] / probs.sum(-1).clamp(min=1e-30)  # min-p leaves the weights unnormalized
    u = _random_(torch.empty(probs.shape[0], device=dev), generators, "uniform_")
    accept = has & (u < p_draft)
    rest = torch.where(has[:, None], probs.scatter(1, at, 0.0), probs)
    sampled = torch.where(accept, d, _race(rest, generators))
    return torch.where(to_device(greedy, dev), greedy_tokens, sampled)
