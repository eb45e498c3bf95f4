"""TritonOps: the ops the Triton kernels cover; everything else falls back to the reference backend through the
registry (each fallback logged once and listed by `dsv32 env`)."""

from __future__ import annotations

from dsv32.core.ops import Ops, causal_slots


class TritonOps(Ops):
    name = "triton"

    def rms_norm(self, x, weight, eps, residual=None):
        from dsv32.backends.triton.elementwise import rms_norm

        return rms_norm(x, weight, eps, residual)

    def rotary_embedding(self, x, positions, cos_sin, interleaved):
        from dsv32.backends.triton.rope import rotary_embedding

        return rotary_embedding(x, positions, cos_sin, interleaved)

    def mla_kv_write(self, kv, kv_lora_rank, norm_weight, eps, positions, cos_sin, latent_cache, slots):
        from dsv32.backends.triton.rope import mla_kv_write

        mla_kv_write(kv, kv_lora_rank, norm_weight, eps, positions, cos_sin, latent_cache, slots)

    def silu_and_mul(self, x):
        from dsv32.backends.triton.elementwise import silu_and_mul

        return silu_and_mul(x)

    def sparse_mla_attention(self, q, latent_cache, topk_slots, softmax_scale, kv_lora_rank, batch=None):
        from dsv32.backends.triton.attention import sparse_mla_attention

        return sparse_mla_attention(q, latent_cache, topk_slots, softmax_scale, kv_lora_rank)

    def dense_mla_attention(self, q, latent_cache, batch, softmax_scale, kv_lora_rank):
        return self.sparse_mla_attention(q, latent_cache, causal_slots(batch), softmax_scale, kv_lora_rank, batch)
