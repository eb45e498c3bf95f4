"""Batched, sync-free sampling for accelerators (plain torch ops, so it also runs on CPU).

Same filters as the reference sampler (temperature, top-k, top-p, min-p; see Ops.sample), applied to the whole
batch at once instead of row by row, so a step costs a handful of kernel launches and never waits for the device.
The draw is the exponential race argmax(p / E), E ~ Exp(1) — the same distribution as a multinomial draw — with
each seeded row drawing its noise from its own generator, so its tokens do not depend on what it is batched with.
"""

from __future__ import annotations

import torch

from dsv32.core.forward_batch import to_device


def sample(logits: torch.Tensor, temperatures: torch.Tensor, top_ps: torch.Tensor, top_ks: torch.Tensor,
           min_ps: torch.Tensor, generators: list) -> torch.Tensor:
    """logits [B, V] on the device; the parameter tensors on the host (branching on them costs no sync)."""
    rows = logits.float()
    greedy_tokens = rows.argmax(-1)
    greedy = temperatures <= 0
    if bool(greedy.all()):
        return greedy_tokens
    dev, (B, V) = rows.device, rows.shape
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
    noise = torch.empty_like(probs)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if len(unseeded) == B:
        noise.exponential_()
    else:
        for i, g in enumerate(generators):
            noise[i].exponential_(generator=g)
    # Exp(1) noise can be 0 (a uniform draw of exactly 1): 0/0 would be NaN, which argmax takes. Banned tokens never win.
    sampled = (probs / noise).masked_fill(probs <= 0, -1.0).argmax(-1)
    return torch.where(to_device(greedy, dev), greedy_tokens, sampled)
