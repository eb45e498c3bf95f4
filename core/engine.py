"""Engine: requests, a FCFS scheduler over the paged KV cache, and the schedule → run → sample → update step.

Each step builds one ForwardBatch under a token budget (chunked prefill): running requests first, in
admission order, each taking min(tokens left to compute, budget left) — 1 for a decoding request, a chunk of
the prompt for a prefilling one — then newly admitted requests. Logits are taken only for requests whose
chunk reaches their last token. A request is admitted when pages for its remaining prompt are free (counting
prefix-cache pages that can be evicted). When a running request needs a page and none can be freed, the most
recently admitted request is preempted: its pages are released and it returns to the front of the queue with
prompt + generated tokens, to be recomputed. Per-request generators keep seeded sampling identical with or
without preemption, batching or prefix hits.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from dsv32.core.detokenizer import IncrementalDetokenizer
from dsv32.core.forward_batch import ForwardBatch
from dsv32.core.kv_cache import KVCache
from dsv32.core.model import DeepseekV32
from dsv32.core.prefix_cache import PrefixCache
from dsv32.core.sampling import (SamplingParams, TokenLogprob, apply_penalties, logprobs_of,
                                 mask_stops_before_min_tokens)

log = logging.getLogger("dsv32.engine")


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose KV is in the cache
    cached_prompt_tokens: int = 0  # prompt tokens reused from the prefix cache (first admission)
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    detok: IncrementalDetokenizer | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_preemptions: int = 0
    arrival_s: float = field(default_factory=time.monotonic)
    first_token_s: float | None = None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class StepOutput:
    """What one step produced for one request: new tokens (and their text / logprobs) and, at the end, why."""

    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    finish_reason: str | None
    logprobs: list[TokenLogprob]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class EngineConfig:
    max_model_len: int
    max_running_requests: int = 256
    chunked_prefill_size: int = 8192  # tokens per step; ≤ 0: no limit (whole prompts)
    enable_prefix_cache: bool = True


class Engine:
    def __init__(self, model: DeepseekV32, cache: KVCache, config: EngineConfig, tokenizer=None):
        self.model, self.cache, self.ops, self.cfg = model, cache, model.ops, config
        self.tokenizer = tokenizer
        self.eos_ids = set(model.cfg.eos_token_ids)
        self.prefix_cache = PrefixCache(cache.allocator, cache.page_size) if config.enable_prefix_cache else None
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._ids = itertools.count()
        self._pending: list[StepOutput] = []  # outputs produced outside a forward step (aborts)
        self.num_preemptions = 0

    # ---- requests -----------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> Request:
        if not prompt_ids:
            raise ValueError("prompt is empty: give at least one token")
        vocab = self.model.cfg.vocab_size
        bad = [t for t in prompt_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        if len(prompt_ids) >= self.cfg.max_model_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; the context length is {self.cfg.max_model_len} "
                             "(prompt + at least one generated token must fit)")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; use stop_token_ids")
        req = Request(request_id or str(next(self._ids)), list(prompt_ids), params)
        if params.seed is not None:
            req.generator = torch.Generator(device=self.model.device).manual_seed(params.seed)
        if self.tokenizer is not None:
            req.detok = IncrementalDetokenizer(self.tokenizer, req.prompt_ids, params.skip_special_tokens,
                                               params.stop, params.no_stop_trim, params.min_tokens)
        self.waiting.append(req)
        return req

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is; frees its pages. Returns False if it is unknown or already done."""
        for queue in (self.waiting, self.running):
            for req in queue:
                if req.request_id == request_id:
                    queue.remove(req)
                    self._release(req)
                    req.finish_reason = "abort"
                    self._pending.append(self._output(req, [], []))
                    return True
        return False

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._pending)

    @property
    def kv_usage(self) -> float:
        a = self.cache.allocator
        return 1.0 - a.num_free / a.num_pages

    # ---- one step -----------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Runs one forward pass (if anything is schedulable); returns this step's outputs."""
        outputs, self._pending = self._pending, []
        work = self._schedule()
        if not work:
            return outputs
        fb = ForwardBatch.build([(req.all_ids[req.num_cached:req.num_cached + n], req.num_cached, req.pages)
                                 for req, n in work], self.cache, self.model.device)
        hidden = self.model.forward(fb, self.cache)
        sampling = [i for i, (req, n) in enumerate(work) if req.num_cached + n == len(req.all_ids)]
        for req, n in work:
            req.num_cached += n
        if not sampling:
            return outputs
        reqs = [work[i][0] for i in sampling]
        logits = self.model.logits(hidden[fb.logits_indices[sampling]])
        logits = apply_penalties(logits, [r.prompt_ids for r in reqs], [r.output_ids for r in reqs], [r.params for r in reqs])
        logits = mask_stops_before_min_tokens(logits, [r.output_ids for r in reqs], [r.params for r in reqs], self.eos_ids)
        tokens = self._sample(reqs, logits)
        token_logprobs = logprobs_of(logits, tokens, [r.params for r in reqs])
        now = time.monotonic()
        for req, tok, lp in zip(reqs, tokens.tolist(), token_logprobs):
            if req.first_token_s is None:
                req.first_token_s = now
            if not req.output_ids and self.prefix_cache is not None:
                self.prefix_cache.insert(req.prompt_ids, req.pages)  # prompt computed: shareable from now on
            req.output_ids.append(tok)
            if lp is not None:
                req.logprobs.append(lp)
            if req.detok is not None:
                req.detok.add(tok)
            self._check_stop(req, tok)
            if req.finished:
                self.running.remove(req)
                self._release(req)
            outputs.append(self._output(req, [tok], [lp] if lp is not None else []))
        return outputs

    def _output(self, req: Request, new: list[int], lps: list[TokenLogprob]) -> StepOutput:
        text = ""
        if req.detok is not None:
            if req.finished:
                req.detok.flush()
            text = req.detok.take_delta(req.finished)
        return StepOutput(req.request_id, new, text, req.finished, req.finish_reason, lps, len(req.prompt_ids),
                          len(req.output_ids), req.cached_prompt_tokens)

    # ---- scheduling ---------------------------------------------------------------------------------
    def _schedule(self) -> list[tuple[Request, int]]:
        limit = self.cfg.chunked_prefill_size
        budget = limit if limit > 0 else 1 << 62
        work: list[tuple[Request, int]] = []
        for req in list(self.running):
            if budget <= 0:
                break
            if req not in self.running:  # preempted while making room for an earlier request
                continue
            n = min(len(req.all_ids) - req.num_cached, budget)
            if not self._make_room(req, req.num_cached + n):
                continue
            work.append((req, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_running_requests:
            req = self.waiting[0]
            if not self._try_admit(req):
                break
            self.waiting.popleft()
            self.running.append(req)
            n = min(len(req.all_ids) - req.num_cached, budget)
            self.cache.grow(req.pages, req.num_cached + n)
            work.append((req, n))
            budget -= n
        return work

    def _free_pages(self) -> int:
        return self.cache.allocator.num_free + (self.prefix_cache.evictable() if self.prefix_cache else 0)

    def _ensure_free(self, n: int) -> bool:
        free = self.cache.allocator.num_free
        if free < n and self.prefix_cache is not None:
            self.prefix_cache.evict(n - free)
        return self.cache.allocator.num_free >= n

    def _make_room(self, req: Request, num_tokens: int) -> bool:
        """Give req pages for num_tokens, preempting from the tail of the running list if needed."""
        while not self._ensure_free(self.cache.pages_needed(num_tokens, len(req.pages))):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is req:
                return False
        self.cache.grow(req.pages, num_tokens)
        return True

    def _try_admit(self, req: Request) -> bool:
        ids = req.all_ids
        if self.prefix_cache is not None and not req.pages:
            req.pages = self.prefix_cache.match(ids, max_pages=(len(ids) - 1) // self.cache.page_size)
            req.num_cached = len(req.pages) * self.cache.page_size
            if not req.output_ids and req.num_preemptions == 0:
                req.cached_prompt_tokens = req.num_cached
        need = self.cache.pages_needed(len(ids), len(req.pages))
        if self._ensure_free(need):
            return True
        if not self.running and need > self.cache.allocator.num_pages:
            raise RuntimeError(f"request {req.request_id} needs {need} pages, more than the whole KV cache")
        self._release(req)  # keep nothing while waiting: hits are re-matched on the next try
        return False

    def _release(self, req: Request) -> None:
        if req.pages:
            self.cache.free(req.pages)
        req.num_cached = 0

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        log.info("preempted request %s (%d tokens) to free KV pages", req.request_id, len(req.all_ids))

    # ---- sampling and stopping ----------------------------------------------------------------------
    def _sample(self, batch: list[Request], logits: torch.Tensor) -> torch.Tensor:
        dev = logits.device
        f32 = dict(dtype=torch.float32, device=dev)
        return self.ops.sample(logits, torch.tensor([r.params.temperature for r in batch], **f32),
                               torch.tensor([r.params.top_p for r in batch], **f32),
                               torch.tensor([r.params.top_k for r in batch], dtype=torch.int64, device=dev),
                               torch.tensor([r.params.min_p for r in batch], **f32),
                               [r.generator for r in batch])

    def _check_stop(self, req: Request, tok: int) -> None:
        p = req.params
        if len(req.output_ids) >= p.min_tokens:
            if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos_ids):
                req.finish_reason = "stop"
                return
            if req.detok is not None and req.detok.stopped_by is not None:
                req.finish_reason = "stop"
                return
        if len(req.output_ids) >= p.max_tokens or len(req.all_ids) >= self.cfg.max_model_len:
            req.finish_reason = "length"
