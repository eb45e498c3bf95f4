"""Adapters from dsv32's ops to aiter, AMD's kernel library (imported lazily; NEVER RUN ON AMD HARDWARE).

Written against the source of `amd-aiter` 0.1.7.post2.dev18 (PyPI, a pure-Python JIT wheel) and the signatures of
ROCm/aiter main (2026-08) listed in shared/spec/model_and_kernels.md §4.4. `AITER_CALLS` names every aiter function
used, where it is looked up and which parameters are passed: tests/backends/test_aiter_api.py checks it against the
real wheel's source (parsed, not imported) and against the fake aiter of the contract tests, so an upstream rename
fails CI. Each adapter has an `*_unsupported(...) -> str` companion ('' when it can run) used for the startup
kernel choice (`RocmOps.kernel_options`) and per batch (a batch an adapter cannot take runs on the Triton kernel,
logged once).

- Sparse MLA (decode and prefill alike): `aiter.mla.mla_decode_fwd` with page size 1 over the selected slots: every
  query token is one "sequence" (qo_indptr = 0..T), its valid slots compacted into kv_indices (kv_indptr from their
  counts; no host sync, so it can be captured in a graph). bf16 cache in the "combined" layout viewed as
  [slots, 1, 1, L+R]; aiter's bf16 kernels exist for 16 and 128 heads. Rows without a valid slot output 0 (aiter
  leaves them undefined). The persistent-metadata mode (`get_mla_metadata_v1`) is not used.
- Indexer: decode with page size 1 (the paged pool's page is then [D key bytes | fp32 scale], the per-token layout
  aiter's `deepgemm_fp8_paged_mqa_logits` reads) → `top_k_per_row_decode`; otherwise per request the keys are
  gathered and scored by `fp8_mqa_logits`, then `top_k_per_row_prefill` (row starts 0: positions). aiter's top-k
  width is fixed at 2048 in 0.1.7 (V3.2's index_topk); where the installed aiter takes `stable`, it is asked for
  (identical picks on every tensor-parallel rank).
- MoE: `aiter.fused_moe.fused_moe` (FP8 128×128 blocks: QuantType.per_128x128; bf16: QuantType.No; W4A4 MXFP4:
  QuantType.per_1x32, gfx950 only, e2m1 weights with e8m0 scales shuffled by `fp4_utils.e8m0_shuffle`, activations
  quantized to MXFP4 inside aiter — so only for Quark checkpoints whose activations are MXFP4 too) on gate_up / down
  weights shuffled once at load by aiter's `shuffle_weight(w, (16, 16))`; routing `biased_grouped_topk`.
- FP8 linears: `gemm_a8w8_blockscale` on activations quantized per token per 128 channels by the Triton kernel.
- RMSNorm: `rms_norm` / `rmsnorm2d_fwd_with_add`.
fp8 tensors are in the GPU's format (e4m3fnuz on gfx942, which aiter's `dtypes.fp8` also picks there).
"""

from __future__ import annotations

import functools
import importlib
import inspect

import torch

