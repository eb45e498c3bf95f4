"""RocmOps: the shared Triton kernels in the GPU's fp8 format, plus aiter adapters chosen per kernel slot
(backends/rocm/aiter_kernels.py). NEVER RUN ON AMD HARDWARE (see backends/rocm/__init__.py).

Every slot defaults to the Triton kernels (the path verified on an NVIDIA GPU and compiled for gfx942/gfx950);
aiter runs only when asked for by its flag — `--dsa-prefill-backend` / `--dsa-decode-backend aiter` (sparse MLA),
`--dsa-indexer-backend aiter` (indexer logits + top-k), `--moe-runner-backend aiter` (fused MoE and its routing),
`--fp8-gemm-backend aiter` (FP8-block linears), `--norm-backend aiter` (RMSNorm) — and only where it can run: a
choice that cannot is refused at startup with the reason; a batch an adapter cannot take runs on Triton (logged).
"""

from __future__ import annotations

import logging

import torch

from dsv32.backends.triton.ops import TritonOps, fp8_of_amd_arch
from dsv32.core.ops import ExpertWeights, KernelContext, LinearWeight

log = logging.getLogger("dsv32.rocm")

_UNVERIFIED = "never run on AMD hardware: opt-in only"
LDS_BYTES = {"gfx942": 64 * 1024, "gfx950": 160 * 1024}  # per workgroup (MI300 / MI350 ISA guides)
_TILELANG = "not in dsv32 (TileLang kernels are not integrated)"


