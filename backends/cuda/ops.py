"""CudaOps: the Triton kernels on NVIDIA GPUs, with FlashMLA / DeepGEMM / FlashInfer kernels where they are
importable and fit the inputs (backends/cuda/vendor.py wraps them). Which kernel serves a kernel slot is chosen at
startup (`select_kernels`: SGLang's --dsa-prefill-backend / --dsa-decode-backend / --moe-runner-backend /
--fp8-gemm-backend, and --dsa-indexer-backend); a vendor kernel that cannot take a particular batch (shape limits)
hands it to the Triton kernel, logged once. By default only FlashMLA, which was checked on an H200 against its real
library, is used, and only for the batches where it was measured faster; DeepGEMM is opt-in."""

from __future__ import annotations

import logging

import torch

from dsv32.backends.triton.ops import TritonOps
from dsv32.core.ops import ExpertWeights, KernelContext, LinearWeight

log = logging.getLogger("dsv32.cuda")

_NOT_IN_DSV32 = {
    "fa3": "not in dsv32 (FA3 has no DeepSeek sparse-attention kernel here)",
    "tilelang": "not in dsv32 (TileLang kernels are not integrated)",
    "reference": "use --backend reference",
    "flashinfer_cutlass": "not in dsv32 yet",
    "flashinfer_trtllm": "not in dsv32 yet (SM100 only)",
    "cutlass": "not in dsv32 yet",
}


def _first(*reasons: str) -> str:
    return next((r for r in reasons if r), "")


# FlashMLA against the Triton kernel, measured on an H200 with FlashMLA 9241ae3 built from source: for one query
# token FlashMLA takes 0.071 ms (bf16 cache) / 0.048 ms (fp8) against Triton's 0.026 / 0.027; from 32 query tokens
# on it is 1.9-3.6x faster. The "auto" kernel therefore runs FlashMLA from this many query tokens, Triton below.
FLASHMLA_MIN_QUERY_TOKENS = 32

# DeepGEMM and FlashInfer wrappers were written against the upstream sources and tested on CPU against fakes of
# their contracts, never against the real libraries: they run only when asked for by flag.
_UNVERIFIED = "never run against the real library: opt-in only"