# function → (modules to look it up in, first to last; positional parameters passed; keyword parameters passed)
AITER_CALLS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "mla_decode_fwd": (("aiter.mla",), ("q", "kv_buffer", "o", "qo_indptr", "kv_indptr", "kv_indices",
                                        "kv_last_page_lens", "max_seqlen_q"), ("sm_scale",)),
    "fp8_mqa_logits": (("aiter.ops.triton.attention.fp8_mqa_logits", "aiter.ops.triton.fp8_mqa_logits"),
                       ("Q", "KV", "kv_scales", "weights", "cu_starts", "cu_ends"), ()),
    "deepgemm_fp8_paged_mqa_logits": (("aiter.ops.triton.attention.pa_mqa_logits", "aiter.ops.triton.pa_mqa_logits"),
                                      ("q_fp8", "kv_cache_fp8", "weights", "out_logits", "context_lens", "kv_indices",
                                       "max_model_len"), ()),
    "top_k_per_row_prefill": (("aiter.ops.topk",), ("logits", "rowStarts", "rowEnds", "indices", "values", "numRows",
                                                    "stride0", "stride1"), ()),
    "top_k_per_row_decode": (("aiter.ops.topk",), ("logits", "next_n", "seqLens", "indices", "numRows", "stride0",
                                                   "stride1"), ()),
    "biased_grouped_topk": (("aiter.ops.topk",), ("gating_output", "correction_bias", "topk_weights", "topk_ids",
                                                  "num_expert_group", "topk_group", "need_renorm",
                                                  "routed_scaling_factor"), ()),
    "fused_moe": (("aiter.fused_moe",), ("hidden_states", "w1", "w2", "topk_weight", "topk_ids"),
                  ("expert_mask", "activation", "quant_type", "w1_scale", "w2_scale")),
    "shuffle_weight": (("aiter.ops.shuffle",), ("x", "layout"), ()),
    "e8m0_shuffle": (("aiter.utility.fp4_utils",), ("scale",), ()),
    "gemm_a8w8_blockscale": (("aiter.ops.gemm_op_a8w8",), ("XQ", "WQ", "x_scale", "w_scale"), ("dtype",)),
    "rms_norm": (("aiter.ops.rmsnorm",), ("input", "weight", "epsilon"), ()),
    "rmsnorm2d_fwd_with_add": (("aiter.ops.rmsnorm",), ("out", "input", "residual_in", "residual_out", "weight",
                                                        "epsilon"), ()),
}
# attributes of the aiter package itself
AITER_ENUMS = {"ActivationType": ("Silu",), "QuantType": ("No", "per_128x128", "per_1x32")}
TOPK_WIDTH = 2048  # aiter 0.1.7's top_k_per_row_* width (kTopK)
MLA_HEADS = (16, 128)  # heads of aiter's bf16 MLA decode kernels (mla_dec_stage1_bf16_a16w16_subQ{16,128}_mqa*)


@functools.lru_cache(maxsize=None)
def status() -> str:
    """'' when aiter is importable with every function the adapters use, else why not."""
    try:
        aiter = importlib.import_module("aiter")
    except ImportError:
        return "aiter is not installed (pip install 'dsv32[rocm]' installs amd-aiter)"
    except Exception as e:  # a broken JIT build: report, never crash the backend
        return f"aiter failed to import: {type(e).__name__}: {e}"
    for enum, members in AITER_ENUMS.items():
        if not all(hasattr(getattr(aiter, enum, None), m) for m in members):
            return f"aiter lacks {enum}.{'/'.join(members)} (too old or too new for these adapters)"
    for name in AITER_CALLS:
        try:
            fn(name)
        except (ImportError, AttributeError) as e:
            return f"aiter lacks {name} ({e})"
    return ""


@functools.lru_cache(maxsize=None)
def fn(name: str):
    """The aiter function `name`, from the first of AITER_CALLS' modules that has it."""
    modules = AITER_CALLS[name][0]
    for mod in modules:
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        if hasattr(m, name):
            return getattr(m, name)
    raise AttributeError(f"{name} is in none of {', '.join(modules)}")


@functools.lru_cache(maxsize=None)
def _accepts(name: str, param: str) -> bool:
    try:
        return param in inspect.signature(fn(name)).parameters
    except (ImportError, AttributeError, TypeError, ValueError):  # no aiter, or a signature that cannot be read
        return False


def _aiter():
    return importlib.import_module("aiter")


# ---- sparse MLA -------------------------------------------------------------------------------------------------
def mla_unsupported(q: torch.Tensor, latent_cache, kv_lora_rank: int) -> str:
    if not isinstance(latent_cache, torch.Tensor) or latent_cache.dtype == torch.uint8:
        return "aiter's sparse MLA reads a bf16 cache in the combined layout (use --kv-cache-dtype bfloat16)"
    if q.dtype != torch.bfloat16 or latent_cache.dtype != torch.bfloat16:
        return "aiter's sparse MLA kernels are bf16 (--dtype bfloat16)"
    if q.shape[1] not in MLA_HEADS:
        return f"aiter's bf16 MLA decode kernels take {' or '.join(map(str, MLA_HEADS))} heads, this rank has {q.shape[1]}"
    if (kv_lora_rank, q.shape[-1]) != (512, 576):
        return f"aiter's MLA kernels are built for a 512 + 64 latent, this model has {kv_lora_rank} + {q.shape[-1] - kv_lora_rank}"
    return ""


