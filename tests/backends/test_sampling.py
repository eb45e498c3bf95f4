"""The batched sync-free sampler (backends/triton/sampling.py, used by the GPU backends) against the contract of
Ops.sample and the reference sampler: greedy rows exact, filtered support (top-k, top-p, min-p) exactly the
reference's, draw frequencies within sampling error of the filtered distribution, seeded rows independent of their
batch. Plain torch: runs on CPU and GPU."""

from __future__ import annotations

import torch

from dsv32.backends.triton.sampling import sample

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _params(B, temperature=1.0, top_p=1.0, top_k=-1, min_p=0.0):
    f = lambda v: torch.full((B,), float(v))  # noqa: E731
    return f(temperature), f(top_p), torch.full((B,), top_k, dtype=torch.int64), f(min_p)


def _allowed(logits_row, temperature, top_p, top_k, min_p):
    """The reference's support for one row (same steps as ReferenceOps.sample)."""
    row = logits_row.double() / temperature
    if 0 < top_k < row.numel():
        row = row.masked_fill(row < row.topk(top_k).values[-1], float("-inf"))
    if top_p < 1:
        s, order = row.sort(descending=True)
        p = s.softmax(-1)
        drop = p.cumsum(-1) - p >= top_p
        row = row.scatter(0, order, s.masked_fill(drop, float("-inf")))
    probs = row.softmax(-1)
    if min_p > 0:
        probs = probs.masked_fill(probs < min_p * probs.max(), 0.0)
    return set(torch.nonzero(probs > 0).flatten().tolist()), probs / probs.sum()


def test_greedy_rows_are_argmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1000, generator=g).to(DEV)
    t, p, k, m = _params(6)
    t[[0, 3, 5]] = 0.0
    out = sample(logits, t, p, k, m, [None] * 6)
    assert out.dtype == torch.int64 and out.shape == (6,)
    assert out[[0, 3, 5]].tolist() == logits.argmax(-1)[[0, 3, 5]].tolist()
    t[:] = 0
    assert torch.equal(sample(logits, t, p, k, m, [None] * 6), logits.argmax(-1))


def test_filters_keep_exactly_the_reference_support():
    g = torch.Generator().manual_seed(1)
    V, n = 50, 4000
    base = torch.randn(V, generator=g) * 2
    for temperature, top_p, top_k, min_p in ((0.7, 1.0, 5, 0.0), (1.0, 0.6, -1, 0.0), (1.3, 1.0, -1, 0.2),
                                              (1.0, 0.8, 10, 0.05)):
        allowed, probs = _allowed(base, temperature, top_p, top_k, min_p)
        logits = base.expand(n, V).contiguous().to(DEV)
        out = sample(logits, *_params(n, temperature, top_p, top_k, min_p), [None] * n).cpu()
        drawn = set(out.tolist())
        assert drawn <= allowed, (temperature, top_p, top_k, min_p, drawn - allowed)
        freq = torch.bincount(out, minlength=V).double() / n
        assert (freq - probs).abs().max() < 4 * (0.25 / n) ** 0.5 + 1e-9  # 4 sigma of a Bernoulli frequency


def test_seeded_rows_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 300, generator=g).to(DEV)

    def gen(seed):
        return torch.Generator(device=DEV).manual_seed(seed)

    alone = sample(logits[2:3], *_params(1, 0.9), [gen(42)])
    batched = sample(logits, *_params(5, 0.9), [None, gen(7), gen(42), None, gen(9)])
    assert batched[2] == alone[0]
    again = sample(logits, *_params(5, 0.9), [None, gen(7), gen(42), None, gen(9)])
    assert torch.equal(again[[1, 2, 4]], batched[[1, 2, 4]])
