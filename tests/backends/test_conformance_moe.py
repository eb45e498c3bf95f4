"""Triton MoE ops (backends/triton/moe.py: moe_route, prepare_experts, moe_experts) against ReferenceOps on fresh
random inputs. CPU CI runs them under TRITON_INTERPRET=1 at tiny shapes; `cuda`-marked tests use DeepSeek-V3.2
shapes (E=256, top_k=8, K=7168, I=2048).

Tolerances:
- routing: ids equal as sets per token (order free); weights matched by id, atol = rtol = 1e-6 (fp32; only the
  order of the renormalizing sum differs). Deliberate ties: validity only (distinct ids, at most topk_group
  groups, chosen experts best in their groups, weights = renormalized sigmoid · scale).
- experts, float weights, tiny shapes: fp32 atol = rtol = 1e-4 (ieee dots); bf16 1 ulp (rtol 2^-7, atol 2^-7 ·
  max|ref|): the kernel rounds where the reference rounds (the interpreter's bf16 casts are made round-to-nearest).
- FP8-block weights: against an emulation that quantizes activations as the kernel (x, then h, per row per 128,
  ue8m0) with fp32 dequantized weights: fp32 atol = rtol = 1e-4, bf16 atol = rtol = 2e-2. Against the reference
  (dequantized weights, unquantized activations) the relative error norm ‖y − ref‖/‖ref‖ must stay < 0.1
  (e4m3 rounding of x and of h; measured 0.03–0.055).
- V3.2 shapes (GPU): the reference adds the top_k expert outputs in bf16, the kernel in fp32, and GEMM orders
  differ: bf16 relative error norm < 1e-2 (a torch emulation of that difference gives 4e-3) and max error
  < 2^-4 · max|ref|; FP8: against the reference as above, against the emulation relative error norm < 1e-2.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsv32.backends.reference.ops import ReferenceOps
from dsv32.backends.triton.moe import _align, moe_experts, moe_route, prepare_experts
from dsv32.core.ops import ExpertWeights, LinearWeight
from _variants import skip_without_fnuz_kernels

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _by_id(weights, ids):
    ids_sorted, order = ids.sort(dim=1)
    return weights.gather(1, order), ids_sorted


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ---- routing -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("E,n_group,topk_group,top_k", [(8, 2, 1, 2), (64, 8, 4, 8), (256, 8, 4, 8)])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("bias_shift", [0.0, -3.0], ids=["bias", "negative-scores"])
def test_route(E, n_group, topk_group, top_k, renormalize, bias_shift):
    """bias_shift −3 makes every biased score negative: masking dropped groups with 0 instead of −inf would pick
    experts from them."""
    ref = ReferenceOps(DEV)
    g = _gen(E + top_k)
    T = 7
    logits = (torch.randn(T, E, generator=g) * 2).to(DEV)
    bias = (torch.randn(E, generator=g) * 0.5 + bias_shift).to(DEV)
    w, ids = moe_route(logits, bias, n_group, topk_group, top_k, renormalize, 2.5)
    assert w.shape == ids.shape == (T, top_k) and w.dtype == torch.float32 and ids.dtype == torch.int64
    w_ref, ids_ref = ref.moe_route(logits, bias, n_group, topk_group, top_k, renormalize, 2.5)
    w, ids = _by_id(w, ids)
    w_ref, ids_ref = _by_id(w_ref, ids_ref)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-6)


def test_route_ties():
    """Logits and bias from a few values (many exact ties): any tie-break is fine, the choice must be valid."""
    g = _gen(5)
    T, E, n_group, topk_group, top_k = 16, 64, 8, 4, 8
    logits = torch.randint(-2, 3, (T, E), generator=g).float().to(DEV)
    bias = (torch.randint(0, 2, (E,), generator=g).float() * 0.25).to(DEV)
    w, ids = moe_route(logits, bias, n_group, topk_group, top_k, True, 2.5)
    s = logits.sigmoid()
    b = s + bias
    size = E // n_group
    group_score = b.view(T, n_group, size).topk(2, dim=-1).values.sum(-1)
    for t in range(T):
        chosen = ids[t].tolist()
        assert len(set(chosen)) == top_k and all(0 <= e < E for e in chosen)
        groups = {e // size for e in chosen}
        assert len(groups) <= topk_group
        kth = group_score[t].topk(topk_group).values[-1]
        assert all(group_score[t, grp] >= kth for grp in groups)
        in_groups = [e for e in range(E) if e // size in groups and e not in chosen]
        if in_groups:
            assert b[t, chosen].min() >= b[t, in_groups].max()
    torch.testing.assert_close(w, s.gather(1, ids) / s.gather(1, ids).sum(1, keepdim=True) * 2.5)


# ---- alignment -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T,top_k,E,block_m", [(37, 3, 8, 16), (1, 8, 256, 16), (50, 2, 4, 64)])
def test_align(T, top_k, E, block_m):
    g = _gen(T)
    ids = torch.stack([torch.randperm(E, generator=g)[:top_k] for _ in range(T)]).to(DEV)
    sorted_ids, expert_ids = _align(ids, E, block_m)
    n = T * top_k
    blocks = sorted_ids.view(-1, block_m).cpu()
    expert_ids = expert_ids.cpu()
    flat = ids.reshape(-1).cpu()
    real = sorted_ids[sorted_ids < n].cpu().sort().values
    assert torch.equal(real, torch.arange(n, dtype=real.dtype))  # every pair exactly once
    used = expert_ids[expert_ids >= 0]
    assert torch.all(used[1:] >= used[:-1])  # expert runs in ascending order, live blocks first
    assert torch.all(expert_ids[len(used):] == -1)
    for blk, e in zip(blocks, expert_ids.tolist()):
        live = blk[blk < n].long()
        if e < 0:
            assert live.numel() == 0
        else:
            assert live.numel() > 0 and torch.all(flat[live] == e)


# ---- experts: float weights ----------------------------------------------------------------------------------------
def _float_experts(E, I, K, seed):
    g = _gen(seed)
    return ExpertWeights(LinearWeight(torch.randn(E, I, K, generator=g) / K**0.5),
                         LinearWeight(torch.randn(E, I, K, generator=g) / K**0.5),
                         LinearWeight(torch.randn(E, K, I, generator=g) / I**0.5))


def _routing(T, E, top_k, seed, device=DEV):
    g = _gen(seed)
    logits = torch.randn(T, E, generator=g).to(device)
    bias = (torch.randn(E, generator=g) * 0.1).to(device)
    n_group = 8 if E >= 64 else 2
    return ReferenceOps(device).moe_route(logits, bias, n_group, min(4, n_group // 2), top_k, True, 2.5)


def _close_float(y, y_ref, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    else:
        torch.testing.assert_close(y.float(), y_ref.float(), atol=2**-7 * y_ref.float().abs().max().item(), rtol=2**-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 3, 17, 40])
def test_experts_float(dtype, T):
    """E=8, top_k=2 (T=1 leaves 6 experts unused; T=40 takes the large-batch tiles); K and I not tile multiples."""
    E, K, I, top_k = 8, 96, 48, 2
    ref = ReferenceOps(DEV)
    raw = _float_experts(E, I, K, seed=T)
    w, ids = _routing(T, E, top_k, seed=T)
    x = torch.randn(T, K, generator=_gen(T + 1)).to(DEV, dtype)
    raw = ExpertWeights(*(LinearWeight(p.weight.to(DEV)) for p in (raw.gate, raw.up, raw.down)))
    prepared = prepare_experts(raw, dtype)
    assert prepared.gate_up.weight.shape == (E, 2 * I, K) and prepared.gate_up.weight.dtype == dtype
    y = moe_experts(x, prepared, w, ids)
    assert y.shape == (T, K) and y.dtype == dtype
    _close_float(y, ref.moe_experts(x, ref.prepare_experts(raw, dtype), w, ids), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_one_hot_expert(dtype):
    """Every token routed to experts 3 and 5: each expert's run spans two M-blocks; the other experts are unused."""
    E, K, I, T = 8, 64, 32, 20
    ref = ReferenceOps(DEV)
    raw = _float_experts(E, I, K, seed=9)
    ids = torch.tensor([[3, 5]] * T, device=DEV)
    w = torch.rand(T, 2, generator=_gen(10)).to(DEV)
    x = torch.randn(T, K, generator=_gen(11)).to(DEV, dtype)
    raw = ExpertWeights(*(LinearWeight(p.weight.to(DEV)) for p in (raw.gate, raw.up, raw.down)))
    _close_float(moe_experts(x, prepare_experts(raw, dtype), w, ids),
                 ref.moe_experts(x, ref.prepare_experts(raw, dtype), w, ids), dtype)


