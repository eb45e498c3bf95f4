"""NVIDIA vendor-library wrappers (backends/cuda/vendor.py) against the reference backend.

CPU tests drive the wrappers' own logic (status reasons, head and top-k padding, slot sanitizing, fp8 pool views,
context masking, slot mapping, API-version dispatch) through *fake* `flash_mla` / `deep_gemm` / `flashinfer` modules.
The fakes implement the upstream contracts independently of the reference backend — shapes, dtypes and the asserts of
FlashMLA csrc/api + tests/ref.py (9241ae3, and the 2025 API of c28eca9), DeepGEMM csrc/apis/attention.hpp +
tests/test_attention.py (54e2261), FlashInfer topk.py (fb28d72) — and model their hazards: FlashMLA decode faults on
any index other than −1 outside the pool and leaves rows without a valid index undefined (NaN here), DeepGEMM's paged
logits leave entries past a row's context unwritten (garbage here). Tests marked `cuda` run the real libraries at
DeepSeek-V3.2 shapes and skip with status()'s reason when a library is not usable.

Tolerances: attention bf16 outputs 2e-2 abs+rel (as test_conformance); FP8 GEMM vs the exact emulation on the same
quantized activations: ‖Δ‖/‖emul‖ ≤ 3e-3 on GPU (fp32 on the fakes: 1e-5) and vs ReferenceOps.linear (unquantized
activations) ≤ 5e-2; indexer logits |Δ| ≤ 1e-4·max|ref| (fp32 accumulation order); top-k: the selected slots are valid
causal keys and their sorted scores match the reference's within 1e-4·max (ties may break either way).
"""

from __future__ import annotations

import importlib.machinery
import math
import sys
import types

import pytest
import torch

from dsv32.backends.cuda import vendor
from dsv32.backends.reference.ops import ReferenceOps
from dsv32.core import envs
from dsv32.core.kv_cache import KVCache, KVCacheSpec
from dsv32.core.ops import AttnMetadata, ExpertWeights, LinearWeight

FP8 = torch.float8_e4m3fn
BF16 = torch.bfloat16
LIBS = ("flash_mla", "deep_gemm", "flashinfer")
SCALE = 0.1352338  # V3.2's MLA softmax scale


def close(a, b, atol=2e-2, rtol=2e-2):
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


def need(lib):
    ok, reason = vendor.status(lib)
    if not ok:
        pytest.skip(reason)


# ---- fake vendor modules --------------------------------------------------------------------------------------------
@pytest.fixture
def fake(monkeypatch):
    """CPU stand-ins: no library installed until `install(name, module)`; `sm((major, minor))` sets the GPU."""
    cap = {"sm": (9, 0)}

    class Env:
        def install(self, name, module):
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)
            monkeypatch.setitem(sys.modules, name, module)
            vendor._status.cache_clear()

        def sm(self, value):
            cap["sm"] = value
            vendor._status.cache_clear()

    for lib in LIBS:
        monkeypatch.setitem(sys.modules, lib, None)  # "not installed", even where the real one is
    monkeypatch.setattr(vendor, "_DEVICE_TYPE", "cpu")
    monkeypatch.setattr(vendor, "_capability", lambda device: cap["sm"])
    vendor._status.cache_clear()
    yield Env()
    vendor._status.cache_clear()


def _attend(q, kv, idx, invalid, scale):
    """Per-row softmax attention of q [R, h, d] over kv[idx] (idx [R, K]); rows with every key invalid give NaN."""
    g = kv[idx]
    s = torch.einsum("rhd,rkd->rhk", q, g) * scale
    s = s.masked_fill(invalid[:, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.einsum("rhk,rkd->rhd", torch.exp(s - lse[..., None]), g[..., :512]), lse


def _dequant_656(cache):
    """FlashMLA README's V3.2 fp8 entry: 512 e4m3 | 4 fp32 scales (one per 128) | 64 bf16 rope."""
    e = cache.reshape(-1, 656)
    nope = e[:, :512].contiguous().view(FP8).float().view(-1, 4, 128)
    scales = e[:, 512:528].contiguous().view(torch.float32)
    rope = e[:, 528:].contiguous().view(BF16).float()
    return torch.cat([(nope * scales[:, :, None]).reshape(-1, 512), rope], -1)


def fake_flash_mla(new_api: bool):
    m = types.ModuleType("flash_mla")
    calls = m.calls = []

    class FlashMLASchedMeta:
        pass

    def flash_mla_sparse_fwd(q, kv, indices, sm_scale, d_v=512, attn_sink=None, topk_length=None):
        s_q, h_q, d = q.shape
        assert q.dtype == kv.dtype == BF16 and indices.dtype == torch.int32 and d_v == 512
        assert h_q in (64, 128) and d == 576 and kv.shape[1:] == (1, d)
        assert indices.shape[:2] == (s_q, 1) and indices.shape[2] > 0 and indices.shape[2] % 128 == 0
        assert q.stride(-1) == kv.stride(-1) == indices.stride(-1) == 1
        idx = indices[:, 0].long()
        invalid = (idx < 0) | (idx >= kv.shape[0])
        out, lse = _attend(q.float(), kv[:, 0].float(), idx.clamp(0, kv.shape[0] - 1), invalid, sm_scale)
        calls.append(("prefill", h_q, indices.shape[2]))
        return out.nan_to_num(0.0).to(BF16), lse, lse  # tests/ref.py: a row with no valid key outputs 0

    def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                               num_splits=None, softmax_scale=None, causal=False, is_fp8_kvcache=False, indices=None,
                               **extra):
        b, s_q, h_q, d = q.shape
        assert q.dtype == BF16 and h_q in (64, 128) and d == 576 and head_dim_v == 512 and q.stride(-1) == 1
        nb, page, h_k, entry = k_cache.shape
        assert k_cache.dtype == torch.uint8 and h_k == 1 and entry == 656 and k_cache.stride(1) == 656
        assert is_fp8_kvcache and not causal and indices.dtype == torch.int32
        assert indices.shape[:2] == (b, s_q) and indices.shape[2] % 64 == 0 and indices.stride(-1) == 1
        if new_api:
            assert isinstance(tile_scheduler_metadata, FlashMLASchedMeta) and num_splits is None
        else:
            assert page == 64 and block_table.dtype == torch.int32 and block_table.shape[0] == b
            assert cache_seqlens.shape == (b,) and num_splits.shape == (b + 1,)
        idx = indices.long()
        if ((idx != -1) & ((idx < 0) | (idx >= nb * page))).any():
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        rows = idx.view(b * s_q, -1)
        out, lse = _attend(q.float().reshape(b * s_q, h_q, d), _dequant_656(k_cache), rows.clamp_min(0), rows == -1,
                           softmax_scale)
        calls.append(("decode", b, h_q, indices.shape[2]))
        return out.view(b, s_q, h_q, 512).to(BF16), lse.view(b, s_q, h_q).transpose(1, 2)

    if new_api:
        def get_mla_metadata(*args, **kwargs):
            return FlashMLASchedMeta(), None
    else:
        def get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_heads_q=None,
                             is_fp8_kvcache=False, topk=None):
            assert cache_seqlens.dtype == torch.int32 and cache_seqlens.dim() == 1
            assert num_heads_k == 1 and num_q_tokens_per_head_k == num_heads_q and is_fp8_kvcache and topk > 0
            return torch.zeros(8, 8, dtype=torch.int32), torch.zeros(cache_seqlens.shape[0] + 1, dtype=torch.int32)

    m.flash_mla_sparse_fwd, m.flash_mla_with_kvcache, m.get_mla_metadata = (flash_mla_sparse_fwd,
                                                                              flash_mla_with_kvcache, get_mla_metadata)
    return m


