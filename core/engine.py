"""Engine: requests, a FCFS scheduler over the paged KV cache, and the schedule → run → sample → update step.

Each step runs one ForwardBatch holding the running requests' next decode token and the whole prompt of
newly admitted requests (a mixed batch). A request is admitted only when pages for its prompt are free.
When a decoding request needs a page and none is free, the most recently admitted request is preempted:
its pages are freed and it goes back to the front of the queue with prompt + generated tokens, to be
recomputed. Per-request generators keep seeded sampling identical with or without preemption.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import dataclass, field

import torch

from dsv32.core.forward_batch import ForwardBatch
from dsv32.core.kv_cache import KVCache
from dsv32.core.model import DeepseekV32
from dsv32.core.sampling import SamplingParams

log = logging.getLogger("dsv32.engine")


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose KV is in the cache
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    num_preemptions: int = 0

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Engine:
    def __init__(self, model: DeepseekV32, cache: KVCache, max_model_len: int, max_running: int = 256,
                 max_prefill_tokens: int = 16384):
        self.model, self.cache, self.ops = model, cache, model.ops
        self.max_model_len = max_model_len
        self.max_running = max_running
        self.max_prefill_tokens = max_prefill_tokens
        self.eos_ids = set(model.cfg.eos_token_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._ids = itertools.count()
        self.num_preemptions = 0

    # ---- requests -----------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> Request:
        if not prompt_ids:
            raise ValueError("prompt is empty: give at least one token")
        vocab = self.model.cfg.vocab_size
        bad = [t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; the context length is {self.max_model_len} "
                             "(prompt + at least one generated token must fit)")
        pages_needed = self.cache.pages_needed(len(prompt_ids) + 1)
        if pages_needed > self.cache.allocator.num_pages:
            raise ValueError(f"prompt needs {pages_needed} KV pages but the cache has {self.cache.allocator.num_pages}; "
                             "raise the KV cache size")
        req = Request(request_id or str(next(self._ids)), list(prompt_ids), params)
        if params.seed is not None:
            req.generator = torch.Generator(device=self.model.device).manual_seed(params.seed)
        self.waiting.append(req)
        return req

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step -----------------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Runs one forward pass; returns the requests that finished in it."""
        decodes = self._reserve_decode_pages()
        prefills = self._admit()
        batch = decodes + prefills
        if not batch:
            return []
        items = []
        for req in batch:
            new = req.all_ids[req.num_cached:]
            items.append((new, req.num_cached, req.pages))
        fb = ForwardBatch.build(items, self.cache, self.model.device)
        hidden = self.model.forward(fb, self.cache)
        logits = self.model.logits(hidden[fb.logits_indices])
        tokens = self._sample(batch, logits).tolist()
        finished = []
        for req, tok in zip(batch, tokens):
            req.num_cached = len(req.all_ids)
            req.output_ids.append(tok)
            self._check_stop(req, tok)
            if req.finished:
                finished.append(req)
                self.running.remove(req)
                self.cache.free(req.pages)
        return finished

    def _reserve_decode_pages(self) -> list[Request]:
        """Ensure every running request has room for one more token, preempting from the tail if needed."""
        scheduled = []
        for req in list(self.running):
            if req not in self.running:  # preempted while making room for an earlier request
                continue
            while self.cache.pages_needed(len(req.all_ids), len(req.pages)) > self.cache.allocator.num_free:
                victim = self.running[-1]
                self._preempt(victim)
                if victim is req:
                    break
            if req in self.running:
                self.cache.grow(req.pages, len(req.all_ids))
                scheduled.append(req)
        return scheduled

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.cache.free(req.pages)
        req.num_cached = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        log.info("preempted request %s (%d tokens) to free KV pages", req.request_id, len(req.all_ids))

    def _admit(self) -> list[Request]:
        admitted, budget = [], self.max_prefill_tokens
        while self.waiting and len(self.running) < self.max_running:
            req = self.waiting[0]
            n = len(req.all_ids)
            if admitted and n > budget:
                break
            if self.cache.pages_needed(n) > self.cache.allocator.num_free:
                break
            self.waiting.popleft()
            self.cache.grow(req.pages, n)
            self.running.append(req)
            admitted.append(req)
            budget -= n
        return admitted

    def _sample(self, batch: list[Request], logits: torch.Tensor) -> torch.Tensor:
        dev = logits.device
        temps = torch.tensor([r.params.temperature for r in batch], dtype=torch.float32, device=dev)
        top_ps = torch.tensor([r.params.top_p for r in batch], dtype=torch.float32, device=dev)
        top_ks = torch.tensor([r.params.top_k for r in batch], dtype=torch.int64, device=dev)
        return self.ops.sample(logits, temps, top_ps, top_ks, [r.generator for r in batch])

    def _check_stop(self, req: Request, tok: int) -> None:
        p = req.params
        if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos_ids):
            req.finish_reason = "stop"
        elif len(req.output_ids) >= p.max_tokens or len(req.all_ids) >= self.max_model_len:
            req.finish_reason = "length"
