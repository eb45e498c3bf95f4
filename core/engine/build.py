"""Building one rank's engine from an EngineConfig: its backend and device, its part of the weights, a KV cache sized
by memory (the same number of pages on every rank), decode graphs and the scheduler. `LLM(...)` builds the
single-process engine in place; each rank process (worker.py) builds its own after joining the process groups."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import resource
import time
from dataclasses import dataclass, field

import torch

from dsv32.core import envs
from dsv32.core.communicator import ProcessGroups, single_process
from dsv32.core.config import EngineConfig, ModelConfig
from dsv32.core.engine.engine import Engine
from dsv32.core.engine.memory import plan_memory
from dsv32.core.engine.runner import EagerGraph, ModelRunner
from dsv32.core.kv_cache import KVCache, KVCacheSpec
from dsv32.core.model import DeepseekV32
from dsv32.core.model.checkpoint import dummy_weights, load_weights
from dsv32.core.model.plan import ParallelPlan
from dsv32.core.ops import KernelContext, Ops
from dsv32.core.platform import Platform
from dsv32.core.registry import BackendInfo, create_ops, select_backend

log = logging.getLogger("dsv32")

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
           "float": torch.float32}
_KV_DTYPES = ("auto", "bfloat16", "bf16", "float32", "fp8_e4m3", "fp8")
_INDEXER_PRECISIONS = ("auto", "exact", "fp8")
GIB = 2**30


@dataclass
class Resolved:
    """The config's 'auto' values decided for this model (the same on every rank)."""

    dtype: torch.dtype
    latent_dtype: torch.dtype | str  # a float dtype or "fp8_e4m3"
    indexer_precision: str
    max_model_len: int
    latent_layout: str = "combined"  # decided with the backend (fit_platform)


