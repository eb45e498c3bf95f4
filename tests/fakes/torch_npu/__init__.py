"""A fake `torch_npu` for contract tests (CPU, torch): the operators dsv32's Ascend adapters call, with the schemas of
torch-npu 2.14.0 (tests/backends/test_npu_api.py checks both against the newest wheel's
npu_native_functions_by_codegen.yaml) and the semantics its documentation (_op_plugin_docs.py) states, written here
independently of dsv32's reference backend. Where the documentation is silent this fake encodes an assumption (marked
ASSUMED), which only Ascend hardware can confirm. Hazards modelled: rows of sparse attention without a key come out
NaN; the attention's indices must list valid entries first; block sizes outside the documented range are refused."""

import torch
import torch.nn.functional as F

_BIG = 9223372036854775807


def _pages(block_table, b, positions, block_size):
    p = positions.long()
    return block_table[b, p // block_size].long(), p % block_size


def _check_pa(block_size):
    assert block_size % 16 == 0 and block_size <= 1024, "PA_BSND blocks: a multiple of 16, at most 1024"


def npu_lightning_indexer(query, key, weights, *, actual_seq_lengths_query=None, actual_seq_lengths_key=None,
                          block_table=None, layout_query="BSND", layout_key="BSND", sparse_count=2048, sparse_mode=3,
                          pre_tokens=_BIG, next_tokens=_BIG, return_value=False):
    """TND query [T, N1, D], PA_BSND key [blocks, block_size, N2=1, D]: for the tokens of batch b (rows
    [cu[b-1], cu[b]) of the running sum actual_seq_lengths_query), rightDownCausal: query i of n sees key positions
    0 .. kv_len − n + i. Score Σ_h weights[t, h] · relu(q[t, h] · k). Returns (indices [T, 1, sparse_count] int32:
    the positions of the best sparse_count keys, −1 after; values)."""
    assert layout_query == "TND" and layout_key == "PA_BSND" and sparse_mode == 3
    assert query.dtype in (torch.bfloat16, torch.float16) and key.dtype == query.dtype and weights.dtype == query.dtype
    assert actual_seq_lengths_query.dtype == actual_seq_lengths_key.dtype == block_table.dtype == torch.int32
    _check_pa(key.shape[1])
    assert 1 <= sparse_count <= 2048
    T = query.shape[0]
    out = torch.full((T, 1, sparse_count), -1, dtype=torch.int32)
    vals = torch.full((T, 1, sparse_count), float("-inf"))
    start = 0
    for b, end in enumerate(actual_seq_lengths_query.tolist()):
        n, kv_len = end - start, int(actual_seq_lengths_key[b])
        if n and kv_len:
            pages, offs = _pages(block_table, b, torch.arange(kv_len), key.shape[1])
            k = key[pages, offs, 0].float()
            for i in range(n):
                t = start + i
                visible = kv_len - n + i + 1
                s = (torch.relu(query[t].float() @ k[:visible].T) * weights[t].float()[:, None]).sum(0)
                top = s.topk(min(sparse_count, visible))
                out[t, 0, :top.indices.numel()] = top.indices.to(torch.int32)
                vals[t, 0, :top.values.numel()] = top.values
        start = end
    return out, vals


def npu_sparse_flash_attention(query, key, value, sparse_indices, scale_value, *, block_table=None,
                               actual_seq_lengths_query=None, actual_seq_lengths_kv=None, query_rope=None,
                               key_rope=None, sparse_block_size=1, layout_query="BSND", layout_kv="BSND", sparse_mode=3,
                               pre_tokens=_BIG, next_tokens=_BIG, attention_mode=0, return_softmax_lse=False,
                               sinks=None):
    """Absorbed MLA (attention_mode 2) over selected key positions: out[t] = softmax(scale · (q·k + q_rope·k_rope))
    · v over sparse_indices[t] (positions of the token's batch, valid entries first; under sparse_mode 3 positions
    past the token's causal limit are masked). key / value [blocks, block_size, 1, D], key_rope [.., R]. A row with no
    key is NaN. Returns (out [T, N, D], softmax max, softmax sum)."""
    assert layout_query == "TND" and layout_kv == "PA_BSND" and attention_mode == 2 and sparse_block_size == 1
    assert sparse_mode in (0, 3) and query_rope is not None and key_rope is not None
    assert sparse_indices.dtype == torch.int32 and sparse_indices.dim() == 3
    _check_pa(key.shape[1])
    valid = sparse_indices >= 0
    assert not (valid[..., 1:] & ~valid[..., :-1]).any(), "valid indices must come first in each row"
    T, N, D = query.shape
    out = torch.full((T, N, value.shape[-1]), float("nan"), dtype=query.dtype)
    start = 0
    for b, end in enumerate(actual_seq_lengths_query.tolist()):
        n, kv_len = end - start, int(actual_seq_lengths_kv[b])
        for i in range(n):
            t = start + i
            pos = sparse_indices[t, 0][valid[t, 0]].long()
            if sparse_mode == 3:
                pos = pos[pos <= kv_len - n + i]
            if pos.numel() == 0:
                continue
            pages, offs = _pages(block_table, b, pos, key.shape[1])
            k, kr, v = key[pages, offs, 0].float(), key_rope[pages, offs, 0].float(), value[pages, offs, 0].float()
            s = (query[t].float() @ k.T + query_rope[t].float() @ kr.T) * scale_value
            out[t] = (torch.softmax(s, -1) @ v).to(query.dtype)
        start = end
    return out, torch.empty(0), torch.empty(0)


def npu_kv_rmsnorm_rope_cache(kv, gamma, cos, sin, index, k_cache, ckv_cache, *, k_rope_scale=None, c_kv_scale=None,
                              k_rope_offset=None, c_kv_offset=None, v=None, epsilon=1e-5, cache_mode="Norm",
                              is_output_kv=False):
    """kv [B, 1, S, L+R]: c = RMSNorm(kv[..., :L]) · gamma into ckv_cache [blocks, bs, 1, L] and the RoPE of
    kv[..., L:] into k_cache [blocks, bs, 1, R], at slots `index` (cache_mode "PA"). ASSUMED: RoPE pairs x[2i] with
    x[2i+1] (DeepSeek's MLA) with cos / sin given per element [B, 1, S, R]."""
    assert cache_mode == "PA" and kv.dim() == 4 and cos.dim() == 4 and gamma.dim() == 1
    L, R = gamma.shape[0], cos.shape[-1]
    x = kv.reshape(-1, L + R).float()
    c = x[:, :L] * torch.rsqrt(x[:, :L].pow(2).mean(-1, keepdim=True) + epsilon) * gamma.float()
    pe, cs, sn = x[:, L:], cos.reshape(-1, R).float(), sin.reshape(-1, R).float()
    even, odd = pe[:, 0::2], pe[:, 1::2]
    rot = torch.stack([-odd, even], dim=-1).reshape(pe.shape)
    k_pe = pe * cs + rot * sn
    ckv_cache.view(-1, L)[index] = c.to(ckv_cache.dtype)
    k_cache.view(-1, R)[index] = k_pe.to(k_cache.dtype)
    return k_cache, ckv_cache, k_pe.to(kv.dtype), c.to(kv.dtype)


def npu_moe_gating_top_k(x, k, *, bias=None, input_ids=None, tid2eid=None, k_group=1, group_count=1,
                         group_select_mode=0, renorm=0, norm_type=0, out_flag=False, routed_scaling_factor=1.0,
                         eps=1e-20):
    """norm first (norm_type 1: sigmoid), then grouped top-k on norm + bias (group_select_mode 1: a group scores the
    sum of its two best; the other groups are out), y = the norm values of the k experts, normalized (÷ sum + eps) and
    · routed_scaling_factor. Returns (y, expert ids int32, norm)."""
    assert renorm == 0 and norm_type == 1 and group_select_mode == 1 and input_ids is None and tid2eid is None
    assert bias is not None and bias.dtype == x.dtype and x.shape[-1] <= 2048
    T, E = x.shape
    norm = x.float().sigmoid()
    choice = norm + bias.float()
    groups = choice.view(T, group_count, -1).topk(2, dim=-1).values.sum(-1)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(k_group, dim=-1).indices, True)
    choice = choice.masked_fill(~keep.repeat_interleave(E // group_count, dim=1), float("-inf"))
    ids = choice.topk(k, dim=-1).indices
    y = norm.gather(1, ids)
    y = y / (y.sum(-1, keepdim=True) + eps) * routed_scaling_factor
    return y.to(x.dtype), ids.to(torch.int32), norm


def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None, antiquant_offset=None,
                       per_token_scale=None, group_list=None, activation_input=None, activation_quant_scale=None,
                       activation_quant_offset=None, split_item=0, group_type=None, group_list_type=0, act_type=0,
                       tuning_config=None, output_dtype=None, x_dtype=None, weight_dtype=None, scale_dtype=None,
                       per_token_scale_dtype=None):
    """split_item 3, group_type 0 (groups of rows): y = x_g · weight[g] for the rows of group g (group_list: counts
    when group_list_type 1, running sums when 0); int8 with scale / per_token_scale: y = (x·w) · scale[g] ·
    per_token_scale; output_dtype int32: the raw int32 products."""
    assert split_item == 3 and group_type == 0 and len(x) == len(weight) == 1
    a, w = x[0], weight[0]
    counts = group_list.long() if group_list_type == 1 else torch.diff(group_list.long(), prepend=torch.zeros(1, dtype=torch.long))
    assert counts.numel() == w.shape[0] and int(counts.sum()) <= a.shape[0]
    int8 = a.dtype == torch.int8
    out_dtype = output_dtype if output_dtype is not None else (torch.int8 if int8 else a.dtype)
    y = torch.zeros(a.shape[0], w.shape[2], dtype=torch.float64 if int8 else torch.float32)
    row = 0
    for g, n in enumerate(counts.tolist()):
        part = a[row:row + n].double() @ w[g].double() if int8 else a[row:row + n].float() @ w[g].float()
        if scale is not None:
            part = part * scale[0][g].double() * per_token_scale[0][row:row + n].double()[:, None]
        y[row:row + n] = part
        row += n
    return [y.to(out_dtype)]


def npu_swiglu(self, dim=-1):
    """swish(A) · B with A, B the halves of the input along dim."""
    a, b = self.chunk(2, dim=dim)
    return (F.silu(a.float()) * b.float()).to(self.dtype)


def _quant_rows(v):
    scale = v.abs().amax(-1).clamp(min=1e-12) / 127.0
    return torch.round(v / scale[:, None]).clamp(-128, 127).to(torch.int8), scale.float()


def npu_dequant_swiglu_quant(x, *, weight_scale=None, activation_scale=None, bias=None, quant_scale=None,
                             quant_offset=None, group_index=None, activate_left=False, quant_mode=0, dst_type=None,
                             round_mode=None, activate_dim=None, swiglu_mode=0, clamp_limit=7.0, glu_alpha=1.702,
                             glu_bias=1.0):
    """int32 x [T, 2H] of the groups in group_index (counts): dequantized by weight_scale[group] [2H] and
    activation_scale [T], SwiGLU (activate_left: swish of the left half times the right), then per-token dynamic
    int8 (quant_mode 1). Returns (y int8 [T, H], scale [T])."""
    assert x.dtype == torch.int32 and quant_mode == 1 and group_index is not None and swiglu_mode == 0
    groups = torch.repeat_interleave(torch.arange(group_index.numel()), group_index.long())
    rows = groups.numel()
    v = x[:rows].double() * weight_scale.double()[groups] * activation_scale[:rows].double()[:, None]
    a, b = v.chunk(2, dim=-1)
    h = F.silu(a) * b if activate_left else F.silu(b) * a
    y, s = _quant_rows(h)
    return torch.cat([y, torch.zeros(x.shape[0] - rows, y.shape[1], dtype=torch.int8)]), \
        torch.cat([s, torch.zeros(x.shape[0] - rows)])


def npu_dynamic_quant(input, *, smooth_scales=None, group_index=None, dst_type=None, quant_mode="pertoken",  # noqa: A002
                      dst_type_max=0.0):
    """Per-token symmetric int8: scale = rowmax|x| / 127, y = round(x / scale)."""
    assert smooth_scales is None and group_index is None and input.dtype in (torch.bfloat16, torch.float16)
    y, s = _quant_rows(input.reshape(-1, input.shape[-1]).double())
    return y.view(input.shape), s.view(input.shape[:-1])


def npu_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None, x1_dtype=None,
                     x2_dtype=None, pertoken_scale_dtype=None, scale_dtype=None, group_sizes=None, y_scale=None):
    """(x1 int8 [M, K] · x2 int8 [K, N]) · scale [N] · pertoken_scale [M] in output_dtype."""
    assert x1.dtype == x2.dtype == torch.int8 and offset is None and bias is None
    y = (x1.double() @ x2.double()) * scale.double()[None, :]
    if pertoken_scale is not None:
        y = y * pertoken_scale.double()[:, None]
    return y.to(output_dtype or torch.int8)


def npu_rms_norm(self, gamma, epsilon=1e-06):
    """(y, rstd): y = x · rsqrt(mean(x²) + eps) · gamma, computed in fp32."""
    x = self.float()
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + epsilon)
    return (x * rstd * gamma.float()).to(self.dtype), rstd


def npu_add_rms_norm(x1, x2, gamma, epsilon=1e-06):
    """(rms_norm(x1 + x2), rstd, x1 + x2)."""
    x = x1 + x2
    y, rstd = npu_rms_norm(x, gamma, epsilon)
    return y, rstd, x