class RocmOps(TritonOps):
    """arch: the AMD GPU architecture to target (default: the device's gcnArchName; tests pass "gfx942" or "gfx950"
    to run the ROCm ops on the CPU interpreter or on an NVIDIA GPU with that arch's fp8 format)."""

    name = "rocm"

    def __init__(self, device="cuda", arch: str | None = None):
        self._arch = arch
        super().__init__(device)
        self._fallback_logged: set[str] = set()
        self._aiter_experts: set[int] = set()  # ids of gate_up weights shuffled for aiter's fused MoE at load

    @property
    def arch(self) -> str:
        if self._arch:
            return self._arch
        if self.device.type == "cuda" and torch.version.hip:
            return torch.cuda.get_device_properties(self.device).gcnArchName.split(":")[0]
        return "unknown"

    def gpu_fp8(self):
        if self._arch:
            return fp8_of_amd_arch(self._arch)
        return super().gpu_fp8()

    def max_shared_bytes(self):
        if self._arch and self.device.type != "cuda":  # an arch named off its GPU (AOT, tests): that arch's LDS
            return LDS_BYTES.get(self._arch, 64 * 1024)
        return super().max_shared_bytes()

    def mla_tiles(self, fp8_cache):
        """16 keys per block in 4 waves of 64, and 32 heads per program over an fp8 cache (its dequantization needs
        registers): the NVIDIA tiling (64 heads × 32 keys, 8 warps) spills 140-630 VGPRs per thread on gfx942/gfx950
        in the AOT compile; these spill none and fit gfx942's 64 KB LDS. Chosen from the compiler's resource report,
        not timed on AMD hardware."""
        return {"block_h": 32 if fp8_cache else 64, "block_k": 16, "num_warps": 4}

    # ---- kernel choices ---------------------------------------------------------------------------------------
    def kernel_options(self, ctx: KernelContext) -> dict[str, dict[str, str]]:
        from dsv32.backends.rocm import aiter_kernels as ak

        lib = ak.status()

        def aiter(*reasons: str) -> str:
            return next((r for r in (lib, *reasons) if r), "")

        heads = ctx.local_heads
        mla = aiter("" if not ctx.kv_cache_fp8 else "aiter's sparse MLA reads a bf16 cache (--kv-cache-dtype bfloat16)",
                    "" if ctx.dtype == torch.bfloat16 else "aiter's MLA kernels are bf16 (--dtype bfloat16)",
                    "" if heads in ak.MLA_HEADS else f"aiter's bf16 MLA decode kernels take 16 or 128 heads, a rank "
                                                     f"has {heads}")
        index = aiter("" if ctx.indexer_fp8 else "aiter's indexer reads fp8 keys (--indexer-precision fp8)",
                      "" if ctx.index_topk == ak.TOPK_WIDTH or ak._accepts("top_k_per_row_prefill", "k") else
                      f"this aiter's top-k is fixed at {ak.TOPK_WIDTH}, the model selects {ctx.index_topk}",
                      "" if ctx.page_size == 1 else f"aiter's paged indexer reads one key per page: --page-size 1 "
                                                    f"(not {ctx.page_size})")
        bf16 = "" if ctx.dtype == torch.bfloat16 else "aiter's kernels here run bf16 activations (--dtype bfloat16)"
        dsa = {"triton": "", "aiter": mla, "tilelang": _TILELANG}
        return {"dsa_prefill_backend": dict(dsa), "dsa_decode_backend": dict(dsa),
                "moe_runner_backend": {"triton": "", "aiter": aiter(bf16)},
                "fp8_gemm_backend": {"triton": "", "aiter": aiter(bf16 if ctx.fp8_weights else
                                                                  "the checkpoint has no FP8 linears")},
                "dsa_indexer_backend": {"triton": "", "aiter": index},
                "norm_backend": {"triton": "", "aiter": aiter()}}

    def kernel_notes(self) -> dict[str, str]:
        k = self.kernels
        note = {"aiter": f"aiter ({_UNVERIFIED})"}
        pick = {slot: note.get(k.get(slot), k.get(slot, "triton")) for slot in
                ("dsa_prefill_backend", "dsa_decode_backend", "moe_runner_backend", "fp8_gemm_backend",
                 "dsa_indexer_backend", "norm_backend")}
        return {
            "sparse_mla_attention": f"prefill: {pick['dsa_prefill_backend']}; decode: {pick['dsa_decode_backend']}",
            "moe_experts": f"{pick['moe_runner_backend']}", "moe_route": pick["moe_runner_backend"],
            "linear": f"bf16: torch (hipBLASLt); FP8-block: {pick['fp8_gemm_backend']}",
            "indexer_topk": pick["dsa_indexer_backend"], "rms_norm": pick["norm_backend"],
        }

    def _fallback(self, kernel: str, why: str) -> None:
        if kernel not in self._fallback_logged:
            self._fallback_logged.add(kernel)
            log.info("aiter %s cannot take this batch (%s): the Triton kernel runs it", kernel, why)

    # ---- ops --------------------------------------------------------------------------------------------------
    def sparse_mla_attention(self, q, latent_cache, topk_slots, softmax_scale, kv_lora_rank, batch=None):
        slot = "dsa_decode_backend" if batch is not None and batch.is_decode else "dsa_prefill_backend"
        if self.kernels.get(slot) == "aiter":
            from dsv32.backends.rocm import aiter_kernels as ak

            why = ak.mla_unsupported(q, latent_cache, kv_lora_rank)
            if not why:
                return ak.sparse_mla(q, latent_cache, topk_slots, softmax_scale, kv_lora_rank)
            self._fallback("sparse MLA", why)
        return super().sparse_mla_attention(q, latent_cache, topk_slots, softmax_scale, kv_lora_rank, batch)

    def indexer_topk(self, q, head_weights, index_cache, batch, softmax_scale, topk):
        if self.kernels.get("dsa_indexer_backend") == "aiter":
            from dsv32.backends.rocm import aiter_kernels as ak

            decode = batch.is_decode and batch.block_table.shape[0] == q.shape[0]
            why = ak.indexer_unsupported(q, index_cache, batch.page_size, topk, decode)
            if not why:
                return ak.indexer_topk(q, head_weights, index_cache, batch, softmax_scale, topk, self.fp8_format()[0])
            self._fallback("indexer", why)
        return super().indexer_topk(q, head_weights, index_cache, batch, softmax_scale, topk)

    def prepare_experts(self, w, dtype):
        out = super().prepare_experts(w, dtype)
        if self.kernels.get("moe_runner_backend") == "aiter":
            from dsv32.backends.rocm import aiter_kernels as ak

            fp4 = out.down.is_fp4
            gate_up = ak.fuse_fp4_gate_up(out.gate, out.up) if fp4 else out.gate_up
            why = ak.experts_unsupported(gate_up, out.down, dtype, self.arch)
            if why:
                self._fallback("fused MoE", why)
                return out
            if fp4:
                gate_up, down = ak.shuffle_fp4(gate_up), ak.shuffle_fp4(out.down)
            else:
                gate_up = LinearWeight(ak.shuffle(gate_up.weight), gate_up.scale_inv, gate_up.block)
                down = LinearWeight(ak.shuffle(out.down.weight), out.down.scale_inv, out.down.block)
            self._aiter_experts.add(id(gate_up.weight))
            return ExpertWeights(None, None, down, gate_up=gate_up)
        return out

    def moe_experts(self, x, experts, topk_weights, topk_ids):
        if experts.gate_up is not None and id(experts.gate_up.weight) in self._aiter_experts:
            from dsv32.backends.rocm import aiter_kernels as ak

            # shuffled at load for aiter: no other kernel can read them (and none needs to: fused_moe takes any batch)
            return ak.moe_experts(x, experts.gate_up, experts.down, topk_weights, topk_ids, experts.num_experts)
        return super().moe_experts(x, experts, topk_weights, topk_ids)

    def moe_route(self, router_logits, correction_bias, n_group, topk_group, top_k, renormalize,
                  routed_scaling_factor):
        if self.kernels.get("moe_runner_backend") == "aiter":
            from dsv32.backends.rocm import aiter_kernels as ak

            return ak.moe_route(router_logits, correction_bias, n_group, topk_group, top_k, renormalize,
                                routed_scaling_factor)
        return super().moe_route(router_logits, correction_bias, n_group, topk_group, top_k, renormalize,
                                 routed_scaling_factor)

    def linear(self, x, w):
        if w.is_fp8 and self.kernels.get("fp8_gemm_backend") == "aiter":
            from dsv32.backends.rocm import aiter_kernels as ak

            why = ak.linear_unsupported(x.dtype)
            if not why:
                K = x.shape[-1]
                a, a_scale = self.quantize_fp8(x.reshape(-1, K), 128, True)
                y = ak.fp8_linear(a, a_scale, w, x.dtype)
                return y.view(*x.shape[:-1], w.shape[0])
            self._fallback("blockscale GEMM", why)
        return super().linear(x, w)

    def rms_norm(self, x, weight, eps, residual=None):
        if self.kernels.get("norm_backend") == "aiter":
            from dsv32.backends.rocm import aiter_kernels as ak

            return ak.rms_norm(x, weight, eps, residual)
        return super().rms_norm(x, weight, eps, residual)
