"""Reference backend: every op in plain PyTorch, on any device. The executable specification.

Written for clarity and for bit-level agreement with transformers where that is cheap (same op order);
not for speed. FP8 weights are dequantized once at load.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dsv32.core.fp4 import dequantize_fp4, qdq_mxfp4
from dsv32.core.kv_cache import SplitLatent, index_key_bytes, latent_entry_bytes, latent_scale_blocks
from dsv32.core.ops import AttnMetadata, ExpertWeights, LinearWeight, Ops, causal_slots
from dsv32.core.platform import Platform

MAX_BLOCK_ELEMS = 1 << 26  # largest temporary the reference materializes at once (attention, indexer scores)


def _fp8_scale(amax: torch.Tensor, ue8m0: bool, fp8_max: float) -> torch.Tensor:
    scale = amax.float().clamp(min=1e-4) / fp8_max
    if ue8m0:
        scale = torch.pow(2.0, torch.ceil(torch.log2(scale)))
    return scale


def _dequant_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype) -> torch.Tensor:
    """W[.., n, k] = weight[.., n, k] · scale_inv[.., n // bn, k // bk] (last row/col blocks may be partial)."""
    bn, bk = block
    n, k = weight.shape[-2:]
    s = scale_inv.float().repeat_interleave(bn, dim=-2)[..., :n, :].repeat_interleave(bk, dim=-1)[..., :k]
    return (weight.float() * s).to(dtype)


def _act(x: torch.Tensor, w: LinearWeight) -> torch.Tensor:
    """The activations a product with w sees: x, or x rounded through dynamic MXFP4 for W4A4 MXFP4 weights."""
    return qdq_mxfp4(x) if w.act == "mxfp4" else x


class ReferenceOps(Ops):
    """fp8_dtype: the e4m3 variant its fp8 ops produce and read (float8_e4m3fn, or float8_e4m3fnuz: the oracle of a
    backend whose platform computes in fnuz; as a fallback it takes its backend's)."""

    name = "reference"

    def __init__(self, device: torch.device | str = "cpu", fp8_dtype: torch.dtype = torch.float8_e4m3fn):
        super().__init__(device)
        self.fp8_dtype = fp8_dtype

    def platform(self) -> Platform:
        # the oracle reads and writes every layout, on whatever device it runs
        return Platform(device_type=self.device.type, fp8_dtype=self.fp8_dtype, latent_layouts=("combined", "split"),
                        collective_backend={"cuda": "nccl", "npu": "hccl"}.get(self.device.type, "gloo"),
                        graphs="the reference backend runs eagerly")

    # ---- weights ------------------------------------------------------------------------------------
    def dequantize(self, w: LinearWeight, dtype: torch.dtype) -> torch.Tensor:
        if w.is_fp4:
            return dequantize_fp4(w.weight, w.scale_inv, w.fmt, w.global_scale, dtype)
        if w.scale_inv is None:
            return w.weight.to(dtype)
        return _dequant_blocks(w.weight, w.scale_inv, w.block, dtype)

    def prepare_linear(self, w: LinearWeight, dtype: torch.dtype) -> LinearWeight:
        return LinearWeight(self.dequantize(w, dtype), act=w.act)  # (act: W4A4 checkpoints' activation rounding)

    def prepare_experts(self, w: ExpertWeights, dtype: torch.dtype) -> ExpertWeights:
        gate_up = torch.cat([self.dequantize(w.gate, dtype), self.dequantize(w.up, dtype)], dim=-2)
        return ExpertWeights(None, None, self.prepare_linear(w.down, dtype), gate_up=LinearWeight(gate_up, act=w.gate.act))

    def linear(self, x: torch.Tensor, w: LinearWeight) -> torch.Tensor:
        weight = w.weight if w.scale_inv is None and not w.is_fp4 else self.dequantize(w, x.dtype)
        return F.linear(_act(x, w), weight.to(x.dtype))

    # ---- elementwise / norms ------------------------------------------------------------------------
    def rms_norm(self, x, weight, eps, residual=None):
        if residual is not None:
            x = x + residual
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        y = weight * h.to(x.dtype)
        return (y, x) if residual is not None else y

    def layer_norm(self, x, weight, bias, eps):
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)

    def silu_and_mul(self, x):
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rotary_embedding(self, x, positions, cos_sin, interleaved):
        half = x.shape[-1] // 2
        cs = cos_sin[positions].to(x.dtype)
        cos, sin = cs[:, None, :half], cs[:, None, half:]
        if interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]
            out = torch.empty_like(x)
            out[..., 0::2] = x1 * cos - x2 * sin
            out[..., 1::2] = x2 * cos + x1 * sin
            return out
        x1, x2 = x[..., :half], x[..., half:]
        cos2, sin2 = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
        return x * cos2 + torch.cat([-x2, x1], dim=-1) * sin2

    def hadamard_transform(self, x):
        d = x.shape[-1]
        if d & (d - 1):
            raise ValueError(f"hadamard_transform needs a power-of-two width, got {d}")
        h = x.float().reshape(-1, d)
        step = 1
        while step < d:  # Sylvester butterfly: pairs (i, i+step) within blocks of 2·step
            h = h.view(-1, d // (2 * step), 2, step)
            a, b = h[:, :, 0, :], h[:, :, 1, :]
            h = torch.stack([a + b, a - b], dim=2).reshape(-1, d)
            step *= 2
        return (h * d**-0.5).view(x.shape).to(x.dtype)

    def quantize_fp8(self, x, block, ue8m0=True):
        d = x.shape[-1]
        nb = math.ceil(d / block)
        pad = nb * block - d
        xf = F.pad(x.float(), (0, pad)).view(*x.shape[:-1], nb, block)
        fp8, fp8_max = self.fp8_format()
        scale = _fp8_scale(xf.abs().amax(-1), ue8m0, fp8_max)
        q = (xf / scale[..., None]).clamp(-fp8_max, fp8_max).to(fp8)
        return q.view(*x.shape[:-1], nb * block)[..., :d], scale

    # ---- KV cache -----------------------------------------------------------------------------------
    def write_latent_cache(self, latent_cache, latent, k_pe, slots):
        keep = slots >= 0
        slots, latent, k_pe = slots[keep], latent[keep], k_pe[keep]
        if isinstance(latent_cache, SplitLatent):
            latent_cache.nope.view(-1, latent.shape[-1])[slots] = latent.to(latent_cache.nope.dtype)
            latent_cache.rope.view(-1, k_pe.shape[-1])[slots] = k_pe.to(latent_cache.rope.dtype)
            return
        flat = latent_cache.view(-1, latent_cache.shape[-1])
        if latent_cache.dtype != torch.uint8:
            flat[slots] = torch.cat([latent, k_pe], dim=-1).to(flat.dtype)
            return
        L, R = latent.shape[-1], k_pe.shape[-1]
        nb = latent_scale_blocks(L)
        assert flat.shape[-1] == latent_entry_bytes(L, R)
        q, scale = self.quantize_fp8(latent, 128, ue8m0=True)
        entry = torch.cat([
            q.view(torch.uint8),
            scale.view(-1, nb).contiguous().view(torch.uint8),
            k_pe.to(torch.bfloat16).contiguous().view(torch.uint8),
        ], dim=-1)
        flat[slots] = entry

    def mla_kv_write(self, kv, kv_lora_rank, norm_weight, eps, positions, cos_sin, latent_cache, slots):
        L = kv_lora_rank
        c = self.rms_norm(kv[:, :L], norm_weight, eps)
        k_pe = self.rotary_embedding(kv[:, None, L:], positions, cos_sin, interleaved=True)[:, 0]
        self.write_latent_cache(latent_cache, c, k_pe, slots)

    def read_latent(self, latent_cache: torch.Tensor, slots: torch.Tensor, L: int, R: int, dtype) -> torch.Tensor:
        """Gather [n, L+R] entries (dequantized for the fp8 pool). Helper, not part of the interface."""
        if isinstance(latent_cache, SplitLatent):
            return torch.cat([latent_cache.nope.view(-1, L)[slots], latent_cache.rope.view(-1, R)[slots]], -1).to(dtype)
        flat = latent_cache.view(-1, latent_cache.shape[-1])
        e = flat[slots]
        if latent_cache.dtype != torch.uint8:
            return e.to(dtype)
        nb = latent_scale_blocks(L)
        c = e[:, :L].contiguous().view(self.fp8_dtype).float()
        scale = e[:, L:L + 4 * nb].contiguous().view(torch.float32)
        c = c * scale.repeat_interleave(128, dim=-1)[:, :L]  # scale j covers elements 128j..128j+127
        k_pe = e[:, L + 4 * nb:].contiguous().view(torch.bfloat16).float()
        return torch.cat([c, k_pe], dim=-1).to(dtype)

    @staticmethod
    def _index_key_addresses(index_cache: torch.Tensor, slots: torch.Tensor, d: int):
        """Byte offsets into the flat fp8 index pool of each slot's d key bytes and 4 scale bytes (keys of a page
        first, then its scales)."""
        page_bytes = index_cache.shape[1]
        page_size = page_bytes // index_key_bytes(d)
        page, off = slots // page_size, slots % page_size
        base = page[:, None] * page_bytes
        key_pos = base + off[:, None] * d + torch.arange(d, device=slots.device)
        scale_pos = base + page_size * d + off[:, None] * 4 + torch.arange(4, device=slots.device)
        return key_pos, scale_pos

    def write_index_keys(self, index_cache, keys, slots):
        keep = slots >= 0
        slots, keys = slots[keep], keys[keep]
        if index_cache.dtype != torch.uint8:
            index_cache.view(-1, index_cache.shape[-1])[slots] = keys.to(index_cache.dtype)
            return
        d = keys.shape[-1]
        q, scale = self.quantize_fp8(keys, d, ue8m0=True)
        key_pos, scale_pos = self._index_key_addresses(index_cache, slots, d)
        flat = index_cache.view(-1)
        flat[key_pos.reshape(-1)] = q.view(torch.uint8).reshape(-1)
        flat[scale_pos.reshape(-1)] = scale.view(-1).contiguous().view(torch.uint8)

    def read_index_keys(self, index_cache: torch.Tensor, slots: torch.Tensor, d: int):
        """Gather keys [n, d] (fp8 or float) and scales [n] fp32 (ones for float pools). Helper."""
        if index_cache.dtype != torch.uint8:
            k = index_cache.view(-1, d)[slots]
            return k, torch.ones(k.shape[0], dtype=torch.float32, device=k.device)
        key_pos, scale_pos = self._index_key_addresses(index_cache, slots, d)
        flat = index_cache.view(-1)
        k = flat[key_pos].contiguous().view(self.fp8_dtype)
        s = flat[scale_pos].contiguous().view(torch.float32).view(-1)
        return k, s

    # ---- indexer ------------------------------------------------------------------------------------
    def indexer_k_write(self, k, norm_weight, norm_bias, eps, positions, cos_sin, rope_dim, hadamard, index_cache,
                        slots):
        k = self.layer_norm(k, norm_weight, norm_bias, eps)
        k_rope = self.rotary_embedding(k[:, None, :rope_dim], positions, cos_sin, interleaved=False)[:, 0]
        k = torch.cat([k_rope, k[:, rope_dim:]], dim=-1)
        if hadamard:
            k = self.hadamard_transform(k)
        self.write_index_keys(index_cache, k, slots)

    def indexer_q_prepare(self, q, head_weights, positions, cos_sin, rope_dim, fp8):
        q_rope = self.rotary_embedding(q[..., :rope_dim], positions, cos_sin, interleaved=False)
        q = torch.cat([q_rope, q[..., rope_dim:]], dim=-1)
        if not fp8:
            return q, head_weights
        q, q_scale = self.quantize_fp8(self.hadamard_transform(q), block=q.shape[-1])
        return q, head_weights * q_scale[..., 0]

    @staticmethod
    def _slots_of(batch: AttnMetadata, req: int, n: int) -> torch.Tensor:
        pos = torch.arange(n, device=batch.block_table.device)
        pages = batch.block_table[req, pos // batch.page_size].long()
        return pages * batch.page_size + pos % batch.page_size

    def indexer_topk(self, q, head_weights, index_cache, batch, softmax_scale, topk):
        T = q.shape[0]
        out = torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
        d = q.shape[-1]
        for r, kv_len in enumerate(batch.kv_lens_cpu):
            rows = (batch.token_req == r).nonzero().flatten()
            if rows.numel() == 0 or kv_len == 0:
                continue
            slots = self._slots_of(batch, r, kv_len)
            k, k_scale = self.read_index_keys(index_cache, slots, d)
            k_sel = min(topk, kv_len)
            chunk = max(1, MAX_BLOCK_ELEMS // max(1, q.shape[1] * kv_len))  # bound the [rows, H, kv_len] scores
            for part in rows.split(chunk):
                pos = batch.positions[part]
                # Same op order and row layout (all kv_len keys, future ones at −inf, k = min(topk, kv_len)) as
                # transformers' indexer, so that ties (exact zeros after ReLU) break the same way.
                scores = torch.matmul(q[part].float().unsqueeze(0), k.float().T.unsqueeze(0).unsqueeze(1)) * softmax_scale
                scores = F.relu(scores) * k_scale
                index_scores = torch.matmul(head_weights[part].float().unsqueeze(-2).unsqueeze(0), scores).squeeze(-2)[0]
                future = torch.arange(kv_len, device=q.device)[None, :] > pos[:, None]
                idx = index_scores.masked_fill(future, float("-inf")).topk(k_sel, dim=-1).indices
                chosen = slots[idx]
                chosen[idx > pos[:, None]] = -1  # picked only because the row has fewer than k_sel keys
                out[part, :k_sel] = chosen.to(torch.int32)
        return out

    # ---- attention ----------------------------------------------------------------------------------
    def sparse_mla_attention(self, q, latent_cache, topk_slots, softmax_scale, kv_lora_rank, batch=None):
        T, H, D = q.shape
        # Query rows in chunks so the gathered [rows, K, L+R] block stays ≤ MAX_BLOCK_ELEMS at any size.
        rows = max(1, MAX_BLOCK_ELEMS // max(1, topk_slots.shape[1] * D))
        if T > rows:
            return torch.cat([self.sparse_mla_attention(q[i:i + rows], latent_cache, topk_slots[i:i + rows],
                                                        softmax_scale, kv_lora_rank) for i in range(0, T, rows)])
        L, R = kv_lora_rank, D - kv_lora_rank
        n_slots = latent_cache.shape[0] * latent_cache.shape[1]
        valid = (topk_slots >= 0) & (topk_slots < n_slots)
        safe = torch.where(valid, topk_slots, torch.zeros_like(topk_slots)).long()
        kv = self.read_latent(latent_cache, safe.view(-1), L, R, q.dtype).view(T, -1, L + R)
        scores = torch.einsum("thd,tkd->thk", q, kv) * softmax_scale
        scores = scores.float().masked_fill(~valid[:, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0).to(q.dtype)
        return torch.einsum("thk,tkl->thl", probs, kv[..., :L])

    def dense_mla_attention(self, q, latent_cache, batch, softmax_scale, kv_lora_rank):
        return self.sparse_mla_attention(q, latent_cache, causal_slots(batch), softmax_scale, kv_lora_rank, batch)

    # ---- MoE ----------------------------------------------------------------------------------------
    def moe_route(self, router_logits, correction_bias, n_group, topk_group, top_k, renormalize,
                  routed_scaling_factor):
        T, E = router_logits.shape
        scores = router_logits.float().sigmoid()
        choice = scores + correction_bias.float()
        group_scores = choice.view(T, n_group, E // n_group).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        ids = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        if renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * routed_scaling_factor, ids

    def moe_experts(self, x, experts, topk_weights, topk_ids):
        out = torch.zeros_like(x)
        w13, w2 = experts.gate_up.weight, experts.down.weight
        for e in torch.unique(topk_ids).tolist():  # ascending expert order, as transformers
            if e >= w2.shape[0]:
                continue  # another rank's expert
            tok, slot = torch.where(topk_ids == e)
            h = self.silu_and_mul(F.linear(_act(x[tok], experts.gate_up), w13[e].to(x.dtype)))
            h = F.linear(_act(h, experts.down), w2[e].to(x.dtype)) * topk_weights[tok, slot, None]
            out.index_add_(0, tok, h.to(out.dtype))
        return out

    # ---- sampling -----------------------------------------------------------------------------------
    def sample(self, logits, temperatures, top_ps, top_ks, min_ps, generators):
        out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
        for i in range(logits.shape[0]):
            probs = _sampling_probs(logits[i], temperatures[i], top_ps[i], top_ks[i], min_ps[i])
            out[i] = logits[i].argmax() if probs is None else torch.multinomial(probs, 1, generator=generators[i])[0]
        return out

    def verify(self, logits, drafts, temperatures, top_ps, top_ks, min_ps, generators):
        out = logits.argmax(dim=-1)  # greedy rows (one op for all of them)
        for i in (temperatures > 0).nonzero().flatten().tolist():  # host tensors: the sampled rows
            probs = _sampling_probs(logits[i], temperatures[i], top_ps[i], top_ks[i], min_ps[i])
            if probs is None:
                continue
            d, g = int(drafts[i]), generators[i]
            if d >= 0:
                u = torch.rand((), generator=g, device=probs.device) if g is not None else torch.rand((), device=probs.device)
                if u < probs[d]:
                    out[i] = d
                    continue
                rest = probs.clone()
                rest[d] = 0.0
                if float(rest.sum()) > 0.0:  # else p(d) was 1 and u < 1 accepted it (never here)
                    probs = rest / rest.sum()
            out[i] = torch.multinomial(probs, 1, generator=g)[0]
        return out


def _sampling_probs(logits: torch.Tensor, temperature, top_p, top_k, min_p) -> torch.Tensor | None:
    """One row's sampling distribution as `Ops.sample` defines it (temperature, top-k, top-p, min-p); None: greedy."""
    row = logits.float()
    t = float(temperature)
    if t <= 0.0:
        return None
    row = row / t
    k = int(top_k)
    if 0 < k < row.numel():
        kth = row.topk(k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    p = float(top_p)
    if p < 1.0:
        sorted_logits, order = row.sort(descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= p  # keep the smallest prefix reaching p
        row = row.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = row.softmax(-1)
    m = float(min_p)
    if m > 0.0:
        probs = probs.masked_fill(probs < m * probs.max(), 0.0)
        probs = probs / probs.sum()  # verify compares draws with p(draft): normalized
    return probs
