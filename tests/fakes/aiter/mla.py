"""aiter.mla.mla_decode_fwd (fake): paged MLA decode, one query per sequence here (qo_indptr)."""

import torch


def mla_decode_fwd(q, kv_buffer, o, qo_indptr, kv_indptr, kv_indices, kv_last_page_lens, max_seqlen_q, sm_scale=None,
                   logit_cap=0.0, num_kv_splits=None, num_kv_splits_indptr=None, work_meta_data=None,
                   work_indptr=None, work_info_set=None, reduce_indptr=None, reduce_final_map=None,
                   reduce_partial_map=None, q_scale=None, kv_scale=None):
    """o[qo_indptr[b]:qo_indptr[b+1]] ← softmax(sm_scale · q·kᵀ) · v per sequence b, where the sequence's keys are the
    pages kv_indices[kv_indptr[b]:kv_indptr[b+1]] of kv_buffer [pages, page_size, 1, Dq] (the last page holding
    kv_last_page_lens[b] tokens) and v = k[:, :o.shape[-1]]. A sequence without keys is left NaN (undefined on the
    GPU). Returns (logits, lse) as aiter does; dsv32 reads o."""
    assert logit_cap <= 0 and q_scale is None and kv_scale is None
    num_page, page_size, nhead_kv, dq = kv_buffer.shape
    assert nhead_kv == 1 and q.shape[-1] == dq and q.dtype == kv_buffer.dtype == torch.bfloat16
    assert qo_indptr.dtype == kv_indptr.dtype == kv_indices.dtype == kv_last_page_lens.dtype == torch.int32
    total_s, nhead, dv = o.shape
    assert nhead in (16, 128), "bf16 MLA decode kernels exist for 16 and 128 heads"
    sm_scale = dq**-0.5 if sm_scale is None else sm_scale
    flat = kv_buffer.view(num_page * page_size, dq).float()
    lse = torch.full((total_s, nhead), float("nan"))
    for b in range(qo_indptr.numel() - 1):
        q0, q1 = int(qo_indptr[b]), int(qo_indptr[b + 1])
        assert q1 - q0 <= max_seqlen_q
        pages = kv_indices[int(kv_indptr[b]):int(kv_indptr[b + 1])].long()
        if pages.numel() == 0:
            o[q0:q1] = float("nan")
            continue
        tokens = (pages[:, None] * page_size + torch.arange(page_size)).view(-1)
        tokens = tokens[:(pages.numel() - 1) * page_size + int(kv_last_page_lens[b])]
        k = flat[tokens]
        s = torch.einsum("thd,kd->thk", q[q0:q1].float(), k) * sm_scale
        p = torch.softmax(s, -1)
        o[q0:q1] = torch.einsum("thk,kd->thd", p, k[:, :dv]).to(o.dtype)
        lse[q0:q1] = torch.logsumexp(s, -1)
    return o.view(total_s, 1, nhead, dv), lse
