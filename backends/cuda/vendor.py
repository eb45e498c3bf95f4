"""Thin wrappers over NVIDIA vendor libraries: FlashMLA (`flash_mla`), DeepGEMM (`deep_gemm`), FlashInfer
(`flashinfer`).

Nothing is imported at module import time; `status(lib)` imports lazily and caches whether the library is usable on
the current device. Each wrapper has an `*_unsupported(...) -> str | None` companion giving the reason it cannot run
given inputs; a wrapper called anyway raises ValueError with that reason (never silently wrong).

Upstream sources these wrappers were written against (read, not run: none of the libraries was installed here):
- FlashMLA deepseek-ai/FlashMLA HEAD 9241ae3 (2026-04-29); `flash_mla_interface.py` last changed 48c6dc4 (2026-01-20).
  The 2026 API (082094b, 2026-01-16, PR #150): `get_mla_metadata()` takes no real arguments and returns
  `(FlashMLASchedMeta(), None)`, the schedule is built on the first `flash_mla_with_kvcache` call, `num_splits` must be
  None, block_table/cache_seqlens may be None for sparse attention, SM100 kernels for 64 and 128 heads. The 2025 API
  (c28eca9, 2025-09-24 .. 1408756, 2025-10-01): `get_mla_metadata(cache_seqlens, s_q·h_q/h_k, h_k, h_q,
  is_fp8_kvcache, topk) -> (tile_scheduler_metadata, num_splits)`, decode page size 64 only, SM100 prefill 128 heads.
  The version is detected from `get_mla_metadata`'s signature. Prefill `lse` changed from base 2 to base e in 2026:
  these wrappers never return lse.
- DeepGEMM deepseek-ai/DeepGEMM HEAD 54e2261 (2026-06-23, v2.6.1); `csrc/apis/{attention,gemm,layout}.hpp`,
  `tests/test_attention.py`. `fp8_paged_mqa_logits` takes 2-D context_lens [B, next_n] (2-D accepted since 38f8ef7,
  2025-11-21; the only form since 7f2a703, 2026-04-17): a DeepGEMM older than 2025-11-21 is not supported.
- FlashInfer flashinfer-ai/flashinfer HEAD fb28d72 (2026-08-22, 0.6.18); `flashinfer/topk.py`, `csrc/topk.cu`.
  `top_k_ragged_transform(input, offsets, lengths, k)` exists since 3a301a1 (2025-12-18, PR #2215).

Sampling is not wrapped: FlashInfer samples with one RNG per call (or seed/offset tensors in recent versions), which
cannot honour Ops.sample's per-row torch.Generator streams, and its top-p/min-p thresholds differ from the reference
at ties; the sampler is not a hot path.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import math

import torch

FP8 = torch.float8_e4m3fn
_DEVICE_TYPE = "cuda"  # the device type the libraries run on (tests with fake libraries set "cpu")

_LIBS = {  # name -> (attributes the wrappers use, how to get it, supported SM majors)
    "flash_mla": (("flash_mla_sparse_fwd", "flash_mla_with_kvcache", "get_mla_metadata"),
                  "build it from https://github.com/deepseek-ai/FlashMLA (git submodule update --init --recursive; "
                  "pip install -v .); the PyPI `flash-mla` package is a placeholder", (9, 10)),
    "deep_gemm": (("fp8_gemm_nt", "fp8_mqa_logits", "fp8_paged_mqa_logits", "get_paged_mqa_logits_metadata",
                   "get_num_sms"),
                  "build it from https://github.com/deepseek-ai/DeepGEMM (./install.sh; its JIT needs the CUDA "
                  "toolkit at run time)", (9, 10)),
    "flashinfer": (("top_k_ragged_transform",), "pip install flashinfer-python (≥ 0.6, 2025-12)", None),
}


def _capability(device: torch.device | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


@functools.lru_cache(maxsize=None)
def _status(lib: str, device: torch.device | None) -> tuple[bool, str]:
    attrs, hint, majors = _LIBS[lib]
    if importlib.util.find_spec(lib) is None:
        return False, f"{lib} not installed ({hint})"
    try:
        mod = importlib.import_module(lib)
    except Exception as e:  # a broken build or a missing CUDA toolkit: report, never crash the backend
        return False, f"{lib} failed to import: {type(e).__name__}: {e}"
    missing = [a for a in attrs if not hasattr(mod, a)]
    if missing:
        return False, f"{lib} lacks {', '.join(missing)} (too old; {hint})"
    if _DEVICE_TYPE == "cuda" and not torch.cuda.is_available():
        return False, f"{lib} needs a CUDA device; none visible to torch"
    major, minor = _capability(device)
    if majors is not None and major not in majors:
        return False, f"{lib} needs SM90/SM100, this GPU is SM{major}{minor}"
    if majors is None and major < 8:
        return False, f"{lib} is used on SM80+ here, this GPU is SM{major}{minor}"
    return True, ""


def status(lib: str, device: torch.device | str | None = None) -> tuple[bool, str]:
    """(usable, reason) for "flash_mla", "deep_gemm" or "flashinfer" on `device` (default: the current CUDA device).
    Imports the library on first call; the answer is cached."""
    if lib not in _LIBS:
        raise ValueError(f"unknown vendor library {lib!r}; expected one of {sorted(_LIBS)}")
    return _status(lib, None if device is None else torch.device(device))


def _module(lib: str, device: torch.device | None = None):
    ok, reason = status(lib, device)
    if not ok:
        raise RuntimeError(reason)
    return importlib.import_module(lib)


def _common_reason(lib: str, *tensors: torch.Tensor) -> str | None:
    device = tensors[0].device
    for t in tensors:
        if t.device.type != _DEVICE_TYPE or t.device != device:
            return f"{lib}: all tensors must be on one {_DEVICE_TYPE} device"
    ok, reason = status(lib, device if _DEVICE_TYPE == "cuda" else None)
    return None if ok else reason


def _check(reason: str | None) -> None:
    if reason is not None:
        raise ValueError(reason)


# ---- index helpers (pure torch) ------------------------------------------------------------------------------------
def sanitize_slots(slots: torch.Tensor, n_slots: int, multiple: int) -> torch.Tensor:
    """int32 [T, ceil(K/multiple)·multiple] contiguous copy of slots [T, K] with every entry outside [0, n_slots)
    set to −1 and −1 columns appended up to a multiple of `multiple` (FlashMLA reads top-k in blocks and its decode
    kernel treats only exactly −1 as invalid)."""
    T, K = slots.shape
    valid = (slots >= 0) & (slots < n_slots)
    out = torch.full((T, -(-K // multiple) * multiple), -1, dtype=torch.int32, device=slots.device)
    out[:, :K] = torch.where(valid, slots, torch.full_like(slots, -1))
    return out


def positions_to_slots(positions: torch.Tensor, block_table: torch.Tensor, page_size: int) -> torch.Tensor:
    """Logical positions [R, K] (−1 = none) of the requests whose page rows are block_table [R, P] → int32 physical
    slots page·page_size + offset, −1 kept."""
    valid = positions >= 0
    pos = positions.clamp_min(0).long()
    pages = block_table.long().gather(1, pos // page_size)
    slots = pages * page_size + pos % page_size
    return torch.where(valid, slots, torch.full_like(slots, -1)).to(torch.int32)


# ---- FlashMLA -------------------------------------------------------------------------------------------------------
_FLASHMLA_PREFILL_TOPK_BLOCK = 128  # SM90 prefill asserts topk % (2·64) == 0, SM100 head128 topk % 128 == 0
_FLASHMLA_DECODE_TOPK_BLOCK = 64  # sparse decode asserts topk % 64 == 0 (SM90 and SM100)
_FLASHMLA_DECODE_ROWS = 512  # query rows per decode call: bounds its fp32 split workspace [rows + SMs, H, 512]
_LATENT_ROPE = 64  # FlashMLA's d_qk is 576 = 512 latent + 64 rope; d_v must be 512


def _flashmla_new_api(fm) -> bool:
    """True for the 2026 API (argument-less get_mla_metadata returning a lazily filled FlashMLASchedMeta)."""
    return "cache_seqlens" not in inspect.signature(fm.get_mla_metadata).parameters


def _flashmla_heads(H: int, sm: tuple[int, int], new_api: bool, prefill: bool) -> int | None:
    """Head count to pad H to: the kernels take exactly 64 or 128 query heads (the 2025 SM100 prefill kernel: 128)."""
    sizes = (128,) if (prefill and sm[0] == 10 and not new_api) else (64, 128)
    return next((s for s in sizes if H <= s), None)


def _pad_heads(q: torch.Tensor, heads: int) -> torch.Tensor:
    """q [.., H, D] → contiguous [.., heads, D] with zero query heads appended (their outputs are discarded)."""
    H = q.shape[-2]
    if H == heads:
        return q.contiguous()
    out = q.new_zeros(*q.shape[:-2], heads, q.shape[-1])
    out[..., :H, :] = q
    return out


def _flashmla_reason(q, latent_cache, topk_slots, kv_lora_rank, prefill: bool) -> str | None:
    reason = _common_reason("flash_mla", q, latent_cache, topk_slots)
    if reason is not None:
        return reason
    if q.dim() != 3 or topk_slots.dim() != 2 or topk_slots.shape[0] != q.shape[0]:
        return "flash_mla: q must be [T, H, D] and topk_slots [T, K]"
    if q.dtype != torch.bfloat16:
        return f"flash_mla: q must be bf16, got {q.dtype}"
    if kv_lora_rank != 512 or q.shape[-1] != kv_lora_rank + _LATENT_ROPE:
        return f"flash_mla: needs kv_lora_rank 512 and q width 576, got {kv_lora_rank} and {q.shape[-1]}"
    if latent_cache.dim() != 3 or not latent_cache.is_contiguous():
        return "flash_mla: latent_cache must be a contiguous [pages, page_size, entry] pool"
    fm = importlib.import_module("flash_mla")
    new_api = _flashmla_new_api(fm)
    sm = _capability(q.device)
    if not new_api and sm not in ((9, 0), (10, 0)):
        return f"flash_mla: this (2025) build supports SM90/SM100 exactly, this GPU is SM{sm[0]}{sm[1]}"
    if _flashmla_heads(q.shape[1], sm, new_api, prefill) is None:
        return f"flash_mla: at most 128 query heads, got {q.shape[1]}"
    return None


def flashmla_sparse_prefill_unsupported(q: torch.Tensor, latent_cache: torch.Tensor, topk_slots: torch.Tensor,
                                        kv_lora_rank: int = 512) -> str | None:
    """Why flashmla_sparse_prefill cannot run these inputs (None: it can)."""
    reason = _flashmla_reason(q, latent_cache, topk_slots, kv_lora_rank, prefill=True)
    if reason is None and latent_cache.dtype != torch.bfloat16:
        reason = (f"flash_mla sparse prefill reads a bf16 latent pool, got {latent_cache.dtype} "
                  "(the fp8 656-byte pool goes to flashmla_sparse_decode)")
    if reason is None and latent_cache.shape[-1] != q.shape[-1]:
        reason = f"flash_mla: latent entries are {latent_cache.shape[-1]} wide, q is {q.shape[-1]}"
    return reason


def flashmla_sparse_prefill(q: torch.Tensor, latent_cache: torch.Tensor, topk_slots: torch.Tensor,
                            softmax_scale: float, kv_lora_rank: int = 512) -> torch.Tensor:
    """Ops.sparse_mla_attention over a bf16 latent pool with FlashMLA's sparse prefill kernel (any number of tokens;
    SGLang also uses it for decode over a bf16 cache).

    Upstream: `flash_mla.flash_mla_sparse_fwd(q [s_q, h_q, 576] bf16, kv [s_kv, 1, 576] bf16,
    indices [s_q, 1, topk] int32, sm_scale, d_v=512) -> (out [s_q, h_q, 512] bf16, max_logits, lse)` (same call in the
    2025 c28eca9 and 2026 9241ae3 APIs). Indices < 0 or ≥ s_kv are ignored. h_q must be 64 or 128 and topk a multiple
    of 128: q is zero-padded to 64/128 heads and the slots padded with −1 columns (both sliced off / ignored).
    The whole pool is passed as kv (s_kv = pages·page_size), so physical slots are the kernel's indices. Rows with no
    valid slot are set to 0 (the kernel documents 0, lse +inf; enforced here). Returns [T, H, 512] bf16.
    """
    _check(flashmla_sparse_prefill_unsupported(q, latent_cache, topk_slots, kv_lora_rank))
    fm = _module("flash_mla", q.device)
    T, H, D = q.shape
    n_slots = latent_cache.shape[0] * latent_cache.shape[1]
    idx = sanitize_slots(topk_slots, n_slots, _FLASHMLA_PREFILL_TOPK_BLOCK)
    if T == 0 or idx.shape[1] == 0:
        return q.new_zeros(T, H, kv_lora_rank)
    heads = _flashmla_heads(H, _capability(q.device), _flashmla_new_api(fm), prefill=True)
    o, _, _ = fm.flash_mla_sparse_fwd(_pad_heads(q, heads), latent_cache.view(n_slots, 1, D), idx.unsqueeze(1),
                                      softmax_scale, kv_lora_rank)
    out = o if heads == H else o[:, :H].contiguous()
    return out.masked_fill_(~(idx >= 0).any(1)[:, None, None], 0.0)


def flashmla_sparse_decode_unsupported(q: torch.Tensor, latent_cache: torch.Tensor, topk_slots: torch.Tensor,
                                       kv_lora_rank: int = 512) -> str | None:
    """Why flashmla_sparse_decode cannot run these inputs (None: it can)."""
    reason = _flashmla_reason(q, latent_cache, topk_slots, kv_lora_rank, prefill=False)
    entry = kv_lora_rank + 4 * math.ceil(kv_lora_rank / 128) + 2 * _LATENT_ROPE
    if reason is None and (latent_cache.dtype != torch.uint8 or latent_cache.shape[-1] != entry):
        reason = (f"flash_mla sparse decode reads the fp8 {entry}-byte latent pool (uint8), got "
                  f"{latent_cache.dtype} entries of {latent_cache.shape[-1]}")
    if reason is None and latent_cache.shape[1] != 64:
        reason = (f"flash_mla sparse decode: page size must be 64 (the 2025 API asserts it; vLLM/SGLang use only 64), "
                  f"got {latent_cache.shape[1]}")
    return reason


def flashmla_sparse_decode(q: torch.Tensor, latent_cache: torch.Tensor, topk_slots: torch.Tensor,
                           softmax_scale: float, kv_lora_rank: int = 512) -> torch.Tensor:
    """Ops.sparse_mla_attention over the fp8 656-byte latent pool with FlashMLA's sparse FP8 decode kernel.

    Upstream: `flash_mla.flash_mla_with_kvcache(q [b, s_q, h_q, 576] bf16, k_cache [blocks, page, 1, 656] uint8,
    block_table, cache_seqlens, head_dim_v=512, tile_scheduler_metadata, num_splits, softmax_scale, causal=False,
    is_fp8_kvcache=True, indices [b, s_q, topk] int32) -> (out [b, s_q, h_q, 512], lse [b, h_q, s_q])`, indices =
    physical slots (page·page_size + offset), only −1 invalid (anything else out of range is an illegal access, so
    slots are sanitized here). Each query token is its own batch row (b = T, s_q = 1, as SGLang's flashmla_kv), in
    calls of at most 512 rows to bound the kernel's fp32 split workspace. 2026 API (9241ae3): `get_mla_metadata()`
    per call, block_table/cache_seqlens None. 2025 API (c28eca9): `get_mla_metadata(cache_seqlens=[topk]·b, h_q, 1,
    h_q, True, topk)` and a dummy block_table (unused by the sparse kernel). Heads zero-padded to 64/128, topk padded
    with −1 to a multiple of 64; rows with no valid slot are set to 0 (vLLM treats their output as undefined).
    Any number of tokens (vLLM's "mixed batch" mode also runs prefill through this kernel). Returns [T, H, 512] bf16.
    """
    _check(flashmla_sparse_decode_unsupported(q, latent_cache, topk_slots, kv_lora_rank))
    fm = _module("flash_mla", q.device)
    T, H, D = q.shape
    pages, page, entry = latent_cache.shape
    out = q.new_zeros(T, H, kv_lora_rank)
    idx = sanitize_slots(topk_slots, pages * page, _FLASHMLA_DECODE_TOPK_BLOCK)
    K = idx.shape[1]
    if T == 0 or K == 0:
        return out
    new_api = _flashmla_new_api(fm)
    heads = _flashmla_heads(H, _capability(q.device), new_api, prefill=False)
    qp = _pad_heads(q, heads)
    kv = latent_cache.view(pages, page, 1, entry)
    for s in range(0, T, _FLASHMLA_DECODE_ROWS):
        qc, ic = qp[s:s + _FLASHMLA_DECODE_ROWS].unsqueeze(1), idx[s:s + _FLASHMLA_DECODE_ROWS].unsqueeze(1)
        b = qc.shape[0]
        if new_api:
            sched, splits = fm.get_mla_metadata()
            block_table = seqlens = None
        else:
            seqlens = torch.full((b,), K, dtype=torch.int32, device=q.device)
            sched, splits = fm.get_mla_metadata(seqlens, heads, 1, heads, True, K)
            block_table = torch.zeros((b, 1), dtype=torch.int32, device=q.device)
        o, _ = fm.flash_mla_with_kvcache(q=qc, k_cache=kv, block_table=block_table, cache_seqlens=seqlens,
                                         head_dim_v=kv_lora_rank, tile_scheduler_metadata=sched, num_splits=splits,
                                         softmax_scale=softmax_scale, causal=False, is_fp8_kvcache=True, indices=ic)
        out[s:s + b] = o[:, 0, :H]
    return out.masked_fill_(~(idx >= 0).any(1)[:, None, None], 0.0)


def flashmla_sparse_attention_unsupported(q: torch.Tensor, latent_cache: torch.Tensor, topk_slots: torch.Tensor,
                                          kv_lora_rank: int = 512) -> str | None:
    """Why flashmla_sparse_attention cannot run these inputs (None: it can)."""
    if latent_cache.dtype == torch.uint8:
        return flashmla_sparse_decode_unsupported(q, latent_cache, topk_slots, kv_lora_rank)
    return flashmla_sparse_prefill_unsupported(q, latent_cache, topk_slots, kv_lora_rank)


def flashmla_sparse_attention(q: torch.Tensor, latent_cache: torch.Tensor, topk_slots: torch.Tensor,
                              softmax_scale: float, kv_lora_rank: int = 512) -> torch.Tensor:
    """Ops.sparse_mla_attention on FlashMLA: the fp8 (uint8) pool goes to flashmla_sparse_decode, a bf16 pool to
    flashmla_sparse_prefill (FlashMLA has no bf16 sparse decode kernel nor an fp8 sparse prefill kernel)."""
    if latent_cache.dtype == torch.uint8:
        return flashmla_sparse_decode(q, latent_cache, topk_slots, softmax_scale, kv_lora_rank)
    return flashmla_sparse_prefill(q, latent_cache, topk_slots, softmax_scale, kv_lora_rank)


# ---- DeepGEMM: FP8 block GEMM ---------------------------------------------------------------------------------------
def _linear_reason(w_fp8: torch.Tensor, w_scale_inv: torch.Tensor, x: torch.Tensor | None) -> str | None:
    reason = _common_reason("deep_gemm", w_fp8, w_scale_inv, *([] if x is None else [x]))
    if reason is not None:
        return reason
    if w_fp8.dtype != FP8 or w_fp8.dim() != 2 or not w_fp8.is_contiguous():
        return f"deep_gemm: weight must be a contiguous [N, K] float8_e4m3fn tensor, got {w_fp8.dtype} {w_fp8.shape}"
    N, K = w_fp8.shape
    if N % 64 or K % 128:
        return f"deep_gemm: needs N % 64 == 0 and K % 128 == 0 (the shapes DeepGEMM tests), got N={N} K={K}"
    sn, sk = math.ceil(N / 128), math.ceil(K / 128)
    if w_scale_inv.dtype != torch.float32 or tuple(w_scale_inv.shape) != (sn, sk) or not w_scale_inv.is_contiguous():
        return f"deep_gemm: scale_inv must be contiguous fp32 [{sn}, {sk}] (128×128 blocks), got {w_scale_inv.shape}"
    if x is not None and (x.dtype != torch.bfloat16 or x.shape[-1] != K):
        return f"deep_gemm: activations must be bf16 [.., {K}], got {x.dtype} {tuple(x.shape)}"
    return None


def deep_gemm_fp8_linear_unsupported(w_fp8: torch.Tensor, w_scale_inv: torch.Tensor,
                                     x: torch.Tensor | None = None) -> str | None:
    """Why deep_gemm_fp8_linear cannot use this weight (and activation, if given). Meant to be called once per weight
    at load time: on SM100 it reads the scales (a device sync) to check they are powers of two."""
    reason = _linear_reason(w_fp8, w_scale_inv, x)
    if reason is None and _capability(w_fp8.device)[0] == 10 and bool((w_scale_inv.view(torch.int32) & 0x7FFFFF).any()):
        reason = "deep_gemm on SM100 packs scales as UE8M0 (exponent bits): weight scales must be powers of two"
    return reason


def deep_gemm_fp8_linear(x: torch.Tensor, w_fp8: torch.Tensor, w_scale_inv: torch.Tensor,
                         ue8m0: bool = True) -> torch.Tensor:
    """y [.., N] bf16 = x [.., K] bf16 · Wᵀ for a DeepSeek FP8 block weight (W = w_fp8 · scale_inv per 128×128 block).

    Upstream: `deep_gemm.fp8_gemm_nt((A [M, K] e4m3, SFA [M, K/128] fp32), (B [N, K] e4m3, SFB [N/128, K/128] fp32),
    D [M, N] bf16)` (54e2261: alias of fp8_fp4_gemm_nt; default recipe (1, 128, 128)). DeepGEMM transforms fp32 scales
    itself (layout.hpp transform_sf_into_required_layout): SM90 makes SFA MN-major and TMA-aligned and uses SFB as
    given; SM100 packs both into UE8M0 ints by taking the exponent bits, so scales must be powers of two there (the
    activations then must use ue8m0; weights are checked once by deep_gemm_fp8_linear_unsupported, not here).
    Activations are quantized per token per 128 channels by the Triton quantize_fp8 kernel (bit-exact with the
    reference; `ue8m0` rounds scales up to powers of two, as V3.2's scale_fmt "ue8m0").
    """
    _check(_linear_reason(w_fp8, w_scale_inv, x))
    if not ue8m0 and _capability(x.device)[0] == 10:
        raise ValueError("deep_gemm on SM100 needs ue8m0 activation scales")
    from dsv32.backends.triton.quant import quantize_fp8

    dg = _module("deep_gemm", x.device)
    N, K = w_fp8.shape
    x2 = x.reshape(-1, K)
    y = torch.empty(x2.shape[0], N, dtype=torch.bfloat16, device=x.device)
    if x2.shape[0]:
        dg.fp8_gemm_nt(quantize_fp8(x2, 128, ue8m0=ue8m0), (w_fp8, w_scale_inv), y)
    return y.view(*x.shape[:-1], N)


# ---- DeepGEMM: lightning-indexer logits -----------------------------------------------------------------------------
_INDEXER_HEADS = (32, 64)  # SM90 asserts 32/64 (SM100 also 8/16 in 2026 builds); V3.2 has 64
_INDEXER_HEAD_DIM = 128
_INDEXER_PAGE = 64  # SM90 asserts block_kv == 64 (SM100 also 32 in 2026 builds)
_MAX_LOGITS_ELEMS = 1 << 28  # fp32 logits materialized per DeepGEMM call (1 GiB)


def _indexer_reason(q: torch.Tensor, *tensors: torch.Tensor) -> str | None:
    reason = _common_reason("deep_gemm", q, *tensors)
    if reason is not None:
        return reason
    if q.dtype != FP8:
        return f"deep_gemm indexer: q must be float8_e4m3fn, got {q.dtype}"
    if q.shape[-2] not in _INDEXER_HEADS or q.shape[-1] != _INDEXER_HEAD_DIM:
        return f"deep_gemm indexer: needs {_INDEXER_HEADS} heads of width 128, got {tuple(q.shape[-2:])}"
    return None


def deep_gemm_indexer_paged_unsupported(q_fp8: torch.Tensor, index_cache: torch.Tensor) -> str | None:
    """Why deep_gemm_indexer_logits_paged / deep_gemm_indexer_topk cannot use this query and fp8 index pool."""
    reason = _indexer_reason(q_fp8, index_cache)
    if reason is not None:
        return reason
    row = _INDEXER_PAGE * (q_fp8.shape[-1] + 4)
    if index_cache.dtype != torch.uint8 or index_cache.dim() != 2 or index_cache.shape[1] != row:
        return (f"deep_gemm indexer: needs the fp8 index pool uint8 [pages, 64·(D+4)] = [pages, {row}] "
                f"(page size 64), got {index_cache.dtype} {tuple(index_cache.shape)}")
    if not index_cache.is_contiguous():
        return "deep_gemm indexer: the index pool must be contiguous"
    return None


def deep_gemm_indexer_logits_paged(q_fp8: torch.Tensor, index_cache: torch.Tensor, head_weights: torch.Tensor,
                                   context_lens: torch.Tensor, block_table: torch.Tensor, max_context_len: int,
                                   softmax_scale: float = 1.0) -> torch.Tensor:
    """Indexer scores over the paged fp8 key pool: logits [B·next_n, max_context_len] fp32 with
    logits[b·next_n + j, s] = k_scale[s] · Σ_h head_weights[b·next_n + j, h] · relu(softmax_scale · q[b, j, h] · k[s])
    for s < context_lens[b, j], −inf beyond.

    q_fp8 [B, next_n, H, 128] e4m3; index_cache uint8 [pages, 64·132] (core/kv_cache.py: per page 64 keys then 64 fp32
    scales, which is DeepGEMM's fused layout viewed as [pages, 64, 1, 132]); head_weights [B·next_n, H] fp32;
    context_lens [B, next_n] (or [B] for next_n == 1) keys visible to each query row; block_table [B, pages_per_req]
    int32 covering those keys.

    Upstream: `deep_gemm.get_paged_mqa_logits_metadata(context_lens [B, next_n] int32, block_kv=64, num_sms)` and
    `deep_gemm.fp8_paged_mqa_logits(q, kv_cache [blocks, 64, 1, 132] uint8, weights [B·next_n, H] fp32, context_lens,
    block_table, schedule_meta, max_context_len, clean_logits=False)` (54e2261; out = Σ_h w·relu(q·k)·k_scale; with
    2-D context_lens the kernel leaves entries ≥ context_len unwritten, so they are masked to −inf here).
    softmax_scale > 0 is folded into the weights (relu(c·x) = c·relu(x)), as vLLM does.
    """
    _check(deep_gemm_indexer_paged_unsupported(q_fp8, index_cache))
    if q_fp8.dim() != 4 or softmax_scale <= 0:
        raise ValueError("deep_gemm indexer: q_fp8 must be [B, next_n, H, D] and softmax_scale > 0")
    dg = _module("deep_gemm", q_fp8.device)
    B, next_n, H, D = q_fp8.shape
    ctx = context_lens.to(torch.int32).reshape(B, next_n).contiguous()
    weights = (head_weights.float() * softmax_scale).reshape(B * next_n, H).contiguous()
    table = block_table.to(torch.int32).clamp_min(0).contiguous()  # entries past a row's context are never used
    cache = index_cache.view(index_cache.shape[0], _INDEXER_PAGE, 1, D + 4)
    schedule = dg.get_paged_mqa_logits_metadata(ctx, _INDEXER_PAGE, dg.get_num_sms())
    logits = dg.fp8_paged_mqa_logits(q_fp8.contiguous(), cache, weights, ctx, table, schedule, max_context_len,
                                     clean_logits=False)
    beyond = torch.arange(max_context_len, device=q_fp8.device)[None, :] >= ctx.reshape(-1, 1)
    return logits.masked_fill_(beyond, float("-inf"))


def deep_gemm_indexer_logits_ragged(q_fp8: torch.Tensor, k_fp8: torch.Tensor, k_scale: torch.Tensor,
                                    weights: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor,
                                    softmax_scale: float = 1.0) -> torch.Tensor:
    """Indexer scores of S queries over a contiguous (gathered) key buffer: [S, S_kv] fp32 with
    out[i, j] = k_scale[j] · Σ_h weights[i, h] · relu(softmax_scale · q[i, h] · k[j]) for ks[i] ≤ j < ke[i], −inf
    elsewhere. q_fp8 [S, H, 128] e4m3, k_fp8 [S_kv, 128] e4m3, k_scale [S_kv] fp32, weights [S, H], ks/ke [S].

    Upstream: `deep_gemm.fp8_mqa_logits(q, (k, k_scale), weights [S, H] fp32, cu_seq_len_k_start [S] int32,
    cu_seq_len_k_end [S] int32, clean_logits=True, max_seqlen_k=0)` (54e2261; legacy name of fp8_fp4_mqa_logits).
    The result is a view whose row stride is padded (1024-byte aligned): `.contiguous()` it for kernels that need it.
    Memory is S × (S_kv + 256) fp32: chunk S for long prefills.
    """
    _check(_indexer_reason(q_fp8, k_fp8, k_scale, weights, ks, ke))
    if q_fp8.dim() != 3 or k_fp8.dtype != FP8 or k_fp8.shape[-1] != q_fp8.shape[-1] or softmax_scale <= 0:
        raise ValueError("deep_gemm indexer: q [S, H, D] and k [S_kv, D] must be e4m3, softmax_scale > 0")
    dg = _module("deep_gemm", q_fp8.device)
    w = (weights.float() * softmax_scale).contiguous()
    return dg.fp8_mqa_logits(q_fp8.contiguous(), (k_fp8.contiguous(), k_scale.float().contiguous()), w,
                             ks.to(torch.int32).contiguous(), ke.to(torch.int32).contiguous(), clean_logits=True)


def deep_gemm_indexer_topk(q: torch.Tensor, head_weights: torch.Tensor, index_cache: torch.Tensor, batch,
                           softmax_scale: float, topk: int) -> torch.Tensor:
    """Ops.indexer_topk for the fp8 index pool (page size 64) on DeepGEMM's paged logits kernel.

    Every query token is its own row (B = T, next_n = 1) with context positions[t] + 1 and its request's block-table
    row, so prefill, decode and MTP verify rows are all handled; rows are processed in chunks so the fp32 logits stay
    ≤ 1 GiB. Selection: flashinfer_topk when FlashInfer is usable, else torch.topk. Returns int32 [T, topk] slots
    padded with −1. Check deep_gemm_indexer_paged_unsupported(q, index_cache) first.
    """
    T = q.shape[0]
    out = torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
    max_ctx = max(batch.kv_lens_cpu, default=0)
    if T == 0 or max_ctx == 0 or topk == 0:
        return out
    if batch.page_size != _INDEXER_PAGE:
        raise ValueError(f"deep_gemm indexer: page size must be 64, got {batch.page_size}")
    k_sel = min(topk, max_ctx)
    ctx = (batch.positions + 1).to(torch.int32)
    tables = batch.block_table[batch.token_req].to(torch.int32)
    use_fi = status("flashinfer", q.device if _DEVICE_TYPE == "cuda" else None)[0]
    rows = max(1, _MAX_LOGITS_ELEMS // max_ctx)
    for s in range(0, T, rows):
        e = min(T, s + rows)
        logits = deep_gemm_indexer_logits_paged(q[s:e].unsqueeze(1), index_cache, head_weights[s:e],
                                                ctx[s:e, None], tables[s:e], max_ctx, softmax_scale)
        if use_fi:
            pos = flashinfer_topk(logits.contiguous(), ctx[s:e], k_sel)
        else:
            pos = logits.topk(k_sel, dim=-1).indices
            pos = torch.where(pos < ctx[s:e, None], pos, torch.full_like(pos, -1))
        out[s:e, :k_sel] = positions_to_slots(pos, tables[s:e], batch.page_size)
    return out


# ---- FlashInfer -----------------------------------------------------------------------------------------------------
def flashinfer_topk_unsupported(scores: torch.Tensor, lengths: torch.Tensor, k: int) -> str | None:
    """Why flashinfer_topk cannot run these inputs (None: it can)."""
    reason = _common_reason("flashinfer", scores, lengths)
    if reason is not None:
        return reason
    if scores.dim() != 2 or scores.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"flashinfer top-k: scores must be 2-D fp32/fp16/bf16, got {scores.dtype} {tuple(scores.shape)}"
    if lengths.shape != scores.shape[:1] or k < 0:
        return "flashinfer top-k: lengths must be [R] and k ≥ 0"
    return None


def flashinfer_topk(scores: torch.Tensor, lengths: torch.Tensor, k: int) -> torch.Tensor:
    """int32 [R, k]: positions of the min(k, lengths[r]) largest scores[r, :lengths[r]] (any order; ties either way),
    padded with −1. lengths are clamped to [0, N].

    Upstream: `flashinfer.top_k_ragged_transform(input [R, N] contiguous, offsets [R] int32, lengths [R] int32, k)
    -> int32 [R, k]` (fb28d72 / 3a301a1; output = top-k index + offsets[r], positions beyond lengths[r] are −1; rows
    with lengths ≤ k return 0..lengths−1). offsets are zero here; k is capped at N and the rest padded with −1.
    """
    _check(flashinfer_topk_unsupported(scores, lengths, k))
    fi = _module("flashinfer", scores.device)
    R, N = scores.shape
    out = torch.full((R, k), -1, dtype=torch.int32, device=scores.device)
    k_eff = min(k, N)
    if R == 0 or k_eff == 0:
        return out
    lens = lengths.to(torch.int32).clamp(0, N).contiguous()
    offsets = torch.zeros(R, dtype=torch.int32, device=scores.device)
    out[:, :k_eff] = fi.top_k_ragged_transform(scores.contiguous(), offsets, lens, k_eff)
    return out


# ---- FlashInfer NVFP4 fused MoE (CUTLASS, Blackwell) ------------------------------------------------------------------
# Written against flashinfer-python 0.7.4 / flashinfer-ai/flashinfer fb28d72 (`flashinfer/fused_moe/core.py:
# cutlass_fused_moe`, `flashinfer/quantization/fp4_quantization.py: block_scale_interleave`,
# `tests/moe/test_trtllm_cutlass_fused_moe.py::test_moe_nvfp4`); NEVER RUN: no Blackwell GPU here, tested against a
# fake (tests/backends/test_vendor.py) and the real wheel's signatures. The kernel is W4A4: it quantizes the
# activations to NVFP4 with the checkpoint's static input scales (a global encode scale 1 / input_scale; block scales
# per 16 at run time) — the numbers the NVFP4 checkpoint was calibrated for, not those of the weight-only Triton path.
# Its fc1 holds the up rows first, then the gate rows (SwiGLU: silu(second half) · first half); block scales go in the
# 128×4-swizzled layout; per expert one dequant scale per GEMM (= input_scale · weight_scale_2), so gate and up must
# share their weight_scale_2 (ModelOpt writes them equal for fused experts).
_NVFP4_MOE_ALIGN = 128


def flashinfer_nvfp4_moe_unsupported(gate, up, down, x_dtype: torch.dtype, device=None) -> str | None:
    ok, reason = status("flashinfer", device if _DEVICE_TYPE == "cuda" else None)
    if not ok:
        return reason
    major, minor = _capability(device if _DEVICE_TYPE == "cuda" else None)
    if major != 10:
        return f"FlashInfer's NVFP4 MoE (CUTLASS) needs Blackwell's FP4 math units (SM100), this GPU is SM{major}{minor}"
    if not (gate.fmt == up.fmt == down.fmt == "nvfp4"):
        return "FlashInfer's FP4 MoE here takes NVFP4 experts (ModelOpt); others run on the Triton kernel"
    if x_dtype not in (torch.bfloat16, torch.float16):
        return "FlashInfer's NVFP4 MoE writes bf16 / fp16 (--dtype bfloat16)"
    if any(p.input_scale is None for p in (gate, up, down)):
        return "FlashInfer's NVFP4 MoE quantizes activations with the checkpoint's input_scale; these experts have none"
    if not torch.equal(gate.global_scale[:, 0], up.global_scale[:, 0]):
        return ("gate and up experts have different weight_scale_2: FlashInfer's fused gate_up takes one global scale "
                "per expert")
    E, I, K2 = gate.weight.shape
    if (2 * K2) % _NVFP4_MOE_ALIGN or I % _NVFP4_MOE_ALIGN:
        return f"FlashInfer's NVFP4 MoE tiles need I ({I}) and K ({2 * K2}) multiples of {_NVFP4_MOE_ALIGN}"
    return None


def _swizzled_scales(scale: torch.Tensor) -> torch.Tensor:
    """e4m3 block scales [E, N, K/16] → FlashInfer's 128×4-swizzled layout, as int32 [E, N_pad, K_pad/64]."""
    E, N, C = scale.shape
    flat = importlib.import_module("flashinfer.fp4_quantization").block_scale_interleave(scale.view(torch.uint8))
    n_pad, c_pad = -(-N // 128) * 128, -(-C // 4) * 4
    return flat.view(E, n_pad, c_pad).view(torch.int32)


def flashinfer_nvfp4_moe_prepare(gate, up, down) -> tuple:
    """(fc1 weights, fc2 weights, quant_scales) from NVFP4 expert stacks as the loader returns them: fc1 [E, 2I, K/2]
    (up rows first) and fc2 [E, K, I/2] viewed as int64, the six quant scales FlashInfer's NVFP4 path reads."""
    _check(flashinfer_nvfp4_moe_unsupported(gate, up, down, torch.bfloat16, gate.weight.device))
    fc1 = torch.cat([up.weight, gate.weight], 1).contiguous().view(torch.long)
    fc2 = down.weight.contiguous().view(torch.long)
    a1 = torch.maximum(gate.input_scale.max(), up.input_scale.max()).float()  # one activation scale for all experts
    a2 = down.input_scale.max().float()
    scales = [(1.0 / a1).reshape(()), _swizzled_scales(torch.cat([up.scale_inv, gate.scale_inv], 1)),
              (a1 * gate.global_scale[:, 0]).float().contiguous(), (1.0 / a2).reshape(()),
              _swizzled_scales(down.scale_inv), (a2 * down.global_scale[:, 0]).float().contiguous()]
    return fc1, fc2, scales


def flashinfer_nvfp4_moe(x: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor, quant_scales: list,
                         topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Ops.moe_experts through `cutlass_fused_moe`. topk_ids in [0, E]: E (another rank's expert) is made the first
    expert of a pretend second expert-parallel rank (ep_size 2, this rank 0), which the kernel skips."""
    _check(_common_reason("flashinfer", x, fc1, fc2))
    out = torch.empty_like(x)
    if x.shape[0] == 0:
        return out
    importlib.import_module("flashinfer.fused_moe").cutlass_fused_moe(
        x.contiguous(), topk_ids.to(torch.int32).contiguous(), topk_weights.float().contiguous(), fc1, fc2, x.dtype,
        quant_scales=quant_scales, ep_size=2, ep_rank=0, output=out)
    return out
