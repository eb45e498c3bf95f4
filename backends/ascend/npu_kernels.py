"""Adapters from dsv32's ops to torch_npu's fused operators (NEVER RUN ON ASCEND HARDWARE).

Written against the operator schemas (`torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml`) and the
documentation (`torch_npu/_op_plugin_docs.py`) of the torch-npu 2.14.0 wheel. `NPU_CALLS` names every operator used
and the parameters passed; tests/backends/test_npu_api.py checks them against the newest wheel's schemas and against
the fake torch_npu of the contract tests.

Batch layout: the operators take TND batches (tokens of one request contiguous, `actual_seq_lengths_query` the
running sum of query tokens per request) with rightDownCausal masking (sparse_mode 3: the n query tokens of a request
are its last n positions — true of every batch the scheduler builds) over paged caches (PA_BSND, `block_table`).
The adapters order a batch's tokens by (request, position) and put the results back in the batch's order.
- Indexer: `npu_lightning_indexer` on the exact (bf16) key pool viewed [pages, page, 1, D]; head weights are passed
  in the query dtype with the softmax scale folded in (relu(a·x) = a·relu(x), a > 0), so they round to bf16 where
  the reference keeps fp32. It returns key positions; the op contract wants slots (block table lookup).
- Sparse attention: `npu_sparse_flash_attention` (attention_mode 2: absorbed MLA) over the split caches — key = value
  = the latent pool [pages, page, 1, L], key_rope = the rope pool [pages, page, 1, R]. It takes key positions, valid
  ones first: slots are mapped back to positions through the batch's block table (a page holds the same positions in
  every request that shares it), then compacted. Rows without any key are set to 0 (the documentation does not say
  what the operator returns for them).
- MLA key write: `npu_kv_rmsnorm_rope_cache` (cache_mode "PA") — RMSNorm of the latent into the latent pool and RoPE
  of k_pe into the rope pool at the slots. ASSUMED (undocumented): its RoPE pairs elements as DeepSeek's MLA does
  (interleaved, x[2i] with x[2i+1]) and takes cos / sin per element [T, 1, 1, R] (each pair's value twice).
- Routing: `npu_moe_gating_top_k` (sigmoid scores, groups ranked by the sum of their two best biased scores,
  renormalized weights · routed_scaling_factor): only for renormalized routing (DeepSeek's norm_topk_prob).
- Experts: (token, expert) pairs sorted by expert, then `npu_grouped_matmul` with per-expert row counts
  (group_list_type 1): bf16 — gate_up, `npu_swiglu`, down; W8A8 int8 — `npu_dynamic_quant`, int32 gate_up,
  `npu_dequant_swiglu_quant` (dequantize with the per-channel and per-token scales, SwiGLU, per-token int8), down with
  both scales. Weights are stored [E, K, N] (x · W) at load.
- Linears: W8A8 int8 — `npu_dynamic_quant` + `npu_quant_matmul` (per-channel weight scale, per-token activation
  scale); bf16 through torch.
- RMSNorm: `npu_rms_norm` / `npu_add_rms_norm`.
"""

from __future__ import annotations

import functools
import importlib

import torch

# operator → (positional parameters passed, keyword parameters passed)
NPU_CALLS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "npu_lightning_indexer": (("query", "key", "weights"),
                              ("actual_seq_lengths_query", "actual_seq_lengths_key", "block_table", "layout_query",
                               "layout_key", "sparse_count", "sparse_mode")),
    "npu_sparse_flash_attention": (("query", "key", "value", "sparse_indices", "scale_value"),
                                   ("block_table", "actual_seq_lengths_query", "actual_seq_lengths_kv", "query_rope",
                                    "key_rope", "sparse_block_size", "layout_query", "layout_kv", "sparse_mode",
                                    "attention_mode")),
    "npu_kv_rmsnorm_rope_cache": (("kv", "gamma", "cos", "sin", "index", "k_cache", "ckv_cache"),
                                  ("epsilon", "cache_mode")),
    "npu_moe_gating_top_k": (("x", "k"), ("bias", "k_group", "group_count", "group_select_mode", "renorm",
                                          "norm_type", "routed_scaling_factor", "eps")),
    "npu_grouped_matmul": (("x", "weight"), ("scale", "per_token_scale", "group_list", "split_item", "group_type",
                                             "group_list_type", "output_dtype")),
    "npu_swiglu": (("self",), ("dim",)),
    "npu_dequant_swiglu_quant": (("x",), ("weight_scale", "activation_scale", "group_index", "activate_left",
                                          "quant_mode")),
    "npu_dynamic_quant": (("input",), ()),
    "npu_quant_matmul": (("x1", "x2", "scale"), ("pertoken_scale", "output_dtype")),
    "npu_rms_norm": (("self", "gamma"), ("epsilon",)),
    "npu_add_rms_norm": (("x1", "x2", "gamma"), ("epsilon",)),
}
PAGE_MULTIPLE, PAGE_MAX = 16, 1024  # PA_BSND block sizes the attention and indexer operators take
MAX_SPARSE = 2048  # sparse_count the indexer takes (1-2048, and multiples of 1024 up to 8192)


