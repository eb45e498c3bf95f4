"""A rank's memory plan, computed from the config alone (no weights loaded): its weights (its part of every tensor, in
the checkpoint's format as the GPU backends keep it: FP8-block weights 1 byte + fp32 scales, the rest bf16, router /
indexer head weights fp32, plus the bf16 per-head W_UK / W_UV of absorbed MLA), the KV pool (MLA latent + indexer
keys, replicated within an attention group), decode graphs and the activation workspace of one step, and the number
of tokens the pool holds. `dsv32 memory-plan` prints it for any config and parallel layout on a device of any size;
each rank logs the measured counterpart at startup.

Graphs and workspace are estimates (activations of the largest layer for a step of chunked_prefill_size tokens —
gathered from every attention group under DP attention — plus the indexer's logits buffer); the KV pool is whatever
mem_fraction_static leaves after the weights, as when serving.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv32.core.config import EngineConfig, ModelConfig
from dsv32.core.engine.runner import graph_batch_sizes
from dsv32.core.model.layers import MLP_CHUNK_TOKENS
from dsv32.core.model.plan import ParallelPlan
from dsv32.core.model.specs import weight_specs

GIB = 2**30
INDEXER_LOGITS_BYTES = 1 << 28  # the largest indexer-logits buffer a backend allocates (backends/triton/indexer.py)


def _fp8_bytes(n: int, k: int, block: tuple[int, int]) -> int:
    return n * k + -(-n // block[0]) * -(-k // block[1]) * 4


def _fp4_bytes(n: int, k: int, cfg: ModelConfig) -> int:
    """Packed e2m1 + one scale byte per group (+ NVFP4's fp32 global scale per row, as the backends keep it)."""
    return n * k // 2 + n * k // cfg.fp4.group_size + (4 * n if cfg.fp4.fmt == "nvfp4" else 0)


def weight_bytes(cfg: ModelConfig, plan: ParallelPlan, include_mtp: bool = False, act_bytes: int = 2) -> int:
    """Bytes of this rank's weights on the device (msModelSlim W8A8: counted as int8 with a scale per row wherever the
    FP8 checkpoint has FP8 blocks; its description may keep a few more in bf16). FP4 checkpoints: packed, for the
    linears the config does not exclude (a backend that dequantizes FP4 at load, as Ascend's, needs more)."""
    fp8 = cfg.quant is not None or cfg.modelslim
    block = (cfg.quant.block_n, cfg.quant.block_k) if cfg.quant is not None else (1, 1 << 30)
    keep_bf16 = ("lm_head", "mlp.gate", "indexer.weights_proj")

    def linear(module: str, n: int, k: int, fp32: bool = False) -> int:
        if cfg.fp4 is not None and cfg.fp4.quantized(module) and k % cfg.fp4.group_size == 0:
            return _fp4_bytes(n, k, cfg)
        if cfg.fp4 is None and fp8 and not fp32 and not module.endswith(keep_bf16):
            return _fp8_bytes(n, k, block)
        return n * k * (4 if fp32 else act_bytes)

    total = 0
    for name, spec in weight_specs(cfg, include_mtp).items():
        shape = plan.local_shape(name, spec)
        if spec.kind == "duplicate":
            continue
        if spec.kind == "experts":
            e, i, hd = shape
            total += e * sum(linear(f"{name}.0.{proj}", n, k) for proj, n, k in (("gate_proj", i, hd),
                                                                                 ("up_proj", i, hd),
                                                                                 ("down_proj", hd, i)))
        elif spec.kind == "linear":
            total += linear(name.removesuffix(".weight"), *shape, spec.fp32)
        else:
            n = 1
            for d in shape:
                n *= d
            total += n * (4 if spec.fp32 else act_bytes)
    heads = cfg.num_attention_heads // plan.layout.attn_tp_size
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if include_mtp else 0)
    total += layers * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim) * cfg.kv_lora_rank * act_bytes  # W_UK, W_UV
    return total