def test_experts_no_tokens():
    raw = _float_experts(4, 32, 64, seed=0)
    y = moe_experts(torch.empty(0, 64, device=DEV), prepare_experts(raw, torch.float32),
                    torch.empty(0, 2, device=DEV), torch.empty(0, 2, dtype=torch.int64, device=DEV))
    assert y.shape == (0, 64)


# ---- experts: FP8-block weights ------------------------------------------------------------------------------------
def _fp8_linear(E, N, K, g, device):
    """Random e4m3 values and positive scale_inv that are not powers of two, with W ~ 1/√K."""
    q = torch.empty(E, N, K, dtype=FP8, device=device)
    for e in range(0, E, 16):  # chunks keep the fp32 temporaries small at V3.2 sizes
        q[e:e + 16] = torch.randn(min(16, E - e), N, K, generator=g, device=device).to(FP8)
    s = (torch.rand(E, -(-N // 128), -(-K // 128), generator=g, device=device) + 0.5) / K**0.5
    return LinearWeight(q, s, (128, 128))


def _fp8_experts(E, I, K, seed, device=DEV):
    g = torch.Generator(device).manual_seed(seed)
    return ExpertWeights(_fp8_linear(E, I, K, g, device), _fp8_linear(E, I, K, g, device),
                         _fp8_linear(E, K, I, g, device))


def _ref_prepare(raw, dtype):
    """ReferenceOps.prepare_experts, dequantizing a few experts at a time (the same values, less peak memory)."""
    ref = ReferenceOps(raw.down.weight.device)

    def deq(p):
        return torch.cat([ref.dequantize(LinearWeight(p.weight[e:e + 16], p.scale_inv[e:e + 16]), dtype)
                          for e in range(0, p.weight.shape[0], 16)])

    return ExpertWeights(None, None, LinearWeight(deq(raw.down)),
                         gate_up=LinearWeight(torch.cat([deq(raw.gate), deq(raw.up)], dim=1)))


def _emulate_fp8(x, raw, w, ids):
    """The kernel's math in torch: x and h quantized per row per 128 (the reference quantizer, in the weights' e4m3
    format), fp32 dequantized weights, rounding to x's dtype where the kernel rounds, fp32 sum over top_k."""
    ref = ReferenceOps(x.device, fp8_dtype=raw.down.weight.dtype)
    dtype = x.dtype

    def deq_act(a):
        q, s = ref.quantize_fp8(a, 128)
        return q.float() * s.repeat_interleave(128, dim=-1)[:, :a.shape[-1]]

    def rnd(a):
        return a.to(dtype).float()

    xd = deq_act(x)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in torch.unique(ids).tolist():
        tok, slot = torch.where(ids == e)
        wg, wu, wd = (ref.dequantize(LinearWeight(p.weight[e], p.scale_inv[e]), torch.float32)
                      for p in (raw.gate, raw.up, raw.down))
        gate, up = rnd(xd[tok] @ wg.T), rnd(xd[tok] @ wu.T)
        h = rnd(rnd(F.silu(gate)) * up).to(dtype)
        d = rnd(deq_act(h) @ wd.T)
        out.index_add_(0, tok, rnd(d * w[tok, slot, None]))
    return out.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,I,K", [(1, 128, 192), (5, 128, 192), (40, 128, 192), (1, 160, 192), (5, 160, 192),
                                   (3, 32, 64)])
def test_experts_fp8(T, I, K, dtype):
    """I = 128: gate and up fused; I = 160, 32: kept apart (partial scale blocks). K = 192: two K blocks, the last
    partial. T = 40 takes the large-batch tiles."""
    E, top_k = 8, 2
    raw = _fp8_experts(E, I, K, seed=T + I)
    prepared = prepare_experts(raw, dtype)
    if I % 128 == 0:  # fused: gate_up [E, 2I, K] e4m3 with the block rows of both scales
        assert prepared.gate_up.weight.dtype == FP8 and prepared.gate_up.scale_inv.shape == (E, 2 * I // 128, 2)
    else:  # gate and up block rows cannot be concatenated: kept apart
        assert prepared.gate_up is None and prepared.gate.weight.dtype == FP8
    w, ids = _routing(T, E, top_k, seed=T)
    x = torch.randn(T, K, generator=_gen(T + 2)).to(DEV, dtype)
    y = moe_experts(x, prepared, w, ids)
    assert y.shape == (T, K) and y.dtype == dtype
    emul = _emulate_fp8(x, raw, w, ids).float()
    if dtype == torch.float32:
        torch.testing.assert_close(y.float(), emul, atol=1e-4, rtol=1e-4)
    else:  # bf16: a 1-ulp difference in h can flip an e4m3 rounding of it (a 6% step on that element)
        assert _rel_err(y, emul) < 1e-2
        torch.testing.assert_close(y.float(), emul, atol=5e-2 * emul.abs().max().item(), rtol=2e-2)
    y_ref = ReferenceOps(DEV).moe_experts(x, _ref_prepare(raw, dtype), w, ids)
    assert _rel_err(y, y_ref) < 0.1


@pytest.mark.parametrize("T,I", [(5, 128), (3, 160)])
def test_experts_fp8_fnuz(T, I):
    """e4m3fnuz experts (converted from e4m3fn as the loader does on AMD MI300) with fnuz activations."""
    skip_without_fnuz_kernels()
    from dsv32.core.model.checkpoint import to_platform_fp8

    E, top_k, K = 8, 2, 192
    raw = _fp8_experts(E, I, K, seed=T + I + 1)
    raw = ExpertWeights(*(to_platform_fp8(p, torch.float8_e4m3fnuz, torch.bfloat16) for p in (raw.gate, raw.up, raw.down)))
    prepared = prepare_experts(raw, torch.bfloat16)
    assert (prepared.gate_up or prepared.gate).weight.dtype == torch.float8_e4m3fnuz
    w, ids = _routing(T, E, top_k, seed=T)
    x = torch.randn(T, K, generator=_gen(T + 3)).to(DEV, torch.bfloat16)
    y = moe_experts(x, prepared, w, ids)
    emul = _emulate_fp8(x, raw, w, ids).float()
    assert _rel_err(y, emul) < 1e-2
    y_ref = ReferenceOps(DEV, fp8_dtype=torch.float8_e4m3fnuz).moe_experts(x, _ref_prepare(raw, torch.bfloat16), w, ids)
    assert _rel_err(y, y_ref) < 0.1


def test_experts_fp8_other_blocks():
    """FP8 weights with 32×32 blocks: dequantized at prepare (float path), as the reference does."""
    from dsv32.core.model.checkpoint import fp8_block_quantize

    E, K, I, T = 4, 64, 48, 3
    f = _float_experts(E, I, K, seed=4)
    raw = ExpertWeights(*(LinearWeight(*fp8_block_quantize(p.weight.to(DEV), (32, 32)), (32, 32))
                          for p in (f.gate, f.up, f.down)))
    prepared = prepare_experts(raw, torch.float32)
    assert prepared.gate_up.weight.dtype == torch.float32 and prepared.down.scale_inv is None
    w, ids = _routing(T, E, 2, seed=4)
    x = torch.randn(T, K, generator=_gen(4)).to(DEV)
    ref = ReferenceOps(DEV)
    _close_float(moe_experts(x, prepared, w, ids), ref.moe_experts(x, ref.prepare_experts(raw, torch.float32), w, ids),
                 torch.float32)


# ---- DeepSeek-V3.2 shapes (GPU) ------------------------------------------------------------------------------------
V32 = dict(E=256, top_k=8, K=7168, I=2048)


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 32, 256, 4096])
def test_route_v32(T):
    g = torch.Generator("cuda").manual_seed(T)
    logits = torch.randn(T, 256, generator=g, device="cuda")
    bias = torch.randn(256, generator=g, device="cuda") * 0.1
    w, ids = moe_route(logits, bias, 8, 4, 8, True, 2.5)
    w_ref, ids_ref = ReferenceOps("cuda").moe_route(logits, bias, 8, 4, 8, True, 2.5)
    w, ids = _by_id(w, ids)
    w_ref, ids_ref = _by_id(w_ref, ids_ref)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 32, 256, 4096])
