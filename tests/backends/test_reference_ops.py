"""The reference backend's ops against independent formulations (brute force, explicit matrices, byte layouts).
These pin the contracts in core/ops.py that every other backend is later tested against."""

from __future__ import annotations

import math

import pytest
import torch

from dsv32.backends.reference.ops import ReferenceOps
from dsv32.core.kv_cache import KVCache, KVCacheSpec
from dsv32.core.ops import AttnMetadata, ExpertWeights, LinearWeight

ops = ReferenceOps("cpu")


def sylvester(d):
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def test_hadamard_matches_explicit_matrix():
    x = torch.randn(5, 3, 128)
    y = ops.hadamard_transform(x)
    assert torch.allclose(y, x @ sylvester(128) / math.sqrt(128), atol=1e-5)
    assert torch.allclose((y * y).sum(-1), (x * x).sum(-1), rtol=1e-5)  # orthonormal
    with pytest.raises(ValueError):
        ops.hadamard_transform(torch.randn(2, 96))


def test_quantize_fp8_blocks():
    x = torch.randn(7, 300) * torch.logspace(-3, 2, 300)
    q, s = ops.quantize_fp8(x, 128)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (7, 3)
    assert torch.equal(torch.log2(s), torch.round(torch.log2(s)))  # ue8m0: powers of two
    per_elem_scale = s.repeat_interleave(128, -1)[:, :300]
    deq = q.float() * per_elem_scale
    # e4m3: 3 mantissa bits (relative error ≤ 2^-4) and subnormal steps of 2^-9 · scale near zero
    assert ((deq - x).abs() <= x.abs() / 16 + per_elem_scale / 512).all()


def _cache(latent="fp8_e4m3", index_fp8=True, L=512, R=64, D=128, pages=4, page=64):
    return KVCache(KVCacheSpec(1, pages, page, L, R, D, latent, index_fp8, torch.float32), "cpu")


def test_latent_fp8_layout_is_flashmla_656():
    cache = _cache()
    assert cache.latent[0].shape == (4 + 1, 64, 656)  # + the scratch page (padding rows of graph replays)
    assert cache.scratch_page == 4 and cache.allocator.num_pages == 4
    g = torch.Generator().manual_seed(0)
    c, k_pe = torch.randn(3, 512, generator=g), torch.randn(3, 64, generator=g)
    c[1, 128:256] *= 50  # a block with a different scale (≥ 16× after rounding the scales up to powers of two)
    slots = torch.tensor([5, 64 + 3, 200])
    ops.write_latent_cache(cache.latent[0], c, k_pe, slots)
    raw = cache.latent[0].view(-1, 656)[slots]
    scales = raw[:, 512:528].contiguous().view(torch.float32)
    assert scales.shape == (3, 4) and scales[1, 1] >= 16 * scales[1, 0]
    c_back = raw[:, :512].contiguous().view(torch.float8_e4m3fn).float() * scales.repeat_interleave(128, -1)
    assert torch.allclose(c_back, c, rtol=0.07, atol=1e-3 * scales.max().item())
    assert torch.equal(raw[:, 528:].contiguous().view(torch.bfloat16), k_pe.to(torch.bfloat16))
    back = ops.read_latent(cache.latent[0], slots, 512, 64, torch.float32)
    assert torch.allclose(back[:, :512], c_back) and torch.allclose(back[:, 512:], k_pe.bfloat16().float())


def test_index_key_fp8_layout_is_deepgemm_132():
    cache = _cache()
    pool = cache.index_keys[0]
    assert pool.shape == (4 + 1, 64 * 132)  # + the scratch page
    k = torch.randn(2, 128)
    slots = torch.tensor([64 * 2 + 9, 1])
    ops.write_index_keys(pool, k, slots)
    flat = pool.view(-1)
    for row, slot in enumerate(slots.tolist()):
        page, off = divmod(slot, 64)
        key = flat[page * 8448 + off * 128: page * 8448 + off * 128 + 128].view(torch.float8_e4m3fn).float()
        scale = flat[page * 8448 + 8192 + off * 4: page * 8448 + 8192 + off * 4 + 4].view(torch.float32)
        assert torch.allclose(key * scale, k[row], rtol=0.07, atol=scale.item() * 0.5)