@functools.lru_cache(maxsize=None)
def status() -> str:
    """'' when torch_npu is importable with every operator used, else why not."""
    try:
        npu = importlib.import_module("torch_npu")
    except ImportError:
        return "torch_npu is not installed"
    except Exception as e:
        return f"torch_npu failed to import: {type(e).__name__}: {e}"
    missing = [name for name in NPU_CALLS if not hasattr(npu, name)]
    return f"torch_npu lacks {', '.join(missing)} (too old for these adapters)" if missing else ""


def op(name: str):
    return getattr(importlib.import_module("torch_npu"), name)


# ---- batch layout -------------------------------------------------------------------------------------------------
def tnd_order(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, cumulative query tokens per request int32 [B]): the batch's tokens sorted by (request, position), as
    TND operators take them; out[order] = result puts results back."""
    key = batch.token_req.long() * (1 << 40) + batch.positions.long()
    order = torch.argsort(key)
    counts = torch.zeros(batch.block_table.shape[0], dtype=torch.int64, device=key.device)
    counts.scatter_add_(0, batch.token_req.long(), torch.ones_like(batch.token_req, dtype=torch.int64))
    return order, torch.cumsum(counts, 0).to(torch.int32)


def _table(batch) -> torch.Tensor:
    """int32 block table with its −1 (no page) entries as 0: the operators read only the pages a length covers."""
    return batch.block_table.clamp(min=0).to(torch.int32).contiguous()


def slots_to_positions(slots: torch.Tensor, batch, n_pages: int) -> torch.Tensor:
    """Physical slots [T, K] → the key positions they hold in their request (−1 for −1, out of range, or a page not in
    the batch's block table). A page shared by several requests (prefix cache) holds the same positions in each."""
    P = batch.page_size
    table = batch.block_table.long()
    column = torch.full((n_pages + 1,), -1, dtype=torch.long, device=slots.device)
    cols = torch.arange(table.shape[1], device=slots.device).expand_as(table)
    column.scatter_(0, torch.where(table >= 0, table, torch.full_like(table, n_pages)).view(-1), cols.reshape(-1))
    column[n_pages] = -1
    s = slots.long()
    ok = (s >= 0) & (s < n_pages * P)
    page = torch.where(ok, s // P, torch.full_like(s, n_pages))
    col = column[page]
    return torch.where(ok & (col >= 0), col * P + s % P, torch.full_like(s, -1))


def positions_to_slots(pos: torch.Tensor, rows_table: torch.Tensor, page_size: int) -> torch.Tensor:
    ok = pos >= 0
    p = torch.where(ok, pos, torch.zeros_like(pos)).long()
    pages = torch.gather(rows_table.long(), 1, (p // page_size).clamp(max=rows_table.shape[1] - 1))
    return torch.where(ok, pages * page_size + p % page_size, torch.full_like(p, -1)).to(torch.int32)


def valid_first(idx: torch.Tensor) -> torch.Tensor:
    """Each row's valid (≥ 0) entries first, in their order, −1 after (the attention operator's requirement)."""
    invalid = (idx < 0).to(torch.int8)
    order = torch.argsort(invalid, dim=1, stable=True)
    return torch.gather(idx, 1, order)


# ---- indexer and attention ----------------------------------------------------------------------------------------
def page_problem(page_size: int) -> str:
    if page_size % PAGE_MULTIPLE or page_size > PAGE_MAX:
        return f"Ascend's paged operators take pages of a multiple of {PAGE_MULTIPLE} up to {PAGE_MAX} tokens"
    return ""


def indexer_unsupported(q, index_cache, batch, topk: int) -> str:
    if index_cache.dtype == torch.uint8:
        return "the lightning indexer reads bf16/fp16 keys (--indexer-precision exact)"
    if q.dtype not in (torch.bfloat16, torch.float16):
        return "the lightning indexer runs bf16/fp16"
    if not 1 <= topk <= MAX_SPARSE:
        return f"the lightning indexer selects 1-{MAX_SPARSE} keys, the model {topk}"
    return page_problem(batch.page_size)


def indexer_topk(q, head_weights, index_cache, batch, softmax_scale: float, topk: int) -> torch.Tensor:
    T, H, D = q.shape
    order, cu = tnd_order(batch)
    pages, P = index_cache.shape[0], index_cache.shape[1]
    weights = (head_weights.float() * softmax_scale).to(q.dtype)
    picks, _ = op("npu_lightning_indexer")(
        q[order].contiguous(), index_cache.view(pages, P, 1, D), weights[order].contiguous(),
        actual_seq_lengths_query=cu, actual_seq_lengths_key=batch.kv_lens.to(torch.int32), block_table=_table(batch),
        layout_query="TND", layout_key="PA_BSND", sparse_count=topk, sparse_mode=3)
    rows_table = batch.block_table[batch.token_req[order]]
    out = torch.empty(T, topk, dtype=torch.int32, device=q.device)
    out[order] = positions_to_slots(picks.view(T, topk), rows_table, P)
    return out


def attention_unsupported(q, latent_cache, batch) -> str:
    from dsv32.core.kv_cache import SplitLatent

    if not isinstance(latent_cache, SplitLatent):
        return "sparse flash attention reads the split latent layout"
    if q.dtype not in (torch.bfloat16, torch.float16):
        return "sparse flash attention runs bf16/fp16"
    if batch is None:
        return "no batch metadata (block table) given"
    return page_problem(batch.page_size)


def sparse_attention(q, latent_cache, topk_slots, softmax_scale: float, kv_lora_rank: int, batch) -> torch.Tensor:
    T, H, _ = q.shape
    L = kv_lora_rank
    nope, rope = latent_cache.nope, latent_cache.rope
    pos = valid_first(slots_to_positions(topk_slots, batch, nope.shape[0]).to(torch.int32))
    order, cu = tnd_order(batch)
    qs = q[order]
    out = op("npu_sparse_flash_attention")(
        qs[..., :L].contiguous(), nope, nope, pos[order].view(T, 1, -1).contiguous(), softmax_scale,
        block_table=_table(batch), actual_seq_lengths_query=cu, actual_seq_lengths_kv=batch.kv_lens.to(torch.int32),
        query_rope=qs[..., L:].contiguous(), key_rope=rope, sparse_block_size=1, layout_query="TND",
        layout_kv="PA_BSND", sparse_mode=3, attention_mode=2)[0]
    result = torch.empty(T, H, L, dtype=q.dtype, device=q.device)
    result[order] = out.view(T, H, L).to(q.dtype)
    none = (pos < 0).all(dim=1)
    return torch.where(none[:, None, None], torch.zeros((), dtype=q.dtype, device=q.device), result)


def mla_kv_write(kv, kv_lora_rank, norm_weight, eps, positions, cos_sin, latent_cache, slots) -> None:
    keep = slots >= 0
    kv, positions, slots = kv[keep], positions[keep], slots[keep]
    T = kv.shape[0]
    if T == 0:
        return
    R = kv.shape[1] - kv_lora_rank
    cs = cos_sin[positions].to(kv.dtype)
    cos = cs[:, :R // 2].repeat_interleave(2, dim=-1).view(T, 1, 1, R)
    sin = cs[:, R // 2:].repeat_interleave(2, dim=-1).view(T, 1, 1, R)
    op("npu_kv_rmsnorm_rope_cache")(kv.contiguous().view(T, 1, 1, kv.shape[1]), norm_weight.to(kv.dtype), cos, sin,
                                    slots.long(), latent_cache.rope, latent_cache.nope, epsilon=eps, cache_mode="PA")


# ---- MoE ----------------------------------------------------------------------------------------------------------
def route_unsupported(num_experts: int, n_group: int, renormalize: bool) -> str:
    if not renormalize:
        return "npu_moe_gating_top_k renormalizes the selected weights (renorm 0 only)"
    if num_experts > 2048 or num_experts % n_group or num_experts // n_group <= 2:
        return f"npu_moe_gating_top_k takes ≤ 2048 experts in groups of more than 2 (got {num_experts} / {n_group})"
    return ""


def moe_route(router_logits, correction_bias, n_group, topk_group, top_k, routed_scaling_factor):
    x = router_logits.float()
    w, ids, _ = op("npu_moe_gating_top_k")(x, top_k, bias=correction_bias.to(x.dtype), k_group=topk_group,
                                           group_count=n_group, group_select_mode=1, renorm=0, norm_type=1,
                                           routed_scaling_factor=routed_scaling_factor, eps=1e-20)
    return w.float(), ids.long()


def prepare_experts(gate, up, down, dtype):
    """(gate_up [E, K, 2I], down [E, I, K]) in x · W form, with per-channel scales [E, 2I] / [E, K] for int8."""
    from dsv32.core.ops import LinearWeight

    int8 = gate.weight.dtype == torch.int8
    w13 = torch.cat([gate.weight, up.weight], dim=1)
    if int8:
        s13 = torch.cat([gate.scale_inv, up.scale_inv], dim=1).view(w13.shape[0], -1).float()
        return (LinearWeight(w13.transpose(1, 2).contiguous(), s13, (1, w13.shape[2])),
                LinearWeight(down.weight.transpose(1, 2).contiguous(), down.scale_inv.view(down.weight.shape[0], -1)
                             .float(), (1, down.weight.shape[2])))
    return (LinearWeight(w13.to(dtype).transpose(1, 2).contiguous()),
            LinearWeight(down.weight.to(dtype).transpose(1, 2).contiguous()))


def moe_experts(x, gate_up, down, topk_weights, topk_ids, num_experts: int) -> torch.Tensor:
    T, K = x.shape
    top_k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    kept = order[flat[order] < num_experts]  # ids = E: another rank's expert
    tokens = kept // top_k
    counts = torch.zeros(num_experts, dtype=torch.int64, device=x.device)
    counts.scatter_add_(0, flat[kept], torch.ones_like(kept))
    xs = x[tokens].contiguous()
    gm = op("npu_grouped_matmul")
    common = dict(group_list=counts, split_item=3, group_type=0, group_list_type=1)
    if gate_up.weight.dtype == torch.int8:
        xq, xscale = op("npu_dynamic_quant")(xs)
        h = gm([xq], [gate_up.weight], output_dtype=torch.int32, **common)[0]
        a, ascale = op("npu_dequant_swiglu_quant")(h, weight_scale=gate_up.scale_inv, activation_scale=xscale,
                                                   group_index=counts, activate_left=True, quant_mode=1)
        y = gm([a], [down.weight], scale=[down.scale_inv], per_token_scale=[ascale], output_dtype=x.dtype, **common)[0]
    else:
        h = gm([xs], [gate_up.weight], **common)[0]
        y = gm([op("npu_swiglu")(h, dim=-1)], [down.weight], **common)[0]
    out = torch.zeros(T, K, dtype=torch.float32, device=x.device)
    out.index_add_(0, tokens, y.float() * topk_weights.reshape(-1)[kept].float()[:, None])
    return out.to(x.dtype)


# ---- linears and RMSNorm ------------------------------------------------------------------------------------------
def int8_linear(x, w) -> torch.Tensor:
    """w: int8 weight [N, K] (a transposed view of [K, N] storage) with scale_inv [N, 1]."""
    shape = x.shape
    xq, xscale = op("npu_dynamic_quant")(x.reshape(-1, shape[-1]).contiguous())
    y = op("npu_quant_matmul")(xq, w.weight.t(), w.scale_inv.view(-1), pertoken_scale=xscale, output_dtype=x.dtype)
    return y.view(*shape[:-1], w.weight.shape[0])


def rms_norm(x, weight, eps, residual=None):
    w = weight.to(x.dtype)
    if residual is None:
        return op("npu_rms_norm")(x, w, epsilon=eps)[0]
    y, _, summed = op("npu_add_rms_norm")(x, residual, w, epsilon=eps)
    return y, summed