def resolve(config: EngineConfig, cfg: ModelConfig) -> Resolved:
    """Checks the config's values against the model and decides its 'auto' ones; errors name the setting."""
    dtype = config.dtype
    if dtype == "auto":
        dtype = cfg.torch_dtype if cfg.torch_dtype in _DTYPES else "bfloat16"
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto', 'bfloat16' or 'float32', got {config.dtype!r}")
    dtype = _DTYPES[dtype]
    c = config.cache
    if c.indexer_precision not in _INDEXER_PRECISIONS:
        raise ValueError(f"indexer_precision must be one of {_INDEXER_PRECISIONS}, got {c.indexer_precision!r}")
    d = cfg.index_head_dim
    hadamard_ok = d & (d - 1) == 0
    precision = c.indexer_precision
    if precision == "auto":
        precision = "fp8" if cfg.quant is not None and hadamard_ok else "exact"
        if cfg.quant is not None and not hadamard_ok:
            log.info("indexer_precision auto → exact: index_head_dim %d is not a power of two (Hadamard)", d)
    elif precision == "fp8" and not hadamard_ok:
        raise ValueError(f"indexer_precision='fp8' needs a power-of-two index_head_dim for the Hadamard "
                         f"rotation; this model has {d}. Use indexer_precision='exact'")
    if config.scheduler.schedule_policy not in ("fcfs", "lpm"):
        raise ValueError(f"schedule_policy must be 'fcfs' or 'lpm', got {config.scheduler.schedule_policy!r}")
    if c.kv_cache_dtype not in _KV_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {_KV_DTYPES}, got {c.kv_cache_dtype!r}")
    latent = {"auto": dtype, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
              "fp8": "fp8_e4m3", "fp8_e4m3": "fp8_e4m3"}[c.kv_cache_dtype]
    if not isinstance(c.page_size, int) or c.page_size < 1:
        raise ValueError(f"page_size must be a positive integer, got {c.page_size!r}")
    max_len = config.scheduler.max_model_len or min(cfg.max_position_embeddings, 32768)
    if max_len > cfg.max_position_embeddings:
        raise ValueError(f"max_model_len {max_len} exceeds the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    if config.load_format not in ("auto", "dummy"):
        raise ValueError(f"load_format must be 'auto' or 'dummy', got {config.load_format!r}")
    problems = config.parallel.problems() + config.parallel.model_problems(cfg)
    if problems:
        raise ValueError("parallel layout: " + "; ".join(problems))
    problems = config.speculative.problems()
    if config.speculative.enabled and cfg.num_nextn_predict_layers < 1:
        problems.append("this checkpoint has no MTP layer to draft with (num_nextn_predict_layers is 0 in its "
                        "config.json): drop --speculative-algorithm (speculative_algorithm)")
    if problems:
        raise ValueError("speculative decoding: " + "; ".join(problems))
    return Resolved(dtype, latent, precision, max_len)


def kv_spec(cfg: ModelConfig, r: Resolved, page_size: int, num_pages: int = 1, mtp: bool = False) -> KVCacheSpec:
    """mtp: one more layer for the MTP layer's own latent and indexer keys (speculative decoding)."""
    return KVCacheSpec(num_layers=cfg.num_hidden_layers + (1 if mtp else 0), num_pages=num_pages, page_size=page_size,
                       kv_lora_rank=cfg.kv_lora_rank, rope_dim=cfg.qk_rope_head_dim, index_head_dim=cfg.index_head_dim,
                       latent_dtype=r.latent_dtype, index_fp8=r.indexer_precision == "fp8", index_dtype=r.dtype,
                       latent_layout=r.latent_layout)


def fit_platform(config: EngineConfig, cfg: ModelConfig, r: Resolved, platform: Platform) -> Resolved:
    """The resolved settings made to fit what the backend declares (core/platform.py): an 'auto' fp8 indexer
    becomes exact where the device has no fp8 indexer, the latent layout is the backend's; raises ValueError naming
    the setting for what the backend cannot do (page size, fp8 KV cache, an explicit fp8 indexer)."""
    precision = r.indexer_precision
    if precision == "fp8" and platform.fp8_indexer and config.cache.indexer_precision == "auto":
        log.info("indexer_precision auto → exact: %s", platform.fp8_indexer)
        precision = "exact"
    fp8_latent = r.latent_dtype == "fp8_e4m3"
    problems = platform.kv_problems(config.cache.page_size, fp8_latent, precision == "fp8")
    if problems:
        raise ValueError("this backend cannot run the KV cache asked for: " + "; ".join(problems))
    if cfg.quant is not None and platform.fp8_dtype is None:
        log.info("this device has no fp8: the FP8 checkpoint's weights are dequantized to %s at load "
                 "(about twice their memory)", r.dtype)
    return dataclasses.replace(r, indexer_precision=precision, latent_layout=platform.latent_layout(fp8_latent))


def select_ops(config: EngineConfig, cfg: ModelConfig, r: Resolved,
               local_rank: int = 0) -> tuple[BackendInfo, Ops, Resolved]:
    """The backend and its ops on this rank's device (index local_rank when a node runs several ranks), the settings
    fitted to its platform, and its kernel choices resolved."""
    backend = select_backend(config.backend, config.device)
    device = torch.device(config.device or backend.cls.default_device())
    if device.type != "cpu" and device.index is None and config.parallel.ranks_per_node > 1:
        device = torch.device(device.type, local_rank)
    ops = create_ops(backend, device)
    r = fit_platform(config, cfg, r, ops.platform())
    ops.select_kernels(KernelContext(dtype=r.dtype, kv_cache_fp8=r.latent_dtype == "fp8_e4m3",
                                     fp8_weights=cfg.quant is not None, num_heads=cfg.num_attention_heads,
                                     attn_tp_size=config.parallel.attn_tp_size, page_size=config.cache.page_size,
                                     index_topk=cfg.index_topk, indexer_fp8=r.indexer_precision == "fp8"),
                       dict(config.kernels))
    return backend, ops, r


@dataclass
class EngineCore:
    """One rank's engine and what it was built from."""

    config: EngineConfig
    model_config: ModelConfig
    resolved: Resolved
    backend: BackendInfo
    ops: Ops
    groups: ProcessGroups
    model: DeepseekV32
    kv_cache: KVCache
    runner: ModelRunner
    engine: Engine
    tokenizer: object | None
    memory: dict = field(default_factory=dict)  # what the startup log reports, in bytes

    def info(self) -> dict:
        """What a front end needs to know (sent with "ready")."""
        cfg = self.model_config
        return {"max_model_len": self.resolved.max_model_len, "vocab_size": cfg.vocab_size,
                "eos_token_ids": list(cfg.eos_token_ids), "backend": self.backend.name,
                "device": str(self.model.device), "num_kv_pages": self.kv_cache.allocator.num_pages,
                "page_size": self.kv_cache.page_size, "world_size": self.groups.layout.world_size,
                "memory": dict(self.memory)}


def build_engine_core(config: EngineConfig, groups: ProcessGroups | None = None, backend: BackendInfo | None = None,
                      ops: Ops | None = None, graph_factory=None) -> EngineCore:
    """Builds this rank's engine. groups: the rank's process groups (default: a single process); backend / ops:
    already chosen (a rank process picks them before joining the groups); graph_factory: a DeviceGraph maker for
    tests (EagerGraph)."""
    t0 = time.monotonic()
    groups = groups or single_process()
    layout = groups.layout
    if config.seed is not None:  # the sampling RNG of requests without their own seed
        torch.manual_seed(config.seed)
    cfg = ModelConfig.from_pretrained(config.model)
    r = resolve(config, cfg)
    if ops is None:
        backend, ops, r = select_ops(config, cfg, r, layout.local_rank)
    else:
        r = fit_platform(config, cfg, r, ops.platform())
    device = ops.device
    log.info("rank %d/%d (pid %d): backend %s on %s, dtype %s, kv cache %s, indexer %s", layout.rank,
             layout.world_size, os.getpid(), backend.name, device, r.dtype, r.latent_dtype, r.indexer_precision)

    plan = ParallelPlan(cfg, layout)
    report: dict = {}
    if config.load_format == "dummy":
        log.info("load_format=dummy: random weights (no checkpoint tensors are read)")
        weights = dummy_weights(cfg, ops, r.dtype, device, include_mtp=config.with_mtp, plan=plan)
    else:
        weights = load_weights(config.model, cfg, ops, r.dtype, device, include_mtp=config.with_mtp, plan=plan,
                               report=report, progress=layout.local_rank == 0)  # one progress line per node
    model = DeepseekV32(cfg, weights, ops, r.dtype, device, indexer_fp8=r.indexer_precision == "fp8",
                        max_positions=r.max_model_len, groups=groups)
    weights_bytes = _weights_bytes(model.w) + sum(_weights_bytes({"uk": layer.attn.w_uk, "uv": layer.attn.w_uv})
                                                  for layer in model.layers + ([model.mtp.block] if model.mtp else []))

    c, s = config.cache, config.scheduler
    spec = kv_spec(cfg, r, c.page_size, mtp=config.speculative.enabled)
    pages_per_seq = math.ceil(r.max_model_len / c.page_size)
    num_pages = c.num_kv_pages
    if num_pages is None:
        kv_gib = c.kv_cache_memory_gib
        if c.mem_fraction_static is not None:
            total = backend.cls.total_memory_bytes(device)
            kv_gib = (c.mem_fraction_static * total - weights_bytes) / GIB
            if kv_gib <= 0:
                raise ValueError(f"mem_fraction_static={c.mem_fraction_static} of {total / GIB:.1f} GiB leaves no room "
                                 f"for the KV cache after {weights_bytes / GIB:.1f} GiB of weights; raise it")
        by_memory = int(kv_gib * GIB) // spec.bytes_per_page()
        num_pages = max(pages_per_seq, min(s.max_running_requests * pages_per_seq, by_memory))
    num_pages = groups.min_int(num_pages)  # identical schedulers need identical pools
    if num_pages < pages_per_seq:
        raise ValueError(f"num_kv_pages={num_pages} cannot hold one sequence of max_model_len={r.max_model_len} "
                         f"tokens ({pages_per_seq} pages of {c.page_size}); raise num_kv_pages or lower max_model_len")
    kv_cache = KVCache(dataclasses.replace(spec, num_pages=num_pages), device)
    tokenizer = load_tokenizer(config.tokenizer or config.model)

    before_graphs = ops.memory_allocated()
    if graph_factory is None and ops.platform().graphs and envs.debug_eager_graphs():
        graph_factory = EagerGraph
    graph_bs = _graph_max_bs(ops, s.graph_max_bs, s.disable_graphs, graph_factory, s.max_running_requests)
    k = config.speculative.steps
    runner = ModelRunner(model, kv_cache, r.max_model_len, graph_bs, graph_factory, verify_tokens=k + 1 if k else 0)
    runner.capture()
    graphs_bytes = max(0, ops.memory_allocated() - before_graphs) if before_graphs is not None else None
    # CPU: nothing to overlap (unless a test forces it to exercise the scheduling)
    overlap = s.overlap and (ops.new_event() is not None or envs.debug_force_overlap())
    # ranks must fail together: only a single process isolates a failed step's requests and goes on
    isolate = s.isolate_failures and layout.world_size == 1
    engine = Engine(model, kv_cache, dataclasses.replace(s, max_model_len=r.max_model_len, overlap=overlap,
                                                         isolate_failures=isolate), tokenizer, runner,
                    speculative_steps=config.speculative.steps)
    total = getattr(backend.cls, "total_memory_bytes", None)  # optional for a third-party backend
    estimate = plan_memory(config, cfg, total(device) if total else 0, layout.rank, spec.latent_bytes_per_token(),
                           spec.index_bytes_per_token())
    left = (1 - c.mem_fraction_static) * estimate.device_bytes if c.mem_fraction_static is not None else None
    if left is not None and estimate.graphs + estimate.workspace > left:
        log.warning("rank %d: graphs + workspace need about %.2f GiB, more than the %.2f GiB that "
                    "--mem-fraction-static %s leaves: lower it (or chunked_prefill_size / graph_max_bs)",
                    layout.rank, (estimate.graphs + estimate.workspace) / GIB, left / GIB, c.mem_fraction_static)
    latent_bytes = num_pages * c.page_size * spec.latent_bytes_per_token() * spec.num_layers
    index_bytes = num_pages * c.page_size * spec.index_bytes_per_token() * spec.num_layers
    memory = {"weights": weights_bytes, "kv_latent": latent_bytes, "kv_index": index_bytes,
              "graphs": graphs_bytes, "workspace_estimate": estimate.workspace, "max_tokens": num_pages * c.page_size,
              "host_peak_rss": host_peak_rss()}
    if "read_bytes" in report:
        memory["checkpoint_read"], memory["checkpoint_total"] = report["read_bytes"], report["checkpoint_bytes"]
    log.info("rank %d memory: weights %.2f GiB (read %s), KV pool %.2f GiB (latent %.2f + indexer keys %.2f) = %d "
             "tokens, graphs %s, workspace ≈ %.2f GiB (estimate); host peak RSS %.2f GiB; ready in %.1f s",
             layout.rank, weights_bytes / GIB,
             f"{memory['checkpoint_read'] / GIB:.2f} of {memory['checkpoint_total'] / GIB:.2f} GiB"
             if "checkpoint_read" in memory else "random weights", (latent_bytes + index_bytes) / GIB,
             latent_bytes / GIB, index_bytes / GIB, memory["max_tokens"],
             "n/a" if graphs_bytes is None else f"{graphs_bytes / GIB:.2f} GiB", estimate.workspace / GIB,
             memory["host_peak_rss"] / GIB, time.monotonic() - t0)
    return EngineCore(config, cfg, r, backend, ops, groups, model, kv_cache, runner, engine, tokenizer, memory)


def _graph_max_bs(ops: Ops, requested: int | None, disabled: bool, factory, max_running: int) -> int:
    if disabled:
        return 0
    why = "" if factory is not None else ops.platform().graphs
    if requested is not None:
        if requested < 0:
            raise ValueError(f"graph_max_bs must be ≥ 0, got {requested}")
        if requested and why:
            raise ValueError(f"graph_max_bs={requested}: device graphs are not available here ({why}); "
                             "set no graph_max_bs, or disable_graphs")
        return requested
    if why:
        log.info("decode runs without device graphs: %s", why)
        return 0
    return min(max_running, 256)


def host_peak_rss() -> int:
    """This process's peak resident set in bytes: VmHWM, which restarts at exec (getrusage's ru_maxrss carries the
    parent's peak into a spawned process on Linux), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _weights_bytes(weights: dict) -> int:
    def size(x) -> int:
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if dataclasses.is_dataclass(x):
            return sum(size(getattr(x, f.name)) for f in dataclasses.fields(x))
        return 0

    return sum(size(w) for w in weights.values())


def load_tokenizer(path: str):
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(file)