class CudaOps(TritonOps):
    name = "cuda"
    fp32_denormals = True

    def __init__(self, device):
        super().__init__(device)
        self._fallback_logged: set[str] = set()
        self._deep_gemm_weights: set[int] = set()  # ids of FP8 weights DeepGEMM takes (checked once at load)
        self._flashinfer_experts: dict[int, list] = {}  # id(fc1) → FlashInfer NVFP4 MoE quant scales
        self._flashmla_auto: str | None = None  # the FlashMLA kernel "auto" uses for large batches, if it can run

    def kernel_options(self, ctx: KernelContext) -> dict[str, dict[str, str]]:
        from dsv32.backends.cuda import vendor

        fm = vendor.status("flash_mla")[1]
        shape = _first("" if ctx.dtype == torch.bfloat16 else "FlashMLA needs bf16 activations (--dtype bfloat16)",
                       "" if ctx.local_heads in (64, 128) else f"FlashMLA needs 64 or 128 heads, a rank has "
                                                               f"{ctx.local_heads}")
        sparse = _first(fm, shape, "flash_mla_sparse_fwd reads a bf16 KV cache; this one is fp8 (use flashmla_kv)"
                        if ctx.kv_cache_fp8 else "")
        kv = _first(fm, shape, "" if ctx.kv_cache_fp8 else
                    "FlashMLA's sparse decode reads the fp8 (656 B) cache only: use --kv-cache-dtype fp8_e4m3")
        flashmla = kv if ctx.kv_cache_fp8 else sparse
        dsa = {"auto": "", "flashmla_sparse": sparse, "flashmla_kv": kv, "flashmla_auto": flashmla, "triton": "",
               "fa3": _NOT_IN_DSV32["fa3"], "tilelang": _NOT_IN_DSV32["tilelang"]}
        decode = {k: dsa[k] for k in ("auto", "flashmla_kv", "flashmla_sparse", "flashmla_auto", "triton", "fa3",
                                      "tilelang")}
        moe = {"triton": "",
               "deep_gemm": "not in dsv32 yet (DeepGEMM's grouped GEMMs are not wrapped; --fp8-gemm-backend deep_gemm "
                            "and --dsa-indexer-backend deep_gemm use it for the dense FP8 linears and indexer logits)"}
        moe.update({k: _NOT_IN_DSV32[k] for k in ("flashinfer_trtllm", "cutlass")})
        fi_ok, fi = vendor.status("flashinfer")
        if fi_ok and vendor._capability(None)[0] != 10:
            fi = "FlashInfer's NVFP4 MoE needs Blackwell (SM100)"
        moe["flashinfer_cutlass"] = fi  # NVFP4 experts only (others run on Triton, logged); never run (no SM100 here)
        dg = vendor.status("deep_gemm")[1]
        gemm = {"triton": "", "deep_gemm": dg, "flashinfer_trtllm": _NOT_IN_DSV32["flashinfer_trtllm"],
                "cutlass": _NOT_IN_DSV32["cutlass"]}
        return {"dsa_prefill_backend": dsa, "dsa_decode_backend": decode, "moe_runner_backend": moe,
                "fp8_gemm_backend": gemm, "dsa_indexer_backend": {"triton": "", "deep_gemm": dg},
                "norm_backend": {"triton": ""}}

    def select_kernels(self, ctx, requested=None):
        chosen = super().select_kernels(ctx, requested)
        flashmla = "flashmla_kv" if ctx.kv_cache_fp8 else "flashmla_sparse"
        self._flashmla_auto = flashmla if not self.kernel_options(ctx)["dsa_decode_backend"][flashmla] else None
        return chosen

    def kernel_notes(self) -> dict[str, str]:
        k = self.kernels
        auto = (f"FlashMLA ({self._flashmla_auto}) from {FLASHMLA_MIN_QUERY_TOKENS} query tokens, Triton below"
                if self._flashmla_auto else "Triton (FlashMLA is not usable here)")
        dsa = {slot: auto if k.get(slot) == "auto" else k.get(slot) for slot in ("dsa_prefill_backend",
                                                                              "dsa_decode_backend")}
        deep_gemm = f"DeepGEMM ({_UNVERIFIED})"
        return {
            "sparse_mla_attention": f"prefill: {dsa['dsa_prefill_backend']}; decode: {dsa['dsa_decode_backend']}",
            "dense_mla_attention": f"the prefill sparse kernel over every causal key ({dsa['dsa_prefill_backend']})",
            "moe_experts": ("NVFP4 experts: FlashInfer CUTLASS fused MoE (W4A4; NEVER RUN on Blackwell, contract-tested "
                            "only); other experts: Triton grouped GEMMs" if k.get("moe_runner_backend") ==
                            "flashinfer_cutlass" else f"{k.get('moe_runner_backend')} grouped GEMMs"),
            "linear": "bf16: torch (cuBLAS); FP8-block: " + (deep_gemm if k.get("fp8_gemm_backend") == "deep_gemm"
                                                              else "Triton (--fp8-gemm-backend deep_gemm: DeepGEMM)"),
            "indexer_topk": (f"fp8 keys, page size 64: DeepGEMM paged logits ({_UNVERIFIED}); otherwise "
                             if k.get("dsa_indexer_backend") == "deep_gemm" else
                             "(--dsa-indexer-backend deep_gemm: DeepGEMM paged logits) ") + "Triton logits + radix top-k",
        }

    # ---- DeepGEMM on request: FP8 linears (decided per weight at load) and the fp8 indexer --------------------
    def prepare_linear(self, w, dtype):
        from dsv32.backends.cuda import vendor

        out = super().prepare_linear(w, dtype)
        if (self.kernels.get("fp8_gemm_backend") == "deep_gemm" and out.is_fp8 and dtype == torch.bfloat16
                and vendor.deep_gemm_fp8_linear_unsupported(out.weight, out.scale_inv) is None):
            self._deep_gemm_weights.add(id(out.weight))
        return out

    def fuse_linears(self, ws):
        from dsv32.backends.cuda import vendor

        out = super().fuse_linears(ws)
        if (out is not None and out.is_fp8 and all(id(w.weight) in self._deep_gemm_weights for w in ws)
                and vendor.deep_gemm_fp8_linear_unsupported(out.weight, out.scale_inv) is None):
            self._deep_gemm_weights.add(id(out.weight))
        return out

    def linear(self, x, w):
        if id(w.weight) in self._deep_gemm_weights and x.dtype == torch.bfloat16:
            from dsv32.backends.cuda import vendor

            return vendor.deep_gemm_fp8_linear(x, w.weight, w.scale_inv)
        return super().linear(x, w)

    def prepare_experts(self, w, dtype):
        if self.kernels.get("moe_runner_backend") == "flashinfer_cutlass":
            from dsv32.backends.cuda import vendor

            why = vendor.flashinfer_nvfp4_moe_unsupported(w.gate, w.up, w.down, dtype, self.device)
            if why is None:
                fc1, fc2, scales = vendor.flashinfer_nvfp4_moe_prepare(w.gate, w.up, w.down)
                self._flashinfer_experts[id(fc1)] = scales
                return ExpertWeights(None, None, LinearWeight(fc2), gate_up=LinearWeight(fc1))
            self._note_fallback("flashinfer_cutlass fused MoE", why)
        return super().prepare_experts(w, dtype)

    def moe_experts(self, x, experts, topk_weights, topk_ids):
        if experts.gate_up is not None and id(experts.gate_up.weight) in self._flashinfer_experts:
            from dsv32.backends.cuda import vendor

            return vendor.flashinfer_nvfp4_moe(x, experts.gate_up.weight, experts.down.weight,
                                               self._flashinfer_experts[id(experts.gate_up.weight)], topk_weights,
                                               topk_ids)
        return super().moe_experts(x, experts, topk_weights, topk_ids)

    def indexer_topk(self, q, head_weights, index_cache, batch, softmax_scale, topk):
        from dsv32.backends.cuda import vendor

        if self.kernels.get("dsa_indexer_backend") == "deep_gemm":
            why = "page size 64 only" if batch.page_size != 64 else vendor.deep_gemm_indexer_paged_unsupported(
                q, index_cache)
            if why is None:
                return vendor.deep_gemm_indexer_topk(q, head_weights, index_cache, batch, softmax_scale, topk)
            self._note_fallback("deep_gemm indexer", why)
        return super().indexer_topk(q, head_weights, index_cache, batch, softmax_scale, topk)

    def _note_fallback(self, kernel: str, why: str) -> None:
        if kernel not in self._fallback_logged:
            self._fallback_logged.add(kernel)
            log.info("%s cannot take this batch (%s): the Triton kernel runs it", kernel, why)

    def sparse_mla_attention(self, q, latent_cache, topk_slots, softmax_scale, kv_lora_rank, batch=None):
        from dsv32.backends.cuda import vendor

        slot = "dsa_decode_backend" if batch is not None and batch.is_decode else "dsa_prefill_backend"
        kernel = self.kernels.get(slot, "triton")
        if kernel == "auto":
            kernel = self._flashmla_auto if self._flashmla_auto and q.shape[0] >= FLASHMLA_MIN_QUERY_TOKENS else "triton"
        if kernel == "flashmla_auto":
            kernel = "flashmla_kv" if latent_cache.dtype == torch.uint8 else "flashmla_sparse"
        if kernel == "flashmla_sparse":
            why = vendor.flashmla_sparse_prefill_unsupported(q, latent_cache, topk_slots, kv_lora_rank)
            if not why:
                return vendor.flashmla_sparse_prefill(q, latent_cache, topk_slots, softmax_scale, kv_lora_rank)
            self._note_fallback(kernel, why)
        elif kernel == "flashmla_kv":
            why = vendor.flashmla_sparse_decode_unsupported(q, latent_cache, topk_slots, kv_lora_rank)
            if not why:
                return vendor.flashmla_sparse_decode(q, latent_cache, topk_slots, softmax_scale, kv_lora_rank)
            self._note_fallback(kernel, why)
        return super().sparse_mla_attention(q, latent_cache, topk_slots, softmax_scale, kv_lora_rank, batch)