def _paged_setup(lengths, D=16, page=4, fp8=False, seed=0):
    """Random keys for ragged requests written through a shuffled (non-contiguous) page assignment."""
    g = torch.Generator().manual_seed(seed)
    n_pages = sum(math.ceil(n / page) for n in lengths) + 3
    cache = KVCache(KVCacheSpec(1, n_pages, page, 8, 4, D, torch.float32, fp8, torch.float32), "cpu")
    perm = torch.randperm(n_pages, generator=g).tolist()
    page_lists, keys = [], []
    for n in lengths:
        pl = [perm.pop() for _ in range(math.ceil(n / page))]
        page_lists.append(pl)
        k = torch.randn(n, D, generator=g)
        keys.append(k)
        ops.write_index_keys(cache.index_keys[0], k, cache.slots(pl, 0, n))
    return cache, page_lists, keys


def _meta(cache, page_lists, lengths, query_positions):
    token_req, positions = [], []
    for r, poss in enumerate(query_positions):
        token_req += [r] * len(poss)
        positions += poss
    return AttnMetadata(torch.tensor(token_req), torch.tensor(positions), cache.block_table(page_lists),
                        torch.tensor(lengths), list(lengths), cache.page_size)


def brute_topk_sets(q, w, keys_per_req, meta, scale, topk):
    sets = []
    for t in range(q.shape[0]):
        r, pos = int(meta.token_req[t]), int(meta.positions[t])
        k = keys_per_req[r][: pos + 1]
        s = (torch.relu(scale * q[t] @ k.T) * w[t][:, None]).sum(0)
        sets.append((s, min(topk, pos + 1)))
    return sets


@pytest.mark.parametrize("topk", [3, 8, 100])
def test_indexer_topk_exact_vs_brute_force(topk):
    """Ragged requests, lengths not multiples of the page size, top-k larger than the sequence, decode-style and
    prefill-style queries; compared as sets of logical positions, ties allowed to go either way."""
    lengths = [13, 6, 30]
    cache, pl, keys = _paged_setup(lengths)
    qpos = [[12], [0, 1, 2, 3, 4, 5], [20, 29]]
    meta = _meta(cache, pl, lengths, qpos)
    T = meta.token_req.numel()
    q, w = torch.randn(T, 4, 16), torch.randn(T, 4)
    got = ops.indexer_topk(q, w, cache.index_keys[0], meta, 0.25, topk)
    assert got.shape == (T, topk) and got.dtype == torch.int32
    for t, (scores, k_sel) in enumerate(brute_topk_sets(q, w, keys, meta, 0.25, topk)):
        r = int(meta.token_req[t])
        slots = cache.slots(pl[r], 0, lengths[r])
        chosen = got[t][got[t] >= 0].long()
        assert chosen.numel() == k_sel and (got[t][k_sel:] == -1).all()
        logical = torch.tensor([int((slots == c).nonzero()) for c in chosen.tolist()])
        kth = scores.topk(k_sel).values[-1]
        assert (scores[logical] >= kth - 1e-5).all()  # every chosen key is at least as good as the k-th best


def test_indexer_fp8_selection_recall():
    """fp8 mode (Hadamard-rotated, e4m3 q and k with power-of-two scales folded into the weights) selects ≥ 90%
    of the exact mode's top-k on random data."""
    lengths, D, topk = [200], 128, 32
    g = torch.Generator().manual_seed(1)
    k = torch.randn(200, D, generator=g)
    q, w = torch.randn(8, 16, D, generator=g), torch.rand(8, 16, generator=g)
    exact_cache = KVCache(KVCacheSpec(1, 4, 64, 8, 4, D, torch.float32, False, torch.float32), "cpu")
    fp8_cache = KVCache(KVCacheSpec(1, 4, 64, 8, 4, D, torch.float32, True, torch.float32), "cpu")
    pl = [[2, 0, 3, 1]]
    ops.write_index_keys(exact_cache.index_keys[0], k, exact_cache.slots(pl[0], 0, 200))
    ops.write_index_keys(fp8_cache.index_keys[0], ops.hadamard_transform(k), fp8_cache.slots(pl[0], 0, 200))
    meta = _meta(exact_cache, pl, lengths, [list(range(192, 200))])
    exact = ops.indexer_topk(q, w, exact_cache.index_keys[0], meta, D**-0.5, topk)
    q8, s = ops.quantize_fp8(ops.hadamard_transform(q), D)
    fp8 = ops.indexer_topk(q8, w * s[..., 0], fp8_cache.index_keys[0], meta, D**-0.5, topk)
    recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(exact, fp8)) / exact.numel()
    assert recall >= 0.9, recall


