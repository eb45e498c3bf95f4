"""TritonOps: the ops the Triton kernels cover; everything else falls back to the reference backend through the
registry (each fallback logged once and listed by `dsv32 env`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv32.core.ops import LinearWeight, Ops, causal_slots
from dsv32.core.platform import Platform


def fp8_of_amd_arch(arch: str) -> tuple[torch.dtype | None, str]:
    """(e4m3 format, '' ) of an AMD GPU architecture (gcnArchName without its features), or (None, why)."""
    if arch == "gfx942":
        return torch.float8_e4m3fnuz, ""
    if arch.startswith("gfx95") or arch.startswith("gfx12"):
        return torch.float8_e4m3fn, ""
    return None, f"this GPU ({arch}) has no fp8 (gfx942 and newer have)"


class TritonOps(Ops):
    """The fp8 kernels work in the platform's e4m3 format (`fp8_format()`): e4m3fn here; a subclass whose platform
    says e4m3fnuz gets the fnuz variants (`self.fnuz`)."""

    name = "triton"
    # arithmetic keeps fp32 denormals on this target, so the FP4 decode kernels may decode e2m1 through fp32 bits
    # (backends/triton/fp4._e2m1, faster than through fp16): true on NVIDIA GPUs (CudaOps; checked on the H200),
    # not assumed elsewhere
    fp32_denormals = False

    def __init__(self, device="cpu"):
        super().__init__(device)
        self.fnuz = self.fp8_format()[0] == torch.float8_e4m3fnuz
        self.max_shared = self.max_shared_bytes()

    def max_shared_bytes(self) -> int | None:
        """Shared memory (LDS) one program may use on this device; None: no limit (the CPU interpreter). Tile choices
        that need more take smaller tiles (`python -m dsv32.backends.triton.aot` checks every launch against each
        target's limit)."""
        if self.device.type != "cuda":
            return None
        return torch.cuda.get_device_properties(self.device).shared_memory_per_block_optin

    # ---- tiles per target: the defaults are tuned on H100/H200; smaller GPUs and AMD override ---------------------
    def mla_tiles(self, fp8_cache: bool) -> dict:
        """Tiling of the sparse MLA kernel (backends/triton/attention.py). The default 64 heads × 32 keys with a bf16
        cache needs 120 KB of shared memory: GPUs with less per block (sm_120: 99 KB; sm_86/89: 99/100 KB) take 16
        keys per block (96 KB there, compiled for sm_120 by the AOT check)."""
        if not fp8_cache and self.max_shared is not None and self.max_shared < 120 * 1024:
            return {"block_k": 16}
        return {}

    def moe_tiles(self, n_pairs: int, fp8: bool) -> dict | None:
        """Overrides of the MoE kernels' tiles (backends/triton/moe.py: block_m, bn1, bn2, warps, stages); None: its
        defaults. The fp8 default for ≥ 4096 token-expert pairs is 256-wide N tiles in 3 stages (H100 sweep), which
        need ~216 KB of shared memory: GPUs with less take 128-wide tiles for gate/up."""
        if fp8 and n_pairs >= 4096 and self.max_shared is not None and self.max_shared < 224 * 1024:
            return {"bn1": 128}
        return None

    # ---- weights and linear layers: bf16 through torch (cuBLAS / hipBLASLt), FP8-block and FP4 through Triton GEMMs --
    def prepare_linear(self, w, dtype):
        if w.is_fp4:
            from dsv32.backends.triton.fp4 import prepare_linear

            return prepare_linear(w)
        if w.is_fp8 and w.weight.dim() == 2 and w.weight.dtype == self.fp8_format()[0] and tuple(w.block) == (128, 128):
            return LinearWeight(w.weight.contiguous(), w.scale_inv.float().contiguous(), (128, 128))
        if w.is_fp8:  # other block shapes: dequantized once, as the reference does
            from dsv32.backends.reference.ops import ReferenceOps

            return LinearWeight(ReferenceOps(self.device).dequantize(w, dtype))
        return LinearWeight(w.weight.to(dtype))

    def linear(self, x, w):
        if w.is_fp4:
            from dsv32.backends.triton.fp4 import fp4_linear

            return fp4_linear(x, w, fp32_denormals=self.fp32_denormals)
        if w.is_fp8:
            from dsv32.backends.triton.gemm import fp8_block_linear

            # activations quantized per token per 128 channels with power-of-two scales (V3.2's scale_fmt ue8m0)
            return fp8_block_linear(x, w.weight, w.scale_inv, ue8m0_act=True)
        return F.linear(x, w.weight.to(x.dtype))

    def fuse_linears(self, ws):
        """Concatenates along N: fp8 weights with their scale rows (each part but the last must fill whole
        128-row scale blocks), FP4 weights with their group and global scale rows, or plain weights of one dtype."""
        first = ws[0]
        if any(w.is_fp4 for w in ws):
            from dsv32.backends.triton.fp4 import fuse

            return fuse(ws)
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

        return quantize_fp8(x, block, ue8m0, self.fnuz)

    def rms_norm(self, x, weight, eps, residual=None):
        from dsv32.backends.triton.elementwise import rms_norm

        return rms_norm(x, weight, eps, residual)

    def rotary_embedding(self, x, positions, cos_sin, interleaved):
        from dsv32.backends.triton.rope import rotary_embedding

        return rotary_embedding(x, positions, cos_sin, interleaved)

    def mla_kv_write(self, kv, kv_lora_rank, norm_weight, eps, positions, cos_sin, latent_cache, slots):
        from dsv32.backends.triton.rope import mla_kv_write

        mla_kv_write(kv, kv_lora_rank, norm_weight, eps, positions, cos_sin, latent_cache, slots, self.fnuz)

    def silu_and_mul(self, x):
        from dsv32.backends.triton.elementwise import silu_and_mul

        return silu_and_mul(x)

    def sparse_mla_attention(self, q, latent_cache, topk_slots, softmax_scale, kv_lora_rank, batch=None):
        from dsv32.backends.triton.attention import sparse_mla_attention

        return sparse_mla_attention(q, latent_cache, topk_slots, softmax_scale, kv_lora_rank, fnuz=self.fnuz,
                                    **self.mla_tiles(latent_cache.dtype == torch.uint8))

    def dense_mla_attention(self, q, latent_cache, batch, softmax_scale, kv_lora_rank):
        return self.sparse_mla_attention(q, latent_cache, causal_slots(batch), softmax_scale, kv_lora_rank, batch)

    # ---- indexer ------------------------------------------------------------------------------------------------
    def indexer_k_write(self, k, norm_weight, norm_bias, eps, positions, cos_sin, rope_dim, hadamard, index_cache,
                        slots):
        from dsv32.backends.triton.indexer import indexer_k_write

        indexer_k_write(k, norm_weight, norm_bias, eps, positions, cos_sin, rope_dim, hadamard, index_cache, slots,
                        self.fnuz)

    def indexer_q_prepare(self, q, head_weights, positions, cos_sin, rope_dim, fp8):
        from dsv32.backends.triton.indexer import indexer_q_prepare

        return indexer_q_prepare(q, head_weights, positions, cos_sin, rope_dim, fp8, self.fnuz)

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
        if w.down.is_fp4:
            from dsv32.backends.triton import fp4

            return fp4.prepare_experts(w)
        from dsv32.backends.triton.moe import prepare_experts

        return prepare_experts(w, dtype)

    def moe_experts(self, x, experts, topk_weights, topk_ids):
        if experts.down.is_fp4:
            from dsv32.backends.triton.fp4 import fp4_moe_experts

            return fp4_moe_experts(x, experts, topk_weights, topk_ids, fp32_denormals=self.fp32_denormals)
        from dsv32.backends.triton.moe import moe_experts

        return moe_experts(x, experts, topk_weights, topk_ids,
                           self.moe_tiles(topk_ids.numel(), experts.down.scale_inv is not None))

    def sample(self, logits, temperatures, top_ps, top_ks, min_ps, generators):
        from dsv32.backends.triton.sampling import sample

        return sample(logits, temperatures, top_ps, top_ks, min_ps, generators)

    def verify(self, logits, drafts, temperatures, top_ps, top_ks, min_ps, generators):
        from dsv32.backends.triton.sampling import verify

        return verify(logits, drafts, temperatures, top_ps, top_ks, min_ps, generators)

    # ---- the platform, device graphs and events: torch.cuda covers CUDA and HIP (ROCm) ----------------------------
    def platform(self) -> Platform:
        on_gpu = self.device.type == "cuda"
        fp8, no_fp8 = self.gpu_fp8()
        return Platform(device_type=self.device.type, fp8_dtype=fp8, fp8_kv_cache=no_fp8, fp8_indexer=no_fp8,
                        collective_backend="nccl" if on_gpu else "gloo",  # RCCL answers to "nccl" on ROCm torch
                        graphs="" if on_gpu else f"device graphs need a GPU (this backend runs on {self.device.type})")

    def gpu_fp8(self) -> tuple[torch.dtype | None, str]:
        """The e4m3 format this GPU computes in, or None and why: NVIDIA sm_89 and newer e4m3fn (Triton has no e4m3
        conversion or fp8 dot below sm_89: every kernel is compiled for sm_80 by `python -m dsv32.backends.triton.aot`);
        AMD gfx942 (MI300) e4m3fnuz, gfx950 (MI350) and later OCP e4m3fn, older AMD GPUs none. The CPU interpreter:
        e4m3fn."""
        if self.device.type != "cuda":
            return torch.float8_e4m3fn, ""
        if torch.version.hip:
            arch = torch.cuda.get_device_properties(self.device).gcnArchName.split(":")[0]
            return fp8_of_amd_arch(arch)
        major, minor = torch.cuda.get_device_capability(self.device)
        if (major, minor) < (8, 9):
            return None, f"this GPU (sm_{major}{minor}) has no fp8 (sm_89 and newer have)"
        return torch.float8_e4m3fn, ""

    def new_graph(self, pool=None):
        why = self.platform().graphs
        if why:
            raise RuntimeError(why)
        return _CudaGraph(pool)

    def graph_pool(self):
        return torch.cuda.graph_pool_handle() if not self.platform().graphs else None

    def new_event(self):
        return torch.cuda.Event() if self.device.type == "cuda" else None

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
