"""CudaOps: the Triton kernels on NVIDIA GPUs, with FlashMLA / DeepGEMM / FlashInfer kernels where they are
importable and fit the inputs (backends/cuda/vendor.py wraps them). Which kernel serves a kernel slot is chosen at
startup (`select_kernels`: SGLang's --dsa-prefill-backend / --dsa-decode-backend / --moe-runner-backend); a vendor
kernel that cannot take a particular batch (shape limits) hands it to the Triton kernel, logged once."""

from __future__ import annotations

import logging

import torch

from dsv32.backends.triton.ops import TritonOps
from dsv32.core.ops import KernelContext

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


class CudaOps(TritonOps):
    name = "cuda"

    def __init__(self, device):
        super().__init__(device)
        self._fallback_logged: set[str] = set()
        self._deep_gemm_weights: set[int] = set()  # ids of FP8 weights DeepGEMM takes (checked once at load)

    def kernel_options(self, ctx: KernelContext) -> dict[str, dict[str, str]]:
        from dsv32.backends.cuda import vendor

        fm = vendor.status("flash_mla")[1]
        shape = _first("" if ctx.dtype == torch.bfloat16 else "FlashMLA needs bf16 activations (--dtype bfloat16)",
                       "" if ctx.num_heads in (64, 128) else f"FlashMLA needs 64 or 128 heads, the model has "
                                                             f"{ctx.num_heads}")
        sparse = _first(fm, shape, "flash_mla_sparse_fwd reads a bf16 KV cache; this one is fp8 (use flashmla_kv)"
                        if ctx.kv_cache_fp8 else "")
        kv = _first(fm, shape, "" if ctx.kv_cache_fp8 else
                    "FlashMLA's sparse decode reads the fp8 (656 B) cache only: use --kv-cache-dtype fp8_e4m3")
        auto = kv if ctx.kv_cache_fp8 else sparse
        dsa = {"flashmla_sparse": sparse, "flashmla_kv": kv, "flashmla_auto": auto, "triton": "",
               "fa3": _NOT_IN_DSV32["fa3"], "tilelang": _NOT_IN_DSV32["tilelang"]}
        decode = {k: dsa[k] for k in ("flashmla_kv", "flashmla_sparse", "flashmla_auto", "triton", "fa3", "tilelang")}
        moe = {"deep_gemm": "not in dsv32 yet (DeepGEMM's grouped GEMMs are not wrapped; when installed, deep_gemm "
                            "serves the dense FP8 linears and the indexer logits)",
               "triton": ""}
        moe.update({k: _NOT_IN_DSV32[k] for k in ("flashinfer_cutlass", "flashinfer_trtllm", "cutlass")})
        return {"dsa_prefill_backend": dsa, "dsa_decode_backend": decode, "moe_runner_backend": moe}

    def kernel_notes(self) -> dict[str, str]:
        from dsv32.backends.cuda import vendor

        k = self.kernels
        dg_ok, dg_why = vendor.status("deep_gemm")
        deep_gemm = "DeepGEMM" if dg_ok else f"Triton; {dg_why}"
        return {
            "sparse_mla_attention": f"prefill: {k.get('dsa_prefill_backend')}, decode: {k.get('dsa_decode_backend')}",
            "dense_mla_attention": f"the prefill sparse kernel over every causal key ({k.get('dsa_prefill_backend')})",
            "moe_experts": f"{k.get('moe_runner_backend')} grouped GEMMs",
            "linear": f"bf16: torch (cuBLAS); FP8-block: {deep_gemm}",
            "indexer_topk": f"fp8 keys, page size 64: {'DeepGEMM paged logits' if dg_ok else deep_gemm}; "
                            "otherwise the Triton logits + radix top-k",
        }

    # ---- DeepGEMM where installed: FP8 linears (decided per weight at load) and the fp8 indexer -----------------
    def prepare_linear(self, w, dtype):
        from dsv32.backends.cuda import vendor

        out = super().prepare_linear(w, dtype)
        if (out.is_fp8 and dtype == torch.bfloat16 and vendor.status("deep_gemm")[0]
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

    def indexer_topk(self, q, head_weights, index_cache, batch, softmax_scale, topk):
        from dsv32.backends.cuda import vendor

        if (vendor.status("deep_gemm")[0] and batch.page_size == 64
                and vendor.deep_gemm_indexer_paged_unsupported(q, index_cache) is None):
            return vendor.deep_gemm_indexer_topk(q, head_weights, index_cache, batch, softmax_scale, topk)
        return super().indexer_topk(q, head_weights, index_cache, batch, softmax_scale, topk)

    def _note_fallback(self, kernel: str, why: str) -> None:
        if kernel not in self._fallback_logged:
            self._fallback_logged.add(kernel)
            log.info("%s cannot take this batch (%s): the Triton kernel runs it", kernel, why)

    def sparse_mla_attention(self, q, latent_cache, topk_slots, softmax_scale, kv_lora_rank, batch=None):
        from dsv32.backends.cuda import vendor

        slot = "dsa_decode_backend" if batch is not None and batch.is_decode else "dsa_prefill_backend"
        kernel = self.kernels.get(slot, "triton")
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