def activation_bytes_per_token(cfg: ModelConfig, plan: ParallelPlan, act_bytes: int = 2) -> int:
    """Live activations of one token inside the widest layer (an estimate: hidden / residual / normed input, the
    attention projections of this rank's heads, the indexer's queries, and the MoE's 8 routed pairs)."""
    L = plan.layout
    heads = cfg.num_attention_heads // L.attn_tp_size
    hd = cfg.hidden_size
    attention = (cfg.q_lora_rank + cfg.index_head_dim + cfg.latent_dim + cfg.q_lora_rank
                 + heads * (cfg.qk_head_dim + 2 * cfg.latent_dim + cfg.kv_lora_rank * 2 + cfg.v_head_dim)
                 + cfg.index_n_heads * cfg.index_head_dim * 2) * act_bytes
    inter = cfg.moe_intermediate_size // L.moe_tp_size
    moe = cfg.num_experts_per_tok * (3 * inter + 2 * hd) * act_bytes
    dense = 3 * (cfg.intermediate_size // L.world_size) * act_bytes if any(cfg.dense_layers) else 0
    return 4 * hd * act_bytes + max(attention, moe, dense)


def mlp_gather_bytes(cfg: ModelConfig, plan: ParallelPlan, step_tokens: int, act_bytes: int = 2) -> int:
    """Under DP attention: every group's tokens gathered for the MLP, its output, and the activations of one
    MLP_CHUNK_TOKENS chunk beyond what one group's tokens need (layers.FeedForward)."""
    L = plan.layout
    if L.attn_dp_size == 1:
        return 0
    gathered = step_tokens * L.attn_dp_size
    per_token = activation_bytes_per_token(cfg, plan, act_bytes)
    return 2 * gathered * cfg.hidden_size * act_bytes + max(0, min(gathered, MLP_CHUNK_TOKENS) - step_tokens) * per_token


@dataclass
class MemoryPlan:
    rank: int
    device_bytes: int
    fraction: float | None
    weights: int
    kv_latent_per_token: int  # all layers
    kv_index_per_token: int
    kv_tokens: int
    graphs: int
    workspace: int
    step_tokens: int

    @property
    def kv_bytes(self) -> int:
        return max(self.kv_tokens, 0) * (self.kv_latent_per_token + self.kv_index_per_token)

    @property
    def total(self) -> int:
        return self.weights + self.kv_bytes + self.graphs + self.workspace

    def problems(self) -> list[str]:
        out = []
        if self.kv_tokens <= 0:
            out.append(f"the weights ({self.weights / GIB:.1f} GiB) leave no room for a KV cache within "
                       f"{(self.fraction or 1) * self.device_bytes / GIB:.1f} GiB")
        elif self.total > self.device_bytes:
            out.append(f"weights + KV + graphs + workspace = {self.total / GIB:.1f} GiB exceed the device's "
                       f"{self.device_bytes / GIB:.1f} GiB: lower --mem-fraction-static or --chunked-prefill-size")
        return out

    def lines(self) -> list[str]:
        kv = self.kv_latent_per_token + self.kv_index_per_token
        return [
            f"rank {self.rank}: device {self.device_bytes / GIB:.1f} GiB"
            + (f", --mem-fraction-static {self.fraction}" if self.fraction is not None else ""),
            f"  weights          {self.weights / GIB:8.2f} GiB",
            f"  KV pool          {self.kv_bytes / GIB:8.2f} GiB  = {self.kv_tokens:,} tokens × {kv:,} B "
            f"(latent {self.kv_latent_per_token:,} + indexer keys {self.kv_index_per_token:,} B per token, all layers)"
            if self.kv_tokens > 0 else "  KV pool              none  (no room left after the weights)",
            f"  graphs           {self.graphs / GIB:8.2f} GiB  (estimate)",
            f"  workspace        {self.workspace / GIB:8.2f} GiB  (estimate, {self.step_tokens:,}-token steps)",
            f"  total            {self.total / GIB:8.2f} GiB of {self.device_bytes / GIB:.1f} GiB",
            f"  max tokens       {max(self.kv_tokens, 0):,}",
        ]


def plan_memory(config: EngineConfig, cfg: ModelConfig, device_bytes: int, rank: int = 0,
                latent_bytes_per_token: int | None = None, index_bytes_per_token: int | None = None,
                act_bytes: int = 2) -> MemoryPlan:
    """The plan of world rank `rank`. KV bytes per token per layer come from the resolved cache layout (build.py's
    kv_spec) when given, else the fp8 defaults (656 + 132 B)."""
    layout = config.parallel.layout(rank)
    plan = ParallelPlan(cfg, layout)
    weights = weight_bytes(cfg, plan, config.with_mtp, act_bytes)
    layers = cfg.num_hidden_layers + (1 if config.speculative.enabled else 0)  # the MTP layer's cache: drafting only
    latent = layers * (latent_bytes_per_token or 656)
    index = layers * (index_bytes_per_token or 132)
    s = config.scheduler
    step = s.chunked_prefill_size if s.chunked_prefill_size > 0 else (s.max_model_len or cfg.max_position_embeddings)
    per_token = activation_bytes_per_token(cfg, plan, act_bytes)
    # a step samples one row per request, or each of its draft tokens' rows too (speculative verify)
    logits_rows = min(step, s.max_running_requests * (config.speculative.steps + 1))
    max_len = s.max_model_len or min(cfg.max_position_embeddings, 32768)
    pages = -(-max_len // config.cache.page_size)

    def indexer_logits(rows: int) -> int:  # fp32 [rows, keys], at most INDEXER_LOGITS_BYTES at once
        return min(INDEXER_LOGITS_BYTES, rows * max_len * 4) if max_len > cfg.index_topk else 0

    workspace = (step * per_token + mlp_gather_bytes(cfg, plan, step, act_bytes) + indexer_logits(step)
                 + logits_rows * cfg.vocab_size * 4)
    graph_bs = 0 if s.disable_graphs else (s.graph_max_bs or min(s.max_running_requests, 256))
    # one pool for every graph (the largest batch's activations and indexer logits), one shared logits buffer, and
    # per captured size and attention path its static block table
    sizes = graph_batch_sizes(graph_bs)
    graphs = graph_bs * (per_token + cfg.vocab_size * 4) + indexer_logits(graph_bs) + 2 * sum(sizes) * pages * 4
    c = config.cache
    if c.num_kv_pages is not None:
        tokens = c.num_kv_pages * c.page_size
    else:
        budget = (c.mem_fraction_static * device_bytes - weights) if c.mem_fraction_static is not None \
            else c.kv_cache_memory_gib * GIB
        tokens = int(budget // (latent + index)) // c.page_size * c.page_size
        cap = s.max_running_requests * pages * c.page_size
        tokens = min(tokens, cap) if tokens > 0 else tokens
    return MemoryPlan(rank, device_bytes, c.mem_fraction_static, weights, latent, index, tokens, graphs, workspace,
                      step)