def test_sparse_mla_attention_vs_dense_softmax():
    L, R, H = 16, 8, 3
    cache = KVCache(KVCacheSpec(1, 4, 4, L, R, 8, torch.float32, False, torch.float32), "cpu")
    kv = torch.randn(16, L + R)
    ops.write_latent_cache(cache.latent[0], kv[:, :L], kv[:, L:], torch.arange(16))
    q = torch.randn(3, H, L + R)
    idx = torch.tensor([[0, 5, 9, -1, 3], [-1, -1, -1, -1, -1], [15, 14, 99, 2, -1]], dtype=torch.int32)
    out = ops.sparse_mla_attention(q, cache.latent[0], idx, 0.3, L)
    for t in (0, 2):
        sel = [i for i in idx[t].tolist() if 0 <= i < 16]
        p = torch.softmax(0.3 * q[t] @ kv[sel].T, -1)
        assert torch.allclose(out[t], p @ kv[sel, :L], atol=1e-5)
    assert torch.equal(out[1], torch.zeros(H, L))  # no valid key → 0


def test_moe_route_masks_groups_with_minus_inf():
    """Biased scores ≤ 0 in the kept group must still beat every expert of a dropped group (0.0-filling would
    pick a dropped group's expert)."""
    logits = torch.logit(torch.tensor([[0.9, 0.8, 0.1, 0.1, 0.5, 0.5, 0.5, 0.5]]))
    bias = torch.tensor([0.0, 0.0, -2.0, -2.0, 0.0, 0.0, 0.0, 0.0])
    w, ids = ops.moe_route(logits, bias, n_group=2, topk_group=1, top_k=3, renormalize=True, routed_scaling_factor=2.5)
    assert sorted(ids[0].tolist()) == [0, 1, 2] or sorted(ids[0].tolist()) == [0, 1, 3]
    assert abs(w.sum().item() - 2.5) < 1e-5


def test_moe_experts_vs_loop():
    E, I, K, T = 5, 6, 8, 7
    gate, up, down = torch.randn(E, I, K), torch.randn(E, I, K), torch.randn(E, K, I)
    experts = ops.prepare_experts(ExpertWeights(LinearWeight(gate), LinearWeight(up), LinearWeight(down)), torch.float32)
    x = torch.randn(T, K)
    w, ids = torch.rand(T, 2), torch.stack([torch.randperm(E)[:2] for _ in range(T)])
    got = ops.moe_experts(x, experts, w, ids)
    want = torch.stack([sum(w[t, i] * (down[e] @ (torch.nn.functional.silu(gate[e] @ x[t]) * (up[e] @ x[t])))
                            for i, e in enumerate(ids[t].tolist())) for t in range(T)])
    assert torch.allclose(got, want, atol=1e-4)


def test_rotary_layouts():
    from dsv32.core.config import RopeConfig
    from dsv32.core.rope import cos_sin_table

    table = cos_sin_table(RopeConfig(), 8, 32)
    x, pos = torch.randn(4, 2, 8), torch.tensor([0, 3, 7, 31])
    ang = pos[:, None].float() * (10000 ** (-torch.arange(0, 8, 2).float() / 8))
    rot = torch.polar(torch.ones_like(ang), ang)[:, None, :]
    inter = torch.view_as_real(torch.view_as_complex(x.view(4, 2, 4, 2).contiguous()) * rot).view(4, 2, 8)
    assert torch.allclose(ops.rotary_embedding(x, pos, table, interleaved=True), inter, atol=1e-5)
    half = torch.complex(x[..., :4], x[..., 4:]) * rot
    assert torch.allclose(ops.rotary_embedding(x, pos, table, interleaved=False),
                          torch.cat([half.real, half.imag], -1), atol=1e-5)


def test_fp8_linear_dequantizes_blocks():
    w = torch.randn(200, 130)
    q = torch.zeros(200, 130, dtype=torch.float8_e4m3fn)
    scale = torch.rand(2, 2) + 0.5
    q.copy_((w / scale.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :130]).clamp(-448, 448))
    lw = LinearWeight(q, scale)
    x = torch.randn(3, 130)
    dense = ops.dequantize(lw, torch.float32)
    assert torch.allclose(dense, q.float() * scale.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :130])
    assert torch.allclose(ops.linear(x, lw), x @ dense.T, atol=1e-4)
    assert torch.allclose(ops.linear(x, ops.prepare_linear(lw, torch.float32)), x @ dense.T, atol=1e-4)
