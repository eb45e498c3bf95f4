"""Per-layer decode and prefill time of DeepSeek-V3.2 at full dimensions (random FP8-block weights, reduced depth:
1 dense + 3 MoE layers), each layer replayed from a CUDA graph with a cold L2, against floors from the ceilings
measured in the same run.

    python benchmarks/bench_layers.py [--backend cuda] [--kv-cache-dtype fp8_e4m3|bfloat16] [--quick]
        [--out benchmarks/results/layers.json]

Decode (batch 1/8/32/64/128 × context 4k/32k; every request at position context−1 with its own pages, the cache
filled through the model's own write kernels): the bytes-read floor = the layer's weights in checkpoint format
(FP8 linears + scales, bf16 router / indexer head weights; for MoE layers the shared expert and every routed
expert the batch's routing touches) + the KV the step must read (indexer keys of every cached token, 132 B;
latent entries of the min(context, 2048) selected keys) — divided by the measured copy bandwidth.
Prefill (one request of 1k/4k/16k tokens): the FLOP floor = FP8 GEMM FLOPs (projections, indexer logits, experts)
at the measured fp8 rate + bf16 FLOPs (absorbed MLA projections, attention over min(position+1, 2048) keys) at
the measured bf16 rate. ratio = floor / measured (1.0 = at the roofline).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import ceilings, gpu_ops, header, print_table, time_ms, write_json  # noqa: E402

from dsv32.core.config import ModelConfig, deepseek_v32_config, fp4_quantization_config  # noqa: E402
from dsv32.core.forward_batch import ForwardBatch  # noqa: E402
from dsv32.core.kv_cache import KVCache, KVCacheSpec, latent_entry_bytes  # noqa: E402
from dsv32.core.model.checkpoint import dummy_weights  # noqa: E402
from dsv32.core.model import DeepseekV32  # noqa: E402
from dsv32.core.ops import KernelContext  # noqa: E402

dev = torch.device("cuda")
PAGE = 64


def fp8_bytes(n, k, cfg=None, module: str = "model.layers.0.mlp.experts.0.up_proj"):
    """Checkpoint bytes of one linear: FP8 block (e4m3 + fp32 scale per 128×128), or with an FP4 config the module's
    format (NVFP4 ½ B + e4m3 per 16 + fp32 global per row; MXFP4 ½ B + e8m0 per 32; excluded ones bf16)."""
    if cfg is None or cfg.fp4 is None:
        return n * k + -(-n // 128) * -(-k // 128) * 4
    if not cfg.fp4.quantized(module):
        return 2 * n * k
    return n * k // 2 + n * k // cfg.fp4.group_size + (4 * n if cfg.fp4.fmt == "nvfp4" else 0)


def attention_weight_bytes(cfg) -> int:
    H, Hd = cfg.num_attention_heads, cfg.hidden_size
    a = "model.layers.1.self_attn."
    return (fp8_bytes(cfg.q_lora_rank, Hd, cfg, a + "q_a_proj") + fp8_bytes(H * cfg.qk_head_dim, cfg.q_lora_rank, cfg,
                                                                          a + "q_b_proj")
            + fp8_bytes(cfg.latent_dim, Hd, cfg, a + "kv_a_proj_with_mqa")
            + fp8_bytes(H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank, cfg, a + "kv_b_proj")
            + fp8_bytes(Hd, H * cfg.v_head_dim, cfg, a + "o_proj")
            + fp8_bytes(cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank, cfg, a + "indexer.wq_b")
            + fp8_bytes(cfg.index_head_dim, Hd, cfg, a + "indexer.wk")
            + cfg.index_n_heads * Hd * 2)


def expert_bytes(cfg, inter) -> int:
    Hd = cfg.hidden_size
    m = "model.layers.1.mlp.experts.0."
    return fp8_bytes(inter, Hd, cfg, m + "gate_proj") + fp8_bytes(inter, Hd, cfg, m + "up_proj") + fp8_bytes(
        Hd, inter, cfg, m + "down_proj")


def linear_flops_per_token(cfg) -> int:
    H, Hd = cfg.num_attention_heads, cfg.hidden_size
    nk = (cfg.q_lora_rank * Hd + H * cfg.qk_head_dim * cfg.q_lora_rank + cfg.latent_dim * Hd + Hd * H * cfg.v_head_dim
          + cfg.index_n_heads * cfg.index_head_dim * cfg.q_lora_rank + cfg.index_head_dim * Hd + cfg.index_n_heads * Hd)
    return 2 * nk


class Bench:
    def __init__(self, backend, kv_dtype, max_tokens, max_ctx, weights="fp8"):
        quant = {} if weights == "fp8" else {"quantization_config": fp4_quantization_config(weights)}
        self.cfg = ModelConfig.from_dict(deepseek_v32_config(num_hidden_layers=4, first_k_dense_replace=1, **quant))
        self.ops = ops = gpu_ops(backend)
        ops.select_kernels(KernelContext(dtype=torch.bfloat16, kv_cache_fp8=kv_dtype == "fp8_e4m3", fp8_weights=True,
                                         num_heads=128))
        print(f"random {weights} weights for {self.cfg.num_hidden_layers} layers ...", flush=True)
        w = dummy_weights(self.cfg, ops, torch.bfloat16, dev)
        self.model = DeepseekV32(self.cfg, w, ops, torch.bfloat16, dev, indexer_fp8=True, max_positions=max_ctx)
        c = self.cfg
        spec = KVCacheSpec(c.num_hidden_layers, -(-max_tokens // PAGE), PAGE, c.kv_lora_rank, c.qk_rope_head_dim,
                           c.index_head_dim, kv_dtype if kv_dtype == "fp8_e4m3" else torch.bfloat16, True,
                           torch.bfloat16)
        self.cache = KVCache(spec, dev)
        self.entry = latent_entry_bytes(c.kv_lora_rank, c.qk_rope_head_dim) if kv_dtype == "fp8_e4m3" else 1152
        self._fill(max_tokens, max_ctx)

    def _fill(self, n_tokens, ctx):
        """Random keys in every slot, written by the model's own kernels (valid formats, scales, norms)."""
        c, ops, w = self.cfg, self.ops, self.model.w
        g = torch.Generator(device=dev).manual_seed(5)
        for i in range(2):  # the layers benchmarked
            p = f"model.layers.{i}.self_attn."
            for s0 in range(0, n_tokens, 1 << 16):
                slots = torch.arange(s0, min(n_tokens, s0 + (1 << 16)), device=dev)
                pos = slots % ctx
                kv = torch.randn(slots.numel(), c.latent_dim, device=dev, generator=g, dtype=torch.bfloat16)
                ops.mla_kv_write(kv, c.kv_lora_rank, w[p + "kv_a_layernorm.weight"], 1e-6, pos, self.model.cos_sin,
                                 self.cache.latent[i], slots)
                k = torch.randn(slots.numel(), c.index_head_dim, device=dev, generator=g, dtype=torch.bfloat16)
                ops.indexer_k_write(k, w[p + "indexer.k_norm.weight"], w[p + "indexer.k_norm.bias"], 1e-6, pos,
                                    self.model.cos_sin, c.qk_rope_head_dim, True, self.cache.index_keys[i], slots)
        torch.cuda.synchronize()

    def layer_fn(self, i, fb, h, residual, record=None):
        m, ops, cfg, w = self.model, self.ops, self.cfg, self.model.w
        p = f"model.layers.{i}."

        def run():
            x, res = ops.rms_norm(h, w[p + "input_layernorm.weight"], cfg.rms_norm_eps, residual)
            a = m.layers[i].attn(x, fb, self.cache)
            x, res = ops.rms_norm(a, w[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps, res)
            if cfg.is_dense_layer(i):
                return m.layers[i].ffn(x, fb)
            if record is not None:
                logits = ops.linear(x.float(), w[p + "mlp.gate.weight"])
                _, ids = ops.moe_route(logits, w[p + "mlp.gate.e_score_correction_bias"], cfg.n_group, cfg.topk_group,
                                       cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.routed_scaling_factor)
                record.append(int(ids.unique().numel()))
            return m.layers[i].ffn(x, fb)

        return run

    def decode(self, B, ctx, ceil):
        cfg = self.cfg
        per_req = ctx // PAGE
        reqs = [([7], ctx - 1, list(range(b * per_req, (b + 1) * per_req))) for b in range(B)]
        fb = ForwardBatch.build(reqs, self.cache, dev)
        g = torch.Generator(device=dev).manual_seed(B)
        h = torch.randn(B, cfg.hidden_size, device=dev, dtype=torch.bfloat16, generator=g)
        residual = torch.randn(B, cfg.hidden_size, device=dev, dtype=torch.bfloat16, generator=g)
        rows = []
        for i in (0, 1):
            touched = []
            self.layer_fn(i, fb, h, residual, touched)()
            ms, graphed = time_ms(self.layer_fn(i, fb, h, residual), iters=10)
            kv = B * ctx * (cfg.index_head_dim + 4) + B * min(ctx, cfg.index_topk) * self.entry
            if cfg.is_dense_layer(i):
                wb = attention_weight_bytes(cfg) + expert_bytes(cfg, cfg.intermediate_size)
            else:
                wb = (attention_weight_bytes(cfg) + cfg.n_routed_experts * cfg.hidden_size * 2
                      + expert_bytes(cfg, cfg.moe_intermediate_size) * (1 + touched[0]))
            floor_ms = (wb + kv) / ceil["copy_GBps"] / 1e6
            rows.append({"layer": "dense" if cfg.is_dense_layer(i) else "moe", "batch": B, "context": ctx,
                         "experts": touched[0] if touched else None, "graph": graphed, "ms": round(ms, 4),
                         "floor_ms": round(floor_ms, 4), "x_floor": round(ms / floor_ms, 2),
                         "weight_MB": round(wb / 1e6, 1), "kv_MB": round(kv / 1e6, 1)})
            print(rows[-1], flush=True)
        return rows

    def prefill(self, L, ceil):
        cfg = self.cfg
        fb = ForwardBatch.build([(list(range(L)), 0, list(range(-(-L // PAGE))))], self.cache, dev)
        g = torch.Generator(device=dev).manual_seed(L)
        h = torch.randn(L, cfg.hidden_size, device=dev, dtype=torch.bfloat16, generator=g)
        residual = torch.randn(L, cfg.hidden_size, device=dev, dtype=torch.bfloat16, generator=g)
        H, topk = cfg.num_attention_heads, cfg.index_topk
        keys_attended = sum(min(t + 1, topk) for t in range(L))
        attn_bf16 = 2 * H * (cfg.latent_dim + cfg.kv_lora_rank) * keys_attended
        absorb_bf16 = 2 * L * H * cfg.kv_lora_rank * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        indexer_fp8 = 2 * cfg.index_n_heads * cfg.index_head_dim * L * (L + 1) // 2 if L > topk else 0
        rows = []
        for i in (0, 1):
            ms, graphed = time_ms(self.layer_fn(i, fb, h, residual), iters=5)
            if cfg.is_dense_layer(i):
                mlp = 2 * L * 3 * cfg.hidden_size * cfg.intermediate_size
            else:
                mlp = 2 * L * (cfg.num_experts_per_tok + 1) * 3 * cfg.hidden_size * cfg.moe_intermediate_size
            fp8 = L * linear_flops_per_token(cfg) + indexer_fp8 + mlp
            bf16 = attn_bf16 + absorb_bf16
            floor_ms = fp8 / ceil["fp8_TFLOPs"] / 1e9 + bf16 / ceil["bf16_TFLOPs"] / 1e9
            rows.append({"layer": "dense" if cfg.is_dense_layer(i) else "moe", "tokens": L, "graph": graphed,
                         "ms": round(ms, 3), "floor_ms": round(floor_ms, 3), "of_floor": round(floor_ms / ms, 3),
                         "TFLOPs": round((fp8 + bf16) / ms / 1e9, 1), "fp8_GFLOP": round(fp8 / 1e9, 1),
                         "bf16_GFLOP": round(bf16 / 1e9, 1)})
            print(rows[-1], flush=True)
        return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", default="cuda")
    p.add_argument("--kv-cache-dtype", default="fp8_e4m3", choices=["fp8_e4m3", "bfloat16"])
    p.add_argument("--batches", default="1,8,32,64,128")
    p.add_argument("--contexts", default="4096,32768")
    p.add_argument("--prefill", default="1024,4096,16384")
    p.add_argument("--weights", default="fp8", choices=["fp8", "nvfp4", "mxfp4"],
                   help="FP8-block, or FP4 with the published checkpoints' exclusion lists (bf16 where excluded)")
    p.add_argument("--out", default="benchmarks/results/layers.json")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    prefills = [int(x) for x in args.prefill.split(",") if x]
    ceil = ceilings()
    payload = {**header(ceil), "backend": args.backend, "kv_cache_dtype": args.kv_cache_dtype,
               "model": f"DeepSeek-V3.2 dims, 1 dense + 3 MoE layers, random {args.weights} weights"}
    max_tokens = max(max(batches) * max(contexts), max(prefills, default=0))
    bench = Bench(args.backend, args.kv_cache_dtype, max_tokens, max(contexts + prefills) + 1, args.weights)
    decode = [r for ctx in contexts for B in batches for r in bench.decode(B, ctx, ceil)]
    print_table(f"decode step per layer (kv cache {args.kv_cache_dtype}; x_floor = ms / bytes-read floor)", decode,
                ["layer", "batch", "context", "experts", "ms", "floor_ms", "x_floor", "weight_MB", "kv_MB"])
    prefill = [r for L in prefills for r in bench.prefill(L, ceil)]
    print_table("prefill per layer (of_floor = FLOP floor / ms)", prefill,
                ["layer", "tokens", "ms", "floor_ms", "of_floor", "TFLOPs", "fp8_GFLOP", "bf16_GFLOP"])
    write_json(args.out, {**payload, "decode": decode, "prefill": prefill})


if __name__ == "__main__":
    main()