def fake_deep_gemm():
    m = types.ModuleType("deep_gemm")
    num_sms = 8

    def get_paged_mqa_logits_metadata(context_lens, block_kv, sms, indices=None):
        assert context_lens.dim() == 2 and context_lens.dtype == torch.int32 and context_lens.is_contiguous()
        assert block_kv == 64 and sms == num_sms
        return torch.zeros(num_sms + 1, 2, dtype=torch.int32)

    def fp8_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len,
                             clean_logits=False, indices=None):
        B, next_n, H, D = q.shape
        assert q.dtype == FP8 and q.is_contiguous() and H in (32, 64) and D == 128
        nb, block_kv, one, width = kv_cache.shape
        assert kv_cache.dtype == torch.uint8 and block_kv == 64 and one == 1 and width == D + 4
        assert kv_cache.stride(1) == width and kv_cache.stride(3) == 1
        assert weights.dtype == torch.float32 and weights.is_contiguous() and weights.shape == (B * next_n, H)
        assert context_lens.shape == (B, next_n) and context_lens.dtype == torch.int32
        assert block_table.dtype == torch.int32 and block_table.shape[0] == B and block_table.stride(1) == 1
        assert schedule_meta.shape == (num_sms + 1, 2) and not clean_logits  # 2-D context lens: no cleaning
        page_bytes = kv_cache.reshape(nb, -1)
        keys = page_bytes[:, :64 * D].contiguous().view(FP8).float().view(nb, 64, D)  # all keys of a page, then
        sf = page_bytes[:, 64 * D:].contiguous().view(torch.float32).view(nb, 64)  # all their fp32 scales
        aligned = -(-max_context_len // 256) * 256
        logits = torch.full((B * next_n, aligned), 1e30)  # unwritten entries hold garbage
        for b in range(B):
            for j in range(next_n):
                n = int(context_lens[b, j])
                pages = block_table[b, :(n + 63) // 64].long()
                assert (pages >= 0).all() and (pages < nb).all()
                k = (keys[pages] * sf[pages, :, None]).reshape(-1, D)[:n]
                s = torch.relu(q[b, j].float() @ k.T)  # [H, n]
                logits[b * next_n + j, :n] = (weights[b * next_n + j, :, None] * s).sum(0)
        return logits[:, :max_context_len]

    def fp8_mqa_logits(q, kv, weights, cu_seq_len_k_start, cu_seq_len_k_end, clean_logits=True, max_seqlen_k=0):
        k, sf = kv
        S, H, D = q.shape
        assert q.dtype == k.dtype == FP8 and q.is_contiguous() and k.is_contiguous() and H in (32, 64)
        assert sf.dtype == torch.float32 and sf.shape == (k.shape[0],) and weights.shape == (S, H)
        assert cu_seq_len_k_start.dtype == cu_seq_len_k_end.dtype == torch.int32 and clean_logits
        s = torch.relu(torch.einsum("shd,nd->shn", q.float(), k.float() * sf[:, None]))
        logits = (weights.float()[:, :, None] * s).sum(1)
        j = torch.arange(k.shape[0])
        inside = (j[None, :] >= cu_seq_len_k_start[:, None]) & (j[None, :] < cu_seq_len_k_end[:, None])
        return logits.masked_fill(~inside, float("-inf"))

    def fp8_gemm_nt(a, b, d, c=None, recipe=None, compiled_dims="nk", disable_ue8m0_cast=False):
        (A, sfa), (W, sfb) = a, b
        (M, K), N = A.shape, W.shape[0]
        assert A.dtype == W.dtype == FP8 and A.stride(-1) == W.stride(-1) == 1 and c is None
        assert sfa.dtype == sfb.dtype == torch.float32 and sfa.shape == (M, math.ceil(K / 128))
        assert sfb.shape == (math.ceil(N / 128), math.ceil(K / 128)) and sfb.is_contiguous()
        assert d.dtype == BF16 and d.shape == (M, N) and d.stride(-1) == 1
        a_deq = A.float() * sfa.repeat_interleave(128, -1)[:, :K]
        w_deq = W.float() * sfb.repeat_interleave(128, 0)[:N].repeat_interleave(128, -1)[:, :K]
        d.copy_(a_deq @ w_deq.T)

    m.get_num_sms = lambda: num_sms
    m.get_paged_mqa_logits_metadata, m.fp8_paged_mqa_logits = get_paged_mqa_logits_metadata, fp8_paged_mqa_logits
    m.fp8_mqa_logits, m.fp8_gemm_nt = fp8_mqa_logits, fp8_gemm_nt
    return m


def fake_flashinfer():
    m = types.ModuleType("flashinfer")

    def top_k_ragged_transform(input, offsets, lengths, k, deterministic=False, tie_break=0, dsa_graph_safe=False,
                               row_starts=None):
        assert input.dim() == 2 and input.is_contiguous() and input.shape[1] >= k
        assert offsets.dtype == lengths.dtype == torch.int32 and offsets.is_contiguous() and lengths.is_contiguous()
        out = torch.full((input.shape[0], k), -1, dtype=torch.int32)
        for r, n in enumerate(lengths.tolist()):
            top = torch.arange(n) if n <= k else input[r, :n].topk(k).indices
            out[r, :len(top)] = top.to(torch.int32) + offsets[r]
        return out

    m.top_k_ragged_transform = top_k_ragged_transform
    return m


# ---- status ---------------------------------------------------------------------------------------------------------
def test_status_reports_missing_libraries(fake):
    hints = {"flash_mla": "github.com/deepseek-ai/FlashMLA", "deep_gemm": "github.com/deepseek-ai/DeepGEMM",
             "flashinfer": "pip install flashinfer-python"}
    for lib, where in hints.items():
        ok, reason = vendor.status(lib)
        assert not ok and reason.startswith(f"{lib} not installed") and where in reason
    with pytest.raises(ValueError, match="unknown vendor library"):
        vendor.status("cutlass")


def test_status_device_and_version_reasons(fake, tmp_path, monkeypatch):
    fake.install("flash_mla", fake_flash_mla(new_api=True))
    assert vendor.status("flash_mla") == (True, "")
    fake.sm((8, 0))
    assert vendor.status("flash_mla") == (False, "flash_mla needs SM90/SM100, this GPU is SM80")
    fake.sm((10, 3))
    assert vendor.status("flash_mla") == (True, "")
    old = types.ModuleType("deep_gemm")
    old.fp8_gemm_nt = old.get_num_sms = lambda *a: None
    fake.install("deep_gemm", old)
    ok, reason = vendor.status("deep_gemm")
    assert not ok and "lacks fp8_mqa_logits, fp8_paged_mqa_logits, get_paged_mqa_logits_metadata" in reason
    fake.install("flashinfer", fake_flashinfer())
    fake.sm((7, 5))
    assert vendor.status("flashinfer") == (False, "flashinfer is used on SM80+ here, this GPU is SM75")
    # a library that is installed but cannot load (e.g. a build against another CUDA)
    (tmp_path / "flashinfer.py").write_text("raise ImportError('libcudart.so.13: cannot open shared object file')\n")
    monkeypatch.delitem(sys.modules, "flashinfer")
    monkeypatch.syspath_prepend(str(tmp_path))
    vendor._status.cache_clear()
    ok, reason = vendor.status("flashinfer")
    assert not ok
    assert reason == "flashinfer failed to import: ImportError: libcudart.so.13: cannot open shared object file"


# ---- pure helpers ---------------------------------------------------------------------------------------------------
def test_sanitize_slots():
    slots = torch.tensor([[3, -1, 10, -7, 5], [9, 0, 11, 2, -1]], dtype=torch.int64)
    got = vendor.sanitize_slots(slots, n_slots=10, multiple=4)
    want = torch.tensor([[3, -1, -1, -1, 5, -1, -1, -1], [9, 0, -1, 2, -1, -1, -1, -1]], dtype=torch.int32)
    assert got.dtype == torch.int32 and got.is_contiguous() and torch.equal(got, want)
    assert vendor.sanitize_slots(slots[:, :4], 10, 4).shape == (2, 4)
    assert vendor.sanitize_slots(slots[:, :0], 10, 64).shape == (2, 0)


def test_positions_to_slots():
    table = torch.tensor([[5, 2], [7, 0]], dtype=torch.int32)
    pos = torch.tensor([[0, 5, -1], [3, 4, 7]])
    want = torch.tensor([[20, 9, -1], [31, 0, 3]], dtype=torch.int32)
    assert torch.equal(vendor.positions_to_slots(pos, table, 4), want)


def test_flashmla_head_padding_rule():
    h = vendor._flashmla_heads
    assert [h(n, (9, 0), True, True) for n in (1, 4, 64, 65, 128, 129)] == [64, 64, 64, 128, 128, None]
    assert h(16, (10, 0), False, True) == 128  # the 2025 SM100 prefill kernel has 128 heads only
    assert h(16, (10, 0), False, False) == 64 and h(16, (10, 0), True, True) == 64
    q = torch.randn(2, 3, 5)
    p = vendor._pad_heads(q, 8)
    assert p.shape == (2, 8, 5) and torch.equal(p[:, :3], q) and not p[:, 3:].any()


# ---- FlashMLA -------------------------------------------------------------------------------------------------------
def latent_pool(dev, fp8, n_tokens, page, seed, L=512, R=64):
    g = torch.Generator().manual_seed(seed)
    pages = math.ceil(n_tokens / page) + 1
    spec = KVCacheSpec(1, pages, page, L, R, 16, "fp8_e4m3" if fp8 else BF16, False, BF16)
    pool = KVCache(spec, dev).latent[0]
    slots = torch.randperm(pages * page, generator=g)[:n_tokens].to(dev)
    ReferenceOps(dev).write_latent_cache(pool, torch.randn(n_tokens, L, generator=g).to(dev, BF16),
                                         torch.randn(n_tokens, R, generator=g).to(dev, BF16), slots)
    return pool, slots.cpu(), g


def attention_case(dev, fp8, T, H, K, n_tokens, page, seed):
    """V3.2-style inputs: q [T, H, 576] bf16, slots [T, K] with 20 % −1, row 1 empty, out-of-range entries."""
    pool, slots, g = latent_pool(dev, fp8, n_tokens, page, seed)
    q = (torch.randn(T, H, 576, generator=g) / 24).to(dev, BF16)
    pick = torch.stack([torch.randperm(n_tokens, generator=g)[:K] if K <= n_tokens else
                        torch.randint(0, n_tokens, (K,), generator=g) for _ in range(T)])
    idx = slots[pick].to(torch.int32)
    idx[torch.rand(T, K, generator=g) < 0.2] = -1
    if T > 1:
        idx[1] = -1
    if K > 2:
        idx[0, -1], idx[0, 0] = 10**7, -5  # out of range and negative: both invalid
    return q, pool, idx.to(dev)


@pytest.mark.parametrize("new_api", [True, False], ids=["api2026", "api2025"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16-pool", "fp8-pool"])
@pytest.mark.parametrize("T,H,K", [(3, 4, 40), (2, 64, 128), (4, 100, 70)])
def test_flashmla_sparse_attention_fake(fake, new_api, fp8, T, H, K):
    fm = fake_flash_mla(new_api)
    fake.install("flash_mla", fm)
    q, pool, idx = attention_case("cpu", fp8, T, H, K, n_tokens=150, page=64, seed=T * H + K)
    assert vendor.flashmla_sparse_attention_unsupported(q, pool, idx) is None
    got = vendor.flashmla_sparse_attention(q, pool, idx, SCALE, 512)
    want = ReferenceOps("cpu").sparse_mla_attention(q, pool, idx, SCALE, 512)
    assert got.shape == (T, H, 512) and got.dtype == BF16
    close(got, want)
    assert torch.count_nonzero(got[1]) == 0  # no valid key: 0 (the fake decode returns NaN there)
    kind, *shape = fm.calls[-1]
    assert kind == ("decode" if fp8 else "prefill")
    assert shape == ([T, 128 if H > 64 else 64, 64 if K <= 64 else 128] if fp8 else [128 if H > 64 else 64, 128])


def test_flashmla_decode_chunks_rows(fake, monkeypatch):
    fm = fake_flash_mla(new_api=True)
    fake.install("flash_mla", fm)
    monkeypatch.setattr(vendor, "_FLASHMLA_DECODE_ROWS", 2)
    q, pool, idx = attention_case("cpu", True, 5, 8, 64, n_tokens=100, page=64, seed=7)
    close(vendor.flashmla_sparse_decode(q, pool, idx, SCALE), ReferenceOps("cpu").sparse_mla_attention(q, pool, idx,
                                                                                                        SCALE, 512))
    assert [c[1] for c in fm.calls] == [2, 2, 1]


def test_flashmla_unsupported_reasons(fake):
    fake.install("flash_mla", fake_flash_mla(new_api=False))
    q, pool, idx = attention_case("cpu", False, 2, 4, 8, n_tokens=40, page=64, seed=1)
    q8, pool8, idx8 = attention_case("cpu", True, 2, 4, 8, n_tokens=40, page=64, seed=1)
    assert "must be bf16" in vendor.flashmla_sparse_prefill_unsupported(q.float(), pool, idx)
    assert "flashmla_sparse_decode" in vendor.flashmla_sparse_prefill_unsupported(q8, pool8, idx8)
    assert "fp8 656-byte latent pool" in vendor.flashmla_sparse_decode_unsupported(q, pool, idx)
    assert "at most 128 query heads" in vendor.flashmla_sparse_prefill_unsupported(q.new_zeros(2, 129, 576), pool, idx)
    assert "kv_lora_rank 512" in vendor.flashmla_sparse_prefill_unsupported(q, pool, idx, kv_lora_rank=448)
    q16, pool16, idx16 = attention_case("cpu", True, 2, 4, 8, n_tokens=40, page=16, seed=1)
    assert "page size must be 64" in vendor.flashmla_sparse_decode_unsupported(q16, pool16, idx16)
    fake.sm((10, 3))
    assert "SM90/SM100 exactly" in vendor.flashmla_sparse_prefill_unsupported(q, pool, idx)
    with pytest.raises(ValueError, match="SM90/SM100 exactly"):
        vendor.flashmla_sparse_attention(q, pool, idx, SCALE)
    fake.install("flash_mla", fake_flash_mla(new_api=True))
    assert vendor.flashmla_sparse_attention_unsupported(q, pool, idx) is None


@pytest.mark.cuda
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16-pool", "fp8-pool"])
@pytest.mark.parametrize("T,H", [(1, 128), (64, 128), (600, 128), (64, 16)])
def test_flashmla_v32_shapes(fp8, T, H):
    need("flash_mla")
    q, pool, idx = attention_case("cuda", fp8, T, H, K=2048, n_tokens=5000, page=64, seed=T + H)
    assert vendor.flashmla_sparse_attention_unsupported(q, pool, idx) is None
    got = vendor.flashmla_sparse_attention(q, pool, idx, SCALE, 512)
    want = ReferenceOps("cuda").sparse_mla_attention(q, pool, idx, SCALE, 512)
    assert got.shape == (T, H, 512) and got.dtype == BF16
    close(got, want)
    if T > 1:
        assert torch.count_nonzero(got[1]) == 0


# ---- DeepGEMM FP8 linear --------------------------------------------------------------------------------------------
def fp8_weight(N, K, g, dev):
    """randn/√K quantized per 128×128 block with power-of-two (ue8m0) scales: (e4m3 [N, K], scale_inv fp32)."""
    nb, kb = math.ceil(N / 128), K // 128
    padded = torch.zeros(nb * 128, K)
    padded[:N] = torch.randn(N, K, generator=g) / math.sqrt(K)
    blocks = padded.view(nb, 128, kb, 128)
    scale = torch.exp2(torch.ceil(torch.log2(blocks.abs().amax((1, 3)).clamp_min(1e-4) / 448)))
    q = (blocks / scale[:, None, :, None]).view(nb * 128, K)[:N].to(FP8)
    return q.to(dev), scale.to(dev)


def check_fp8_linear(dev, M, N, K, lead=(), rel_emul=1e-5):
    g = torch.Generator().manual_seed(M + N + K)
    w, s = fp8_weight(N, K, g, dev)
    x = torch.randn(*lead, M, K, generator=g).to(dev, BF16)
    assert vendor.deep_gemm_fp8_linear_unsupported(w, s, x) is None
    y = vendor.deep_gemm_fp8_linear(x, w, s)
    assert y.shape == (*lead, M, N) and y.dtype == BF16
    ref = ReferenceOps(dev)
    xq, xs = ref.quantize_fp8(x.reshape(-1, K), 128, ue8m0=True)
    emul = (xq.double() * xs.double().repeat_interleave(128, -1)) @ ref.dequantize(LinearWeight(w, s), torch.float64).T
    err = (y.reshape(-1, N).double() - emul).norm() / emul.norm()
    assert err <= rel_emul, f"vs exact emulation: {err:.2e}"
    full = ref.linear(x, LinearWeight(w, s)).double()  # unquantized activations: e4m3 activation error ≈ 2.5 %
    assert (y.double() - full).norm() / full.norm() <= 5e-2


@pytest.mark.parametrize("M,N,K,lead", [(3, 128, 256, ()), (2, 576, 128, (2,)), (0, 64, 128, ())])
def test_deep_gemm_fp8_linear_fake(fake, M, N, K, lead):
    fake.install("deep_gemm", fake_deep_gemm())
    if M == 0:
        w, s = fp8_weight(N, K, torch.Generator().manual_seed(0), "cpu")
        assert vendor.deep_gemm_fp8_linear(torch.zeros(0, K, dtype=BF16), w, s).shape == (0, N)
        return
    if torch.cuda.is_available() and not envs.triton_interpret():
        pytest.skip("the fake library takes CPU tensors; on a GPU machine the Triton quantizer needs CUDA tensors")
    check_fp8_linear("cpu", M, N, K, lead, rel_emul=4e-3)  # bf16 output rounding only


def test_deep_gemm_fp8_linear_unsupported(fake):
    fake.install("deep_gemm", fake_deep_gemm())
    w, s = fp8_weight(128, 256, torch.Generator().manual_seed(1), "cpu")
    x = torch.randn(2, 256).to(BF16)
    assert "N % 64 == 0 and K % 128 == 0" in vendor.deep_gemm_fp8_linear_unsupported(w[:100], s, x)
    assert "scale_inv must be contiguous fp32 [1, 2]" in vendor.deep_gemm_fp8_linear_unsupported(w, s[:, :1], x)
    assert "activations must be bf16" in vendor.deep_gemm_fp8_linear_unsupported(w, s, x.float())
    assert "float8_e4m3fn" in vendor.deep_gemm_fp8_linear_unsupported(w.float(), s, x)
    fake.sm((10, 0))
    assert vendor.deep_gemm_fp8_linear_unsupported(w, s, x) is None  # power-of-two scales
    assert "powers of two" in vendor.deep_gemm_fp8_linear_unsupported(w, s * 1.5, x)
    with pytest.raises(ValueError, match="ue8m0"):
        vendor.deep_gemm_fp8_linear(x, w, s, ue8m0=False)
    with pytest.raises(ValueError, match="activations must be bf16"):
        vendor.deep_gemm_fp8_linear(x.float(), w, s)


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 128, 4096])
@pytest.mark.parametrize("N,K", [(576, 7168), (24576, 1536), (7168, 16384), (1536, 7168)])
def test_deep_gemm_fp8_linear_v32_shapes(M, N, K):
    need("deep_gemm")
    check_fp8_linear("cuda", M, N, K, rel_emul=3e-3)


# ---- DeepGEMM indexer -----------------------------------------------------------------------------------------------
def index_case(dev, kv_lens, tokens, H, seed, D=128, page=64):
    """An fp8 index pool holding requests of kv_lens keys on shuffled pages; query tokens (request, position);
    q fp8 [T, H, D] with head weights folding its scales (as indexer_q_prepare)."""
    g = torch.Generator().manual_seed(seed)
    n_pages = sum(math.ceil(n / page) for n in kv_lens) + 1
    order = torch.randperm(n_pages, generator=g).tolist()
    tables, ref = [], ReferenceOps(dev)
    pool = torch.zeros(n_pages, page * (D + 4), dtype=torch.uint8, device=dev)
    for n in kv_lens:
        pages = [order.pop() for _ in range(math.ceil(n / page))]
        tables.append(pages)
        slots = (torch.tensor(pages)[torch.arange(n) // page] * page + torch.arange(n) % page).to(dev)
        ref.write_index_keys(pool, torch.randn(n, D, generator=g).to(dev), slots)
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev)
    req = torch.tensor([r for r, _ in tokens], device=dev)
    pos = torch.tensor([p for _, p in tokens], device=dev)
    q, q_scale = ref.quantize_fp8(torch.randn(len(tokens), H, D, generator=g).to(dev), D)
    weights = torch.randn(len(tokens), H, generator=g).to(dev) * q_scale[..., 0]
    batch = AttnMetadata(req, pos, table, torch.tensor(kv_lens, device=dev), list(kv_lens), page)
    return q, weights, pool, batch


def index_scores(q, weights, pool, batch, softmax_scale):
    """Reference I[t, s] over every key position s < kv_len of t's request (−inf beyond its position)."""
    ref, D = ReferenceOps(q.device), q.shape[-1]
    out = torch.full((q.shape[0], max(batch.kv_lens_cpu)), float("-inf"), device=q.device)
    for t in range(q.shape[0]):
        r, n = int(batch.token_req[t]), int(batch.positions[t]) + 1
        k, ks = ref.read_index_keys(pool, ref._slots_of(batch, r, n), D)
        s = torch.relu(softmax_scale * q[t].float() @ k.float().T) * ks
        out[t, :n] = (weights[t, :, None] * s).sum(0)
    return out


def assert_topk_matches(got, want, scores, batch):
    """Same number of selected keys per row, all valid causal slots of the row's request, equal sorted scores."""
    page = batch.page_size
    for t in range(got.shape[0]):
        g, w = got[t][got[t] >= 0].long(), want[t][want[t] >= 0].long()
        assert len(g) == len(w) and len(set(g.tolist())) == len(g)
        n = int(batch.positions[t]) + 1
        pos = torch.arange(n, device=got.device)
        allowed = batch.block_table[batch.token_req[t], pos // page].long() * page + pos % page
        slot_to_pos = {int(s): i for i, s in enumerate(allowed)}
        assert all(int(s) in slot_to_pos for s in g), f"row {t}: a selected slot is not a visible key"
        sg = scores[t, [slot_to_pos[int(s)] for s in g]].sort().values
        sw = scores[t, [slot_to_pos[int(s)] for s in w]].sort().values
        torch.testing.assert_close(sg, sw, atol=1e-4 * scores[t, :n].abs().max().item(), rtol=0)


@pytest.mark.parametrize("next_n", [1, 2])
def test_deep_gemm_indexer_logits_paged_fake(fake, next_n):
    fake.install("deep_gemm", fake_deep_gemm())
    tokens = [(0, 99), (0, 100), (1, 40), (1, 41)] if next_n == 2 else [(0, 100), (1, 41)]
    q, w, pool, batch = index_case("cpu", [101, 42], tokens, H=32, seed=next_n)
    B = len(tokens) // next_n
    ctx = (batch.positions + 1).to(torch.int32).view(B, next_n)
    tables = batch.block_table[batch.token_req.view(B, next_n)[:, 0]]
    got = vendor.deep_gemm_indexer_logits_paged(q.view(B, next_n, 32, 128), pool, w, ctx, tables, 120, 128**-0.5)
    want = index_scores(q, w, pool, batch, 128**-0.5)
    assert got.shape == (len(tokens), 120)
    assert torch.equal(torch.isinf(got[:, :101]), torch.isinf(want)) and torch.isinf(got[:, 101:]).all()
    fin = torch.isfinite(want)
    close(got[:, :101][fin], want[fin], atol=1e-4 * want[fin].abs().max().item(), rtol=0)


def test_deep_gemm_indexer_logits_ragged_fake(fake):
    fake.install("deep_gemm", fake_deep_gemm())
    g = torch.Generator().manual_seed(3)
    ref = ReferenceOps("cpu")
    q, qs = ref.quantize_fp8(torch.randn(4, 64, 128, generator=g), 128)
    k, ks = ref.quantize_fp8(torch.randn(30, 128, generator=g), 128)
    w = torch.randn(4, 64, generator=g) * qs[..., 0]
    start, end = torch.tensor([0, 0, 10, 10]), torch.tensor([5, 10, 20, 30])
    got = vendor.deep_gemm_indexer_logits_ragged(q, k, ks[:, 0], w, start, end, softmax_scale=0.5)
    want = (w[:, :, None] * torch.relu(0.5 * torch.einsum("shd,nd->shn", q.float(), k.float())) * ks[:, 0]).sum(1)
    j = torch.arange(30)
    inside = (j >= start[:, None]) & (j < end[:, None])
    assert torch.isinf(got[~inside]).all() and (got[~inside] < 0).all()
    close(got[inside], want[inside], atol=1e-4 * want.abs().max().item(), rtol=0)


@pytest.mark.parametrize("with_flashinfer", [False, True], ids=["torch-topk", "flashinfer-topk"])
@pytest.mark.parametrize("topk", [16, 128])
def test_deep_gemm_indexer_topk_fake(fake, monkeypatch, with_flashinfer, topk):
    fake.install("deep_gemm", fake_deep_gemm())
    if with_flashinfer:
        fake.install("flashinfer", fake_flashinfer())
    monkeypatch.setattr(vendor, "_MAX_LOGITS_ELEMS", 300)  # several row chunks
    tokens = [(0, 99), (0, 40), (1, 0), (1, 69), (1, 30), (0, 15)]
    q, w, pool, batch = index_case("cpu", [100, 70], tokens, H=32, seed=topk)
    assert vendor.deep_gemm_indexer_paged_unsupported(q, pool) is None
    got = vendor.deep_gemm_indexer_topk(q, w, pool, batch, 128**-0.5, topk)
    want = ReferenceOps("cpu").indexer_topk(q, w, pool, batch, 128**-0.5, topk)
    assert got.shape == (len(tokens), topk) and got.dtype == torch.int32
    assert_topk_matches(got, want, index_scores(q, w, pool, batch, 128**-0.5), batch)


def test_deep_gemm_indexer_unsupported(fake):
    fake.install("deep_gemm", fake_deep_gemm())
    q, w, pool, batch = index_case("cpu", [10], [(0, 9)], H=32, seed=0)
    assert "float8_e4m3fn" in vendor.deep_gemm_indexer_paged_unsupported(q.float(), pool)
    assert "heads of width 128" in vendor.deep_gemm_indexer_paged_unsupported(q.new_zeros(1, 16, 128), pool)
    assert "page size 64" in vendor.deep_gemm_indexer_paged_unsupported(q, pool.view(-1, 32 * 132))
    with pytest.raises(ValueError, match="page size 64"):
        vendor.deep_gemm_indexer_logits_paged(q[:, None], pool.view(-1, 32 * 132), w, torch.tensor([[10]]),
                                              batch.block_table, 10)


@pytest.mark.cuda
@pytest.mark.parametrize("next_n", [1, 2])
def test_deep_gemm_indexer_logits_paged_v32_shapes(next_n):
    need("deep_gemm")
    lens = [3001, 130, 4096, 64]
    tokens = [(r, n - next_n + j) for r, n in enumerate(lens) for j in range(next_n)]
    q, w, pool, batch = index_case("cuda", lens, tokens, H=64, seed=next_n)
    B = len(lens)
    ctx = (batch.positions + 1).to(torch.int32).view(B, next_n)
    got = vendor.deep_gemm_indexer_logits_paged(q.view(B, next_n, 64, 128), pool, w, ctx, batch.block_table,
                                                max(lens), 128**-0.5)
    want = index_scores(q, w, pool, batch, 128**-0.5)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    close(got[fin], want[fin], atol=1e-4 * want[fin].abs().max().item(), rtol=0)


@pytest.mark.cuda
def test_deep_gemm_indexer_logits_ragged_v32_shapes():
    need("deep_gemm")
    g = torch.Generator().manual_seed(5)
    ref = ReferenceOps("cuda")
    S, S_kv = 512, 4096
    q, qs = ref.quantize_fp8(torch.randn(S, 64, 128, generator=g).cuda(), 128)
    k, ks = ref.quantize_fp8(torch.randn(S_kv, 128, generator=g).cuda(), 128)
    w = torch.randn(S, 64, generator=g).cuda() * qs[..., 0]
    start = torch.randint(0, 2048, (S,), generator=g).cuda()
    end = start + torch.randint(1, 2048, (S,), generator=g).cuda()
    got = vendor.deep_gemm_indexer_logits_ragged(q, k, ks[:, 0], w, start, end, 128**-0.5)
    want = (w[:, :, None] * torch.relu(128**-0.5 * torch.einsum("shd,nd->shn", q.float(), k.float())) * ks[:, 0]).sum(1)
    j = torch.arange(S_kv, device="cuda")
    inside = (j >= start[:, None]) & (j < end[:, None])
    assert torch.isinf(got[~inside]).all()
    close(got[inside], want[inside], atol=1e-4 * want.abs().max().item(), rtol=0)


@pytest.mark.cuda
def test_deep_gemm_indexer_topk_v32_shapes():
    need("deep_gemm")
    lens = [5000, 300, 2100]
    tokens = [(0, 4999), (0, 2047), (0, 3000), (1, 299), (1, 10), (2, 2099), (2, 2048)]
    q, w, pool, batch = index_case("cuda", lens, tokens, H=64, seed=11)
    got = vendor.deep_gemm_indexer_topk(q, w, pool, batch, 128**-0.5, 2048)
    want = ReferenceOps("cuda").indexer_topk(q, w, pool, batch, 128**-0.5, 2048)
    assert_topk_matches(got, want, index_scores(q, w, pool, batch, 128**-0.5), batch)


# ---- FlashInfer top-k -----------------------------------------------------------------------------------------------
def check_flashinfer_topk(dev, R, N, k, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(R, N, generator=g).to(dev)
    lengths = torch.randint(0, N + 1, (R,), generator=g)
    lengths[0], lengths[-1] = 0, N
    assert vendor.flashinfer_topk_unsupported(scores, lengths.to(dev), k) is None
    got = vendor.flashinfer_topk(scores, lengths.to(dev), k).cpu()
    assert got.shape == (R, k) and got.dtype == torch.int32
    for r in range(R):
        n = int(lengths[r])
        want = scores[r, :n].cpu().topk(min(k, n)).indices
        sel = got[r, :len(want)]
        assert (got[r, len(want):] == -1).all()  # selected positions first, then −1 padding
        assert sorted(sel.tolist()) == sorted(want.tolist())


@pytest.mark.parametrize("R,N,k", [(5, 300, 64), (3, 50, 80), (2, 10, 0)])
def test_flashinfer_topk_fake(fake, R, N, k):
    fake.install("flashinfer", fake_flashinfer())
    check_flashinfer_topk("cpu", R, N, k, seed=R + N + k)
    assert "2-D fp32/fp16/bf16" in vendor.flashinfer_topk_unsupported(torch.zeros(3), torch.zeros(3), 2)


@pytest.mark.cuda
@pytest.mark.parametrize("R,N", [(64, 9295), (4, 131072)])
def test_flashinfer_topk_v32_shapes(R, N):
    need("flashinfer")
    check_flashinfer_topk("cuda", R, N, 2048, seed=R)


# ---- what the CUDA backend picks by itself when the libraries are installed ------------------------------------------
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16-pool", "fp8-pool"])
def test_cuda_defaults_with_vendor_libraries_installed(fake, monkeypatch, fp8):
    """With FlashMLA and DeepGEMM importable, the defaults are: FlashMLA for attention only from
    FLASHMLA_MIN_QUERY_TOKENS query tokens (it was measured slower below), Triton otherwise; DeepGEMM never by
    itself (its wrappers never ran against the real library): only --fp8-gemm-backend / --dsa-indexer-backend."""
    pytest.importorskip("triton")
    from dsv32.backends.cuda import ops as cuda_ops
    from dsv32.backends.triton.ops import TritonOps
    from dsv32.core.ops import KernelContext

    fm = fake_flash_mla(new_api=True)
    fake.install("flash_mla", fm)
    fake.install("deep_gemm", fake_deep_gemm())
    ops = cuda_ops.CudaOps("cpu")
    ctx = KernelContext(kv_cache_fp8=fp8, fp8_weights=True, num_heads=64)
    chosen = ops.select_kernels(ctx)
    assert chosen["dsa_prefill_backend"] == chosen["dsa_decode_backend"] == "auto"
    assert chosen["fp8_gemm_backend"] == chosen["dsa_indexer_backend"] == "triton"
    assert ops.kernel_options(ctx)["fp8_gemm_backend"]["deep_gemm"] == ""  # runnable, on request only
    triton_calls = []
    monkeypatch.setattr(TritonOps, "sparse_mla_attention",
                        lambda self, q, *a, **k: triton_calls.append(q.shape[0]) or torch.zeros(q.shape[0], 64, 512))
    n = cuda_ops.FLASHMLA_MIN_QUERY_TOKENS
    for T in (1, n - 1, n):
        q, pool, idx = attention_case("cpu", fp8, T, 64, 64, n_tokens=100, page=64, seed=T)
        ops.sparse_mla_attention(q, pool, idx, SCALE, 512)
    assert triton_calls == [1, n - 1] and len(fm.calls) == 1 and fm.calls[0][0] == ("decode" if fp8 else "prefill")
    w = LinearWeight(*[t for t in (torch.zeros(256, 256).to(FP8), torch.ones(2, 2))])
    ops.prepare_linear(w, BF16)
    assert not ops._deep_gemm_weights
    ops.select_kernels(ctx, {"fp8_gemm_backend": "deep_gemm"})
    ops.prepare_linear(w, BF16)
    assert len(ops._deep_gemm_weights) == 1


# ---- FlashInfer NVFP4 fused MoE (Blackwell; contract only) ------------------------------------------------------------
_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _swizzle_128x4(sf):
    """cuBLAS / CUTLASS block-scale layout: [E, M, C] padded to M % 128, C % 4, then per 128 rows × 4 columns the
    rows r = 32·i + j are stored j-major: (tile, column block, j, i, column)."""
    E, M, C = sf.shape
    mp, cp = -(-M // 128) * 128, -(-C // 4) * 4
    pad = torch.zeros(E, mp, cp, dtype=sf.dtype)
    pad[:, :M, :C] = sf
    return pad.view(E, mp // 128, 4, 32, cp // 4, 4).permute(0, 1, 4, 3, 2, 5).contiguous().view(-1)


def _unswizzle_128x4(flat, E, M, C):
    mp, cp = -(-M // 128) * 128, -(-C // 4) * 4
    t = flat.reshape(E, mp // 128, cp // 4, 32, 4, 4).permute(0, 1, 4, 3, 2, 5).reshape(E, mp, cp)
    return t[:, :M, :C]


def _nvfp4_act(x, gs):
    """x through NVFP4 activation quantization with global encode scale gs, in the encoded domain (x · gs)."""
    T, K = x.shape
    b = (x.float() * gs).view(T, K // 16, 16)
    s = (b.abs().amax(-1, keepdim=True) / 6).clamp(max=448).to(FP8).float()
    q = torch.where(s > 0, b / torch.where(s > 0, s, 1.0), 0.0)
    mags = _E2M1[:8]
    near = mags[(q.abs()[..., None] - mags).abs().argmin(-1)]
    return (torch.sign(q) * near * s).view(T, K)


def fake_flashinfer_moe():
    """flashinfer.fused_moe.cutlass_fused_moe (NVFP4 path) and flashinfer.fp4_quantization.block_scale_interleave as
    FlashInfer's docstrings and tests/moe/test_trtllm_cutlass_fused_moe.py describe them (independently of dsv32)."""
    fq = types.ModuleType("flashinfer.fp4_quantization")
    fq.block_scale_interleave = lambda unswizzled_sf: (
        _swizzle_128x4(unswizzled_sf if unswizzled_sf.dim() == 3 else unswizzled_sf[None]))
    fm = types.ModuleType("flashinfer.fused_moe")
    fm.calls = []

    def cutlass_fused_moe(input, token_selected_experts, token_final_scales, fc1_expert_weights, fc2_expert_weights,
                          output_dtype, quant_scales, fc1_expert_biases=None, fc2_expert_biases=None, input_sf=None,
                          swiglu_alpha=None, swiglu_beta=None, swiglu_limit=None, tp_size=1, tp_rank=0, ep_size=1,
                          ep_rank=0, cluster_size=1, cluster_rank=0, output=None, **kwargs):
        assert token_selected_experts.dtype == torch.int32 and token_final_scales.dtype == torch.float32
        assert fc1_expert_weights.dtype == fc2_expert_weights.dtype == torch.int64 and len(quant_scales) == 6
        a1_gs, w1_sf, alpha1, a2_gs, w2_sf, alpha2 = quant_scales
        w1 = fc1_expert_weights.view(torch.uint8)  # [E, 2I, K/2], up rows first
        w2 = fc2_expert_weights.view(torch.uint8)  # [E, K, I/2]
        E, N1, K2 = w1.shape
        K, I2 = w2.shape[1], w2.shape[2]

        def weights(w, sf, n, k):
            s = _unswizzle_128x4(sf.view(torch.uint8), E, n, k // 16).view(FP8).float()
            p = w.long()
            return torch.stack([_E2M1[p & 15], _E2M1[p >> 4]], -1).flatten(-2) * s.repeat_interleave(16, -1)

        W1, W2 = weights(w1, w1_sf, N1, 2 * K2), weights(w2, w2_sf, K, 2 * I2)
        I = N1 // 2  # noqa: E741
        x = _nvfp4_act(input, float(a1_gs))
        out = torch.zeros(input.shape[0], K)
        fm.calls.append((ep_size, ep_rank))
        for t in range(input.shape[0]):
            for j in range(token_selected_experts.shape[1]):
                e = int(token_selected_experts[t, j]) - ep_rank * E
                if not 0 <= e < E:
                    continue  # another expert-parallel rank's expert
                h = (W1[e] @ x[t]) * float(alpha1[e])
                h = torch.nn.functional.silu(h[I:]) * h[:I]  # SwiGLU: gate is the second half
                y = (W2[e] @ _nvfp4_act(h.to(output_dtype)[None], float(a2_gs))[0]) * float(alpha2[e])
                out[t] += token_final_scales[t, j] * y
        if output is None:
            return out.to(output_dtype)
        output.copy_(out)
        return output

    fm.cutlass_fused_moe = cutlass_fused_moe
    return fm, fq


def _nvfp4_experts(E, I, K, g, same_global=True):
    from dsv32.core.model.checkpoint import _stack, fp4_quantize

    def stack(n, k, tie=None, act_amax=4.5):
        parts = []
        for e in range(E):
            w = torch.randn(n, k, generator=g) * k ** -0.5
            if tie is not None:  # ModelOpt writes gate and up with one weight_scale_2: scale to the same amax
                w = w / w.abs().max() * tie[e]
            lw = fp4_quantize(w, "nvfp4")
            lw.input_scale = torch.tensor([act_amax / (6 * 448)])  # the calibrated input amax
            parts.append(lw)
        return _stack(parts)

    amax = torch.rand(E, generator=g) + 0.5
    gate = stack(I, K, amax)
    up = stack(I, K, amax if same_global else None)
    return ExpertWeights(gate, up, stack(K, I, act_amax=60.0))  # silu(gate)·up of these weights reaches ~50


def _install_flashinfer_moe(fake):
    fm, fq = fake_flashinfer_moe()
    fake.install("flashinfer", fake_flashinfer())
    fake.install("flashinfer.fused_moe", fm)
    fake.install("flashinfer.fp4_quantization", fq)
    return fm


def test_flashinfer_nvfp4_moe_fake(fake, monkeypatch):
    """CudaOps with --moe-runner-backend flashinfer_cutlass on SM100 (fake FlashInfer): NVFP4 experts go through
    cutlass_fused_moe with up-first fc1, swizzled block scales, per-expert dequant scales input_scale ·
    weight_scale_2, and another rank's expert (id E) skipped through the ep_size 2 trick. With the fake's activation
    quantization switched off the result equals the weight-only reference up to bf16 (relative error norm < 2e-2;
    a swapped gate / up or a wrong scale gives ~1); with it on (FlashInfer's W4A4), < 0.5 (measured 0.37: NVFP4
    rounding of x and of silu(gate)·up, ≈ 0.095 each, compounded through the SwiGLU)."""
    pytest.importorskip("triton")
    from dsv32.backends.cuda import ops as cuda_ops
    from dsv32.core.ops import KernelContext

    fm = _install_flashinfer_moe(fake)
    fake.sm((10, 0))
    ops = cuda_ops.CudaOps("cpu")
    ctx = KernelContext(fp8_weights=False, num_heads=64)
    assert ops.kernel_options(ctx)["moe_runner_backend"]["flashinfer_cutlass"] == ""
    assert ops.select_kernels(ctx)["moe_runner_backend"] == "triton"  # never chosen by itself
    ops.select_kernels(ctx, {"moe_runner_backend": "flashinfer_cutlass"})
    g = torch.Generator().manual_seed(11)
    E, I, K, T = 4, 128, 256, 6
    raw = _nvfp4_experts(E, I, K, g)
    prepared = ops.prepare_experts(raw, BF16)
    assert prepared.gate_up is not None and id(prepared.gate_up.weight) in ops._flashinfer_experts
    x = torch.randn(T, K, generator=g).to(BF16)
    ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(T)])
    ids[1, 0] = E  # another rank's expert
    w = torch.rand(T, 2, generator=g)
    got = ops.moe_experts(x, prepared, w, ids)
    ref = ReferenceOps("cpu")
    want = ref.moe_experts(x, ref.prepare_experts(raw, BF16), w, ids)
    rel = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert rel < 0.5 and fm.calls == [(2, 0)], rel
    monkeypatch.setattr(sys.modules[__name__], "_nvfp4_act", lambda t, gs: t.float() * gs)  # exact activations
    exact = ops.moe_experts(x, prepared, w, ids)
    rel = ((exact.float() - want.float()).norm() / want.float().norm()).item()
    assert rel < 2e-2, rel


@pytest.mark.parametrize("sm,same_global,why", [((9, 0), True, "SM100"), ((10, 0), False, "weight_scale_2")])
def test_flashinfer_nvfp4_moe_refusals(fake, sm, same_global, why):
    """Off Blackwell the choice is refused at startup; experts FlashInfer cannot take (gate and up with different
    global scales) stay on the Triton FP4 kernel, with the reason in the log."""
    pytest.importorskip("triton")
    from dsv32.backends.cuda import ops as cuda_ops
    from dsv32.core.ops import KernelChoiceError, KernelContext

    _install_flashinfer_moe(fake)
    fake.sm(sm)
    ops = cuda_ops.CudaOps("cpu")
    ctx = KernelContext(fp8_weights=False, num_heads=64)
    if sm[0] != 10:
        with pytest.raises(KernelChoiceError, match=why):
            ops.select_kernels(ctx, {"moe_runner_backend": "flashinfer_cutlass"})
        return
    ops.select_kernels(ctx, {"moe_runner_backend": "flashinfer_cutlass"})
    raw = _nvfp4_experts(2, 128, 128, torch.Generator().manual_seed(12), same_global=False)
    assert why in vendor.flashinfer_nvfp4_moe_unsupported(raw.gate, raw.up, raw.down, BF16)
    prepared = ops.prepare_experts(raw, BF16)
    assert prepared.gate_up is None and prepared.gate.is_fp4  # the Triton FP4 layout


def test_flashinfer_moe_api_matches_the_wheel():
    """The FlashInfer functions the NVFP4 MoE wrapper calls exist in the newest flashinfer-python wheel with the
    parameters it passes (parsed, never imported)."""
    import ast

    from _pypi import newest_wheel

    whl = newest_wheel("flashinfer-python")

    def params(path, name):
        for node in ast.parse(whl.read(path).decode()).body:
            if isinstance(node, ast.FunctionDef) and node.name == name:
                return [a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs]
        raise AssertionError(f"{name} not in {path}")

    got = params("flashinfer/fused_moe/core.py", "cutlass_fused_moe")
    assert got[:7] == ["input", "token_selected_experts", "token_final_scales", "fc1_expert_weights",
                       "fc2_expert_weights", "output_dtype", "quant_scales"], got
    assert {"ep_size", "ep_rank", "output"} <= set(got)
    assert params("flashinfer/quantization/fp4_quantization.py", "block_scale_interleave")[0] == "unswizzled_sf"
    assert "block_scale_interleave" in whl.read("flashinfer/fp4_quantization.py").decode()
    assert "cutlass_fused_moe" in whl.read("flashinfer/fused_moe/__init__.py").decode()
