"""Offline engine front: `LLM(model=dir).generate(...)`, shaped like vLLM's."""

from __future__ import annotations

import dataclasses
import logging
import weakref
from dataclasses import dataclass, field

from dsv32.core.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, SpeculativeConfig
from dsv32.core.engine.build import build_engine_core, load_tokenizer, resolve
from dsv32.core.parallel import ParallelConfig
from dsv32.core.sampling import SamplingParams

log = logging.getLogger("dsv32")


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
    prompt_logprobs: list | None = None  # SamplingParams.prompt_logprobs: TokenLogprob of prompt tokens 2..n

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str | None:
        return self.outputs[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


def _core_part(path: str) -> property:
    """A read-only attribute of the in-process engine (a single rank); with rank processes there is none here."""
    def get(self):
        if self.core is None:
            raise AttributeError(f"this LLM runs in rank processes (tp_size > 1): its {path} is not in this process")
        obj = self.core
        for name in path.split("."):
            obj = getattr(obj, name)
        return obj

    return property(get)


class LLM:
    """Loads a DeepSeek-V3.2 checkpoint directory and generates.

    dtype: 'auto' (the checkpoint's torch_dtype; bf16 for FP8 checkpoints), 'bfloat16', 'float32'.
    device: default: the backend's device (the reference backend: 'cpu').
    backend: registered backend name or 'auto' (default; also DSV32_BACKEND).
    kv_cache_dtype: 'auto' (= model dtype), 'bfloat16', 'fp8_e4m3' (656 bytes per token, core/platform.py).
    indexer_precision: 'auto' ('fp8' for FP8-quantized checkpoints, else 'exact'), 'exact' (as transformers),
    'fp8' (Hadamard + fp8 keys, as DeepSeek's reference).
    kernels: per kernel slot the kernel to use, SGLang's names: {'dsa_decode_backend': 'triton', ...}: the
    names each backend declares (`dsv32 env` lists them); missing/None/'auto' = the default. A choice that cannot run
    raises KernelChoiceError naming what can.
    load_format: 'auto' (read the checkpoint) or 'dummy' (random weights of the config's shapes, FP8-block where the
    config says FP8: benchmarks at full size without the weights).
    graph_max_bs: largest decode batch replayed from a device graph (default: min(max_num_seqs, 256) where the
    backend has graphs); disable_graphs: run every step eagerly. graph_factory: a DeviceGraph maker (tests use
    core.engine.runner.EagerGraph to exercise graph replay on the CPU; single process only).
    disable_overlap_schedule: schedule each step only after the previous one's tokens are read (the default
    overlaps them where the device runs asynchronously).
    max_model_len: context length (default: the config's max_position_embeddings, capped at 32768).
    num_kv_pages: KV cache size in pages (default: room for max_num_seqs full-length sequences, within
    kv_cache_memory_gib).
    tp_size / dp_size / ep_size / enable_dp_attention: the parallel layout, as SGLang's --tp / --dp / --ep /
    --enable-dp-attention (core/parallel.py): with more than one rank, one process per rank runs the engine
    (torch.distributed: gloo on the CPU) and this object talks to them; dist_timeout_s bounds every wait on a rank.
    speculative_algorithm ('EAGLE' or 'NEXTN') / speculative_num_steps (default 3) / speculative_eagle_topk (1) /
    speculative_num_draft_tokens (steps + 1): MTP speculative decoding with the checkpoint's NextN layer, as SGLang's
    flags (core/engine/speculative.py); `stats()` reports the accept length.
    """

    def __init__(self, model: str, dtype: str = "auto", device: str | None = None, backend: str | None = None,
                 kv_cache_dtype: str = "auto", indexer_precision: str = "auto", page_size: int = 64,
                 max_model_len: int | None = None, num_kv_pages: int | None = None, max_num_seqs: int = 16,
                 kv_cache_memory_gib: float = 1.0, load_mtp: bool = False, tokenizer: str | None = None,
                 chunked_prefill_size: int = 8192, enable_prefix_caching: bool = True,
                 mem_fraction_static: float | None = None, kernels: dict[str, str | None] | None = None,
                 load_format: str = "auto", graph_max_bs: int | None = None, disable_graphs: bool = False,
                 disable_overlap_schedule: bool = False, graph_factory=None, tp_size: int = 1, dp_size: int = 1,
                 ep_size: int = 1, enable_dp_attention: bool = False, dist_timeout_s: float = 600.0,
                 max_prefill_tokens: int | None = None, seed: int | None = None, schedule_policy: str = "fcfs",
                 speculative_algorithm: str | None = None, speculative_num_steps: int | None = None,
                 speculative_eagle_topk: int | None = None, speculative_num_draft_tokens: int | None = None):
        self.engine_config = EngineConfig(
            model=model, tokenizer=tokenizer, dtype=dtype, device=device, backend=backend, load_format=load_format,
            load_mtp=load_mtp, kernels=tuple((kernels or {}).items()), seed=seed,
            cache=CacheConfig(kv_cache_dtype=kv_cache_dtype, indexer_precision=indexer_precision, page_size=page_size,
                              num_kv_pages=num_kv_pages, kv_cache_memory_gib=kv_cache_memory_gib,
                              mem_fraction_static=mem_fraction_static),
            scheduler=SchedulerConfig(max_model_len=max_model_len, max_running_requests=max_num_seqs,
                                      chunked_prefill_size=chunked_prefill_size,
                                      enable_prefix_cache=enable_prefix_caching,
                                      overlap=not disable_overlap_schedule, graph_max_bs=graph_max_bs,
                                      disable_graphs=disable_graphs, max_prefill_tokens=max_prefill_tokens,
                                      schedule_policy=schedule_policy),
            parallel=ParallelConfig(tp_size=tp_size, dp_size=dp_size, ep_size=ep_size,
                                    enable_dp_attention=enable_dp_attention, dist_timeout_s=dist_timeout_s),
            speculative=SpeculativeConfig(algorithm=speculative_algorithm, num_steps=speculative_num_steps,
                                          eagle_topk=speculative_eagle_topk,
                                          num_draft_tokens=speculative_num_draft_tokens))
        self.config = ModelConfig.from_pretrained(model)
        self._ranks = None
        if self.engine_config.parallel.world_size == 1:
            self.core = build_engine_core(self.engine_config, graph_factory=graph_factory)
            self.tokenizer = self.core.tokenizer
            self.max_model_len = self.core.resolved.max_model_len
            return
        if graph_factory is not None:
            raise ValueError("graph_factory works in a single process only (tp_size=1)")
        from dsv32.core.engine.launcher import RankProcesses

        resolve(self.engine_config, self.config)  # the config's errors here, before any process starts
        self.core = None
        self._ranks = RankProcesses(self.engine_config, log.getEffectiveLevel())
        weakref.finalize(self, self._ranks.shutdown)
        self.tokenizer = load_tokenizer(tokenizer or model)
        self.max_model_len = self._ranks.info["max_model_len"]

    # The single-process engine's parts (tests and benchmarks look inside).
    engine = _core_part("engine")
    model = _core_part("model")
    kv_cache = _core_part("kv_cache")
    runner = _core_part("runner")
    ops = _core_part("ops")
    backend = _core_part("backend")
    dtype = _core_part("resolved.dtype")
    indexer_precision = _core_part("resolved.indexer_precision")

    def stats(self) -> dict:
        """The engine's counters: preemptions, prefix-cache hits and, with speculative decoding, the accept length
        (avg_spec_accept_length: tokens emitted per verify step; spec_accept_histogram[L]: steps that emitted L)."""
        if self._ranks is not None:
            return dict(self._ranks.stats)
        from dsv32.core.engine.worker import engine_stats

        return engine_stats(self.core)

    def shutdown(self) -> None:
        """Stops the rank processes (several ranks); nothing to do in a single process."""
        if self._ranks is not None:
            self._ranks.shutdown()
            self._ranks = None

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
        params = [self._constrained(p) for p in params]
        if self._ranks is not None:
            return self._ranks.generate(token_prompts, params, self.tokenizer is not None)
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
            results.append(RequestOutput(g[0].request_id, g[0].prompt_ids, outputs,
                                         list(g[0].prompt_logprobs) if g[0].params.prompt_logprobs is not None else None))
        return results

    # ---- helpers ------------------------------------------------------------------------------------
    def _constrained(self, params: SamplingParams) -> SamplingParams:
        """Structured output: json_schema / regex / ebnf compiled (xgrammar) into params.grammar."""
        if params.json_schema is None and params.regex is None and params.ebnf is None:
            return params
        if self.tokenizer is None:
            raise ValueError("structured output needs the model's tokenizer.json")
        if getattr(self, "_grammar_compiler", None) is None:
            from dsv32.core.grammar import GrammarCompiler

            self._grammar_compiler = GrammarCompiler(self.tokenizer, self.config.vocab_size, self.config.eos_token_ids)
        return self._grammar_compiler.attach(params)

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
