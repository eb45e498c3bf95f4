"""Lightning-indexer Triton kernels (backends/triton/indexer.py, topk.py) against ReferenceOps on fresh random inputs.

CPU CI runs them under TRITON_INTERPRET=1 at tiny shapes; `cuda`-marked tests run DeepSeek-V3.2 shapes (Hi 64, D 128,
top-k 2048) on an NVIDIA GPU. Tolerances:
- indexer_k_write, float pool: fp32 within 2e-6 abs+rel (LayerNorm's fp32 reduction order differs from torch's);
  bf16 within 1 bf16 ulp of the value or 2^-8 of the largest (same rounding sequence; a LayerNorm value within an
  fp32 ulp of a bf16 rounding boundary can differ by an ulp, which RoPE's products carry into a cancelling sum).
  fp8 pool: ≥ 99% of key bytes and scales identical, every dequantized key within 1 e4m3 ulp (+ 2^-7 of its row's
  largest: an ulp of difference before the Hadamard spreads over the row).
- indexer_q_prepare: bf16 bit-exact; fp32 within 2e-6 (a GPU may fuse RoPE's multiply-add); fp8 as the k path.
- top-k (kernel alone and indexer_topk): compared as sets. An element in one set only must score (recomputed here in
  float64 with the reference formula) within tol of the k-th largest score: exact ties for the kernel alone,
  1e-5·max|row| for float pools (fp32 summation order), 2e-3·max|row| for fp8 pools at V3.2 shapes (tensor-core fp8
  dots do not accumulate in IEEE fp32); there also ≥ 99% of each row's set is shared with the reference.
Rounding helpers (bf16 and e4m3 round-to-nearest-even, ue8m0 scales) are checked bit-exactly against torch, in both
e4m3 formats (e4m3fn, and e4m3fnuz of AMD MI300: max 240, no −0).
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from dsv32.backends.reference.ops import ReferenceOps
from dsv32.backends.triton import indexer as ix
from dsv32.backends.triton.quant import e4m3_bits
from dsv32.backends.triton.topk import topk_indices, topk_into
from dsv32.core.ops import AttnMetadata
from _variants import skip_without_fnuz_kernels

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn
FNUZ = torch.float8_e4m3fnuz  # AMD MI300's e4m3 (the ROCm backend on gfx942)


# ---- rounding helpers ------------------------------------------------------------------------------------------
@triton.jit
def _rounding_kernel(x_ptr, bf16_ptr, fp8_ptr, N: tl.constexpr, MAX: tl.constexpr, FNUZ: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    tl.store(bf16_ptr + offs, ix._round_to(x, tl.bfloat16))
    tl.store(fp8_ptr + offs, e4m3_bits(tl.minimum(tl.maximum(x, -MAX), MAX), FNUZ).to(tl.uint8))


@triton.jit
def _quant_kernel(x_ptr, q_ptr, s_ptr, M: tl.constexpr, D: tl.constexpr, FNUZ: tl.constexpr):
    offs = tl.arange(0, M)[:, None] * D + tl.arange(0, D)[None, :]
    q, s = ix._quant_rows(tl.load(x_ptr + offs), FNUZ)
    tl.store(q_ptr + offs, q)
    tl.store(s_ptr + tl.arange(0, M), s)


@pytest.mark.parametrize("fmt", [torch.float8_e4m3fn, torch.float8_e4m3fnuz], ids=["e4m3fn", "e4m3fnuz"])
def test_rounding_helpers_match_torch(fmt):
    fnuz, fmax = fmt == torch.float8_e4m3fnuz, torch.finfo(fmt).max
    g = torch.Generator().manual_seed(0)
    codes = torch.arange(0, 127 + fnuz, dtype=torch.uint8).view(fmt).float()  # every finite positive e4m3 value
    mids = (codes[:-1] + codes[1:]) / 2  # ties: round to even
    ulp = mids.abs() * 2**-23 + 2**-149
    x = torch.cat([codes, mids, mids + ulp, mids - ulp, torch.tensor([0.0, -0.0, 2**-10, 3 * 2**-11, 1e-30, 500.0])])
    x = torch.cat([x, -x, torch.randn(2000, generator=g) * torch.exp2(torch.randint(-12, 9, (2000,), generator=g))])
    bf16_mids = torch.randn(1000, generator=g).bfloat16().float() * (1 + 2**-8)  # halfway between bf16 neighbours
    x = torch.cat([x, bf16_mids, torch.randn(1000, generator=g) * 1e3])
    n = triton.next_power_of_2(x.numel())
    x = torch.cat([x, torch.zeros(n - x.numel())]).to(DEV)
    bf, f8 = torch.empty(n, dtype=torch.bfloat16, device=DEV), torch.empty(n, dtype=torch.uint8, device=DEV)
    _rounding_kernel[(1,)](x, bf, f8, N=n, MAX=fmax, FNUZ=fnuz)
    assert torch.equal(bf, x.bfloat16())
    assert torch.equal(f8, x.clamp(-fmax, fmax).to(fmt).view(torch.uint8))

    rows = torch.randn(8, 64, generator=g) * torch.exp2(torch.randint(-20, 10, (8, 1), generator=g))
    rows[0, 5] = fmax / 32  # amax exactly max · 2^-5: the scale is 2^-5, not 2^-4
    rows[0] = rows[0].clamp(-fmax / 32, fmax / 32)
    rows[1] = 0.0  # amax clamped to 1e-4
    rows[2] *= 1e-8
    rows = rows.to(DEV)
    q, s = torch.empty(8, 64, dtype=torch.uint8, device=DEV), torch.empty(8, device=DEV)
    _quant_kernel[(1,)](rows, q, s, M=8, D=64, FNUZ=fnuz)
    q_ref, s_ref = ReferenceOps(DEV, fp8_dtype=fmt).quantize_fp8(rows, 64)
    assert torch.equal(s, s_ref[:, 0]) and s[0].item() == 2**-5
    assert torch.equal(q, q_ref.view(torch.uint8))


# ---- shared checks ---------------------------------------------------------------------------------------------
def _check_fp8(got_q: torch.Tensor, got_s: torch.Tensor, want_q: torch.Tensor, want_s: torch.Tensor, fmt=FP8):
    """e4m3 bytes [n, D] with one scale per row: ≥ 99% identical bytes and scales, dequantized within 1 e4m3 ulp."""
    assert (got_q == want_q).float().mean() >= 0.99
    assert (got_s == want_s).float().mean() >= 0.99
    a = got_q.view(fmt).float() * got_s[:, None]
    b = want_q.view(fmt).float() * want_s[:, None]
    # + 2^-7 of the row's largest key: a bf16 ulp of difference before the Hadamard spreads over the whole row
    bound = (2**-3 * torch.maximum(a.abs(), b.abs()) + 2**-9 * torch.maximum(got_s, want_s)[:, None]
             + 2**-7 * b.abs().amax(-1, keepdim=True))
    assert ((a - b).abs() <= bound).all()


def _index_pool(fp8, dtype, pages, page, D, g):
    """A pool filled with random bytes, so that writes to the wrong place and missing writes show."""
    if fp8:
        return torch.randint(0, 256, (pages, page * (D + 4)), generator=g, dtype=torch.uint8).to(DEV)
    return torch.randn(pages, page, D, generator=g).to(DEV, dtype)


def _pool_rows(pool, D):
    """(keys [slots, D], scale bytes [slots, 4]) of every slot of an fp8 pool; (keys, None) for a float pool."""
    if pool.dtype != torch.uint8:
        return pool.view(-1, D), None
    slots = torch.arange(pool.shape[0] * (pool.shape[1] // (D + 4)), device=pool.device)
    k, s = ReferenceOps(pool.device)._index_key_addresses(pool, slots, D)
    return pool.view(-1)[k], pool.view(-1)[s]


# ---- indexer_k_write -------------------------------------------------------------------------------------------
def _check_k_write(dtype, fp8, hadamard, page, T, D, R, seed, fmt=FP8):
    g = torch.Generator().manual_seed(seed)
    pages = math.ceil(T / page) + 2
    k = (torch.randn(T, D, generator=g) * 2 + torch.randn(T, 1, generator=g)).to(DEV, dtype)
    w = (torch.rand(D, generator=g) + 0.5).to(DEV, dtype)
    b = (torch.randn(D, generator=g) * 0.2).to(DEV, dtype)
    positions = torch.randint(0, 500, (T,), generator=g).to(DEV)
    cos_sin = torch.randn(512, R, generator=g).to(DEV)
    slots = torch.randperm(pages * page, generator=g)[:T]
    slots[torch.rand(T, generator=g) < 0.15] = -1
    slots = slots.to(DEV)
    got = _index_pool(fp8, dtype, pages, page, D, g)
    want = got.clone()
    ix.indexer_k_write(k, w, b, 1e-6, positions, cos_sin, R, hadamard, got, slots, fnuz=fmt == FNUZ)
    ReferenceOps(DEV, fp8_dtype=fmt).indexer_k_write(k, w, b, 1e-6, positions, cos_sin, R, hadamard, want, slots)
    gk, gs = _pool_rows(got, D)
    wk, ws = _pool_rows(want, D)
    if fp8:
        untouched = torch.ones(gk.shape[0], dtype=torch.bool, device=DEV)
        untouched[slots[slots >= 0]] = False
        assert torch.equal(gk[untouched], wk[untouched]) and torch.equal(gs[untouched], ws[untouched])
        _check_fp8(gk[~untouched], gs[~untouched].view(torch.float32).view(-1), wk[~untouched],
                   ws[~untouched].view(torch.float32).view(-1), fmt)
    elif dtype == torch.float32:
        torch.testing.assert_close(gk, wk, atol=2e-6, rtol=2e-6)
    else:
        # one bf16 ulp of the value, or of the row's largest (RoPE mixes two values: a 1-ulp difference in one of
        # them can exceed an ulp of a result that cancels)
        torch.testing.assert_close(gk.float(), wk.float(), atol=2**-8 * wk.float().abs().amax().item(), rtol=2**-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fp8,hadamard", [(False, False), (False, True), (True, True)],
                         ids=["float-pool", "float-pool-hadamard", "fp8-pool"])
@pytest.mark.parametrize("page", [4, 16, 64])
def test_indexer_k_write(dtype, fp8, hadamard, page):
    _check_k_write(dtype, fp8, hadamard, page, T=23, D=64, R=16, seed=page + 7 * fp8 + 3 * hadamard)


def test_indexer_k_write_non_power_of_two_dim():
    _check_k_write(torch.bfloat16, False, False, 16, T=9, D=48, R=16, seed=5)


@pytest.mark.parametrize("page", [4, 64])
def test_indexer_k_write_fnuz(page):
    """The fp8 pool in e4m3fnuz (max 240, no −0), against the reference in the same format."""
    _check_k_write(torch.bfloat16, True, True, page, T=23, D=64, R=16, seed=page + 1, fmt=FNUZ)


@pytest.mark.cuda
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16-pool", "fp8-pool"])
def test_indexer_k_write_v32_shapes(fp8):
    _check_k_write(torch.bfloat16, fp8, fp8, 64, T=4096, D=128, R=64, seed=1)


# ---- indexer_q_prepare -----------------------------------------------------------------------------------------
def _check_q_prepare(dtype, fp8, T, H, D, R, seed, fmt=FP8):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(T, H, D, generator=g) * torch.exp2(torch.randn(T, H, 1, generator=g))).to(DEV, dtype)
    hw = torch.randn(T, H, generator=g).to(DEV)
    positions = torch.randint(0, 500, (T,), generator=g).to(DEV)
    cos_sin = torch.randn(512, R, generator=g).to(DEV)
    gq, gw = ix.indexer_q_prepare(q, hw, positions, cos_sin, R, fp8, fnuz=fmt == FNUZ)
    wq, ww = ReferenceOps(DEV, fp8_dtype=fmt).indexer_q_prepare(q, hw, positions, cos_sin, R, fp8)
    assert gq.shape == wq.shape and gq.dtype == wq.dtype and gw.shape == ww.shape and gw.dtype == torch.float32
    if fp8:
        gs, ws = gw / hw, ww / hw  # the per-(token, head) scales
        _check_fp8(gq.view(torch.uint8).view(T * H, D), gs.view(-1), wq.view(torch.uint8).view(T * H, D), ws.view(-1),
                   fmt)
    elif dtype == torch.bfloat16:
        assert torch.equal(gq, wq) and torch.equal(gw, ww)
    else:
        torch.testing.assert_close(gq, wq, atol=2e-6, rtol=2e-6)
        assert torch.equal(gw, ww)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fp8", [False, True], ids=["exact", "fp8"])
def test_indexer_q_prepare(dtype, fp8):
    _check_q_prepare(dtype, fp8, T=11, H=6, D=64, R=16, seed=int(fp8) + (dtype == torch.bfloat16) * 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_indexer_q_prepare_fnuz(dtype):
    _check_q_prepare(dtype, True, T=11, H=6, D=64, R=16, seed=9, fmt=FNUZ)


@pytest.mark.cuda
@pytest.mark.parametrize("fp8", [False, True], ids=["exact", "fp8"])
def test_indexer_q_prepare_v32_shapes(fp8):
    _check_q_prepare(torch.bfloat16, fp8, T=4096, H=64, D=128, R=64, seed=3)


# ---- top-k kernel alone ----------------------------------------------------------------------------------------
def _check_topk_rows(got: torch.Tensor, scores: list[torch.Tensor], topk: int, tol_rel: float, min_overlap=None,
                     want: torch.Tensor | None = None):
    """got [R, topk]: per row, indices into scores[r] (1-D, n entries) padded with −1. Each row must hold min(topk, n)
    distinct indices forming a top-k up to ties within tol_rel · max|row|; against `want` (the reference's rows, same
    indexing) the sets may differ only by such ties, and share ≥ min_overlap of their entries if given."""
    for r, s in enumerate(scores):
        n = s.numel()
        row = got[r].tolist()
        chosen = [x for x in row if x >= 0]
        k = min(topk, n)
        assert len(chosen) == k and len(set(chosen)) == k, f"row {r}: {len(chosen)} entries, want {k} distinct"
        assert row.count(-1) == topk - k
        if k == 0:
            continue
        kth = torch.topk(s, k).values[-1].item()
        finite = s[s.isfinite()]
        tol = tol_rel * (finite.abs().max().item() if finite.numel() else 0.0)
        idx = torch.tensor(chosen, dtype=torch.long)
        assert (s[idx] >= kth - tol).all(), f"row {r}: a chosen entry scores below the k-th largest"
        if want is not None:
            ref = {x for x in want[r].tolist() if x >= 0}
            diff = torch.tensor(sorted(ref ^ set(chosen)), dtype=torch.long)
            assert ((s[diff] - kth).abs() <= tol).all(), f"row {r}: sets differ beyond ties"
            if min_overlap is not None:
                assert len(ref & set(chosen)) >= min_overlap * k


def test_topk_indices_tiny():
    g = torch.Generator().manual_seed(0)
    R, N, k = 9, 300, 64
    s = torch.randn(R, N, generator=g)
    s[1] = torch.randint(0, 4, (N,), generator=g).float()  # many equal values: ties at the threshold
    s[2] = 0.0  # all equal
    s[3] = -s[3].abs() - 1  # all negative
    s[4, ::2] = float("-inf")
    s[5] = torch.randn(N, generator=g) * 1e-30
    lengths = torch.tensor([300, 290, 200, 257, 300, 299, 64, 10, 0])  # = k, < k, 0
    got = topk_indices(s.to(DEV), lengths.to(DEV), k).cpu()
    assert got.dtype == torch.int32 and got.shape == (R, k)
    _check_topk_rows(got, [s[r, : lengths[r]] for r in range(R)], k, tol_rel=0.0)
    # rows written in place into a wider buffer: nothing beyond each row's k entries
    buf = torch.full((R, k + 1), 12345, dtype=torch.int32, device=DEV)
    topk_into(buf[:, :k], s.to(DEV), lengths.to(DEV), k)
    assert torch.equal(buf[:, :k].cpu(), got) and (buf[:, k] == 12345).all()
    # k larger than every row: all valid entries, in order, padded with −1
    got = topk_indices(s.to(DEV), lengths.to(DEV), 512).cpu()
    for r in range(R):
        assert got[r, : lengths[r]].tolist() == list(range(lengths[r])) and (got[r, lengths[r]:] == -1).all()


@pytest.mark.cuda
def test_topk_indices_long_rows():
    g = torch.Generator().manual_seed(1)
    N, k = 131072, 2048
    s = torch.randn(6, N + 5, generator=g)
    s[1] = torch.randint(0, 1000, (N + 5,), generator=g).float()  # heavy ties
    lengths = torch.tensor([N, N, 163840 // 2, 4097, 2048, 100])
    got = topk_indices(s.to(DEV), lengths.to(DEV), k).cpu()
    _check_topk_rows(got, [s[r, : lengths[r]] for r in range(6)], k, tol_rel=0.0)
    s = torch.randn(2, 163840, generator=g)
    got = topk_indices(s.to(DEV), torch.tensor([163840, 163839]).to(DEV), k).cpu()
    _check_topk_rows(got, [s[0], s[1, :-1]], k, tol_rel=0.0)


# ---- indexer_topk end to end -----------------------------------------------------------------------------------
def _batch(reqs, page, D, fp8, dtype, g, decode=False, fmt=FP8):
    """Requests (kv_len, query tokens = the last n positions) over pages scattered in a shared pool; random keys
    written with the reference; query tokens of all requests shuffled together. Returns (AttnMetadata, pool)."""
    ref = ReferenceOps(DEV, fp8_dtype=fmt)
    n_pages = [math.ceil(n / page) for n, _ in reqs]
    pool_pages = sum(n_pages) + 3
    perm = torch.randperm(pool_pages, generator=g)
    bt = torch.full((len(reqs), max(max(n_pages), 1) + 1), -1, dtype=torch.int32)
    pool = _index_pool(fp8, dtype, pool_pages, page, D, g)
    o, tok_req, tok_pos = 0, [], []
    for r, ((n, nq), np_) in enumerate(zip(reqs, n_pages)):
        bt[r, :np_] = perm[o:o + np_].int()
        o += np_
        pos = torch.arange(n)
        slots = (bt[r, pos // page].long() * page + pos % page).to(DEV)
        keys = torch.randn(n, D, generator=g) * torch.exp2(torch.randn(n, 1, generator=g))
        ref.write_index_keys(pool, keys.to(DEV, dtype), slots)
        tok_req += [r] * nq
        tok_pos += list(range(n - nq, n))
    order = torch.randperm(len(tok_req), generator=g)
    kv_lens = torch.tensor([n for n, _ in reqs])
    batch = AttnMetadata(torch.tensor(tok_req)[order].to(DEV), torch.tensor(tok_pos)[order].to(DEV), bt.to(DEV),
                         kv_lens.to(DEV), kv_lens.tolist(), page, is_decode=decode)
    return batch, pool


def _scores64(q, hw, pool, batch, scale, D, fmt=FP8):
    """Per query token: (its causal keys' physical slots, their float64 scores by the reference formula
    I = k_scale · Σ_h w · relu(scale · q·k))."""
    ref = ReferenceOps(pool.device, fp8_dtype=fmt)
    out = []
    for t in range(q.shape[0]):
        r = int(batch.token_req[t])
        n = min(int(batch.positions[t]) + 1, batch.kv_lens_cpu[r])
        slots = ref._slots_of(batch, r, n)
        k, ks = ref.read_index_keys(pool, slots, D)
        s = (torch.relu(scale * q[t].double() @ k.double().T) * hw[t].double()[:, None]).sum(0) * ks.double()
        out.append((slots.cpu(), s.cpu()))
    return out


def _check_indexer_topk(reqs, page, fp8, dtype, H, D, topk, seed, tol_rel, min_overlap=None, decode=False, fmt=FP8):
    g = torch.Generator().manual_seed(seed)
    batch, pool = _batch(reqs, page, D, fp8, dtype, g, decode, fmt)
    ref = ReferenceOps(DEV, fp8_dtype=fmt)
    T = batch.positions.shape[0]
    q = torch.randn(T, H, D, generator=g).to(DEV, dtype)
    hw = torch.randn(T, H, generator=g).to(DEV)
    if fp8:
        cos_sin = torch.randn(max(n for n, _ in reqs), 16, generator=g).to(DEV)
        q, hw = ref.indexer_q_prepare(q, hw, batch.positions, cos_sin, 16, True)
    scale = D**-0.5
    got = ix.indexer_topk(q, hw, pool, batch, scale, topk)
    want = ref.indexer_topk(q, hw, pool, batch, scale, topk)
    assert got.shape == (T, topk) and got.dtype == torch.int32
    per_row = _scores64(q, hw, pool, batch, scale, D, fmt)
    got_c, want_c = got.cpu(), want.cpu()  # compared by position in the request (slot → position)
    scores, g_rows, w_rows = [], [], []
    for t, (slots, s) in enumerate(per_row):
        pos_of = {int(x): i for i, x in enumerate(slots.tolist())}
        assert all(x in pos_of for x in got_c[t].tolist() if x >= 0), f"token {t}: a slot outside its causal keys"
        g_rows.append([pos_of[x] if x >= 0 else -1 for x in got_c[t].tolist()])
        w_rows.append([pos_of[x] if x >= 0 else -1 for x in want_c[t].tolist()])
        scores.append(s)
    _check_topk_rows(torch.tensor(g_rows), scores, topk, tol_rel, min_overlap, torch.tensor(w_rows))


# ragged: two prefill chunks, decode rows, MTP-style 2–3 query tokens, a request shorter than top-k, one (kv 0) idle
_REQS = [(70, 19), (9, 1), (131, 3), (40, 2), (25, 25), (0, 0), (57, 1)]


@pytest.mark.parametrize("page", [4, 16, 64])
@pytest.mark.parametrize("pool", ["fp32", "bf16", "fp8"])
def test_indexer_topk_tiny(page, pool):
    dtype = torch.float32 if pool == "fp32" else torch.bfloat16
    _check_indexer_topk(_REQS, page, pool == "fp8", dtype, H=4, D=32, topk=32, seed=page, tol_rel=1e-5)


@pytest.mark.parametrize("pool", ["bf16", "fp8"])
def test_indexer_topk_decode_rows(pool):
    """A decode batch (one query token per request, shuffled): one tile per token, no query grouping."""
    reqs = [(70, 1), (9, 1), (131, 1), (40, 1), (57, 1)]
    _check_indexer_topk(reqs, 16, pool == "fp8", torch.bfloat16, H=6, D=32, topk=16, seed=8, tol_rel=1e-5, decode=True)


@pytest.mark.parametrize("decode", [False, True], ids=["ragged", "decode"])
def test_indexer_topk_fnuz(decode):
    """fp8 keys and queries in e4m3fnuz (the ROCm backend on gfx942)."""
    skip_without_fnuz_kernels()
    reqs = [(70, 1), (9, 1), (131, 1), (40, 1)] if decode else _REQS
    _check_indexer_topk(reqs, 16, True, torch.bfloat16, H=4, D=32, topk=16, seed=12, tol_rel=1e-5, decode=decode,
                        fmt=FNUZ)


def test_indexer_topk_chunked_rows(monkeypatch):
    """Query rows processed in several logits chunks (a tiny logits budget), 6 heads (padded to 8), top-k 16."""
    monkeypatch.setattr(ix, "LOGITS_BYTES", 4 * 131 * 13)
    _check_indexer_topk(_REQS, 16, True, torch.bfloat16, H=6, D=64, topk=16, seed=3, tol_rel=1e-5)


def test_indexer_topk_all_selected():
    """Every request has at most top-k keys: all causal keys, no logits needed."""
    _check_indexer_topk([(20, 20), (5, 1), (33, 2)], 16, False, torch.float32, H=4, D=32, topk=64, seed=4,
                        tol_rel=0.0)


@pytest.mark.cuda
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16-pool", "fp8-pool"])
@pytest.mark.parametrize("case", ["decode-b1-32k", "decode-b32", "mtp-b8", "prefill-4k"])
def test_indexer_topk_v32_shapes(fp8, case):
    g = torch.Generator().manual_seed(0)
    if case == "decode-b1-32k":
        reqs = [(32768, 1)]
    elif case == "decode-b32":
        reqs = [(int(n), 1) for n in torch.randint(4096, 32769, (32,), generator=g)]
    elif case == "mtp-b8":
        reqs = [(int(n), 3) for n in torch.randint(4096, 16385, (8,), generator=g)]
    else:
        reqs = [(4096, 4096)]
    _check_indexer_topk(reqs, 64, fp8, torch.bfloat16, H=64, D=128, topk=2048, seed=1,
                        tol_rel=2e-3 if fp8 else 1e-5, min_overlap=0.99)
