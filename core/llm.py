"""Offline engine front: `LLM(model=dir).generate(...)`, shaped like vLLM's."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field

import torch

from dsv32.core.config import ModelConfig
from dsv32.core.engine import Engine, EngineConfig
from dsv32.core.kv_cache import KVCache, KVCacheSpec
from dsv32.core.loader import dummy_weights, load_weights
from dsv32.core.model import DeepseekV32
from dsv32.core.model_runner import ModelRunner
from dsv32.core.ops import KernelContext
from dsv32.core.registry import create_ops, select_backend
from dsv32.core.sampling import SamplingParams

log = logging.getLogger("dsv32")

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
           "float": torch.float32}
_KV_DTYPES = ("auto", "bfloat16", "bf16", "float32", "fp8_e4m3", "fp8")
_INDEXER_PRECISIONS = ("auto", "exact", "fp8")


@dataclass
class CompletionOutput:
    index: int
    text: str | None
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list | None = None  # TokenLogprob per generated token when SamplingParams.logprobs is set


def expand_n(params: SamplingParams) -> list[SamplingParams]:
    """One SamplingParams per completion for n > 1 (completion i seeded with seed + i when seeded)."""
    if params.n == 1:
        return [params]
    return [dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + i)
            for i in range(params.n)]


@dataclass
class RequestOutput:
    """One prompt's result. `token_ids` / `text` / `finish_reason` are the (first) completion's, also
    available vLLM-style as `outputs[0]`."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str | None:
        return self.outputs[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


class LLM:
    """Loads a DeepSeek-V3.2 checkpoint directory and generates.

    dtype: 'auto' (the checkpoint's torch_dtype; bf16 for FP8 checkpoints), 'bfloat16', 'float32'.
    device: default: the backend's device (the reference backend: 'cpu').
    backend: registered backend name or 'auto' (default; also DSV32_BACKEND).
    kv_cache_dtype: 'auto' (= model dtype), 'bfloat16', 'fp8_e4m3' (FlashMLA 656-byte layout).
    indexer_precision: 'auto' ('fp8' for FP8-quantized checkpoints, else 'exact'), 'exact' (as transformers),
    'fp8' (Hadamard + fp8 keys, as DeepSeek's reference).
    kernels: per kernel slot the kernel to use, SGLang's names: {'dsa_prefill_backend': 'triton', 'dsa_decode_backend':
    'flashmla_kv', 'moe_runner_backend': 'deep_gemm'}; missing/None/'auto' = the fastest that runs here. A choice that
    cannot run raises KernelChoiceError naming what can.
    load_format: 'auto' (read the checkpoint) or 'dummy' (random weights of the config's shapes, FP8-block where the
    config says FP8: benchmarks at full size without the weights).
    cuda_graph_max_bs: largest decode batch replayed from a device graph (default: min(max_num_seqs, 256) where the
    backend has graphs); disable_cuda_graph: run every step eagerly. graph_factory: a DeviceGraph maker (tests use
    core.model_runner.EagerGraph to exercise graph replay on the CPU).
    disable_overlap_schedule: schedule each step only after the previous one's tokens are read (the default
    overlaps them where the device runs asynchronously).
    max_model_len: context length (default: the config's max_position_embeddings, capped at 32768).
    num_kv_pages: KV cache size in pages (default: room for max_num_seqs full-length sequences, within
    kv_cache_memory_gib).
    """

    def __init__(self, model: str, dtype: str = "auto", device: str | None = None, backend: str | None = None,
                 kv_cache_dtype: str = "auto", indexer_precision: str = "auto", page_size: int = 64,
                 max_model_len: int | None = None, num_kv_pages: int | None = None, max_num_seqs: int = 16,
                 kv_cache_memory_gib: float = 1.0, load_mtp: bool = False, tokenizer: str | None = None,
                 chunked_prefill_size: int = 8192, enable_prefix_caching: bool = True,
                 mem_fraction_static: float | None = None, kernels: dict[str, str | None] | None = None,
                 load_format: str = "auto", cuda_graph_max_bs: int | None = None, disable_cuda_graph: bool = False,
                 disable_overlap_schedule: bool = False, graph_factory=None):
        t0 = time.monotonic()
        self.config = cfg = ModelConfig.from_pretrained(model)
        self.dtype = _resolve_dtype(dtype, cfg)
        if indexer_precision not in _INDEXER_PRECISIONS:
            raise ValueError(f"indexer_precision must be one of {_INDEXER_PRECISIONS}, got {indexer_precision!r}")
        d = cfg.index_head_dim
        hadamard_ok = d & (d - 1) == 0
        if indexer_precision == "auto":
            indexer_precision = "fp8" if cfg.quant is not None and hadamard_ok else "exact"
            if cfg.quant is not None and not hadamard_ok:
                log.info("indexer_precision auto → exact: index_head_dim %d is not a power of two (Hadamard)", d)
        elif indexer_precision == "fp8" and not hadamard_ok:
            raise ValueError(f"indexer_precision='fp8' needs a power-of-two index_head_dim for the Hadamard "
                             f"rotation; this model has {d}. Use indexer_precision='exact'")
        self.indexer_precision = indexer_precision
        if kv_cache_dtype not in _KV_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {_KV_DTYPES}, got {kv_cache_dtype!r}")
        latent_dtype = {"auto": self.dtype, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                        "float32": torch.float32, "fp8": "fp8_e4m3", "fp8_e4m3": "fp8_e4m3"}[kv_cache_dtype]
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be a positive integer, got {page_size!r}")

        self.backend = select_backend(backend)
        device = torch.device(device or self.backend.cls.default_device())
        self.ops = create_ops(self.backend, device)
        self.ops.select_kernels(KernelContext(dtype=self.dtype, kv_cache_fp8=latent_dtype == "fp8_e4m3",
                                              fp8_weights=cfg.quant is not None,
                                              num_heads=cfg.num_attention_heads), kernels)
        log.info("backend %s on %s, dtype %s, kv cache %s, indexer %s", self.backend.name, device, self.dtype,
                 latent_dtype, indexer_precision)

        self.max_model_len = max_model_len or min(cfg.max_position_embeddings, 32768)
        if self.max_model_len > cfg.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        if load_format == "dummy":
            log.info("load_format=dummy: random weights (no checkpoint tensors are read)")
            weights = dummy_weights(cfg, self.ops, self.dtype, device, include_mtp=load_mtp)
        elif load_format == "auto":
            weights = load_weights(model, cfg, self.ops, self.dtype, device, include_mtp=load_mtp)
        else:
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
        self.model = DeepseekV32(cfg, weights, self.ops, self.dtype, device, indexer_fp8=indexer_precision == "fp8",
                                 max_positions=self.max_model_len)

        spec = KVCacheSpec(num_layers=cfg.num_hidden_layers, num_pages=1, page_size=page_size,
                           kv_lora_rank=cfg.kv_lora_rank, rope_dim=cfg.qk_rope_head_dim,
                           index_head_dim=cfg.index_head_dim, latent_dtype=latent_dtype,
                           index_fp8=indexer_precision == "fp8", index_dtype=self.dtype)
        pages_per_seq = math.ceil(self.max_model_len / page_size)
        if mem_fraction_static is not None:
            total = self.backend.cls.total_memory_bytes(device)
            weights_bytes = _weights_bytes(weights)
            kv_cache_memory_gib = (mem_fraction_static * total - weights_bytes) / 2**30
            if kv_cache_memory_gib <= 0:
                raise ValueError(f"mem_fraction_static={mem_fraction_static} of {total / 2**30:.1f} GiB leaves no room for "
                                 f"the KV cache after {weights_bytes / 2**30:.1f} GiB of weights; raise it")
        if num_kv_pages is None:
            by_memory = int(kv_cache_memory_gib * 2**30) // spec.bytes_per_page()
            num_kv_pages = max(pages_per_seq, min(max_num_seqs * pages_per_seq, by_memory))
        if num_kv_pages < pages_per_seq:
            raise ValueError(f"num_kv_pages={num_kv_pages} cannot hold one sequence of max_model_len="
                             f"{self.max_model_len} tokens ({pages_per_seq} pages of {page_size}); "
                             "raise num_kv_pages or lower max_model_len")
        spec = dataclasses.replace(spec, num_pages=num_kv_pages)
        self.kv_cache = KVCache(spec, device)
        self.tokenizer = _load_tokenizer(tokenizer or model)
        graph_bs = self._graph_max_bs(cuda_graph_max_bs, disable_cuda_graph, graph_factory, max_num_seqs)
        self.runner = ModelRunner(self.model, self.kv_cache, self.max_model_len, graph_bs, graph_factory)
        self.runner.capture()
        overlap = not disable_overlap_schedule and self.ops.new_event() is not None  # CPU: nothing to overlap
        self.engine = Engine(self.model, self.kv_cache, EngineConfig(
            max_model_len=self.max_model_len, max_running_requests=max_num_seqs,
            chunked_prefill_size=chunked_prefill_size, enable_prefix_cache=enable_prefix_caching, overlap=overlap),
            self.tokenizer, self.runner)
        log.info("ready in %.1f s: %d KV pages of %d tokens (%.1f MiB)", time.monotonic() - t0, num_kv_pages,
                 page_size, num_kv_pages * spec.bytes_per_page() / 2**20)

    def _graph_max_bs(self, requested: int | None, disabled: bool, factory, max_num_seqs: int) -> int:
        if disabled:
            return 0
        why = "" if factory is not None else self.ops.graph_support()
        if requested is not None:
            if requested < 0:
                raise ValueError(f"cuda_graph_max_bs must be ≥ 0, got {requested}")
            if requested and why:
                raise ValueError(f"cuda_graph_max_bs={requested}: device graphs are not available here ({why}); "
                                 "drop --cuda-graph-max-bs or pass --disable-cuda-graph")
            return requested
        if why:
            log.info("decode runs without device graphs: %s", why)
            return 0
        return min(max_num_seqs, 256)

    def generate(self, prompts=None, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 prompt_token_ids: list[list[int]] | None = None, use_tqdm: bool = False) -> list[RequestOutput]:
        """prompts: a string, a list of strings (needs a tokenizer), token-id lists, or dicts with
        'prompt_token_ids' / 'prompt'; or pass prompt_token_ids=[[...], ...]. Returns outputs in prompt order."""
        token_prompts = self._token_prompts(prompts, prompt_token_ids)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(token_prompts)
        if len(params) != len(token_prompts):
            raise ValueError(f"got {len(params)} sampling_params for {len(token_prompts)} prompts")
        groups = []
        for ids, p in zip(token_prompts, params):
            groups.append([self.engine.add_request(ids, child) for child in expand_n(p)])
        texts: dict[str, list[str]] = {r.request_id: [] for g in groups for r in g}
        while self.engine.has_work():
            for out in self.engine.step():
                texts[out.request_id].append(out.text_delta)
        results = []
        for g in groups:
            outputs = [CompletionOutput(i, "".join(texts[r.request_id]) if self.tokenizer else None,
                                        list(r.output_ids), r.finish_reason, list(r.logprobs) or None)
                       for i, r in enumerate(g)]
            results.append(RequestOutput(g[0].request_id, g[0].prompt_ids, outputs))
        return results

    # ---- helpers ------------------------------------------------------------------------------------
    def _token_prompts(self, prompts, prompt_token_ids) -> list[list[int]]:
        if prompt_token_ids is not None:
            if prompts is not None:
                raise ValueError("give either prompts or prompt_token_ids, not both")
            return [list(p) for p in prompt_token_ids]
        if prompts is None:
            raise ValueError("no prompts given")
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        out = []
        for p in prompts:
            if isinstance(p, dict):
                p = p.get("prompt_token_ids", p.get("prompt"))
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("text prompts need a tokenizer (tokenizer.json in the model directory); "
                                     "pass prompt_token_ids instead")
                p = self.tokenizer.encode(p).ids
            out.append(list(p))
        return out


def _weights_bytes(weights: dict) -> int:
    def size(x) -> int:
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if dataclasses.is_dataclass(x):
            return sum(size(getattr(x, f.name)) for f in dataclasses.fields(x))
        return 0

    return sum(size(w) for w in weights.values())


def _resolve_dtype(dtype: str, cfg: ModelConfig) -> torch.dtype:
    if dtype == "auto":
        dtype = cfg.torch_dtype if cfg.torch_dtype in _DTYPES else "bfloat16"
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto', 'bfloat16' or 'float32', got {dtype!r}")
    return _DTYPES[dtype]


def _load_tokenizer(path: str):
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(file)
