"""TritonOps: the ops the Triton kernels cover; everything else falls back to the reference backend through the
registry (each fallback logged once and listed by `dsv32 env`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv32.core.ops import LinearWeight, Ops, causal_slots


class TritonOps(Ops):
    name = "triton"

    # ---- weights and linear layers: bf16 through torch (cuBLAS / hipBLASLt), FP8-block through the Triton GEMM ----
    def prepare_linear(self, w, dtype):
        if w.is_fp8 and w.weight.dim() == 2 and w.weight.dtype == torch.float8_e4m3fn and tuple(w.block) == (128, 128):
            return LinearWeight(w.weight.contiguous(), w.scale_inv.float().contiguous(), (128, 128))
        if w.is_fp8:  # other block shapes: dequantized once, as the reference does
            from dsv32.backends.reference.ops import ReferenceOps

            return LinearWeight(ReferenceOps(self.device).dequantize(w, dtype))
        return LinearWeight(w.weight.to(dtype))

    def linear(self, x, w):
        if w.is_fp8:
            from dsv32.backends.triton.gemm import fp8_block_linear

            # activations quantized per token per 128 channels with power-of-two scales (V3.2's scale_fmt ue8m0)
            return fp8_block_linear(x, w.weight, w.scale_inv, ue8m0_act=True)
        return F.linear(x, w.weight.to(x.dtype))

    def fuse_linears(self, ws):
        """Concatenates along N: fp8 weights with their scale rows (each part but the last must fill whole
        128-row scale blocks), or plain weights of one dtype."""
        first = ws[0]
        if any(w.is_fp8 != first.is_fp8 or w.weight.dtype != first.weight.dtype or w.shape[1] != first.shape[1]
               for w in ws):
            return None
        if not first.is_fp8:
            return LinearWeight(torch.cat([w.weight for w in ws]))
        bn = first.block[0]
        if any(w.block != first.block for w in ws) or any(w.shape[0] % bn for w in ws[:-1]):
            return None
        return LinearWeight(torch.cat([w.weight for w in ws]), torch.cat([w.scale_inv for w in ws]), first.block)

    def quantize_fp8(self, x, block, ue8m0=True):
        from dsv32.backends.triton.quant import quantize_fp8

        return quantize_fp8(x, block, ue8m0)

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

    # ---- indexer ------------------------------------------------------------------------------------------------
    def indexer_k_write(self, k, norm_weight, norm_bias, eps, positions, cos_sin, rope_dim, hadamard, index_cache,
                        slots):
        from dsv32.backends.triton.indexer import indexer_k_write

        indexer_k_write(k, norm_weight, norm_bias, eps, positions, cos_sin, rope_dim, hadamard, index_cache, slots)

    def indexer_q_prepare(self, q, head_weights, positions, cos_sin, rope_dim, fp8):
        from dsv32.backends.triton.indexer import indexer_q_prepare

        return indexer_q_prepare(q, head_weights, positions, cos_sin, rope_dim, fp8)

    def indexer_topk(self, q, head_weights, index_cache, batch, softmax_scale, topk):
        from dsv32.backends.triton.indexer import indexer_topk

        return indexer_topk(q, head_weights, index_cache, batch, softmax_scale, topk)

    # ---- MoE ------------------------------------------------------------------------------------------------
    def moe_route(self, router_logits, correction_bias, n_group, topk_group, top_k, renormalize,
                  routed_scaling_factor):
        from dsv32.backends.triton.moe import moe_route

        return moe_route(router_logits, correction_bias, n_group, topk_group, top_k, renormalize,
                         routed_scaling_factor)

    def prepare_experts(self, w, dtype):
        from dsv32.backends.triton.moe import prepare_experts

        return prepare_experts(w, dtype)

    def moe_experts(self, x, experts, topk_weights, topk_ids):
        from dsv32.backends.triton.moe import moe_experts

        return moe_experts(x, experts, topk_weights, topk_ids)

    def sample(self, logits, temperatures, top_ps, top_ks, min_ps, generators):
        from dsv32.backends.triton.sampling import sample

        return sample(logits, temperatures, top_ps, top_ks, min_ps, generators)

    # ---- device graphs and events: torch.cuda covers CUDA and HIP (ROCm) ----------------------------------------
    def graph_support(self) -> str:
        if self.device.type != "cuda":
            return f"device graphs need a GPU (this backend runs on {self.device.type})"
        return ""

    def new_graph(self, pool=None):
        if self.graph_support():
            raise RuntimeError(self.graph_support())
        return _CudaGraph(pool)

    def graph_pool(self):
        return torch.cuda.graph_pool_handle() if not self.graph_support() else None

    def new_event(self):
        return torch.cuda.Event() if self.device.type == "cuda" else None

    def process_group_backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"  # RCCL answers to "nccl" on ROCm builds of torch

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class _CudaGraph:
    """torch.cuda.CUDAGraph behind the DeviceGraph interface (capture() context, replay())."""

    def __init__(self, pool):
        self.graph, self.pool = torch.cuda.CUDAGraph(), pool

    def capture(self):
        return torch.cuda.graph(self.graph, pool=self.pool)

    def replay(self) -> None:
        self.graph.replay()
