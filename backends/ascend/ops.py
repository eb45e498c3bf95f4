"""AscendOps: torch_npu's fused operators where DeepSeek-V3.2 needs them (backends/ascend/npu_kernels.py); every other
op is the reference backend's torch code on the NPU (bound by the registry). NEVER RUN ON ASCEND HARDWARE (see
backends/ascend/__init__.py).

Per kernel slot, "ascend" (the default: there is no other fast path on an NPU) or "reference" (the pure-torch op, to
bisect a problem): --dsa-prefill-backend / --dsa-decode-backend (sparse attention; the decode choice also picks the
fused MLA key write), --dsa-indexer-backend, --moe-runner-backend (experts and routing), --norm-backend. W8A8 int8
linears always run on npu_quant_matmul (the reference would dequantize them at load).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from dsv32.backends.ascend import SLOTS
from dsv32.core.ops import ExpertWeights, KernelContext, LinearWeight, Ops
from dsv32.core.platform import PageSizes, Platform

log = logging.getLogger("dsv32.ascend")


class AscendOps(Ops):
    name = "ascend"

    def __init__(self, device="npu"):
        super().__init__(device)
        from dsv32.backends.reference.ops import ReferenceOps

        self.ref = ReferenceOps(self.device)
        self._fallback_logged: set[str] = set()
        self._npu_experts: set[int] = set()  # ids of gate_up weights in the grouped-matmul layout

    def platform(self) -> Platform:
        from dsv32.backends.ascend.npu_kernels import PAGE_MAX, PAGE_MULTIPLE

        on_npu = self.device.type == "npu"
        return Platform(device_type=self.device.type, fp8_dtype=None, latent_layouts=("split",),
                        fp8_kv_cache="Ascend A2/A3 NPUs have no fp8", fp8_indexer="Ascend A2/A3 NPUs have no fp8",
                        page_sizes=PageSizes(multiple_of=PAGE_MULTIPLE, at_most=PAGE_MAX),
                        collective_backend="hccl" if on_npu else "gloo",
                        graphs="NPU graphs are not verified with dsv32 on Ascend hardware")

    def memory_allocated(self):
        if self.device.type == "npu":
            return torch.npu.memory_allocated(self.device)
        return super().memory_allocated()

    def new_event(self):
        return torch.npu.Event() if self.device.type == "npu" else None

    def synchronize(self) -> None:
        if self.device.type == "npu":
            torch.npu.synchronize(self.device)

    # ---- kernel choices ---------------------------------------------------------------------------------------
    def kernel_options(self, ctx: KernelContext) -> dict[str, dict[str, str]]:
        from dsv32.backends.ascend import npu_kernels as nk

        lib = nk.status()
        page = nk.page_problem(ctx.page_size)

        def npu(*reasons: str) -> str:
            return next((r for r in (lib, *reasons) if r), "")

        bf16 = "" if ctx.dtype in (torch.bfloat16, torch.float16) else "the NPU operators run bf16/fp16 (--dtype bfloat16)"
        opts = {slot: {"ascend": npu(bf16), "reference": ""} for slot in SLOTS}
        for slot in ("dsa_prefill_backend", "dsa_decode_backend"):
            opts[slot]["ascend"] = npu(bf16, page)
        opts["dsa_indexer_backend"]["ascend"] = npu(
            bf16, page, "" if not ctx.indexer_fp8 else "the lightning indexer reads bf16 keys (--indexer-precision "
                                                       "exact)", "" if 1 <= ctx.index_topk <= nk.MAX_SPARSE else
            f"the lightning indexer selects at most {nk.MAX_SPARSE} keys")
        opts["norm_backend"]["ascend"] = npu()
        return opts

    def kernel_notes(self) -> dict[str, str]:
        from dsv32.backends.ascend import HARDWARE_NOTE

        k = self.kernels

        def says(slot: str, kernel: str) -> str:
            return kernel if k.get(slot) == "ascend" else "reference (torch)"

        return {
            "sparse_mla_attention": f"prefill: {says('dsa_prefill_backend', 'npu_sparse_flash_attention')}; decode: "
                                    f"{says('dsa_decode_backend', 'npu_sparse_flash_attention')} ({HARDWARE_NOTE})",
            "mla_kv_write": says("dsa_decode_backend", "npu_kv_rmsnorm_rope_cache"),
            "indexer_topk": says("dsa_indexer_backend", "npu_lightning_indexer"),
            "moe_experts": says("moe_runner_backend", "npu_grouped_matmul (+ npu_dequant_swiglu_quant for W8A8)"),
            "moe_route": says("moe_runner_backend", "npu_moe_gating_top_k"),
            "linear": "W8A8 int8: npu_quant_matmul; bf16: torch",
            "rms_norm": says("norm_backend", "npu_rms_norm / npu_add_rms_norm"),
        }

    def _fallback(self, what: str, why: str) -> None:
        if what not in self._fallback_logged:
            self._fallback_logged.add(what)
            log.info("%s cannot take this batch (%s): the reference op runs it", what, why)

    # ---- weights and linears ------------------------------------------------------------------------------------
    def prepare_linear(self, w, dtype):
        if w.is_fp8 and w.weight.dtype == torch.int8 and w.block[0] == 1:  # W8A8: int8 kept, [K, N] storage
            return LinearWeight(w.weight.t().contiguous().t(), w.scale_inv.float().contiguous(), w.block)
        return self.ref.prepare_linear(w, dtype)

    def linear(self, x, w):
        if w.act:  # W4A4 MXFP4 checkpoint (dequantized at load): activations rounded through MXFP4, emulated
            return self.ref.linear(x, w)
        if w.is_fp8 and w.weight.dtype == torch.int8:
            from dsv32.backends.ascend import npu_kernels as nk

            return nk.int8_linear(x, w)
        return F.linear(x, w.weight.to(x.dtype))

    def dequantize(self, w, dtype):
        return self.ref.dequantize(w, dtype)

    # ---- attention, indexer, KV write -----------------------------------------------------------------------------
    def sparse_mla_attention(self, q, latent_cache, topk_slots, softmax_scale, kv_lora_rank, batch=None):
        slot = "dsa_decode_backend" if batch is not None and batch.is_decode else "dsa_prefill_backend"
        if self.kernels.get(slot, "ascend") == "ascend":
            from dsv32.backends.ascend import npu_kernels as nk

            why = nk.attention_unsupported(q, latent_cache, batch)
            if not why:
                return nk.sparse_attention(q, latent_cache, topk_slots, softmax_scale, kv_lora_rank, batch)
            self._fallback("npu_sparse_flash_attention", why)
        return self.ref.sparse_mla_attention(q, latent_cache, topk_slots, softmax_scale, kv_lora_rank, batch)

    def dense_mla_attention(self, q, latent_cache, batch, softmax_scale, kv_lora_rank):
        from dsv32.core.ops import causal_slots

        return self.sparse_mla_attention(q, latent_cache, causal_slots(batch), softmax_scale, kv_lora_rank, batch)

    def mla_kv_write(self, kv, kv_lora_rank, norm_weight, eps, positions, cos_sin, latent_cache, slots):
        from dsv32.core.kv_cache import SplitLatent

        if self.kernels.get("dsa_decode_backend", "ascend") == "ascend" and isinstance(latent_cache, SplitLatent):
            from dsv32.backends.ascend import npu_kernels as nk

            return nk.mla_kv_write(kv, kv_lora_rank, norm_weight, eps, positions, cos_sin, latent_cache, slots)
        return self.ref.mla_kv_write(kv, kv_lora_rank, norm_weight, eps, positions, cos_sin, latent_cache, slots)

    def indexer_topk(self, q, head_weights, index_cache, batch, softmax_scale, topk):
        if self.kernels.get("dsa_indexer_backend", "ascend") == "ascend":
            from dsv32.backends.ascend import npu_kernels as nk

            why = nk.indexer_unsupported(q, index_cache, batch, topk)
            if not why:
                return nk.indexer_topk(q, head_weights, index_cache, batch, softmax_scale, topk)
            self._fallback("npu_lightning_indexer", why)
        return self.ref.indexer_topk(q, head_weights, index_cache, batch, softmax_scale, topk)

    # ---- MoE ----------------------------------------------------------------------------------------------------
    def moe_route(self, router_logits, correction_bias, n_group, topk_group, top_k, renormalize,
                  routed_scaling_factor):
        if self.kernels.get("moe_runner_backend", "ascend") == "ascend":
            from dsv32.backends.ascend import npu_kernels as nk

            why = nk.route_unsupported(router_logits.shape[1], n_group, renormalize)
            if not why:
                return nk.moe_route(router_logits, correction_bias, n_group, topk_group, top_k, routed_scaling_factor)
            self._fallback("npu_moe_gating_top_k", why)
        return self.ref.moe_route(router_logits, correction_bias, n_group, topk_group, top_k, renormalize,
                                  routed_scaling_factor)

    def prepare_experts(self, w, dtype):
        if w.down.is_fp4:  # no FP4 math on Atlas A2/A3: dequantized once at load (4x the FP4 bytes, as bf16)
            if w.down.act:
                return self.ref.prepare_experts(w, dtype)  # W4A4: the reference rounds activations
            w = ExpertWeights(*(LinearWeight(self.ref.dequantize(p, dtype)) for p in (w.gate, w.up, w.down)))
        int8 = w.down.weight.dtype == torch.int8 and w.down.block[0] == 1
        if self.kernels.get("moe_runner_backend", "ascend") == "ascend" and (int8 or not w.down.is_fp8):
            from dsv32.backends.ascend import npu_kernels as nk

            gate_up, down = nk.prepare_experts(w.gate, w.up, w.down, dtype)
            self._npu_experts.add(id(gate_up.weight))
            return ExpertWeights(None, None, down, gate_up=gate_up)
        return self.ref.prepare_experts(w, dtype)

    def moe_experts(self, x, experts, topk_weights, topk_ids):
        if experts.gate_up is not None and id(experts.gate_up.weight) in self._npu_experts:
            from dsv32.backends.ascend import npu_kernels as nk

            return nk.moe_experts(x, experts.gate_up, experts.down, topk_weights, topk_ids, experts.num_experts)
        return self.ref.moe_experts(x, experts, topk_weights, topk_ids)

    # ---- norms --------------------------------------------------------------------------------------------------
    def rms_norm(self, x, weight, eps, residual=None):
        if self.kernels.get("norm_backend", "ascend") == "ascend":
            from dsv32.backends.ascend import npu_kernels as nk

            return nk.rms_norm(x, weight, eps, residual)
        return self.ref.rms_norm(x, weight, eps, residual)