def compact_slots(topk_slots: torch.Tensor, n_slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kv_indptr [T+1] int32, kv_indices [T·K+1] int32, counts [T]) of each row's valid slots (0 ≤ s < n_slots), in
    row order, packed without a host sync: every row's valid slots at kv_indices[kv_indptr[t]:kv_indptr[t+1]], the
    tail (and one spare) unused."""
    T, K = topk_slots.shape
    valid = (topk_slots >= 0) & (topk_slots < n_slots)
    counts = valid.sum(1, dtype=torch.int32)
    indptr = torch.zeros(T + 1, dtype=torch.int32, device=topk_slots.device)
    indptr[1:] = torch.cumsum(counts, 0)
    dest = indptr[:-1, None].long() + torch.cumsum(valid, 1) - 1
    dest = torch.where(valid, dest, torch.full_like(dest, T * K))  # invalid entries land on the spare element
    indices = torch.zeros(T * K + 1, dtype=torch.int32, device=topk_slots.device)
    indices.scatter_(0, dest.view(-1), topk_slots.to(torch.int32).view(-1))
    return indptr, indices, counts


def sparse_mla(q: torch.Tensor, latent_cache: torch.Tensor, topk_slots: torch.Tensor, softmax_scale: float,
               kv_lora_rank: int) -> torch.Tensor:
    T, H, D = q.shape
    n_slots = latent_cache.shape[0] * latent_cache.shape[1]
    kv = latent_cache.view(n_slots, 1, 1, latent_cache.shape[-1])
    o = torch.empty(T, H, kv_lora_rank, dtype=q.dtype, device=q.device)
    if T == 0:
        return o
    indptr, indices, counts = compact_slots(topk_slots, n_slots)
    qo_indptr = torch.arange(T + 1, dtype=torch.int32, device=q.device)
    last_page = torch.ones(T, dtype=torch.int32, device=q.device)
    fn("mla_decode_fwd")(q.contiguous(), kv, o, qo_indptr, indptr, indices, last_page, 1, sm_scale=softmax_scale)
    return torch.where(counts[:, None, None] > 0, o, torch.zeros((), dtype=o.dtype, device=o.device))


# ---- indexer ----------------------------------------------------------------------------------------------------
def indexer_unsupported(q: torch.Tensor, index_cache: torch.Tensor, page_size: int | None, topk: int,
                        decode: bool) -> str:
    if index_cache.dtype != torch.uint8:
        return "aiter's indexer kernels read fp8 keys (--indexer-precision fp8)"
    H, D = q.shape[1], q.shape[2]
    if H & (H - 1) or D & (D - 1):
        return f"aiter's indexer logits need power-of-two heads and head dim, got {H} × {D}"
    if topk != TOPK_WIDTH and not _accepts("top_k_per_row_prefill", "k"):
        return f"this aiter's top-k is fixed at {TOPK_WIDTH} keys, the model selects {topk}"
    if decode and page_size != 1:
        return ("aiter's paged indexer (decode) reads one key per page: --page-size 1 "
                f"(this cache has pages of {page_size})")
    return ""


def _width(name: str, topk: int) -> int:
    """Columns of the indices buffer the top-k kernel fills."""
    return topk if _accepts(name, "k") else TOPK_WIDTH


def _topk_kwargs(name: str, topk: int) -> dict:
    kw = {}
    if _accepts(name, "k"):
        kw["k"] = topk
    if _accepts(name, "stable"):
        kw["stable"] = True  # the same picks on every rank
    return kw


def _positions_to_slots(pos: torch.Tensor, ends: torch.Tensor, block_table_rows: torch.Tensor,
                        page_size: int) -> torch.Tensor:
    """Selected key positions [n, k] (−1 or ≥ the row's end = none) → physical slots (−1 = none)."""
    ok = (pos >= 0) & (pos < ends[:, None])
    p = torch.where(ok, pos, torch.zeros_like(pos)).long()
    pages = torch.gather(block_table_rows.long(), 1, p // page_size)
    return torch.where(ok, pages * page_size + p % page_size, torch.full_like(p, -1)).to(torch.int32)


def indexer_topk(q, head_weights, index_cache, batch, softmax_scale: float, topk: int, fp8_dtype) -> torch.Tensor:
    T, H, D = q.shape
    out = torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
    if T == 0:
        return out
    P = batch.page_size
    w = (head_weights.float() * softmax_scale).contiguous()  # relu(a·x) = a·relu(x), a > 0
    if batch.is_decode and batch.block_table.shape[0] == T and P == 1:
        return _indexer_decode_paged(q, w, index_cache, batch, topk, fp8_dtype, out)
    pool = index_cache.view(-1)
    page_bytes = index_cache.shape[1]
    for r, kv_len in enumerate(batch.kv_lens_cpu):  # prefill / extend: eager, one request at a time
        rows = (batch.token_req == r).nonzero().flatten()
        if rows.numel() == 0 or kv_len == 0:
            continue
        pos = torch.arange(kv_len, device=q.device)
        page = batch.block_table[r, pos // P].long()
        off = pos % P
        key_at = (page * page_bytes + off * D)[:, None] + torch.arange(D, device=q.device)
        scale_at = (page * page_bytes + P * D + off * 4)[:, None] + torch.arange(4, device=q.device)
        keys = pool[key_at].view(fp8_dtype)
        scales = pool[scale_at].contiguous().view(torch.float32).view(-1)
        ends = (batch.positions[rows] + 1).clamp(max=kv_len).to(torch.int32)
        starts = torch.zeros_like(ends)
        logits = fn("fp8_mqa_logits")(q[rows].contiguous(), keys, scales, w[rows].contiguous(), starts, ends)
        picks = torch.empty(rows.numel(), _width("top_k_per_row_prefill", topk), dtype=torch.int32, device=q.device)
        fn("top_k_per_row_prefill")(logits, starts, ends, picks, None, rows.numel(), logits.stride(0),
                                    logits.stride(1), **_topk_kwargs("top_k_per_row_prefill", topk))
        out[rows] = _positions_to_slots(picks[:, :topk], ends, batch.block_table[r].expand(rows.numel(), -1), P)
    return out


def _indexer_decode_paged(q, w, index_cache, batch, topk, fp8_dtype, out):
    T, H, D = q.shape
    width = -(-max(batch.kv_lens_cpu) // 256) * 256  # the kernel stores whole chunks of keys: room for the last one
    logits = torch.full((T, width), float("-inf"), dtype=torch.float32, device=q.device)
    lens = batch.kv_lens.to(torch.int32)
    table = batch.block_table.to(torch.int32).contiguous()
    cache = index_cache.view(-1, 1, 1, D + 4)  # page size 1: [D key bytes | fp32 scale] per slot
    fn("deepgemm_fp8_paged_mqa_logits")(q.view(T, 1, H, D), cache, w, logits, lens, table, width)
    picks = torch.empty(T, _width("top_k_per_row_decode", topk), dtype=torch.int32, device=q.device)
    fn("top_k_per_row_decode")(logits, 1, lens, picks, T, logits.stride(0), logits.stride(1),
                               **_topk_kwargs("top_k_per_row_decode", topk))
    out.copy_(_positions_to_slots(picks[:, :topk], lens, table, 1))
    return out


# ---- MoE --------------------------------------------------------------------------------------------------------
def experts_unsupported(gate_up, down, x_dtype: torch.dtype, arch: str = "") -> str:
    if x_dtype != torch.bfloat16:
        return "aiter's fused MoE runs bf16 activations (--dtype bfloat16)"
    if gate_up is None:
        return "aiter's fused MoE needs gate and up fused ([E, 2I, K]): FP8 experts need I a multiple of 128"
    if gate_up.is_fp4:
        if gate_up.fmt != "mxfp4":
            return "aiter's FP4 MoE takes MXFP4 experts (NVFP4 runs on the Triton kernel)"
        if arch != "gfx950":
            return f"aiter's MXFP4 MoE needs MXFP4 math units (gfx950), not {arch or 'this GPU'}"
        if gate_up.act != "mxfp4":
            return ("aiter's MXFP4 MoE quantizes activations to MXFP4 (W4A4); this checkpoint's activations are not "
                    "(weight-only MXFP4): the Triton kernel keeps its numbers")
        (E, N, K2), I2 = gate_up.weight.shape, down.weight.shape[2]
        if N % 16 or K2 % 32 or I2 % 32 or (E * N) % 256 or (E * K2 * 2) % 256 or (2 * K2 // 32) % 8 or \
                (2 * I2 // 32) % 8:
            return (f"aiter's FP4 weight / e8m0 scale shuffles do not divide gate_up {N}×{2 * K2} / down "
                    f"{2 * K2}×{2 * I2} over {E} experts")
        return ""
    (_, N, K), I = gate_up.weight.shape, down.weight.shape[2]
    if N % 16 or K % 32 or K % 16 or I % 32:
        return f"aiter's weight shuffle (16 × 32 tiles) does not divide gate_up {N}×{K} / down {K}×{I}"
    if gate_up.is_fp8 and (tuple(gate_up.block) != (128, 128) or N % 128 or K % 128):
        return "aiter's FP8 MoE takes 128×128 blocks with I and K multiples of 128"
    return ""


def shuffle(w: torch.Tensor) -> torch.Tensor:
    return fn("shuffle_weight")(w, (16, 16))


def fuse_fp4_gate_up(gate, up):
    """Stacked FP4 gate [E, I, K/2] and up → gate_up [E, 2I, K/2] (gate rows first), scales alike."""
    from dsv32.core.ops import LinearWeight

    return LinearWeight(torch.cat([gate.weight, up.weight], 1), torch.cat([gate.scale_inv, up.scale_inv], 1),
                        gate.block, gate.fmt, None, None, gate.act)


def shuffle_fp4(w):
    """An MXFP4 expert stack as aiter's per_1x32 MoE reads it: packed weights through shuffle_weight (viewed as
    torch's float4_e2m1fn_x2 where torch has it), e8m0 scales [E, N, K/32] through e8m0_shuffle over E·N rows."""
    from dsv32.core.ops import LinearWeight

    E, N, _ = w.scale_inv.shape
    weight = shuffle(w.weight)
    if hasattr(torch, "float4_e2m1fn_x2"):
        weight = weight.view(torch.float4_e2m1fn_x2)
        weight.is_shuffled = True
    scale = fn("e8m0_shuffle")(w.scale_inv.reshape(E * N, -1)).view(E, N, -1)
    return LinearWeight(weight, scale, w.block, w.fmt, None, None, w.act)


def moe_experts(x, gate_up, down, topk_weights, topk_ids, num_experts: int) -> torch.Tensor:
    """gate_up / down: LinearWeights whose weights were `shuffle`d at load (`shuffle_fp4` for MXFP4). topk_ids in
    [0, E] (E: another rank's expert) → an expert mask over E + 1 ids that leaves E out."""
    a = _aiter()
    mask = torch.ones(num_experts + 1, dtype=torch.int32, device=x.device)
    mask[num_experts] = 0
    scaled = gate_up.is_fp8 or gate_up.is_fp4
    quant = a.QuantType.per_1x32 if gate_up.is_fp4 else a.QuantType.per_128x128 if gate_up.is_fp8 else a.QuantType.No
    return fn("fused_moe")(x.contiguous(), gate_up.weight, down.weight, topk_weights.float().contiguous(),
                           topk_ids.to(torch.int32).contiguous(), expert_mask=mask, activation=a.ActivationType.Silu,
                           quant_type=quant, w1_scale=gate_up.scale_inv if scaled else None,
                           w2_scale=down.scale_inv if scaled else None)


def moe_route(router_logits, correction_bias, n_group, topk_group, top_k, renormalize, routed_scaling_factor):
    T = router_logits.shape[0]
    weights = torch.empty(T, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=router_logits.device)
    logits = router_logits.float().contiguous()
    fn("biased_grouped_topk")(logits, correction_bias.to(logits.dtype).contiguous(), weights, ids, n_group,
                              topk_group, renormalize, routed_scaling_factor)
    return weights, ids.long()


# ---- FP8 linear and RMSNorm ---------------------------------------------------------------------------------------
def linear_unsupported(x_dtype: torch.dtype) -> str:
    return "" if x_dtype in (torch.bfloat16, torch.float16) else "aiter's blockscale GEMM writes bf16/fp16 only"


def fp8_linear(a: torch.Tensor, a_scale: torch.Tensor, w, out_dtype: torch.dtype) -> torch.Tensor:
    return fn("gemm_a8w8_blockscale")(a, w.weight, a_scale, w.scale_inv, dtype=out_dtype)


def rms_norm(x, weight, eps, residual=None):
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    w = weight.to(x.dtype).contiguous()
    if residual is None:
        return fn("rms_norm")(x2, w, eps).view(shape)
    out, res_out = torch.empty_like(x2), torch.empty_like(x2)
    fn("rmsnorm2d_fwd_with_add")(out, x2, residual.reshape(-1, shape[-1]).contiguous(), res_out, w, eps)
    return out.view(shape), res_out.view(shape)
