"""The vendor-neutral op interface: one class, one method per op; each docstring is the contract.

The model graph (core/model.py) calls only these ops plus plain torch tensor glue (views, cat, bmm,
indexing). A backend subclasses `Ops` and overrides what it accelerates; anything it leaves alone falls
back to the reference backend (logged once, reported by `dsv32 env`). Backends receive weights as
`LinearWeight` / `ExpertWeights` and may repack them once at load time via `prepare_*`.

Conventions: T = number of tokens in the flat (ragged) batch, H = heads, "slot" = physical cache slot
= page * page_size + offset. Unless stated, outputs have the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dsv32.core.platform import Platform


@dataclass
class LinearWeight:
    """A linear layer's weight [N, K] (y = x · Wᵀ).

    `scale_inv` is None for bf16/fp32 weights. For DeepSeek FP8-block weights `weight` is e4m3 in the platform's fp8
    dtype (the checkpoints' float8_e4m3fn, converted at load where the platform says otherwise) and `scale_inv` float32
    [ceil(N/block_n), ceil(K/block_k)] with W[n,k] = weight[n,k] · scale_inv[n//bn, k//bk].

    FP4 weights (`fmt` "nvfp4" or "mxfp4", core/fp4.py): `weight` uint8 [N, K/2] (two e2m1 codes per byte, the even
    element in the low nibble), `scale_inv` the group scales as stored — nvfp4: float8_e4m3fn [N, K/16]; mxfp4: uint8
    e8m0 [N, K/32] — `block` (1, group), `global_scale` (nvfp4 only) fp32 [N]: W[n,k] = e2m1[n,k] ·
    scale[n, k//group] · global_scale[n]. `input_scale`: the checkpoint's static activation scale (nvfp4; only native
    FP4-math kernels use it). `act` "mxfp4": the checkpoint quantizes activations dynamically to MXFP4, so every product
    with this weight first rounds x through MXFP4 (fp4.qdq_mxfp4); "" = weight-only (activations in the model dtype).
    Stacked experts carry a leading [E] on every tensor.
    """

    weight: torch.Tensor
    scale_inv: torch.Tensor | None = None
    block: tuple[int, int] = (128, 128)
    fmt: str = ""
    global_scale: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None
    act: str = ""

    @property
    def shape(self) -> tuple[int, int]:
        n, k = self.weight.shape[-2:]
        return (n, 2 * k) if self.is_fp4 else (n, k)

    @property
    def is_fp8(self) -> bool:
        """Block-scaled 8-bit weights (FP8, or msModelSlim int8 with per-row scales)."""
        return self.scale_inv is not None and not self.fmt

    @property
    def is_fp4(self) -> bool:
        return self.fmt in ("nvfp4", "mxfp4")


@dataclass
class ExpertWeights:
    """Routed experts of one MoE layer as the checkpoint holds them, stacked over experts: gate and up
    [E, I, K], down [E, K, I]; each a LinearWeight whose scales (FP8, FP4) are stacked the same way.
    `prepare_experts` may fuse them into `gate_up` [E, 2I, K] (gate rows first), the layout fused-MoE
    kernels want; a backend's `moe_experts` reads whichever fields its own `prepare_experts` filled."""

    gate: LinearWeight | None
    up: LinearWeight | None
    down: LinearWeight
    gate_up: LinearWeight | None = None

    @property
    def num_experts(self) -> int:
        return self.down.weight.shape[0]


@dataclass
class AttnMetadata:
    """Where each query token of a flat batch reads keys from (used by indexer top-k and dense attention).

    token_req [T] int64: row of `block_table` for each query token; positions [T] int64: its position, so
    it may see keys at positions 0..positions[t] (inclusive). block_table [B, P] int32 (−1 = no page),
    kv_lens [B] int64: keys in the cache for each request after this step's writes. `kv_lens_cpu` mirrors
    kv_lens as a Python list (the reference loops over requests). `extra` holds what the backend's
    `Ops.prepare_metadata` derives from these once per forward for its kernels (shared by every layer)."""

    token_req: torch.Tensor
    positions: torch.Tensor
    block_table: torch.Tensor
    kv_lens: torch.Tensor
    kv_lens_cpu: list[int]
    page_size: int
    is_decode: bool = False  # every request contributes exactly one query token (selects the decode kernels)
    extra: dict = field(default_factory=dict)


def causal_slots(batch: AttnMetadata) -> torch.Tensor:
    """int32 [T, max(kv_lens_cpu)]: for each query token, the physical slots of positions 0..positions[t] of its
    request (−1 beyond). Turns dense causal attention into sparse attention over every causal key. The width comes
    from the host-side kv_lens_cpu (no device sync, so it can be captured in a device graph)."""
    max_len = max(batch.kv_lens_cpu, default=0)
    pos = torch.arange(max_len, device=batch.positions.device)
    pages = batch.block_table[batch.token_req][:, pos // batch.page_size].long()
    slots = pages * batch.page_size + pos % batch.page_size
    return torch.where(pos[None, :] <= batch.positions[:, None], slots, torch.full_like(slots, -1)).to(torch.int32)


class KernelChoiceError(ValueError):
    """A kernel choice that cannot run here; the message names what can."""


@dataclass(frozen=True)
class KernelContext:
    """What kernel availability depends on beyond the device: the model's shapes and the cache/weight formats."""

    dtype: torch.dtype = torch.bfloat16
    kv_cache_fp8: bool = False
    fp8_weights: bool = False
    num_heads: int = 128
    attn_tp_size: int = 1  # ranks the attention heads are split over
    page_size: int = 64
    index_topk: int = 2048
    indexer_fp8: bool = False

    @property
    def local_heads(self) -> int:
        """Attention heads of one rank."""
        return -(-self.num_heads // self.attn_tp_size)


class Ops:
    """Abstract op set. Subclasses override; the registry fills the rest from the reference backend."""

    name: str = "abstract"

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.kernels: dict[str, str] = {}  # slot → chosen kernel (set by select_kernels)

    # ---- kernel selection (not ops) ----------------------------------------------------------------
    def known_kernel_choices(self) -> dict[str, tuple[str, ...]]:
        """Every kernel slot and name any discovered backend declares (`kernel_choices` of its class: SGLang's flag
        values such as --dsa-decode-backend's); core knows none of them itself."""
        from dsv32.core.registry import known_kernel_choices

        return known_kernel_choices()

    def kernel_options(self, ctx: KernelContext) -> dict[str, dict[str, str]]:
        """Per kernel slot: kernel name → '' when it can run here, else why not; the default first (the first
        runnable one is chosen when the user asks for nothing). A kernel never verified against its real library is
        listed after the default: runnable on request, never chosen by itself. Default: this backend's ops serve
        every slot."""
        return {slot: {self.name: ""} for slot in self.known_kernel_choices()}

    def select_kernels(self, ctx: KernelContext, requested: dict[str, str | None] | None = None) -> dict[str, str]:
        """Resolve each slot's choice ('auto'/None: fastest runnable). Raises KernelChoiceError naming what can run."""
        requested = {k: v for k, v in (requested or {}).items() if v is not None}
        known_slots = self.known_kernel_choices()
        unknown = set(requested) - set(known_slots)
        if unknown:
            raise KernelChoiceError(f"unknown kernel slot(s) {sorted(unknown)}; known: {sorted(known_slots)}")
        options = self.kernel_options(ctx)
        chosen, problems = {}, []
        for slot, known in known_slots.items():
            opts = options.get(slot, {})
            runnable = [name for name, why in opts.items() if not why]
            want = requested.get(slot)
            flag = "--" + slot.replace("_", "-")
            if want in (None, "auto"):
                chosen[slot] = runnable[0] if runnable else ""
            elif want not in known and want not in opts:
                problems.append(f"{flag} {want}: unknown; choose one of {list(known)}")
            elif want not in runnable:
                why = opts.get(want) or f"not provided by the {self.name} backend"
                problems.append(f"{flag} {want} cannot run here ({why}); runnable here: {runnable}")
            else:
                chosen[slot] = want
        if problems:
            raise KernelChoiceError("; ".join(problems))
        self.kernels = chosen
        return chosen

    def kernel_notes(self) -> dict[str, str]:
        """op → a short note on which kernel serves it and why faster ones don't (shown by `dsv32 env`)."""
        return {}

    def fp8_format(self) -> tuple[torch.dtype, float]:
        """(e4m3 dtype, its max) that this backend's fp8 ops produce and read: the platform's (Platform.fp8_dtype;
        OCP float8_e4m3fn where the platform has none, for ops that only emulate fp8 storage)."""
        dtype = self.platform().fp8_dtype or torch.float8_e4m3fn
        return dtype, torch.finfo(dtype).max

    # ---- weights ------------------------------------------------------------------------------------
    def prepare_linear(self, w: LinearWeight, dtype: torch.dtype) -> LinearWeight:
        """Called once per linear weight at load. May repack/dequantize; the result is what `linear`
        receives. dtype is the model's compute dtype (activations)."""
        raise NotImplementedError

    def prepare_experts(self, w: ExpertWeights, dtype: torch.dtype) -> ExpertWeights:
        """Like prepare_linear for stacked routed experts; the result is what `moe_experts` receives."""
        raise NotImplementedError

    def fuse_linears(self, ws: list[LinearWeight]) -> LinearWeight | None:
        """One prepared weight computing several linears of the same input at once (outputs concatenated in
        order), or None when this backend does not fuse them (then the model calls each). Not an op: the reference
        never fuses, so its numbers stay those of the separate linears."""
        return None

    def dequantize(self, w: LinearWeight, dtype: torch.dtype) -> torch.Tensor:
        """Dense [N, K] (or [E, N, K]) tensor of dtype equal to the weight's real value (FP8 blocks scaled)."""
        raise NotImplementedError

    # ---- elementwise / norms ------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, w: LinearWeight) -> torch.Tensor:
        """y [.., N] = x [.., K] · Wᵀ with W as prepared by `prepare_linear`; y has x's dtype.
        FP8 paths quantize x per token per 128 channels and accumulate in fp32 per K block."""
        raise NotImplementedError

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None):
        """RMSNorm over the last dim, computed in fp32: y = weight · (x · rsqrt(mean(x²) + eps)) cast to x's dtype
        before the weight multiply (as transformers). With `residual`: x ← x + residual first and the
        function returns (y, x) so the caller keeps the new residual."""
        raise NotImplementedError

    def layer_norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        """Affine LayerNorm over the last dim (the indexer's k_norm)."""
        raise NotImplementedError

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """x [.., 2I] → silu(x[..,:I]) · x[..,I:] [.., I]."""
        raise NotImplementedError

    def rotary_embedding(self, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                         interleaved: bool) -> torch.Tensor:
        """Rotate x [T, H, R] (R even) by position. cos_sin [max_pos, R] fp32 = [cos | sin], each R/2 wide.
        interleaved=True: pairs (x[2i], x[2i+1]) (GPT-J, MLA); False: pairs (x[i], x[i+R/2]) (NeoX, indexer).
        Output keeps the input layout. cos/sin are cast to x's dtype before use."""
        raise NotImplementedError

    def hadamard_transform(self, x: torch.Tensor) -> torch.Tensor:
        """x [.., D] (D a power of two) → x · H_D · D^-0.5 with H_D in Sylvester order (orthonormal)."""
        raise NotImplementedError

    def quantize_fp8(self, x: torch.Tensor, block: int, ue8m0: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Dynamic per-(row, block) e4m3 quantization of x [.., D] in the fp8 format of `fp8_format()` (max M: 448
        for e4m3fn, 240 for e4m3fnuz): scale = max(amax, 1e-4) / M, rounded up to a power of two when ue8m0;
        returns (x_fp8 [.., D] of that dtype, scale [.., ceil(D/block)] fp32) with x ≈ x_fp8 · scale."""
        raise NotImplementedError

    # ---- KV cache writes ----------------------------------------------------------------------------
    def write_latent_cache(self, latent_cache: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
                           slots: torch.Tensor) -> None:
        """Store c [T, L] and k_pe [T, R] at slots [T] (int64; −1 = skip) of one layer's latent cache.
        Layouts (see core/kv_cache.py, core/platform.py): "combined" float pool [pages, page_size, L+R] = [c | k_pe];
        "combined" uint8 pool [pages, page_size, L + 4·ceil(L/128) + 2R] = [c e4m3 | fp32 scale per 128 | k_pe bf16]
        (656 B at V3.2 sizes; e4m3 in `fp8_format()`); "split" (a SplitLatent): c and k_pe in their own pools."""
        raise NotImplementedError

    def write_index_keys(self, index_cache: torch.Tensor, keys: torch.Tensor, slots: torch.Tensor) -> None:
        """Store indexer keys [T, D] at slots. Float pool [pages, page_size, D]: stored as is. uint8 pool
        [pages, page_size·(D+4)]: per page D-byte e4m3 keys of all tokens (in `fp8_format()`), then their fp32
        scales (one per token, ue8m0)."""
        raise NotImplementedError

    def mla_kv_write(self, kv: torch.Tensor, kv_lora_rank: int, norm_weight: torch.Tensor, eps: float,
                     positions: torch.Tensor, cos_sin: torch.Tensor, latent_cache: torch.Tensor,
                     slots: torch.Tensor) -> None:
        """Fused MLA key path: kv [T, L+R] (kv_a_proj output, L = kv_lora_rank) → c = rms_norm(kv[:, :L], norm_weight, eps),
        k_pe = interleaved RoPE of kv[:, L:] at positions → write_latent_cache(c, k_pe, slots). Each step rounds
        to kv's dtype as the unfused ops do."""
        raise NotImplementedError

    # ---- indexer ------------------------------------------------------------------------------------
    def indexer_k_write(self, k: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float,
                        positions: torch.Tensor, cos_sin: torch.Tensor, rope_dim: int, hadamard: bool,
                        index_cache: torch.Tensor, slots: torch.Tensor) -> None:
        """Fused indexer key path: k [T, D] (wk output) → LayerNorm(norm_weight, norm_bias, eps) → half-split
        RoPE on k[:, :rope_dim] (rope part first) → Hadamard if `hadamard` → write_index_keys (which quantizes
        to fp8 for the uint8 pool)."""
        raise NotImplementedError

    def indexer_q_prepare(self, q: torch.Tensor, head_weights: torch.Tensor, positions: torch.Tensor,
                          cos_sin: torch.Tensor, rope_dim: int, fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused indexer query path: q [T, Hi, D] → half-split RoPE on q[..., :rope_dim]; with `fp8`: Hadamard,
        then per-(token, head) e4m3 quantization (ue8m0 scale s) and head_weights [T, Hi] fp32 ← head_weights · s.
        Returns (q, head_weights) ready for indexer_topk."""
        raise NotImplementedError

    def indexer_topk(self, q: torch.Tensor, head_weights: torch.Tensor, index_cache: torch.Tensor,
                     batch: AttnMetadata, softmax_scale: float, topk: int) -> torch.Tensor:
        """Lightning-indexer scores and top-k selection over a paged key cache.

        q [T, Hi, D] (float, or e4m3 of `fp8_format()` when index_cache is the fp8 pool); head_weights [T, Hi] fp32.
        Score of query t against the key at position s of its request (s ≤ positions[t]):
            I[t, s] = k_scale[s] · Σ_h head_weights[t, h] · relu(softmax_scale · q[t, h] · k[s])
        (k_scale = 1 for float pools). Returns int32 [T, topk]: the physical slots of the min(topk, pos+1)
        highest-scoring keys (any order), padded with −1. Ties may be broken either way."""
        raise NotImplementedError

    # ---- attention ----------------------------------------------------------------------------------
    def sparse_mla_attention(self, q: torch.Tensor, latent_cache: torch.Tensor, topk_slots: torch.Tensor,
                             softmax_scale: float, kv_lora_rank: int, batch: AttnMetadata | None = None) -> torch.Tensor:
        """Absorbed MLA over selected cache entries. q [T, H, L+R] = [q·W_UK | q_pe]; topk_slots [T, K] int32
        physical slots, −1 (or out of range) = ignored. p = softmax_s(scale · q·kv_s) over valid s;
        out [T, H, L] = Σ p · c_s. A row with no valid slot outputs 0. `batch` (optional) lets a backend pick its
        decode or prefill kernel (batch.is_decode) and read the block table; the result must not depend on it."""
        raise NotImplementedError

    def dense_mla_attention(self, q: torch.Tensor, latent_cache: torch.Tensor, batch: AttnMetadata,
                            softmax_scale: float, kv_lora_rank: int) -> torch.Tensor:
        """As sparse_mla_attention with every causal key selected (positions 0..positions[t] of the token's
        request): the short-prefill path used when no request has more keys than index_topk."""
        raise NotImplementedError

    # ---- MoE ----------------------------------------------------------------------------------------
    def moe_route(self, router_logits: torch.Tensor, correction_bias: torch.Tensor, n_group: int,
                  topk_group: int, top_k: int, renormalize: bool,
                  routed_scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
        """DeepSeek noaux_tc routing. router_logits [T, E] fp32. s = sigmoid(logits); b = s + bias (selection
        only); group score = sum of the top-2 b per group; keep topk_group groups (others −inf); pick top_k
        experts by b; weights = s (renormalized to sum 1 if renormalize) · routed_scaling_factor.
        Returns (weights [T, top_k] fp32, expert ids [T, top_k] int64)."""
        raise NotImplementedError

    def moe_experts(self, x: torch.Tensor, experts: ExpertWeights, topk_weights: torch.Tensor,
                    topk_ids: torch.Tensor) -> torch.Tensor:
        """Routed experts: y [T, K] = Σ_i topk_weights[t, i] · W2_e(silu(W1_e x) · W3_e x), e = topk_ids[t, i].
        topk_ids are in [0, E] with E = experts.num_experts: E marks an expert held by another rank (expert
        parallelism), which contributes nothing here."""
        raise NotImplementedError

    # ---- sampling -----------------------------------------------------------------------------------
    def sample(self, logits: torch.Tensor, temperatures: torch.Tensor, top_ps: torch.Tensor, top_ks: torch.Tensor,
               min_ps: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        """Next token per row of logits [B, V] fp32 (penalties already applied). temperature 0 → argmax
        (greedy). Otherwise p = softmax(logits / temperature) restricted to the top_k (≤0: all) most likely
        tokens, to the smallest set whose probability reaches top_p, and to tokens with p ≥ min_p · max(p),
        then a draw using the row's generator (None: global RNG). Returns int64 [B]."""
        raise NotImplementedError

    def verify(self, logits: torch.Tensor, drafts: torch.Tensor, temperatures: torch.Tensor, top_ps: torch.Tensor,
               top_ks: torch.Tensor, min_ps: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        """Speculative verification, row by row. Row r of logits [R, V] fp32 is the target's distribution p_r (as
        `sample` makes it from the row's parameters) at a position whose next token was drafted as drafts[r] (int64
        [R]; −1: none, the row samples as `sample`). Returns int64 [R]: the token row r emits. Greedy rows emit the
        argmax (the draft is accepted iff it equals it). Sampled rows accept the draft with probability p_r(draft)
        and otherwise emit a draw from p_r with the draft's mass removed (renormalized): the drafts are one-hot
        (greedy chain drafting), so the emitted token is distributed exactly as p_r. A draft is accepted iff the
        returned token equals it."""
        raise NotImplementedError


    # ---- the platform, per-batch metadata, device graphs and events (not ops) -------------------------
    def platform(self) -> Platform:
        """What this backend declares about its device (core/platform.py): fp8 dtype, KV layouts and page sizes,
        collectives backend, graph support. Default: a device that runs eagerly, OCP fp8, the combined layout."""
        return Platform(device_type=self.device.type)

    def prepare_metadata(self, batch: AttnMetadata) -> None:
        """Called once per forward, before the first layer (inside a captured graph for decode graphs): derive what
        this backend's attention / indexer kernels need per batch from `batch` into `batch.extra` (e.g. cumulative
        query lengths), so no layer recomputes it. Default: nothing (the kernels read AttnMetadata itself)."""

    def new_graph(self, pool=None):
        """A DeviceGraph (see core/engine/runner.py): `with g.capture(): ...` records device work, `g.replay()`
        re-runs it on the same buffers. `pool` (from `graph_pool()`) lets several graphs share their memory."""
        raise NotImplementedError(self.platform().graphs)

    def graph_pool(self):
        return None

    def new_event(self):
        """An event with record() / synchronize() on the current stream, or None when the device runs
        synchronously (then host reads never overlap device work and need no event)."""
        return None

    def synchronize(self) -> None:
        """Waits for all queued device work."""

    def memory_allocated(self) -> int | None:
        """Bytes of device memory this process holds through torch's allocator (None on the CPU or where torch
        cannot tell): the memory report's measure of graphs and workspace."""
        get = getattr(getattr(torch, "accelerator", None), "memory_allocated", None)
        if self.device.type == "cpu" or get is None:
            return None
        return get(self.device.index if self.device.index is not None else 0)



_NOT_OPS = {"known_kernel_choices", "kernel_options", "select_kernels", "kernel_notes", "platform", "fp8_format",
            "prepare_metadata", "new_graph", "graph_pool", "new_event", "synchronize", "fuse_linears",
            "memory_allocated"}
OP_NAMES = tuple(
    name for name, value in vars(Ops).items() if callable(value) and not name.startswith("_") and name not in _NOT_OPS
)