def test_experts_bf16_v32(T):
    E, top_k, K, I = V32.values()
    g = torch.Generator("cuda").manual_seed(T)
    gate_up = torch.randn(E, 2 * I, K, generator=g, device="cuda", dtype=torch.bfloat16).div_(K**0.5)
    down = torch.randn(E, K, I, generator=g, device="cuda", dtype=torch.bfloat16).div_(I**0.5)
    raw = ExpertWeights(LinearWeight(gate_up[:, :I]), LinearWeight(gate_up[:, I:]), LinearWeight(down))
    prepared = prepare_experts(raw, torch.bfloat16)
    want_experts = ReferenceOps("cuda").prepare_experts(raw, torch.bfloat16)
    del raw, gate_up
    w, ids = _routing(T, E, top_k, seed=T, device="cuda")
    x = torch.randn(T, K, generator=g, device="cuda").bfloat16()
    y = moe_experts(x, prepared, w, ids)
    y_ref = ReferenceOps("cuda").moe_experts(x, want_experts, w, ids)
    assert _rel_err(y, y_ref) < 1e-2
    assert (y.float() - y_ref.float()).abs().max() < 2**-4 * y_ref.float().abs().max()


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 32, 256, 4096])
def test_experts_fp8_v32(T):
    E, top_k, K, I = V32.values()
    raw = _fp8_experts(E, I, K, seed=T, device="cuda")
    prepared = prepare_experts(raw, torch.bfloat16)
    assert prepared.gate_up is not None  # I = 2048: fused
    w, ids = _routing(T, E, top_k, seed=T, device="cuda")
    x = torch.randn(T, K, generator=torch.Generator("cuda").manual_seed(T), device="cuda").bfloat16()
    y = moe_experts(x, prepared, w, ids)
    assert _rel_err(y, _emulate_fp8(x, raw, w, ids)) < 1e-2
    y_ref = ReferenceOps("cuda").moe_experts(x, _ref_prepare(raw, torch.bfloat16), w, ids)
    assert _rel_err(y, y_ref) < 0.1
